"""STOW-RS in: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

A client (an archive, a gateway, ``curl``) stores instances over HTTP with the
guarantees of C-STORE. Each part of a ``multipart/related;
type="application/dicom"`` body streams into a temp file in the storage's
incoming folder (never whole into memory; at most ``PACS_AI_MAX_INSTANCE_BYTES``
a part, ``PACS_AI_STOW_MAX_REQUEST_BYTES`` and :data:`MAX_PARTS` a request) and
goes through :class:`dicomnode.ingest.IngestService`, the listener's own
store-and-record step: durable and recorded before the answer, a known instance
stored once, hostile UIDs and unparseable data refused, nothing below the
free-space watermark. Instances are recorded with the calling AE title
``STOW-RS``; the client's address is logged. The study assembler finds them in
the database like any other.

The answer is PS3.18's Store Instances Response (``application/dicom+json``):
``ReferencedSOPSequence`` for the stored parts, ``FailedSOPSequence`` with a
``FailureReason`` (the status C-STORE would answer) for the others; HTTP 200
when all were stored, 202 when some failed, 409 when all failed, 400 for a
malformed body, 415 for another media type.

Access: an admin API token or a STOW-RS token (``PACS_AI_STOW_TOKENS``); 401
without one, 403 for a read-only token. With no token configured at all (a
loopback-only API) anyone who can reach the API may store.

This module parses HTTP and formats the answer; it never imports the pipeline.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.
import contextlib
import email.message
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicomnode.identity import KeyRing
from dicomnode.ingest import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    IngestService,
    Outcome,
    Problem,
    Source,
)
from dicomnode.storage import read_file_meta, sweep_incoming, temp_prefix
from dicomnode.uids import InvalidUID, validate_uid
from worker import metrics
from worker.admin.tokens import TokenCheck
from worker.scheduling.doorbell import Bell, bell_address
from worker.settings import Settings

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
#: recorded as the calling AE title of instances stored over STOW-RS
CALLING_AET = "STOW-RS"
#: parts in one request (each is a database transaction and an answer item)
MAX_PARTS = 10_000
#: the header block of one part
MAX_PART_HEADER_BYTES = 16 * 1024

# PS3.18 Store Instances Response, in the DICOM JSON model (PS3.18 F.2)
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


# -- multipart/related, incrementally --------------------------------------------------


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (RFC 2046)."""


@dataclass(frozen=True, slots=True)
class PartStart:
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class PartData:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


class MultipartReader:
    """Feed it the body in chunks of any size; it answers the events they
    complete. It holds at most a chunk, a delimiter and one part's header block."""

    def __init__(self, boundary: str, max_header_bytes: int = MAX_PART_HEADER_BYTES) -> None:
        self._delimiter = b"\r\n--" + boundary.encode("ascii")
        # a CRLF in front, so the first delimiter (at the very start) is found alike
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"
        self._max_header = max_header_bytes

    @property
    def done(self) -> bool:
        return self._state == "epilogue"

    def feed(self, data: bytes) -> list[Event]:
        if self._state == "epilogue":
            return []  # the epilogue is ignored
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """The body ended: raise :class:`MultipartError` unless its close-delimiter came."""
        if self._state != "epilogue":
            raise MultipartError("the body ends before its closing boundary")

    def _step(self, events: list[Event]) -> bool:
        buf, delim = self._buf, self._delimiter
        if self._state == "preamble":
            at = buf.find(delim)
            if at < 0:
                del buf[: max(0, len(buf) - len(delim) + 1)]
                return False
            del buf[: at + len(delim)]
            self._state = "boundary"
            return True
        if self._state == "boundary":
            # after a delimiter: "--" ends the body, else padding and CRLF start a part
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self._state = "epilogue"
                buf.clear()
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise MultipartError("a boundary line is not followed by CRLF")
                return False
            if buf[:end].strip(b" \t"):
                raise MultipartError("a boundary is followed by other characters")
            del buf[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buf[:2] == b"\r\n":  # a part without headers
                del buf[:2]
                events.append(PartStart({}))
                self._state = "body"
                return True
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_header:
                    raise MultipartError(f"a part's headers are longer than {self._max_header}")
                return False
            if end > self._max_header:
                raise MultipartError(f"a part's headers are longer than {self._max_header}")
            events.append(PartStart(_parse_headers(bytes(buf[:end]))))
            del buf[: end + 4]
            self._state = "body"
            return True
        if self._state == "body":
            at = buf.find(delim)
            if at < 0:
                keep = len(delim) - 1  # the start of a delimiter may end this chunk
                if len(buf) > keep:
                    events.append(PartData(bytes(buf[: len(buf) - keep])))
                    del buf[: len(buf) - keep]
                return False
            if at:
                events.append(PartData(bytes(buf[:at])))
            events.append(PartEnd())
            del buf[: at + len(delim)]
            self._state = "boundary"
            return True
        return False


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:  # folded (obsolete, still legal in MIME)
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not _HEADER_NAME.match(name):
            raise MultipartError("a part has a malformed header line")
        headers.setdefault(name.lower(), value.strip())
    return headers


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and the parameters of a Content-Type value
    (quoted strings unquoted; names in lower case)."""
    msg = email.message.Message()
    msg["content-type"] = value
    media = value.split(";", 1)[0].strip().lower()
    params: dict[str, str] = {}
    for name, param in msg.get_params(failobj=[])[1:]:
        if isinstance(param, str):
            params.setdefault(name.lower(), param)
    return media, params


def check_request_type(value: str) -> str:
    """The boundary of a STOW-RS body's Content-Type; :class:`HTTPException`
    415 for another media type, 400 for a missing or malformed boundary."""
    media, params = media_type(value)
    accepted = f'multipart/related; type="{DICOM}"; boundary=...'
    if media != "multipart/related":
        raise HTTPException(415, f"Content-Type {media or '(none)'!r} is not supported: {accepted}")
    kind = params.get("type", DICOM).strip().lower()
    if kind != DICOM:
        raise HTTPException(415, f"multipart/related of type {kind!r} is not supported: {accepted}")
    boundary = params.get("boundary", "")
    if not _BOUNDARY.match(boundary):
        raise HTTPException(400, "the Content-Type has no valid boundary parameter (RFC 2046)")
    return boundary


# -- the answer -------------------------------------------------------------------------


def _uid(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def store_response(outcomes: Iterable[Outcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and PS3.18 Store Instances Response of these outcomes."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for outcome in outcomes:
        item = {
            REFERENCED_SOP_CLASS_UID: _uid(outcome.sop_class_uid),
            REFERENCED_SOP_INSTANCE_UID: _uid(outcome.sop_instance_uid),
        }
        if outcome.ok:
            referenced.append(item)
        else:
            item[FAILURE_REASON] = {"vr": "US", "Value": [outcome.status]}
            failed.append(item)
    body: dict[str, Any] = {RETRIEVE_URL: {"vr": "UR"}}  # no WADO-RS here
    if referenced:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else 202 if referenced else 409
    return status, body


# -- one request ------------------------------------------------------------------------


@dataclass
class _Upload:
    """The parts of one request as they stream in."""

    service: IngestService
    source: Source
    study: str | None
    outcomes: list[Outcome] = field(default_factory=list)
    parts: int = 0
    _fh: IO[bytes] | None = None
    _path: Path | None = None
    _size: int = 0
    _refused: Outcome | None = None

    def start(self, headers: dict[str, str]) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise HTTPException(413, f"more than {MAX_PARTS} parts in one request")
        self._size, self._refused = 0, None
        part_type = headers.get("content-type")
        if part_type is not None and media_type(part_type)[0] != DICOM:
            self._refused = self.service.refuse(
                self.source,
                CANNOT_UNDERSTAND,
                Problem.UNPARSEABLE,
                f"part {self.parts} is not {DICOM}",
            )
            return
        if not self.service.has_room():  # as C-STORE: nothing of it is written
            self._refused = self.service.refuse(
                self.source, OUT_OF_RESOURCES, Problem.NO_SPACE, "storage below PACS_AI_MIN_FREE_MB"
            )
            return
        try:
            fd, name = tempfile.mkstemp(
                prefix=temp_prefix("rx"), suffix=".part", dir=self.service.incoming
            )
        except OSError as exc:
            self._fail_write(exc)
            return
        self._path = Path(name)
        self._fh = os.fdopen(fd, "wb")

    def data(self, data: bytes) -> None:
        if self._fh is None:
            return  # refused: the rest of the part is read and dropped
        room = self.service.max_instance_bytes - self._size
        self._size += len(data)
        try:
            self._fh.write(data[: max(room, 0)] if len(data) > room else data)
        except OSError as exc:
            self._fail_write(exc)
            return
        if len(data) > room:
            self._too_large()

    async def end(self) -> Outcome:
        if self._fh is None or self._path is None:
            outcome = self._refused or Outcome("failed", OUT_OF_RESOURCES)
        else:
            path = self._path
            try:
                self._fh.close()
                self._fh = None
                outcome = await run_in_threadpool(
                    self.service.ingest_part10, path, self.source, self.study
                )
            except OSError as exc:
                self._fail_write(exc)
                outcome = self._refused or Outcome("failed", OUT_OF_RESOURCES)
            finally:
                self.discard()
        self.outcomes.append(outcome)
        if outcome.ok:
            metrics.record_instance(outcome.size_bytes, duplicate=outcome.result == "duplicate")
        return outcome

    def discard(self) -> None:
        """Close and remove the part's temp file (stored ones moved away already)."""
        fh, path = self._fh, self._path
        self._fh = self._path = None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _too_large(self) -> None:
        # name the instance in the answer if its file meta arrived
        seen = Outcome("refused")
        if self._fh is not None and self._path is not None:
            with contextlib.suppress(Exception):
                self._fh.flush()
                meta = read_file_meta(self._path)
                seen = Outcome(
                    "refused",
                    sop_class_uid=_valid(meta.sop_class_uid),
                    sop_instance_uid=_valid(meta.sop_instance_uid),
                )
        self.discard()
        self._refused = self.service.refuse(
            self.source,
            OUT_OF_RESOURCES,
            Problem.TOO_LARGE,
            f"instance larger than PACS_AI_MAX_INSTANCE_BYTES ({self.service.max_instance_bytes})",
            seen,
        )

    def _fail_write(self, exc: OSError) -> None:
        self.discard()
        self._refused = self.service.refuse(
            self.source,
            OUT_OF_RESOURCES,
            Problem.CANNOT_STORE,
            f"cannot write the part ({exc.strerror or type(exc).__name__})",
            result="failed",
            level=logging.ERROR,
        )


def _valid(value: str | None) -> str | None:
    try:
        return validate_uid(value, "uid")
    except InvalidUID:
        return None


async def _chunks(request: Request, idle_timeout: float) -> AsyncGenerator[bytes, None]:
    """The body as it arrives; TimeoutError when nothing came for ``idle_timeout``."""
    stream = request.stream().__aiter__()
    while True:
        with anyio.fail_after(idle_timeout):
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
        if chunk:
            yield chunk


# -- the routes -------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="an admin token or a STOW-RS token")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored (or stored before)"},
    202: {"description": "some instances stored, the others in FailedSOPSequence"},
    400: {"description": "a malformed multipart body, or an invalid study UID in the URL"},
    401: {"description": "no valid token"},
    403: {"description": "a read-only token"},
    409: {"description": "no instance stored; each in FailedSOPSequence"},
    413: {"description": "more than PACS_AI_STOW_MAX_REQUEST_BYTES or too many parts"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
}


def stow_router(settings: Settings, tokens: TokenCheck) -> APIRouter:
    """The STOW-RS routes; ``tokens`` are the API's (an admin token may store)."""
    router = APIRouter(tags=["dicomweb"])
    stow_tokens = TokenCheck(settings.stow_token_list, ())
    lock = threading.Lock()
    holder: list[IngestService] = []
    key_ring = KeyRing(
        settings.secret_key_path, settings.secret_key_is_default, settings.effective_database_url
    )
    # wakes the scheduler when instances were stored (worker/scheduling/doorbell.py)
    bell = Bell(bell_address(settings.data_path))

    def service() -> IngestService:
        with lock:
            if not holder:
                made = IngestService(
                    settings.storage_path,
                    settings.effective_database_url,
                    settings.max_instance_bytes,
                    settings.min_free_mb,
                    identity_keys=key_ring.get(),  # patient link, as the listener records it
                )
                sweep_incoming(made.incoming)  # what a killed API process left
                holder.append(made)
            return holder[0]

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if not tokens.enabled and not stow_tokens.enabled:
            return  # no token anywhere: a loopback-only API (check_bind)
        presented = credentials.credentials if credentials else None
        role = tokens.role(presented) if tokens.enabled else None
        if role == "admin" or (stow_tokens.enabled and stow_tokens.role(presented) == "admin"):
            return
        if role == "read":
            raise HTTPException(403, "storing instances needs an admin or a STOW-RS token")
        raise HTTPException(
            401,
            "a valid bearer token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def store(request: Request, study: str | None) -> Response:
        if study is not None:
            try:
                study = validate_uid(study, "StudyInstanceUID")
            except InvalidUID as exc:
                raise HTTPException(400, f"the URL's {exc}") from None
        boundary = check_request_type(request.headers.get("content-type", ""))
        limit = settings.stow_max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body is larger than {limit} bytes")
        peer = request.client.host if request.client else "?"
        upload = _Upload(service(), Source("STOW-RS", CALLING_AET), study)
        reader = MultipartReader(boundary)
        started = time.monotonic()
        received = 0
        try:
            async with contextlib.aclosing(_chunks(request, settings.network_timeout)) as chunks:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > limit:
                        raise HTTPException(413, f"the body is larger than {limit} bytes")
                    for event in reader.feed(chunk):
                        if isinstance(event, PartStart):
                            upload.start(event.headers)
                        elif isinstance(event, PartData):
                            upload.data(event.data)
                        else:
                            await upload.end()
                    if reader.done:
                        break
            reader.close()
        except MultipartError as exc:
            _log_end(peer, upload, started, f"malformed body ({exc})")
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        except TimeoutError:
            _log_end(peer, upload, started, "no data for PACS_AI_NETWORK_TIMEOUT")
            raise HTTPException(408, "the body did not arrive in time") from None
        except ClientDisconnect:
            _log_end(peer, upload, started, "client went away")
            raise HTTPException(400, "the client went away") from None
        except HTTPException as exc:
            _log_end(peer, upload, started, str(exc.detail))
            raise
        finally:
            upload.discard()
        if not upload.outcomes:
            _log_end(peer, upload, started, "no parts")
            raise HTTPException(400, "the multipart body holds no parts")
        if any(o.result == "stored" for o in upload.outcomes):
            bell.ring()  # the scheduler looks at the study now, not on its next tick
        status, body = store_response(upload.outcomes)
        _log_end(peer, upload, started, f"answered {status}")
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)

    @router.post(
        "/dicomweb/studies",
        summary="STOW-RS: store instances (admin or STOW-RS token)",
        responses=_RESPONSES,
        dependencies=[Depends(authorize)],
    )
    async def store_instances(request: Request) -> Response:
        return await store(request, None)

    @router.post(
        "/dicomweb/studies/{study}",
        summary="STOW-RS: store instances of this study (admin or STOW-RS token)",
        responses=_RESPONSES,
        dependencies=[Depends(authorize)],
    )
    async def store_study_instances(study: str, request: Request) -> Response:
        return await store(request, study)

    return router


def _log_end(peer: str, upload: _Upload, started: float, how: str) -> None:
    counts = {"stored": 0, "duplicate": 0}
    for outcome in upload.outcomes:
        if outcome.result in counts:
            counts[outcome.result] += 1
    failed = len(upload.outcomes) - counts["stored"] - counts["duplicate"]
    size = sum(o.size_bytes for o in upload.outcomes if o.result == "stored")
    log.info(
        "STOW-RS from %s%s: %d stored, %d duplicate, %d failed, %.1f MB in %.1f s; %s",
        peer,
        f" study={upload.study}" if upload.study else "",
        counts["stored"],
        counts["duplicate"],
        failed,
        size / 1e6,
        time.monotonic() - started,
        how,
    )
