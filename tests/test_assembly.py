"""Study completeness: the pure policy, and the assembler that applies it.

No network: the assembler runs against a SQLite file with a stand-in for the
Celery app that records what would have been sent.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Job, JobStatus, Study
from db.repo import record_instance
from db.session import dispose_all, session_scope
from dicomnode.assembly import StudyState, is_complete
from tests.conftest import ct_record
from worker.scheduling.celery_app import (
    INFERENCE_QUEUE,
    PROCESS_JOB_TASK,
    broker_transport_options,
)
from worker.scheduling.completion import PROBE_QUIET_SECONDS
from worker.scheduling.scheduler import (
    SEND_GRACE_SECONDS,
    Scheduler,
    assemble_once,
    reconcile_once,
)
from worker.settings import Settings, load_settings

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def state(last: dt.datetime = T0, needs_job: bool = True) -> StudyState:
    return StudyState(last_instance_at=last, needs_job=needs_job)


# -- the policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        (dt.timedelta(0), False),
        (dt.timedelta(seconds=29, microseconds=999_999), False),
        (dt.timedelta(seconds=30), True),  # the boundary is inclusive
        (dt.timedelta(seconds=30, microseconds=1), True),
        (dt.timedelta(days=3), True),
    ],
)
def test_quiet_period_boundary(elapsed: dt.timedelta, expected: bool) -> None:
    assert is_complete(T0 + elapsed, state(), 30.0) is expected


def test_fractional_quiet_period() -> None:
    assert not is_complete(T0 + dt.timedelta(milliseconds=249), state(), 0.25)
    assert is_complete(T0 + dt.timedelta(milliseconds=250), state(), 0.25)


def test_zero_quiet_period_is_complete_at_once() -> None:
    assert is_complete(T0, state(), 0.0)


def test_no_job_needed_is_never_complete() -> None:
    for elapsed in (0, 30, 10**6):
        assert not is_complete(T0 + dt.timedelta(seconds=elapsed), state(needs_job=False), 30.0)


def test_clock_behind_last_instance() -> None:
    """A clock that reads earlier than the last instance (another host, a step
    back) never makes a study complete early."""
    assert not is_complete(T0 - dt.timedelta(seconds=5), state(), 0.0)
    assert not is_complete(T0 - dt.timedelta(hours=1), state(), 30.0)


def test_timezones_compare_as_instants() -> None:
    other = dt.timezone(dt.timedelta(hours=5))
    assert is_complete((T0 + dt.timedelta(seconds=30)).astimezone(other), state(), 30.0)
    assert not is_complete((T0 + dt.timedelta(seconds=29)).astimezone(other), state(), 30.0)


def test_state_is_immutable() -> None:
    s = state()
    with pytest.raises(AttributeError):
        s.needs_job = False  # type: ignore[misc]


# -- the assembler, against a real (SQLite) database ---------------------------


class FakeApp:
    """Records send_task calls; checks the job row was committed before each."""

    def __init__(self, url: str, fail: bool = False) -> None:
        self.url = url
        self.fail = fail
        self.sent: list[tuple[str, list[Any], str | None]] = []

    def send_task(self, name: str, args: list[Any], queue: str | None = None) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        # another session sees the job: it was committed before the send
        with session_scope(self.url) as session:
            job = session.get(Job, args[0])
            assert job is not None and job.status == JobStatus.QUEUED.value
        self.sent.append((name, list(args), queue))


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = load_settings(data_dir=tmp_path / "data", stable_seconds=30.0, requeue_after_seconds=600.0)
    upgrade(s.effective_database_url)
    yield s
    dispose_all()


def receive(settings: Settings, study: str, n: int, at: dt.datetime, series: str = "") -> None:
    series = series or f"{study}.1"
    with session_scope(settings.effective_database_url) as session:
        for i in range(n):
            sop = f"{series}.{i + 1}"
            record_instance(session, ct_record(study, series, sop, modality="CT"), now=at)


def jobs(settings: Settings) -> list[Job]:
    with session_scope(settings.effective_database_url) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def test_assembler_waits_for_the_quiet_period(settings: Settings) -> None:
    app = FakeApp(settings.effective_database_url)
    receive(settings, "1.2.3", 3, T0)
    assert assemble_once(settings, app, now=T0 + dt.timedelta(seconds=29.9)) == []
    created = assemble_once(settings, app, now=T0 + dt.timedelta(seconds=30))
    assert len(created) == 1
    assert app.sent == [(PROCESS_JOB_TASK, created, INFERENCE_QUEUE)]
    (job,) = jobs(settings)
    assert job.status == JobStatus.QUEUED.value and job.num_instances == 3
    assert job.enqueued_at is not None
    # nothing new arrived: no second job
    assert assemble_once(settings, app, now=T0 + dt.timedelta(hours=1)) == []


def test_late_instance_restarts_the_quiet_period_and_makes_a_new_job(
    settings: Settings,
) -> None:
    app = FakeApp(settings.effective_database_url)
    receive(settings, "1.2.3", 2, T0)
    receive(settings, "1.2.3", 1, T0 + dt.timedelta(seconds=20), series="1.2.3.2")
    assert assemble_once(settings, app, now=T0 + dt.timedelta(seconds=40)) == []
    assert len(assemble_once(settings, app, now=T0 + dt.timedelta(seconds=50))) == 1
    receive(settings, "1.2.3", 1, T0 + dt.timedelta(minutes=5), series="1.2.3.3")
    assert len(assemble_once(settings, app, now=T0 + dt.timedelta(minutes=6))) == 1
    assert [j.num_instances for j in jobs(settings)] == [3, 4]


def test_duplicates_do_not_reopen_a_study(settings: Settings) -> None:
    app = FakeApp(settings.effective_database_url)
    receive(settings, "1.2.3", 2, T0)
    assert len(assemble_once(settings, app, now=T0 + dt.timedelta(seconds=30))) == 1
    receive(settings, "1.2.3", 2, T0 + dt.timedelta(minutes=1))  # the same two instances again
    with session_scope(settings.effective_database_url) as session:
        study = session.scalars(select(Study)).one()
        assert study.needs_job is False and study.last_instance_at == T0
    assert assemble_once(settings, app, now=T0 + dt.timedelta(hours=1)) == []


def test_broker_down_leaves_a_queued_job_for_the_reconciler(settings: Settings) -> None:
    down = FakeApp(settings.effective_database_url, fail=True)
    receive(settings, "1.2.3", 1, T0)
    created = assemble_once(settings, down, now=T0 + dt.timedelta(seconds=30))
    (job,) = jobs(settings)
    assert created == [job.id] and job.status == "queued" and job.enqueued_at is None
    up = FakeApp(settings.effective_database_url)
    # just made: its maker may still be sending it
    assert reconcile_once(settings, up) == []
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=SEND_GRACE_SECONDS + 1)
    assert reconcile_once(settings, up, now=soon) == [job.id]
    assert up.sent == [(PROCESS_JOB_TASK, [job.id], INFERENCE_QUEUE)]
    assert jobs(settings)[0].enqueued_at is not None
    # sent recently: not sent again until requeue_after_seconds have passed
    assert reconcile_once(settings, up, now=soon) == []
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=601)
    assert reconcile_once(settings, up, now=later) == [job.id]


# -- the scheduler: exact due times instead of a poll ------------------------------


def test_look_says_when_the_next_study_is_due(settings: Settings) -> None:
    app = FakeApp(settings.effective_database_url)
    scheduler = Scheduler(settings, app, doorbell=False)
    assert scheduler.probe is None  # no PACS_AI_PACS: the quiet period only
    assert scheduler.look(now=T0) is None  # nothing waits
    receive(settings, "1.2.3", 2, T0)
    receive(settings, "1.2.4", 1, T0 + dt.timedelta(seconds=10))
    assert scheduler.look(now=T0 + dt.timedelta(seconds=12)) == pytest.approx(18.0)
    assert scheduler.look(now=T0 + dt.timedelta(seconds=30)) == pytest.approx(10.0)
    assert [j.num_instances for j in jobs(settings)] == [2]
    assert scheduler.look(now=T0 + dt.timedelta(seconds=40)) is None
    assert [j.num_instances for j in jobs(settings)] == [2, 1]


def test_ring_delay_is_the_earliest_anything_can_be_due(settings: Settings) -> None:
    app = FakeApp(settings.effective_database_url)
    assert Scheduler(settings, app, doorbell=False).ring_delay == 30.0
    short = settings.model_copy(update={"stable_seconds": 0.0})
    assert Scheduler(short, app, doorbell=False).ring_delay == 0.0
    with_pacs = Scheduler(settings, app, query=lambda uid: None, doorbell=False)
    assert with_pacs.ring_delay == PROBE_QUIET_SECONDS
    assert with_pacs.probe is not None
    with_pacs.probe.close()


def test_workers_look_into_the_filesystem_broker_often(settings: Settings) -> None:
    options = broker_transport_options(settings)
    assert options["polling_interval"] <= 0.05
    redis = settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"})
    assert "polling_interval" not in broker_transport_options(redis)  # Redis pushes
