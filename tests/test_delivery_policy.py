"""Unit tests of the delivery retry policy (worker/delivery/dispatch.py) and the backlog
query (db/queries.py) on SQLite: transient failures end by the delivery's age
(PACS_AI_DELIVERY_MAX_AGE_HOURS), never by a count of attempts."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from db.migrate import upgrade
from db.models import Delivery, DeliveryStatus, Study, utcnow
from db.queries import delivery_backlog
from db.repo import reset_deliveries
from db.session import session_scope
from dicomnode.protocols import SendResult
from dicomnode.protocols.cstore import CStoreDestination
from worker.delivery.dispatch import backoff_seconds, dispatch_deliveries, next_retry_at
from worker.settings import Settings

NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
DEST = "DEST@127.0.0.1:11113"


def test_backoff_is_capped_and_never_overflows() -> None:
    s = Settings(delivery_retry_base=30, delivery_retry_max=3600)
    assert [backoff_seconds(n, s) for n in (1, 2, 3, 7, 8)] == [30, 60, 120, 1920, 3600]
    assert backoff_seconds(0, s) == 30
    assert backoff_seconds(10_000_000, s) == 3600


def test_next_retry_ends_by_age_not_attempts() -> None:
    s = Settings(delivery_max_attempts=2, delivery_max_age_hours=168, delivery_retry_max=3600)
    created = NOW - dt.timedelta(hours=100)
    # far past the old attempts limit: still retried, an hour apart at most
    assert next_retry_at(created, 500, NOW, s) == NOW + dt.timedelta(hours=1)
    # the last attempt comes right at the maximum age ...
    near = NOW - dt.timedelta(hours=168) + dt.timedelta(minutes=10)
    assert next_retry_at(near, 500, NOW, s) == NOW + dt.timedelta(minutes=10)
    # ... and a failure at (or after) it ends the delivery
    assert next_retry_at(NOW - dt.timedelta(hours=168), 3, NOW, s) is None
    assert next_retry_at(NOW - dt.timedelta(days=30), 1, NOW, s) is None


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(
        data_dir=tmp_path / "data",
        broker_url="memory://",
        destinations=DEST,
        delivery_max_attempts=2,
        delivery_max_age_hours=24,
        delivery_retry_base=1,
        delivery_retry_max=5,
        delivery_alert_minutes=30,
    )
    upgrade(s.effective_database_url)
    return s


def _add(
    settings: Settings, n: int, created: dt.datetime, dest: str = DEST, **kw: Any
) -> list[int]:
    with session_scope(settings.effective_database_url) as session:
        study = session.query(Study).first()
        if study is None:
            study = Study(study_instance_uid="1.2.3")
            session.add(study)
            session.flush()
        rows = []
        for _ in range(n):
            i = session.query(Delivery).count() + 1
            row = Delivery(
                study_id=study.id,
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.3.9",
                sop_instance_uid=f"1.2.3.9.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                kind="sr",
                destination=dest,
                rel_path=f"x{i}.dcm",
                created_at=created,
                updated_at=created,
                next_attempt_at=created,
                **kw,
            )
            session.add(row)
            session.flush()
            rows.append(row.id)
        return rows


def _rows(settings: Settings) -> dict[int, Delivery]:
    with session_scope(settings.effective_database_url) as session:
        found = {d.id: d for d in session.query(Delivery)}
        session.expunge_all()
        return found


def test_transient_failures_retry_past_attempts_until_max_age(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = SendResult("transient", "association refused (connection failed)")
    monkeypatch.setattr(CStoreDestination, "send", lambda _d, paths, _ctx: [down] * len(paths))
    young = _add(settings, 2, utcnow() - dt.timedelta(hours=2), attempts=40)
    old = _add(settings, 1, utcnow() - dt.timedelta(hours=25), attempts=3)
    counts = dispatch_deliveries(young + old, settings)
    assert counts == {"sent": 0, "retry": 2, "failed": 1, "skipped": 0}
    rows = _rows(settings)
    for i in young:
        assert rows[i].status == "pending" and rows[i].attempts == 41
        wait = (rows[i].next_attempt_at - utcnow()).total_seconds()
        assert 0 < wait <= 5  # capped by PACS_AI_DELIVERY_RETRY_MAX
    gone = rows[old[0]]
    assert gone.status == "failed" and gone.attempts == 4
    assert "PACS_AI_DELIVERY_MAX_AGE_HOURS" in (gone.last_error or "")

    # a resend starts the age again: the failed one is retried, not failed at once
    with session_scope(settings.effective_database_url) as session:
        assert reset_deliveries(session, study_uid="1.2.3") == young + old
    counts = dispatch_deliveries(old, settings)
    assert counts["retry"] == 1 and _rows(settings)[old[0]].status == "pending"

    # a permanent failure still ends at once
    refused = SendResult("permanent", "C-STORE status 0xA900")
    monkeypatch.setattr(CStoreDestination, "send", lambda _d, paths, _ctx: [refused] * len(paths))
    with session_scope(settings.effective_database_url) as session:
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    dispatch_deliveries(young, settings)
    assert {_rows(settings)[i].status for i in young} == {"failed"}


def test_backlog_per_destination(settings: Settings) -> None:
    now = utcnow()
    _add(settings, 2, now - dt.timedelta(minutes=90), last_error="connection refused")
    _add(settings, 1, now - dt.timedelta(minutes=5))
    _add(settings, 1, now - dt.timedelta(hours=5), status=DeliveryStatus.SENT.value)
    _add(settings, 1, now - dt.timedelta(minutes=1), dest="OTHER@10.0.0.9:104")
    with session_scope(settings.effective_database_url) as session:
        rows = delivery_backlog(session, now, dt.timedelta(minutes=30), [DEST, "IDLE@h:104"])
    by = {r["destination"]: r for r in rows}
    assert list(by) == sorted(by) == [DEST, "IDLE@h:104", "OTHER@10.0.0.9:104"]
    assert by[DEST]["pending"] == 3 and by[DEST]["overdue"] == 2
    assert by[DEST]["oldest_age_seconds"] == pytest.approx(90 * 60, abs=5)
    assert by[DEST]["last_error"] == "connection refused"
    assert by["OTHER@10.0.0.9:104"]["pending"] == 1
    assert by["OTHER@10.0.0.9:104"]["overdue"] == 0
    assert by["IDLE@h:104"] == {
        "destination": "IDLE@h:104",
        "pending": 0,
        "overdue": 0,
        "oldest_pending_at": None,
        "oldest_age_seconds": None,
        "last_error": None,
    }
