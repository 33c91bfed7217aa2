"""Bearer tokens of the API and the STOW-RS endpoint: which role a presented
token has, and who it is for the audit log (never the token itself).

A configured token is either the token or ``sha256:<hex digest>``; presented
tokens are compared by SHA-256 digest in constant time per configured token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

Role = Literal["read", "admin"]

__all__ = ["Role", "TokenCheck", "token_digest"]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _stored_digest(entry: str) -> str:
    return entry.removeprefix("sha256:") if entry.startswith("sha256:") else token_digest(entry)


class TokenCheck:
    """Maps a presented bearer token to its role (compares SHA-256 digests)."""

    def __init__(self, admin: tuple[str, ...], read: tuple[str, ...]) -> None:
        self._digests: list[tuple[str, Role]] = [(_stored_digest(t), "admin") for t in admin]
        self._digests += [(_stored_digest(t), "read") for t in read]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def role(self, presented: str | None) -> Role | None:
        if not self.enabled:
            return "admin"
        if not presented:
            return None
        digest = token_digest(presented)
        found: Role | None = None
        for stored, role in self._digests:  # no early exit: same time for every token
            if hmac.compare_digest(stored, digest) and found != "admin":
                found = role
        return found

    def name(self, presented: str | None) -> str:
        """Who presented ``presented``, for the audit log: the role and the token's
        index in its setting (``admin#0``, ``read#1``), ``anonymous`` for no or an
        unknown token, ``local`` with no token configured; never the token."""
        if not self.enabled:
            return "local"
        if not presented:
            return "anonymous"
        digest = token_digest(presented)
        found, seen = "anonymous", {"admin": 0, "read": 0}
        for stored, role in self._digests:  # no early exit: same time for every token
            if hmac.compare_digest(stored, digest) and not found.startswith("admin"):
                found = f"{role}#{seen[role]}"
            seen[role] += 1
        return found
