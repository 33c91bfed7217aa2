"""Odd source headers and character sets never fail a result object, and what we
copy is valid (dciodvfy, 0 errors) and reads back equal (dicomnode/headers.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.headers import UTF8, prepare
from dicomnode.results import (
    CodeSpec,
    Finding,
    ModelSpec,
    SegInput,
    SegmentSpec,
    build_key_image,
    build_seg,
    build_sr,
)
from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import dciodvfy_errors, have

LUNG = CodeSpec("39607008", "SCT", "Lung")
ANATOMY = CodeSpec("91723000", "SCT", "Anatomical structure")
SEG_MODEL = ModelSpec("chest-ct-lung-seg", "1.0.0", "ab" * 32)
CLS_MODEL = ModelSpec("chest-ct-nodule-cls", "2.1.0", "cd" * 32)


def _raw(ds: Dataset, keyword: str, value: str | bytes, encoding: str = "latin-1") -> None:
    """Put a value into ``ds`` as a file would hold it: bytes, never validated."""
    data = value if isinstance(value, bytes) else value.encode(encoding)
    if len(data) % 2:
        data += b" "
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = RawDataElement(Tag(tag), dictionary_VR(keyword), len(data), data, 0, False, True)


def _sources(folder: Path, edit: Any, slices: int = 6) -> list[Dataset]:
    """A small CT phantom whose headers ``edit`` changes, written and read back
    (so values are decoded from bytes as a received file's are)."""
    phantom = generate_chest_ct(7, matrix=64, slices=slices, nodule=True, nodule_diameter_mm=12.0)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Dataset] = []
    for i, ds in enumerate(phantom_to_datasets(phantom, seed=7)):
        edit(ds)
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(dcmread(path))
    return out


def _objects(sources: list[Dataset], folder: Path) -> dict[str, Path]:
    """SEG, SR and key image built from ``sources``, written; their paths."""
    labels = np.zeros((len(sources), 64, 64), dtype=np.uint8)
    labels[:, 20:40, 20:40] = 1
    seg = build_seg(SegInput(SEG_MODEL, labels, sources, [SegmentSpec(1, LUNG, ANATOMY)]), "2.25")
    findings = [
        Finding(
            CLS_MODEL,
            "classification",
            LUNG,
            present=True,
            probability=0.7,
            key_sop_instance_uid=str(sources[2].SOPInstanceUID),
        ),
        Finding(SEG_MODEL, "segmentation", LUNG, present=True, volume_ml=12.5, label_value=1),
    ]
    sr = build_sr(findings, sources, {SEG_MODEL.name: seg}, "2.25")
    ki = build_key_image(
        sources[2],
        np.asarray(sources[2].pixel_array),
        labels[2].astype(bool),
        ["Lung 12.50 cm3", "chest-ct-lung-seg 1.0.0"],
        [SEG_MODEL],
        "2.25",
    )
    paths = {}
    for kind, ds in (("seg", seg), ("sr", sr), ("ki", ki)):
        paths[kind] = folder / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


def _check_valid(paths: dict[str, Path]) -> None:
    if have("dciodvfy"):
        for kind, path in paths.items():
            assert dciodvfy_errors(path) == [], kind


# -- tolerated deviations --------------------------------------------------------------


CANARY = "Qxzcanary"

ODD: dict[str, str | bytes] = {
    "PatientSex": "U",
    "PatientAge": "45",
    "PatientName": f"{CANARY}MUSTERMANN",  # no ^
    "PatientBirthDate": "1970-13-45",
    "StudyDate": "2021-03-04",
    "StudyTime": "12:30:00.1234567",
    "AccessionNumber": f"{CANARY}-ACCESSION-0123456789",
    "ReferringPhysicianName": "DR " + "X" * 80,
    "StudyDescription": f"{CANARY} chest\x01 " + "y" * 80,
    "InstitutionName": f"{CANARY} Hospital",
    "PatientWeight": "70 kg",
    "PatientSize": "1,75",
    "BodyPartExamined": "chest",
    "Laterality": "B",
}


def _odd(ds: Dataset) -> None:
    for keyword, value in ODD.items():
        _raw(ds, keyword, value)
    del ds.StudyID


def test_odd_headers_give_valid_objects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sources = _sources(tmp_path / "src", _odd)
    with caplog.at_level(logging.INFO, logger="dicomnode.headers"):
        paths = _objects(sources, tmp_path)
    _check_valid(paths)
    for kind, path in paths.items():
        ds = dcmread(path)
        assert ds.PatientSex == "", kind  # Type 2: present, empty
        assert "PatientAge" not in ds or ds.PatientAge == "", kind
        assert str(ds.PatientName) == f"{CANARY}MUSTERMANN", kind  # a name without ^ is fine
        assert ds.PatientBirthDate == "", kind
        assert ds.StudyDate == "20210304", kind  # corrected
        assert ds.StudyTime == "123000.123456", kind
        assert ds.AccessionNumber == f"{CANARY}-ACCESS", kind  # SH: 16 characters
        assert len(str(ds.ReferringPhysicianName)) == 64, kind
        assert ds.StudyID == "", kind
        if "PatientWeight" in ds:
            assert ds.PatientWeight is None
    seg = dcmread(paths["seg"])
    assert float(seg.PatientSize) == pytest.approx(1.75)
    assert len(seg.StudyDescription) == 64 and "\x01" not in seg.StudyDescription
    ki = dcmread(paths["ki"])
    assert ki.BodyPartExamined == "CHEST" and "Laterality" not in ki
    # the log names the attributes, never their values
    lines = [r.getMessage() for r in caplog.records if r.name == "dicomnode.headers"]
    assert lines and all("PatientSex left empty" in line for line in lines)
    assert all("StudyDate corrected" in line for line in lines)
    text = "\n".join(lines)
    assert CANARY not in text and "1970-13-45" not in text and "70 kg" not in text
    # the sources are not changed
    assert sources[0].PatientSex == "U" and "StudyID" not in sources[0]


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientSex", "U", ""),
        ("PatientSex", "unknown", ""),
        ("PatientSex", "f", "F"),
        ("PatientSex", "", ""),
        ("PatientAge", "", None),
        ("PatientAge", "45Y", "045Y"),
        ("PatientAge", "045y", "045Y"),
        ("PatientAge", "abcd", None),
        ("PatientBirthDate", "19700230", ""),
        ("PatientBirthDate", "1970.02.03", "19700203"),
        ("StudyTime", "25:00", ""),
        ("StudyTime", "0930", "0930"),
        ("PatientName", "NOCARET", "NOCARET"),
        ("PatientName", "A^B^C^D^E^F^G", "A^B^C^D^E F G"),
        ("AccessionNumber", "A\\B", "A"),  # VM 1: the first value
        ("PatientWeight", "NaN", None),
    ],
)
def test_one_deviation(keyword: str, value: str, expected: str | None) -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    _raw(ds, keyword, value)
    prepared = prepare(ds)
    got = prepared.dataset.get(keyword)
    if expected is None:
        assert got in (None, ""), got
    else:
        assert str(got if got is not None else "") == expected
    for type2 in ("PatientID", "StudyID", "AccessionNumber", "StudyDate"):
        assert type2 in prepared.dataset


def test_patient_sex_u_no_longer_fails_the_seg(tmp_path: Path) -> None:
    sources = _sources(tmp_path / "src", lambda ds: _raw(ds, "PatientSex", "U"))
    paths = _objects(sources, tmp_path)
    _check_valid(paths)
    assert dcmread(paths["seg"]).PatientSex == ""


# -- character sets --------------------------------------------------------------------


def _charset_file(name: str) -> Dataset:
    (path,) = get_charset_files(name)
    return dcmread(path)


def _from_file(name: str) -> tuple[Any, str]:
    ds = _charset_file(name)
    return ds.SpecificCharacterSet, str(ds.PatientName)


CHARSETS = {
    # name: (Specific Character Set of the source, patient name, expected output set)
    "utf8-chinese": (*_from_file("chrX1.dcm"), "ISO_IR 192"),
    "gb18030": (*_from_file("chrX2.dcm"), "GB18030"),
    "iso2022-ir87": (*_from_file("chrH31.dcm"), ["", "ISO 2022 IR 87"]),
    "iso2022-ir13-ir87": (*_from_file("chrH32.dcm"), ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    "iso2022-ir149": (*_from_file("chrI2.dcm"), ["", "ISO 2022 IR 149"]),
    # pydicom writes ISO 2022 IR 58 without its escape sequences: our objects use UTF-8
    "iso2022-ir58": (["", "ISO 2022 IR 58"], "Wang^XiaoDong=王^小东", UTF8),
    "latin1": (*_from_file("chrFren.dcm"), "ISO_IR 100"),
    "arabic": (*_from_file("chrArab.dcm"), "ISO_IR 127"),
    "greek": (*_from_file("chrGreek.dcm"), "ISO_IR 126"),
}


def _ir58(text: str) -> bytes:
    """ISO 2022 IR 58: ASCII, and GB2312 after ESC $ ) A in each run of Chinese
    characters (each component group starts in ASCII again)."""
    out = b""
    for i, group in enumerate(text.split("=")):
        if i:
            out += b"="
        if group.isascii():
            out += group.encode("ascii")
        else:
            out += b"\x1b$)A" + group.encode("gb2312")
    return out


@pytest.mark.parametrize("case", sorted(CHARSETS))
def test_character_sets_round_trip(tmp_path: Path, case: str) -> None:
    charset, name, expected = CHARSETS[case]
    description = "CT " + name.split("=")[-1].replace("^", " ")[:40]

    def edit(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        if "ISO 2022 IR 58" in charset:  # as PS3.5 H.3.2 encodes it: ESC $ ) A, GB2312
            _raw(ds, "PatientName", _ir58(name))
            _raw(ds, "StudyDescription", _ir58(description))
            _raw(ds, "ReferringPhysicianName", _ir58(name.split("=")[-1]))
            return
        ds.PatientName = name
        ds.StudyDescription = description
        ds.ReferringPhysicianName = name.split("=")[-1]

    sources = _sources(tmp_path / "src", edit, slices=4)
    if "ISO 2022 IR 58" not in charset:
        assert str(sources[0].PatientName) == name  # the source decodes right
    paths = _objects(sources, tmp_path)
    _check_valid(paths)
    for kind, path in paths.items():
        ds = dcmread(path)
        assert ds.SpecificCharacterSet == expected, kind
        assert str(ds.PatientName) == name, kind
        assert ds.StudyDescription == description, kind
        assert str(ds.ReferringPhysicianName) == name.split("=")[-1], kind


@pytest.mark.parametrize(
    ("charset", "value", "expected"),
    [
        (None, "Jérôme^Buc".encode("latin-1"), UTF8),  # not declared, not ASCII
        ("ISO-8859-1", "Jérôme^Buc".encode("latin-1"), UTF8),  # not a defined term
        ("ISO_IR 100", "Jérôme^Buc".encode("latin-1"), "ISO_IR 100"),
        (None, b"Buc^Jerome", None),
        ("ISO_IR 6", b"Buc^Jerome", None),  # not a defined term, but ASCII only
    ],
)
def test_undeclared_or_wrong_character_set(
    tmp_path: Path, charset: str | None, value: bytes, expected: str | None
) -> None:
    def edit(ds: Dataset) -> None:
        if charset is not None:
            _raw(ds, "SpecificCharacterSet", charset)
        elif "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        _raw(ds, "PatientName", value)

    sources = _sources(tmp_path / "src", edit, slices=4)
    decoded = str(sources[0].PatientName)
    paths = _objects(sources, tmp_path)
    _check_valid(paths)
    for kind, path in paths.items():
        ds = dcmread(path)
        assert ds.get("SpecificCharacterSet") == expected, kind
        assert str(ds.PatientName) == decoded, kind
