"""Jobs: short leases kept alive by a heartbeat, transient errors retried by the
same task, one job at a time per study (newest input wins).

Against real databases (SQLite and PostgreSQL) with a stand-in for the Celery
app; the real processes are in tests/test_faults_jobs.py.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from db.migrate import upgrade
from db.models import Instance, Job, JobStatus, Result, utcnow
from db.repo import (
    claim_job,
    finish_job,
    job_is_current,
    record_coverage,
    record_instance,
    renew_lease,
    replace_results,
    requeue_job,
)
from db.session import dispose_all, session_scope
from tests.conftest import ct_record
from worker.scheduling.jobs import StudyContext, ensure_current, is_transient, run_job
from worker.scheduling.scheduler import assemble_once, reconcile_every, reconcile_once
from worker.settings import Settings, SettingsError, load_settings

STUDY = "1.2.826.0.1.3680043.10.1"


class FakeApp:
    """Records the job ids sent to the broker."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_task(self, name: str, args: list[Any], queue: str | None = None) -> None:
        self.sent.append(int(args[0]))


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    url = (
        f"sqlite:///{tmp_path / 'db.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    s = load_settings(
        data_dir=tmp_path / "data",
        database_url=url,
        stable_seconds=0,
        job_lease_seconds=2,
        requeue_after_seconds=600,
    )
    upgrade(url)
    yield s
    dispose_all()  # before pg_url drops the database


def receive(settings: Settings, n: int, start: int = 0) -> None:
    series = f"{STUDY}.1"
    with session_scope(settings.effective_database_url) as session:
        for i in range(start, start + n):
            sop = f"{series}.{i + 1}"
            record_instance(session, ct_record(STUDY, series, sop, modality="CT"))


def new_job(settings: Settings, app: FakeApp | None = None) -> int:
    (job_id,) = assemble_once(settings, app or FakeApp(), now=utcnow() + dt.timedelta(seconds=1))
    return job_id


def job(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.effective_database_url) as session:
        found = session.get(Job, job_id)
        assert found is not None
        return found


def expire(settings: Settings, job_id: int) -> None:
    with session_scope(settings.effective_database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_until=utcnow() - dt.timedelta(1))
        )


def claim(settings: Settings, job_id: int, owner: str) -> Job | None:
    """Claim as the Celery task does: ``<task id>/<try>``, taking over from earlier tries."""
    with session_scope(settings.effective_database_url) as session:
        task = owner.split("/")[0]
        return claim_job(session, job_id, 60, 3, owner=owner, takeover_prefix=f"{task}/")


def summary_of(ctx: StudyContext, settings: Settings) -> dict[str, Any]:
    return {"instances": len(ctx.instances)}


# -- leases ------------------------------------------------------------------------


def test_claim_records_coverage_and_owner(settings: Settings) -> None:
    receive(settings, 3)
    job_id = new_job(settings)
    receive(settings, 2, start=3)  # after the job was made, before it is claimed
    claimed = claim(settings, job_id, "task-a/0")
    assert claimed is not None and claimed.lease_owner == "task-a/0"
    assert claimed.attempts == 1 and claimed.status == JobStatus.RUNNING.value
    with session_scope(settings.effective_database_url) as session:
        top = session.scalar(select(func.max(Instance.id)))
        assert record_coverage(session, job_id, "task-a/0") == (True, top)
        assert record_coverage(session, job_id, "task-b/0") == (False, None)
    covered = job(settings, job_id)
    assert covered.max_instance_id == top and covered.num_instances == 5


def test_retry_takes_over_its_own_lease_without_an_attempt(settings: Settings) -> None:
    receive(settings, 1)
    job_id = new_job(settings)
    first = claim(settings, job_id, "task-a/0")
    assert first is not None and first.attempts == 1
    # the same try delivered again (its process died): no take-over, lease is live
    assert claim(settings, job_id, "task-a/0") is None
    # another task's message while the lease is live: skipped
    assert claim(settings, job_id, "task-b/0") is None
    # a later try of the same task (transient errors before, the 1st of them even
    # before it could claim): takes it over
    second = claim(settings, job_id, "task-a/2")
    assert second is not None and second.attempts == 1
    assert second.started_at == first.started_at and second.lease_owner == "task-a/2"
    # its lease lapsed during a long outage and the reconciler re-queued it: the
    # next try still takes it without counting an attempt
    with session_scope(settings.effective_database_url) as session:
        assert not requeue_job(session, job_id, expired_before=utcnow())  # lease is live
    expire(settings, job_id)
    with session_scope(settings.effective_database_url) as session:
        assert requeue_job(session, job_id, expired_before=utcnow())
    third = claim(settings, job_id, "task-a/3")
    assert third is not None and third.attempts == 1
    # a dead worker's job taken by another task counts an attempt
    expire(settings, job_id)
    fourth = claim(settings, job_id, "task-c/0")
    assert fourth is not None and fourth.attempts == 2
    # a finish by a run that lost the job changes nothing
    with session_scope(settings.effective_database_url) as session:
        assert not finish_job(session, job_id, JobStatus.DONE, owner="task-a/3")
        assert finish_job(session, job_id, JobStatus.DONE, owner="task-c/0")
    assert job(settings, job_id).status == JobStatus.DONE.value


def test_a_task_id_is_not_a_pattern(settings: Settings) -> None:
    receive(settings, 1)
    job_id = new_job(settings)
    assert claim(settings, job_id, "ab%c/0") is not None
    assert claim(settings, job_id, "a_%/1") is None  # "_" and "%" match themselves only


def test_renew_lease_only_for_its_owner(settings: Settings) -> None:
    receive(settings, 1)
    job_id = new_job(settings)
    claimed = claim(settings, job_id, "task-a/0")
    assert claimed is not None and claimed.lease_until is not None
    with session_scope(settings.effective_database_url) as session:
        assert renew_lease(session, job_id, "task-a/0", 600)
        assert not renew_lease(session, job_id, "task-b/0", 600)
    assert job(settings, job_id).lease_until > claimed.lease_until  # type: ignore[operator]


def test_heartbeat_keeps_a_long_job_leased(settings: Settings) -> None:
    """A job running for almost three leases is never re-queued meanwhile."""
    receive(settings, 2)
    job_id = new_job(settings)
    app = FakeApp()
    requeued: list[int] = []

    def slow(ctx: StudyContext, s: Settings) -> dict[str, Any]:
        deadline = time.monotonic() + 2.5 * s.job_lease_seconds
        while time.monotonic() < deadline:
            requeued.extend(reconcile_once(s, app))
            ctx.check_current()
            time.sleep(0.2)
        return {"instances": len(ctx.instances)}

    assert run_job(job_id, settings, slow) == "done"
    assert requeued == [] and app.sent == []
    done = job(settings, job_id)
    assert done.attempts == 1 and done.summary is not None
    assert done.summary["instances"] == 2 and done.lease_until is None


def test_dead_worker_job_is_requeued_once_its_lease_expires(settings: Settings) -> None:
    receive(settings, 1)
    job_id = new_job(settings)
    with session_scope(settings.effective_database_url) as session:  # no heartbeat
        assert claim_job(session, job_id, settings.job_lease_seconds, 3, owner="dead/0")
    app = FakeApp()
    assert reconcile_once(settings, app) == []
    t0 = time.monotonic()
    while not reconcile_once(settings, app):
        assert time.monotonic() - t0 < settings.job_lease_seconds + 2
        time.sleep(reconcile_every(settings))
    assert app.sent == [job_id] and job(settings, job_id).status == "queued"
    assert run_job(job_id, settings, summary_of) == "done"
    assert job(settings, job_id).attempts == 2


def test_reconciler_runs_every_quarter_lease_at_most(settings: Settings) -> None:
    assert reconcile_every(settings) == 0.5
    assert reconcile_every(load_settings(reconcile_interval=5)) == 5
    assert reconcile_every(load_settings()) == 15  # the default 60 s lease
    with pytest.raises(SettingsError, match="PACS_AI_JOB_LEASE_SECONDS"):
        load_settings(job_lease_seconds=1)


def test_transient_error_is_retried_by_the_same_task(settings: Settings) -> None:
    from sqlalchemy.exc import OperationalError

    receive(settings, 3)
    job_id = new_job(settings)

    def down(ctx: StudyContext, s: Settings) -> dict[str, Any]:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    with pytest.raises(OperationalError):
        run_job(job_id, settings, down, owner="task/0")
    held = job(settings, job_id)
    assert held.status == "running" and held.lease_owner == "task/0" and held.attempts == 1
    # the Celery retry 5 s later runs at once, its lease still live
    assert run_job(job_id, settings, summary_of, owner="task/1", takeover_prefix="task/") == "done"
    done = job(settings, job_id)
    assert done.attempts == 1 and done.error is None and done.summary is not None


def test_transient_errors_are_told_apart() -> None:
    from kombu.exceptions import OperationalError as BrokerDown
    from redis.exceptions import ConnectionError as RedisDown
    from sqlalchemy.exc import IntegrityError, OperationalError

    assert is_transient(OperationalError("x", {}, Exception("gone")))
    assert is_transient(BrokerDown("connection refused"))
    assert is_transient(RedisDown("connection refused"))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(IntegrityError("x", {}, Exception("duplicate")))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(OSError("disk"))


# -- one job at a time per study ----------------------------------------------------


def test_newer_job_supersedes_a_running_one(settings: Settings) -> None:
    """Instances arrive while a job runs: the new job supersedes it, the old one
    stops at its next heartbeat and persists nothing; the new one's results stay."""
    url = settings.effective_database_url
    receive(settings, 3)
    old_id = new_job(settings)
    started, superseded = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def persisting(ctx: StudyContext, s: Settings) -> dict[str, Any]:
        if ctx.job_id == old_id:
            started.set()
            superseded.wait(10)
        with session_scope(url) as session:
            ensure_current(session, ctx)
            replace_results(session, ctx.study_id, ctx.job_id, "m", [_row(len(ctx.instances))])
        return {"instances": len(ctx.instances)}

    def run_old() -> None:
        outcome["old"] = run_job(old_id, settings, persisting)

    thread = threading.Thread(target=run_old)
    thread.start()
    assert started.wait(10)
    receive(settings, 2, start=3)
    new_id = new_job(settings)
    superseded.set()
    thread.join(15)
    assert outcome["old"] == "superseded"
    old = job(settings, old_id)
    assert old.status == "superseded" and old.error is not None and str(new_id) in old.error
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 0

    assert run_job(new_id, settings, persisting) == "done"
    assert run_job(old_id, settings, persisting) == "skipped"  # a late message for the old one
    with session_scope(url) as session:
        (result,) = session.scalars(select(Result))
        assert result.job_id == new_id and result.measurements == {"instances": 5}
    assert job(settings, new_id).num_instances == 5


def test_queued_older_job_never_runs(settings: Settings) -> None:
    receive(settings, 2)
    old_id = new_job(settings)
    receive(settings, 1, start=2)
    new_id = new_job(settings)
    assert job(settings, old_id).status == "superseded"
    assert run_job(old_id, settings, summary_of) == "skipped"
    assert run_job(new_id, settings, summary_of) == "done"
    assert job(settings, new_id).summary == {"instances": 3, "seconds": pytest.approx(0, abs=5)}


def test_results_never_replaced_by_a_job_covering_less(settings: Settings) -> None:
    """Two jobs running at once (e.g. a reprocess racing the assembler): the one
    covering fewer instances may not persist once the wider one is done."""
    url = settings.effective_database_url
    receive(settings, 2)
    narrow_id = new_job(settings)
    assert claim(settings, narrow_id, "narrow/0") is not None
    with session_scope(url) as session:
        assert record_coverage(session, narrow_id, "narrow/0")[0]
    receive(settings, 2, start=2)
    study_id = job(settings, narrow_id).study_id
    with session_scope(url) as session:  # a second job, not superseding the first
        wide = Job(study_id=study_id, status="queued", attempts=0, num_instances=4)
        session.add(wide)
        session.flush()
        wide_id = wide.id
    assert claim(settings, wide_id, "wide/0") is not None
    with session_scope(url) as session:
        assert record_coverage(session, wide_id, "wide/0")[0]
    with session_scope(url) as session:
        assert job_is_current(session, narrow_id, "narrow/0")  # nothing wider is done yet
        assert finish_job(session, wide_id, JobStatus.DONE, owner="wide/0")
    with session_scope(url) as session:
        assert not job_is_current(session, narrow_id, "narrow/0")
        assert not job_is_current(session, narrow_id, "someone-else/0")


def _row(n: int) -> dict[str, Any]:
    return {
        "series_instance_uid": f"{STUDY}.1",
        "model": "m",
        "model_version": "1",
        "model_sha256": "0" * 64,
        "kind": "classification",
        "finding_code_value": "1",
        "finding_code_scheme": "99X",
        "finding": "f",
        "measurements": {"instances": n},
    }
