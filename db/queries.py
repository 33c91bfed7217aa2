"""Reads for the CLI and API: plain dicts with stable, documented keys."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Delivery, Instance, Job, Result, Series, Study


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def list_studies(
    session: Session, limit: int | None = None, offset: int = 0, study_uid: str | None = None
) -> list[dict[str, Any]]:
    """Studies, newest first. ``findings``: the present findings of the study's
    stored results (the code meanings, sorted)."""
    counts = (
        select(
            Instance.study_id.label("study_id"),
            func.count(Instance.id).label("num_instances"),
            func.count(func.distinct(Instance.series_id)).label("num_series"),
        )
        .group_by(Instance.study_id)
        .subquery()
    )
    stmt = select(Study, counts.c.num_instances, counts.c.num_series).outerjoin(
        counts, counts.c.study_id == Study.id
    )
    if study_uid:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    rows = session.execute(
        stmt.order_by(Study.received_at.desc(), Study.id.desc()).limit(limit).offset(offset)
    ).all()
    study_ids = [row[0].id for row in rows]
    modalities: dict[int, set[str]] = {sid: set() for sid in study_ids}
    for sid, modality in session.execute(
        select(Series.study_id, Series.modality).where(Series.study_id.in_(study_ids)).distinct()
    ):
        if modality:
            modalities[sid].add(modality)
    latest: dict[int, Job] = {}
    for job in session.scalars(select(Job).where(Job.study_id.in_(study_ids)).order_by(Job.id)):
        latest[job.study_id] = job
    findings: dict[int, set[str]] = {sid: set() for sid in study_ids}
    for sid, finding in session.execute(
        select(Result.study_id, Result.finding)
        .where(Result.study_id.in_(study_ids), Result.present.is_(True))
        .distinct()
    ):
        findings[sid].add(finding)
    deliveries: dict[int, dict[str, int]] = {sid: {} for sid in study_ids}
    for sid, d_status, n in session.execute(
        select(Delivery.study_id, Delivery.status, func.count(Delivery.id))
        .where(Delivery.study_id.in_(study_ids))
        .group_by(Delivery.study_id, Delivery.status)
    ):
        deliveries[sid][d_status] = int(n)
    out = []
    for study, num_instances, num_series in rows:
        last_job = latest.get(study.id)
        if study.needs_job:
            status = "receiving"
        elif last_job is not None:
            status = last_job.status
        else:
            status = "stored"  # only objects that start no job (e.g. our own results)
        out.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "modalities": sorted(modalities.get(study.id, ())),
                "num_series": int(num_series or 0),
                "num_instances": int(num_instances or 0),
                "status": status,
                "latest_job_id": last_job.id if last_job is not None else None,
                "findings": sorted(findings.get(study.id, ())),
                "deliveries": deliveries.get(study.id, {}),
                "received_at": _iso(study.received_at),
                "last_instance_at": _iso(study.last_instance_at),
                "updated_at": _iso(study.updated_at),
            }
        )
    return out


def job_dict(job: Job, study_uid: str) -> dict[str, Any]:
    return {
        "id": job.id,
        "study_instance_uid": study_uid,
        "status": job.status,
        "attempts": job.attempts,
        "num_instances": job.num_instances,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "error": job.error,
        "summary": job.summary,
    }


def list_jobs(
    session: Session,
    status: str | None = None,
    study_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    stmt = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if study_uid:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    stmt = stmt.order_by(Job.id.desc()).limit(limit).offset(offset)
    return [job_dict(job, uid) for job, uid in session.execute(stmt).all()]


def result_dict(result: Result, study_uid: str) -> dict[str, Any]:
    return {
        "id": result.id,
        "job_id": result.job_id,
        "study_instance_uid": study_uid,
        "series_instance_uid": result.series_instance_uid,
        "model": result.model,
        "model_version": result.model_version,
        "model_sha256": result.model_sha256,
        "kind": result.kind,
        "finding": result.finding,
        "finding_code": {
            "value": result.finding_code_value,
            "scheme": result.finding_code_scheme,
            "meaning": result.finding,
        },
        "label_value": result.label_value,
        "probability": result.probability,
        "present": result.present,
        "measurements": result.measurements or {},
        "timings": result.timings or {},
        "created_at": _iso(result.created_at),
    }


def list_results(
    session: Session,
    study_uid: str | None = None,
    model: str | None = None,
    finding: str | None = None,
    present: bool | None = None,
    since: dt.datetime | None = None,
    limit: int | None = None,
    offset: int = 0,
    until: dt.datetime | None = None,
    min_probability: float | None = None,
) -> list[dict[str, Any]]:
    """Results, newest first; ``since``/``until`` bound ``created_at`` (until is
    exclusive); ``min_probability`` keeps classification results at or above it."""
    stmt = select(Result, Study.study_instance_uid).join(Study, Study.id == Result.study_id)
    if study_uid:
        stmt = stmt.where(Study.study_instance_uid == study_uid)
    if model:
        stmt = stmt.where(Result.model == model)
    if finding:
        stmt = stmt.where(func.lower(Result.finding) == finding.lower())
    if present is not None:
        stmt = stmt.where(Result.present.is_(present))
    if since is not None:
        stmt = stmt.where(Result.created_at >= since)
    if until is not None:
        stmt = stmt.where(Result.created_at < until)
    if min_probability is not None:
        stmt = stmt.where(Result.probability >= min_probability)
    stmt = stmt.order_by(Result.id.desc()).limit(limit).offset(offset)
    return [result_dict(r, uid) for r, uid in session.execute(stmt).all()]


def delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "study_instance_uid": d.study_instance_uid,
        "series_instance_uid": d.series_instance_uid,
        "sop_instance_uid": d.sop_instance_uid,
        "sop_class_uid": d.sop_class_uid,
        "kind": d.kind,
        "destination": d.destination,
        "status": d.status,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "created_at": _iso(d.created_at),
        "next_attempt_at": _iso(d.next_attempt_at) if d.status == "pending" else None,
        "sent_at": _iso(d.sent_at),
    }


def list_deliveries(
    session: Session,
    study_uid: str | None = None,
    status: str | None = None,
    job_id: int | None = None,
    destination: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    stmt = select(Delivery)
    if study_uid:
        stmt = stmt.where(Delivery.study_instance_uid == study_uid)
    if status:
        stmt = stmt.where(Delivery.status == status)
    if job_id is not None:
        stmt = stmt.where(Delivery.job_id == job_id)
    if destination:
        stmt = stmt.where(Delivery.destination == destination)
    stmt = stmt.order_by(Delivery.id.desc()).limit(limit).offset(offset)
    return [delivery_dict(d) for d in session.scalars(stmt)]


def list_series(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """The series of a study with their instance counts, by series number."""
    counts = (
        select(Instance.series_id.label("series_id"), func.count(Instance.id).label("n"))
        .group_by(Instance.series_id)
        .subquery()
    )
    rows = session.execute(
        select(Series, counts.c.n)
        .join(Study, Study.id == Series.study_id)
        .outerjoin(counts, counts.c.series_id == Series.id)
        .where(Study.study_instance_uid == study_uid)
        .order_by(Series.series_number, Series.id)
    ).all()
    return [
        {
            "series_instance_uid": series.series_instance_uid,
            "modality": series.modality,
            "series_number": series.series_number,
            "series_description": series.series_description,
            "body_part_examined": series.body_part_examined,
            "num_instances": int(n or 0),
            "produced_by_us": series.produced_by_us,
            "created_at": _iso(series.created_at),
        }
        for series, n in rows
    ]


def count_by_status(session: Session) -> dict[str, dict[str, int]]:
    """Jobs and deliveries by status (for metrics and the dashboard)."""
    out: dict[str, dict[str, int]] = {}
    for name, column in (("jobs", Job.status), ("deliveries", Delivery.status)):
        out[name] = {
            str(status): int(n)
            for status, n in session.execute(select(column, func.count()).group_by(column))
        }
    return out


def studies_with_results(
    session: Session, model: str, since: dt.datetime | None = None
) -> list[str]:
    """Study Instance UIDs with stored results of ``model`` (received at or after
    ``since``), oldest first: what ``pacs-ai reprocess --model`` runs again."""
    stmt = (
        select(Study.study_instance_uid, Study.received_at)
        .join(Result, Result.study_id == Study.id)
        .where(Result.model == model)
        .distinct()
    )
    if since is not None:
        stmt = stmt.where(Study.received_at >= since)
    rows = session.execute(stmt).all()
    return [uid for uid, _ in sorted(rows, key=lambda r: (r[1], r[0]))]
