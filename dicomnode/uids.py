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


#: The default root of the UIDs pacs-ai generates: ``2.25`` (PS3.5 B.2), followed by
#: a 128-bit number taken from a SHA-256 of what the object was derived from.
DEFAULT_UID_ROOT = "2.25"


def check_uid_root(root: str) -> str:
    """Validate a UID root for :func:`derived_uid` (leaves room for 24 digits)."""
    text = root.strip().rstrip(".")
    if text == DEFAULT_UID_ROOT:
        return text
    if not _UID.match(text) or len(text) > 39:
        raise InvalidUID(
            f"UID root {root!r} is not a UID prefix of digits and dots of at most 39 characters"
        )
    return text


def derived_uid(root: str, *parts: str) -> str:
    """A deterministic UID: the same ``parts`` under the same ``root`` always give
    the same UID, different parts give different UIDs (SHA-256).

    Under the default root ``2.25`` the suffix is a 128-bit integer (a UUID as
    PS3.5 B.2 allows); under an organisation root it fills the remaining digits.
    """
    root = check_uid_root(root)
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    number = int.from_bytes(digest, "big")
    if root == DEFAULT_UID_ROOT:
        suffix = number >> 128  # 128 bits, as a UUID
    else:
        room = 64 - len(root) - 1
        suffix = number % (10**room)
    return f"{root}.{suffix or 1}"
