"""Header values we copy from a source image into our SR, SEG and key image.

Hospitals send what they send: PatientSex ``U``, an age without its unit, a
date with dashes, a 70-character name, a character set highdicom does not know.
None of that may fail a job. :func:`prepare` returns a cleaned copy of a
source header (the source is never changed) whose patient, study and equipment
attributes are valid for their VR, corrected where the intent is clear and left
out (Type 3) or left empty (Type 2) where it is not, and the Specific Character
Set our object must declare. One log line per source names the attributes
changed, never their values. The README table "Tolerated header deviations"
lists the rules.

Standard library, pydicom and :mod:`dicomnode.phi` only.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DSfloat, PersonName, validate_value

from dicomnode import phi

log = logging.getLogger(__name__)

#: Type 2 in our objects and read directly by highdicom: present, maybe empty.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)

#: Root attributes of the modules highdicom copies into SR and SEG (Patient,
#: Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study),
#: the equipment a key image's Contributing Equipment copies, and what
#: :mod:`dicomnode.results` copies itself.
COPIED = (
    *TYPE2,
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainAdditionalInformation",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "PatientSpeciesDescription",
    "PatientBreedDescription",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ReferencedStudySequence",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "AdmissionID",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "PatientState",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "BodyPartExamined",
    "Laterality",
)

#: Enumerated values (PS3.3) of the coded strings we copy.
ENUMERATED = {
    "PatientSex": ("M", "F", "O"),
    "QualityControlSubject": ("YES", "NO"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "TypeOfPatientID": ("TEXT", "RFID", "BARCODE"),
    "SmokingStatus": ("YES", "NO", "UNKNOWN"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
    "Laterality": ("R", "L"),
    "LongitudinalTemporalEventType": ("ENROLLMENT", "BASELINE"),
}

#: Maximum characters per value (PS3.5 table 6.2-1).
_MAX_CHARS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UC": 2**32 - 2}
_MAX_CHARS |= {"UT": 2**32 - 2, "PN": 64 * 3 + 2}
_TEXT_VRS = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UC", "UT", "PN"})
#: control characters allowed in a text value (PS3.5 6.1.3: LF, FF, CR, TAB; ESC in ISO 2022)
_LONG_TEXT_CONTROLS = "\n\r\f\t"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ISO2022_ESCAPE = re.compile(r"\x1b[\x20-\x2f]+[\x30-\x7e]")
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DATE = re.compile(r"^\s*(\d{4})[-./]?(\d{2})[-./]?(\d{2})\s*$")
_TIME = re.compile(r"^\s*(\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d{1,}))?)?)?\s*$")
_DATETIME = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")

#: The output character set when the source's cannot hold the values.
UTF8 = "ISO_IR 192"


@dataclass(frozen=True, slots=True)
class PreparedHeader:
    """A cleaned copy of a source header and the character set our object declares."""

    dataset: Dataset
    #: Specific Character Set of the object built from it (None: default repertoire)
    character_set: str | list[str] | None
    #: attribute keyword -> what was done ("corrected", "left out", ...)
    changes: dict[str, str]

    def apply_character_set(self, ds: Dataset) -> None:
        """Declare our character set on an object built from this header."""
        if self.character_set is None:
            if "SpecificCharacterSet" in ds:
                del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = self.character_set


# -- values ---------------------------------------------------------------------------


def _date(value: str) -> tuple[str | None, bool]:
    """(valid DA or None, corrected)."""
    if value == "":
        return "", False
    m = _DATE.match(value)
    if not m:
        return None, False
    try:
        dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None, False
    text = m[1] + m[2] + m[3]
    return text, text != value


def _time(value: str) -> tuple[str | None, bool]:
    if value == "":
        return "", False
    m = _TIME.match(value)
    if not m:
        return None, False
    hh, mm, ss, frac = m[1], m[2], m[3], m[4]
    if int(hh) > 23 or (mm is not None and int(mm) > 59) or (ss is not None and int(ss) > 60):
        return None, False
    text = hh + (mm or "") + (ss or "") + (f".{frac[:6]}" if frac else "")
    return text, text != value


def _datetime(value: str) -> tuple[str | None, bool]:
    if value == "":
        return "", False
    text = value.strip()
    m = _DATETIME.match(text)
    if not m:
        return None, False
    try:
        dt.datetime(
            int(m[1]),
            int(m[2] or 1),
            int(m[3] or 1),
            int(m[4] or 0),
            int(m[5] or 0),
            min(int(m[6] or 0), 59),
        )
    except ValueError:
        return None, False
    return text, text != value


def _age(value: str) -> tuple[str | None, bool]:
    if value == "":
        return "", False
    m = _AGE.match(value)
    if not m:
        return None, False
    text = f"{int(m[1]):03d}{m[2].upper()}"
    return text, text != value


def _decimal(value: str) -> tuple[str | None, bool]:
    if value == "":
        return "", False
    text = value.strip()
    if _valid("DS", text):
        return text, text != value
    try:
        number = float(text.replace(",", "."))
    except ValueError:
        return None, False
    if not math.isfinite(number):
        return None, False
    return str(DSfloat(number, auto_format=True)), True


def _integer(value: str) -> tuple[str | None, bool]:
    if value == "":
        return "", False
    text = value.strip()
    if not re.fullmatch(r"[+-]?\d{1,12}", text) or not -(2**31) <= int(text) < 2**31:
        return None, False
    return text, text != value


def _text(value: str, vr: str, keyword: str) -> tuple[str | None, bool]:
    allowed = _LONG_TEXT_CONTROLS if vr in ("ST", "LT", "UT") else ""
    # pydicom leaves the escape sequences of ISO 2022 IR 58 in the decoded text
    text = _ISO2022_ESCAPE.sub("", value)
    text = _CONTROL.sub(lambda m: m[0] if m[0] in allowed else " ", text)
    if vr in ("SH", "LO", "CS", "AE", "PN", "UC"):
        text = text.replace("\\", " ")  # a backslash separates values
    if vr == "CS":
        text = text.strip().upper()
        if keyword in ENUMERATED:
            if text not in ENUMERATED[keyword]:
                return None, False
        elif not re.fullmatch(r"[A-Z0-9 _]*", text):
            return None, False
    if vr == "PN":
        groups = text.split("=")[:3]
        cleaned = []
        for group in groups:
            parts = group.split("^")
            if len(parts) > 5:
                parts = [*parts[:4], " ".join(parts[4:])]
            cleaned.append("^".join(parts)[:64])
        text = "=".join(cleaned)
    else:
        text = text[: _MAX_CHARS.get(vr, len(text))]
    return text, text != value


def _clean_value(value: Any, vr: str, keyword: str) -> tuple[Any, bool]:
    """One value: (the valid value or None to leave it out, corrected)."""
    raw = "" if value is None else str(value)
    if vr == "DA":
        return _date(raw)
    if vr == "TM":
        return _time(raw)
    if vr == "DT":
        return _datetime(raw)
    if vr == "AS":
        return _age(raw)
    if vr == "DS":
        return _decimal(raw)
    if vr == "IS":
        return _integer(raw)
    if vr in _TEXT_VRS:
        return _text(raw, vr, keyword)
    return value, False


def _valid(vr: str, value: Any) -> bool:
    """pydicom's own check (it raises on assignment in highdicom otherwise)."""
    if value in (None, ""):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validate_value(vr, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _clean_element(elem: DataElement, keyword: str) -> str | None:
    """Clean ``elem`` in place; returns what was done, or None when it was valid.
    "left out" means: remove the element (or empty it, for Type 2)."""
    vr = str(elem.VR)
    if vr == "SQ":
        changed = False
        for item in elem.value:
            for inner in list(item):
                done = _clean_element(inner, inner.keyword or "")
                if done == "left out":
                    del item[inner.tag]
                changed = changed or done is not None
        return "corrected" if changed else None
    if vr == "US" and keyword == "PregnancyStatus":
        return None if elem.value in (None, 1, 2, 3, 4) else "left out"
    if vr not in _TEXT_VRS and vr not in {"DA", "TM", "DT", "AS", "DS", "IS"}:
        return None
    values = list(elem.value) if isinstance(elem.value, MultiValue | list) else [elem.value]
    single = not isinstance(elem.value, MultiValue | list)
    corrected = False
    if not single and _vm_one(keyword):
        values, single, corrected = values[:1], True, True  # keep the first value
    cleaned: list[Any] = []
    for value in values:
        new, fixed = _clean_value(value, vr, keyword)
        if new is None or not _valid(vr, new):
            if single:
                return "left out"
            corrected = True
            continue
        corrected = corrected or fixed
        cleaned.append(new)
    if not corrected:
        return None
    if vr == "PN":
        cleaned = [PersonName(v) for v in cleaned]
    elem.value = cleaned[0] if single else cleaned
    return "corrected"


def _vm_one(keyword: str) -> bool:
    try:
        return bool(keyword) and dictionary_VM(keyword) == "1"
    except KeyError:
        return False


def _clean(ds: Dataset) -> dict[str, str]:
    changes: dict[str, str] = {}
    for keyword in COPIED:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            continue
        try:
            elem = ds[tag]
            if elem.VR == "SQ":
                elem = copy.deepcopy(elem)  # never change the caller's items
                ds[tag] = elem
            done = _clean_element(elem, keyword)
        except Exception:  # undecodable, unparsable: nothing to copy
            done = "left out"
        if done == "left out":
            del ds[tag]
            changes[keyword] = "left empty" if keyword in TYPE2 else "left out"
        elif done is not None:
            changes[keyword] = done
    for keyword in TYPE2:
        if keyword not in ds:
            ds.add_new(keyword, dictionary_VR(keyword), None)
            changes.setdefault(keyword, "added empty")
    return changes


# -- character set --------------------------------------------------------------------


def _terms(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()]
    return [str(v).strip() for v in value]


#: Defined Terms of Specific Character Set (PS3.3 C.12.1.1.2); pydicom encodes
#: those in its ``python_encoding`` only.
DEFINED_TERMS = frozenset(
    [f"ISO_IR {n}" for n in (100, 101, 109, 110, 144, 127, 126, 138, 148, 203, 13, 166, 192)]
    + [f"ISO 2022 IR {n}" for n in (6, 100, 101, 109, 110, 144, 127, 126, 138, 148, 203)]
    + [f"ISO 2022 IR {n}" for n in (13, 166, 87, 159, 149, 58)]
    + ["GB18030", "GBK"]
)


def _known(terms: list[str]) -> bool:
    """A Specific Character Set as PS3.3 C.12.1.1.2 allows it (and pydicom can encode)."""
    usable = DEFINED_TERMS & set(python_encoding)
    if not terms or not all(t in usable or (i == 0 and t == "") for i, t in enumerate(terms)):
        return False
    if len(terms) == 1:
        return terms[0] != "" and not terms[0].startswith("ISO 2022")
    first, rest = terms[0], terms[1:]
    return (first == "" or first.startswith("ISO 2022")) and all(
        t.startswith("ISO 2022") for t in rest
    )


def _text_elements(ds: Dataset) -> list[DataElement]:
    out = []
    for keyword in COPIED:
        tag = tag_for_keyword(keyword)
        elem = ds.get(tag) if tag is not None else None  # the element, not its value
        if elem is not None and elem.value not in (None, "") and elem.VR in _TEXT_VRS | {"SQ"}:
            out.append(elem)
    return out


def _round_trips(elements: Sequence[DataElement], charset: str | list[str] | None) -> bool:
    """Whether the values written under ``charset`` read back equal."""
    probe = Dataset()
    if charset is not None:
        probe.SpecificCharacterSet = charset
    for elem in elements:
        probe.add(copy.deepcopy(elem))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, probe)
            back = read_dataset(io.BytesIO(fp.getvalue()), False, True)
            for elem in elements:
                if _plain(back[elem.tag].value) != _plain(elem.value):
                    return False
    except Exception:  # UnicodeError, or pydicom refusing the value
        return False
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, DicomSequence):  # its items' values
        return [[(e.tag, _plain(e.value)) for e in item] for item in value]
    if isinstance(value, MultiValue | list):
        return [_plain(v) for v in value]
    return "" if value is None else str(value)


def _output_charset(ds: Dataset, source_charset: Any) -> str | list[str] | None:
    terms = _terms(source_charset)
    elements = _text_elements(ds)
    ascii_only = all(_plain(e.value) == _ascii(_plain(e.value)) for e in elements)
    declared: str | list[str] | None = None
    if _known(terms):
        declared = terms[0] if len(terms) == 1 else terms
    if declared is None and ascii_only:
        return None
    if declared is not None and (ascii_only or _round_trips(elements, declared)):
        return declared
    return UTF8


def _ascii(value: Any) -> Any:
    if isinstance(value, list):
        return [_ascii(v) for v in value]
    return str(value).encode("ascii", "replace").decode("ascii")


# -- entry point ----------------------------------------------------------------------


def prepare(source: Dataset) -> PreparedHeader:
    """A cleaned copy of ``source`` to build our objects from (pixel data not needed).

    The copy shares no mutable value with ``source``; attributes other than the
    copied patient, study and equipment ones (geometry, UIDs) are the source's.
    """
    phi.remember(source)
    clean = Dataset()
    clean.update(source)  # raw elements, decoded on use with the source's character set
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    source_charset = source.get("SpecificCharacterSet")
    try:
        changes = _clean(clean)
        charset = _output_charset(clean, source_charset)
    except Exception as exc:  # never fail a job on a header
        log.warning(
            "header of sop=%s: cannot be checked (%s); patient and study attributes left out",
            source.get("SOPInstanceUID", "?"),
            type(exc).__name__,
        )
        clean = _minimal(source)
        changes, charset = {"*": "left out"}, None
    if changes:
        log.info(
            "header of sop=%s: %s",
            source.get("SOPInstanceUID", "?"),
            ", ".join(f"{k} {v}" for k, v in sorted(changes.items())),
        )
    return PreparedHeader(clean, charset, changes)


def _minimal(source: Dataset) -> Dataset:
    """Everything but the copied attributes, which are empty (Type 2) or left out."""
    clean = Dataset()
    clean.update(source)
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    for keyword in COPIED:
        tag = tag_for_keyword(keyword)
        if tag is not None and tag in clean:
            del clean[tag]
    for keyword in TYPE2:
        clean.add_new(keyword, dictionary_VR(keyword), None)
    if "SpecificCharacterSet" in clean:
        del clean.SpecificCharacterSet
    return clean


def prepare_all(sources: Sequence[Dataset]) -> tuple[list[Dataset], PreparedHeader]:
    """``sources`` with the first (the one highdicom copies patient and study
    attributes from) replaced by its cleaned copy, and that copy."""
    if not sources:
        raise ValueError("no source datasets")
    first = prepare(sources[0])
    return [first.dataset, *sources[1:]], first


__all__ = ["COPIED", "TYPE2", "UTF8", "PreparedHeader", "prepare", "prepare_all"]
