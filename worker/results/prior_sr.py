"""The prior comparison in the SR: a nodule's measurement group gains the prior.

A hook on the built TID 1500 Measurement Report (called by
:mod:`worker.results.report` right after :func:`dicomnode.results.build_sr`):
for each nodule result with ``measurements.prior`` (:mod:`worker.results.priors`),
the measurement group of the compared nodule (this study's largest: the group of
that finding whose Volume is the largest component's) gains

- NUM "Nodule volume in prior study" (cm3), with the prior's Study Instance UID
  (UIDREF, DCM 110180) and Study Date (DATE, DCM 111060) as its properties: the
  reference to the prior study;
- NUM "Nodule volume change since prior study" (%), when the prior had a nodule;
- NUM "Nodule volume doubling time" (d), when the nodule grew;
- NUM "Interval since prior study" (d).

The concepts are in pacs-ai's private coding scheme ``99PACSAI`` (DICOM has no
code for a volume doubling time), declared in the SR's Coding Scheme
Identification. The SR's UIDs do not change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from worker.pipeline.kinds.base import ModelResult
from worker.results.priors import is_nodule_result

SCHEME = "99PACSAI"
PRIOR_VOLUME = hd.sr.CodedConcept("PRIOR-VOLUME", SCHEME, "Nodule volume in prior study")
VOLUME_CHANGE = hd.sr.CodedConcept(
    "VOLUME-CHANGE", SCHEME, "Nodule volume change since prior study"
)
DOUBLING_TIME = hd.sr.CodedConcept("VOLUME-DOUBLING-TIME", SCHEME, "Nodule volume doubling time")
INTERVAL = hd.sr.CodedConcept("PRIOR-INTERVAL", SCHEME, "Interval since prior study")
_STUDY_UID = hd.sr.CodedConcept("110180", "DCM", "Study Instance UID")
_STUDY_DATE = hd.sr.CodedConcept("111060", "DCM", "Study Date")
_DAYS = hd.sr.CodedConcept("d", "UCUM", "day")
_VOLUME = ("118565006", "SCT")
_FINDING = ("121071", "DCM")


def _code(item: Dataset, attribute: str) -> tuple[str, str] | None:
    seq = item.get(attribute)
    if not seq:
        return None
    return str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator)


def _groups(sr: Dataset) -> Iterator[Dataset]:
    """The measurement groups (containers) of the report's Imaging Measurements."""
    for item in sr.get("ContentSequence", []):
        if item.ValueType == "CONTAINER" and _code(item, "ConceptNameCodeSequence") == (
            "126010",
            "DCM",
        ):
            for group in item.get("ContentSequence", []):
                if group.ValueType == "CONTAINER":
                    yield group


def _group_volume(group: Dataset, finding_code: str) -> float | None:
    """The group's Volume (cm3) when its finding is ``finding_code``."""
    finding = volume = None
    for item in group.get("ContentSequence", []):
        name = _code(item, "ConceptNameCodeSequence")
        if name == _FINDING and item.ValueType == "CODE":
            finding = _code(item, "ConceptCodeSequence")
        elif name == _VOLUME and item.ValueType == "NUM":
            volume = float(item.MeasuredValueSequence[0].NumericValue)
    return volume if finding is not None and finding[0] == finding_code else None


def _num(name: hd.sr.CodedConcept, value: float, unit: Any) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name,
        value=value,
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def prior_items(prior: Mapping[str, Any]) -> list[hd.sr.NumContentItem]:
    """The content items of one prior comparison (see the module docstring)."""
    volume = _num(PRIOR_VOLUME, float(prior["volume_ml"]), codes.UCUM.CubicCentimeter)
    volume.ContentSequence = DicomSequence(
        [
            hd.sr.UIDRefContentItem(
                name=_STUDY_UID,
                value=str(prior["study_instance_uid"]),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            ),
            hd.sr.DateContentItem(
                name=_STUDY_DATE,
                value=dt.date.fromisoformat(str(prior["study_date"])),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            ),
        ]
    )
    items = [volume]
    if prior.get("change_percent") is not None:
        items.append(_num(VOLUME_CHANGE, float(prior["change_percent"]), codes.UCUM.Percent))
    if prior.get("doubling_time_days") is not None:
        items.append(_num(DOUBLING_TIME, float(prior["doubling_time_days"]), _DAYS))
    if prior.get("interval_days") is not None:
        items.append(_num(INTERVAL, float(prior["interval_days"]), _DAYS))
    return items


def add_priors_to_sr(sr: Dataset, results: Sequence[ModelResult]) -> int:
    """Add each nodule result's prior comparison to its measurement group in
    ``sr`` (in place); returns how many groups gained one."""
    added = 0
    for result in results:
        for row in result.rows:
            measurements = row.get("measurements") or {}
            prior = measurements.get("prior")
            if not is_nodule_result(row) or not prior:
                continue
            volumes = [c.get("volume_ml") for c in measurements.get("components") or []]
            volumes = [float(v) for v in volumes if v is not None]
            if not volumes:
                continue
            largest = round(max(volumes), 3)
            code = str(row.get("finding_code_value"))
            for group in _groups(sr):
                found = _group_volume(group, code)
                if found is not None and abs(found - largest) < 5e-4:
                    group.ContentSequence.extend(prior_items(prior))
                    added += 1
                    break
    if added:
        _declare_scheme(sr)
    return added


def _declare_scheme(sr: Dataset) -> None:
    """Coding Scheme Identification for the private scheme (once)."""
    seq = sr.get("CodingSchemeIdentificationSequence")
    if seq is None:
        sr.CodingSchemeIdentificationSequence = []
        seq = sr.CodingSchemeIdentificationSequence
    if any(str(item.get("CodingSchemeDesignator", "")) == SCHEME for item in seq):
        return
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "pacs-ai private concepts"
    item.CodingSchemeResponsibleOrganization = "pacs-ai"
    seq.append(item)
