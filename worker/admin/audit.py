"""The audit log: who read or changed what, when, from where, with what outcome.

One record per API request (:class:`AuditMiddleware`, registered by
:func:`worker.admin.api.create_app`) and per CLI command
(:mod:`worker.cli.audit`, called by the CLI's dispatcher), in the database's
``audit_log`` table; ``pacs-ai audit list`` reads it.

A record names

- **who**: the token's role and its index in its setting (``admin#0`` is the
  first token of ``PACS_AI_API_TOKEN``, ``read#1`` the second of
  ``PACS_AI_API_READ_TOKENS``), ``anonymous`` (no or an unknown token),
  ``local`` (no tokens configured), or the operating-system user of a command;
  never the token or its digest;
- **what**: the method and the route template (``GET /api/studies/{study_uid}``)
  with the names of the query parameters, or the command words and option
  names (``studies list --accession --json``); never a parameter's value,
  which may be an accession number;
- **which study**: the Study Instance UID(s) in the path, a ``study`` parameter
  or option, or found by an accession search;
- **when**, **from where** (the client's address, or ``cli:<user>``) and the
  **outcome** (the HTTP status, or the exit status).

Writing a record never changes the answer: a failed write is logged (a
warning, without details) and the request or command goes on. The long-running
service commands (``run``, ``listen``, ``worker``, ``api``) are not recorded as
commands (the API requests they serve are), nor ``models list``/``check``,
which read the model files only.

This module imports neither the web framework at import time nor the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from db.audit import uids, write
from db.repo import AuditEntry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: paths that read no data: liveness and the dashboard's static files
_NOT_AUDITED_PATHS = frozenset({"/healthz", "/", "/favicon.ico"})
_STATIC_PREFIX = "/static/"
_STATE_KEY = "audit_studies"


# -- the API ------------------------------------------------------------------------


def note_studies(request: Any, study_uids: Sequence[str]) -> None:
    """Let an endpoint name the studies it answered about (an accession search)."""
    request.state.audit_studies = list(study_uids)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    found = _header(scope, b"authorization")
    if not found:
        return None
    scheme, _, credentials = found.partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def _query_names(scope: Scope) -> list[str]:
    from urllib.parse import parse_qsl

    raw = bytes(scope.get("query_string") or b"").decode("latin-1")
    names = {re.sub(r"[^A-Za-z0-9_]", "", k)[:32] for k, _ in parse_qsl(raw, True)}
    return sorted(n for n in names if n)


def api_entry(scope: Scope, status: int, who: Callable[[str | None], str]) -> AuditEntry:
    """The record of one request, after its answer (``status``)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    action = f"{scope.get('method', '?')} {template or '(no such endpoint)'}"
    names = _query_names(scope)
    if names:
        action += "?" + ",".join(names)
    path_params = scope.get("path_params") or {}
    state = scope.get("state") or {}
    from urllib.parse import parse_qsl

    query = dict(parse_qsl(bytes(scope.get("query_string") or b"").decode("latin-1")))
    studies = uids(
        [path_params.get("study_uid"), query.get("study"), *(state.get(_STATE_KEY) or [])]
    )
    client = scope.get("client")
    return AuditEntry(
        interface="api",
        actor=who(_bearer(scope)),
        source=str(client[0]) if client else "unknown",
        action=action,
        outcome=int(status),
        studies=studies,
    )


class AuditMiddleware:
    """Pure ASGI middleware: one audit record per HTTP request (but ``/healthz``
    and the dashboard's static files), written after the answer was sent, off
    the event loop. ``who`` maps a presented bearer token to its audit name."""

    def __init__(self, app: ASGIApp, database_url: str, who: Callable[[str | None], str]) -> None:
        self.app = app
        self.database_url = database_url
        self.who = who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope.get("type") != "http"
            or path in _NOT_AUDITED_PATHS
            or path.startswith(_STATIC_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send(message)

        scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send_status)
        finally:
            from starlette.concurrency import run_in_threadpool

            entry = api_entry(scope, status[0], self.who)
            await run_in_threadpool(write, self.database_url, entry)
