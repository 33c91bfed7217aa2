"""Patient linkage and identifiers at rest, never in clear.

pacs-ai links the studies of one patient (for priors) and finds a study by its
accession number (for admins) without storing a patient identifier in clear.
One secret key per installation (``PACS_AI_SECRET_KEY_FILE``; by default
``<data dir>/secret.key``, created with mode 0600 when missing) gives, through
HKDF-SHA256, independent subkeys for

- the **patient key**: HMAC-SHA256 of IssuerOfPatientID and PatientID (one
  patient, one key; nothing to reverse without the secret),
- the **accession key**: HMAC-SHA256 of the AccessionNumber (lookup),
- the **sealed identifiers**: PatientID, IssuerOfPatientID and AccessionNumber
  encrypted with AES-256-GCM, bound to the study's UID (a sealed value copied
  to another study's row does not open), shown only to admins,
- the **key id**: names the key, so that a process holding another key than
  the one the database was written with refuses to start.

The listener computes a study's :class:`db.repo.StudyIdentity` from the few
header elements its structure walk keeps (:data:`KEEP_TAGS`) where the study
row is first recorded. This module imports the database's read functions only
for the accession lookup; never the pipeline, the web framework or pynetdicom.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from db.repo import StudyIdentity

#: the header elements the listener keeps for :func:`study_identity`
IDENTITY_KEYWORDS = ("PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyDate")
KEEP_TAGS = frozenset(int(Tag(k)) for k in IDENTITY_KEYWORDS)

#: bytes of key material a key file must hold at least (256 bits)
MIN_KEY_BYTES = 32
_SALT = b"pacs-ai identity"
_SEALED_PREFIX = "v1."
_DATE = re.compile(r"^(\d{4})[-./]?(\d{2})[-./]?(\d{2})$")


class KeyFileError(Exception):
    """The secret key file is missing, unreadable or unfit; the message says
    which file and what to do."""


class SealedValueError(Exception):
    """A sealed value does not open with this key for this study."""


@dataclass(frozen=True, slots=True)
class Identifiers:
    """A study's identifiers in clear (in memory only; stored sealed)."""

    patient_id: str = ""
    issuer_of_patient_id: str = ""
    accession_number: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "patient_id": self.patient_id,
            "issuer_of_patient_id": self.issuer_of_patient_id,
            "accession_number": self.accession_number,
        }


def _derive(material: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=purpose).derive(material)


def _field(value: str) -> bytes:
    """One length-prefixed field: ("a", "bc") and ("ab", "c") never collide."""
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


class IdentityKeys:
    """The subkeys derived from one secret key file (never printed)."""

    __slots__ = ("_accession", "_aead", "_patient", "key_id")

    def __init__(self, material: bytes) -> None:
        if len(material) < MIN_KEY_BYTES:
            raise KeyFileError(f"the secret key has {len(material)} bytes; at least 32 are needed")
        self.key_id: str = _derive(material, b"pacs-ai key id v1")[:8].hex()
        self._patient = _derive(material, b"pacs-ai patient link v1")
        self._accession = _derive(material, b"pacs-ai accession lookup v1")
        self._aead = AESGCM(_derive(material, b"pacs-ai identifiers at rest v1"))

    def __repr__(self) -> str:
        return f"IdentityKeys(key_id={self.key_id!r})"

    def patient_key(self, patient_id: str, issuer_of_patient_id: str = "") -> str | None:
        """The patient's key (64 hex digits), or None without a PatientID."""
        patient_id, issuer = clean(patient_id), clean(issuer_of_patient_id)
        if not patient_id:
            return None
        message = _field(issuer) + _field(patient_id)
        return hmac.new(self._patient, message, hashlib.sha256).hexdigest()

    def accession_key(self, accession_number: str) -> str | None:
        """The accession number's lookup key (64 hex digits), or None when empty."""
        accession = clean(accession_number)
        if not accession:
            return None
        return hmac.new(self._accession, _field(accession), hashlib.sha256).hexdigest()

    def seal(self, identifiers: Identifiers, study_instance_uid: str) -> str:
        """``identifiers`` encrypted (AES-256-GCM, random nonce) for one study."""
        plain = json.dumps(identifiers.to_dict(), separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plain, study_instance_uid.encode("ascii"))
        return _SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, study_instance_uid: str) -> Identifiers:
        """The identifiers of :meth:`seal`; :class:`SealedValueError` when ``sealed``
        was made with another key or for another study, or was altered."""
        if not sealed.startswith(_SEALED_PREFIX):
            raise SealedValueError("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_SEALED_PREFIX) :])
            plain = self._aead.decrypt(raw[:12], raw[12:], study_instance_uid.encode("ascii"))
            found: Any = json.loads(plain)
        except (ValueError, InvalidTag, UnicodeError):
            raise SealedValueError(
                "the sealed identifiers do not open with this key for this study"
            ) from None
        return Identifiers(
            patient_id=str(found.get("patient_id", "")),
            issuer_of_patient_id=str(found.get("issuer_of_patient_id", "")),
            accession_number=str(found.get("accession_number", "")),
        )

    def identity(
        self, identifiers: Identifiers, study_instance_uid: str, study_date: dt.date | None
    ) -> StudyIdentity:
        """What is stored of a study: hashes, sealed identifiers, date and key id."""
        anything = identifiers.patient_id or identifiers.accession_number
        return StudyIdentity(
            key_id=self.key_id,
            patient_key=self.patient_key(identifiers.patient_id, identifiers.issuer_of_patient_id),
            accession_key=self.accession_key(identifiers.accession_number),
            identifiers=self.seal(identifiers, study_instance_uid) if anything else None,
            study_date=study_date,
        )


# -- the key file ------------------------------------------------------------------


def load_keys(path: Path, create: bool = False) -> IdentityKeys:
    """The keys of the secret key file at ``path``.

    With ``create`` (the embedded layout's default file), a missing file is
    created first: 32 random bytes, base64, mode 0600, atomically (two
    processes starting together end up with the same key). Without it, or when
    the file cannot be read, is readable by every user, or holds fewer than 32
    bytes: :class:`KeyFileError` with a readable message.
    """
    hint = (
        f"create it once with `umask 077; openssl rand -base64 32 > {path}` and give "
        "every pacs-ai host the same file"
    )
    if create and not path.exists():
        create_key_file(path)
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            material = fh.read(1 << 16).strip()
    except FileNotFoundError:
        raise KeyFileError(f"PACS_AI_SECRET_KEY_FILE: no such file {str(path)!r}; {hint}") from None
    except OSError as exc:
        raise KeyFileError(
            f"PACS_AI_SECRET_KEY_FILE: cannot read {str(path)!r} ({exc.strerror}); "
            "it must be readable by the pacs-ai user"
        ) from None
    if not stat.S_ISREG(mode):
        raise KeyFileError(f"PACS_AI_SECRET_KEY_FILE: {str(path)!r} is not a regular file")
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise KeyFileError(
            f"PACS_AI_SECRET_KEY_FILE: {str(path)!r} is readable or writable by every user; "
            f"`chmod 600 {path}`"
        )
    if len(material) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"PACS_AI_SECRET_KEY_FILE: {str(path)!r} holds {len(material)} bytes, "
            f"fewer than {MIN_KEY_BYTES}; {hint}"
        )
    return IdentityKeys(material)


def create_key_file(path: Path) -> None:
    """Write a new random key to ``path`` (mode 0600) unless one is there: the
    key goes into a temp file first and is hard-linked into place, so no reader
    ever sees a partial key and a concurrent creator's key is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(os.urandom(32)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- reading a header ----------------------------------------------------------------


def clean(value: Any) -> str:
    """A header value as a string without padding (multiple values joined by a
    backslash, as they were sent)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def parse_date(value: Any) -> dt.date | None:
    """A DICOM date (``YYYYMMDD``; also with ``-``, ``.`` or ``/``), else None."""
    match = _DATE.match(clean(value))
    if match is None:
        return None
    try:
        return dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None


def _header(ds: Dataset, keyword: str) -> str:
    try:
        return clean(ds.get(keyword))
    except Exception:  # noqa: BLE001 - a value that cannot be decoded counts as missing
        return ""


def header_identifiers(ds: Dataset) -> tuple[Identifiers, dt.date | None]:
    """The identifiers and the study date in a dataset (or a kept subset of it)."""
    found = Identifiers(
        patient_id=_header(ds, "PatientID"),
        issuer_of_patient_id=_header(ds, "IssuerOfPatientID"),
        accession_number=_header(ds, "AccessionNumber"),
    )
    return found, parse_date(_header(ds, "StudyDate"))


def study_identity(
    ds: Dataset, keys: IdentityKeys | None, study_instance_uid: str
) -> StudyIdentity | None:
    """What the database keeps of a received instance's study (None without keys)."""
    if keys is None:
        return None
    identifiers, study_date = header_identifiers(ds)
    return keys.identity(identifiers, study_instance_uid, study_date)


# -- admins: lookup and display --------------------------------------------------------


def reveal(keys: IdentityKeys | None, study_instance_uid: str, sealed: str | None) -> Any:
    """A study's identifiers for an admin: a dict, or None when none were kept
    (or they do not open with this key)."""
    if keys is None or not sealed:
        return None
    try:
        return keys.open(sealed, study_instance_uid).to_dict()
    except SealedValueError:
        return None


class KeyRing:
    """A process's secret key, loaded on first use and checked against the
    database (:func:`db.repo.register_key_id`): unset PACS_AI_SECRET_KEY_FILE
    means the data dir's key, created when missing (``create``)."""

    def __init__(self, path: Path, create: bool, database_url: str) -> None:
        self.path = path
        self.create = create
        self.database_url = database_url
        self._keys: IdentityKeys | None = None
        self._lock = threading.Lock()

    def get(self) -> IdentityKeys:
        """The keys; :class:`KeyFileError` when the file is missing, unfit, or not
        the key this database's identifiers were made with."""
        with self._lock:
            if self._keys is None:
                self._keys = open_keys(self.path, self.create, self.database_url)
            return self._keys


def open_keys(path: Path, create: bool, database_url: str) -> IdentityKeys:
    """:func:`load_keys`, and the key id registered in (or checked against) the database."""
    from db.repo import KeyMismatch, register_key_id
    from db.session import session_scope

    keys = load_keys(path, create)
    try:
        with session_scope(database_url) as session:
            register_key_id(session, keys.key_id)
    except KeyMismatch as exc:
        raise KeyFileError(str(exc)) from None
    return keys


def list_studies(
    session: Any,
    ring: KeyRing | None,
    *,
    accession: str | None = None,
    reveal_identifiers: bool = False,
    study_uid: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """``studies list`` and ``GET /api/studies`` for both front doors: with
    ``accession``, only the studies with that accession number (found by its
    keyed hash); with ``reveal_identifiers`` (admins only), each study's
    ``identifiers`` (patient ID, issuer, accession number; null when none were
    kept). :class:`KeyFileError` when the key is needed and unusable."""
    from db import queries

    accession_key = None
    if accession is not None:
        if ring is None:
            raise KeyFileError("no secret key: studies cannot be found by accession number")
        accession_key = ring.get().accession_key(accession)
        if accession_key is None:
            return []
    rows = queries.list_studies(
        session, limit=limit, offset=offset, study_uid=study_uid, accession_key=accession_key
    )
    if reveal_identifiers:
        sealed = queries.sealed_identifiers(session, [r["study_instance_uid"] for r in rows])
        keys = ring.get() if sealed and ring is not None else None
        for row in rows:
            uid = row["study_instance_uid"]
            row["identifiers"] = reveal(keys, uid, sealed.get(uid))
    return rows
