"""The DICOM listener: Verification and Storage SCP.

The C-STORE handler stays tiny: it hands the chunked file pynetdicom received
to :class:`dicomnode.ingest.IngestService` (the same store-and-record step as
STOW-RS: check the bytes, move the file to its hashed final place durably,
record it) and answers with the outcome's status, success only once the
instance is durable and recorded. Nothing heavy runs on the association thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext

from dicomnode import guard
from dicomnode.identity import IdentityKeys
from dicomnode.ingest import (  # the statuses: re-exported for the listener's users
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    TRANSFER_SYNTAXES,
    Expected,
    IngestService,
    Source,
)
from dicomnode.storage import prepare_storage, sweep_incoming

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


VERIFICATION = "1.2.840.10008.1.1"

#: seconds; see StorageSCP._on_accepted
_DUL_IDLE_DELAY = 0.0001


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
    #: several listener processes accept on the same listening sockets
    shared_accept: bool = False
    #: listening sockets (file descriptors) made by the first listener process
    #: and inherited by this one: used instead of binding ``port``/``tls_port``
    plain_fd: int | None = None
    tls_fd: int | None = None
    #: patient linkage and identifiers at rest (dicomnode/identity.py); None: none recorded
    identity_keys: IdentityKeys | None = None

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
            shared_accept=self.shared_accept,
        )


@dataclass
class _AssocStats:
    calling_aet: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)


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
        self._ingest = IngestService(
            config.storage_root,
            config.database_url,
            config.max_instance_bytes,
            config.min_free_mb,
            identity_keys=config.identity_keys,
        )

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
                self._server = self._serve(ae, cfg.port, None, cfg.plain_fd)
            if cfg.tls_port:
                self._tls_server = self._serve(ae, cfg.tls_port, self._ssl_context(), cfg.tls_fd)
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

    def _serve(
        self, ae: AE, port: int, ctx: ssl.SSLContext | None, fd: int | None
    ) -> guard.GuardedServer:
        assert self._guard is not None
        inherited = socket.socket(fileno=fd) if fd is not None else None
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
                inherited=inherited,
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

    def listening_fds(self) -> dict[str, int]:
        """The listening sockets' descriptors (``plain``, ``tls``), for the other
        listener processes to accept on (shared accept)."""
        return {
            name: server.socket.fileno()
            for name, server in (("plain", self._server), ("tls", self._tls_server))
            if server is not None and server.socket is not None
        }

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
        source = Source("C-STORE", str(event.assoc.requestor.ae_title).strip())
        refused = guard.take_refusal(event.assoc, int(request.MessageID or 0))
        if refused is not None:
            status, reason = refused
            log.warning("C-STORE refused 0x%04X: %s", status, reason)
            self._count(event, "failed")
            return status
        context = event.context
        outcome = self._ingest.ingest_file(
            Path(event.dataset_path),
            str(context.transfer_syntax),
            source,
            Expected(
                sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                sop_class_uid=str(context.abstract_syntax),
            ),
        )
        if not outcome.ok:
            self._count(event, "failed")
            return outcome.status
        self._count(event, outcome.result, outcome.size_bytes)
        return SUCCESS


def _context(
    abstract_syntax: str, syntaxes: Iterable[str] = TRANSFER_SYNTAXES
) -> PresentationContext:
    cx = PresentationContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(syntaxes)
    return cx


def _accept_uid(value: object) -> tuple[bool, str]:
    return True, ""


__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_DOES_NOT_MATCH",
    "OUT_OF_RESOURCES",
    "SUCCESS",
    "TRANSFER_SYNTAXES",
    "ListenerConfig",
    "StorageSCP",
    "make_tls_context",
    "register_retired_storage_classes",
]


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
