"""The assembler (study complete -> job) and the reconciler (stuck job -> re-sent).

Both run as one background thread in the listener process (the first one, when
several share the port), and the reconciler also once when a worker starts.
With ``PACS_AI_RETENTION_HOURS`` > 0 the same thread prunes finished studies
(:mod:`worker.scheduling.retention`). The database is the source of truth: a job
row is committed before its id is sent, and anything the broker lost is sent
again.

The assembler does not poll. It sleeps until the next study is due (its quiet
period ends, or it has been quiet long enough to ask the PACS for its counts;
:mod:`worker.scheduling.completion`), and is woken by every listener process
when an instance is stored (:mod:`worker.scheduling.doorbell`) and when the PACS
answers. It still looks at least every ``PACS_AI_ASSEMBLER_INTERVAL`` seconds,
so that nothing depends on a wake-up arriving.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from celery import Celery

from db import queries
from db.models import utcnow
from db.repo import requeue_job
from db.session import session_scope
from dicomnode.assembly import StudyState, is_complete
from worker.delivery.dispatch import dispatch_due_once
from worker.scheduling.completion import (
    PROBE_QUIET_SECONDS,
    CountProbe,
    QueryFn,
    pacs_query,
    queue_job,
    received_counts,
    send_job,
)
from worker.scheduling.doorbell import Doorbell, bell_address
from worker.scheduling.retention import (
    AUDIT_PRUNE_EVERY,
    SCHEDULER_BATCH,
    prune_audit_once,
    prune_interval,
    prune_once,
)
from worker.settings import Settings

__all__ = ["Scheduler", "assemble_once", "reconcile_every", "reconcile_once", "send_job"]

log = logging.getLogger(__name__)

#: a queued job not yet marked sent is left to its maker this long (seconds)
SEND_GRACE_SECONDS = 5.0

#: woken a moment early, or the clock read a moment late: look again this soon
_SOON = 0.002


def assemble_once(settings: Settings, app: Celery, now: dt.datetime | None = None) -> list[int]:
    """Create and send a job for every study whose quiet period has passed."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=settings.stable_seconds)
    with session_scope(settings.effective_database_url) as session:
        candidates = queries.studies_awaiting_job(session, received_before=cutoff)
    created: list[int] = []
    for study_id, study_uid, last_at in candidates:
        if not is_complete(
            now, StudyState(last_instance_at=last_at, needs_job=True), settings.stable_seconds
        ):
            continue
        job_id = queue_job(settings, app, study_id, study_uid, last_at, _quiet(settings))
        if job_id is not None:  # None: a new instance arrived meanwhile; next round
            created.append(job_id)
    return created


def _quiet(settings: Settings) -> str:
    return f"quiet for {settings.stable_seconds:g} s"


def reconcile_once(settings: Settings, app: Celery, now: dt.datetime | None = None) -> list[int]:
    """Re-send jobs whose message was lost or whose worker died."""
    now = now or utcnow()
    url = settings.effective_database_url
    stale = now - dt.timedelta(seconds=settings.requeue_after_seconds)
    # a job just made is being sent by whoever made it (commit, then send)
    unsent = now - dt.timedelta(seconds=SEND_GRACE_SECONDS)
    with session_scope(url) as session:
        lost = queries.lost_queued_jobs(session, unsent_before=unsent, sent_before=stale)
        expired = queries.expired_running_jobs(session, now)
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
    """Makes jobs for complete studies as soon as they are due (quiet period
    over, or the PACS's counts matched), runs the reconciler at start and every
    :func:`reconcile_every` seconds, sends due deliveries every
    ``assembler_interval``, and with retention on, prunes at start and every
    ``prune_every`` seconds (default :func:`prune_interval`), until :meth:`stop`.

    ``query`` asks the PACS for a study's counts (default: ``PACS_AI_PACS``, if
    set); ``doorbell`` listens for the listener processes' rings.
    """

    def __init__(
        self,
        settings: Settings,
        app: Celery,
        prune_every: float | None = None,
        query: QueryFn | None = None,
        doorbell: bool = True,
    ) -> None:
        super().__init__(name="pacs-ai-scheduler", daemon=True)
        self.settings = settings
        self.app = app
        self.prune_every = prune_every if prune_every is not None else prune_interval(settings)
        self._stop_event = threading.Event()
        self._next_audit_prune = 0.0  # monotonic time of the next audit-log pruning
        self._wake = threading.Event()
        self._flags = threading.Lock()
        self._rung = self._poked = False
        query = query if query is not None else pacs_query(settings)
        self.probe = (
            CountProbe(query, lambda study_id: received_counts(settings, study_id), self.poke)
            if query is not None
            else None
        )
        self._doorbell = Doorbell(bell_address(settings.data_path), self.ring) if doorbell else None
        #: the earliest anything can be due after an instance arrives
        self.ring_delay = min(
            settings.stable_seconds, PROBE_QUIET_SECONDS if self.probe else float("inf")
        )

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

    def ring(self) -> None:
        """An instance was stored: look within :attr:`ring_delay`."""
        with self._flags:
            self._rung = True
            self._wake.set()

    def poke(self) -> None:
        """Look now (the PACS answered)."""
        with self._flags:
            self._poked = True
            self._wake.set()

    def look(self, now: dt.datetime | None = None) -> float | None:
        """Make a job for each complete study; return the seconds until the next
        study is due (None: none waits)."""
        settings = self.settings
        now = now or utcnow()
        with session_scope(settings.effective_database_url) as session:
            waiting = queries.studies_awaiting_job(session)
        next_due: float | None = None

        def due(seconds: float) -> None:
            nonlocal next_due
            seconds = max(seconds, _SOON)
            next_due = seconds if next_due is None else min(next_due, seconds)

        for study_id, study_uid, last_at in waiting:
            if is_complete(now, StudyState(last_at, True), settings.stable_seconds):
                reason = _quiet(settings)
                if queue_job(settings, self.app, study_id, study_uid, last_at, reason) is None:
                    due(_SOON)  # an instance arrived meanwhile
                continue
            quiet = (now - last_at).total_seconds()
            due(settings.stable_seconds - quiet)
            if self.probe is None:
                continue
            if quiet < PROBE_QUIET_SECONDS:
                due(PROBE_QUIET_SECONDS - quiet)
                if self.probe.knows(study_id):
                    continue
                # first sight of the study: ask the PACS already, so that when it
                # goes quiet with everything received, the answer is at hand
            verdict = self.probe.check(study_id, study_uid, last_at)
            if verdict.matched and verdict.received is not None:
                reason = "its instances match the PACS's counts"
                last = verdict.received.last_instance_at
                if queue_job(settings, self.app, study_id, study_uid, last, reason) is None:
                    due(_SOON)
            elif verdict.recheck_in is not None:
                due(verdict.recheck_in)
        if self.probe is not None:
            self.probe.forget_except({row[0] for row in waiting})
        return next_due

    def _housekeeping(self, next_reconcile: float, next_prune: float) -> tuple[float, float]:
        if time.monotonic() >= next_reconcile:
            reconcile_once(self.settings, self.app)
            next_reconcile = time.monotonic() + reconcile_every(self.settings)
        dispatch_due_once(self.settings, self.app)
        if self.settings.retention_hours > 0 and time.monotonic() >= next_prune:
            next_prune = time.monotonic() + self.prune_every
            if len(prune_once(self.settings, limit=SCHEDULER_BATCH)) >= SCHEDULER_BATCH:
                next_prune = time.monotonic()  # more to do: go on next round
        if self.settings.audit_retention_days > 0 and time.monotonic() >= self._next_audit_prune:
            self._next_audit_prune = time.monotonic() + AUDIT_PRUNE_EVERY
            prune_audit_once(self.settings)
        return next_reconcile, next_prune

    def run(self) -> None:
        if self._doorbell is not None and not self._doorbell.open():
            self._doorbell = None
        try:
            self._loop()
        finally:
            if self._doorbell is not None:
                self._doorbell.close()
            if self.probe is not None:
                self.probe.close()

    def _loop(self) -> None:
        interval = self.settings.assembler_interval
        next_reconcile = next_prune = next_chores = next_look = time.monotonic()
        while not self._stop_event.is_set():
            if time.monotonic() >= next_look:
                started = time.monotonic()  # due times count from the look's start
                try:
                    due_in = self.look()
                except Exception as exc:  # database briefly down: look again soon
                    log.warning("scheduler tick failed (%s)", type(exc).__name__)
                    due_in = None
                next_look = started + (interval if due_in is None else min(due_in, interval))
            if time.monotonic() >= next_chores:
                try:
                    next_reconcile, next_prune = self._housekeeping(next_reconcile, next_prune)
                except Exception as exc:
                    log.warning("scheduler tick failed (%s)", type(exc).__name__)
                next_chores = time.monotonic() + interval
            timeout = max(0.0, min(next_look, next_chores) - time.monotonic())
            if not self._wake.wait(timeout):
                continue
            with self._flags:
                rung, poked = self._rung, self._poked
                self._rung = self._poked = False
                self._wake.clear()
            if poked:
                next_look = time.monotonic()
            elif rung:
                next_look = min(next_look, time.monotonic() + self.ring_delay)
