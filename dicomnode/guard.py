"""The listener's defences on a hospital network: who may connect, how many,
how long they may take, and how much memory and disk a peer can make us use.

pynetdicom trusts its peer: it reads whatever length a PDU header declares into
memory, keeps a command set or a non-C-STORE data set growing in memory for as
long as fragments arrive, restarts its socket timeout on every byte, counts
idle TCP connections against the association limit, does the TLS handshake on
the thread that accepts connections, and aborts the association when the temp
file of a C-STORE cannot be written. This module closes each of those holes
around pynetdicom, for the acceptor side only:

- :class:`ConnectionGuard`: allow-list by address at TCP accept, per-address
  and global caps, a deadline for association set-up from TCP accept (a reaper
  thread cuts late ones), and the established-association limit (a DICOM
  A-ASSOCIATE-RJ "local limit exceeded", transient).
- :func:`read_pdu`: every PDU is length-checked before its body is read
  (A-ASSOCIATE-RQ at most 1 MiB, P-DATA-TF at most what we advertised) and must
  arrive in full within the network timeout (a trickle does not restart it).
- :func:`decode_msg`: bounded command sets and in-memory data sets; a C-STORE
  data set goes to a temp file in this process's own incoming folder, with the
  maximum instance size and the free-space watermark enforced while it arrives.
  A refused C-STORE keeps reading (nothing is written) and is answered with a
  failure status, never an abort; its partial file is removed.

The listener process installs it (``dicomnode.scp``); nothing else imports it.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom.uid import UID
from pynetdicom import dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.reactor import make_event_driven

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: An A-ASSOCIATE-RQ proposing every storage class with a dozen transfer syntaxes
#: is about 80 KB; nothing legitimate comes near this.
MAX_ASSOCIATE_RQ_BYTES = 1 * MiB
#: A-RELEASE, A-ABORT and anything else that is not P-DATA or A-ASSOCIATE-RQ.
MAX_OTHER_PDU_BYTES = 64 * 1024
#: The command set of one DIMSE message (a few hundred bytes in practice).
MAX_COMMAND_BYTES = 64 * 1024
#: Data sets of messages other than C-STORE (C-FIND identifiers and the like)
#: are kept in memory by pynetdicom; we serve none of them, so keep them small.
MAX_INMEMORY_DATASET_BYTES = 1 * MiB
#: Slack over the advertised maximum PDU length that a P-DATA-TF may have
#: (implementations differ on whether the PDV headers count).
_PDU_SLACK = 64

# C-STORE failure statuses set while the data set arrives (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class GuardConfig:
    """The limits one listener enforces. Built from the settings by the CLI."""

    max_pdu_size: int = 256 * 1024
    network_timeout: float = 60.0
    association_timeout: float = 10.0
    max_associations: int = 32
    max_associations_per_host: int = 8
    max_instance_bytes: int = 2 * 1024**3
    allowed_hosts: tuple[str, ...] = ()
    #: storage root whose free space is checked against ``min_free_bytes``
    storage_root: Path | None = None
    min_free_bytes: int = 0
    #: where C-STORE data sets are received (the storage's incoming folder)
    temp_dir: Path | None = None
    #: the listening socket is shared with other listener processes: accept
    #: without blocking, and leave a new connection to a less busy process
    shared_accept: bool = False

    @property
    def max_pending_per_host(self) -> int:
        return max(2, self.max_associations_per_host)

    @property
    def max_pending(self) -> int:
        return max(64, 2 * self.max_associations)


def parse_networks(
    entries: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses and CIDRs (``10.0.0.0/8``, ``192.168.1.20``, ``fd00::/8``).

    Raises :class:`ValueError` naming the entry that is neither."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for entry in entries:
        item = entry.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address or CIDR (for example 10.1.2.3 or 10.1.0.0/16)"
            ) from None
    return tuple(nets)


def normalise_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# -- connections ----------------------------------------------------------------


@dataclass(eq=False)
class Connection:
    host: str
    sock: socket.socket
    accepted: float = field(default_factory=time.monotonic)
    established: bool = False
    closed: bool = False

    def cut(self) -> None:
        """Shut the socket down from another thread; a blocked recv returns."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            # the plain socket method also works on an SSLSocket mid-handshake
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class ConnectionGuard:
    """Counts connections per address; admits, evicts, and reaps late ones."""

    def __init__(self, config: GuardConfig, observer: Any = None) -> None:
        self.config = config
        self._networks = parse_networks(config.allowed_hosts)
        self._lock = threading.Lock()
        self._conns: list[Connection] = []
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.observer = observer
        self.refused_hosts = 0
        self.cut_late = 0

    # allow-list ---------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        if not self._networks:
            return True
        ip = normalise_ip(host)
        return ip is not None and any(ip in net for net in self._networks)

    # accounting ---------------------------------------------------------------

    def admit(self, host: str, sock: socket.socket) -> Connection | None:
        """A new TCP connection: its record, or None when it must be closed."""
        if not self.host_allowed(host):
            self.refused_hosts += 1
            log.warning("connection from %s refused: not in PACS_AI_ALLOWED_HOSTS", host)
            return None
        evict: Connection | None = None
        with self._lock:
            live = [c for c in self._conns if not c.closed]
            same = [c for c in live if c.host == host]
            pending_same = [c for c in same if not c.established]
            if len(pending_same) >= self.config.max_pending_per_host:
                # this address already holds its share of half-open connections:
                # the oldest one gives way (a real peer completes in milliseconds)
                evict = min(pending_same, key=lambda c: c.accepted)
            else:
                pending = [c for c in live if not c.established]
                if len(pending) >= self.config.max_pending:
                    evict = min(pending, key=lambda c: c.accepted)
            conn = Connection(host=host, sock=sock)
            self._conns.append(conn)
        if evict is not None:
            log.warning(
                "too many connections not yet associated from %s: closing the oldest",
                evict.host,
            )
            evict.cut()
        return conn

    def active(self) -> int:
        """Connections open now (associated or not)."""
        with self._lock:
            return sum(1 for c in self._conns if not c.closed)

    def try_establish(self, conn: Connection) -> bool:
        """Reserve an association slot; False when a limit is reached."""
        with self._lock:
            established = [c for c in self._conns if c.established and not c.closed]
            if len(established) >= self.config.max_associations:
                return False
            same = [c for c in established if c.host == conn.host]
            if len(same) >= self.config.max_associations_per_host:
                return False
            conn.established = True
            return True

    def unestablish(self, conn: Connection) -> None:
        with self._lock:
            conn.established = False

    def release(self, conn: Connection) -> None:
        with self._lock:
            conn.closed = True
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)

    def counts(self) -> tuple[int, int]:
        """(pending, established) connections right now."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
            est = sum(1 for c in live if c.established)
            return len(live) - est, est

    # reaper -------------------------------------------------------------------

    def start(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=self._reap_loop, name="pacs-ai-connection-reaper", daemon=True
            )
            self._reaper.start()

    def stop(self) -> None:
        self._stop.set()

    def reap_once(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [
                c
                for c in self._conns
                if not c.established
                and not c.closed
                and now - c.accepted > self.config.association_timeout
            ]
        for conn in late:
            log.warning(
                "connection from %s cut: no association within %.0f s of connecting",
                conn.host,
                self.config.association_timeout,
            )
            conn.cut()
        self.cut_late += len(late)
        return len(late)

    def _reap_loop(self) -> None:
        interval = min(1.0, self.config.association_timeout / 4)
        while not self._stop.wait(interval):
            try:
                self.reap_once()
            except Exception:  # noqa: BLE001 - the reaper must survive anything
                log.exception("connection reaper failed")


# -- server -------------------------------------------------------------------------


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the guard at accept, TLS handshakes
    off the accepting thread, and guarded associations."""

    guard: ConnectionGuard
    limits: GuardConfig

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        inherited: socket.socket | None = None,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        self.limits = guard.config
        #: a listening socket made by the first listener process (shared accept)
        self._inherited = inherited
        #: connections admitted at accept, until their handler thread takes them
        self._pending_conn: dict[int, Connection] = {}
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)
        self.daemon_threads = True

    def server_bind(self) -> None:
        if self._inherited is None:
            super().server_bind()
            return
        cast(socket.socket, self.socket).close()  # the one socketserver made
        self.socket = self._inherited
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._inherited is None:
            super().server_activate()
        if self.limits.shared_accept:
            cast(socket.socket, self.socket).setblocking(False)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # no handshake here: pynetdicom does it on the accepting thread, where
        # one silent peer on the TLS port would stall every other connection
        self.socket = cast(socket.socket, self.socket)
        if self.limits.shared_accept:
            # Every process sharing the socket is woken by a new connection; a
            # busy one waits a little before it tries, so that an idle one takes
            # it (the kernel's SO_REUSEPORT hash would put 3 of 4 senders on one
            # process half the time). The loser's accept finds nothing: EAGAIN,
            # an OSError that socketserver ignores.
            busy = self.guard.active()
            if busy:
                time.sleep(min(0.2, 0.02 * busy))
        client, address = self.socket.accept()
        client.settimeout(self.limits.association_timeout)
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        sock = cast(socket.socket, request)
        conn = self.guard.admit(str(client_address[0]), sock)
        if conn is None:
            return False
        self._pending_conn[id(sock)] = conn
        return True

    def take_conn(self, sock: socket.socket) -> Connection | None:
        return self._pending_conn.pop(id(sock), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("connection from %s failed", client_address[0])

    def shutdown_request(self, request: Any) -> None:
        conn = self.take_conn(cast(socket.socket, request))
        if conn is not None:
            self.guard.release(conn)
        super().shutdown_request(request)


class GuardedRequestHandler(RequestHandler):
    server: GuardedServer

    def handle(self) -> None:
        server = self.server
        conn = server.take_conn(cast(socket.socket, self.request))
        if conn is None:  # pragma: no cover - verify_request always records one
            conn = Connection(host=str(self.client_address[0]), sock=self.request)
        try:
            if server.ssl_context is not None:
                tls = server.ssl_context.wrap_socket(
                    cast(socket.socket, self.request),
                    server_side=True,
                    do_handshake_on_connect=False,
                )
                conn.sock = tls
                self.request = tls
                tls.settimeout(server.limits.association_timeout)
                tls.do_handshake()
            sock = cast(socket.socket, self.request)
            sock.settimeout(server.limits.network_timeout)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS handshake with %s failed (%s)", conn.host, _tls_reason(exc))
            server.guard.release(conn)
            with contextlib.suppress(OSError):
                cast(socket.socket, self.request).close()
            return
        try:
            assoc = self._create_association()
            assoc = _guard_association(assoc, conn, server)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        except BaseException:
            server.guard.release(conn)
            raise
        assoc.start()

    def finish(self) -> None:
        # The association thread owns the socket from here on; socketserver's
        # shutdown_request (called after handle) must not close it.
        pass


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__


# -- the association ------------------------------------------------------------------


class _GuardedACSE(ACSE):
    def _negotiate_as_acceptor(self) -> None:
        limits: _AssocLimits = self.assoc._pacs_ai_limits  # type: ignore[attr-defined]
        conn = limits.conn
        if not limits.guard.try_establish(conn):
            log.warning(
                "association from %s rejected: association limit reached (%d in all, %d per host)",
                conn.host,
                limits.guard.config.max_associations,
                limits.guard.config.max_associations_per_host,
            )
            # rejected-transient, service-provider (presentation), local-limit-exceeded
            self.send_reject(0x02, 0x03, 0x02)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()
        if not self.assoc.is_established:
            limits.guard.unestablish(conn)


@dataclass
class _AssocLimits:
    guard: ConnectionGuard
    conn: Connection
    config: GuardConfig
    #: C-STORE statuses decided while the data set arrived, by message id
    refusals: dict[int, tuple[int, str]] = field(default_factory=dict)


def _guard_association(assoc: Association, conn: Connection, server: GuardedServer) -> Association:
    limits = _AssocLimits(guard=server.guard, conn=conn, config=server.limits)
    assoc._pacs_ai_limits = limits  # type: ignore[attr-defined]
    assoc.acse = _GuardedACSE(assoc)
    dul = assoc.dul
    dul._read_pdu_data = lambda: read_pdu(dul, limits)  # type: ignore[method-assign]
    # pynetdicom counts every thread, idle TCP connections included; the guard
    # counts established associations instead
    assoc.ae.maximum_associations = 1_000_000
    close_reactor = make_event_driven(assoc)
    run = assoc.run

    def guarded_run() -> None:
        try:
            run()
        finally:
            server.guard.release(conn)
            _drop_partial(assoc)
            close_reactor()

    assoc.run = guarded_run  # type: ignore[method-assign]
    return assoc


def _drop_partial(assoc: Association) -> None:
    """Remove the temp file of a C-STORE that never completed (abort, timeout)."""
    with contextlib.suppress(Exception):
        msg = assoc.dimse.message
        if msg is None:
            return
        fh = getattr(msg, "_data_set_file", None)
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
            with contextlib.suppress(OSError):
                os.unlink(fh.name)


def get_limits(assoc: Any) -> _AssocLimits | None:
    return cast("_AssocLimits | None", getattr(assoc, "_pacs_ai_limits", None))


# -- PDUs -----------------------------------------------------------------------------


class _Violation(Exception):
    pass


def _recv_exact(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Violation("PDU not received in full within the network timeout")
        sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise _Violation("PDU not received in full within the network timeout") from None
        if n == 0:
            raise ConnectionError("connection closed mid-PDU")
        got += n


def read_pdu(dul: Any, limits: _AssocLimits) -> None:
    """pynetdicom's ``DULServiceProvider._read_pdu_data`` with limits: the PDU
    length is checked before the body is read, and the whole PDU must arrive
    within the network timeout (before the association is set up, within the
    association timeout from TCP accept)."""
    asock = dul.socket
    sock = asock.socket if asock is not None else None
    if sock is None:
        dul.event_queue.put("Evt17")
        return
    cfg = limits.config
    now = time.monotonic()
    deadline = now + cfg.network_timeout
    if not limits.conn.established:
        deadline = min(deadline, limits.conn.accepted + cfg.association_timeout)
    try:
        header = bytearray(6)
        _recv_exact(sock, memoryview(header), deadline)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            raise _Violation(f"unknown PDU type 0x{pdu_type:02X}")
        if pdu_type == 0x04:
            limit = cfg.max_pdu_size + _PDU_SLACK
        elif pdu_type == 0x01:
            limit = MAX_ASSOCIATE_RQ_BYTES
        else:
            limit = MAX_OTHER_PDU_BYTES
        if length > limit:
            raise _Violation(
                f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than {limit}"
            )
        data = bytearray(6 + length)
        data[:6] = header
        _recv_exact(sock, memoryview(data)[6:], deadline)
    except _Violation as exc:
        log.warning("association with %s aborted: %s", limits.conn.host, exc)
        _abort(dul)
        return
    except (OSError, ConnectionError):
        # Evt17: transport connection closed
        dul.event_queue.put("Evt17")
        return
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(cfg.network_timeout)
    try:
        pdu, event = dul._decode_pdu(data)
    except Exception:  # noqa: BLE001 - pynetdicom's own handling of a bad PDU
        log.warning("association with %s: undecodable PDU", limits.conn.host)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _abort(dul: Any) -> None:
    """Send an A-ABORT (best effort) and close the connection."""
    asock = dul.socket
    abort = A_ABORT_RQ()
    abort.source = 0x02
    abort.reason_diagnostic = 0x00
    with contextlib.suppress(Exception):
        sock = asock.socket
        sock.settimeout(1.0)
        sock.sendall(abort.encode())
    # AssociationSocket.close() queues Evt17 (transport closed) for the state machine
    asock.close()


# -- DIMSE messages -----------------------------------------------------------------------

_original_decode_msg = DIMSEMessage.decode_msg


def decode_msg(self: DIMSEMessage, primitive: Any, assoc: Any = None) -> bool:
    """``DIMSEMessage.decode_msg`` for guarded associations (others unchanged)."""
    limits = get_limits(assoc)
    if limits is None:
        return bool(_original_decode_msg(self, primitive, assoc))
    state = cast("_MsgState | None", getattr(self, "_pacs_ai_state", None))
    if state is None:
        state = _MsgState()
        self._pacs_ai_state = state  # type: ignore[attr-defined]
    for context_id, data in primitive.presentation_data_value_list:
        control = data[0]
        if control & 1:  # command set fragment
            cmd = cast(BytesIO, self.encoded_command_set)
            if cmd.tell() + len(data) - 1 > MAX_COMMAND_BYTES:
                raise ValueError("DIMSE command set too large")
            cmd.write(data[1:])
            if control & 2:
                self.context_id = context_id
                self.command_set = decode(cmd, True, True)
                self.__class__ = dimse_messages._MESSAGE_TYPES[
                    cast(int, self.command_set.CommandField)
                ][1]
                if self.command_set.CommandDataSetType == 0x0101:
                    return True
                if isinstance(self, C_STORE_RQ):
                    _open_store_file(self, state, assoc, context_id, limits)
        else:  # data set fragment
            if isinstance(self, C_STORE_RQ):
                _write_store_fragment(self, state, data, limits)
            else:
                ds = cast(BytesIO, self.data_set)
                if ds.tell() + len(data) - 1 > MAX_INMEMORY_DATASET_BYTES:
                    raise ValueError("DIMSE data set too large")
                ds.write(data[1:])
            if control & 2:
                if state.fh is not None:
                    state.fh.close()
                return True
    return False


@dataclass
class _MsgState:
    fh: BinaryIO | None = None
    written: int = 0
    refused: bool = False


def _open_store_file(
    msg: DIMSEMessage, state: _MsgState, assoc: Any, context_id: int, limits: _AssocLimits
) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    cfg = limits.config
    message_id = int(msg.command_set.MessageID)
    if cfg.storage_root is not None and cfg.min_free_bytes > 0:
        from dicomnode.storage import free_mb

        try:
            free = free_mb(cfg.storage_root) * MiB
        except OSError:
            free = 0
        if free < cfg.min_free_bytes:
            _refuse(
                msg,
                state,
                limits,
                message_id,
                OUT_OF_RESOURCES,
                "storage below PACS_AI_MIN_FREE_MB",
            )
            return
    temp_dir = cfg.temp_dir
    try:
        if temp_dir is not None:
            temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = _mkstemp(temp_dir)
        os.close(fd)
        fh = open(name, "wb")  # noqa: SIM115 - closed when the data set is complete
        msg._data_set_file = cast(Any, fh)
        msg._data_set_path = Path(name)
        state.fh = fh
        fh.write(b"\x00" * 128 + b"DICM")
        cs = msg.command_set
        cx = assoc._accepted_cx[context_id]
        write_file_meta_info(
            cast(Any, fh),
            create_file_meta(
                sop_class_uid=cast(UID, cs.AffectedSOPClassUID),
                sop_instance_uid=cast(UID, cs.AffectedSOPInstanceUID),
                transfer_syntax=cx.transfer_syntax[0],
            ),
        )
    except OSError as exc:
        _refuse(msg, state, limits, message_id, OUT_OF_RESOURCES, _os_reason(exc))


def _mkstemp(temp_dir: Path | None) -> tuple[int, str]:
    import tempfile

    from dicomnode.storage import temp_prefix

    return tempfile.mkstemp(suffix=".part", prefix=temp_prefix("rx"), dir=temp_dir)


def _write_store_fragment(
    msg: DIMSEMessage, state: _MsgState, data: bytes, limits: _AssocLimits
) -> None:
    if state.refused or state.fh is None:
        return  # refused: the rest of the data set is read and dropped
    size = len(data) - 1
    if state.written + size > limits.config.max_instance_bytes:
        _refuse(
            msg,
            state,
            limits,
            int(msg.command_set.MessageID),
            OUT_OF_RESOURCES,
            f"instance larger than PACS_AI_MAX_INSTANCE_BYTES ({limits.config.max_instance_bytes})",
        )
        return
    try:
        state.fh.write(memoryview(data)[1:])
    except OSError as exc:
        _refuse(
            msg, state, limits, int(msg.command_set.MessageID), OUT_OF_RESOURCES, _os_reason(exc)
        )
        return
    state.written += size


def _refuse(
    msg: DIMSEMessage,
    state: _MsgState,
    limits: _AssocLimits,
    message_id: int,
    status: int,
    reason: str,
) -> None:
    state.refused = True
    limits.refusals[message_id] = (status, reason)
    fh = state.fh
    state.fh = None
    msg._data_set_file = None
    msg._data_set_path = None
    if fh is not None:
        with contextlib.suppress(OSError):
            fh.close()
        with contextlib.suppress(OSError):
            os.unlink(fh.name)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the storage device"
    return exc.strerror or type(exc).__name__


def take_refusal(assoc: Any, message_id: int) -> tuple[int, str] | None:
    limits = get_limits(assoc)
    if limits is None:
        return None
    return limits.refusals.pop(message_id, None)


_installed = False


def install() -> None:
    """Patch pynetdicom's message decoding for guarded associations (idempotent;
    associations that are not guarded keep pynetdicom's own behaviour)."""
    global _installed
    if not _installed:
        DIMSEMessage.decode_msg = decode_msg  # type: ignore[method-assign]
        _installed = True


__all__ = [
    "ConnectionGuard",
    "GuardConfig",
    "GuardedServer",
    "install",
    "parse_networks",
    "take_refusal",
]
