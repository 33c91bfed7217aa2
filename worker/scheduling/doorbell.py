"""A local doorbell: the listener processes ring the scheduler when an instance
is stored, so that it looks at studies at once instead of on its next tick.

One UNIX datagram socket per node, in Linux's abstract namespace (no file to
clean up, no path length limit), named after the data directory, so that every
``pacs-ai listen`` process of a node (several share the DICOM port) reaches the
one that runs the scheduler. A ring is one byte, sent without blocking; a ring
that cannot be sent (no scheduler listening, its queue full) is dropped: the
scheduler still looks every ``PACS_AI_ASSEMBLER_INTERVAL`` seconds, so the bell
only shortens the wait, and nothing depends on it.

Imports only the standard library (the listener process loads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


def bell_address(data_path: Path) -> str:
    """The abstract socket name of a node's scheduler (empty off Linux)."""
    if not sys.platform.startswith("linux"):
        return ""
    digest = hashlib.sha256(str(data_path).encode()).hexdigest()[:32]
    return f"\0pacs-ai-scheduler-{digest}"


class Bell:
    """The sending side: one unbound datagram socket per process, thread-safe."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    def ring(self) -> None:
        if self._sock is None:
            return
        # no scheduler (ConnectionRefused, FileNotFound) or its queue is full
        # (BlockingIOError): it looks on its next tick anyway
        with contextlib.suppress(OSError):
            self._sock.sendto(b"!", self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Doorbell(threading.Thread):
    """The receiving side, in the process that runs the scheduler: calls
    ``on_ring`` once per burst of rings."""

    def __init__(self, address: str, on_ring: Callable[[], None]) -> None:
        super().__init__(name="pacs-ai-doorbell", daemon=True)
        self.address = address
        self.on_ring = on_ring
        self._sock: socket.socket | None = None
        self._closing = threading.Event()

    def open(self) -> bool:
        """Bind the socket; False (and a warning) when another scheduler holds it
        or the platform has no abstract sockets."""
        if not self.address:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            log.warning(
                "scheduler doorbell unavailable (%s): another scheduler runs for this data "
                "directory? Studies are looked at every PACS_AI_ASSEMBLER_INTERVAL seconds",
                type(exc).__name__,
            )
            return False
        sock.settimeout(1.0)
        self._sock = sock
        self.start()
        return True

    def run(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing.is_set():
            try:
                sock.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            # drain the burst: one call for many rings
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                while sock.recv(64):
                    pass
            sock.settimeout(1.0)
            self.on_ring()

    def close(self) -> None:
        self._closing.set()
        if self._sock is not None:
            if self.is_alive():
                bell = Bell(self.address)
                bell.ring()  # wakes the blocked recv
                bell.close()
                self.join(timeout=2)
            self._sock.close()
            self._sock = None


class _Observer(Protocol):
    def record_association(self, accepted: bool) -> None: ...

    def record_instance(self, size_bytes: int, duplicate: bool) -> None: ...

    def record_cstore_failure(self, status: int) -> None: ...


class RingingObserver:
    """A listener observer (:class:`dicomnode.scp.ListenerObserver`) that passes
    every count on to ``inner`` and rings the bell when a new instance was stored
    (the listener reports it after its row is committed)."""

    def __init__(self, inner: _Observer, bell: Bell) -> None:
        self.inner = inner
        self.bell = bell

    def record_association(self, accepted: bool) -> None:
        self.inner.record_association(accepted)

    def record_instance(self, size_bytes: int, duplicate: bool) -> None:
        self.inner.record_instance(size_bytes, duplicate)
        if not duplicate:
            self.bell.ring()

    def record_cstore_failure(self, status: int) -> None:
        self.inner.record_cstore_failure(status)
