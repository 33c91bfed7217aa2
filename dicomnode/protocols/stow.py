"""DICOMweb STOW-RS destinations: ``stow+http(s)://[user:password@]host[:port][/path][#profile]``.

The files of a batch are POSTed to ``{path}/studies/{StudyInstanceUID}`` as
``multipart/related; type="application/dicom"``, one part per file and one
request per study, asking for an ``application/dicom+json`` response. With
``user:password@`` in the URL (percent-encoded where needed) the request uses
HTTP Basic authentication, otherwise ``PACS_AI_DICOMWEB_TOKEN`` as a bearer
token when set. Credentials are never in the destination's name, its string,
a message or a log line. ``stow+https`` verifies the server against
``PACS_AI_TLS_CA_FILE`` (else the system store) and presents
``PACS_AI_TLS_CERT_FILE``/``PACS_AI_TLS_KEY_FILE`` when set.

Outcomes follow the C-STORE rules:

- 200 (any 2xx but 202): every instance sent, except one the response lists in
  its FailedSOPSequence (0008,1198);
- 202 and 409: per instance from the response: ReferencedSOPSequence
  (0008,1199) is sent; FailedSOPSequence's FailureReason (0008,1197) 0xA7xx
  is transient, 0x0111 (already there) sent, others permanent; an instance the
  response does not mention is transient after 202, permanent after 409;
- no connection, a timeout, 408, 429, 5xx: transient; 401 and 403: transient
  too (an administrator fixes the credentials, as for a rejected association),
  with a message that says so;
- 400, 404, 413, 415 and any other status: permanent.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import logging
import re
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydicom import dcmread

from dicomnode.protocols.base import (
    DEFAULT_PROFILE,
    Destination,
    SendContext,
    SendResult,
    classify_status,
    parse_profile,
    profile_text,
    redact,
    unreadable,
)

log = logging.getLogger(__name__)

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_PATH = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+;=:@%-]*)*$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_FORM = "stow+http(s)://[user:password@]host[:port][/path][#sr+seg+ki]"
#: responses are small (one item per instance); read no more than this
_MAX_RESPONSE = 4 << 20
_TRANSIENT_HTTP = frozenset({408, 429})

FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


@dataclass(frozen=True, slots=True)
class StowDestination(Destination):
    """A DICOMweb server that receives results by STOW-RS."""

    https: bool
    host: str
    port: int
    path: str  # the DICOMweb root, "" or "/dicom-web" (no trailing slash)
    profile: frozenset[str] = DEFAULT_PROFILE
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        """The key of its delivery rows: ``stow+http://host:port/path``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "stow+https" if self.https else "stow+http"
        return f"{scheme}://{host}:{self.port}{self.path}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password)

    def __str__(self) -> str:
        name = self.name.replace("://", "://***@", 1) if self.has_credentials else self.name
        return f"{name}#{profile_text(self.profile)}"

    def send(self, paths: Sequence[Path], ctx: SendContext) -> list[SendResult]:
        results: list[SendResult | None] = [None] * len(paths)
        studies: dict[str, list[_Part]] = {}
        for i, path in enumerate(paths):
            try:
                data = path.read_bytes()
                ds = dcmread(BytesIO(data), stop_before_pixels=True)
                study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
            except Exception as exc:
                results[i] = unreadable(exc)
                continue
            if not _UID.match(study_uid) or len(study_uid) > 64:
                results[i] = SendResult("permanent", "object has no valid Study Instance UID")
                continue
            studies.setdefault(study_uid, []).append(_Part(i, sop_uid, data))
        ssl_context: ssl.SSLContext | None = None
        if studies and self.https:
            try:
                ssl_context = ctx.ssl_context()
            except (OSError, ValueError) as exc:
                message = f"TLS set-up failed ({type(exc).__name__})"
                return [r or SendResult("transient", message) for r in results]
        for study_uid, parts in studies.items():
            for part, result in zip(
                parts, self._post(study_uid, parts, ctx, ssl_context), strict=True
            ):
                results[part.index] = result
        return [r or SendResult("transient", "not attempted") for r in results]

    def _authorization(self, ctx: SendContext) -> str | None:
        if self.has_credentials:
            pair = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if ctx.dicomweb_token:
            return f"Bearer {ctx.dicomweb_token}"
        return None

    def _post(
        self,
        study_uid: str,
        parts: list[_Part],
        ctx: SendContext,
        ssl_context: ssl.SSLContext | None,
    ) -> list[SendResult]:
        """One STOW-RS request for the parts of one study; a result per part."""
        boundary = uuid.uuid4().hex
        while any(boundary.encode() in p.data for p in parts):
            boundary = uuid.uuid4().hex
        body = _multipart(boundary, [p.data for p in parts])
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            "Content-Length": str(len(body)),
            "User-Agent": "pacs-ai",
        }
        authorization = self._authorization(ctx)
        if authorization:
            headers["Authorization"] = authorization
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=ctx.timeout, context=ssl_context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=ctx.timeout)
        try:
            conn.request("POST", f"{self.path}/studies/{study_uid}", body=body, headers=headers)
            rsp = conn.getresponse()
            status, reason = rsp.status, rsp.reason
            payload = rsp.read(_MAX_RESPONSE)
        except TimeoutError:
            message = f"{self.name} did not answer within {ctx.timeout:g} s"
            return [SendResult("transient", message)] * len(parts)
        except ssl.SSLError as exc:
            message = f"TLS with {self.name} failed ({type(exc).__name__})"
            return [SendResult("transient", message)] * len(parts)
        except (OSError, http.client.HTTPException) as exc:
            message = f"cannot reach {self.name} ({type(exc).__name__})"
            return [SendResult("transient", message)] * len(parts)
        finally:
            conn.close()
        log.debug(
            "STOW-RS of %d instance(s) of study %s to %s: HTTP %d",
            len(parts),
            study_uid,
            self.name,
            status,
        )
        return interpret(self.name, status, reason, payload, [p.sop_instance_uid for p in parts])


@dataclass(frozen=True, slots=True)
class _Part:
    index: int  # in the batch
    sop_instance_uid: str
    data: bytes


def _multipart(boundary: str, files: list[bytes]) -> bytes:
    chunks: list[bytes] = []
    for data in files:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data]
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def interpret(
    name: str, status: int, reason: str, payload: bytes, sop_uids: Sequence[str]
) -> list[SendResult]:
    """The result of each instance of one STOW-RS request from the HTTP status
    and, where it has one, the response's per-instance sequences."""
    said = re.sub(r"[^\x20-\x7e]", "", reason or "")[:60].strip()
    answered = f"{name} answered HTTP {status}" + (f" ({said})" if said else "")
    if status in (401, 403):
        refused = "refused our credentials" if status == 401 else "refused access"
        message = (
            f"{name} {refused} (HTTP {status}): check PACS_AI_DICOMWEB_TOKEN or the "
            "user:password of this destination in PACS_AI_DESTINATIONS"
        )
        return [SendResult("transient", message)] * len(sop_uids)
    if status in _TRANSIENT_HTTP or 500 <= status <= 599:
        return [SendResult("transient", answered)] * len(sop_uids)
    if 200 <= status <= 299 or status == 409:
        per = _per_instance(name, payload)
        if status == 202:
            default = SendResult(
                "transient", f"{answered}: the response does not confirm this instance"
            )
        elif status == 409:
            default = SendResult("permanent", answered)
        else:
            default = SendResult("sent", "")
        return [per.get(uid, default) for uid in sop_uids]
    return [SendResult("permanent", answered)] * len(sop_uids)


def _per_instance(name: str, payload: bytes) -> dict[str, SendResult]:
    """SOP Instance UID -> result, from a DICOM JSON response (nothing if none)."""
    try:
        doc: Any = json.loads(payload) if payload.strip() else None
    except ValueError:  # not JSON (XML, HTML, garbage): no per-instance detail
        return {}
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, dict):
        return {}
    out: dict[str, SendResult] = {}
    for item in _items(doc, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            out[uid] = SendResult("sent", "")
    for item in _items(doc, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if not isinstance(uid, str):
            continue
        code = _first(item, FAILURE_REASON)
        if not isinstance(code, int) or isinstance(code, bool):
            out[uid] = SendResult("permanent", f"{name} refused the instance (no FailureReason)")
            continue
        outcome = classify_status(code)
        refused = f"{name} refused the instance (FailureReason 0x{code:04X})"
        message = "" if outcome == "sent" else refused
        out[uid] = SendResult(outcome, message, code)
    return out


def _items(doc: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def parse(rest: str, *, https: bool) -> StowDestination:
    """``[user:password@]host[:port][/path][#profile]`` after ``stow+http://`` (or
    ``stow+https://`` when ``https``); errors never repeat the credentials."""
    http_scheme = "https" if https else "http"
    shown = redact(f"stow+{http_scheme}://{rest}")
    form_error = ValueError(f"destination {shown!r} is not of the form {_FORM}")
    if any(c.isspace() or c in ",\\" for c in rest):
        raise form_error
    try:
        parts = urlsplit(f"{http_scheme}://{rest}")
        port = parts.port
        host = parts.hostname or ""
    except ValueError:  # a bad port: perhaps "user:password" without "@host"
        if "@" not in rest:
            hidden = re.sub(r"(?<=://)[^/#]*", "***", shown, count=1)
            raise ValueError(f"destination {hidden!r} is not of the form {_FORM}") from None
        raise form_error from None
    if parts.query or "?" in rest.split("#", 1)[0]:
        raise ValueError(f"destination {shown!r}: a STOW-RS URL has no query string")
    if not _valid_host(host):
        raise ValueError(f"destination {shown!r}: the host is not a host name or address")
    if port == 0:
        raise ValueError(f"destination {shown!r}: port 0 is not in 1-65535")
    path = parts.path.rstrip("/")
    if not _PATH.match(path):
        raise ValueError(f"destination {shown!r}: path {path!r} has characters a URL path cannot")
    profile = parse_profile(parts.fragment if "#" in rest else None, shown)
    return StowDestination(
        https=https,
        host=host.lower(),
        port=port or (443 if https else 80),
        path=path,
        profile=profile,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def _valid_host(host: str) -> bool:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOST.match(host))
