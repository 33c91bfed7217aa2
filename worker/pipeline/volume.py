"""Decoding DICOM pixel data and assembling one series into a geometric volume.

Everything here is a pure function of the stored Part 10 files: no database, no
network. Failures that a person should read (an unsupported transfer syntax, an
inconsistent geometry) raise :class:`VolumeError`, whose message never carries
patient data (only counts, sizes, UIDs and transfer syntax names).

Conventions of :class:`Volume`:

* ``pixels[k, i, j]`` is slice ``k``, row ``i``, column ``j``.
* Slices are ordered by their position along the slice normal
  ``normal = cross(row_dir, col_dir)`` (``row_dir`` = first three values of
  ImageOrientationPatient, the direction in which the column index grows;
  ``col_dir`` = the last three, the direction in which the row index grows),
  ascending: slice ``k + 1`` lies further along ``normal`` than slice ``k``.
  For a standard axial CT (orientation ``1\\0\\0\\0\\1\\0``) that is feet to head.
  Never by InstanceNumber or file name.
* The patient coordinate (mm) of voxel ``(k, i, j)`` is
  ``origin + k*spacing[0]*normal + i*spacing[1]*col_dir + j*spacing[2]*row_dir``
  (see :meth:`Volume.voxel_to_patient`).
* Grey levels are in modality units (Modality LUT applied: Hounsfield units for
  CT); MONOCHROME1 is inverted so that higher always means brighter/denser.
  Colour volumes are RGB scaled to 0..255 whatever the stored bit depth.
* Non-uniform slice spacing is **refused** by default (a gap usually means an
  incomplete series and would make volumes in ml wrong); with
  ``allow_nonuniform=True`` it is **recorded** instead (``uniform_spacing`` false,
  ``spacing[0]`` the median gap, true positions in ``positions``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.uid import UID

__all__ = [
    "Volume",
    "VolumeError",
    "SeriesInfo",
    "load_series",
    "describe_series_headers",
    "patient_features",
    "decoder_status",
]


class VolumeError(Exception):
    """A readable reason why a series cannot be turned into a volume (no patient data)."""


#: Transfer syntaxes the listener accepts (dicomnode.scp.TRANSFER_SYNTAXES), with the
#: decoding plugin tried first for each; if it fails every installed plugin is tried.
PREFERRED_PLUGIN: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pillow",  # JPEG Extended (12 bit: Pillow fails, GDCM decodes)
    "1.2.840.10008.1.2.4.57": "gdcm",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "gdcm",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.5": "",  # RLE: pydicom's own or pylibjpeg-rle
}

#: Which package supplies a decoder, for readable errors.
_PLUGIN_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow or python-gdcm",
    "1.2.840.10008.1.2.4.51": "python-gdcm",
    "1.2.840.10008.1.2.4.57": "python-gdcm",
    "1.2.840.10008.1.2.4.70": "python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or python-gdcm",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pydicom's own decoder also works)",
}

#: Largest float32 volume built, bytes (refused above: a readable error beats an OOM kill).
DEFAULT_MAX_BYTES = 4 * 1024**3

_ORIENTATION_TOL = 1e-3  # per direction-cosine component
_DUPLICATE_TOL_MM = 0.01
_PIXEL_SPACING_RTOL = 1e-3
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
#: Decoder option: YBR_FULL/YBR_FULL_422 (and J2K YBR_ICT/RCT) come back as RGB.
_AS_RGB: dict[str, Any] = {"as_rgb": True}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass
class Volume:
    """One series as a float32 array with its patient geometry (see module docstring)."""

    pixels: np.ndarray  # float32 (n, rows, cols) or (n, rows, cols, 3)
    spacing: tuple[float, float, float]  # (slice_mm, row_mm, col_mm)
    origin: np.ndarray  # (3,) ImagePositionPatient of the first sorted slice
    row_dir: np.ndarray  # (3,)
    col_dir: np.ndarray  # (3,)
    normal: np.ndarray  # (3,) cross(row_dir, col_dir)
    sop_instance_uids: list[str]  # per slice
    frame_numbers: list[int]  # per slice, 1-based frame number within its instance
    is_rgb: bool
    modality: str
    #: Photometric interpretation as stored (e.g. MONOCHROME1, YBR_FULL_422, PALETTE COLOR);
    #: the pixels are always MONOCHROME2-like grey levels or RGB (``is_rgb``).
    photometric: str
    #: True when every slice had a patient position and orientation; False for a single
    #: 2D image without geometry or frames of a plain multi-frame stacked in stored order.
    positions_known: bool = True
    #: True when PixelSpacing (or ImagerPixelSpacing) was present; otherwise 1 mm is assumed.
    spacing_known: bool = True
    #: False only with ``allow_nonuniform=True`` and irregular gaps.
    uniform_spacing: bool = True
    #: (n, 3) ImagePositionPatient of each sorted slice, or None when not known.
    positions: np.ndarray | None = None
    #: Per-slice stored transfer syntax UIDs are not kept; these are the distinct ones.
    transfer_syntaxes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (k, i, j, 1) voxel indices to patient mm (LPS)."""
        m = np.eye(4)
        m[:3, 0] = self.normal * self.spacing[0]
        m[:3, 1] = self.col_dir * self.spacing[1]
        m[:3, 2] = self.row_dir * self.spacing[2]
        m[:3, 3] = self.origin
        return m

    def voxel_to_patient(self, kij: Sequence[float] | np.ndarray) -> np.ndarray:
        """Patient coordinates (mm) of voxel index/indices ``(k, i, j)`` (shape (..., 3))."""
        idx = np.asarray(kij, dtype=np.float64)
        return voxel_to_patient(
            idx, self.spacing, self.origin, self.row_dir, self.col_dir, self.normal
        )


def voxel_to_patient(
    kij: np.ndarray,
    spacing: Sequence[float],
    origin: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    normal: np.ndarray,
) -> np.ndarray:
    """``origin + k*s0*normal + i*s1*col_dir + j*s2*row_dir`` for (..., 3) indices."""
    kij = np.asarray(kij, dtype=np.float64)
    s = np.asarray(spacing, dtype=np.float64)
    scaled = kij * s
    return (
        np.asarray(origin, dtype=np.float64)
        + scaled[..., 0:1] * np.asarray(normal, dtype=np.float64)
        + scaled[..., 1:2] * np.asarray(col_dir, dtype=np.float64)
        + scaled[..., 2:3] * np.asarray(row_dir, dtype=np.float64)
    )


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SeriesInfo:
    """What routing needs, from headers only (no pixel data read)."""

    modality: str
    sop_class_uid: str
    body_part: str
    image_type: list[str]  # values present in every instance, in the first one's order
    n_instances: int
    n_slices: int  # frames summed over instances
    series_description: str
    is_localizer: bool  # any instance has LOCALIZER in ImageType
    is_derived: bool  # any instance has DERIVED in ImageType
    produced_by_us: bool  # any instance has Manufacturer 'pacs-ai'
    photometric: str
    rows: int
    columns: int
    transfer_syntaxes: list[str]


def _read_header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        raise VolumeError(f"instance file {path.name} is missing from storage") from None
    except InvalidDicomError:
        raise VolumeError(f"instance file {path.name} is not a DICOM Part 10 file") from None
    except Exception as exc:
        raise VolumeError(
            f"the header of instance file {path.name} cannot be read ({type(exc).__name__})"
        ) from None


def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    return str(value).strip()


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        return int(value)
    except Exception:
        return default


def _multi(ds: Dataset, keyword: str) -> list[str]:
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [str(value).strip().upper()] if str(value).strip() else []
    try:
        return [str(v).strip().upper() for v in value]
    except TypeError:
        return [str(value).strip().upper()]


def describe_series_headers(paths: Sequence[Path]) -> SeriesInfo:
    """Summarise one series from its headers (``stop_before_pixels``)."""
    if not paths:
        raise VolumeError("the series has no instances")
    first: Dataset | None = None
    common: list[str] = []
    common_set: set[str] = set()
    localizer = derived = ours = False
    n_slices = 0
    tsyntaxes: list[str] = []
    for path in paths:
        ds = _read_header(Path(path))
        values = _multi(ds, "ImageType")
        if first is None:
            first = ds
            common = list(dict.fromkeys(values))
            common_set = set(common)
        else:
            common_set &= set(values)
        localizer = localizer or "LOCALIZER" in values
        derived = derived or "DERIVED" in values
        ours = ours or _str(ds, "Manufacturer") == "pacs-ai"
        n_slices += max(1, _int(ds, "NumberOfFrames", 1) or 1)
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if ts and ts not in tsyntaxes:
            tsyntaxes.append(ts)
    assert first is not None
    return SeriesInfo(
        modality=_str(first, "Modality"),
        sop_class_uid=_str(first, "SOPClassUID"),
        body_part=_str(first, "BodyPartExamined").upper(),
        image_type=[v for v in common if v in common_set],
        n_instances=len(paths),
        n_slices=n_slices,
        series_description=_str(first, "SeriesDescription"),
        is_localizer=localizer,
        is_derived=derived,
        produced_by_us=ours,
        photometric=_str(first, "PhotometricInterpretation").upper(),
        rows=_int(first, "Rows", 0) or 0,
        columns=_int(first, "Columns", 0) or 0,
        transfer_syntaxes=tsyntaxes,
    )


# ---------------------------------------------------------------- patient features

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _parse_date(value: Any) -> dt.date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def patient_features(ds: Dataset) -> dict[str, Any]:
    """Clinical features from the header, ``None`` for anything missing (never guessed).

    * ``age_years`` (float): from PatientAge (``nnnD``/``nnnW``/``nnnM``/``nnnY``), else
      from PatientBirthDate and StudyDate (then SeriesDate, AcquisitionDate).
    * ``sex``: ``"M"``, ``"F"``, ``"O"`` or ``None``.
    """
    age: float | None = None
    m = _AGE_RE.match(_str(ds, "PatientAge"))
    if m:
        age = int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    else:
        birth = _parse_date(_str(ds, "PatientBirthDate"))
        ref = None
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate"):
            ref = _parse_date(_str(ds, keyword))
            if ref is not None:
                break
        if birth is not None and ref is not None and ref >= birth:
            years = ref.year - birth.year - ((ref.month, ref.day) < (birth.month, birth.day))
            anniversary = _safe_replace_year(birth, birth.year + years)
            next_anniversary = _safe_replace_year(birth, birth.year + years + 1)
            frac = (ref - anniversary).days / max(1, (next_anniversary - anniversary).days)
            age = years + frac
    if age is not None and not (0 <= age < 150):
        age = None
    sex = _str(ds, "PatientSex").upper()
    return {"age_years": age, "sex": sex if sex in {"M", "F", "O"} else None}


def _safe_replace_year(d: dt.date, year: int) -> dt.date:
    try:
        return d.replace(year=year)
    except ValueError:  # 29 February
        return d.replace(year=year, day=28)


# ------------------------------------------------------------------ decoder status


def decoder_status() -> dict[str, bool]:
    """Transfer syntax UID -> whether an installed plugin can decode it."""
    out: dict[str, bool] = {}
    for uid in PREFERRED_PLUGIN:
        try:
            out[uid] = bool(get_decoder(UID(uid)).is_available)
        except NotImplementedError:
            out[uid] = False
    return out


# ------------------------------------------------------------------------ geometry


@dataclass
class _Frame:
    file_index: int
    frame_index: int  # 0-based within the instance
    sop_uid: str
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float


@dataclass
class _Instance:
    path: Path
    sop_uid: str
    tsyntax: str
    rows: int
    cols: int
    samples: int
    photometric: str
    bits_stored: int
    pixel_representation: int
    n_frames: int
    modality: str
    has_modality_lut: bool
    spacing_between: float | None
    frames: list[_Frame]


def _floats(obj: Any, keyword: str, n: int) -> np.ndarray | None:
    """``n`` finite floats from a multi-valued element, None when absent or malformed."""
    try:
        value = obj.get(keyword) if hasattr(obj, "get") else None
        if value is None or value == "":
            return None
        seq = list(value) if not isinstance(value, str | bytes | int | float) else [value]
        if len(seq) != n:
            return None
        arr = np.array([float(v) for v in seq], dtype=np.float64)
    except Exception:
        return None
    if not np.all(np.isfinite(arr)):
        return None
    return arr


def _positive(arr: np.ndarray | None) -> np.ndarray | None:
    return arr if arr is not None and bool(np.all(arr > 0)) else None


def _float(obj: Any, keyword: str) -> float | None:
    arr = _floats(obj, keyword, 1)
    return None if arr is None else float(arr[0])


def _item(obj: Any, seq_keyword: str) -> Dataset | None:
    try:
        seq = obj.get(seq_keyword) if obj is not None else None
        if seq:
            return seq[0]  # type: ignore[no-any-return,unused-ignore]
    except Exception:
        return None
    return None


def _group_value(
    groups: Sequence[Dataset | None], seq_keyword: str, keyword: str, n: int
) -> np.ndarray | None:
    for fg in groups:
        item = _item(fg, seq_keyword)
        if item is not None:
            value = _floats(item, keyword, n)
            if value is not None:
                return value
    return None


def _describe_instance(index: int, path: Path, ds: Dataset) -> _Instance:
    sop_uid = _str(ds, "SOPInstanceUID") or f"#{index + 1}"
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if not tsyntax:
        raise VolumeError(f"instance {sop_uid} has no transfer syntax in its file meta")
    rows = _int(ds, "Rows", 0) or 0
    cols = _int(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise VolumeError(f"instance {sop_uid} is not an image (no Rows/Columns)")
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    photometric = _str(ds, "PhotometricInterpretation").upper() or (
        "RGB" if samples == 3 else "MONOCHROME2"
    )
    n_frames = max(1, _int(ds, "NumberOfFrames", 1) or 1)
    bits_alloc = _int(ds, "BitsAllocated", 16) or 16
    bits_stored = _int(ds, "BitsStored", bits_alloc) or bits_alloc
    pixel_rep = _int(ds, "PixelRepresentation", 0) or 0

    top_ipp = _floats(ds, "ImagePositionPatient", 3)
    top_iop = _floats(ds, "ImageOrientationPatient", 6)
    top_ps = None
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        top_ps = _positive(_floats(ds, kw, 2))  # "0\\0" (seen in the wild) = unknown
        if top_ps is not None:
            break
    top_thick = _float(ds, "SliceThickness")
    top_slope = _float(ds, "RescaleSlope")
    top_intercept = _float(ds, "RescaleIntercept")

    shared = _item(ds, "SharedFunctionalGroupsSequence")
    try:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        per_frame_list: list[Dataset] | None = list(per_frame) if per_frame else None
    except Exception:
        per_frame_list = None
    if per_frame_list is not None and len(per_frame_list) != n_frames:
        raise VolumeError(
            f"instance {sop_uid} has {len(per_frame_list)} per-frame functional groups "
            f"for {n_frames} frames"
        )
    enhanced = per_frame_list is not None or shared is not None

    grid_offsets: np.ndarray | None = None
    if n_frames > 1 and not enhanced:
        grid_offsets = _floats(ds, "GridFrameOffsetVector", n_frames)

    frames: list[_Frame] = []
    for f in range(n_frames):
        ipp, iop, ps, thick = top_ipp, top_iop, top_ps, top_thick
        slope, intercept = top_slope, top_intercept
        if enhanced:
            groups = [per_frame_list[f] if per_frame_list else None, shared]
            ipp = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
            if ipp is None and n_frames == 1:
                ipp = top_ipp
            iop = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
            if iop is None:
                iop = top_iop
            gps = _positive(_group_value(groups, "PixelMeasuresSequence", "PixelSpacing", 2))
            ps = gps if gps is not None else top_ps
            gthick = _group_value(groups, "PixelMeasuresSequence", "SliceThickness", 1)
            thick = float(gthick[0]) if gthick is not None else top_thick
            gslope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope", 1)
            gint = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept", 1)
            if gslope is not None:
                slope = float(gslope[0])
            if gint is not None:
                intercept = float(gint[0])
        elif n_frames > 1:
            if grid_offsets is not None and top_ipp is not None and top_iop is not None:
                normal = np.cross(top_iop[:3], top_iop[3:])
                # relative offsets (first 0) or absolute z values: both as differences
                ipp = top_ipp + (grid_offsets[f] - grid_offsets[0]) * normal
            else:
                ipp = None  # plain multi-frame: one position for all frames is not a stack
        frames.append(
            _Frame(
                file_index=index,
                frame_index=f,
                sop_uid=sop_uid,
                ipp=ipp,
                iop=iop,
                pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
                thickness=thick if thick is not None and thick > 0 else None,
                slope=1.0 if slope is None or slope == 0 else slope,
                intercept=0.0 if intercept is None else intercept,
            )
        )
    return _Instance(
        path=path,
        sop_uid=sop_uid,
        tsyntax=tsyntax,
        rows=rows,
        cols=cols,
        samples=samples,
        photometric=photometric,
        bits_stored=bits_stored,
        pixel_representation=pixel_rep,
        n_frames=n_frames,
        modality=_str(ds, "Modality").upper(),
        has_modality_lut=bool(_item(ds, "ModalityLUTSequence") is not None),
        spacing_between=_float(ds, "SpacingBetweenSlices"),
        frames=frames,
    )


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm < 0.5 or norm > 1.5:
        raise VolumeError(f"invalid ImageOrientationPatient ({what} is not a unit vector)")
    return v / norm


@dataclass
class _Plan:
    order: list[_Frame]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    positions_known: bool
    spacing_known: bool
    uniform: bool
    positions: np.ndarray | None


def _plan(instances: list[_Instance], allow_nonuniform: bool, spacing_rtol: float) -> _Plan:
    frames = [f for inst in instances for f in inst.frames]
    first = instances[0]

    # in-plane spacing
    spacings = [f.pixel_spacing for f in frames]
    known = [s for s in spacings if s is not None]
    if known and len(known) != len(spacings):
        raise VolumeError("some slices have a pixel spacing and others do not")
    if known:
        ref = np.array(known[0])
        for s in known[1:]:
            if np.any(np.abs(np.array(s) - ref) > _PIXEL_SPACING_RTOL * ref):
                raise VolumeError("mixed pixel spacings in the series")
        row_mm, col_mm = float(ref[0]), float(ref[1])
    else:
        row_mm = col_mm = 1.0

    has_pos = [f.ipp is not None and f.iop is not None for f in frames]
    thickness = next((f.thickness for f in frames if f.thickness), None)
    default_gap = first.spacing_between if first.spacing_between else thickness or 1.0
    default_gap = abs(default_gap) or 1.0

    if not all(has_pos):
        if any(has_pos):
            raise VolumeError("some slices have a patient position and others do not")
        if len(instances) > 1:
            raise VolumeError(
                f"{len(instances)} instances have no patient position (ImagePositionPatient/"
                "ImageOrientationPatient): their order is unknown"
            )
        iop = frames[0].iop
        if iop is not None:
            row_dir, col_dir = _unit(iop[:3], "row"), _unit(iop[3:], "column")
        else:
            row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        origin = frames[0].ipp if frames[0].ipp is not None else np.zeros(3)
        return _Plan(
            order=frames,  # one image, or the frames of one plain multi-frame in stored order
            spacing=(float(default_gap), row_mm, col_mm),
            origin=np.array(origin, dtype=np.float64),
            row_dir=row_dir,
            col_dir=col_dir,
            normal=np.cross(row_dir, col_dir),
            positions_known=False,
            spacing_known=bool(known),
            uniform=True,
            positions=None,
        )

    iop0 = frames[0].iop
    assert iop0 is not None
    for f in frames[1:]:
        assert f.iop is not None
        if np.max(np.abs(f.iop - iop0)) > _ORIENTATION_TOL:
            raise VolumeError("mixed image orientations in the series")
    row_dir = _unit(iop0[:3], "row")
    col_dir = _unit(iop0[3:], "column")
    if abs(float(np.dot(row_dir, col_dir))) > 1e-2:
        raise VolumeError("invalid ImageOrientationPatient (row and column not orthogonal)")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    ipps = np.array([f.ipp for f in frames], dtype=np.float64)
    along = ipps @ normal
    idx = np.argsort(along, kind="stable")
    along_sorted = along[idx]
    ordered = [frames[i] for i in idx]
    uniform = True
    if len(frames) == 1:
        gap = float(default_gap)
    else:
        gaps = np.diff(along_sorted)
        dup = int(np.sum(gaps < _DUPLICATE_TOL_MM))
        if dup:
            raise VolumeError(
                f"duplicate slice positions ({dup} of {len(frames)} slices share a position "
                "with another: multi-phase, multi-echo or repeated series are not supported)"
            )
        gap = float(np.median(gaps))
        deviation = float(np.max(np.abs(gaps - gap)))
        if deviation > max(spacing_rtol * gap, 0.01):
            if not allow_nonuniform:
                raise VolumeError(
                    f"non-uniform slice spacing (gaps {float(gaps.min()):.3g} to "
                    f"{float(gaps.max()):.3g} mm, median {gap:.3g} mm)"
                )
            uniform = False
    return _Plan(
        order=ordered,
        spacing=(gap, row_mm, col_mm),
        origin=ipps[idx[0]].copy(),
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        positions_known=True,
        spacing_known=bool(known),
        uniform=uniform,
        positions=ipps[idx],
    )


# ------------------------------------------------------------------------ decoding


def _read_full(path: Path, sop_uid: str) -> Dataset:
    try:
        ds = dcmread(path)
    except FileNotFoundError:
        raise VolumeError(f"instance {sop_uid} is missing from storage") from None
    except Exception as exc:
        raise VolumeError(f"instance {sop_uid} cannot be read ({type(exc).__name__})") from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise VolumeError(f"instance {sop_uid} has no pixel data")
    return ds


def _decode_frame(ds: Dataset, inst: _Instance, index: int) -> tuple[np.ndarray, str]:
    """One decoded frame and the photometric interpretation it is now in."""
    ts = UID(inst.tsyntax)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise VolumeError(
            f"transfer syntax {ts.name or inst.tsyntax} is not supported for decoding"
        ) from None
    if not decoder.is_available:
        raise VolumeError(
            f"no installed decoder for transfer syntax {ts.name} "
            f"(needs {_PLUGIN_PACKAGES.get(inst.tsyntax, 'a decoding plugin')})"
        )
    if inst.tsyntax == JPEG_EXTENDED and inst.bits_stored > 8 and inst.samples == 1:
        return _decode_jpeg12_gdcm(ds, inst, index), inst.photometric
    preferred = PREFERRED_PLUGIN.get(inst.tsyntax, "")
    attempts = [preferred] if preferred and preferred in decoder.available_plugins else []
    attempts.append("")
    last: Exception | None = None
    for plugin in attempts:
        try:
            arr, meta = decoder.as_array(ds, index=index, decoding_plugin=plugin, **_AS_RGB)
            return arr, str(meta.get("photometric_interpretation", inst.photometric)).upper()
        except Exception as exc:  # decoders raise many kinds; reported below
            last = exc
    reason = type(last).__name__ if last is not None else "unknown"
    lines = [ln.strip() for ln in str(last or "").splitlines() if ln.strip()]
    detail = "; ".join(lines)[:300]
    raise VolumeError(
        f"pixel data of instance {inst.sop_uid} frame {index + 1} cannot be decoded "
        f"({ts.name}: {reason}{': ' + detail if detail else ''})"
    )


def _decode_jpeg12_gdcm(ds: Dataset, inst: _Instance, index: int) -> np.ndarray:
    """12-bit JPEG Extended (process 4), monochrome, through GDCM directly.

    pydicom's GDCM plugin refuses 12-bit JPEG Extended, but the python-gdcm wheel
    decodes it (it retries with its 12-bit IJG codec); Pillow only does 8 bit. The
    result was checked identical to libjpeg-turbo's 12-bit decoder on pydicom's
    JPGExtended.dcm and JPEG-lossy.dcm.
    """
    try:
        import gdcm  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise VolumeError(
            "12-bit JPEG Extended needs python-gdcm, which is not installed"
        ) from None
    try:
        frame = get_frame(ds.PixelData, index, number_of_frames=inst.n_frames)
        fragment = gdcm.Fragment()
        fragment.SetByteStringValue(frame)
        fragments = gdcm.SequenceOfFragments.New()
        fragments.AddFragment(fragment)
        elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
        elem.SetValue(fragments.__ref__())
        img = gdcm.Image()
        img.SetNumberOfDimensions(2)
        img.SetDimensions((inst.cols, inst.rows, 1))
        img.SetDataElement(elem)
        pi_type = gdcm.PhotometricInterpretation.GetPIType(inst.photometric)
        img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
        img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED)))
        bits = min(inst.bits_stored, 12)
        img.SetPixelFormat(gdcm.PixelFormat(1, 16, bits, bits - 1, 0))
        raw = img.GetBuffer().encode("utf-8", "surrogateescape")
    except Exception as exc:
        raise VolumeError(
            f"pixel data of instance {inst.sop_uid} frame {index + 1} cannot be decoded "
            f"(12-bit JPEG Extended: {type(exc).__name__})"
        ) from None
    if len(raw) != 2 * inst.rows * inst.cols:
        raise VolumeError(
            f"pixel data of instance {inst.sop_uid} frame {index + 1} cannot be decoded "
            "(12-bit JPEG Extended: the decoder returned no image)"
        )
    arr = np.frombuffer(raw, dtype="<u2").reshape(inst.rows, inst.cols)
    if inst.pixel_representation == 1:  # JPEG stores two's complement samples as unsigned
        signed = arr.astype(np.int32)
        signed[signed >= 1 << (bits - 1)] -= 1 << bits
        return signed.astype(np.int16)
    return arr.copy()


def _palette_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """PALETTE COLOR -> RGB. Unlike pydicom's ``apply_color_lut`` (used for segmented
    LUTs), honours the byte order of OW LUT data in big endian files."""
    if "SegmentedRedPaletteColorLookupTableData" in ds:
        rgb: np.ndarray = apply_color_lut(arr, ds)
        return rgb[..., :3]
    desc = [int(v) for v in ds.RedPaletteColorLookupTableDescriptor]
    n_entries = desc[0] or 65536
    first_map = desc[1]
    little = bool(ds.original_encoding[1]) if ds.original_encoding[1] is not None else True
    luts = []
    for colour in ("Red", "Green", "Blue"):
        data = ds[f"{colour}PaletteColorLookupTableData"].value
        if not isinstance(data, bytes | bytearray):
            lut = np.asarray(data, dtype=np.uint16)
        else:
            depth = len(data) * 8 // n_entries
            if depth == 16:
                lut = np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.uint16)
            elif depth == 8:
                if not little and len(data) % 2 == 0:  # 8-bit entries in OW words
                    data = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()
                lut = np.frombuffer(data, dtype=np.uint8)
            else:
                raise ValueError("palette LUT data is neither 8 nor 16 bits per entry")
        if len(lut) < n_entries:
            raise ValueError("palette LUT data shorter than its descriptor")
        luts.append(lut[:n_entries])
    if len({lut.dtype for lut in luts}) != 1:
        raise ValueError("palette LUTs of different depths")
    idx = np.clip(arr.astype(np.int64) - first_map, 0, n_entries - 1)
    return np.stack([lut[idx] for lut in luts], axis=-1)


def _stored_range(inst: _Instance) -> tuple[float, float]:
    bits = max(1, min(inst.bits_stored, 64))
    if inst.pixel_representation == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _grey(arr: np.ndarray, ds: Dataset, inst: _Instance, frame: _Frame, out: np.ndarray) -> None:
    """Modality LUT (+ MONOCHROME1 inversion) of one frame written into ``out``."""
    if arr.ndim != 2:
        raise VolumeError(f"instance {inst.sop_uid}: unexpected decoded shape for a grey image")
    lo_s, hi_s = _stored_range(inst)
    if inst.has_modality_lut:
        try:
            mapped = apply_modality_lut(arr, ds)
            ends = apply_modality_lut(np.array([lo_s, hi_s]).astype(arr.dtype), ds)
        except Exception as exc:
            raise VolumeError(
                f"instance {inst.sop_uid}: invalid Modality LUT ({type(exc).__name__})"
            ) from None
        out[...] = mapped
        lo, hi = float(np.min(ends)), float(np.max(ends))
    else:
        out[...] = arr
        if frame.slope != 1.0:
            out *= np.float32(frame.slope)
        if frame.intercept != 0.0:
            out += np.float32(frame.intercept)
        a = lo_s * frame.slope + frame.intercept
        b = hi_s * frame.slope + frame.intercept
        lo, hi = min(a, b), max(a, b)
    if inst.photometric == "MONOCHROME1":
        if arr.dtype.kind == "f":
            np.negative(out, out=out)
        else:
            out *= np.float32(-1)
            out += np.float32(lo + hi)


def _colour(arr: np.ndarray, pi_now: str, ds: Dataset, inst: _Instance, out: np.ndarray) -> None:
    if inst.photometric == "PALETTE COLOR":
        if arr.ndim != 2:
            raise VolumeError(f"instance {inst.sop_uid}: unexpected shape for PALETTE COLOR")
        try:
            rgb = _palette_rgb(arr, ds)
        except Exception as exc:
            raise VolumeError(
                f"instance {inst.sop_uid}: invalid palette colour LUT ({type(exc).__name__})"
            ) from None
        out[...] = rgb
        if rgb.dtype.itemsize > 1:
            out *= np.float32(255.0 / float(np.iinfo(rgb.dtype).max))
        return
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise VolumeError(f"instance {inst.sop_uid}: unexpected decoded shape for colour")
    if pi_now.startswith("YBR_FULL"):
        try:
            arr = convert_color_space(arr, pi_now, "RGB")
        except Exception as exc:
            raise VolumeError(
                f"instance {inst.sop_uid}: colour conversion failed ({type(exc).__name__})"
            ) from None
    elif pi_now not in {"RGB", "YBR_RCT", "YBR_ICT"}:
        raise VolumeError(f"unsupported colour photometric interpretation {pi_now}")
    out[...] = arr
    bits = arr.dtype.itemsize * 8 if arr.dtype.kind in "ui" else 8
    bits = min(bits, inst.bits_stored) if inst.bits_stored else bits
    if bits > 8:
        out *= np.float32(255.0 / (2.0**bits - 1))


_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"}


def load_series(
    paths: Sequence[Path],
    *,
    allow_nonuniform: bool = False,
    spacing_rtol: float = 0.1,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Volume:
    """Decode one series (classic single-frame files, enhanced or plain multi-frame).

    Two passes: headers only (geometry, sort order, size; inconsistencies refused
    before any pixel is decoded), then pixel data file by file into one
    preallocated float32 array; each dataset is dropped once its frames are copied.

    Refused with :class:`VolumeError`: unreadable or non-image instances, mixed
    rows/columns/samples/photometric interpretations, mixed orientations or pixel
    spacings, duplicate slice positions, several instances without positions,
    undecodable pixel data, and (unless ``allow_nonuniform``) slice gaps deviating
    from the median by more than ``max(spacing_rtol * median, 0.01 mm)``.
    """
    if not paths:
        raise VolumeError("the series has no instances")
    instances: list[_Instance] = []
    for i, path in enumerate(paths):
        ds = _read_header(Path(path))
        instances.append(_describe_instance(i, Path(path), ds))
        del ds

    first = instances[0]
    for inst in instances[1:]:
        if (inst.rows, inst.cols) != (first.rows, first.cols):
            raise VolumeError(
                f"mixed image sizes in the series ({first.rows}x{first.cols} and "
                f"{inst.rows}x{inst.cols})"
            )
        if inst.samples != first.samples:
            raise VolumeError("mixed samples per pixel in the series")
        if inst.photometric != first.photometric:
            raise VolumeError(
                f"mixed photometric interpretations ({first.photometric} and {inst.photometric})"
            )
    pi = first.photometric
    if pi in _GREY:
        if first.samples != 1:
            raise VolumeError(f"{pi} with {first.samples} samples per pixel")
        is_rgb = False
    elif pi in _COLOUR:
        is_rgb = True
        if pi != "PALETTE COLOR" and first.samples != 3:
            raise VolumeError(f"{pi} with {first.samples} samples per pixel")
    else:
        raise VolumeError(f"unsupported photometric interpretation {pi!r}")
    status = decoder_status()
    for inst in instances:
        if inst.tsyntax in status and not status[inst.tsyntax]:
            raise VolumeError(
                f"no installed decoder for transfer syntax {UID(inst.tsyntax).name} "
                f"(needs {_PLUGIN_PACKAGES[inst.tsyntax]})"
            )

    plan = _plan(instances, allow_nonuniform, spacing_rtol)

    n = len(plan.order)
    shape: tuple[int, ...] = (n, first.rows, first.cols) + ((3,) if is_rgb else ())
    nbytes = 4 * math.prod(shape)
    if nbytes > max_bytes:
        raise VolumeError(
            f"series too large: {n} slices of {first.rows}x{first.cols} need "
            f"{nbytes / 1024**3:.1f} GiB (limit {max_bytes / 1024**3:.1f} GiB)"
        )
    pixels = np.empty(shape, dtype=np.float32)

    slots: dict[int, list[tuple[int, _Frame]]] = {}
    for k, frame in enumerate(plan.order):
        slots.setdefault(frame.file_index, []).append((k, frame))
    for file_index in sorted(slots):
        inst = instances[file_index]
        ds = _read_full(inst.path, inst.sop_uid)
        for k, frame in sorted(slots[file_index], key=lambda t: t[1].frame_index):
            arr, pi_now = _decode_frame(ds, inst, frame.frame_index)
            if arr.shape[:2] != (first.rows, first.cols):
                raise VolumeError(
                    f"instance {inst.sop_uid}: decoded size {arr.shape[:2]} differs from "
                    f"Rows/Columns {first.rows}x{first.cols}"
                )
            if is_rgb:
                _colour(arr, pi_now, ds, inst, pixels[k])
            else:
                _grey(arr, ds, inst, frame, pixels[k])
            del arr
        del ds

    return Volume(
        pixels=pixels,
        spacing=plan.spacing,
        origin=plan.origin,
        row_dir=plan.row_dir,
        col_dir=plan.col_dir,
        normal=plan.normal,
        sop_instance_uids=[f.sop_uid for f in plan.order],
        frame_numbers=[f.frame_index + 1 for f in plan.order],
        is_rgb=is_rgb,
        modality=first.modality,
        photometric=pi,
        positions_known=plan.positions_known,
        spacing_known=plan.spacing_known,
        uniform_spacing=plan.uniform,
        positions=plan.positions,
        transfer_syntaxes=list(dict.fromkeys(inst.tsyntax for inst in instances)),
    )
