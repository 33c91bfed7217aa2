"""C-STORE SCU: send result objects to one destination, classify each outcome.

Transient failures (worth retrying later): the association is refused,
aborted or times out, the peer cannot be reached, no response arrives, or the
status is 0xA7xx (out of resources). Permanent failures (never retried): the
destination accepts no presentation context for the object's SOP class, or
answers 0xA9xx (dataset does not match SOP class), 0xCxxx (cannot understand)
or another failure status. Warnings (0xB000, 0xB006, 0xB007) and 0x0111
(duplicate SOP instance: the destination already has it) count as sent.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context

from dicomnode.destinations import Destination

log = logging.getLogger(__name__)

Outcome = Literal["sent", "transient", "permanent"]

_SENT_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0111})
#: failures that are not the object's fault: resource limitation, duplicate invocation
_TRANSIENT_STATUSES = frozenset({0x0210, 0x0213})


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    message: str
    status: int | None = None


def classify_status(status: int) -> Outcome:
    """What a C-STORE response status means for a delivery."""
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


def store_files(
    destination: Destination,
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
        except FileNotFoundError:
            datasets.append(None)
            results.append(SendResult("permanent", "object file is missing from the outbox"))
        except Exception as exc:
            datasets.append(None)
            results.append(
                SendResult("permanent", f"object file unreadable ({type(exc).__name__})")
            )
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
