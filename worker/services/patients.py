"""A patient's nodule trend, as the CLI (``pacs-ai patients trend``) and the API
(``GET /api/patients/{patient}/trend``) both answer it.

A patient is named by a **handle**: the first hex digits (8 to 64) of the keyed
patient hash of :mod:`dicomnode.identity` (a study's ``patient`` field gives 16).
It links a patient's studies without saying who the patient is, so a read-only
token may use it; no identifier is read here. Errors are the caller's to word:
:class:`ValueError` for a malformed or ambiguous handle, :class:`LookupError`
for one that matches no study.

Calls :mod:`db.queries` for SQL and the pure helpers of
:mod:`worker.results.priors`; must not import :mod:`worker.admin` or
:mod:`worker.cli`.
"""

from __future__ import annotations

import re
from typing import Any

from db import queries
from db.session import session_scope
from worker.results.priors import is_nodule_result, largest_volume_ml
from worker.settings import Settings

__all__ = ["HANDLE_LENGTH", "check_handle", "patient_trend"]

#: hex digits of the patient key shown as a study's ``patient`` handle
HANDLE_LENGTH = 16
_HANDLE = re.compile(r"^[0-9a-f]{8,64}$")


def check_handle(patient: str) -> str:
    """``patient`` when it is a handle, else ValueError. The message never
    repeats the value (it may be a patient ID typed by mistake)."""
    if not _HANDLE.match(patient):
        raise ValueError(
            f'a patient handle is 8 to 64 lowercase hex digits (a study\'s "patient" '
            f"field, {HANDLE_LENGTH} digits); the one given is not"
        )
    return patient


def _finding(row: dict[str, Any]) -> dict[str, Any]:
    measurements = row["measurements"]
    prior = measurements.get("prior") or {}
    return {
        "model": row["model"],
        "finding": row["finding"],
        "volume_ml": round(largest_volume_ml(measurements), 3),
        "change_percent": prior.get("change_percent"),
        "doubling_time_days": prior.get("doubling_time_days"),
        "prior_study_instance_uid": prior.get("study_instance_uid"),
    }


def patient_trend(settings: Settings, patient: str) -> dict[str, Any]:
    """The nodule results of every study of one patient, oldest StudyDate first
    (undated studies last): ``{"patient": handle, "studies": [{"study_instance_uid",
    "study_date" (ISO or null), "findings": [{"model", "finding", "volume_ml" (the
    largest nodule's), "change_percent", "doubling_time_days",
    "prior_study_instance_uid"}]}]}``; change, VDT and prior are those stored in
    the result's ``measurements.prior`` (null without a prior).

    ValueError for a malformed handle or one that matches several patients;
    LookupError when no study matches."""
    prefix = check_handle(patient)
    with session_scope(settings.effective_database_url) as session:
        rows = queries.patient_trend_rows(session, prefix)
    if not rows:
        raise LookupError("no study has this patient handle")
    if len({r["patient_key"] for r in rows}) > 1:
        raise ValueError(
            "this patient handle is ambiguous (it begins the keys of several patients); "
            f'give more digits (a study\'s "patient" field has {HANDLE_LENGTH})'
        )
    return {
        "patient": rows[0]["patient_key"][:HANDLE_LENGTH],
        "studies": [
            {
                "study_instance_uid": r["study_instance_uid"],
                "study_date": r["study_date"].isoformat() if r["study_date"] else None,
                "findings": [_finding(x) for x in r["results"] if is_nodule_result(x)],
            }
            for r in rows
        ],
    }
