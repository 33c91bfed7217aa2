"""Running one job: claim it, load the study, process, persist the outcome.

The Celery task is a thin wrapper around :func:`run_job`; everything here can be
called directly in tests.

A claimed job is leased to its run for ``PACS_AI_JOB_LEASE_SECONDS``; a heartbeat
thread (:class:`LeaseKeeper`) renews the lease every quarter of it while the job
runs, so a dead worker's job is re-queued by the reconciler within about a
minute. A job covers the study's instances up to the highest id seen when it was
claimed. When a newer job supersedes it (instances arrived meanwhile) or its
lease was taken over, it discards its outcome (:class:`JobSuperseded`): it
checks before it persists results or deliveries (:func:`ensure_current`) and
between models.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy.orm import Session

from db import queries
from db.models import Job, JobStatus, utcnow
from db.repo import claim_job, finish_job, job_is_current, record_coverage, renew_lease
from db.session import session_scope
from dicomnode import phi
from worker import metrics
from worker.logging_setup import log_context
from worker.settings import Settings

log = logging.getLogger(__name__)


class JobError(Exception):
    """A readable reason why a job failed (no patient data in the message)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class JobSuperseded(Exception):
    """The job is no longer this run's: a newer job of the study superseded it, or
    its lease expired and another run took it. Its outcome is discarded."""


@dataclass(frozen=True, slots=True)
class InstanceRef:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str | None
    path: Path


@dataclass(frozen=True, slots=True)
class StudyContext:
    job_id: int
    study_id: int
    study_instance_uid: str
    instances: tuple[InstanceRef, ...]
    #: the run holding the job's lease ("": not leased, e.g. in unit tests)
    owner: str = ""
    #: set by the heartbeat when the job is no longer this run's
    lost: threading.Event | None = None

    def check_current(self) -> None:
        """Raise :class:`JobSuperseded` when the heartbeat found the job taken away
        (cheap: no database access; call it between long steps)."""
        if self.lost is not None and self.lost.is_set():
            raise JobSuperseded(f"job {self.job_id} was superseded or taken over")


#: The processing step; the inference pipeline replaces the default.
Processor = Callable[[StudyContext, Settings], dict[str, Any]]


def ensure_current(session: Session, ctx: StudyContext) -> None:
    """In the transaction that persists a job's outcome: raise
    :class:`JobSuperseded` unless the run still holds the job and no finished job
    covered more instances. The job's row stays locked until that transaction
    ends, so the check holds for what it writes."""
    if ctx.owner and not job_is_current(session, ctx.job_id, ctx.owner):
        raise JobSuperseded(f"job {ctx.job_id} was superseded or taken over")


def load_study(
    settings: Settings,
    job_id: int,
    study_id: int,
    max_instance_id: int | None = None,
    owner: str = "",
    lost: threading.Event | None = None,
) -> StudyContext:
    """The job's instances: the study's received ones, up to ``max_instance_id``
    (what the job covers) when given."""
    with session_scope(settings.effective_database_url) as session:
        study_uid = queries.study_uid_of(session, study_id)
        rows = queries.job_input_instances(session, study_id, max_instance_id)
    refs = tuple(
        InstanceRef(
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
            sop_class_uid=sop_class_uid,
            modality=modality,
            path=settings.storage_path / rel_path,
        )
        for sop_uid, series_uid, sop_class_uid, modality, rel_path in rows
    )
    return StudyContext(
        job_id=job_id,
        study_id=study_id,
        study_instance_uid=str(study_uid),
        instances=refs,
        owner=owner,
        lost=lost,
    )


def check_instances(ctx: StudyContext, settings: Settings) -> dict[str, Any]:
    """Default processing: read every instance and summarise the study."""
    if not ctx.instances:
        raise JobError("the study has no instances to process")
    series: dict[str, int] = {}
    modalities: set[str] = set()
    for ref in ctx.instances:
        try:
            ds = dcmread(ref.path, stop_before_pixels=True)
        except FileNotFoundError:
            raise JobError(f"instance sop={ref.sop_instance_uid} is missing from storage") from None
        except Exception as exc:
            raise JobError(
                f"instance sop={ref.sop_instance_uid} cannot be read ({type(exc).__name__})"
            ) from None
        if str(ds.get("SOPInstanceUID", "")) != ref.sop_instance_uid:
            raise JobError(f"instance sop={ref.sop_instance_uid} does not match its stored file")
        series[ref.series_instance_uid] = series.get(ref.series_instance_uid, 0) + 1
        if ref.modality:
            modalities.add(ref.modality)
    return {
        "series": len(series),
        "instances": len(ctx.instances),
        "modalities": sorted(modalities),
        "instances_per_series": series,
    }


def run_job(
    job_id: int,
    settings: Settings,
    processor: Processor = check_instances,
    owner: str | None = None,
    takeover_prefix: str | None = None,
) -> str:
    """Claim and run a job. Returns the final status (``done``, ``failed``,
    ``superseded``), or ``skipped`` when the job was not claimable (finished,
    superseded, or leased to another live run).

    ``owner`` names this run (``<Celery task id>/<try>``; random when not given);
    a lease held by an owner starting with ``takeover_prefix`` (an earlier try of
    the same task) is taken over without counting an attempt. Transient errors (database, broker;
    :func:`is_transient`) propagate for the caller to retry.
    """
    owner = owner or uuid.uuid4().hex
    url = settings.effective_database_url
    now = utcnow()
    with session_scope(url) as session:
        job = claim_job(
            session,
            job_id,
            settings.job_lease_seconds,
            settings.job_max_attempts,
            owner=owner,
            takeover_prefix=takeover_prefix,
            now=now,
        )
        if job is None:
            log.info("job %d not claimable (finished or running elsewhere); skipped", job_id)
            return "skipped"
        study_id = job.study_id
        attempt = job.attempts
        study_uid, first_since, last_instance_at = _study_of(session, job)
        if job.started_at == now and attempt == 1:
            metrics.record_job_started((job.started_at - job.created_at).total_seconds())
    keeper = LeaseKeeper(url, job_id, owner, settings.job_lease_seconds)
    with log_context(job_id=job_id, study=study_uid), keeper:
        status = _run_claimed(settings, job_id, study_id, attempt, processor, owner, keeper.lost)
    if status == JobStatus.DONE.value and first_since:
        # end to end, for the study's first job after its last instance only
        # (a reprocessed study's latency would measure the reprocessing delay)
        metrics.record_study_latency("results", (utcnow() - last_instance_at).total_seconds())
    return status


class LeaseKeeper(threading.Thread):
    """The heartbeat of a running job: renews its lease every quarter of
    ``lease_seconds`` (each time in a short transaction of its own) until the job
    ends. A failed renewal (database down) is tried again every second or two,
    with one log line per outage; when the job turns out to be no longer this
    run's, :attr:`lost` is set and the heartbeat stops."""

    def __init__(self, url: str, job_id: int, owner: str, lease_seconds: float) -> None:
        super().__init__(name=f"pacs-ai-lease-{job_id}", daemon=True)
        self.url = url
        self.job_id = job_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 4
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop_event.set()
        self.join(timeout=2)

    def run(self) -> None:
        failing = False
        wait = self.interval
        while not self._stop_event.wait(wait):
            try:
                with session_scope(self.url) as session:
                    held = renew_lease(session, self.job_id, self.owner, self.lease_seconds)
            except Exception as exc:
                if not failing:
                    log.warning(
                        "job %d: lease not renewed (%s); trying again", self.job_id, _name(exc)
                    )
                failing = True
                wait = min(self.interval, 2.0)
                continue
            if failing:
                log.info("job %d: lease renewed again", self.job_id)
            failing, wait = False, self.interval
            if not held:
                if not self._stop_event.is_set():
                    log.info("job %d: superseded or taken over; stopping it", self.job_id)
                    self.lost.set()
                return


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def _study_of(session: Session, job: Job) -> tuple[str, bool, Any]:
    """The job's Study Instance UID; whether it is the first job created since the
    study's last instance; that instance's time."""
    uid, last_at = queries.study_last_instance(session, job.study_id)
    earlier = queries.earlier_job_since(session, job.study_id, job.id, last_at)
    return uid, earlier is None and job.created_at >= last_at, last_at


def _run_claimed(
    settings: Settings,
    job_id: int,
    study_id: int,
    attempt: int,
    processor: Processor,
    owner: str = "",
    lost: threading.Event | None = None,
) -> str:
    url = settings.effective_database_url
    t0 = time.monotonic()
    log.info("job %d started (attempt %d)", job_id, attempt)
    try:
        covers = None
        if owner:
            with session_scope(url) as session:
                held, covers = record_coverage(session, job_id, owner)
            if not held:
                raise JobSuperseded(f"job {job_id} was superseded or taken over")
        ctx = load_study(settings, job_id, study_id, covers, owner, lost)
        summary = processor(ctx, settings)
    except JobSuperseded:
        return _discarded(job_id, t0)
    except JobError as exc:
        error, summary = phi.scrub(str(exc)), phi.scrub_json(exc.summary)  # no header values
        if not _finish(url, job_id, JobStatus.FAILED, owner, error=error, summary=summary):
            return _discarded(job_id, t0)
        metrics.record_job_finished(JobStatus.FAILED.value, time.monotonic() - t0)
        log.warning("job %d failed: %s", job_id, exc)
        return JobStatus.FAILED.value
    except Exception as exc:
        if is_transient(exc):
            raise
        message = f"internal error: {type(exc).__name__}"
        if _is_timeout(exc):
            message = f"timed out after {settings.task_soft_time_limit:.0f} s"
        if not _finish(url, job_id, JobStatus.FAILED, owner, error=message):
            return _discarded(job_id, t0)
        metrics.record_job_finished(JobStatus.FAILED.value, time.monotonic() - t0)
        log.exception("job %d failed: %s", job_id, message)
        return JobStatus.FAILED.value
    summary["seconds"] = round(time.monotonic() - t0, 3)
    if not _finish(url, job_id, JobStatus.DONE, owner, summary=summary):
        return _discarded(job_id, t0)
    metrics.record_job_finished(JobStatus.DONE.value, time.monotonic() - t0)
    log.info(
        "job %d done study=%s: %d series, %d instances in %.2f s",
        job_id,
        ctx.study_instance_uid,
        summary.get("series", 0),
        summary.get("instances", 0),
        summary["seconds"],
    )
    return JobStatus.DONE.value


def _discarded(job_id: int, t0: float) -> str:
    metrics.record_job_finished(JobStatus.SUPERSEDED.value, time.monotonic() - t0)
    log.info(
        "job %d superseded by a newer job of the study (or taken over); its outcome is discarded",
        job_id,
    )
    return JobStatus.SUPERSEDED.value


def _finish(url: str, job_id: int, status: JobStatus, owner: str = "", **kw: Any) -> bool:
    """Record the outcome while this run still holds the job; False when it does not."""
    with session_scope(url) as session:
        return finish_job(session, job_id, status, owner=owner or None, **kw)


def _is_timeout(exc: BaseException) -> bool:
    return type(exc).__name__ in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}


#: module prefixes whose connection and time-out errors are transient
_TRANSIENT_MODULES = ("sqlalchemy", "psycopg", "kombu", "redis", "amqp", "celery", "sqlite3")
_TRANSIENT_NAMES = {"OperationalError", "ConnectionError", "TimeoutError", "InterfaceError"}


def is_transient(exc: BaseException) -> bool:
    """A database or broker error that another try may not hit: connection lost or
    refused, server restarting, pool time-out, database locked."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, DisconnectionError | PoolTimeout | ConnectionError):
        return True
    module = type(exc).__module__ or ""
    return type(exc).__name__ in _TRANSIENT_NAMES and module.startswith(_TRANSIENT_MODULES)
