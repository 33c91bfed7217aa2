"""UID validation and the hashed storage layout derived from it."""

from __future__ import annotations

import hashlib
import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class InvalidUID(ValueError):
    """A UID is missing, too long or not of the DICOM form."""


def validate_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`InvalidUID`.

    A UID is at most 64 characters of digit components separated by dots,
    without leading zeros (PS3.5 9.1). Anything else (``../../etc/x``,
    overlong or non-numeric values) is refused.
    """
    if value is None:
        raise InvalidUID(f"{name} is missing")
    text = str(value).rstrip("\x00").strip()
    if not text:
        raise InvalidUID(f"{name} is empty")
    if len(text) > 64:
        raise InvalidUID(f"{name} is longer than 64 characters")
    if not _UID.match(text):
        raise InvalidUID(f"{name} is not a valid UID (digits and dots only)")
    return text


def uid_digest(uid: str) -> str:
    return hashlib.sha256(uid.encode("ascii")).hexdigest()


def relative_instance_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Storage path of an instance, relative to the storage root.

    Built only from hashes of validated UIDs, so no dataset value ever
    becomes a path component.
    """
    for uid, name in (
        (study_uid, "StudyInstanceUID"),
        (series_uid, "SeriesInstanceUID"),
        (sop_uid, "SOPInstanceUID"),
    ):
        validate_uid(uid, name)
    study = uid_digest(study_uid)
    return f"{study[:2]}/{study[:32]}/{uid_digest(series_uid)[:32]}/{uid_digest(sop_uid)}.dcm"
