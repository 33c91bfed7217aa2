"""Browser-facing guards of the admin API, with or without tokens.

- **Host allow-list** (DNS rebinding): a request whose ``Host`` header names
  none of the allowed hosts is answered 421 before it reaches any endpoint.
  Always allowed: the loopback names (``localhost``, ``127.0.0.1``, ``::1``) and
  ``PACS_AI_API_HOST`` (for a wildcard bind, ``0.0.0.0`` or ``::``, also this
  machine's host names and their addresses); ``PACS_AI_API_ALLOWED_HOSTS`` adds
  names (``*.example.org`` for subdomains, ``*`` turns the check off). Any port.
- **Cross-site writes** (CSRF): a state-changing request (any method but GET,
  HEAD, OPTIONS) needs ``Content-Type: application/json`` and a JSON object as
  its body, which a cross-site HTML form or a "simple" ``fetch`` cannot send
  without a CORS preflight (which this API never grants); an ``Origin`` header,
  when sent, must name this API's own host and port, and a browser's
  ``Sec-Fetch-Site`` must not say ``cross-site`` or ``same-site``. Refused: 403.
- **DICOM uploads** (STOW-RS, ``POST /dicomweb/studies[/{study}]``): their body
  is DICOM, not JSON, and streams to the endpoint unread. They are exempt from
  the JSON rule only with an ``Authorization: Bearer`` header, which no
  cross-site form or "simple" request can carry (a browser preflights it, and
  CORS is never granted); the ``Origin`` and ``Sec-Fetch-Site`` checks still
  apply, and the endpoint checks the token and the media type itself.

A plain ASGI middleware (:class:`WebGuard`): it owns these header checks only
and imports nothing from the database, the broker or the pipeline.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # noqa: S104 - names, not a bind
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: the largest body a write endpoint takes (they need at most a small JSON object)
MAX_BODY_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: the STOW-RS endpoints (worker/admin/stow_rs.py): bodies of DICOM, not JSON
BEARER_UPLOAD_PATH = re.compile(r"/dicomweb/studies(/[^/]+)?/?")


def _normalize(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def split_host(value: str) -> tuple[str, int | None] | None:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port); None if malformed."""
    value = value.strip()
    if not value or any(c.isspace() or c in "/@?#\\" for c in value):
        return None
    port_text = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:  # a bare IPv6 address (not valid in Host, but unambiguous)
        host = value
    else:
        host = value
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    host = _normalize(host)
    if not host:
        return None
    return host, port


@dataclass(frozen=True)
class HostAllowList:
    """Host names and addresses the API answers to (any port)."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()
    any_host: bool = False

    @classmethod
    def of(cls, entries: Iterable[str]) -> HostAllowList:
        names: set[str] = set()
        suffixes: list[str] = []
        any_host = False
        for entry in entries:
            item = _normalize(entry)
            if item == "*":
                any_host = True
            elif item.startswith("*."):
                suffixes.append(item[1:])  # ".example.org"
            elif item:
                names.add(item)
        return cls(frozenset(names), tuple(suffixes), any_host)

    def allows(self, host: str) -> bool:
        host = _normalize(host)
        return self.any_host or host in self.names or any(host.endswith(s) for s in self.suffixes)


def _local_names() -> set[str]:
    """This machine's host names and their addresses (for a wildcard bind)."""
    names: set[str] = set()
    try:
        for name in {socket.gethostname(), socket.getfqdn()}:
            if not name:
                continue
            names.add(name)
            for info in socket.getaddrinfo(name, None):
                names.add(str(info[4][0]))
    except OSError:
        pass
    return names


def allowed_hosts(api_host: str, extra: Iterable[str] = ()) -> HostAllowList:
    """The loopback names, the bind address (for a wildcard bind: this machine's
    names and addresses) and ``extra`` (``PACS_AI_API_ALLOWED_HOSTS``)."""
    entries = [*LOOPBACK_NAMES, api_host, *extra]
    if _normalize(api_host) in WILDCARD_BINDS:
        entries += sorted(_local_names())
    return HostAllowList.of(entries)


def same_origin(origin: str, host: tuple[str, int | None]) -> bool:
    """Whether an ``Origin`` header names the host (and port) the request was sent to."""
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return False  # "null" (sandboxed or opaque origins) and anything odd
    if parts.path not in ("", "/") or parts.query or parts.username:
        return False
    default = _DEFAULT_PORTS[parts.scheme]
    host_name, host_port = host
    return _normalize(parts.hostname) == host_name and (origin_port or default) == (
        host_port or default
    )


class _Refused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def is_bearer_upload(method: str, path: str, headers: dict[str, str]) -> bool:
    """A STOW-RS upload with a bearer token: not CSRF-able, its body is not JSON."""
    return (
        method == "POST"
        and BEARER_UPLOAD_PATH.fullmatch(path) is not None
        and headers.get("authorization", "")[:7].lower() == "bearer "
    )


def check_write(
    headers: dict[str, str], host: tuple[str, int | None], json_body: bool = True
) -> None:
    """The header checks of a state-changing request; raises :class:`_Refused`.
    ``json_body=False`` (a bearer upload) skips the JSON media type only."""
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, host):
        raise _Refused(403, "cross-origin request refused: Origin does not match Host")
    if headers.get("sec-fetch-site", "").lower() in {"cross-site", "same-site"}:
        raise _Refused(403, "cross-site request refused (Sec-Fetch-Site)")
    if not json_body:
        return
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise _Refused(
            403, "a write request needs a JSON body with Content-Type: application/json, e.g. {}"
        )


class WebGuard:
    """ASGI middleware: the Host allow-list for every request, and the cross-site
    checks (headers, then a JSON object body) for every state-changing one."""

    def __init__(self, app: ASGIApp, allowed: HostAllowList) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            name = key.decode("latin-1").lower()
            if name not in headers:  # the first of repeated headers
                headers[name] = value.decode("latin-1")
        raw_host = headers.get("host", "")
        host = split_host(raw_host)
        if host is None or not self.allowed.allows(host[0]):
            log.warning(
                "refused %s %s: Host %r is not allowed (PACS_AI_API_ALLOWED_HOSTS)",
                scope.get("method"),
                scope.get("path"),
                raw_host[:100],
            )
            await _answer(
                send,
                421 if host is not None else 400,
                "this Host is not allowed; add it to PACS_AI_API_ALLOWED_HOSTS",
            )
            return
        if scope.get("method", "GET").upper() in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        upload = is_bearer_upload(scope.get("method", ""), scope.get("path", ""), headers)
        try:
            check_write(headers, host, json_body=not upload)
            body = b"" if upload else await _read_body(receive)
        except _Refused as refused:
            log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), refused.detail)
            await _answer(send, refused.status, refused.detail)
            return
        await self.app(scope, receive if upload else _replay(body, receive), send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "the client went away")
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Refused(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        parsed = json.loads(body)
    except ValueError:
        raise _Refused(400, "the body is not JSON; send a JSON object, e.g. {}") from None
    if not isinstance(parsed, dict):
        raise _Refused(400, "the body must be a JSON object, e.g. {}")
    return body


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
