"""Writes. Each function runs inside the caller's transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    Date,
    TextClause,
    bindparam,
    case,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from db.models import (
    AuditRecord,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    SecretKey,
    Study,
    UTCDateTime,
    utcnow,
)


@dataclass(frozen=True, slots=True)
class StudyIdentity:
    """What is kept of a study's patient and accession, nothing in clear
    (:mod:`dicomnode.identity` makes it): keyed hashes for linkage and lookup, the
    identifiers sealed with AES-GCM, the study date, and the id of the key."""

    key_id: str
    patient_key: str | None = None
    accession_key: str | None = None
    identifiers: str | None = None
    study_date: dt.date | None = None


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the listener records for one stored instance (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    rel_path: str
    size_bytes: int
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None
    calling_aet: str | None = None
    produced_by_us: bool = False
    #: set where the study row is first recorded (None: no secret key configured)
    identity: StudyIdentity | None = None


# The listener's per-instance statements. They run on the association thread
# for every received instance, so they are plain SQL compiled once (the ORM's
# statement building cost several milliseconds per instance), valid on SQLite
# and PostgreSQL alike.
_UTC = UTCDateTime()
_INSTANCE_EXISTS = text("SELECT 1 FROM instances WHERE sop_instance_uid = :sop")
_STUDY_ID = text("SELECT id FROM studies WHERE study_instance_uid = :uid")
_SERIES_ID = text("SELECT id FROM series WHERE series_instance_uid = :uid")
_INSERT_STUDY = text(
    "INSERT INTO studies (study_instance_uid, received_at, last_instance_at, updated_at, needs_job,"
    " key_id, patient_key, accession_key, identifiers, study_date)"
    " VALUES (:uid, :now, :now, :now, FALSE,"
    " :key_id, :patient_key, :accession_key, :identifiers, :study_date)"
    " ON CONFLICT (study_instance_uid) DO NOTHING RETURNING id"
).bindparams(bindparam("now", type_=_UTC), bindparam("study_date", type_=Date()))
# a study row made before its first instance (a prior being fetched) or before
# this node had a key gets its identity with its first new series
_FILL_IDENTITY = text(
    "UPDATE studies SET key_id = :key_id, patient_key = :patient_key,"
    " accession_key = :accession_key, identifiers = :identifiers, study_date = :study_date"
    " WHERE id = :id AND key_id IS NULL"
).bindparams(bindparam("study_date", type_=Date()))
_INSERT_SERIES = text(
    "INSERT INTO series (study_id, series_instance_uid, modality, series_number,"
    " series_description, body_part_examined, produced_by_us, created_at)"
    " VALUES (:study_id, :uid, :modality, :series_number, :series_description,"
    " :body_part_examined, :produced_by_us, :now)"
    " ON CONFLICT (series_instance_uid) DO NOTHING RETURNING id"
).bindparams(bindparam("now", type_=_UTC), bindparam("produced_by_us", type_=Boolean()))
_INSERT_INSTANCE = text(
    "INSERT INTO instances (study_id, series_id, sop_instance_uid, sop_class_uid,"
    " transfer_syntax_uid, instance_number, rel_path, size_bytes, calling_aet, produced_by_us,"
    " received_at)"
    " VALUES (:study_id, :series_id, :sop_instance_uid, :sop_class_uid, :transfer_syntax_uid,"
    " :instance_number, :rel_path, :size_bytes, :calling_aet, :produced_by_us, :now)"
    " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
).bindparams(bindparam("now", type_=_UTC), bindparam("produced_by_us", type_=Boolean()))
_TOUCH_STUDY = text("UPDATE studies SET updated_at = :now WHERE id = :id").bindparams(
    bindparam("now", type_=_UTC)
)
_STUDY_HAS_NEW_INSTANCE = text(
    "UPDATE studies SET updated_at = :now, last_instance_at = :now, needs_job = TRUE WHERE id = :id"
).bindparams(bindparam("now", type_=_UTC))


def _get_or_insert(
    session: Session | Connection,
    select_id: TextClause,
    insert: TextClause,
    params: dict[str, Any],
    inserted: list[bool] | None = None,
) -> int:
    """The id of a row found by ``params["uid"]``, inserting it if missing (then
    ``True`` is appended to ``inserted``).

    ``insert`` does nothing on a conflict: a concurrent writer inserted the same
    row meanwhile, which the second look then sees.
    """
    found = session.execute(select_id, {"uid": params["uid"]}).scalar()
    if found is None:
        found = session.execute(insert, params).scalar()
        if found is None:
            found = session.execute(select_id, {"uid": params["uid"]}).scalar_one()
        elif inserted is not None:
            inserted.append(True)
    return int(found)


def _identity_params(identity: StudyIdentity | None) -> dict[str, Any]:
    if identity is None:
        return dict.fromkeys(
            ("key_id", "patient_key", "accession_key", "identifiers", "study_date")
        )
    return {
        "key_id": identity.key_id,
        "patient_key": identity.patient_key,
        "accession_key": identity.accession_key,
        "identifiers": identity.identifiers,
        "study_date": identity.study_date,
    }


def instance_exists(session: Session | Connection, sop_instance_uid: str) -> bool:
    return session.execute(_INSTANCE_EXISTS, {"sop": sop_instance_uid}).first() is not None


def record_instance(
    session: Session | Connection, rec: InstanceRecord, now: dt.datetime | None = None
) -> bool:
    """Record a stored instance; return False if its SOP Instance UID was known.

    ``session`` may be an ORM session or, cheaper for the listener, a Core connection.

    Four statements for an instance of a known series: look up the study and the
    series, insert the instance, and mark the study as having news.
    """
    now = now or utcnow()
    identity = _identity_params(rec.identity)
    study_id = _get_or_insert(
        session, _STUDY_ID, _INSERT_STUDY, {"uid": rec.study_instance_uid, "now": now, **identity}
    )
    new_series: list[bool] = []
    series_id = _get_or_insert(
        session,
        _SERIES_ID,
        _INSERT_SERIES,
        {
            "uid": rec.series_instance_uid,
            "study_id": study_id,
            "modality": rec.modality,
            "series_number": rec.series_number,
            "series_description": rec.series_description,
            "body_part_examined": rec.body_part_examined,
            "produced_by_us": rec.produced_by_us,
            "now": now,
        },
        inserted=new_series,
    )
    if new_series and rec.identity is not None:
        session.execute(_FILL_IDENTITY, {"id": study_id, **identity})
    inserted = session.execute(
        _INSERT_INSTANCE,
        {
            "study_id": study_id,
            "series_id": series_id,
            "sop_instance_uid": rec.sop_instance_uid,
            "sop_class_uid": rec.sop_class_uid,
            "transfer_syntax_uid": rec.transfer_syntax_uid,
            "instance_number": rec.instance_number,
            "rel_path": rec.rel_path,
            "size_bytes": rec.size_bytes,
            "calling_aet": rec.calling_aet,
            "produced_by_us": rec.produced_by_us,
            "now": now,
        },
    ).scalar()
    if inserted is None:
        return False
    # Our own results sent back to us are stored, but never start a job.
    touch = _TOUCH_STUDY if rec.produced_by_us else _STUDY_HAS_NEW_INSTANCE
    session.execute(touch, {"now": now, "id": study_id})
    return True


def create_job_if_stable(
    session: Session, study_id: int, observed_last_instance_at: dt.datetime
) -> Job | None:
    """Create a queued job for a study, unless an instance arrived meanwhile.

    Optimistic: the study's flag is cleared only if ``last_instance_at`` is still
    the value the assembler saw, so a late instance is never folded silently
    into a job that does not include it.
    """
    now = utcnow()
    result = session.execute(
        update(Study)
        .where(
            Study.id == study_id,
            Study.needs_job.is_(True),
            Study.last_instance_at == observed_last_instance_at,
        )
        .values(needs_job=False, updated_at=now)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    count = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.study_id == study_id)
    )
    job = Job(
        study_id=study_id,
        status=JobStatus.QUEUED.value,
        attempts=0,
        num_instances=int(count or 0),
        created_at=now,
    )
    session.add(job)
    session.flush()
    return job


def mark_enqueued(session: Session, job_ids: list[int], now: dt.datetime | None = None) -> None:
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=now or utcnow()))


def claim_job(
    session: Session,
    job_id: int,
    lease_seconds: float,
    max_attempts: int,
    owner: str | None = None,
    takeover_prefix: str | None = None,
    now: dt.datetime | None = None,
) -> Job | None:
    """Atomically take a job for running, leased to ``owner`` for ``lease_seconds``.

    A job can be claimed when it is queued, or running with an expired lease (its
    worker died), or still held by an earlier try of the same task, which hit a
    transient error and could not release it: a lease owner starting with
    ``takeover_prefix`` other than ``owner`` itself (the same try delivered again
    after its process died takes nothing over). Returns None when the job is
    done, failed, superseded, or leased to another live run, so a duplicate
    message is harmless.

    Each claim counts an attempt, except a take-over from an earlier try (also
    after the reconciler re-queued the job meanwhile): transient errors never use
    up ``max_attempts``. The run then records what it covers
    (:func:`record_coverage`).
    """
    now = now or utcnow()
    running = Job.status == JobStatus.RUNNING.value
    claimable = (Job.status == JobStatus.QUEUED.value) | (running & (Job.lease_until < now))
    started = literal(now, UTCDateTime())
    attempts: Any = Job.attempts + 1
    started_at: Any = started
    if takeover_prefix:
        own = Job.lease_owner.startswith(takeover_prefix, autoescape=True) & (
            Job.lease_owner != (owner or "")
        )
        claimable = claimable | (running & own)
        attempts = case((own, Job.attempts), else_=Job.attempts + 1)
        started_at = case((own, func.coalesce(Job.started_at, started)), else_=started)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=attempts,
            started_at=started_at,
            lease_until=now + dt.timedelta(seconds=lease_seconds),
            lease_owner=owner,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None
    if job.attempts > max_attempts:
        job.status = JobStatus.FAILED.value
        job.finished_at = now
        job.lease_until = None
        job.error = f"gave up after {max_attempts} attempts (the worker kept dying or timing out)"
        return None
    return job


def record_coverage(session: Session, job_id: int, owner: str) -> tuple[bool, int | None]:
    """Record what a just claimed job covers: the highest id of its study's
    received instances (``max_instance_id``; the job processes those up to it)
    and the number of the study's instances up to it (``num_instances``).

    Returns whether the run ``owner`` still holds the job, and that highest id.
    """
    study_id = session.scalar(
        select(Job.study_id).where(
            Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_owner == owner
        )
    )
    if study_id is None:
        return False, None
    top = session.scalar(
        select(func.max(Instance.id)).where(
            Instance.study_id == study_id, Instance.produced_by_us.is_(False)
        )
    )
    values: dict[str, Any] = {"max_instance_id": None if top is None else int(top)}
    if top is not None:
        covered = session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.study_id == study_id, Instance.id <= top)
        )
        values["num_instances"] = int(covered or 0)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1, values["max_instance_id"]


def renew_lease(session: Session, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend a running job's lease held by ``owner`` (the job's heartbeat).

    False when the job is no longer that run's: superseded by a newer job,
    finished, or re-queued and taken by another run after its lease expired.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING.value,
            Job.lease_owner == owner,
        )
        .values(lease_until=now + dt.timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def job_is_current(session: Session, job_id: int, owner: str) -> bool:
    """Whether the run ``owner`` may still persist the outcome of its job: the job
    is running under its lease, and no finished job of the study covered more
    instances. Locks the job's row until the caller's transaction ends, so the
    job cannot be superseded while its results or deliveries are being written.
    """
    row = session.execute(
        select(Job.status, Job.lease_owner, Job.study_id, Job.max_instance_id)
        .where(Job.id == job_id)
        .with_for_update()
    ).first()
    if row is None or row.status != JobStatus.RUNNING.value or row.lease_owner != owner:
        return False
    if row.max_instance_id is None:
        return True
    wider = session.scalar(
        select(Job.id)
        .where(
            Job.study_id == row.study_id,
            Job.id != job_id,
            Job.status == JobStatus.DONE.value,
            Job.max_instance_id > row.max_instance_id,
        )
        .limit(1)
    )
    return wider is None


def supersede_older_jobs(session: Session, study_id: int, newer_job_id: int) -> list[int]:
    """Mark the study's queued or running jobs older than ``newer_job_id`` as
    superseded (newest input wins); return their ids. A running one notices at
    its next lease renewal or before it persists anything, and discards its
    outcome."""
    now = utcnow()
    ids = [
        int(i)
        for i in session.execute(
            update(Job)
            .where(
                Job.study_id == study_id,
                Job.id < newer_job_id,
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            )
            .values(
                status=JobStatus.SUPERSEDED.value,
                finished_at=now,
                lease_until=None,
                error=f"superseded by job {newer_job_id} (instances arrived after it was made)",
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).scalars()
    ]
    return sorted(ids)


def finish_job(
    session: Session,
    job_id: int,
    status: JobStatus,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
    owner: str | None = None,
) -> bool:
    """Record a job's outcome. With ``owner``, only while that run still holds the
    job (running, its lease); returns whether the row was updated."""
    stmt = update(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.status == JobStatus.RUNNING.value, Job.lease_owner == owner)
    result = session.execute(
        stmt.values(
            status=status.value,
            finished_at=utcnow(),
            lease_until=None,
            summary=summary,
            error=error,
        ).execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def requeue_job(session: Session, job_id: int, expired_before: dt.datetime | None = None) -> bool:
    """Make a running job queued again (its worker is gone). With
    ``expired_before``, only if its lease is still expired at that time (a
    heartbeat or a take-over may have renewed it since it was seen). The lease
    owner is kept: the next try of the same task may take the job without
    counting an attempt."""
    stmt = update(Job).where(Job.id == job_id)
    if expired_before is not None:
        stmt = stmt.where(Job.status == JobStatus.RUNNING.value, Job.lease_until < expired_before)
    result = session.execute(
        stmt.values(
            status=JobStatus.QUEUED.value, lease_until=None, enqueued_at=None
        ).execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def replace_results(
    session: Session, study_id: int, job_id: int, model: str, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Store a model's results for a study, replacing what that model said before
    (re-running a job or reprocessing a study never duplicates results)."""
    session.execute(delete(Result).where(Result.study_id == study_id, Result.model == model))
    now = utcnow()
    for row in rows:
        session.add(Result(study_id=study_id, job_id=job_id, created_at=now, **row))


# -- deliveries -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A built result object for one destination."""

    study_id: int
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    destination: str
    rel_path: str


def upsert_delivery(session: Session, rec: DeliveryRecord) -> int | None:
    """Record that ``rec`` is to be sent; return its id if it needs sending.

    A row already sent is left alone (re-running a job never sends an object
    twice); a pending or failed row is made due again now.
    """
    now = utcnow()
    found = session.scalar(
        select(Delivery).where(
            Delivery.sop_instance_uid == rec.sop_instance_uid,
            Delivery.destination == rec.destination,
        )
    )
    if found is None:
        row = Delivery(
            study_id=rec.study_id,
            job_id=rec.job_id,
            study_instance_uid=rec.study_instance_uid,
            series_instance_uid=rec.series_instance_uid,
            sop_instance_uid=rec.sop_instance_uid,
            sop_class_uid=rec.sop_class_uid,
            kind=rec.kind,
            destination=rec.destination,
            rel_path=rec.rel_path,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
        )
        session.add(row)
        session.flush()
        return row.id
    if found.status == DeliveryStatus.SENT.value:
        return None
    if found.status == DeliveryStatus.FAILED.value:
        found.attempts = 0
        found.created_at = now  # its maximum age (PACS_AI_DELIVERY_MAX_AGE_HOURS) starts again
    found.job_id = rec.job_id
    found.rel_path = rec.rel_path
    found.status = DeliveryStatus.PENDING.value
    found.next_attempt_at = now
    found.updated_at = now
    return found.id


def claim_delivery(session: Session, delivery_id: int, lease_seconds: float) -> Delivery | None:
    """Take a due, pending delivery for one attempt (attempts + 1), or None when it
    is sent, failed, not yet due, or held by another live dispatch run."""
    now = utcnow()
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.status == DeliveryStatus.PENDING.value,
            Delivery.next_attempt_at <= now + dt.timedelta(seconds=1),
            (Delivery.lease_until.is_(None)) | (Delivery.lease_until < now),
        )
        .values(
            attempts=Delivery.attempts + 1,
            lease_until=now + dt.timedelta(seconds=lease_seconds),
            enqueued_at=None,
            updated_at=now,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    return session.get(Delivery, delivery_id, populate_existing=True)


def finish_delivery(
    session: Session,
    delivery_id: int,
    status: DeliveryStatus,
    error: str | None = None,
    retry_at: dt.datetime | None = None,
) -> None:
    """Record the outcome of an attempt: sent, failed, or pending until ``retry_at``."""
    now = utcnow()
    values: dict[str, Any] = {
        "status": status.value,
        "lease_until": None,
        "updated_at": now,
        "last_error": error,
    }
    if status is DeliveryStatus.SENT:
        values["sent_at"] = now
    if retry_at is not None:
        values["next_attempt_at"] = retry_at
    session.execute(update(Delivery).where(Delivery.id == delivery_id).values(**values))


def due_deliveries(
    session: Session, now: dt.datetime, resend_before: dt.datetime
) -> list[tuple[int, str]]:
    """(id, destination) of pending deliveries that are due and have no live
    message (never sent to the broker, or sent before ``resend_before``)."""
    rows = session.execute(
        select(Delivery.id, Delivery.destination)
        .where(
            Delivery.status == DeliveryStatus.PENDING.value,
            Delivery.next_attempt_at <= now,
            (Delivery.lease_until.is_(None)) | (Delivery.lease_until < now),
            (Delivery.enqueued_at.is_(None)) | (Delivery.enqueued_at < resend_before),
        )
        .order_by(Delivery.id)
    ).all()
    return [(int(i), str(d)) for i, d in rows]


def mark_deliveries_enqueued(
    session: Session, ids: list[int], now: dt.datetime | None = None
) -> None:
    if ids:
        session.execute(
            update(Delivery).where(Delivery.id.in_(ids)).values(enqueued_at=now or utcnow())
        )


def reset_deliveries(
    session: Session, study_uid: str | None = None, job_id: int | None = None
) -> list[int]:
    """Make every delivery of a study (or a job) pending again, attempts 0, its age
    (``created_at``, for ``PACS_AI_DELIVERY_MAX_AGE_HOURS``) starting now; return ids."""
    stmt = select(Delivery.id)
    if study_uid is not None:
        stmt = stmt.where(Delivery.study_instance_uid == study_uid)
    if job_id is not None:
        stmt = stmt.where(Delivery.job_id == job_id)
    ids = [int(i) for i in session.scalars(stmt)]
    if ids:
        now = utcnow()
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(
                status=DeliveryStatus.PENDING.value,
                attempts=0,
                last_error=None,
                created_at=now,
                next_attempt_at=now,
                lease_until=None,
                enqueued_at=None,
                updated_at=now,
            )
        )
    return ids


class ReprocessRefused(Exception):
    """A study cannot be reprocessed now; the message says why."""


def create_reprocess_job(session: Session, study_uid: str) -> Job:
    """A new queued job for a stored study (admin reprocess), committed by the
    caller and then sent by id like any other job.

    Refused (:class:`ReprocessRefused`) when the study is unknown, has nothing to
    process, already has a queued or running job, or was pruned by retention.
    """
    # FOR UPDATE: retention (:func:`mark_pruned`) and a reprocess of the same
    # study take turns, so a study is never pruned under a job just queued.
    study = session.scalar(
        select(Study)
        .where(Study.study_instance_uid == study_uid)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if study is None:
        raise LookupError(f"no study {study_uid}")
    if study.pruned_at is not None:
        raise ReprocessRefused(
            f"study {study_uid} was pruned by retention at {study.pruned_at.isoformat()} "
            "(PACS_AI_RETENTION_HOURS): its instances are no longer stored"
        )
    active = session.scalar(
        select(Job.id)
        .where(
            Job.study_id == study.id,
            Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
        )
        .limit(1)
    )
    if active is not None:
        raise ReprocessRefused(f"study {study_uid} already has job {active} queued or running")
    count = session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.study_id == study.id, Instance.produced_by_us.is_(False))
    )
    if not count:
        raise ReprocessRefused(f"study {study_uid} has no received instances to process")
    total = session.scalar(
        select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
    )
    now = utcnow()
    job = Job(
        study_id=study.id,
        status=JobStatus.QUEUED.value,
        attempts=0,
        num_instances=int(total or 0),
        created_at=now,
    )
    session.add(job)
    session.flush()
    return job


# -- retention ------------------------------------------------------------------------


def mark_pruned(session: Session, study_id: int, cutoff: dt.datetime, now: dt.datetime) -> bool:
    """Set a study's ``pruned_at`` if the retention policy
    (:func:`db.queries.retention_conditions`) still allows it; return whether it
    did. Commit before deleting any file: from then on a reprocess is refused.
    """
    from db.queries import retention_conditions

    result = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.pruned_at.is_(None), *retention_conditions(cutoff))
        .values(pruned_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    # On PostgreSQL the update may have waited for a reprocess holding the row;
    # a job or delivery that transaction committed is seen by a new statement
    # only, so look again.
    still = session.scalar(
        select(Study.id).where(Study.id == study_id, *retention_conditions(cutoff))
    )
    if still is None:
        session.execute(
            update(Study)
            .where(Study.id == study_id)
            .values(pruned_at=None)
            .execution_options(synchronize_session=False)
        )
        return False
    return True


# -- identity, priors and audit (issue 13) -------------------------------------------------


class KeyMismatch(Exception):
    """The database's identifiers were made with another secret key."""


def register_key_id(session: Session, key_id: str) -> None:
    """Record ``key_id`` as this database's key, or raise :class:`KeyMismatch` when
    the database already holds identifiers of another key (a host given another
    PACS_AI_SECRET_KEY_FILE would make links and identifiers nobody can read)."""
    known = [str(k) for k in session.scalars(select(SecretKey.key_id))]
    if key_id in known:
        return
    if known:
        raise KeyMismatch(
            f"PACS_AI_SECRET_KEY_FILE holds key {key_id}, but this database's identifiers "
            f"were made with key {', '.join(sorted(known))}: give every pacs-ai process of "
            "this installation the same key file"
        )
    session.execute(
        insert_ignore(SecretKey.__table__, session, {"key_id": key_id, "first_used_at": utcnow()})
    )


def insert_ignore(table: Any, session: Session, values: dict[str, Any]) -> Any:
    """An INSERT that does nothing when the row exists (SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).values(**values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).values(**values).on_conflict_do_nothing()


def mark_prior_fetch(session: Session, prior_uid: str, for_study_uid: str) -> None:
    """Before a prior is fetched from the PACS: its study row, marked as the prior of
    ``for_study_uid`` (its job then looks for priors locally only), made now if the
    study is new (the listener fills it in as its instances arrive)."""
    now = utcnow()
    stmt = insert_ignore(
        Study.__table__,
        session,
        {
            "study_instance_uid": prior_uid,
            "received_at": now,
            "last_instance_at": now,
            "updated_at": now,
            "needs_job": False,
            "prior_of": for_study_uid,
        },
    )
    session.execute(stmt)
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == prior_uid, Study.prior_of.is_(None))
        .values(prior_of=for_study_uid)
        .execution_options(synchronize_session=False)
    )


def set_result_measurements(session: Session, result_id: int, measurements: dict[str, Any]) -> None:
    """Replace one stored result's measurements (a prior comparison added)."""
    session.execute(
        update(Result)
        .where(Result.id == result_id)
        .values(measurements=measurements)
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record (see :class:`db.models.AuditRecord`)."""

    interface: str
    actor: str
    source: str
    action: str
    outcome: int
    studies: tuple[str, ...] = ()


def prune_audit(session: Session, before: dt.datetime) -> int:
    """Delete the audit records older than ``before``; how many went."""
    result = session.execute(delete(AuditRecord).where(AuditRecord.at < before))
    return int(getattr(result, "rowcount", 0) or 0)


def append_audit(session: Session, entry: AuditEntry, at: dt.datetime | None = None) -> None:
    session.add(
        AuditRecord(
            at=at or utcnow(),
            interface=entry.interface[:8],
            actor=entry.actor[:64],
            source=entry.source[:128],
            action=entry.action[:255],
            studies=",".join(entry.studies) or None,
            outcome=int(entry.outcome),
        )
    )
