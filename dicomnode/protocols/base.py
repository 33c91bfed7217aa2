"""What every delivery protocol shares: outcomes, profiles, the send context, and
the :class:`Destination` every protocol module implements.

A destination is valid from birth (its protocol's parser checks it), names
itself by :attr:`Destination.name` (the key of its delivery rows, never with
credentials) and sends a batch of Part 10 files with :meth:`Destination.send`,
one :class:`SendResult` per file, never raising. This module imports no
protocol: the registry (``dicomnode/protocols/__init__.py``) does.
"""

from __future__ import annotations

import re
import ssl
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

#: Kinds of objects pacs-ai produces; a profile is a '+'-joined subset of them.
KINDS: tuple[str, ...] = ("sr", "seg", "ki", "map")  # map: saliency maps (dicomnode/maps.py)
DEFAULT_PROFILE = frozenset({"sr", "seg"})
#: the longest destination name a delivery row holds (``deliveries.destination``)
NAME_MAX = 128

Outcome = Literal["sent", "transient", "permanent"]

#: DIMSE statuses (C-STORE responses, STOW-RS FailureReason) that mean "stored":
#: success, warnings (coercion, elements discarded, data set does not match SOP
#: class) and duplicate SOP instance (the destination already has it)
_SENT_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0111})
#: failures that are not the object's fault: resource limitation, duplicate invocation
_TRANSIENT_STATUSES = frozenset({0x0210, 0x0213})


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to one file: ``sent``, ``transient`` (retry later) or
    ``permanent`` (never retried); the message never holds credentials.
    ``status`` is the DICOM status that decided it, when there is one (a C-STORE
    response status, a STOW-RS FailureReason)."""

    outcome: Outcome
    message: str
    status: int | None = None


def classify_status(status: int) -> Outcome:
    """What a DICOM status (C-STORE response, STOW-RS FailureReason) means for a delivery."""
    if status in _SENT_STATUSES:
        return "sent"
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT_STATUSES:
        return "transient"
    if 0xFE00 <= status <= 0xFEFF:  # cancelled
        return "transient"
    return "permanent"


def tls_context(
    ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context: verify the peer against ``ca_file`` (else the system
    store); present ``cert_file``/``key_file`` when given."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


@dataclass(frozen=True, slots=True)
class SendContext:
    """What a send needs beyond the destination, the same for every destination:
    our calling AE title, the network timeout (seconds), the ``PACS_AI_TLS_*``
    files and the DICOMweb bearer token (never in the repr)."""

    calling_ae: str = "PACSAI"
    timeout: float = 60.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    dicomweb_token: str = field(default="", repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context of these files (OSError, ValueError or
        ssl.SSLError when one is missing or bad)."""
        return tls_context(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


def parse_profile(text: str | None, item: str) -> frozenset[str]:
    """``sr+seg+ki`` (any order, any subset of :data:`KINDS`); None: the default.

    ``item`` names the destination in the error (without credentials)."""
    if text is None:
        return DEFAULT_PROFILE
    kinds = [k.strip().lower() for k in text.split("+") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(
            f"destination {item!r}: profile {text!r} must be {', '.join(KINDS)} "
            "(one or more, joined by '+')"
        )
    return frozenset(kinds)


def profile_text(profile: Iterable[str]) -> str:
    """The profile written back: kinds in :data:`KINDS` order, joined by '+'."""
    wanted = set(profile)
    return "+".join(k for k in KINDS if k in wanted)


def redact(text: str) -> str:
    """``text`` with URL user information hidden: everything from ``://`` to the
    last ``@`` becomes ``***`` (over-hiding a path's '@' is harmless)."""
    return re.sub(r"(?<=://).*@", "***@", text, count=1, flags=re.S)


class Destination(ABC):
    """One peer that receives result objects, as one protocol reaches it.

    Implementations are frozen dataclasses built by their protocol's parser;
    ``__str__`` and ``__repr__`` never show credentials."""

    __slots__ = ()

    #: the kinds of object this destination receives
    profile: frozenset[str]

    @property
    @abstractmethod
    def name(self) -> str:
        """The key of its delivery rows (at most :data:`NAME_MAX` characters, no
        credentials): stable across restarts, unique among destinations."""

    def wants(self, kind: str) -> bool:
        return kind in self.profile

    @abstractmethod
    def send(self, paths: Sequence[Path], ctx: SendContext) -> list[SendResult]:
        """Send these Part 10 files; one result per path, in order. Never raises."""

    @abstractmethod
    def __str__(self) -> str:
        """The destination as it could be written back, without credentials."""


def unreadable(exc: BaseException) -> SendResult:
    """The result for an outbox file that cannot be read."""
    if isinstance(exc, FileNotFoundError):
        return SendResult("permanent", "object file is missing from the outbox")
    return SendResult("permanent", f"object file unreadable ({type(exc).__name__})")
