"""Studies, results and deliveries as the CLI and the API both handle them.

Each function opens its own database session and commits before it touches
the broker: a job or a delivery is in the database before its id is sent, so
a broker that is down loses nothing (the listener's reconciler and scheduler
send it later). Errors are the caller's to word: :class:`LookupError` for
"no such study", :class:`db.repo.ReprocessRefused` for a refused reprocess.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from db import queries
from db.repo import ReprocessRefused, create_reprocess_job, reset_deliveries
from db.session import session_scope
from worker.settings import Settings

__all__ = [
    "DeliveryFilter",
    "Reprocessed",
    "ReprocessRefused",
    "ResultFilter",
    "list_deliveries",
    "list_results",
    "reprocess_study",
    "resend",
    "utc",
]


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """A time as UTC (a naive one is taken as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@dataclass(frozen=True, slots=True)
class ResultFilter:
    """The filters of ``results list`` and ``GET /api/results``."""

    study_uid: str | None = None
    model: str | None = None
    finding: str | None = None  # code meaning, case-insensitive
    present: bool | None = None
    since: dt.datetime | None = None  # stored at or after
    until: dt.datetime | None = None  # stored before
    min_probability: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """The filters of ``deliveries list`` and ``GET /api/deliveries``."""

    study_uid: str | None = None
    status: str | None = None
    job_id: int | None = None


def list_results(
    settings: Settings, where: ResultFilter, limit: int | None, offset: int = 0
) -> list[dict[str, Any]]:
    with session_scope(settings.effective_database_url) as session:
        return queries.list_results(
            session,
            study_uid=where.study_uid,
            model=where.model,
            finding=where.finding,
            present=where.present,
            since=utc(where.since),
            until=utc(where.until),
            min_probability=where.min_probability,
            limit=limit,
            offset=offset,
        )


def list_deliveries(
    settings: Settings, where: DeliveryFilter, limit: int | None, offset: int = 0
) -> list[dict[str, Any]]:
    with session_scope(settings.effective_database_url) as session:
        return queries.list_deliveries(
            session,
            study_uid=where.study_uid,
            status=where.status,
            job_id=where.job_id,
            limit=limit,
            offset=offset,
        )


@dataclass(frozen=True, slots=True)
class Reprocessed:
    job_id: int
    #: the job's id reached the broker (else the reconciler sends it later)
    sent: bool


def reprocess_study(settings: Settings, app: Any, study_uid: str) -> Reprocessed:
    """Queue a new job for a study: committed first, then its id is sent.

    Raises LookupError (no such study) or ReprocessRefused (a job is queued or
    running, or the study's files were pruned)."""
    from worker.scheduling.scheduler import send_job

    with session_scope(settings.effective_database_url) as session:
        job_id = create_reprocess_job(session, study_uid).id
    return Reprocessed(job_id, send_job(app, settings, job_id))


def resend(
    settings: Settings, app: Any, study_uid: str | None = None, job_id: int | None = None
) -> tuple[list[int], int]:
    """Make a study's (or job's) deliveries pending again, then queue them.
    Returns the delivery ids and how many reached the broker; no ids: nothing
    to resend."""
    from worker.delivery.dispatch import enqueue_deliveries

    with session_scope(settings.effective_database_url) as session:
        ids = reset_deliveries(session, study_uid=study_uid, job_id=job_id)
    if not ids:
        return [], 0
    return ids, enqueue_deliveries(settings, ids, app)
