"""Reads for the CLI and API: plain dicts with stable, documented keys."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, aliased

from db.models import (
    AuditRecord,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    Series,
    Study,
)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def list_studies(
    session: Session,
    limit: int | None = None,
    offset: int = 0,
    study_uid: str | None = None,
    accession_key: str | None = None,
) -> list[dict[str, Any]]:
    """Studies, newest first. ``patient``: the first 16 hex digits of the
    study's patient key (None without one). ``findings``: the present findings
    of the study's stored results (the code meanings, sorted). ``accession_key``: only the
    studies with that keyed hash of their accession number
    (:meth:`dicomnode.identity.IdentityKeys.accession_key`)."""
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
    if accession_key is not None:
        stmt = stmt.where(Study.accession_key == accession_key)
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
                # a pseudonymous handle of the patient (the keyed hash's first 16 hex
                # digits): links a patient's studies, never reveals who it is
                "patient": study.patient_key[:16] if study.patient_key else None,
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
                "pruned_at": _iso(study.pruned_at),
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


def delivery_backlog(
    session: Session,
    now: dt.datetime,
    alert_after: dt.timedelta,
    destinations: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Pending deliveries per destination: how many, how many pending longer than
    ``alert_after`` (``overdue``), the oldest one's age and the latest error.

    Every destination in ``destinations`` (the configured ones) is listed, with
    zeros when nothing waits for it; others only while something waits."""
    pending = Delivery.status == DeliveryStatus.PENDING.value
    overdue_before = now - alert_after
    rows = session.execute(
        select(
            Delivery.destination,
            func.count(),
            func.sum(case((Delivery.created_at < overdue_before, 1), else_=0)),
            func.min(Delivery.created_at),
        )
        .where(pending)
        .group_by(Delivery.destination)
    ).all()
    found: dict[str, dict[str, Any]] = {}
    for destination, count, overdue, oldest in rows:
        oldest_at = oldest.replace(tzinfo=dt.UTC) if oldest.tzinfo is None else oldest
        last_error = session.scalar(
            select(Delivery.last_error)
            .where(pending, Delivery.destination == destination, Delivery.last_error.is_not(None))
            .order_by(Delivery.updated_at.desc())
            .limit(1)
        )
        found[str(destination)] = {
            "destination": str(destination),
            "pending": int(count),
            "overdue": int(overdue or 0),
            "oldest_pending_at": _iso(oldest_at),
            "oldest_age_seconds": round(max(0.0, (now - oldest_at).total_seconds()), 1),
            "last_error": last_error,
        }
    for name in destinations:
        found.setdefault(
            name,
            {
                "destination": name,
                "pending": 0,
                "overdue": 0,
                "oldest_pending_at": None,
                "oldest_age_seconds": None,
                "last_error": None,
            },
        )
    return [found[name] for name in sorted(found)]


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


# -- retention ------------------------------------------------------------------------


def retention_conditions(cutoff: dt.datetime) -> list[ColumnElement[bool]]:
    """The retention policy in SQL, as conditions on ``studies`` (correlated, so
    they serve a SELECT and an UPDATE alike): the study's stored files may go when

    - its latest job is done and finished before ``cutoff`` (now - retention),
    - its last instance was received before ``cutoff`` and before that job was
      created, and no instance is waiting for a job (``needs_job``),
    - no job of it is queued or running, and
    - every delivery of it is sent (a study without deliveries qualifies).

    A study without any job never qualifies. ``pruned_at`` is not part of it.
    """
    newer = aliased(Job)
    latest_job_id = select(func.max(newer.id)).where(newer.study_id == Study.id).scalar_subquery()
    latest_done = exists().where(
        Job.id == latest_job_id,
        Job.status == JobStatus.DONE.value,
        Job.finished_at.is_not(None),
        Job.finished_at < cutoff,
        Job.created_at >= Study.last_instance_at,
    )
    active = aliased(Job)
    active_job = exists().where(
        active.study_id == Study.id,
        active.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
    )
    unsent = exists().where(
        Delivery.study_id == Study.id, Delivery.status != DeliveryStatus.SENT.value
    )
    return [
        Study.needs_job.is_(False),
        Study.last_instance_at < cutoff,
        latest_done,
        ~active_job,
        ~unsent,
    ]


def prunable_studies(
    session: Session, cutoff: dt.datetime, limit: int | None = None
) -> list[tuple[int, str]]:
    """(id, Study Instance UID) of the studies retention may prune now, not yet
    pruned, oldest first."""
    rows = session.execute(
        select(Study.id, Study.study_instance_uid)
        .where(Study.pruned_at.is_(None), and_(*retention_conditions(cutoff)))
        .order_by(Study.last_instance_at, Study.id)
        .limit(limit)
    ).all()
    return [(int(i), str(uid)) for i, uid in rows]


def study_instance_files(
    session: Session, study_id: int, received_before: dt.datetime | None = None
) -> list[tuple[str, int]]:
    """(rel_path under the storage root, size in bytes) of a study's stored
    instances (received before ``received_before`` when given)."""
    stmt = select(Instance.rel_path, Instance.size_bytes).where(Instance.study_id == study_id)
    if received_before is not None:
        stmt = stmt.where(Instance.received_at <= received_before)
    return [(str(p), int(n)) for p, n in session.execute(stmt.order_by(Instance.id))]


def study_outbox_files(session: Session, study_id: int) -> list[str]:
    """rel_paths under the outbox of a study's built result objects (one per
    object, however many destinations it went to)."""
    stmt = (
        select(Delivery.rel_path)
        .where(Delivery.study_id == study_id)
        .distinct()
        .order_by(Delivery.rel_path)
    )
    return [str(p) for p in session.scalars(stmt)]


# -- identity, priors and audit (issue 13) -------------------------------------------------


def sealed_identifiers(session: Session, study_uids: Sequence[str]) -> dict[str, str]:
    """The sealed identifiers of these studies (those that have any), by UID: for
    :func:`dicomnode.identity.reveal`, admins only."""
    if not study_uids:
        return {}
    rows = session.execute(
        select(Study.study_instance_uid, Study.identifiers).where(
            Study.study_instance_uid.in_(list(study_uids)), Study.identifiers.is_not(None)
        )
    ).all()
    return {str(uid): str(sealed) for uid, sealed in rows}


def study_link(session: Session, study_id: int) -> dict[str, Any] | None:
    """A study's UID, patient key, date and ``prior_of`` (None when unknown)."""
    row = session.execute(
        select(Study.study_instance_uid, Study.patient_key, Study.study_date, Study.prior_of).where(
            Study.id == study_id
        )
    ).first()
    if row is None:
        return None
    return {
        "study_instance_uid": str(row[0]),
        "patient_key": row[1],
        "study_date": row[2],
        "prior_of": row[3],
    }


def patient_results(
    session: Session, patient_key: str, model: str, finding_code_value: str
) -> list[dict[str, Any]]:
    """The stored results of one model and finding for every dated study of one
    patient (by its keyed hash), oldest study first: ``result_id``,
    ``study_id``, ``study_instance_uid``, ``study_date``, ``measurements``."""
    rows = session.execute(
        select(
            Result.id,
            Study.id,
            Study.study_instance_uid,
            Study.study_date,
            Result.measurements,
        )
        .join(Study, Study.id == Result.study_id)
        .where(
            Study.patient_key == patient_key,
            Study.study_date.is_not(None),
            Result.model == model,
            Result.finding_code_value == finding_code_value,
        )
        .order_by(Study.study_date, Study.id, Result.id)
    ).all()
    return [
        {
            "result_id": int(rid),
            "study_id": int(sid),
            "study_instance_uid": str(uid),
            "study_date": date,
            "measurements": dict(meas or {}),
        }
        for rid, sid, uid, date, meas in rows
    ]


def study_state(session: Session, study_uid: str) -> dict[str, Any] | None:
    """Where a study stands for a job waiting on it: its id, whether instances
    wait for a job, its last instance's time, its latest job's id and status,
    and how many instances it has (None when unknown)."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return None
    job = session.execute(
        select(Job.id, Job.status).where(Job.study_id == study.id).order_by(Job.id.desc()).limit(1)
    ).first()
    count = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
    )
    return {
        "study_id": study.id,
        "needs_job": bool(study.needs_job),
        "last_instance_at": study.last_instance_at,
        "job_id": int(job[0]) if job else None,
        "job_status": str(job[1]) if job else None,
        "num_instances": int(count or 0),
    }


def audit_dict(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "at": _iso(record.at),
        "interface": record.interface,
        "actor": record.actor,
        "source": record.source,
        "action": record.action,
        "studies": record.studies.split(",") if record.studies else [],
        "outcome": record.outcome,
    }


def list_audit(
    session: Session,
    limit: int | None = None,
    offset: int = 0,
    study_uid: str | None = None,
    interface: str | None = None,
) -> list[dict[str, Any]]:
    """Audit records, newest first."""
    stmt = select(AuditRecord)
    if study_uid:
        stmt = stmt.where(AuditRecord.studies.contains(study_uid, autoescape=True))
    if interface:
        stmt = stmt.where(AuditRecord.interface == interface)
    stmt = stmt.order_by(AuditRecord.id.desc()).limit(limit).offset(offset)
    return [audit_dict(r) for r in session.scalars(stmt)]


def study_results(
    session: Session, study_id: int, model: str, finding_code_value: str
) -> list[dict[str, Any]]:
    """``result_id`` and ``measurements`` of one study's results of one model and finding."""
    rows = session.execute(
        select(Result.id, Result.measurements)
        .where(
            Result.study_id == study_id,
            Result.model == model,
            Result.finding_code_value == finding_code_value,
        )
        .order_by(Result.id)
    ).all()
    return [{"result_id": int(rid), "measurements": dict(meas or {})} for rid, meas in rows]


# -- delivery ----------------------------------------------------------------------


def delivery_destinations(session: Session, ids: list[int]) -> list[tuple[int, str]]:
    """(id, destination) of each delivery id."""
    rows = session.execute(
        select(Delivery.id, Delivery.destination).where(Delivery.id.in_(ids))
    ).all()
    return [(int(i), str(d)) for i, d in rows]


def first_results_of_studies(session: Session, delivery_ids: list[int]) -> list[dt.datetime]:
    """The last-instance times of the studies whose deliveries (among these ids)
    belong to the study's first job after its last instance: the study-to-results
    latency counts those only (not a reprocessed study)."""
    rows = session.execute(
        select(Delivery.study_id, Delivery.job_id, Study.last_instance_at)
        .join(Study, Study.id == Delivery.study_id)
        .where(Delivery.id.in_(delivery_ids), Delivery.job_id.is_not(None))
        .distinct()
    ).all()
    out = []
    for study_id, job_id, last_at in rows:
        first = session.scalar(
            select(func.min(Job.id)).where(Job.study_id == study_id, Job.created_at >= last_at)
        )
        if first == job_id and last_at is not None:
            out.append(last_at)
    return out


# -- scheduling and jobs -----------------------------------------------------------


def studies_awaiting_job(
    session: Session, received_before: dt.datetime | None = None
) -> list[tuple[int, str, dt.datetime]]:
    """(id, UID, last instance time) of the studies with instances no job covers
    yet (only those whose last instance came at or before ``received_before``)."""
    stmt = select(Study.id, Study.study_instance_uid, Study.last_instance_at).where(
        Study.needs_job.is_(True)
    )
    if received_before is not None:
        stmt = stmt.where(Study.last_instance_at <= received_before)
    return [(int(i), str(uid), last) for i, uid, last in session.execute(stmt)]


def lost_queued_jobs(
    session: Session, unsent_before: dt.datetime, sent_before: dt.datetime
) -> list[int]:
    """Ids of queued jobs whose message may be lost: never sent and created before
    ``unsent_before``, or sent before ``sent_before``."""
    return list(
        session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.QUEUED.value,
                or_(
                    and_(Job.enqueued_at.is_(None), Job.created_at < unsent_before),
                    Job.enqueued_at < sent_before,
                ),
            )
        )
    )


def expired_running_jobs(session: Session, now: dt.datetime) -> list[int]:
    """Ids of running jobs whose lease ended before ``now``."""
    return list(
        session.scalars(
            select(Job.id).where(Job.status == JobStatus.RUNNING.value, Job.lease_until < now)
        )
    )


def job_enqueued(session: Session, job_id: int) -> bool:
    """Whether the job's id was sent to the broker (``enqueued_at`` is set)."""
    return session.scalar(select(Job.enqueued_at).where(Job.id == job_id)) is not None


def study_uid_of(session: Session, study_id: int) -> str | None:
    """The Study Instance UID of a study id (None when unknown)."""
    return session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))


def study_last_instance(session: Session, study_id: int) -> tuple[str, dt.datetime]:
    """(UID, last instance time) of a study; NoResultFound when unknown."""
    uid, last_at = session.execute(
        select(Study.study_instance_uid, Study.last_instance_at).where(Study.id == study_id)
    ).one()
    return str(uid), last_at


def study_last_instance_at(session: Session, study_id: int) -> dt.datetime | None:
    """When the study's last instance was received (None when the study is unknown)."""
    return session.scalar(select(Study.last_instance_at).where(Study.id == study_id))


def earlier_job_since(
    session: Session, study_id: int, job_id: int, since: dt.datetime
) -> int | None:
    """The id of a job of the study older than ``job_id`` created at or after
    ``since`` (None when there is none)."""
    return session.scalar(
        select(Job.id)
        .where(Job.study_id == study_id, Job.id < job_id, Job.created_at >= since)
        .limit(1)
    )


def job_input_instances(
    session: Session, study_id: int, max_instance_id: int | None = None
) -> list[tuple[str, str, str, str | None, str]]:
    """(SOP Instance UID, Series Instance UID, SOP Class UID, modality, rel_path)
    of the study's received instances (not those pacs-ai produced), up to
    ``max_instance_id`` when given, in the order received."""
    stmt = (
        select(
            Instance.sop_instance_uid,
            Series.series_instance_uid,
            Instance.sop_class_uid,
            Series.modality,
            Instance.rel_path,
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Instance.study_id == study_id, Instance.produced_by_us.is_(False))
        .order_by(Instance.id)
    )
    if max_instance_id is not None:
        stmt = stmt.where(Instance.id <= max_instance_id)
    return [
        (str(sop), str(series), str(cls), modality, str(path))
        for sop, series, cls, modality, path in session.execute(stmt)
    ]


def series_instance_counts(session: Session, study_id: int) -> list[tuple[str, bool, int]]:
    """(Series Instance UID, produced by pacs-ai, instances stored) of each series
    of the study that has instances."""
    rows = session.execute(
        select(Series.series_instance_uid, Series.produced_by_us, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .group_by(Series.id, Series.series_instance_uid, Series.produced_by_us)
    ).all()
    return [(str(uid), bool(produced), int(n)) for uid, produced, n in rows]


def delivered_series(session: Session, study_id: int) -> list[str]:
    """Series Instance UIDs of the result objects pacs-ai built for the study."""
    return [
        str(uid)
        for uid in session.scalars(
            select(Delivery.series_instance_uid).where(Delivery.study_id == study_id).distinct()
        )
    ]


# -- health ------------------------------------------------------------------------


def ping(connection: Connection) -> None:
    """Run ``SELECT 1``: raises when the database does not answer."""
    connection.execute(text("SELECT 1"))


# -- patient trend --------------------------------------------------------------------


def patient_trend_rows(session: Session, patient_prefix: str) -> list[dict[str, Any]]:
    """The studies whose patient key starts with ``patient_prefix`` (lowercase hex,
    checked by the caller), oldest StudyDate first (undated ones last), each with
    ``study_instance_uid``, ``study_date``, ``patient_key`` (for the caller to tell
    one patient from several; never to show) and ``results``: its segmentation
    results' ``model``, ``kind``, ``finding``, ``finding_code_value`` and
    ``measurements``."""
    studies = session.execute(
        select(Study.id, Study.study_instance_uid, Study.study_date, Study.patient_key)
        .where(Study.patient_key.startswith(patient_prefix, autoescape=True))
        .order_by(
            case((Study.study_date.is_(None), 1), else_=0),
            Study.study_date,
            Study.received_at,
            Study.id,
        )
    ).all()
    results: dict[int, list[dict[str, Any]]] = {int(row[0]): [] for row in studies}
    for sid, model, kind, finding, code, meas in session.execute(
        select(
            Result.study_id,
            Result.model,
            Result.kind,
            Result.finding,
            Result.finding_code_value,
            Result.measurements,
        )
        .where(Result.study_id.in_(list(results)), Result.kind == "segmentation")
        .order_by(Result.model, Result.finding, Result.id)
    ):
        results[int(sid)].append(
            {
                "model": str(model),
                "kind": str(kind),
                "finding": str(finding),
                "finding_code_value": str(code),
                "measurements": dict(meas or {}),
            }
        )
    return [
        {
            "study_instance_uid": str(uid),
            "study_date": date,
            "patient_key": str(key),
            "results": results[int(sid)],
        }
        for sid, uid, date, key in studies
    ]


def export_sources(
    session: Session, study_uid: str
) -> tuple[list[tuple[str, bool]], list[tuple[str, str]]] | None:
    """What ``pacs-ai export`` reads of a study (None: no such study): its
    instances' ``(rel_path, produced_by_us)`` in arrival order, and the distinct
    ``(rel_path, kind)`` of its result objects in the outbox."""
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if study_id is None:
        return None
    instances = session.execute(
        select(Instance.rel_path, Instance.produced_by_us)
        .where(Instance.study_id == study_id)
        .order_by(Instance.id)
    ).all()
    objects = session.execute(
        select(Delivery.rel_path, Delivery.kind)
        .where(Delivery.study_id == study_id)
        .distinct()
        .order_by(Delivery.rel_path)
    ).all()
    return (
        [(str(rel), bool(ours)) for rel, ours in instances],
        [(str(rel), str(kind)) for rel, kind in objects],
    )
