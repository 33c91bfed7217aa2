"""When a study is complete, and what completing it does: one place for the
quiet period, the PACS's counts and the explicit trigger.

A study that has instances no job covers yet is complete when

1. the PACS (``PACS_AI_PACS``) holds as many instances of it as were received,
   per series and in all (:func:`counts_match`). It is asked by C-FIND
   (:mod:`dicomnode.pacs_query`) when the scheduler first sees the study and
   once it has been quiet for :data:`PROBE_QUIET_SECONDS`, off the listener's
   threads; the answer is kept per study (:class:`CountProbe`) for
   :data:`ANSWER_TTL_SECONDS`, so a study that arrives in full is usually
   matched from the first answer without asking again;
2. no instance arrived for ``PACS_AI_STABLE_SECONDS`` (the quiet period,
   :func:`dicomnode.assembly.is_complete`): the fallback whenever the PACS cannot
   tell (unreachable, the study unknown to it, counts missing or different);
3. an admin says so: ``pacs-ai complete --study UID`` and
   ``POST /api/studies/{uid}/complete`` both call :func:`complete_now`.

All three end in :func:`queue_job`: the job row is committed only if no instance
arrived since the decision (the database decides, whichever process asks), the
study's older queued or running jobs are superseded, and only then is the job's
id sent to the broker.

Counts that match too early (the PACS itself was still receiving the study) are
harmless: instances that arrive after the job was made give the study a new job,
which supersedes the first (newest input wins).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery import Celery

from db import queries
from db.repo import create_job_if_stable, mark_enqueued, supersede_older_jobs
from db.session import session_scope
from dicomnode.pacs_query import PacsCounts, query_counts
from worker.scheduling.celery_app import INFERENCE_QUEUE, PROCESS_JOB_TASK
from worker.settings import Settings

log = logging.getLogger(__name__)

#: a study quiet this long is checked against the PACS's counts
PROBE_QUIET_SECONDS = 0.3
#: an answer of the PACS is compared with later counts for this long
ANSWER_TTL_SECONDS = 10.0
#: the PACS asked again about unchanged counts after this, doubled each time (up to the TTL)
FIRST_RETRY_SECONDS = 0.25
#: connection, association and C-FIND time-out of one query
QUERY_TIMEOUT_SECONDS = 3.0
#: C-FIND associations at once
QUERY_WORKERS = 2


# -- the policy -----------------------------------------------------------------


def counts_match(
    received: Mapping[str, int], pacs: PacsCounts, own_series: Set[str] = frozenset()
) -> bool:
    """Whether the PACS holds exactly the instances received for a study.

    ``received``: instances received per Series Instance UID; ``own_series``:
    series pacs-ai produced (its SR, SEG, key images), left out on both sides,
    since the PACS may hold them and they are never forwarded to be processed.
    When the PACS lists series, they must be the ones received, and each count
    it gives must be the one received; when it gives a study count, that count,
    less what it holds of our series, must be the total received. Complete by
    count takes every series count, or the study count; with neither, or any
    disagreement, the quiet period decides.
    """
    mine = {uid: n for uid, n in received.items() if uid not in own_series}
    if not mine:
        return False
    theirs = {uid: n for uid, n in pacs.series.items() if uid not in own_series}
    ours_there = [n for uid, n in pacs.series.items() if uid in own_series]
    if theirs and (
        theirs.keys() != mine.keys()
        or any(n is not None and n != mine[uid] for uid, n in theirs.items())
    ):
        return False
    by_series = bool(theirs) and all(n is not None for n in theirs.values())
    by_study = pacs.study is not None and all(n is not None for n in ours_there)
    if by_study:
        assert pacs.study is not None
        expected = pacs.study - sum(n or 0 for n in ours_there)
        if expected != sum(mine.values()):
            return False
    return by_series or by_study


@dataclass(frozen=True, slots=True)
class Received:
    """What was received for a study, read in one transaction."""

    last_instance_at: dt.datetime
    per_series: Mapping[str, int]
    own_series: frozenset[str]


def received_counts(settings: Settings, study_id: int) -> Received | None:
    """The study's received instances per series and the series pacs-ai made."""
    with session_scope(settings.effective_database_url) as session:
        last_at = queries.study_last_instance_at(session, study_id)
        if last_at is None:
            return None
        rows = queries.series_instance_counts(session, study_id)
        sent = queries.delivered_series(session, study_id)
    own = {uid for uid, produced, _ in rows if produced} | set(sent)
    return Received(last_at, {uid: n for uid, _, n in rows}, frozenset(own))


# -- completing a study -----------------------------------------------------------


def send_job(app: Celery, settings: Settings, job_id: int) -> bool:
    """Send a committed job's id to the broker; on success remember when."""
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


def queue_job(
    settings: Settings,
    app: Celery,
    study_id: int,
    study_uid: str,
    last_instance_at: dt.datetime,
    reason: str,
) -> int | None:
    """Make the study's job and send it, unless an instance arrived after
    ``last_instance_at`` (then None: the study is not complete after all)."""
    with session_scope(settings.effective_database_url) as session:
        job = create_job_if_stable(session, study_id, last_instance_at)
        if job is None:
            return None
        job_id, count = job.id, job.num_instances
        # newest input wins: one job at a time per study
        older = supersede_older_jobs(session, study_id, job_id)
    log.info(
        "study=%s complete (%s, %d instances): job %d queued", study_uid, reason, count, job_id
    )
    for old_id in older:
        log.info("job %d superseded by job %d (instances arrived after it)", old_id, job_id)
    send_job(app, settings, job_id)  # after commit; the reconciler covers failures
    return job_id


class NothingToComplete(Exception):
    """Every instance of the study is covered by a job already; the message says which."""


@dataclass(frozen=True, slots=True)
class Completion:
    study_uid: str
    job_id: int
    sent: bool


def complete_now(settings: Settings, app: Celery, study_uid: str) -> Completion:
    """The explicit trigger: the study is complete now, whatever the quiet period
    or the PACS say. LookupError for an unknown study; :class:`NothingToComplete`
    when no instance awaits a job."""
    url = settings.effective_database_url
    for _ in range(20):  # instances arriving meanwhile: decide again on the new ones
        with session_scope(url) as session:
            state = queries.study_state(session, study_uid)
        if state is None:
            raise LookupError(f"no study {study_uid}")
        study_id, last_at = state["study_id"], state["last_instance_at"]
        if not state["needs_job"]:
            latest = state["job_id"]
            which = f"job {latest} ({state['job_status']})" if latest is not None else "no job"
            raise NothingToComplete(
                f"study {study_uid} has no instances that a job does not cover already "
                f"(latest: {which}); use reprocess to run it again"
            )
        job_id = queue_job(settings, app, study_id, study_uid, last_at, "requested")
        if job_id is not None:
            with session_scope(url) as session:
                sent = queries.job_enqueued(session, job_id)
            return Completion(study_uid, job_id, sent)
        time.sleep(0.05)
    raise NothingToComplete(f"study {study_uid} keeps receiving instances; try again")


# -- asking the PACS ------------------------------------------------------------

#: asks the PACS about one study (Study Instance UID -> its counts, or None)
QueryFn = Callable[[str], PacsCounts | None]


def pacs_query(settings: Settings) -> QueryFn | None:
    """The C-FIND of ``PACS_AI_PACS`` for these settings, or None when it is not set."""
    peer = settings.pacs_peer
    if peer is None:
        return None

    def ask(study_uid: str) -> PacsCounts | None:
        ssl_context = None
        if peer.tls:
            from dicomnode.protocols.base import tls_context

            try:
                ssl_context = tls_context(
                    settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
                )
            except (OSError, ValueError) as exc:
                log.warning("PACS_AI_PACS: TLS set-up failed (%s)", type(exc).__name__)
                return None
        return query_counts(peer, study_uid, settings.ae_title, QUERY_TIMEOUT_SECONDS, ssl_context)

    return ask


@dataclass(frozen=True, slots=True)
class Verdict:
    """A study checked against the PACS: ``matched`` with the received state it
    matched; else when to check again (None: an answer on its way wakes the
    scheduler, or nothing to wait for)."""

    matched: bool
    received: Received | None = None
    recheck_in: float | None = None


@dataclass
class _Probe:
    study_uid: str
    received: Received | None = None
    answer: PacsCounts | None = None
    answered_at: float = float("-inf")
    #: the received counts the last question was asked for
    asked_for: tuple[tuple[str, int], ...] | None = None
    asked: int = 0
    next_ask_at: float = 0.0
    in_flight: bool = False


def _key(received: Received) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(received.per_series.items()))


class CountProbe:
    """Asks the PACS about quiet studies and remembers its answers.

    :meth:`check` never blocks on the network: a question goes to a small pool
    of threads, and ``on_answer`` is called when it is answered (the scheduler
    then checks again). The PACS is asked again when the received counts
    changed since the last question and the cached answer does not match them,
    when the answer is older than :data:`ANSWER_TTL_SECONDS`, or, about
    unchanged counts, after :data:`FIRST_RETRY_SECONDS` doubled each time (a PACS
    still receiving the same study catches up). An unreachable PACS is asked
    again after the TTL.
    """

    def __init__(
        self,
        query: QueryFn,
        load: Callable[[int], Received | None],
        on_answer: Callable[[], None],
        workers: int = QUERY_WORKERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._query = query
        self._load = load
        self._on_answer = on_answer
        self._clock = clock
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pacs-ai-cfind")
        self._lock = threading.Lock()
        self._probes: dict[int, _Probe] = {}
        self._failing = False

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def forget_except(self, study_ids: Set[int]) -> None:
        """Drop what is kept about studies that no longer wait for a job."""
        with self._lock:
            for study_id in [s for s in self._probes if s not in study_ids]:
                del self._probes[study_id]

    def knows(self, study_id: int) -> bool:
        """Whether the study was checked before (since it last got a job)."""
        with self._lock:
            return study_id in self._probes

    def check(self, study_id: int, study_uid: str, last_instance_at: dt.datetime) -> Verdict:
        with self._lock:
            probe = self._probes.setdefault(study_id, _Probe(study_uid))
            stale = probe.received is None or probe.received.last_instance_at != last_instance_at
        if stale:
            received = self._load(study_id)  # the database, outside the lock
            if received is None:
                return Verdict(False)
            with self._lock:
                probe.received = received
        now = self._clock()
        with self._lock:
            received = probe.received
            assert received is not None
            answer = probe.answer
            if (
                answer is not None
                and now - probe.answered_at < ANSWER_TTL_SECONDS
                and counts_match(received.per_series, answer, received.own_series)
            ):
                return Verdict(True, received)
            if probe.in_flight:
                return Verdict(False)
            key = _key(received)
            due = now if key != probe.asked_for else probe.next_ask_at
            if now < due:
                return Verdict(False, recheck_in=due - now)
            if sum(p.in_flight for p in self._probes.values()) >= self._workers:
                return Verdict(False, recheck_in=FIRST_RETRY_SECONDS)
            if key != probe.asked_for:
                probe.asked = 0
            probe.asked_for = key
            probe.in_flight = True
        self._pool.submit(self._ask, study_id, probe)
        return Verdict(False)

    def _ask(self, study_id: int, probe: _Probe) -> None:
        try:
            answer = self._query(probe.study_uid)
        except Exception as exc:  # a bug in a query function must not stop the probe
            log.warning("PACS query failed (%s)", type(exc).__name__)
            answer = None
        now = self._clock()
        with self._lock:
            probe.in_flight = False
            probe.answer, probe.answered_at = answer, now
            probe.asked += 1
            wait = ANSWER_TTL_SECONDS
            if answer is not None:
                wait = min(ANSWER_TTL_SECONDS, FIRST_RETRY_SECONDS * 2 ** (probe.asked - 1))
            probe.next_ask_at = now + wait
            was_failing, self._failing = self._failing, answer is None
        if answer is None and not was_failing:
            log.warning(
                "no instance counts from the PACS for study=%s (unreachable, or the study is "
                "unknown to it): studies complete after the quiet period until it answers",
                probe.study_uid,
            )
        elif answer is not None and was_failing:
            log.info("the PACS answers with instance counts again")
        self._on_answer()
