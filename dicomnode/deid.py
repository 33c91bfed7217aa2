"""De-identification by the DICOM PS3.15 Annex E Basic Application Level
Confidentiality Profile, with UIDs remapped consistently across a set of objects.

The profile's table (PS3.15 Table E.1-1: which attribute gets which action) is
the one the ``dicom-anonymizer`` package (Kitware, BSD-3) generates from the
standard, release 2026c (:data:`TABLE_RELEASE`). Its own actions do not fit a set
of objects that reference each other (it empties the Referenced Image and Source
Image sequences, replaces an SR's Content Sequence wholesale and keeps one
module-global UID map), so they are implemented here:

- every element, at every depth of every sequence, gets its table action;
  attributes the table does not name are kept (and, when they are sequences,
  their items are processed the same way); private attributes are removed;
- ``U``: every instance UID (the table's, and any UI value that is not a UID
  the standard itself registers, such as a SOP Class) is replaced by
  ``2.25.<128 bits>`` derived from it under a key of this export, so the same old
  UID gives the same new one in every object of the set (a SEG's referenced
  images, an SR's referenced SEG, image and map, an image's frame of reference)
  and, the key being random and never written, nobody can link an exported UID to
  its original;
- ``D``: a dummy value of the VR (``ANONYMIZED``, 19000101, 0); ``Z``: empty;
  ``X``: removed; of the table's alternatives the choice that keeps an object
  valid without knowing its IOD: ``X/Z`` empty, ``X/D``, ``Z/D`` and ``X/Z/D`` a
  dummy (a Type 1 attribute stays valid; as sequences ``X/D`` is removed and
  ``X/Z/D`` emptied), ``X/Z/U*`` the sequence kept with its UIDs replaced;
  ``D`` on a sequence (an SR's Content Sequence) keeps the items, processed like
  the rest;
- Patient ID and Patient's Name become one pseudonym per original patient of the
  set (``DEID-<hex>``, ``DEID^<hex>``; a ``Z`` allows a dummy value): the objects
  of one patient stay together;
- a safety net: any text value still holding an identifying value removed
  elsewhere in the set (a name, an ID, an accession number, a date) has it
  replaced by ``***``.

Options (PS3.15 E.3): ``retain_dates`` is Retain Longitudinal Temporal
Information with Full Dates (dates and times kept, not the patient's birth date
and time); ``clean_descriptors`` is Clean Descriptors (the descriptions and
comments of :data:`CLEAN_DESCRIPTORS` are kept, cleaned of the set's identifying
values, instead of removed). The objects are marked: Patient Identity Removed
YES, De-identification Method and its code sequence (CID 7050), Longitudinal
Temporal Information Modified.

Pure functions of datasets; nothing is logged (values are never written anywhere
but the objects). Pixel data is not changed: callers leave out images with burned
in annotation (Clean Pixel Data is not offered).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, UID_dictionary

from dicomnode.constants import SOFTWARE_VERSION
from dicomnode.uids import derived_uid

#: the release of PS3.15 Table E.1-1 the actions come from
TABLE_RELEASE = "dicomfields_2026c"

#: Annex E actions (the table's names for them)
Action = str

_GROUPS: dict[str, Action] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

#: Clean Descriptors Option: attributes kept, cleaned, instead of removed
CLEAN_DESCRIPTORS = frozenset(
    {
        "AcquisitionComments",
        "AcquisitionDeviceProcessingDescription",
        "AcquisitionProtocolDescription",
        "AdditionalPatientHistory",
        "AdmittingDiagnosesDescription",
        "Allergies",
        "ClinicalTrialSeriesDescription",
        "ClinicalTrialTimePointDescription",
        "CommentsOnThePerformedProcedureStep",
        "ContrastBolusAgent",
        "DerivationDescription",
        "DischargeDiagnosisDescription",
        "FrameComments",
        "ImageComments",
        "ImagePresentationComments",
        "ImagingServiceRequestComments",
        "InterpretationDiagnosisDescription",
        "LabelText",
        "MedicalAlerts",
        "ModifiedImageDescription",
        "Occupation",
        "PatientComments",
        "PatientState",
        "PerformedProcedureStepDescription",
        "ProtocolName",
        "ReasonForStudy",
        "ReasonForTheRequestedProcedure",
        "RequestedContrastAgent",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepDescription",
        "SeriesDescription",
        "ServiceEpisodeDescription",
        "StudyDescription",
        "VisitComments",
    }
)

#: UI attributes that name a class, a syntax or a scheme, never an instance: kept
_UI_KEEP = frozenset(
    {
        "SOPClassUID",
        "ReferencedSOPClassUID",
        "MediaStorageSOPClassUID",
        "AffectedSOPClassUID",
        "RequestedSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "TransferSyntaxUID",
        "ReferencedTransferSyntaxUIDInFile",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextUID",
        "MappingResourceUID",
        "ContextGroupExtensionCreatorUID",
        "PrivateInformationCreatorUID",
        "SOPClassesInStudy",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
    }
)

_DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_BIRTH = frozenset({"PatientBirthDate", "PatientBirthTime"})
_DUMMY: dict[str, Any] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "",
}
_NUMERIC = frozenset({"FD", "FL", "SS", "US", "SL", "UL", "SV", "UV", "AT"})
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: CID 7050 De-identification Methods
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS_OPTION = ("113105", "Clean Descriptors Option")
RETAIN_DATES_OPTION = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")

#: identifying values shorter than this are not searched for in text (they would
#: match everywhere: "M", "1")
_MIN_NEEDLE = 4
_DATE_TEXT = re.compile(r"^\d{8}")


class DeidError(ValueError):
    """The profile's table cannot be loaded, or an object cannot be de-identified."""


@dataclass(frozen=True)
class Profile:
    """The Annex E table: action by tag, plus the masked ranges (overlays, curves)."""

    actions: dict[int, Action]
    ranges: tuple[tuple[int, int, int, int, Action], ...]

    def action(self, tag: BaseTag) -> Action | None:
        found = self.actions.get(int(tag))
        if found is not None:
            return found
        group, element = tag.group, tag.element
        for g, e, gmask, emask, act in self.ranges:
            if group & gmask == g & gmask and element & emask == e & emask:
                return act
        return None


def load_profile(release: str = TABLE_RELEASE) -> Profile:
    """Table E.1-1 of ``release`` from the ``dicom-anonymizer`` package."""
    try:
        from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    except ImportError as exc:  # a runtime dependency: a broken install
        raise DeidError(f"the de-identification table is not installed ({exc})") from None
    try:
        groups = dicom_anonymization_database_selector(release)
    except ValueError as exc:
        raise DeidError(f"de-identification table {release!r}: {exc}") from None
    actions: dict[int, Action] = {}
    ranges: list[tuple[int, int, int, int, Action]] = []
    for name, action in _GROUPS.items():
        for entry in groups.get(name, []):
            if len(entry) == 4:
                ranges.append((entry[0], entry[1], entry[2], entry[3], action))
            else:
                actions[int(Tag(entry[0], entry[1]))] = action
    # the file meta information is rebuilt, never copied
    return Profile(actions, tuple(ranges))


@dataclass(frozen=True)
class Options:
    retain_dates: bool = False  # Retain Longitudinal Temporal Information, Full Dates
    clean_descriptors: bool = False

    def method(self) -> str:
        parts = ["DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"]
        if self.clean_descriptors:
            parts.append("Clean Descriptors Option")
        if self.retain_dates:
            parts.append("Retain Longitudinal Temporal Information Full Dates Option")
        return f"{'; '.join(parts)} (pacs-ai {SOFTWARE_VERSION})"[:64]

    def codes(self) -> list[tuple[str, str]]:
        out = [BASIC_PROFILE]
        if self.clean_descriptors:
            out.append(CLEAN_DESCRIPTORS_OPTION)
        if self.retain_dates:
            out.append(RETAIN_DATES_OPTION)
        return out


def _values(elem: DataElement) -> list[str]:
    """The element's values as stripped, non-empty strings."""
    value = elem.value
    if value is None:
        return []
    items = value if _is_multi(value) else [value]
    return [text for text in (str(v).strip() for v in items) if text]


def _is_multi(value: Any) -> bool:
    return isinstance(value, list | tuple | MultiValue)


@dataclass
class Deidentifier:
    """De-identifies a set of objects consistently (one instance per export)."""

    options: Options = field(default_factory=Options)
    profile: Profile = field(default_factory=load_profile)
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    uids: dict[str, str] = field(default_factory=dict, repr=False)
    needles: set[str] = field(default_factory=set, repr=False)
    pseudonyms: dict[str, str] = field(default_factory=dict, repr=False)
    _pattern: tuple[int, re.Pattern[str] | None] | None = field(default=None, repr=False)

    # -- the set's identifying values ---------------------------------------------------

    def learn(self, datasets: Iterable[Dataset]) -> None:
        """Remember the identifying values of ``datasets`` (call with every object of
        the set before the first :meth:`apply`): the values the profile removes or
        replaces are searched for, and cleaned, wherever text is kept."""
        for ds in datasets:
            self._learn(ds)

    def _learn(self, ds: Dataset) -> None:
        for elem in ds:
            if elem.tag.is_private:
                self._add_needles(elem)
                continue
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self._learn(item)
                continue
            action = self.profile.action(elem.tag)
            if action is None or action == "U" or elem.VR == "UI":
                continue
            keyword = keyword_for_tag(elem.tag)
            if self.options.retain_dates and elem.VR in _DATE_VRS and keyword not in _BIRTH:
                continue
            if self.options.clean_descriptors and keyword in CLEAN_DESCRIPTORS:
                continue  # kept, cleaned: not itself a value to clean away
            self._add_needles(elem)

    def _add_needles(self, elem: DataElement) -> None:
        if elem.VR in _BINARY or elem.VR == "SQ":
            return
        for text in _values(elem):
            parts = {text}
            if elem.VR == "PN":
                parts |= {p.strip() for p in re.split(r"[\^=]", text)}
            if elem.VR == "DA" and _DATE_TEXT.match(text):
                parts.add(f"{text[:4]}-{text[4:6]}-{text[6:8]}")
            self.needles |= {p for p in parts if len(p) >= _MIN_NEEDLE}

    def clean_text(self, text: str) -> str:
        """``text`` with every identifying value of the set replaced by ``***``."""
        if self._pattern is None or self._pattern[0] != len(self.needles):
            ordered = sorted(self.needles, key=len, reverse=True)
            joined = "|".join(re.escape(n) for n in ordered)
            self._pattern = (len(self.needles), re.compile(joined, re.I) if ordered else None)
        pattern = self._pattern[1]
        return pattern.sub("***", text) if pattern is not None else text

    # -- UIDs ----------------------------------------------------------------------------------

    def new_uid(self, old: str) -> str:
        """The UID that replaces ``old`` in this set (the same every time)."""
        old = str(old).strip().rstrip("\x00")
        if not old:
            return old
        new = self.uids.get(old)
        if new is None:
            new = derived_uid("2.25", "deid", self.key.hex(), old)
            self.uids[old] = new
        return new

    def pseudonym(self, patient_id: str) -> str:
        """One pseudonym per original patient ID of the set."""
        found = self.pseudonyms.get(patient_id)
        if found is None:
            digest = hashlib.sha256(self.key + patient_id.encode("utf-8", "replace")).hexdigest()
            found = f"DEID-{digest[:12].upper()}"
            self.pseudonyms[patient_id] = found
        return found

    # -- one object ----------------------------------------------------------------------------

    def apply(self, source: Dataset) -> Dataset:
        """A de-identified copy of ``source`` (which is not changed), with new file
        meta information."""
        ds = _deep_copy(source)  # elements are replaced, never changed in place
        patient = str(source.get("PatientID", "") or "")
        self._process(ds, top=True)
        pseudo = self.pseudonym(patient)
        ds.PatientID = pseudo
        ds.PatientName = pseudo.replace("-", "^", 1)  # DEID^<hex>: family and given name
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.options.method()
        items = []
        for value, meaning in self.options.codes():
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if self.options.retain_dates else "REMOVED"
        )
        if "SpecificCharacterSet" not in ds and _needs_utf8(ds):
            ds.SpecificCharacterSet = "ISO_IR 192"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        old_meta = getattr(source, "file_meta", None)
        syntax = old_meta.get("TransferSyntaxUID") if old_meta is not None else None
        meta.TransferSyntaxUID = UID(str(syntax or ExplicitVRLittleEndian))
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        return ds

    def _process(self, ds: Dataset, top: bool = False) -> None:
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                del ds[tag]
                continue
            if tag.group == 0x0002:
                del ds[tag]  # file meta in the body: rebuilt
                continue
            keyword = keyword_for_tag(tag)
            action = self.profile.action(tag)
            vr = elem.VR
            if self.options.retain_dates and vr in _DATE_VRS and keyword not in _BIRTH:
                continue  # Retain Longitudinal Temporal Information: kept as it is
            if self.options.clean_descriptors and keyword in CLEAN_DESCRIPTORS and vr != "SQ":
                ds[tag] = self._cleaned(elem)
                continue
            if vr == "SQ":
                self._sequence(ds, elem, action)
                continue
            if vr == "UI":
                if action == "U" or (keyword not in _UI_KEEP and _is_instance_uid(elem)):
                    ds[tag] = self._uids(elem)
                continue
            if action is None:
                if vr in _TEXT_VRS and self.needles:
                    ds[tag] = self._cleaned(elem)
                elif vr in _DATE_VRS and any(v in self.needles for v in _values(elem)):
                    ds[tag] = DataElement(tag, vr, _dummy(vr))  # a date seen elsewhere
                continue
            if action == "X":
                del ds[tag]
            elif action in ("Z", "X/Z", "X/Z/U*"):
                ds[tag] = DataElement(tag, vr, _empty(vr))
            else:  # D, Z/D, X/D, X/Z/D (may be Type 1), and U on a non-UI element
                ds[tag] = DataElement(tag, vr, _dummy(vr))

    def _sequence(self, ds: Dataset, elem: DataElement, action: Action | None) -> None:
        if action in ("X", "X/D"):
            del ds[elem.tag]
            return
        if action in ("Z", "X/Z", "X/Z/D"):
            ds[elem.tag] = DataElement(elem.tag, "SQ", DicomSequence([]))
            return
        # kept (K), D (an SR's content: its items de-identified) or X/Z/U*
        for item in elem.value or []:
            self._process(item)

    def _uids(self, elem: DataElement) -> DataElement:
        values = _values(elem)
        if elem.VM > 1 or _is_multi(elem.value):
            return DataElement(elem.tag, "UI", [self.new_uid(v) for v in values])
        return DataElement(elem.tag, "UI", self.new_uid(values[0]) if values else "")

    def _cleaned(self, elem: DataElement) -> DataElement:
        if elem.VR not in _TEXT_VRS or elem.value is None:
            return elem
        clean: Callable[[str], str] = self.clean_text
        if isinstance(elem.value, str):
            return DataElement(elem.tag, elem.VR, clean(elem.value))
        if elem.VR == "PN" or not _is_multi(elem.value):
            return DataElement(elem.tag, elem.VR, clean(str(elem.value)))
        return DataElement(elem.tag, elem.VR, [clean(str(v)) for v in elem.value])


def _deep_copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add(
                DataElement(
                    elem.tag, "SQ", DicomSequence([_deep_copy(i) for i in elem.value or []])
                )
            )
        else:
            out.add(DataElement(elem.tag, elem.VR, elem.value))
    return out


def _is_instance_uid(elem: DataElement) -> bool:
    """A UI value that the standard does not register (a SOP Class, a transfer
    syntax, a coding scheme are registered): an instance's, replaced."""
    return any(v not in UID_dictionary for v in _values(elem))


def _empty(vr: str) -> Any:
    if vr in _NUMERIC:
        return None
    if vr in _BINARY:
        return b""
    return ""


def _dummy(vr: str) -> Any:
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr == "PN":
        return "ANONYMIZED^"
    if vr in _NUMERIC:
        return 0
    if vr in _BINARY:
        return b""
    return "ANONYMIZED"


def _needs_utf8(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR in _TEXT_VRS and isinstance(elem.value, str):
            try:
                elem.value.encode("ascii")
            except UnicodeEncodeError:
                return True
    return False


__all__ = [
    "CLEAN_DESCRIPTORS",
    "TABLE_RELEASE",
    "DeidError",
    "Deidentifier",
    "Options",
    "Profile",
    "load_profile",
]
