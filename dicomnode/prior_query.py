"""Finding and fetching a patient's prior study on the PACS (``PACS_AI_PRIORS=pacs``).

:func:`find_prior_studies` asks ``PACS_AI_PACS`` (C-FIND, Study Root, STUDY
level) for the patient's studies with CT in ModalitiesInStudy dated up to a
day; :func:`move_study` asks it (C-MOVE, STUDY level) to send one study to an
AE title, pacs-ai's own listener, which stores and records it like any
study it receives. The PACS must know that AE title (its host and port).

The queries carry the PatientID (and IssuerOfPatientID) to the PACS, as any
query by patient does; nothing of them or of an answer is logged (pynetdicom's
identifier logging is off): log lines name the PACS, UIDs, counts and error
types only. The caller (:mod:`worker.results.priors`) decides what to fetch.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.identity import clean, parse_date
from dicomnode.pacs_query import QueryFailed, QueryPeer, open_association
from dicomnode.uids import InvalidUID, validate_uid

log = logging.getLogger(__name__)

_PENDING = frozenset({0xFF00, 0xFF01})
_SUCCESS = 0x0000
_MOVE_WARNING = 0xB000  # sub-operations complete, one or more failures or warnings


class PriorQueryFailed(Exception):
    """The PACS could not be asked or answered with a failure; the message names
    no patient data."""


@dataclass(frozen=True, slots=True)
class RemoteStudy:
    """A study the PACS holds: its UID and date."""

    study_instance_uid: str
    study_date: dt.date


@dataclass(frozen=True, slots=True)
class MoveOutcome:
    """How a C-MOVE ended: its final status and the sub-operation counts."""

    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.status in (_SUCCESS, _MOVE_WARNING) and self.completed > 0


def _association(
    peer: QueryPeer,
    calling_ae: str,
    context: Any,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> Any:
    try:
        return open_association(
            peer, calling_ae, context, timeout, ssl_context, set_up_timeout=min(timeout, 30.0)
        )
    except QueryFailed as exc:
        raise PriorQueryFailed(str(exc)) from None


def _status(status: Any) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def find_prior_studies(
    peer: QueryPeer,
    calling_ae: str,
    patient_id: str,
    issuer_of_patient_id: str,
    up_to: dt.date,
    modality: str = "CT",
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[RemoteStudy]:
    """The patient's studies on the PACS with ``modality`` in the study, dated up
    to ``up_to`` (inclusive), most recent first. An answer's study without a
    valid UID or date, or outside the range (a PACS may ignore a key), is left
    out. :class:`PriorQueryFailed` when the PACS cannot be asked."""
    if not clean(patient_id):
        return []
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = clean(patient_id)
    if clean(issuer_of_patient_id):
        query.IssuerOfPatientID = clean(issuer_of_patient_id)
    query.ModalitiesInStudy = modality
    query.StudyDate = f"-{up_to:%Y%m%d}"
    query.StudyInstanceUID = ""
    model = StudyRootQueryRetrieveInformationModelFind
    assoc = _association(peer, calling_ae, model, timeout, ssl_context)
    found: dict[str, RemoteStudy] = {}
    try:
        for ident in _find(assoc, query, model):
            try:
                uid = validate_uid(clean(ident.get("StudyInstanceUID")), "StudyInstanceUID")
            except InvalidUID:
                continue
            date = parse_date(ident.get("StudyDate"))
            listed = _values(ident.get("ModalitiesInStudy"))
            if date is None or date > up_to or (listed and modality.upper() not in listed):
                continue
            found[uid] = RemoteStudy(uid, date)
    finally:
        if assoc.is_established:
            assoc.release()
    return sorted(found.values(), key=lambda s: (s.study_date, s.study_instance_uid), reverse=True)


def _values(value: Any) -> set[str]:
    """A multi-valued code string's values, upper-cased."""
    if value is None or value == "":
        return set()
    items = [value] if isinstance(value, str) else list(value)
    return {clean(v).upper() for v in items if clean(v)}


def _find(assoc: Any, query: Dataset, model: Any) -> Iterator[Dataset]:
    for status, identifier in assoc.send_c_find(query, model):
        code = _status(status)
        if code is None:
            raise PriorQueryFailed("no C-FIND response (timed out or aborted)")
        if code in _PENDING:
            if identifier is not None:
                yield identifier
        elif code == _SUCCESS:
            return
        else:
            raise PriorQueryFailed(f"C-FIND answered 0x{code:04X}")


def move_study(
    peer: QueryPeer,
    calling_ae: str,
    destination_ae: str,
    study_uid: str,
    timeout: float = 120.0,
    ssl_context: ssl.SSLContext | None = None,
) -> MoveOutcome:
    """Ask the PACS to send every instance of ``study_uid`` to ``destination_ae``
    (C-MOVE); returns when the PACS reports the move done (every instance it
    sent stored by the destination). ``timeout``: the longest wait for each of
    the PACS's responses. :class:`PriorQueryFailed` when it cannot be asked."""
    study_uid = validate_uid(study_uid, "StudyInstanceUID")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = _association(peer, calling_ae, model, timeout, ssl_context)
    last: tuple[int, int, int, int] | None = None
    try:
        for status, _identifier in assoc.send_c_move(query, destination_ae, model):
            code = _status(status)
            if code is None:
                raise PriorQueryFailed("no C-MOVE response (timed out or aborted)")
            last = (
                code,
                int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                int(status.get("NumberOfFailedSuboperations", 0) or 0),
                int(status.get("NumberOfWarningSuboperations", 0) or 0),
            )
            if code not in _PENDING:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    if last is None:
        raise PriorQueryFailed("no C-MOVE response")
    outcome = MoveOutcome(*last)
    log.info(
        "C-MOVE of study=%s from %s to %s: status 0x%04X, %d sent, %d failed, %d warnings",
        study_uid,
        peer.name,
        destination_ae,
        outcome.status,
        outcome.completed,
        outcome.failed,
        outcome.warning,
    )
    return outcome
