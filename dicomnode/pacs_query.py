"""C-FIND SCU (Study Root): how many instances the PACS holds for a study.

``PACS_AI_PACS=[tls://]AE@host:port`` names the PACS. :func:`query_counts` asks
it, on one short association, for the study's NumberOfStudyRelatedInstances
(STUDY level) and each series' NumberOfSeriesRelatedInstances (SERIES level).
The scheduler compares them with what the listener received
(:mod:`worker.scheduling.completion`) to complete a study without waiting for
the quiet period.

Every failure (unreachable, refused, timed out, a failure status, an unknown
study) gives ``None``: the caller falls back to the quiet period. Only
identifiers go out and only the counts and series UIDs are read back; nothing
is logged but the PACS's name, the Study Instance UID and the error's type
(never a response identifier, which a PACS may fill with patient data).
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicomnode.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)$")
_ITEM = re.compile(r"^(?P<tls>tls://)?(?P<ae>[^@]+)@(?P<host>.+):(?P<port>\d{1,5})$")

#: C-FIND statuses (PS3.4 C.4.1.1.4)
_PENDING = frozenset({0xFF00, 0xFF01})
_SUCCESS = 0x0000


@dataclass(frozen=True, slots=True)
class QueryPeer:
    """The PACS that answers C-FIND (``PACS_AI_PACS``)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @property
    def name(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def __str__(self) -> str:
        return ("tls://" if self.tls else "") + self.name


def parse_peer(text: str) -> QueryPeer:
    """Parse ``[tls://]AE@host:port``; ValueError says what is wrong."""
    item = text.strip()
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(f"{item!r} is not of the form [tls://]AE@host:port")
    ae = match.group("ae").strip()
    if not _AE.match(ae) or len(ae) > 16:
        raise ValueError(f"{item!r}: AE title {ae!r} is not 1-16 printable characters")
    host = match.group("host")
    if not _HOST.match(host):
        raise ValueError(f"{item!r}: {host!r} is not a host name or address")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"{item!r}: port {port} is not in 1-65535")
    return QueryPeer(ae, host.strip("[]"), port, tls=match.group("tls") is not None)


@dataclass(frozen=True, slots=True)
class PacsCounts:
    """What the PACS reported for one study: its instance count (None when it gave
    none) and, per series it listed, that series' count (None when not given)."""

    study: int | None
    series: Mapping[str, int | None] = field(default_factory=dict)


class QueryFailed(Exception):
    """The query could not be answered; the message names no patient data."""


def query_counts(
    peer: QueryPeer,
    study_uid: str,
    calling_ae: str,
    timeout: float = 3.0,
    ssl_context: ssl.SSLContext | None = None,
) -> PacsCounts | None:
    """The PACS's instance counts for ``study_uid``, or None when it cannot tell
    (unreachable, refused, timed out, failed, or the study is unknown to it)."""
    try:
        return _query(
            peer, validate_uid(study_uid, "StudyInstanceUID"), calling_ae, timeout, ssl_context
        )
    except (QueryFailed, InvalidUID) as exc:
        log.info("C-FIND to %s for study=%s: %s", peer.name, _safe(study_uid), exc)
    except Exception as exc:  # noqa: BLE001 - any library failure means "no answer"
        log.info(
            "C-FIND to %s for study=%s failed (%s)", peer.name, _safe(study_uid), type(exc).__name__
        )
    return None


def open_association(
    peer: QueryPeer,
    calling_ae: str,
    context: Any,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    set_up_timeout: float | None = None,
) -> Any:
    """An association with the PACS for one presentation context; QueryFailed
    (naming the peer, never a query value) when there is none. pynetdicom is told
    never to log query or response identifiers: they hold patient data."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=calling_ae)
    set_up = timeout if set_up_timeout is None else set_up_timeout
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = set_up
    ae.dimse_timeout = timeout
    ae.add_requested_context(context)
    tls_args = (ssl_context, peer.host) if peer.tls and ssl_context is not None else None
    if peer.tls and tls_args is None:
        raise QueryFailed("TLS needs a client context")
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise QueryFailed(f"{peer.name} rejected the association")
        raise QueryFailed(f"no association with {peer.name} (refused, unreachable or timed out)")
    return assoc


def _query(
    peer: QueryPeer,
    study_uid: str,
    calling_ae: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> PacsCounts | None:
    assoc = open_association(
        peer, calling_ae, StudyRootQueryRetrieveInformationModelFind, timeout, ssl_context
    )
    try:
        study = Dataset()
        study.QueryRetrieveLevel = "STUDY"
        study.StudyInstanceUID = study_uid
        study.NumberOfStudyRelatedInstances = None
        matches = [
            ident
            for ident in _find(assoc, study)
            if str(ident.get("StudyInstanceUID", "")).strip() == study_uid
        ]
        if not matches:
            raise QueryFailed("the PACS does not know the study")
        study_count = _count(matches[0], "NumberOfStudyRelatedInstances")
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study_uid
        series.SeriesInstanceUID = ""
        series.NumberOfSeriesRelatedInstances = None
        per_series: dict[str, int | None] = {}
        try:
            for ident in _find(assoc, series):
                uid = str(ident.get("SeriesInstanceUID", "")).strip()
                if uid:
                    per_series[uid] = _count(ident, "NumberOfSeriesRelatedInstances")
        except QueryFailed as exc:  # the study count alone may still do
            log.info("C-FIND to %s, SERIES level, study=%s: %s", peer.name, study_uid, exc)
            per_series = {}
    finally:
        if assoc.is_established:
            assoc.release()
    return PacsCounts(study=study_count, series=per_series)


def _find(assoc: Any, query: Dataset) -> Iterator[Dataset]:
    """The pending identifiers of one C-FIND; QueryFailed on any other end than success."""
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            raise QueryFailed("no C-FIND response (timed out or aborted)")
        if code in _PENDING:
            if identifier is not None:
                yield identifier
        elif code == _SUCCESS:
            return
        else:
            raise QueryFailed(f"C-FIND answered 0x{code:04X}")


def _count(identifier: Dataset, keyword: str) -> int | None:
    """A non-negative count the PACS filled in, or None."""
    try:
        value = identifier.get(keyword)
        if value is None or value == "":
            return None
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


def _safe(uid: str) -> str:
    try:
        return validate_uid(uid, "uid")
    except InvalidUID:
        return "<invalid>"
