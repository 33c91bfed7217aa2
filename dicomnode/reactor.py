"""Event-driven reactors for the listener's associations.

pynetdicom runs two threads per association that poll: the DUL thread sleeps
1 ms between looks at its socket and queues, and the association thread sleeps
1 ms between looks at the DIMSE message queue. Four busy associations are eight
threads waking 8,000 times a second, each taking the GIL from the one thread
that is decoding or storing an instance. That polling is most of what caps a
listener process below one core (issue 12).

:func:`make_event_driven` changes both loops for one association, before it
starts, without touching pynetdicom's state machine:

- the DUL thread, when it has nothing queued, waits in ``select`` on its socket
  and on a wake-up pipe that every primitive queued for it (a C-STORE response,
  a release, an abort) and every stop request writes to;
- the association thread waits on the DIMSE message queue itself; a release or
  abort from the peer puts an empty item in that queue to wake it.

Both waits are bounded by :data:`WAIT_SECONDS`, so the timers pynetdicom checks
in its loops (ARTIM, idle timeout, a dead DUL thread) are seen at most that late.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

#: the longest either thread waits before it looks at pynetdicom's timers again
WAIT_SECONDS = 0.05
#: DUL states in which the thread may wait for its socket: awaiting the
#: A-ASSOCIATE-RQ, and established. Elsewhere (Sta13: awaiting the close after
#: an abort or a rejection) pynetdicom's own loop runs unchanged.
_WAITING_STATES = frozenset({"Sta2", "Sta6"})


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after every put."""

    def __init__(self, notify: Callable[[Any], None], items: list[Any]) -> None:
        super().__init__()
        self._notify = notify
        for item in items:
            self.queue.append(item)

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify(item)


class _Wakeup:
    """A self-pipe: a write from any thread ends the DUL thread's ``select``."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.closed = False
        self._lock = threading.Lock()  # no write to a closed (and reused) fd

    def ring(self, _item: Any = None) -> None:
        with self._lock, contextlib.suppress(OSError):  # OSError: full, already rung
            if not self.closed:
                os.write(self.w, b"x")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.r, 512):
                pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.r)
                os.close(self.w)


def make_event_driven(assoc: Association) -> Callable[[], None]:
    """Make ``assoc``'s two reactor threads wait on events instead of polling.

    Call it before the association starts; call the returned function once the
    association has ended (it closes the wake-up pipe).
    """
    dul = assoc.dul
    dimse = assoc.dimse
    wake = _Wakeup()

    dul.to_provider_queue = _NotifyingQueue(wake.ring, list(dul.to_provider_queue.queue))

    def wake_association(item: Any) -> None:
        if not isinstance(item, P_DATA):  # a release or abort from the peer
            dimse.msg_queue.put((None, None))

    dul.to_user_queue = _NotifyingQueue(wake_association, list(dul.to_user_queue.queue))

    transport_event = dul._is_transport_event

    def wait_then_transport_event() -> bool:
        asock = dul.socket
        sock = asock.socket if asock is not None else None
        if (
            sock is not None
            and dul.state_machine.current_state in _WAITING_STATES
            and not dul._kill_thread
            and dul.event_queue.empty()
            and not dul.to_provider_queue.queue
            and not (isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            with contextlib.suppress(OSError, ValueError):
                ready, _, _ = select.select([sock.fileno(), wake.r], [], [], WAIT_SECONDS)
                if wake.r in ready:
                    wake.drain()
        return bool(transport_event())

    dul._is_transport_event = wait_then_transport_event  # type: ignore[method-assign]

    kill_dul = dul.kill_dul

    def kill_and_wake() -> None:
        kill_dul()
        wake.ring()

    dul.kill_dul = kill_and_wake  # type: ignore[method-assign]
    stop_dul = dul.stop_dul

    def stop_and_wake() -> bool:
        if dul.state_machine.current_state == "Sta1":
            # what stop_dul does first, so that the thread it wakes sees the flag
            dul._kill_thread = True
            wake.ring()
        return bool(stop_dul())

    dul.stop_dul = stop_and_wake  # type: ignore[method-assign]

    get_msg = dimse.get_msg

    def wait_for_msg(block: bool = False) -> Any:
        if block:
            return get_msg(block=True)
        try:
            return dimse.msg_queue.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            return None, None

    dimse.get_msg = wait_for_msg  # type: ignore[method-assign]
    return wake.close


__all__ = ["WAIT_SECONDS", "make_event_driven"]
