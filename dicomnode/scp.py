"""The DICOM listener: Verification and Storage SCP.

The C-STORE handler stays tiny: check the received bytes, move the chunked
file to its hashed final place durably, record it, and only then answer
success. Nothing heavy runs on the association thread.
"""

from __future__ import annotations

import logging
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

from db.repo import InstanceRecord, instance_exists, record_instance
from db.session import get_engine
from dicomnode import guard
from dicomnode.constants import OWN_MANUFACTURER
from dicomnode.storage import (
    DatasetTooLarge,
    MalformedDataset,
    check_structure,
    commit_file,
    prepare_storage,
    sweep_incoming,
)
from dicomnode.uids import InvalidUID, relative_instance_path, validate_uid

log = logging.getLogger(__name__)


def register_retired_storage_classes() -> None:
    """Map the retired storage SOP classes that pynetdicom still offers in its
    storage contexts (Ultrasound Image Storage (retired), NM (retired), ...) to
    the Storage service class. Without this pynetdicom accepts the context but
    aborts the whole association on the first C-STORE of such an instance,
    which old archives still send."""
    import re

    from pydicom.uid import UID
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import register_uid, uid_to_service_class

    for cx in AllStoragePresentationContexts:
        uid = str(cx.abstract_syntax)
        if uid_to_service_class(uid) is ServiceClass:
            keyword = "PacsAi" + re.sub(r"[^A-Za-z0-9]", "", UID(uid).name.title())
            register_uid(uid, keyword, StorageServiceClass)


# DICOM C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

VERIFICATION = "1.2.840.10008.1.1"

#: seconds; see StorageSCP._on_accepted
_DUL_IDLE_DELAY = 0.0001

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
_KEEP_TAGS = frozenset(_TAGS.values())


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str
    host: str
    port: int
    storage_root: Path
    database_url: str
    allowed_calling_aets: frozenset[str] = frozenset()
    max_pdu_size: int = 256 * 1024
    network_timeout: float = 60.0
    maximum_associations: int = 32
    max_associations_per_host: int = 8
    association_timeout: float = 10.0
    max_instance_bytes: int = 2 * 1024**3
    allowed_hosts: tuple[str, ...] = ()
    min_free_mb: int = 0
    #: 0 = no DICOM TLS listener; 2762 is the well-known port
    tls_port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle that client certificates must chain to (verification on)
    tls_ca: Path | None = None
    #: SO_REUSEPORT: several listener processes share the ports
    reuse_port: bool = False

    def guard_config(self, temp_dir: Path | None = None) -> guard.GuardConfig:
        return guard.GuardConfig(
            max_pdu_size=self.max_pdu_size,
            network_timeout=self.network_timeout,
            association_timeout=self.association_timeout,
            max_associations=self.maximum_associations,
            max_associations_per_host=self.max_associations_per_host,
            max_instance_bytes=self.max_instance_bytes,
            allowed_hosts=self.allowed_hosts,
            storage_root=self.storage_root,
            min_free_bytes=self.min_free_mb * 1024 * 1024,
            temp_dir=temp_dir,
            reuse_port=self.reuse_port,
        )


@dataclass
class _AssocStats:
    calling_aet: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any, limit: int) -> str | None:
    if value in (None, ""):
        return None
    return str(value)[:limit]


class ListenerObserver(Protocol):
    """Receives the listener's counts (the CLI passes worker.metrics)."""

    def record_association(self, accepted: bool) -> None: ...

    def record_instance(self, size_bytes: int, duplicate: bool) -> None: ...

    def record_cstore_failure(self, status: int) -> None: ...


class _NoObserver:
    def record_association(self, accepted: bool) -> None:
        pass

    def record_instance(self, size_bytes: int, duplicate: bool) -> None:
        pass

    def record_cstore_failure(self, status: int) -> None:
        pass


class StorageSCP:
    """A Storage + Verification SCP writing into the storage dir and database."""

    def __init__(self, config: ListenerConfig, observer: ListenerObserver | None = None) -> None:
        self.config = config
        self.observer: ListenerObserver = observer or _NoObserver()
        self._server: guard.GuardedServer | None = None
        self._tls_server: guard.GuardedServer | None = None
        self._guard: guard.ConnectionGuard | None = None
        self._temp_dir: Path | None = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()

    # -- set-up -------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = self.config.association_timeout
        ae.dimse_timeout = self.config.network_timeout
        # the guard counts established associations (pynetdicom counts idle sockets)
        ae.maximum_associations = 1_000_000
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = sorted(self.config.allowed_calling_aets)
        register_retired_storage_classes()
        contexts: list[PresentationContext] = []
        for cx in AllStoragePresentationContexts:
            contexts.append(_context(str(cx.abstract_syntax)))
        contexts.append(_context(VERIFICATION))
        ae.supported_contexts = contexts
        return ae

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self) -> guard.GuardedServer:
        """Start listening in background threads; returns the plain (or, when
        plain DICOM is off, the TLS) server."""
        cfg = self.config
        if not cfg.port and not cfg.tls_port:
            raise ValueError("both PACS_AI_PORT and PACS_AI_TLS_PORT are 0: nothing to listen on")
        incoming = prepare_storage(cfg.storage_root)
        sweep_incoming(incoming)
        self._temp_dir = incoming
        # Receive each C-STORE straight into a temp file on the storage file system
        # (flat memory for large instances; the final rename stays atomic).
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
            # pynetdicom's standard handlers format every PDU and DIMSE message
            # into log lines even when nothing would print them.
            _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom drops the whole association on a request whose UID parameter
        # it finds invalid (e.g. an overlong Affected SOP Instance UID); let every
        # request through so the handler refuses it with 0xA900 and the rest of
        # the association is still served (the handler validates every UID).
        _config.VALIDATORS["UI"] = _accept_uid
        tempfile.tempdir = str(self._temp_dir)
        guard.install()
        self._guard = guard.ConnectionGuard(cfg.guard_config(self._temp_dir))
        self._guard.start()
        ae = self._make_ae()
        try:
            if cfg.port:
                self._server = self._serve(ae, cfg.port, None)
            if cfg.tls_port:
                self._tls_server = self._serve(ae, cfg.tls_port, self._ssl_context())
        except BaseException:
            self.stop()
            raise
        log.info(
            "listening as %s on %s (plain DICOM port %s, DICOM TLS port %s), storage %s",
            cfg.ae_title,
            cfg.host,
            self.port if self._server else "off",
            self.tls_port if self._tls_server else "off",
            cfg.storage_root,
        )
        server = self._server or self._tls_server
        assert server is not None
        return server

    def _serve(self, ae: AE, port: int, ctx: ssl.SSLContext | None) -> guard.GuardedServer:
        assert self._guard is not None
        server = cast(
            guard.GuardedServer,
            ae.make_server(
                (self.config.host, port),
                ae_title=self.config.ae_title,
                contexts=ae.supported_contexts,
                ssl_context=ctx,
                evt_handlers=self.handlers(),
                server_class=guard.GuardedServer,
                guard=self._guard,
            ),
        )
        thread = threading.Thread(
            target=server.serve_forever, name=f"pacs-ai-listener-{port}", daemon=True
        )
        thread.start()
        ae._servers.append(server)
        return server

    def _ssl_context(self) -> ssl.SSLContext:
        return make_tls_context(self.config.tls_cert, self.config.tls_key, self.config.tls_ca)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int:
        if self._tls_server is None:
            return self.config.tls_port
        return int(self._tls_server.server_address[1])

    @property
    def connection_guard(self) -> guard.ConnectionGuard | None:
        return self._guard

    def stop(self) -> None:
        for attr in ("_server", "_tls_server"):
            server = getattr(self, attr)
            if server is not None:
                server.shutdown()
                setattr(self, attr, None)
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._temp_dir is not None:
            self._temp_dir = None
            sweep_incoming(self.config.storage_root / ".incoming")
            log.info("listener stopped")

    # -- handlers -----------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_accepted(self, event: evt.Event) -> None:
        # pynetdicom's DUL thread sleeps this long whenever it finds nothing to
        # do (1 ms by default), which delays every response and every PDU that
        # arrives a moment late; a shorter nap costs little CPU.
        event.assoc.dul._run_loop_delay = _DUL_IDLE_DELAY
        aet = str(event.assoc.requestor.ae_title).strip()
        with self._lock:
            self._stats[id(event.assoc)] = _AssocStats(calling_aet=aet)
        self.observer.record_association(True)
        log.info("association accepted from %s (%s)", aet, event.assoc.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        self.observer.record_association(False)
        log.warning(
            "association rejected from %s (%s)",
            str(event.assoc.requestor.ae_title).strip(),
            event.assoc.requestor.address,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        elapsed = max(time.monotonic() - stats.started, 1e-6)
        log.info(
            "association from %s %s: %d stored, %d duplicate, %d failed, %.1f MB in %.1f s",
            stats.calling_aet,
            "released" if event.event is evt.EVT_RELEASED else "aborted",
            stats.stored,
            stats.duplicates,
            stats.failed,
            stats.bytes / 1e6,
            elapsed,
        )

    def _count(self, event: evt.Event, outcome: str, size: int = 0) -> None:
        if outcome != "failed":
            self.observer.record_instance(size, duplicate=outcome == "duplicate")
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is None:
                return
            if outcome == "stored":
                stats.stored += 1
                stats.bytes += size
            elif outcome == "duplicate":
                stats.duplicates += 1
            else:
                stats.failed += 1

    def _on_store(self, event: evt.Event) -> int:
        status = self._store(event)
        if status != SUCCESS:
            self.observer.record_cstore_failure(status)
        return status

    def _store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        refused = guard.take_refusal(event.assoc, int(request.MessageID or 0))
        if refused is not None:
            status, reason = refused
            log.warning("C-STORE refused 0x%04X: %s", status, reason)
            self._count(event, "failed")
            return status
        context = event.context
        path = Path(event.dataset_path)
        affected_sop = str(request.AffectedSOPInstanceUID or "")
        # 1. Can the bytes be parsed at all?
        try:
            ds = check_structure(
                path, str(context.transfer_syntax), _KEEP_TAGS, self.config.max_instance_bytes
            )
        except DatasetTooLarge as exc:
            log.warning("C-STORE refused 0xA700: %s", exc)
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        except Exception as exc:  # any parse failure
            log.warning("C-STORE refused 0xC210: cannot parse dataset (%s)", _reason(exc))
            self._count(event, "failed")
            return CANNOT_UNDERSTAND
        # 2. Does it carry valid identifiers that match the request?
        try:
            rec = self._record_for(event, ds, path)
        except InvalidUID as exc:
            log.warning("C-STORE refused 0xA900: %s", exc)
            self._count(event, "failed")
            return DATASET_DOES_NOT_MATCH
        if rec.sop_instance_uid != affected_sop or rec.sop_class_uid != str(
            context.abstract_syntax
        ):
            log.warning(
                "C-STORE refused 0xA900: dataset SOP Class/Instance UID does not match the "
                "request (request sop=%s)",
                _safe_uid(affected_sop),
            )
            self._count(event, "failed")
            return DATASET_DOES_NOT_MATCH
        # 3. Store durably, record, then answer success: one transaction looks
        #    for a duplicate, and commits the row only after the file is durable.
        final = self.config.storage_root / rec.rel_path
        stored_here = False
        try:
            with get_engine(self.config.database_url).begin() as conn:
                if instance_exists(conn, rec.sop_instance_uid):
                    log.debug("duplicate sop=%s ignored", rec.sop_instance_uid)
                    self._count(event, "duplicate")
                    return SUCCESS
                existed = final.exists()
                try:
                    commit_file(path, self.config.storage_root, rec.rel_path)
                except OSError as exc:
                    raise _CannotStore(exc.strerror or type(exc).__name__) from exc
                stored_here = not existed
                created = record_instance(conn, rec)
        except _CannotStore as exc:
            log.error("C-STORE refused 0xA700: cannot store instance (%s)", exc)
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - database unreachable or full
            if stored_here:
                final.unlink(missing_ok=True)
            log.error(
                "C-STORE refused 0xA700: database unavailable, cannot record sop=%s (%s)",
                rec.sop_instance_uid,
                type(exc).__name__,
            )
            self._count(event, "failed")
            return OUT_OF_RESOURCES
        self._count(event, "stored" if created else "duplicate", rec.size_bytes)
        log.debug(
            "stored sop=%s series=%s study=%s bytes=%d",
            rec.sop_instance_uid,
            rec.series_instance_uid,
            rec.study_instance_uid,
            rec.size_bytes,
        )
        return SUCCESS

    def _record_for(self, event: evt.Event, ds: Dataset, path: Path) -> InstanceRecord:
        study = validate_uid(_ascii(ds, "StudyInstanceUID"), "StudyInstanceUID")
        series = validate_uid(_ascii(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
        sop = validate_uid(_ascii(ds, "SOPInstanceUID"), "SOPInstanceUID")
        sop_class = validate_uid(_ascii(ds, "SOPClassUID"), "SOPClassUID")
        return InstanceRecord(
            study_instance_uid=study,
            series_instance_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            rel_path=relative_instance_path(study, series, sop),
            size_bytes=path.stat().st_size,
            modality=_str_or_none(_ascii(ds, "Modality"), 16),
            series_number=_int_or_none(_ascii(ds, "SeriesNumber")),
            # LO: may use the dataset's character set, so pydicom decodes it
            series_description=_str_or_none(ds.get("SeriesDescription"), 64),
            body_part_examined=_str_or_none(_ascii(ds, "BodyPartExamined"), 16),
            instance_number=_int_or_none(_ascii(ds, "InstanceNumber")),
            calling_aet=str(event.assoc.requestor.ae_title).strip()[:16],
            produced_by_us=_ascii(ds, "Manufacturer") == OWN_MANUFACTURER,
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


class _CannotStore(Exception):
    """The instance's file cannot be written (disk full, permissions, ...)."""


def _context(
    abstract_syntax: str, syntaxes: Iterable[str] = TRANSFER_SYNTAXES
) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(syntaxes)
    return cx


def _accept_uid(value: object) -> tuple[bool, str]:
    return True, ""


def _safe_uid(value: str) -> str:
    try:
        return validate_uid(value, "uid")
    except InvalidUID:
        return "<invalid>"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MalformedDataset):
        return str(exc)
    return type(exc).__name__


def make_tls_context(cert: Path | None, key: Path | None, ca: Path | None) -> ssl.SSLContext:
    """A server context by the BCP 195 profile: TLS 1.2 or newer, forward-secret
    AEAD ciphers, client certificates verified against ``ca`` when one is given."""
    if cert is None or key is None:
        raise ValueError("DICOM TLS needs PACS_AI_LISTENER_TLS_CERT and PACS_AI_LISTENER_TLS_KEY")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
