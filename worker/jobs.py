"""Running one job: claim it, load the study, process, persist the outcome.

The Celery task is a thin wrapper around :func:`run_job`; everything here can be
called directly in tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from db.models import Instance, Job, JobStatus, Series, Study, utcnow
from db.repo import claim_job, finish_job
from db.session import session_scope
from worker import metrics
from worker.logging_setup import log_context
from worker.settings import Settings

log = logging.getLogger(__name__)


class JobError(Exception):
    """A readable reason why a job failed (no patient data in the message)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary = summary


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


#: The processing step; the inference pipeline replaces the default.
Processor = Callable[[StudyContext, Settings], dict[str, Any]]


def load_study(settings: Settings, job_id: int, study_id: int) -> StudyContext:
    with session_scope(settings.effective_database_url) as session:
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
        rows = session.execute(
            select(Instance, Series.series_instance_uid, Series.modality)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.study_id == study_id, Instance.produced_by_us.is_(False))
            .order_by(Instance.id)
        ).all()
    refs = tuple(
        InstanceRef(
            sop_instance_uid=inst.sop_instance_uid,
            series_instance_uid=series_uid,
            sop_class_uid=inst.sop_class_uid,
            modality=modality,
            path=settings.storage_path / inst.rel_path,
        )
        for inst, series_uid, modality in rows
    )
    return StudyContext(
        job_id=job_id, study_id=study_id, study_instance_uid=str(study_uid), instances=refs
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


def run_job(job_id: int, settings: Settings, processor: Processor = check_instances) -> str:
    """Claim and run a job. Returns the final status, or ``skipped`` when the job
    was not claimable (done already, or leased to another live run)."""
    url = settings.effective_database_url
    with session_scope(url) as session:
        job = claim_job(session, job_id, settings.task_time_limit, settings.job_max_attempts)
        if job is None:
            log.info("job %d not claimable (finished or running elsewhere); skipped", job_id)
            return "skipped"
        study_id = job.study_id
        attempt = job.attempts
        study_uid, first_since, last_instance_at = _study_of(session, job)
        if job.started_at is not None and attempt == 1:
            metrics.record_job_started((job.started_at - job.created_at).total_seconds())
    with log_context(job_id=job_id, study=study_uid):
        status = _run_claimed(settings, job_id, study_id, attempt, processor)
    if status == JobStatus.DONE.value and first_since:
        # end to end, for the study's first job after its last instance only
        # (a reprocessed study's latency would measure the reprocessing delay)
        metrics.record_study_latency("results", (utcnow() - last_instance_at).total_seconds())
    return status


def _study_of(session: Any, job: Job) -> tuple[str, bool, Any]:
    """The job's Study Instance UID; whether it is the first job created since the
    study's last instance; that instance's time."""
    uid, last_at = session.execute(
        select(Study.study_instance_uid, Study.last_instance_at).where(Study.id == job.study_id)
    ).one()
    earlier = session.scalar(
        select(Job.id)
        .where(Job.study_id == job.study_id, Job.id < job.id, Job.created_at >= last_at)
        .limit(1)
    )
    return str(uid), earlier is None and job.created_at >= last_at, last_at


def _run_claimed(
    settings: Settings, job_id: int, study_id: int, attempt: int, processor: Processor
) -> str:
    url = settings.effective_database_url
    t0 = time.monotonic()
    log.info("job %d started (attempt %d)", job_id, attempt)
    try:
        ctx = load_study(settings, job_id, study_id)
        summary = processor(ctx, settings)
    except JobError as exc:
        _finish(url, job_id, JobStatus.FAILED, error=str(exc), summary=exc.summary)
        metrics.record_job_finished(JobStatus.FAILED.value, time.monotonic() - t0)
        log.warning("job %d failed: %s", job_id, exc)
        return JobStatus.FAILED.value
    except Exception as exc:
        if _is_transient(exc):
            raise
        message = f"internal error: {type(exc).__name__}"
        if _is_timeout(exc):
            message = f"timed out after {settings.task_soft_time_limit:.0f} s"
        _finish(url, job_id, JobStatus.FAILED, error=message)
        metrics.record_job_finished(JobStatus.FAILED.value, time.monotonic() - t0)
        log.exception("job %d failed: %s", job_id, message)
        return JobStatus.FAILED.value
    summary["seconds"] = round(time.monotonic() - t0, 3)
    _finish(url, job_id, JobStatus.DONE, summary=summary)
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


def _finish(url: str, job_id: int, status: JobStatus, **kw: Any) -> None:
    with session_scope(url) as session:
        finish_job(session, job_id, status, **kw)


def _is_timeout(exc: BaseException) -> bool:
    return type(exc).__name__ in {"SoftTimeLimitExceeded", "TimeLimitExceeded"}


def _is_transient(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError

    return (
        isinstance(exc, DBAPIError)
        and exc.connection_invalidated
        or (type(exc).__name__ == "OperationalError")
    )
