"""worker.pipeline.volume: decoding every accepted transfer syntax, series geometry, headers."""

from __future__ import annotations

import io
import random
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from worker.pipeline.volume import (
    Volume,
    VolumeError,
    decoder_status,
    describe_series_headers,
    load_series,
    patient_features,
)

TEST_FILES = Path(DATA_ROOT) / "test_files"
try:
    import data_store  # pydicom-data (dev dependency): the larger pydicom test files

    EXT_FILES: Path | None = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover
    EXT_FILES = None

needs_ext = pytest.mark.skipif(EXT_FILES is None, reason="pydicom-data not installed")


def ext(name: str) -> Path:
    assert EXT_FILES is not None
    return EXT_FILES / name


# ----------------------------------------------------------------------- builders


def image(
    *,
    pixels: np.ndarray,
    ipp: Sequence[float] | None = (0.0, 0.0, 0.0),
    iop: Sequence[float] | None = (1, 0, 0, 0, 1, 0),
    spacing: Sequence[float] | None = (0.7, 0.8),
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    sop_class: str = CTImageStorage,
    modality: str = "CT",
    series_uid: str = "1.2.3.4",
    **extra: object,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "CANARY^Volume"
    ds.PatientID = "CANARY-VOL"
    if ipp is not None:
        ds.ImagePositionPatient = [float(v) for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [float(v) for v in iop]
    if spacing is not None:
        ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 1.0
    arr = np.asarray(pixels)
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.PhotometricInterpretation = photometric
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed if signed is not None else arr.dtype.kind == "i")
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def stack(
    tmp: Path,
    positions: Sequence[Sequence[float]],
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    rows: int = 6,
    cols: int = 5,
) -> list[Path]:
    """One file per position; every pixel of slice i equals 100*i (its write order)."""
    out = []
    for i, ipp in enumerate(positions):
        px = np.full((rows, cols), 100 * i, dtype=np.int16)
        out.append(write(image(pixels=px, ipp=ipp, iop=iop), tmp / f"s{i:03d}.dcm"))
    return out


def assert_geometry_consistent(vol: Volume, positions: Sequence[Sequence[float]]) -> None:
    """Each slice's voxel (k, 0, 0) is at its file's ImagePositionPatient."""
    for k in range(vol.pixels.shape[0]):
        i = int(vol.pixels[k, 0, 0]) // 100
        np.testing.assert_allclose(vol.voxel_to_patient((k, 0, 0)), positions[i], atol=1e-6)


# ------------------------------------------------------------------------ ordering


def test_shuffled_axial_slices_sorted_by_position(tmp_path: Path) -> None:
    positions = [(-10.0, -20.0, -50.0 + 2.5 * i) for i in range(12)]
    paths = stack(tmp_path, positions)
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    vol = load_series(shuffled)
    assert vol.pixels.dtype == np.float32
    assert vol.pixels.shape == (12, 6, 5)
    assert [int(v) for v in vol.pixels[:, 0, 0]] == [100 * i for i in range(12)]
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_allclose(vol.origin, positions[0])
    np.testing.assert_allclose(vol.normal, (0, 0, 1))
    assert vol.frame_numbers == [1] * 12
    assert vol.positions_known and vol.uniform_spacing
    assert_geometry_consistent(vol, positions)
    # the UIDs follow the slices
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    assert [uids[u] for u in vol.sop_instance_uids] == paths


def test_reversed_normal_sorts_along_the_normal_not_z(tmp_path: Path) -> None:
    # col direction flipped: normal = row x col = (0, 0, -1), slices go head to feet
    iop = (1, 0, 0, 0, -1, 0)
    positions = [(0.0, 0.0, 3.0 * i) for i in range(6)]
    paths = stack(tmp_path, positions, iop=iop)
    vol = load_series(paths[::-1])
    np.testing.assert_allclose(vol.normal, (0, 0, -1))
    assert [int(v) // 100 for v in vol.pixels[:, 0, 0]] == [5, 4, 3, 2, 1, 0]
    np.testing.assert_allclose(vol.origin, positions[5])
    assert vol.spacing[0] == pytest.approx(3.0)
    assert_geometry_consistent(vol, positions)


def test_sagittal_and_tilted_orientations(tmp_path: Path) -> None:
    # sagittal: row = +y, col = -z, normal = -x
    sag = (0, 1, 0, 0, 0, -1)
    positions = [(20.0 - 1.5 * i, 0.0, 0.0) for i in range(5)]
    (tmp_path / "sag").mkdir()
    paths = stack(tmp_path / "sag", positions, iop=sag)
    vol = load_series(list(reversed(paths)))
    np.testing.assert_allclose(vol.normal, (-1, 0, 0))
    assert [int(v) // 100 for v in vol.pixels[:, 0, 0]] == [0, 1, 2, 3, 4]
    assert_geometry_consistent(vol, positions)

    # an oblique plane rotated about two axes
    a, b = np.deg2rad(23.0), np.deg2rad(-37.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rot = rx @ rz
    row, col = rot @ [1, 0, 0], rot @ [0, 1, 0]
    normal = np.cross(row, col)
    base = np.array([12.0, -40.0, 7.0])
    positions = [tuple(base + 2.0 * i * normal + 0.3 * row) for i in range(7)]
    (tmp_path / "obl").mkdir()
    paths = stack(tmp_path / "obl", positions, iop=(*row, *col))
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)
    vol = load_series(shuffled)
    assert [int(v) // 100 for v in vol.pixels[:, 0, 0]] == list(range(7))
    assert vol.spacing[0] == pytest.approx(2.0, abs=1e-6)
    np.testing.assert_allclose(vol.normal, normal, atol=1e-9)
    assert_geometry_consistent(vol, positions)


def test_never_ordered_by_instance_number(tmp_path: Path) -> None:
    positions = [(0.0, 0.0, float(i)) for i in range(4)]
    paths = stack(tmp_path, positions)
    for n, p in zip([3, 1, 4, 2], paths, strict=True):
        ds = dcmread(p)
        ds.InstanceNumber = n
        ds.save_as(p)
    vol = load_series(paths)
    assert [int(v) // 100 for v in vol.pixels[:, 0, 0]] == [0, 1, 2, 3]


# --------------------------------------------------------------- inconsistencies


def test_duplicate_positions_refused(tmp_path: Path) -> None:
    paths = stack(tmp_path, [(0, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 2)])
    with pytest.raises(VolumeError, match="duplicate slice positions"):
        load_series(paths)


def test_mixed_sizes_refused(tmp_path: Path) -> None:
    a = write(image(pixels=np.zeros((4, 4), np.int16), ipp=(0, 0, 0)), tmp_path / "a.dcm")
    b = write(image(pixels=np.zeros((4, 5), np.int16), ipp=(0, 0, 1)), tmp_path / "b.dcm")
    with pytest.raises(VolumeError, match="mixed image sizes"):
        load_series([a, b])


def test_mixed_orientations_refused(tmp_path: Path) -> None:
    a = write(image(pixels=np.zeros((4, 4), np.int16), ipp=(0, 0, 0)), tmp_path / "a.dcm")
    b = write(
        image(pixels=np.zeros((4, 4), np.int16), ipp=(0, 0, 1), iop=(0, 1, 0, 0, 0, -1)),
        tmp_path / "b.dcm",
    )
    with pytest.raises(VolumeError, match="mixed image orientations"):
        load_series([a, b])


def test_nonuniform_spacing_refused_or_recorded(tmp_path: Path) -> None:
    positions = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 5), (0, 0, 6)]
    paths = stack(tmp_path, positions)
    with pytest.raises(VolumeError, match="non-uniform slice spacing"):
        load_series(paths)
    vol = load_series(paths, allow_nonuniform=True)
    assert not vol.uniform_spacing
    assert vol.spacing[0] == pytest.approx(1.0)
    assert vol.positions is not None
    np.testing.assert_allclose(vol.positions, positions)


def test_several_images_without_position_refused(tmp_path: Path) -> None:
    px = np.zeros((4, 4), np.uint8)
    a = write(image(pixels=px, ipp=None, iop=None), tmp_path / "a.dcm")
    b = write(image(pixels=px, ipp=None, iop=None), tmp_path / "b.dcm")
    with pytest.raises(VolumeError, match="no patient position"):
        load_series([a, b])


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(VolumeError, match="not a DICOM"):
        load_series([junk])
    with pytest.raises(VolumeError, match="missing"):
        load_series([tmp_path / "nope.dcm"])
    with pytest.raises(VolumeError, match="no instances"):
        load_series([])


def test_error_messages_carry_no_patient_data(tmp_path: Path) -> None:
    paths = stack(tmp_path, [(0, 0, 0), (0, 0, 0)])
    with pytest.raises(VolumeError) as info:
        load_series(paths)
    assert "CANARY" not in str(info.value)


def test_size_limit(tmp_path: Path) -> None:
    paths = stack(tmp_path, [(0, 0, i) for i in range(3)])
    with pytest.raises(VolumeError, match="too large"):
        load_series(paths, max_bytes=100)


# --------------------------------------------------------------- grey levels


def test_single_2d_image_without_geometry(tmp_path: Path) -> None:
    px = np.arange(12, dtype=np.uint16).reshape(3, 4)
    p = write(
        image(
            pixels=px,
            ipp=None,
            iop=None,
            spacing=None,
            modality="CR",
            ImagerPixelSpacing=[0.15, 0.2],
        ),
        tmp_path / "cr.dcm",
    )
    vol = load_series([p])
    assert vol.pixels.shape == (1, 3, 4)
    assert not vol.positions_known
    assert vol.spacing[1:] == pytest.approx((0.15, 0.2))
    np.testing.assert_array_equal(vol.pixels[0], px)
    np.testing.assert_allclose(vol.origin, 0)
    assert vol.modality == "CR"


def test_monochrome1_inverted(tmp_path: Path) -> None:
    px = np.array([[0, 1000], [4000, 4095]], dtype=np.uint16)
    p = write(
        image(pixels=px, photometric="MONOCHROME1", bits_stored=12, modality="DX"),
        tmp_path / "m1.dcm",
    )
    vol = load_series([p])
    np.testing.assert_array_equal(vol.pixels[0], 4095 - px.astype(np.float32))
    assert vol.photometric == "MONOCHROME1" and not vol.is_rgb


def test_monochrome1_with_rescale_keeps_the_range(tmp_path: Path) -> None:
    px = np.array([[0, 10], [250, 255]], dtype=np.uint8)
    p = write(
        image(pixels=px, photometric="MONOCHROME1", slope=2.0, intercept=-100.0),
        tmp_path / "m1r.dcm",
    )
    vol = load_series([p])
    # range of the modality values: [-100, 410]; inverted: lo + hi - v
    expected = -100 + 410 - (px.astype(np.float32) * 2 - 100)
    np.testing.assert_allclose(vol.pixels[0], expected)


def test_rescale_signed_storage(tmp_path: Path) -> None:
    px = np.array([[-2000, -1], [0, 3000]], dtype=np.int16)
    p = write(image(pixels=px, slope=0.5, intercept=-10.0), tmp_path / "s.dcm")
    vol = load_series([p])
    np.testing.assert_allclose(vol.pixels[0], px * 0.5 - 10)


def test_rescale_unsigned_12_bit_storage(tmp_path: Path) -> None:
    px = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    p = write(image(pixels=px, bits_stored=12, slope=1.0, intercept=-1024.0), tmp_path / "u.dcm")
    vol = load_series([p])
    np.testing.assert_allclose(vol.pixels[0], px.astype(np.float32) - 1024)


def test_signed_12_bit_in_16_sign_extended(tmp_path: Path) -> None:
    values = np.array([[-2048, -1], [0, 2047]], dtype=np.int16)
    stored = (values.astype(np.int32) & 0x0FFF).astype(np.uint16)  # 12-bit two's complement
    p = write(image(pixels=stored, bits_stored=12, signed=True), tmp_path / "s12.dcm")
    vol = load_series([p])
    np.testing.assert_array_equal(vol.pixels[0], values)


def test_modality_lut_sequence(tmp_path: Path) -> None:
    px = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new(0x00283006, "US", [10, 20, 40, 80])  # LUTData
    p = write(image(pixels=px, ModalityLUTSequence=[lut]), tmp_path / "lut.dcm")
    vol = load_series([p])
    np.testing.assert_array_equal(vol.pixels[0], [[10, 20], [40, 80]])


# ----------------------------------------------------------------- transfer syntaxes


def test_every_listener_transfer_syntax_has_a_decoder() -> None:
    from dicomnode.scp import TRANSFER_SYNTAXES

    status = decoder_status()
    native = {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
    }
    for ts in TRANSFER_SYNTAXES:
        if ts not in native:
            assert status[ts], ts


def _ct(tmp_path: Path) -> tuple[np.ndarray, Dataset]:
    rng = np.random.default_rng(5)
    px = rng.integers(-1024, 3000, size=(64, 48)).astype(np.int16)
    return px, image(pixels=px, intercept=-1024.0, slope=1.0)


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_decodes_exactly(tmp_path: Path, ts: str) -> None:
    px, ds = _ct(tmp_path)
    ds.compress(ts, generate_instance_uid=False)
    p = write(ds, tmp_path / "c.dcm")
    assert dcmread(p).file_meta.TransferSyntaxUID == ts
    vol = load_series([p])
    np.testing.assert_array_equal(vol.pixels[0], px.astype(np.float32) - 1024)


@pytest.mark.parametrize("which", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14"])
def test_jpeg_lossless_signed_ct(tmp_path: Path, which: str) -> None:
    gdcm = pytest.importorskip("gdcm")
    px, ds = _ct(tmp_path)
    src = write(ds, tmp_path / "u.dcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, which)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "jll.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ts = dcmread(tmp_path / "jll.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts in {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
    vol = load_series([tmp_path / "jll.dcm"])
    np.testing.assert_array_equal(vol.pixels[0], px.astype(np.float32) - 1024)


def test_deflated(tmp_path: Path) -> None:
    px, ds = _ct(tmp_path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    p = write(ds, tmp_path / "dfl.dcm")
    vol = load_series([p])
    np.testing.assert_array_equal(vol.pixels[0], px.astype(np.float32) - 1024)
    ref = load_series([TEST_FILES / "image_dfl.dcm"])
    assert ref.pixels.shape == (1, 512, 512)


def test_big_endian_and_implicit_match_little_endian() -> None:
    ref = load_series([TEST_FILES / "MR_small.dcm"]).pixels
    for name in ("MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"):
        np.testing.assert_array_equal(load_series([TEST_FILES / name]).pixels, ref)


def test_jpeg_extended_12_bit() -> None:
    vol = load_series([TEST_FILES / "JPGExtended.dcm"])
    assert vol.pixels.shape == (1, 1024, 256)
    assert vol.pixels.min() >= 0 and vol.pixels.max() < 4096
    lossy = load_series([TEST_FILES / "JPEG-lossy.dcm"]).pixels
    np.testing.assert_array_equal(lossy, vol.pixels)


@needs_ext
def test_jpeg_extended_close_to_lossless_original() -> None:
    lossy = load_series([TEST_FILES / "JPGExtended.dcm"]).pixels
    lossless = load_series([ext("JPEG-LL.dcm")]).pixels
    assert float(np.abs(lossy - lossless).mean()) < 5


# -------------------------------------------------------------------------- colour


def _solid_rgb(colour: Sequence[int], shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (*shape, 3)).copy()


def test_ybr_full_round_trip_known_colour(tmp_path: Path) -> None:
    rgb = _solid_rgb((200, 30, 90))
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = image(pixels=ybr, photometric="YBR_FULL", sop_class=SecondaryCaptureImageStorage)
    vol = load_series([write(ds, tmp_path / "ybr.dcm")])
    assert vol.is_rgb and vol.pixels.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(vol.pixels[0, 3, 3], (200, 30, 90), atol=2)
    assert vol.photometric == "YBR_FULL"


def test_jpeg_baseline_colour_and_grey(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (220, 20, 20)
    rgb[:, 16:32] = (20, 200, 40)
    rgb[:, 32:] = (30, 40, 210)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)  # JFIF, YCbCr 4:2:0
    ds = image(pixels=rgb, photometric="YBR_FULL_422", sop_class=SecondaryCaptureImageStorage)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsStored = 8
    vol = load_series([write(ds, tmp_path / "rgb.dcm")])
    for x, colour in ((8, (220, 20, 20)), (24, (20, 200, 40)), (40, (30, 40, 210))):
        np.testing.assert_allclose(vol.pixels[0, 16, x], colour, atol=8)

    grey = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=98)
    ds = image(pixels=grey, modality="OT")
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    vol = load_series([write(ds, tmp_path / "grey.dcm")])
    assert not vol.is_rgb
    np.testing.assert_allclose(vol.pixels[0], grey, atol=6)


def test_palette_colour_synthetic(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    red = np.arange(256, dtype=np.uint16) * 257  # 16-bit entries, full range
    green = (255 - np.arange(256, dtype=np.uint16)) * 257
    blue = np.full(256, 128 * 257, dtype=np.uint16)
    ds = image(pixels=idx, photometric="PALETTE COLOR", modality="US")
    for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    vol = load_series([write(ds, tmp_path / "pal.dcm")])
    assert vol.is_rgb and vol.photometric == "PALETTE COLOR"
    np.testing.assert_allclose(vol.pixels[0, 0, 0], (0, 255, 128))
    np.testing.assert_allclose(vol.pixels[0, 1, 1], (255, 0, 128))


def test_palette_colour_pydicom_file() -> None:
    ds = dcmread(TEST_FILES / "examples_palette.dcm")
    vol = load_series([TEST_FILES / "examples_palette.dcm"])
    assert vol.is_rgb and vol.pixels.shape == (1, 350, 800, 3)
    stored = ds.pixel_array
    desc = ds.RedPaletteColorLookupTableDescriptor
    red = np.frombuffer(ds.RedPaletteColorLookupTableData, "<u2")
    i, j = np.unravel_index(np.argmax(stored), stored.shape)
    expected = red[min(max(int(stored[i, j]) - desc[1], 0), len(red) - 1)] * 255 / 65535
    assert vol.pixels[0, i, j, 0] == pytest.approx(expected, abs=0.01)


@needs_ext
def test_palette_little_and_big_endian_agree() -> None:
    le = load_series([ext("OBXXXX1A.dcm")]).pixels
    be = load_series([ext("OBXXXX1A_expb.dcm")]).pixels
    rle = load_series([ext("OBXXXX1A_rle.dcm")]).pixels
    np.testing.assert_array_equal(le, be)
    np.testing.assert_array_equal(le, rle)
    assert le.max() > 200


@needs_ext
@pytest.mark.parametrize(
    "name, atol",
    [
        ("SC_rgb_jpeg_gdcm.dcm", 0),
        ("SC_rgb_gdcm_KY.dcm", 0),
        ("SC_rgb_rle.dcm", 0),
        ("SC_rgb_jpeg_dcmtk.dcm", 6),
        ("SC_ybr_full_422_uncompressed.dcm", 6),
        ("ext:SC_ybr_full_uncompressed.dcm", 6),
        ("ext:SC_rgb_16bit.dcm", 0),
        ("ext:SC_rgb_32bit.dcm", 1e-4),
        ("ext:SC_rgb_expb.dcm", 0),
    ],
)
def test_sc_rgb_variants_match_reference(name: str, atol: float) -> None:
    ref = load_series([ext("SC_rgb.dcm")])
    path = ext(name[4:]) if name.startswith("ext:") else TEST_FILES / name
    vol = load_series([path])
    assert vol.is_rgb and vol.pixels.shape == ref.pixels.shape == (1, 100, 100, 3)
    assert float(np.abs(vol.pixels - ref.pixels).max()) <= atol
    # SC_rgb: red, green, blue, black, grey and white bands
    np.testing.assert_allclose(ref.pixels[0, 5, 50], (255, 0, 0))
    np.testing.assert_allclose(ref.pixels[0, 45, 50], (0, 0, 255))


@needs_ext
@pytest.mark.parametrize(
    "jpeg, decoded",
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_ebcr_dcmd.dcm"),
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_ebcyn1_dcmd.dcm"),
        ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_ebcyn2_dcmd.dcm"),
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_ebcynp_dcmd.dcm"),
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "SC_rgb_dcmtk_ebcys2_dcmd.dcm"),
        ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_dcmtk_ebcys4_dcmd.dcm"),
    ],
)
def test_jpeg_colour_matches_dcmtk(jpeg: str, decoded: str) -> None:
    a = load_series([TEST_FILES / jpeg]).pixels
    b = load_series([ext(decoded)]).pixels
    np.testing.assert_array_equal(a, b)


@needs_ext
@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("US1_J2KI.dcm", "US1_UNCI.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
    ],
)
def test_compressed_pydicom_data_match_uncompressed(compressed: str, reference: str) -> None:
    np.testing.assert_array_equal(
        load_series([ext(compressed)]).pixels, load_series([ext(reference)]).pixels
    )


@needs_ext
def test_cr_monochrome1_file() -> None:
    raw = dcmread(ext("RG3_UNCI.dcm")).pixel_array
    vol = load_series([ext("RG3_UNCI.dcm")])
    np.testing.assert_array_equal(vol.pixels[0], 1023 - raw.astype(np.float32))


@needs_ext
def test_jpeg_lossless_ct_file() -> None:
    vol = load_series([ext("bad_sequence.dcm")])
    assert vol.pixels.shape == (1, 512, 512)
    assert vol.pixels.min() < -900  # air in HU after the rescale


# ------------------------------------------------------------------- multi-frame


def _frame_group(ipp: Sequence[float], intercept: float) -> Dataset:
    fg = Dataset()
    pos = Dataset()
    pos.ImagePositionPatient = [float(v) for v in ipp]
    fg.PlanePositionSequence = [pos]
    pvt = Dataset()
    pvt.RescaleSlope = 1.0
    pvt.RescaleIntercept = intercept
    pvt.RescaleType = "HU"
    fg.PixelValueTransformationSequence = [pvt]
    return fg


def enhanced_ct(z_values: Sequence[float], intercepts: Sequence[float]) -> Dataset:
    n = len(z_values)
    frames = np.stack([np.full((4, 3), 100 * i, dtype=np.int16) for i in range(n)])
    ds = image(pixels=frames[0], ipp=None, iop=None, spacing=None, sop_class=EnhancedCTImageStorage)
    ds.NumberOfFrames = n
    ds.PixelData = frames.astype("<i2").tobytes()
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = [orient]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.6]
    measures.SliceThickness = 2.0
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _frame_group((1.0, 2.0, z), b) for z, b in zip(z_values, intercepts, strict=True)
    ]
    return ds


def test_enhanced_multiframe_sorted_with_per_frame_rescale(tmp_path: Path) -> None:
    z = [4.0, 0.0, 8.0, 2.0, 6.0]
    intercepts = [-1000.0, -1001.0, -1002.0, -1003.0, -1004.0]
    p = write(enhanced_ct(z, intercepts), tmp_path / "ect.dcm")
    vol = load_series([p])
    assert vol.pixels.shape == (5, 4, 3)
    # sorted by z: frames 2, 4, 1, 5, 3 (1-based)
    assert vol.frame_numbers == [2, 4, 1, 5, 3]
    expected = [100 * (f - 1) + intercepts[f - 1] for f in vol.frame_numbers]
    np.testing.assert_allclose(vol.pixels[:, 0, 0], expected)
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.6))
    np.testing.assert_allclose(vol.origin, (1.0, 2.0, 0.0))
    assert len(set(vol.sop_instance_uids)) == 1


def test_enhanced_duplicate_frames_refused(tmp_path: Path) -> None:
    p = write(enhanced_ct([0.0, 1.0, 1.0], [0.0, 0.0, 0.0]), tmp_path / "dup.dcm")
    with pytest.raises(VolumeError, match="duplicate"):
        load_series([p])


@needs_ext
def test_enhanced_ct_supplemental_file() -> None:
    vol = load_series([ext("eCT_Supplemental.dcm")])
    assert vol.pixels.shape == (2, 512, 512)
    assert vol.positions_known
    assert vol.pixels.min() == pytest.approx(-1024)


def test_plain_multiframe_rt_dose_grid_offsets() -> None:
    vol = load_series([TEST_FILES / "rtdose.dcm"])
    ds = dcmread(TEST_FILES / "rtdose.dcm", stop_before_pixels=True)
    assert vol.pixels.shape == (15, 10, 10)
    assert vol.positions_known
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert vol.spacing[0] == pytest.approx(abs(offsets[1] - offsets[0]))
    np.testing.assert_array_equal(load_series([TEST_FILES / "rtdose_rle.dcm"]).pixels, vol.pixels)


def test_plain_multiframe_cine_in_stored_order() -> None:
    vol = load_series([TEST_FILES / "examples_ybr_color.dcm"])
    assert vol.pixels.shape == (30, 240, 320, 3)
    assert vol.frame_numbers == list(range(1, 31))
    assert not vol.positions_known and vol.is_rgb


# ----------------------------------------------------------------- headers, features


def test_describe_series_headers(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        ds = image(pixels=np.zeros((4, 4), np.int16), ipp=(0, 0, i))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if i else ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "chest"
        ds.SeriesDescription = "Thorax 1.0"
        ds.Manufacturer = "ACME"
        paths.append(write(ds, tmp_path / f"{i}.dcm"))
    info = describe_series_headers(paths)
    assert info.modality == "CT" and info.sop_class_uid == CTImageStorage
    assert info.image_type == ["ORIGINAL", "PRIMARY"]
    assert info.n_instances == info.n_slices == 3
    assert info.body_part == "CHEST" and info.series_description == "Thorax 1.0"
    assert not (info.is_localizer or info.is_derived or info.produced_by_us)

    ds = image(pixels=np.zeros((4, 4), np.int16))
    ds.ImageType = ["DERIVED", "SECONDARY", "LOCALIZER"]
    ds.Manufacturer = "pacs-ai"
    info = describe_series_headers([write(ds, tmp_path / "loc.dcm")])
    assert info.is_localizer and info.is_derived and info.produced_by_us

    enh = write(enhanced_ct([0.0, 1.0, 2.0], [0.0] * 3), tmp_path / "enh.dcm")
    assert describe_series_headers([enh]).n_slices == 3


@pytest.mark.parametrize(
    "attrs, age, sex",
    [
        ({"PatientAge": "045Y", "PatientSex": "M"}, 45.0, "M"),
        ({"PatientAge": "006M", "PatientSex": "F"}, 0.5, "F"),
        ({"PatientAge": "003W"}, 3 * 7 / 365.25, None),
        ({"PatientAge": "010D", "PatientSex": "O"}, 10 / 365.25, "O"),
        ({"PatientBirthDate": "19800615", "StudyDate": "20200615"}, 40.0, None),
        ({"PatientBirthDate": "19800615", "StudyDate": "20200614"}, 39.997, None),
        ({"PatientBirthDate": "19800615"}, None, None),
        ({"PatientAge": "", "PatientSex": ""}, None, None),
        ({"PatientAge": "bogus", "PatientSex": "X"}, None, None),
        ({"PatientBirthDate": "20300101", "StudyDate": "20200101"}, None, None),
    ],
)
def test_patient_features(attrs: dict[str, str], age: float | None, sex: str | None) -> None:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    out = patient_features(ds)
    if age is None:
        assert out["age_years"] is None
    else:
        assert out["age_years"] == pytest.approx(age, abs=2e-3)
    assert out["sex"] == sex


# ------------------------------------------------ every pydicom test file (done when)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def _all_files() -> Iterator[tuple[str, Path]]:
    from bench.pydicom_files import pydicom_test_files

    yield from pydicom_test_files()


def test_every_pydicom_test_file_loads_or_is_refused_readably() -> None:
    """load_series returns a Volume or raises a readable VolumeError, never another
    exception, never hangs (60 s per file)."""
    from bench.pydicom_files import process

    files = list(_all_files())
    assert len(files) > 80
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = []
    try:
        for name, path in files:
            signal.alarm(60)
            try:
                outcomes.append(process(name, path))
            except _Timeout:
                pytest.fail(f"{name}: load_series did not finish in 60 s")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    errors = [o for o in outcomes if o.status == "ERROR"]
    assert not errors, "\n".join(f"{o.name}: {o.detail}" for o in errors)
    for o in outcomes:
        if o.status == "refused":
            assert len(o.detail) > 15 and "Traceback" not in o.detail
    ok = {o.name for o in outcomes if o.status == "ok"}
    # every accepted transfer syntax is represented among the successes
    for name in (
        "CT_small.dcm",  # explicit LE
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG baseline
        "JPGExtended.dcm",  # JPEG extended 12 bit
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "MR_small_jp2klossless.dcm",
        "693_J2KI.dcm",
        "MR_small_RLE.dcm",
    ):
        assert name in ok, name
    if EXT_FILES is not None:
        assert "pydicom-data/JPEG-LL.dcm" in ok  # JPEG lossless process 14
        assert "pydicom-data/JPGLosslessP14SV1_1s_1f_8b.dcm" in ok  # SV1


@pytest.mark.parametrize(("env", "expected"), [(None, "False"), ("1", "True")])
def test_pipeline_processes_do_not_ask_for_huge_pages(env: str | None, expected: str) -> None:
    """numpy's huge-page requests stalled every big array of a job on a kernel
    that defragments for them (decode and postprocessing took twice as long);
    the pipeline turns them off unless NUMPY_MADVISE_HUGEPAGE says otherwise."""
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if env is not None:
        environ["NUMPY_MADVISE_HUGEPAGE"] = env
    code = (
        "import worker.pipeline.volume\n"
        "from numpy._core import multiarray\n"
        "print(multiarray._get_madvise_hugepage())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=environ,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected
