"""The database layer on SQLite and PostgreSQL: migrations, no drift, repositories."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select, update

from db.migrate import current_heads, upgrade
from db.models import Base, Instance, Job, JobStatus, Series, Study, utcnow
from db.repo import (
    InstanceRecord,
    claim_job,
    create_job_if_stable,
    finish_job,
    instance_exists,
    record_instance,
    requeue_job,
)
from db.session import dispose_all, get_engine, session_scope
from tests.conftest import ct_record

T0 = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)
TABLES = {*Base.metadata.tables, "alembic_version"}


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend (not migrated)."""
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'db' / 'pacs-ai.sqlite3'}"
    else:
        db_url = request.getfixturevalue("pg_url")
    yield db_url
    dispose_all()  # before pg_url drops the database


@pytest.fixture
def db(url: str) -> str:
    upgrade(url)
    return url


def rec(
    study: str = "1.2.3", series: str = "1.2.3.1", sop: str = "1.2.3.1.1", **kw: object
) -> InstanceRecord:
    return ct_record(study, series, sop, size_bytes=1234, **kw)


def study_row(url: str, uid: str = "1.2.3") -> Study:
    with session_scope(url) as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def new_job(url: str, at: dt.datetime = T0) -> int:
    with session_scope(url) as session:
        record_instance(session, rec(), now=at)
    with session_scope(url) as session:
        study = session.scalars(select(Study)).one()
        job = create_job_if_stable(session, study.id, study.last_instance_at)
        assert job is not None
        return job.id


# -- migrations -------------------------------------------------------------------


def test_migrations_create_the_schema(url: str) -> None:
    upgrade(url)
    engine = get_engine(url)
    assert {"studies", "series", "instances", "jobs"} <= TABLES
    assert set(inspect(engine).get_table_names()) == TABLES
    with engine.connect() as conn:
        assert set(MigrationContext.configure(conn).get_current_heads()) == set(current_heads())
    upgrade(url)  # a second upgrade is a no-op


def test_no_drift_between_models_and_migrations(db: str) -> None:
    with get_engine(db).connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], diff


def test_downgrade_to_base_and_back(url: str) -> None:
    from alembic import command

    from db.migrate import alembic_config

    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(get_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    assert set(inspect(get_engine(url)).get_table_names()) == TABLES


# -- instances ----------------------------------------------------------------------


def test_record_instance_and_duplicates(db: str) -> None:
    with session_scope(db) as session:
        assert record_instance(session, rec(modality="CT", series_number=3), now=T0) is True
    with session_scope(db) as session:
        assert instance_exists(session, "1.2.3.1.1")
        assert not instance_exists(session, "1.2.3.1.2")
        # the same SOP Instance UID again, even with other values: ignored
        later = T0 + dt.timedelta(minutes=1)
        assert record_instance(session, rec(modality="MR"), now=later) is False
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Series)) == 1
        series = session.scalars(select(Series)).one()
        assert series.modality == "CT" and series.series_number == 3
    study = study_row(db)
    assert study.needs_job is True
    assert study.last_instance_at == T0  # the duplicate did not move the quiet period
    assert study.received_at == T0


def test_record_more_instances_and_series(db: str) -> None:
    with session_scope(db) as session:
        for i in range(3):
            assert record_instance(session, rec(sop=f"1.2.3.1.{i + 1}"), now=T0)
        assert record_instance(
            session, rec(series="1.2.3.2", sop="1.2.3.2.1"), now=T0 + dt.timedelta(seconds=5)
        )
    with session_scope(db) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
        assert session.scalar(select(func.count()).select_from(Series)) == 2
        assert session.scalar(select(func.count()).select_from(Study)) == 1
    assert study_row(db).last_instance_at == T0 + dt.timedelta(seconds=5)


def test_own_results_never_start_a_job(db: str) -> None:
    with session_scope(db) as session:
        assert record_instance(session, rec(produced_by_us=True), now=T0)
    study = study_row(db)
    assert study.needs_job is False
    with session_scope(db) as session:
        assert session.scalars(select(Series)).one().produced_by_us is True


def test_datetimes_are_utc_aware(db: str) -> None:
    other = dt.timezone(dt.timedelta(hours=-7))
    with session_scope(db) as session:
        record_instance(session, rec(), now=T0.astimezone(other))
    study = study_row(db)
    assert study.received_at == T0 and study.received_at.tzinfo is not None
    with pytest.raises(Exception, match="naive datetime"), session_scope(db) as session:
        record_instance(session, rec(sop="1.2.3.1.9"), now=dt.datetime(2026, 1, 1))


# -- jobs ---------------------------------------------------------------------------


def test_create_job_if_stable_is_optimistic(db: str) -> None:
    with session_scope(db) as session:
        record_instance(session, rec(), now=T0)
    seen = study_row(db)
    # a new instance arrives after the assembler looked
    with session_scope(db) as session:
        record_instance(session, rec(sop="1.2.3.1.2"), now=T0 + dt.timedelta(seconds=1))
    with session_scope(db) as session:
        assert create_job_if_stable(session, seen.id, seen.last_instance_at) is None
    assert study_row(db).needs_job is True  # still waiting: nothing was folded in
    fresh = study_row(db)
    with session_scope(db) as session:
        job = create_job_if_stable(session, fresh.id, fresh.last_instance_at)
        assert job is not None
        assert job.status == JobStatus.QUEUED.value
        assert job.num_instances == 2 and job.attempts == 0
    assert study_row(db).needs_job is False
    # a second call for the same observation makes no second job
    with session_scope(db) as session:
        assert create_job_if_stable(session, fresh.id, fresh.last_instance_at) is None
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_claim_job_lease(db: str) -> None:
    job_id = new_job(db)
    with session_scope(db) as session:
        job = claim_job(session, job_id, lease_seconds=60, max_attempts=3)
        assert job is not None
        assert job.status == JobStatus.RUNNING.value and job.attempts == 1
        assert job.lease_until is not None and job.lease_until > utcnow()
    # a duplicate message while the lease is live: not claimable
    with session_scope(db) as session:
        assert claim_job(session, job_id, lease_seconds=60, max_attempts=3) is None
    # the worker died: once the lease has expired, another run may take it
    with session_scope(db) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_until=utcnow() - dt.timedelta(seconds=1))
        )
    with session_scope(db) as session:
        job = claim_job(session, job_id, lease_seconds=60, max_attempts=3)
        assert job is not None and job.attempts == 2 and job.status == "running"
    # finished jobs are never claimed again
    with session_scope(db) as session:
        finish_job(session, job_id, JobStatus.DONE, summary={"instances": 1})
    with session_scope(db) as session:
        assert claim_job(session, job_id, lease_seconds=60, max_attempts=3) is None
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == "done" and job.summary == {"instances": 1}
        assert job.lease_until is None and job.finished_at is not None


def test_claim_job_gives_up_after_max_attempts(db: str) -> None:
    job_id = new_job(db)
    for attempt in (1, 2):
        with session_scope(db) as session:
            job = claim_job(session, job_id, lease_seconds=-1, max_attempts=2)  # expires at once
            assert job is not None and job.attempts == attempt
    with session_scope(db) as session:
        assert claim_job(session, job_id, lease_seconds=60, max_attempts=2) is None
    with session_scope(db) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.FAILED.value
        assert job.error is not None and "2 attempts" in job.error
        assert job.lease_until is None and job.finished_at is not None
    with session_scope(db) as session:
        assert claim_job(session, job_id, lease_seconds=60, max_attempts=5) is None


def test_requeued_job_can_be_claimed(db: str) -> None:
    job_id = new_job(db)
    with session_scope(db) as session:
        assert claim_job(session, job_id, lease_seconds=600, max_attempts=3) is not None
    with session_scope(db) as session:
        requeue_job(session, job_id)
    with session_scope(db) as session:
        job = claim_job(session, job_id, lease_seconds=600, max_attempts=3)
        assert job is not None and job.attempts == 2


def test_claim_unknown_job(db: str) -> None:
    with session_scope(db) as session:
        assert claim_job(session, 999, lease_seconds=60, max_attempts=3) is None


def test_pooled_connection_cut_while_idle_is_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the server dropped while it sat in the pool (a restart, a
    blip) is pinged and replaced at its next use: the caller never sees it."""
    import time

    from sqlalchemy import text

    from db import session as db_session
    from tests.conftest import pg_block

    monkeypatch.setattr(db_session, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = db_session.create_db_engine(pg_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        pg_block(pg_url, True)  # cuts every session of the database
        pg_block(pg_url, False)
        time.sleep(0.3)
        with engine.connect() as conn:
            second = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        assert second != first
    finally:
        engine.dispose()
