"""Upgrades: from every earlier Alembic revision, with rows in every table, to
head, on SQLite and PostgreSQL; the rows survive and the application reads
them. ``alembic check`` finds no difference between the models and the
migrations.

The revisions are walked from Alembic's script directory and the rows are made
from the reflected schema of each revision, so a new migration or table is
covered without touching this file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import select

from db.migrate import alembic_config, current_heads, upgrade
from db.models import Base, Job, JobStatus, utcnow
from db.queries import count_by_status, list_deliveries, list_jobs, list_results, list_studies
from db.session import dispose_all, get_engine, session_scope

T0 = dt.datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
ROWS = 2  # per table


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


REVISIONS = _revisions()
EARLIER = [r for r in REVISIONS if r not in current_heads()]

#: values that mean something to the application (any other column gets a
#: value of its type): a running job with a long lease, finished ones, ...
MEANINGFUL: dict[tuple[str, str], list[Any]] = {
    ("jobs", "status"): [JobStatus.RUNNING.value, JobStatus.DONE.value],
    ("deliveries", "status"): ["pending", "sent"],
    ("deliveries", "kind"): ["sr", "seg"],
    ("results", "kind"): ["classification", "segmentation"],
    ("series", "modality"): ["CT", "SEG"],
    ("deliveries", "destination"): ["DEST@127.0.0.1:104", "PACS@10.0.0.1:11112"],
}
#: columns a migration may legitimately change: (table, column) -> first revision doing so
CHANGED_BY: dict[tuple[str, str], str] = {
    ("jobs", "lease_until"): "0005",  # a running job's lease is cut to the new default
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'pacs-ai.sqlite3'}"
    else:
        db_url = request.getfixturevalue("pg_url")
    yield db_url
    dispose_all()  # before pg_url drops the database


def _value(table: str, column: sa.Column[Any], i: int, fks: dict[str, str]) -> Any:
    name = str(column.name)
    if name in fks:
        return i  # the referenced table's row i
    if column.primary_key:
        return i
    if (table, name) in MEANINGFUL:
        return MEANINGFUL[(table, name)][(i - 1) % 2]
    if table == "jobs" and name == "lease_until":
        return utcnow() + dt.timedelta(hours=1)
    kind = column.type
    if isinstance(kind, sa.Boolean):
        return i % 2 == 0
    if isinstance(kind, sa.Integer):
        return 10 * i
    if isinstance(kind, sa.Float | sa.Numeric):
        return 0.25 * i
    if isinstance(kind, sa.DateTime):
        return T0 + dt.timedelta(minutes=i)
    if isinstance(kind, sa.Date):
        return T0.date() - dt.timedelta(days=180 * i)
    if isinstance(kind, sa.JSON):
        return {"n": i, "list": [1, 2]}
    if isinstance(kind, sa.String):
        if name.endswith("uid"):
            text = f"1.2.826.0.1.3680043.10.{abs(hash(table)) % 1000}.{i}"
        else:
            text = f"{name}-{i}"
        length = getattr(kind, "length", None)
        return text[:length] if length else text
    raise AssertionError(f"no test value for {table}.{name} ({kind!r}): add one")


def _fill(url: str) -> dict[str, list[dict[str, Any]]]:
    """Insert ROWS rows into every table of the current schema; return them as read back."""
    engine = get_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine)
    with engine.begin() as conn:
        for table in meta.sorted_tables:
            if table.name == "alembic_version":
                continue
            fks = {str(fk.parent.name): fk.column.table.name for fk in table.foreign_keys}
            rows = [
                {str(c.name): _value(table.name, c, i, fks) for c in table.columns}
                for i in range(1, ROWS + 1)
            ]
            conn.execute(table.insert(), rows)
        if engine.dialect.name == "postgresql":  # ids were given: move the sequences on
            for table in meta.sorted_tables:
                if "id" in table.columns:
                    conn.execute(
                        sa.text(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                            f"{ROWS + 10})"
                        )
                    )
    return _read(url)


def _read(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = get_engine(url)
    meta = sa.MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            if table.name != "alembic_version":
                rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
                out[table.name] = [dict(r._mapping) for r in rows]
    return out


@pytest.mark.parametrize("start", EARLIER)
def test_upgrade_from_every_revision_keeps_the_rows(url: str, start: str) -> None:
    upgrade(url, start)
    before = _fill(url)
    assert before and all(len(rows) == ROWS for rows in before.values())
    upgrade(url)
    dispose_all()  # nothing cached from the old schema
    after = _read(url)
    for table, rows in before.items():
        assert len(after[table]) == ROWS, table
        for old, new in zip(rows, after[table], strict=True):
            for column, value in old.items():
                if (table, column) in CHANGED_BY and start < CHANGED_BY[(table, column)]:
                    continue
                assert new[column] == value, (table, column)

    # the application reads every row through its models and its queries
    with session_scope(url) as session:
        for mapper in Base.registry.mappers:
            cls = mapper.class_
            expected = len(before.get(str(mapper.local_table.name), []))  # type: ignore[attr-defined]
            assert len(session.scalars(select(cls)).all()) == expected, cls.__name__
        assert len(list_studies(session)) == ROWS
        assert len(list_jobs(session)) == ROWS
        assert len(list_results(session)) == len(before.get("results", []))
        assert len(list_deliveries(session)) == len(before.get("deliveries", []))
        assert count_by_status(session)["jobs"] == {"running": 1, "done": 1}
        running = session.scalars(select(Job).where(Job.status == "running")).one()
        # a job left running by an old worker keeps a short lease, not an hour
        assert running.lease_until is not None
        if "0005" in REVISIONS and start < "0005":
            assert running.lease_until <= utcnow() + dt.timedelta(seconds=61)
        # new rows get fresh ids
        job = Job(study_id=running.study_id, status="queued", attempts=0, num_instances=0)
        session.add(job)
        session.flush()
        assert job.id > ROWS


def test_every_revision_is_tested() -> None:
    assert REVISIONS[0] == "0001" and len(REVISIONS) >= 5
    assert set(EARLIER) | set(current_heads()) == set(REVISIONS)


def test_alembic_check_is_clean(url: str) -> None:
    """``alembic check``: autogenerate finds nothing to add (models == migrations)."""
    upgrade(url)
    command.check(alembic_config(url))
