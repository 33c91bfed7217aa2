"""Store and record one received instance: the step every front door shares.

The DICOM listener (C-STORE, :mod:`dicomnode.scp`) and the API's STOW-RS
endpoint (:mod:`worker.admin.stow_rs`) receive an instance into a temp file in
the storage's incoming folder and hand it to :class:`IngestService`, which

1. walks the dataset once (truncated, garbage or deflate-bomb data is refused),
2. validates its UIDs and compares them with what the protocol expected (the
   C-STORE request, the Part 10 file meta, the study of a STOW-RS URL),
3. refuses it while the storage is below its free-space watermark,
4. in one database transaction: answers a known SOP Instance UID as a
   duplicate, else fsyncs and atomically moves the file to its hashed place
   (never a path built from a dataset value) and records the row,

and returns an :class:`Outcome`: ``stored``, ``duplicate``, ``refused`` (the
instance's own fault: it will fail the same way again) or ``failed`` (ours:
disk or database; the sender may try again). The protocols only turn the
outcome into their own answer. Log lines name UIDs, never patient data.

It imports storage, UIDs and the listener's database statements (and, for
STOW-RS, pynetdicom's list of storage SOP classes): never the web framework,
the network code of a protocol, or the pipeline.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from db.repo import InstanceRecord, instance_exists, record_instance
from db.session import get_engine
from dicomnode import identity
from dicomnode.constants import OWN_MANUFACTURER
from dicomnode.storage import (
    DatasetTooLarge,
    MalformedDataset,
    check_structure,
    commit_file,
    free_mb,
    prepare_storage,
    read_file_meta,
    temp_prefix,
)
from dicomnode.uids import InvalidUID, relative_instance_path, validate_uid

log = logging.getLogger(__name__)

# DICOM statuses (PS3.4 B.2.3 for C-STORE; PS3.18 uses the same as FailureReason)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

#: Accepted as received, never transcoded.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

_SERIES_TAGS = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstanceNumber",
    "Manufacturer",
]
#: Kept by the structure walk itself: a received file is parsed only once.
_TAGS = {keyword: Tag(keyword) for keyword in _SERIES_TAGS}
KEEP_TAGS = frozenset(_TAGS.values()) | identity.KEEP_TAGS  # + the study's identity


class Problem(enum.Enum):
    """Why an instance was not stored."""

    TOO_LARGE = "too large"
    NO_SPACE = "storage below its free-space watermark"
    UNPARSEABLE = "cannot be parsed"
    INVALID_UID = "invalid UID"
    MISMATCH = "does not match the request"
    WRONG_STUDY = "not of the requested study"
    UNSUPPORTED_SYNTAX = "transfer syntax not supported"
    UNSUPPORTED_CLASS = "SOP class not supported"
    CANNOT_STORE = "file cannot be stored"
    DATABASE = "database unavailable"


Result = Literal["stored", "duplicate", "refused", "failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one instance. The UIDs are set when they were read and
    are valid (never a raw dataset value); ``reason`` holds no patient data."""

    result: Result
    status: int = SUCCESS
    problem: Problem | None = None
    reason: str = ""
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    size_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Stored now or before: the sender may forget it."""
        return self.result in ("stored", "duplicate")


@dataclass(frozen=True, slots=True)
class Source:
    """Who sent the instance: ``protocol`` labels log lines (``C-STORE``,
    ``STOW-RS``); ``calling_aet`` is recorded with the instance (16 characters)."""

    protocol: str
    calling_aet: str | None = None


@dataclass(frozen=True, slots=True)
class Expected:
    """What the protocol says the instance is; a dataset that disagrees is refused."""

    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    study_instance_uid: str | None = None


class IngestService:
    """Stores received files under ``storage_root`` and records them in the
    database at ``database_url``; one per process, safe to share between threads."""

    def __init__(
        self,
        storage_root: Path,
        database_url: str,
        max_instance_bytes: int = 2 * 1024**3,
        min_free_mb: int = 0,
        storage_classes: Collection[str] | None = None,
        identity_keys: identity.IdentityKeys | None = None,
    ) -> None:
        #: patient linkage and identifiers at rest (None: no identity is recorded)
        self.identity_keys = identity_keys
        self.storage_root = storage_root
        self.database_url = database_url
        self.max_instance_bytes = max_instance_bytes
        self.min_free_mb = min_free_mb
        #: SOP classes :meth:`ingest_part10` accepts; None: every storage class
        #: the listener accepts (pynetdicom's AllStoragePresentationContexts)
        self._storage_classes = storage_classes

    @property
    def incoming(self) -> Path:
        """The folder received files are written to (created on first use)."""
        return prepare_storage(self.storage_root)

    def has_room(self) -> bool:
        """Whether the storage is above ``PACS_AI_MIN_FREE_MB``."""
        if self.min_free_mb <= 0:
            return True
        try:
            return free_mb(self.storage_root) >= self.min_free_mb
        except OSError:
            return False

    def storage_classes(self) -> Collection[str]:
        if self._storage_classes is None:
            self._storage_classes = _storage_classes()
        return self._storage_classes

    # -- the step itself ----------------------------------------------------------

    def refuse(
        self,
        source: Source,
        status: int,
        problem: Problem,
        reason: str,
        found: Outcome | None = None,
        result: Result = "refused",
        level: int = logging.WARNING,
    ) -> Outcome:
        """Log a refusal (``<protocol> refused 0x....: reason``) and return its outcome."""
        log.log(level, "%s refused 0x%04X: %s", source.protocol, status, reason)
        found = found or Outcome("refused")
        return Outcome(
            result,
            status,
            problem,
            reason,
            found.sop_class_uid,
            found.sop_instance_uid,
            found.study_instance_uid,
            found.series_instance_uid,
            found.size_bytes,
        )

    def ingest_file(
        self,
        path: Path,
        transfer_syntax: str,
        source: Source,
        expected: Expected | None = None,
    ) -> Outcome:
        """Check, store and record the Part 10 file at ``path`` (in :attr:`incoming`),
        whose dataset is encoded in ``transfer_syntax``. On success the file has
        moved to its final place; otherwise it is left where it was (the caller
        removes it)."""
        # 1. Can the bytes be parsed at all?
        try:
            ds = check_structure(path, transfer_syntax, KEEP_TAGS, self.max_instance_bytes)
        except DatasetTooLarge as exc:
            return self.refuse(source, OUT_OF_RESOURCES, Problem.TOO_LARGE, str(exc))
        except Exception as exc:  # any parse failure
            return self.refuse(
                source,
                CANNOT_UNDERSTAND,
                Problem.UNPARSEABLE,
                f"cannot parse dataset ({_reason(exc)})",
            )
        # 2. Does it carry valid identifiers that match what the protocol said?
        expected = expected or Expected()
        seen = _seen(ds)
        try:
            rec = _record_for(ds, path, transfer_syntax, source, self.identity_keys)
        except InvalidUID as exc:
            return self.refuse(source, DATASET_DOES_NOT_MATCH, Problem.INVALID_UID, str(exc), seen)
        seen = Outcome(
            "refused",
            sop_class_uid=rec.sop_class_uid,
            sop_instance_uid=rec.sop_instance_uid,
            study_instance_uid=rec.study_instance_uid,
            series_instance_uid=rec.series_instance_uid,
            size_bytes=rec.size_bytes,
        )
        if (
            expected.sop_instance_uid is not None
            and rec.sop_instance_uid != expected.sop_instance_uid
        ) or (expected.sop_class_uid is not None and rec.sop_class_uid != expected.sop_class_uid):
            return self.refuse(
                source,
                DATASET_DOES_NOT_MATCH,
                Problem.MISMATCH,
                "dataset SOP Class/Instance UID does not match the request "
                f"(request sop={_safe_uid(expected.sop_instance_uid or '')})",
                seen,
            )
        if (
            expected.study_instance_uid is not None
            and rec.study_instance_uid != expected.study_instance_uid
        ):
            return self.refuse(
                source,
                DATASET_DOES_NOT_MATCH,
                Problem.WRONG_STUDY,
                f"sop={rec.sop_instance_uid} is of study {rec.study_instance_uid}, "
                f"not of the requested study {expected.study_instance_uid}",
                seen,
            )
        # 3. Room for it?
        if not self.has_room():
            reason = "storage below PACS_AI_MIN_FREE_MB"
            return self.refuse(source, OUT_OF_RESOURCES, Problem.NO_SPACE, reason, seen)
        # 4. Store durably, record, then answer success: one transaction looks
        #    for a duplicate, and commits the row only after the file is durable.
        final = self.storage_root / rec.rel_path
        stored_here = False
        try:
            with get_engine(self.database_url).begin() as conn:
                if instance_exists(conn, rec.sop_instance_uid):
                    log.debug("duplicate sop=%s ignored", rec.sop_instance_uid)
                    return _outcome("duplicate", rec)
                existed = final.exists()
                try:
                    commit_file(path, self.storage_root, rec.rel_path)
                except OSError as exc:
                    raise _CannotStore(exc.strerror or type(exc).__name__) from exc
                stored_here = not existed
                created = record_instance(conn, rec)
        except _CannotStore as exc:
            return self.refuse(
                source,
                OUT_OF_RESOURCES,
                Problem.CANNOT_STORE,
                f"cannot store instance ({exc})",
                seen,
                "failed",
                logging.ERROR,
            )
        except Exception as exc:  # noqa: BLE001 - database unreachable or full
            if stored_here:
                final.unlink(missing_ok=True)
            return self.refuse(
                source,
                OUT_OF_RESOURCES,
                Problem.DATABASE,
                f"database unavailable, cannot record sop={rec.sop_instance_uid} "
                f"({type(exc).__name__})",
                seen,
                "failed",
                logging.ERROR,
            )
        log.debug(
            "stored sop=%s series=%s study=%s bytes=%d",
            rec.sop_instance_uid,
            rec.series_instance_uid,
            rec.study_instance_uid,
            rec.size_bytes,
        )
        return _outcome("stored" if created else "duplicate", rec)

    def ingest_part10(
        self, path: Path, source: Source, study_instance_uid: str | None = None
    ) -> Outcome:
        """:meth:`ingest_file` for a Part 10 file as a client sent it (STOW-RS):
        its file meta names the transfer syntax, SOP class and instance, which
        must be supported and match the dataset; with ``study_instance_uid`` the
        instance must belong to that study."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            return self.refuse(
                source, OUT_OF_RESOURCES, Problem.CANNOT_STORE, _reason(exc), result="failed"
            )
        if size > self.max_instance_bytes:
            return self.refuse(
                source,
                OUT_OF_RESOURCES,
                Problem.TOO_LARGE,
                f"instance larger than PACS_AI_MAX_INSTANCE_BYTES ({self.max_instance_bytes})",
            )
        try:
            meta = read_file_meta(path)
        except Exception as exc:  # any parse failure
            return self.refuse(
                source,
                CANNOT_UNDERSTAND,
                Problem.UNPARSEABLE,
                f"cannot parse file meta information ({_reason(exc)})",
            )
        seen = Outcome(
            "refused",
            sop_class_uid=_valid_or_none(meta.sop_class_uid),
            sop_instance_uid=_valid_or_none(meta.sop_instance_uid),
        )
        try:
            sop_class = validate_uid(meta.sop_class_uid, "MediaStorageSOPClassUID")
            sop = validate_uid(meta.sop_instance_uid, "MediaStorageSOPInstanceUID")
            syntax = validate_uid(meta.transfer_syntax, "TransferSyntaxUID")
        except InvalidUID as exc:
            return self.refuse(source, DATASET_DOES_NOT_MATCH, Problem.INVALID_UID, str(exc), seen)
        if syntax not in TRANSFER_SYNTAXES:
            return self.refuse(
                source,
                TRANSFER_SYNTAX_NOT_SUPPORTED,
                Problem.UNSUPPORTED_SYNTAX,
                f"transfer syntax {syntax} is not supported",
                seen,
            )
        if sop_class not in self.storage_classes():
            return self.refuse(
                source,
                SOP_CLASS_NOT_SUPPORTED,
                Problem.UNSUPPORTED_CLASS,
                f"SOP class {sop_class} is not a storage class this node accepts",
                seen,
            )
        return self.ingest_file(
            path, syntax, source, Expected(sop, sop_class, study_instance_uid=study_instance_uid)
        )

    def ingest_dataset(
        self, ds: Dataset, source: Source, study_instance_uid: str | None = None
    ) -> Outcome:
        """Write ``ds`` (with its ``file_meta``) as a Part 10 file into the incoming
        folder and ingest it like a received one."""
        fd, name = tempfile.mkstemp(prefix=temp_prefix("rx"), suffix=".part", dir=self.incoming)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
            return self.ingest_part10(path, source, study_instance_uid)
        except OSError as exc:
            return self.refuse(
                source, OUT_OF_RESOURCES, Problem.CANNOT_STORE, _reason(exc), result="failed"
            )
        finally:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


# -- helpers ------------------------------------------------------------------------------


def _outcome(result: Result, rec: InstanceRecord) -> Outcome:
    return Outcome(
        result,
        sop_class_uid=rec.sop_class_uid,
        sop_instance_uid=rec.sop_instance_uid,
        study_instance_uid=rec.study_instance_uid,
        series_instance_uid=rec.series_instance_uid,
        size_bytes=rec.size_bytes,
    )


def _record_for(
    ds: Dataset,
    path: Path,
    transfer_syntax: str,
    source: Source,
    keys: identity.IdentityKeys | None = None,
) -> InstanceRecord:
    study = validate_uid(_ascii(ds, "StudyInstanceUID"), "StudyInstanceUID")
    series = validate_uid(_ascii(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
    sop = validate_uid(_ascii(ds, "SOPInstanceUID"), "SOPInstanceUID")
    sop_class = validate_uid(_ascii(ds, "SOPClassUID"), "SOPClassUID")
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        rel_path=relative_instance_path(study, series, sop),
        size_bytes=path.stat().st_size,
        modality=_str_or_none(_ascii(ds, "Modality"), 16),
        series_number=_int_or_none(_ascii(ds, "SeriesNumber")),
        # LO: may use the dataset's character set, so pydicom decodes it
        series_description=_str_or_none(ds.get("SeriesDescription"), 64),
        body_part_examined=_str_or_none(_ascii(ds, "BodyPartExamined"), 16),
        instance_number=_int_or_none(_ascii(ds, "InstanceNumber")),
        calling_aet=(source.calling_aet or "").strip()[:16] or None,
        produced_by_us=_ascii(ds, "Manufacturer") == OWN_MANUFACTURER,
        identity=identity.study_identity(ds, keys, study),
    )


def _seen(ds: Dataset) -> Outcome:
    """The valid ones among the instance's UIDs (for a protocol's failure report)."""
    return Outcome(
        "refused",
        sop_class_uid=_valid_or_none(_ascii(ds, "SOPClassUID")),
        sop_instance_uid=_valid_or_none(_ascii(ds, "SOPInstanceUID")),
        study_instance_uid=_valid_or_none(_ascii(ds, "StudyInstanceUID")),
        series_instance_uid=_valid_or_none(_ascii(ds, "SeriesInstanceUID")),
    )


def _ascii(ds: Dataset, keyword: str) -> str | None:
    """A value of a kept element whose VR is ASCII only (UI, CS, IS), or the
    Manufacturer compared with our own ASCII name, read from the raw bytes
    without pydicom's conversion and validation (the listener's hot path)."""
    elem = ds.get_item(_TAGS[keyword])
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return str(value).strip(" \x00")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any, limit: int) -> str | None:
    if value in (None, ""):
        return None
    return str(value)[:limit]


def _valid_or_none(value: str | None) -> str | None:
    try:
        return validate_uid(value, "uid")
    except InvalidUID:
        return None


def _safe_uid(value: str) -> str:
    return _valid_or_none(value) or "<invalid>"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MalformedDataset):
        return str(exc)
    return type(exc).__name__


class _CannotStore(Exception):
    """The instance's file cannot be written (disk full, permissions, ...)."""


@cache
def _storage_classes() -> frozenset[str]:
    from pynetdicom.presentation import AllStoragePresentationContexts

    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
