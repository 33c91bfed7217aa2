"""Appending audit records (``audit_log``), each in a transaction of its own.

Shared by the API's middleware (:mod:`worker.admin.audit`) and the CLI's
dispatcher (:mod:`worker.cli.audit`). Writing a record never changes the
outcome of what it records: a failure is logged, without details.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from db.repo import AuditEntry, append_audit
from db.session import session_scope

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9.]{1,64}$")


def write(database_url: str, entry: AuditEntry, level: int = logging.WARNING) -> bool:
    """Append one record; False (logged at ``level``) when it could not be written."""
    try:
        with session_scope(database_url) as session:
            append_audit(session, entry)
    except Exception as exc:  # noqa: BLE001 - auditing never changes the outcome
        log.log(level, "audit record not written (%s)", type(exc).__name__)
        return False
    return True


def uids(values: Sequence[object]) -> tuple[str, ...]:
    """The values that look like UIDs (digits and dots), each once, in order:
    what a record keeps of the studies a request or command named."""
    out: list[str] = []
    for value in values:
        text = str(value or "").strip()
        if _UID.match(text) and text not in out:
            out.append(text)
    return tuple(out)
