"""Reads for the CLI and API: plain dicts with stable, documented keys."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, Job, Result, Series, Study


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def list_studies(
    session: Session, limit: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    counts = (
        select(
            Instance.study_id.label("study_id"),
            func.count(Instance.id).label("num_instances"),
            func.count(func.distinct(Instance.series_id)).label("num_series"),
        )
        .group_by(Instance.study_id)
        .subquery()
    )
    rows = session.execute(
        select(Study, counts.c.num_instances, counts.c.num_series)
        .outerjoin(counts, counts.c.study_id == Study.id)
        .order_by(Study.received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
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
) -> list[dict[str, Any]]:
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
    stmt = stmt.order_by(Result.id.desc()).limit(limit).offset(offset)
    return [result_dict(r, uid) for r, uid in session.execute(stmt).all()]
