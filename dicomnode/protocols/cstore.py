"""C-STORE SCU destinations: ``[tls://]AE@host:port[/profile]``.

Every file of a batch goes in one association (Explicit and Implicit VR Little
Endian proposed per SOP class), calling AE title ``PACS_AI_AE_TITLE``;
``tls://`` runs it over TLS with the ``PACS_AI_TLS_*`` files.

Transient failures (worth retrying later): the association is refused,
aborted or times out, the peer cannot be reached, no response arrives, or the
status is 0xA7xx (out of resources). Permanent failures (never retried): the
destination accepts no presentation context for the object's SOP class, or
answers 0xA9xx (dataset does not match SOP class), 0xCxxx (cannot understand)
or another failure status. Warnings (0xB000, 0xB006, 0xB007) and 0x0111
(duplicate SOP instance: the destination already has it) count as sent.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from dicomnode.protocols.base import (
    DEFAULT_PROFILE,
    Destination,
    SendContext,
    SendResult,
    classify_status,
    parse_profile,
    profile_text,
    unreadable,
)

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_ITEM = re.compile(r"^(?P<ae>[^@]+)@(?P<host>.+):(?P<port>\d{1,5})(/(?P<profile>.*))?$")


@dataclass(frozen=True, slots=True)
class CStoreDestination(Destination):
    """One DICOM peer that receives results by C-STORE."""

    ae_title: str
    host: str
    port: int
    profile: frozenset[str] = DEFAULT_PROFILE
    tls: bool = False

    @property
    def name(self) -> str:
        """The key of its delivery rows: ``AE@host:port``."""
        return f"{self.ae_title}@{self.host}:{self.port}"

    def __str__(self) -> str:
        prefix = "tls://" if self.tls else ""
        return f"{prefix}{self.name}/{profile_text(self.profile)}"

    def send(self, paths: Sequence[Path], ctx: SendContext) -> list[SendResult]:
        ssl_context = None
        if self.tls:
            try:
                ssl_context = ctx.ssl_context()
            except (OSError, ValueError) as exc:
                message = f"TLS set-up failed ({type(exc).__name__})"
                return [SendResult("transient", message)] * len(paths)
        return store_files(self, paths, ctx.calling_ae, ctx.timeout, ssl_context)


def parse(rest: str, *, tls: bool) -> CStoreDestination:
    """``AE@host:port[/profile]`` (after ``tls://`` when ``tls``)."""
    item = f"tls://{rest}" if tls else rest
    match = _ITEM.match(rest)
    if match is None:
        raise ValueError(
            f"destination {item!r} is not of the form [tls://]AE@host:port[/sr+seg+ki]"
        )
    ae = match.group("ae").strip()
    if not _AE.match(ae) or len(ae) > 16:
        raise ValueError(f"destination {item!r}: AE title {ae!r} is not 1-16 printable characters")
    host = match.group("host")
    if not _HOST.match(host):
        raise ValueError(f"destination {item!r}: {host!r} is not a host name or address")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"destination {item!r}: port {port} is not in 1-65535")
    profile = parse_profile(match.group("profile"), item)
    return CStoreDestination(ae, host, port, profile, tls=tls)


def store_files(
    destination: CStoreDestination,
    paths: Sequence[Path],
    calling_ae: str,
    timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """C-STORE each file in one association; one :class:`SendResult` per path."""
    datasets: list[Dataset | None] = []
    results: list[SendResult | None] = []
    for path in paths:
        try:
            datasets.append(dcmread(path))
            results.append(None)
        except Exception as exc:
            datasets.append(None)
            results.append(unreadable(exc))
    sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets if ds is not None})
    if not sop_classes:
        return [r or SendResult("permanent", "nothing to send") for r in results]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    contexts = [
        build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for sop in sop_classes
    ]
    tls_args = (ssl_context, destination.host) if destination.tls and ssl_context else None
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            contexts=contexts,
            ae_title=destination.ae_title,
            tls_args=tls_args,
        )
    except Exception as exc:  # DNS failure, TLS set-up ...
        message = f"cannot connect to {destination.name} ({type(exc).__name__})"
        return [r or SendResult("transient", message) for r in results]
    if not assoc.is_established:
        if assoc.is_rejected:
            message = f"association rejected by {destination.name}"
        elif assoc.is_aborted:
            message = f"association aborted by {destination.name}"
        else:
            message = f"cannot connect to {destination.name} (refused or timed out)"
        return [r or SendResult("transient", message) for r in results]
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    try:
        for i, ds in enumerate(datasets):
            if ds is None:
                continue
            if str(ds.SOPClassUID) not in accepted:
                results[i] = SendResult(
                    "permanent",
                    f"{destination.name} accepts no context for SOP class {ds.SOPClassUID}",
                )
                continue
            if not assoc.is_established:
                results[i] = SendResult("transient", f"association with {destination.name} lost")
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception as exc:
                results[i] = SendResult(
                    "transient", f"C-STORE to {destination.name} failed ({type(exc).__name__})"
                )
                continue
            if "Status" not in rsp:
                results[i] = SendResult(
                    "transient", f"no C-STORE response from {destination.name} (timeout or abort)"
                )
                continue
            status = int(rsp.Status)
            outcome = classify_status(status)
            message = "" if outcome == "sent" else f"{destination.name} answered 0x{status:04X}"
            results[i] = SendResult(outcome, message, status)
    finally:
        if assoc.is_established:
            assoc.release()
    return [r or SendResult("transient", "not attempted") for r in results]
