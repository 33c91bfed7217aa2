"""The assembler (study complete -> job) and the reconciler (stuck job -> re-sent).

Both run as one background thread in the listener process, and the reconciler
also once when a worker starts. With ``PACS_AI_RETENTION_HOURS`` > 0 the same
thread prunes finished studies (:mod:`worker.scheduling.retention`). The database is the
source of truth: a job row is committed before its id is sent, and anything the
broker lost is sent again.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from celery import Celery
from sqlalchemy import or_, select

from db.models import Job, JobStatus, Study, utcnow
from db.repo import create_job_if_stable, mark_enqueued, requeue_job, supersede_older_jobs
from db.session import session_scope
from dicomnode.assembly import StudyState, is_complete
from worker.delivery.dispatch import dispatch_due_once
from worker.scheduling.celery_app import INFERENCE_QUEUE, PROCESS_JOB_TASK
from worker.scheduling.retention import SCHEDULER_BATCH, prune_interval, prune_once
from worker.settings import Settings

log = logging.getLogger(__name__)


def send_job(app: Celery, settings: Settings, job_id: int) -> bool:
    """Send a job id to the broker; on success remember when."""
    try:
        app.send_task(PROCESS_JOB_TASK, args=[job_id], queue=INFERENCE_QUEUE)
    except Exception as exc:
        log.warning(
            "job %d could not be sent to the broker (%s); will retry", job_id, type(exc).__name__
        )
        return False
    with session_scope(settings.effective_database_url) as session:
        mark_enqueued(session, [job_id])
    return True


def assemble_once(settings: Settings, app: Celery, now: dt.datetime | None = None) -> list[int]:
    """Create and send a job for every study that has become complete."""
    now = now or utcnow()
    url = settings.effective_database_url
    cutoff = now - dt.timedelta(seconds=settings.stable_seconds)
    with session_scope(url) as session:
        candidates = session.execute(
            select(Study.id, Study.study_instance_uid, Study.last_instance_at).where(
                Study.needs_job.is_(True), Study.last_instance_at <= cutoff
            )
        ).all()
    created: list[int] = []
    for study_id, study_uid, last_at in candidates:
        if not is_complete(
            now, StudyState(last_instance_at=last_at, needs_job=True), settings.stable_seconds
        ):
            continue
        with session_scope(url) as session:
            job = create_job_if_stable(session, study_id, last_at)
            job_id = job.id if job is not None else None
            count = job.num_instances if job is not None else 0
            # newest input wins: one job at a time per study
            older = supersede_older_jobs(session, study_id, job_id) if job_id is not None else []
        if job_id is None:
            continue  # a new instance arrived meanwhile; next round
        log.info("study=%s complete (%d instances): job %d queued", study_uid, count, job_id)
        for old_id in older:
            log.info("job %d superseded by job %d (instances arrived after it)", old_id, job_id)
        created.append(job_id)
        send_job(app, settings, job_id)  # after commit; the reconciler covers failures
    return created


def reconcile_once(settings: Settings, app: Celery, now: dt.datetime | None = None) -> list[int]:
    """Re-send jobs whose message was lost or whose worker died."""
    now = now or utcnow()
    url = settings.effective_database_url
    stale = now - dt.timedelta(seconds=settings.requeue_after_seconds)
    with session_scope(url) as session:
        lost = list(
            session.scalars(
                select(Job.id).where(
                    Job.status == JobStatus.QUEUED.value,
                    or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale),
                )
            )
        )
        expired = list(
            session.scalars(
                select(Job.id).where(Job.status == JobStatus.RUNNING.value, Job.lease_until < now)
            )
        )
        # (a heartbeat or a retry may renew a lease meanwhile: requeue only if still expired)
        dead = [job_id for job_id in expired if requeue_job(session, job_id, expired_before=now)]
    for job_id in lost:
        log.warning("job %d still queued with no live message; re-enqueued", job_id)
    for job_id in dead:
        log.warning(
            "job %d was running on a worker that is gone; re-enqueued (its lease expired)", job_id
        )
    resent = []
    for job_id in lost + dead:
        if send_job(app, settings, job_id):
            resent.append(job_id)
    return resent


def reconcile_every(settings: Settings) -> float:
    """Seconds between two reconciler runs: ``PACS_AI_RECONCILE_INTERVAL``, and at
    most a quarter of a job's lease, so that a dead worker's job is re-queued at
    most a lease and a quarter after its last heartbeat."""
    return min(settings.reconcile_interval, settings.job_lease_seconds / 4)


class Scheduler(threading.Thread):
    """Runs the assembler every ``assembler_interval`` and the reconciler at start
    and every ``reconcile_interval`` seconds, and with retention on, prunes at start
    and every ``prune_every`` seconds (default :func:`prune_interval`), until
    :meth:`stop`."""

    def __init__(self, settings: Settings, app: Celery, prune_every: float | None = None) -> None:
        super().__init__(name="pacs-ai-scheduler", daemon=True)
        self.settings = settings
        self.app = app
        self.prune_every = prune_every if prune_every is not None else prune_interval(settings)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        next_reconcile = next_prune = time.monotonic()
        while not self._stop_event.is_set():
            try:
                if time.monotonic() >= next_reconcile:
                    reconcile_once(self.settings, self.app)
                    next_reconcile = time.monotonic() + reconcile_every(self.settings)
                assemble_once(self.settings, self.app)
                dispatch_due_once(self.settings, self.app)
                if self.settings.retention_hours > 0 and time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_every
                    if len(prune_once(self.settings, limit=SCHEDULER_BATCH)) >= SCHEDULER_BATCH:
                        next_prune = time.monotonic()  # more to do: go on next tick
            except Exception as exc:  # database briefly down: try again next tick
                log.warning("scheduler tick failed (%s)", type(exc).__name__)
            self._stop_event.wait(self.settings.assembler_interval)
