"""SQLAlchemy 2 typed models. The database is the source of truth."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # a newer job of the same study (more instances) replaced it; its results are discarded
    SUPERSEDED = "superseded"


UID = String(64)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # True while instances have arrived that no job has been created for yet.
    needs_job: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when retention deleted the study's stored files (rows and results stay).
    pruned_at: Mapped[dt.datetime | None] = mapped_column()
    # Patient linkage and identifiers at rest (dicomnode/identity.py), never in clear:
    # the id of the secret key that made the values below,
    key_id: Mapped[str | None] = mapped_column(String(32))
    # HMAC-SHA256 (hex) of IssuerOfPatientID + PatientID: the same patient, the same key,
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    # HMAC-SHA256 (hex) of the AccessionNumber, for lookup by accession,
    accession_key: Mapped[str | None] = mapped_column(String(64), index=True)
    # PatientID, IssuerOfPatientID and AccessionNumber sealed with AES-256-GCM,
    identifiers: Mapped[str | None] = mapped_column(Text)
    # and the StudyDate, which orders a patient's studies (priors).
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    # Set on a study pacs-ai fetched from the PACS as the prior of this study (its UID):
    # its own priors are looked up locally only.
    prior_of: Mapped[str | None] = mapped_column(UID)

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_needs_job", "needs_job", "last_instance_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    produced_by_us: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rel_path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    produced_by_us: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column()
    started_at: Mapped[dt.datetime | None] = mapped_column()
    finished_at: Mapped[dt.datetime | None] = mapped_column()
    # A running job owns its lease until this time; after it the reconciler may re-run it.
    # The run holding it (``lease_owner``, the Celery task id) renews it while it works.
    lease_until: Mapped[dt.datetime | None] = mapped_column()
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    # the highest instance id the job covers (set when claimed): a job's results
    # never replace those of a job that covered more
    max_instance_id: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any] | None] = mapped_column()

    study: Mapped[Study] = relationship(back_populates="jobs")

    __table_args__ = (Index("ix_jobs_status", "status"),)


class Result(Base):
    """One finding or measurement produced by one model version on one series."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    model: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # classification | segmentation
    finding_code_value: Mapped[str] = mapped_column(String(32))
    finding_code_scheme: Mapped[str] = mapped_column(String(16))
    finding: Mapped[str] = mapped_column(String(128), index=True)  # the code meaning
    label_value: Mapped[int | None] = mapped_column(Integer)
    probability: Mapped[float | None] = mapped_column()
    present: Mapped[bool | None] = mapped_column(Boolean)
    measurements: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_results_study_model", "study_id", "model"),)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Delivery(Base):
    """One result object (SR, SEG, key image) to be sent to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    kind: Mapped[str] = mapped_column(String(8))  # sr | seg | ki
    destination: Mapped[str] = mapped_column(String(128))  # AE@host:port
    rel_path: Mapped[str] = mapped_column(String(255))  # in the outbox
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # no attempt before this time (exponential back-off after a transient failure)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # when its id was last sent to the broker (None: no live message)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column()
    # a dispatch run owns the row until this time (a dead worker's claim expires)
    lease_until: Mapped[dt.datetime | None] = mapped_column()
    sent_at: Mapped[dt.datetime | None] = mapped_column()

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination", name="uq_deliveries_sop_destination"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
    )


class AuditRecord(Base):
    """Who read or changed what, when, from where, with what outcome: one row per
    API request and per CLI command (worker/admin/audit.py). Never a token, its
    digest, a patient identifier or a query's value other than a Study UID."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    interface: Mapped[str] = mapped_column(String(8))  # api | cli
    # the token's configured role and index ("admin#0", "read#1"), "anonymous",
    # "local" (no tokens configured), or the operating system user of a CLI command
    actor: Mapped[str] = mapped_column(String(64))
    # the client's address, or "cli:<user>"
    source: Mapped[str] = mapped_column(String(128))
    # "GET /api/studies/{study_uid}" (the route, query parameter names only) or
    # "studies list --accession --json" (option names only)
    action: Mapped[str] = mapped_column(String(255))
    # the Study Instance UID(s) concerned, comma-separated
    studies: Mapped[str | None] = mapped_column(Text)
    # the HTTP status, or the command's exit status
    outcome: Mapped[int] = mapped_column(Integer)


class SecretKey(Base):
    """The ids of the secret keys this database's identifiers were made with: a
    process holding another key refuses to start (one key per installation)."""

    __tablename__ = "secret_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    first_used_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
