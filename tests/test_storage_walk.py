"""dicomnode.storage.check_structure: every element is walked, nothing decoded.

Complete datasets in every transfer syntax the listener accepts pass; the same
datasets truncated or overwritten with garbage raise MalformedDataset.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.storage import DEFLATED, MalformedDataset, check_structure, dataset_offset

#: pydicom's own test files, one per transfer syntax family
SAMPLES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000 (encapsulated)
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless (encapsulated)
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline (encapsulated)
    "rtplan.dcm": "1.2.840.10008.1.2",  # nested sequences, undefined lengths
    "reportsi.dcm": "1.2.840.10008.1.2.1",  # an SR: deeply nested sequences
}


def sample(name: str) -> tuple[bytes, str]:
    path = Path(str(get_testdata_file(name)))
    ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return path.read_bytes(), ts


def check(tmp_path: Path, data: bytes, ts: str) -> None:
    path = tmp_path / "received.dcm"
    path.write_bytes(data)
    check_structure(path, ts)


def payload_end(data: bytes, ts: str) -> int:
    """Where the dataset's own bytes end (a deflate stream may have a trailer)."""
    if ts != DEFLATED:
        return len(data)
    start = dataset_offset(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflater.decompress(data[start:])
    assert inflater.eof
    return len(data) - len(inflater.unused_data)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_in_its_own_syntax_passes(tmp_path: Path, name: str) -> None:
    data, ts = sample(name)
    assert ts == SAMPLES[name]
    check(tmp_path, data, ts)


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "reportsi.dcm"])
@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
    ids=lambda uid: uid.name,
)
def test_transcoded_samples_pass(tmp_path: Path, name: str, syntax: str) -> None:
    ds = dcmread(str(get_testdata_file(name)))
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / "transcoded.dcm"
    if syntax == ExplicitVRBigEndian:
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(path, enforce_file_format=True)
    assert str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    check_structure(path, syntax)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_truncations_are_refused(tmp_path: Path, name: str) -> None:
    data, ts = sample(name)
    start = dataset_offset(data)
    end = payload_end(data, ts)
    cuts = sorted(
        {start + 1, start + 4, start + 7, start + 9, (start + end) // 2, end - 9, end - 2, end - 1}
    )
    for cut in cuts:
        with pytest.raises(MalformedDataset):
            check(tmp_path, data[:cut], ts)
    # a file cut inside its file meta information
    for cut in (0, 100, 131, 135, start - 1):
        with pytest.raises(MalformedDataset):
            check(tmp_path, data[:cut], ts)


def test_deflate_trailer_is_not_part_of_the_dataset(tmp_path: Path) -> None:
    """image_dfl.dcm carries 8 bytes after its deflate stream; cutting only
    those leaves a complete dataset, cutting one byte more does not."""
    data, ts = sample("image_dfl.dcm")
    end = payload_end(data, ts)
    assert end < len(data)
    check(tmp_path, data[:end], ts)
    with pytest.raises(MalformedDataset, match="truncated"):
        check(tmp_path, data[: end - 1], ts)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_garbage_dataset_is_refused(tmp_path: Path, name: str) -> None:
    data, ts = sample(name)
    start = dataset_offset(data)
    rng = random.Random(name)
    for _ in range(25):
        with pytest.raises(MalformedDataset):
            check(tmp_path, data[:start] + rng.randbytes(len(data) - start), ts)
    # the first element header overwritten
    with pytest.raises(MalformedDataset):
        check(tmp_path, data[:start] + b"\xff" * 16 + data[start + 16 :], ts)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_wrong_transfer_syntax_is_refused(tmp_path: Path, name: str) -> None:
    """Explicit VR bytes read as deflate, or deflate read as explicit VR, fail."""
    data, ts = sample(name)
    other = ExplicitVRLittleEndian if ts == DEFLATED else DEFLATED
    with pytest.raises(MalformedDataset):
        check(tmp_path, data, other)


def test_empty_and_meta_only(tmp_path: Path) -> None:
    data, ts = sample("CT_small.dcm")
    with pytest.raises(MalformedDataset, match="empty"):
        check(tmp_path, b"", ts)
    with pytest.raises(MalformedDataset, match="dataset is empty"):
        check(tmp_path, data[: dataset_offset(data)], ts)


def test_not_dicom(tmp_path: Path) -> None:
    with pytest.raises(MalformedDataset, match="no DICOM file meta"):
        check(tmp_path, b"GIF89a" + b"\x00" * 300, ExplicitVRLittleEndian)
    garbage = random.Random(7).randbytes(4096)
    with pytest.raises(MalformedDataset):
        check(tmp_path, garbage, ImplicitVRLittleEndian)


def test_malformed_is_a_value_error() -> None:
    assert issubclass(MalformedDataset, ValueError)
