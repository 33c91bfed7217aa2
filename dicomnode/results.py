"""The DICOM objects pacs-ai returns to the PACS, built with highdicom.

- :func:`build_seg`: a BINARY Segmentation per segmentation model, one frame per
  source slice that holds a segment, each frame referencing its source instance
  and carrying that instance's position (so it overlays on the right slice,
  whatever order the source series was stored or sent in).
- :func:`build_sr`: a Comprehensive 3D SR, TID 1500 Measurement Report in which
  every finding is drawn where it is (viewers draw each one) and is a
  measurement OHIF can track, list in its measurement panel with its values and
  let the reader edit: a nodule (TID 1410: its outline on the slice where it is
  largest, its volume from the SEG segment; TID 1501: its maximum diameter
  inferred from a line along its long axis there), a classification (TID 1501:
  its certainty in %, inferred from a point on the slice that drove it), a
  non-focal segment (TID 1410: an arrow into it; TID 1411: the SEG segment and
  its volume); the groups of a finding share its tracking identifier, which names
  OHIF's tool (:data:`VIEWER_TOOL_TAG`), and a Comment with its values names it
  in the panel; findings without a region as qualitative evaluations, and a text
  summary for text-only viewers.
- :func:`build_key_image`: an RGB Secondary Capture of the most relevant slice
  with the outline burned in and the finding, size, certainty, model and a
  "not for diagnostic use" line in a text band of its own.
- :func:`focal_components`, :func:`largest_slice`, :func:`outline`,
  :func:`hull`, :func:`inside_point`: where a finding is drawn, from the label
  volume the SEG is built from.

Everything here is a pure function of datasets, arrays and dataclasses; UIDs are
derived deterministically (:func:`dicomnode.uids.derived_uid`) from the source
SOP Instance UIDs, the model versions and the object type, so building twice
gives the same UIDs. Patient and study attributes come from the source
datasets; nothing is logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from dicomnode import headers, phi
from dicomnode.constants import OWN_MANUFACTURER, SOFTWARE_VERSION
from dicomnode.uids import derived_uid

#: Series numbers of our objects (fixed, never random): SR, SEG (+ model index), key image.
SR_SERIES_NUMBER = 9901
SEG_SERIES_NUMBER = 9910
KI_SERIES_NUMBER = 9950

NOT_FOR_DIAGNOSIS = "not for diagnostic use"

_PRESENT = codes.SCT.Present
_ABSENT = codes.SCT.Absent
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure")
_ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
_CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
_IMAGING_PROCEDURE = codes.SCT.ImagingProcedure


class ResultBuildError(Exception):
    """A result object could not be built (the message names no patient data)."""


@dataclass(frozen=True, slots=True)
class CodeSpec:
    value: str
    scheme: str
    meaning: str

    def concept(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.value, self.scheme, self.meaning)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    sha256: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}:{self.sha256}"

    def algorithm_id(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)

    def contributing_equipment(self) -> hd.ContributingEquipment:
        return hd.ContributingEquipment(
            manufacturer=OWN_MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name[:64],
            software_versions=self.version,
            contribution_description=f"AI model {self.name} {self.version}"[:64],
        )


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One label of a segmentation model."""

    label_value: int
    code: CodeSpec
    category: CodeSpec | None = None
    finding_site: CodeSpec | None = None
    focal: bool = False


@dataclass(frozen=True, slots=True)
class PlanarRegion:
    """Where a finding is drawn: a graphic on one source image (or one frame of a
    multi-frame one), in that image's pixel coordinates: ``(column, row)`` pairs,
    ``(0, 0)`` the top left corner of the top left pixel (DICOM SCOORD)."""

    sop_instance_uid: str
    points: tuple[tuple[float, float], ...]
    graphic_type: str = "POLYLINE"  # POLYLINE (closed: first point == last), ELLIPSE, POINT
    frame_number: int | None = None

    def __post_init__(self) -> None:
        n = len(self.points)
        if self.graphic_type == "POLYLINE" and (n < 4 or self.points[0] != self.points[-1]):
            raise ValueError("a POLYLINE region needs at least 3 corners and must be closed")
        if self.graphic_type == "ELLIPSE" and n != 4:
            raise ValueError("an ELLIPSE region needs 4 points (major and minor axis ends)")
        if self.graphic_type == "POINT" and n != 1:
            raise ValueError("a POINT region needs 1 point")
        if self.graphic_type not in {"POLYLINE", "ELLIPSE", "POINT"}:
            raise ValueError(
                f'Graphic type "{self.graphic_type}" is not supported; '
                "use POLYLINE, ELLIPSE or POINT."
            )


@dataclass(frozen=True, slots=True)
class Finding:
    """One reported finding: a result row, or one focal component (nodule) of a
    segmentation row. ``region`` is where viewers draw it; a finding without one
    is reported as a qualitative evaluation outside the measurement groups."""

    model: ModelSpec
    kind: str  # the model's task kind, for the record; the report never branches on it
    code: CodeSpec
    present: bool
    probability: float | None = None  # 0-1, classification
    category: CodeSpec | None = None
    finding_site: CodeSpec | None = None
    label_value: int | None = None  # segmentation: the label in the model's output
    volume_ml: float | None = None
    longest_diameter_mm: float | None = None
    focal: bool = False
    #: classification: the slice with the highest probability (and its frame)
    key_sop_instance_uid: str | None = None
    key_frame_number: int | None = None
    #: segmentation: the finding's outline on the slice where it is largest
    region: PlanarRegion | None = None
    #: focal components: 1-based number (largest first) and how many were reported
    component: int | None = None
    components: int | None = None

    @property
    def scored(self) -> bool:
        """A finding a model scored (a classifier's): a probability, present or
        absent, and no region of its own (it is shown on the slice that drove it)."""
        return self.probability is not None

    @property
    def label(self) -> str:
        """The finding's name in viewers: "Lung nodule 2 of 3", "Lung"."""
        name = self.code.meaning
        if self.component is not None:
            name += f" {self.component}"
            if self.components:
                name += f" of {self.components}"
        return name


@dataclass(slots=True)
class SegInput:
    """A segmentation model's label volume and the source slices it covers."""

    model: ModelSpec
    labels: np.ndarray  # uint8 (n, rows, cols), slice k on source[k]
    source: list[Dataset]  # headers (no pixel data needed), one per slice, same order
    segments: list[SegmentSpec]
    frame_numbers: list[int] = field(default_factory=list)  # multi-frame source only


@dataclass(frozen=True, slots=True)
class BuiltObject:
    kind: str  # sr | seg | ki
    dataset: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)


def source_key(sop_instance_uids: Sequence[str]) -> str:
    """A digest of a set of source instances (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode("ascii")).hexdigest()


def _models_key(models: Sequence[ModelSpec]) -> str:
    return "|".join(sorted({m.key for m in models}))


def seg_uids(root: str, seg: SegInput) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the SEG of ``seg``."""
    src = source_key([str(ds.SOPInstanceUID) for ds in seg.source])
    return (
        derived_uid(root, "seg-series", src, seg.model.key),
        derived_uid(root, "seg", src, seg.model.key),
    )


def _common_kwargs(source: Dataset, description: str) -> dict[str, Any]:
    """Series description, and the institution copied from the (prepared) source.
    The Specific Character Set is declared after building
    (:meth:`headers.PreparedHeader.apply_character_set`): highdicom accepts too few."""
    kwargs: dict[str, Any] = {
        "series_description": description[:64],
        "specific_character_set": None,
    }
    for keyword, name in (
        ("InstitutionName", "institution_name"),
        ("InstitutionalDepartmentName", "institutional_department_name"),
    ):
        value = source.get(keyword)
        if value:
            kwargs[name] = str(value)
    return kwargs


def _stamp(ds: Dataset, models: Sequence[ModelSpec]) -> None:
    """Our identity: Manufacturer (loop protection) and software versions."""
    ds.Manufacturer = OWN_MANUFACTURER
    ds.SoftwareVersions = [f"pacs-ai {SOFTWARE_VERSION}"] + [
        f"{m.name} {m.version}"[:64] for m in models
    ]
    if len(models) == 1:
        ds.ManufacturerModelName = models[0].name[:64]


# -- Segmentation --------------------------------------------------------------


def build_seg(seg: SegInput, uid_root: str, series_number: int = SEG_SERIES_NUMBER) -> Dataset:
    """A BINARY SEG of one model's labels over its source slices."""
    n = seg.labels.shape[0]
    if seg.labels.ndim != 3 or (len(seg.source) not in (1, n)):
        raise ResultBuildError("label volume and source slices do not match")
    if not seg.segments:
        raise ResultBuildError(f"model {seg.model.name} has no segments")
    # segment numbers 1..k in manifest order; label values the model did not declare -> 0
    lut = np.zeros(256, dtype=np.uint8)
    for number, spec in enumerate(seg.segments, start=1):
        lut[spec.label_value] = number
    label_map = lut[seg.labels]
    source, header = headers.prepare_all(seg.source)  # checked patient/study attributes
    if len(source) == 1 and n > 1:
        # one multi-frame source instance: frames in its stored order
        order = np.argsort(np.asarray(seg.frame_numbers or list(range(1, n + 1))))
        label_map = label_map[order]
    series_uid, sop_uid = seg_uids(uid_root, seg)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=seg.model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=seg.model.version,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.code.meaning[:64],
            segmented_property_category=(spec.category or _default_category()).concept(),
            segmented_property_type=spec.code.concept(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=derived_uid(uid_root, "segment", sop_uid, str(number)),
            tracking_id=f"{seg.model.name} {spec.code.meaning}"[:64],
            anatomic_regions=(
                [spec.finding_site.concept()] if spec.finding_site is not None else None
            ),
        )
        for number, spec in enumerate(seg.segments, start=1)
    ]
    try:
        ds = hd.seg.Segmentation(
            source_images=source,
            pixel_array=label_map,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=OWN_MANUFACTURER,
            manufacturer_model_name=seg.model.name[:64],
            software_versions=f"pacs-ai {SOFTWARE_VERSION}",
            device_serial_number=seg.model.sha256[:16],
            content_label="AI_SEGMENTATION",
            content_description=f"AI {seg.model.name} {NOT_FOR_DIAGNOSIS}"[:64],
            content_creator_name="PACS-AI^",
            omit_empty_frames=bool(label_map.any()),
            contributing_equipment=[seg.model.contributing_equipment()],
            **_common_kwargs(source[0], f"AI segmentation {seg.model.name}"),
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"SEG of {seg.model.name}: {phi.describe(exc)}") from None
    _stamp(ds, [seg.model])
    header.apply_character_set(ds)
    return ds


def _default_category() -> CodeSpec:
    return CodeSpec("91723000", "SCT", "Anatomical structure")


# -- Structured report -----------------------------------------------------------


def sr_uids(root: str, sources: Sequence[Dataset], models: Sequence[ModelSpec]) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the SR over ``sources`` by ``models``."""
    src = source_key([str(ds.SOPInstanceUID) for ds in sources])
    mk = _models_key(models)
    return derived_uid(root, "sr-series", src, mk), derived_uid(root, "sr", src, mk)


def summary_text(findings: Sequence[Finding]) -> str:
    """The human-readable summary of a report (one line per finding)."""
    lines = [f"AI results ({NOT_FOR_DIAGNOSIS})."]
    for f in findings:
        state = "present" if f.present else "absent"
        parts = [f"{f.label}: {state}"]
        if f.probability is not None:
            parts.append(f"certainty {100.0 * f.probability:.0f} %")
        if f.longest_diameter_mm is not None and f.present:
            parts.append(f"longest diameter {f.longest_diameter_mm:.1f} mm")
        if f.volume_ml is not None:
            parts.append(f"volume {f.volume_ml:.2f} cm3")
        lines.append(", ".join(parts) + f" [{f.model.name} {f.model.version}]")
    return "\n".join(lines)


def _procedure(source: Dataset) -> hd.sr.CodedConcept:
    modality = str(source.get("Modality", "")).upper()
    body = str(source.get("BodyPartExamined", "")).upper()
    if modality == "CT" and body in {"CHEST", "LUNG", "THORAX"}:
        return _CT_CHEST
    return hd.sr.CodedConcept(
        _IMAGING_PROCEDURE.value, _IMAGING_PROCEDURE.scheme_designator, _IMAGING_PROCEDURE.meaning
    )


#: How OHIF (cornerstone3D's SR adapters) knows that it can turn a measurement
#: group back into a measurement of one of its tools, list it in its measurement
#: panel and let the reader edit it: the group's Tracking Identifier starts with
#: this tag, a colon and the tool's name (``...:Length``, ``...:ArrowAnnotate``).
VIEWER_TOOL_TAG = "Cornerstone3DTools@^0.1.0"
#: the text of a measurement group that such viewers show as the measurement's name
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def _tracking(uid_root: str, sr_uid: str, index: int, identifier: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derived_uid(uid_root, "tracking", sr_uid, str(index)), identifier=identifier
    )


def _presence(f: Finding) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(
        name=f.code.concept(), value=_PRESENT if f.present else _ABSENT
    )


def _tracking_label(f: Finding) -> str:
    """The finding, its state for a classifier, the model (no colon: the Tracking
    Identifier's colons separate the viewer tool's tag and name)."""
    if f.scored:
        text = f"{f.label} {'present' if f.present else 'absent'} ({f.model.name})"
    else:
        text = f"{f.label} ({f.model.name})"
    return text.replace(":", " ")


def viewer_label(f: Finding) -> str:
    """A finding's name in a viewer's measurement list, with its values:
    "Lung nodule 1 of 1: diameter 15.4 mm, volume 1.81 cm3", "Lung: volume
    2512.5 cm3", "Lung nodule: present, probability 87 % (chest-ct-nodule-cls)"."""
    parts = []
    if f.scored:
        parts.append("present" if f.present else "absent")
    if f.probability is not None:
        parts.append(f"probability {_percent(f.probability)}")
    if f.longest_diameter_mm is not None and f.present:
        parts.append(f"diameter {f.longest_diameter_mm:.1f} mm")
    if f.volume_ml is not None:
        parts.append(f"volume {f.volume_ml:.{1 if f.volume_ml >= 100 else 2}f} cm3")
    text = f"{f.label}: {', '.join(parts)}" if parts else f.label
    return f"{text} ({f.model.name})" if f.scored else text


def _percent(probability: float) -> str:
    """A probability for a reader: "87 %", never "0 %" or "100 %" (a model's
    output is never certain, however close to 0 or 1 it comes)."""
    value = 100.0 * float(probability)
    if value < 0.5:
        return "<1 %"
    if value >= 99.5:
        return ">99 %"
    return f"{value:.0f} %"


def slice_region(source: Dataset, frame_number: int | None = None) -> PlanarRegion:
    """Where a classifier's finding is shown on the slice that drove it: an arrow
    pointing into the top centre of the image (a classifier says which slice, not
    where in it), clear of the corners where viewers write their own text."""
    rows, cols = int(source.Rows), int(source.Columns)
    tip = (round(0.5 * cols, 3), round(0.08 * rows, 3))
    return PlanarRegion(str(source.SOPInstanceUID), (tip,), "POINT", frame_number)


def _region_of(f: Finding, by_sop: dict[str, Dataset]) -> PlanarRegion | None:
    """Where a finding is drawn; None when it has no region or its image is not
    among the report's sources."""
    region = f.region
    if region is None and f.scored and f.key_sop_instance_uid in by_sop:
        region = slice_region(by_sop[str(f.key_sop_instance_uid)], f.key_frame_number)
    if region is None or region.sop_instance_uid not in by_sop:
        return None
    return region


@dataclass(frozen=True, slots=True)
class ViewerTool:
    """How a viewer shows a finding as an editable measurement: one of OHIF's
    tools and the points it needs on the finding's image (column, row)."""

    name: str  # Length (a line, its two ends) | ArrowAnnotate (an arrow, its tip)
    graphic_type: str  # POLYLINE | POINT
    points: tuple[tuple[float, float], ...]


def _spacing(ds: Dataset) -> tuple[float, float]:
    """(column, row) pixel spacing in mm; 1 where the image has none."""
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 < float(spacing[1]):
        return float(spacing[1]), float(spacing[0])
    return 1.0, 1.0


def long_axis(
    points: Sequence[tuple[float, float]], spacing: tuple[float, float] = (1.0, 1.0)
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two points of an outline farthest apart in mm (``spacing``: column, row)."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    mm = xy * np.asarray(spacing)
    d = ((mm[:, None, :] - mm[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    a, b = sorted([(float(xy[i, 0]), float(xy[i, 1])), (float(xy[j, 0]), float(xy[j, 1]))])
    return a, b


def _resized(
    a: tuple[float, float], b: tuple[float, float], length_mm: float, spacing: tuple[float, float]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The line through ``a`` and ``b`` with the same centre, ``length_mm`` long: a
    viewer measures the line it draws, and shows that length, not the report's."""
    pa, pb, scale = np.asarray(a), np.asarray(b), np.asarray(spacing)
    span = float(np.linalg.norm((pb - pa) * scale))
    if span == 0.0 or length_mm <= 0.0:
        return a, b
    centre, half = (pa + pb) / 2, (pb - pa) * (length_mm / span) / 2
    ends = [centre - half, centre + half]
    return (round(float(ends[0][0]), 3), round(float(ends[0][1]), 3)), (
        round(float(ends[1][0]), 3),
        round(float(ends[1][1]), 3),
    )


def _inside(points: Sequence[tuple[float, float]], fraction: float) -> tuple[float, float]:
    """A point of a closed convex polygon, ``fraction`` of its width from its left
    edge and half way between its top and bottom there: for the hull around a
    paired organ (the lungs) a point in the first of the pair, for one convex
    structure a point in it (a POINT region from :func:`inside_point` is exact)."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x = float(xy[:, 0].min() + fraction * (xy[:, 0].max() - xy[:, 0].min()))
    ys = []
    for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:], strict=True):
        if min(x0, x1) <= x <= max(x0, x1) and x0 != x1:
            ys.append(y0 + (x - x0) * (y1 - y0) / (x1 - x0))
    y = (min(ys) + max(ys)) / 2 if ys else float(xy[:, 1].mean())
    return round(x, 3), round(y, 3)


def viewer_tool(f: Finding, region: PlanarRegion, source: Dataset) -> ViewerTool:
    """A nodule with a diameter: a line along its long axis where it is largest, as
    long as the diameter; anything else an arrow: at a point region (a classifier's
    slice), into a whole organ (the lungs: into the first, left on the image, of
    the structures its outline surrounds), at the centre of anything smaller."""
    if region.graphic_type == "POINT":
        return ViewerTool("ArrowAnnotate", "POINT", region.points)
    if f.focal and f.present and f.longest_diameter_mm is not None and len(region.points) > 2:
        spacing = _spacing(source)
        a, b = long_axis(region.points, spacing)
        return ViewerTool("Length", "POLYLINE", _resized(a, b, f.longest_diameter_mm, spacing))
    xy = np.asarray(region.points, dtype=np.float64)
    if f.focal or region.graphic_type == "ELLIPSE":
        centre = xy[:-1].mean(axis=0) if region.graphic_type == "POLYLINE" else xy.mean(axis=0)
        return ViewerTool("ArrowAnnotate", "POINT", ((float(centre[0]), float(centre[1])),))
    return ViewerTool("ArrowAnnotate", "POINT", (_inside(region.points, 0.25),))


def _source_image(region: PlanarRegion, ds: Dataset) -> hd.sr.SourceImageForRegion:
    frames = [region.frame_number] if region.frame_number is not None else None
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(ds.SOPClassUID),
        referenced_sop_instance_uid=str(ds.SOPInstanceUID),
        referenced_frame_numbers=frames,
    )


def _segment_source(seg: Dataset, number: int) -> hd.sr.SourceImageForMeasurement:
    """ "Source of Measurement": the SEG instance and the segment (Image SOP Instance
    Reference Macro, Referenced Segment Number)."""
    item = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=str(seg.SOPClassUID),
        referenced_sop_instance_uid=str(seg.SOPInstanceUID),
    )
    item.ReferencedSOPSequence[0].ReferencedSegmentNumber = number
    return item


def build_sr(
    findings: Sequence[Finding],
    sources: Sequence[Dataset],
    segs: dict[str, Dataset],
    uid_root: str,
    series_number: int = SR_SERIES_NUMBER,
) -> Dataset:
    """The TID 1500 report of a job: ``sources`` are the headers of the source
    instances the models ran on; ``segs`` the SEG built per model name.

    Every finding is drawn on a source image (viewers such as OHIF draw a finding
    by its region, or by the coordinates its measurement was inferred from, and
    fail on one without), and is one measurement of an OHIF tool
    (:func:`viewer_tool`) named by a Comment with its values (:func:`viewer_label`),
    so that OHIF lists it in its measurement panel once the reader tracks the
    report:

    - a focal segmentation finding (one nodule): TID 1410 with its outline on the
      slice where it is largest and its volume, the volume's source being the SEG
      segment; TID 1501 with its maximum diameter, inferred from a line along its
      long axis there (OHIF's Length);
    - a non-focal segment (the lungs): TID 1410 with an arrow into it on its
      largest slice (OHIF's ArrowAnnotate), and TID 1411 referencing the SEG
      segment with the volume;
    - a classification: TID 1501 with the certainty, inferred from a point on the
      slice that drove it (an arrow);
    - a finding without a region (absent, or no image to draw it on): a
      qualitative evaluation outside the measurement groups.

    The groups of one finding share its tracking identifier (OHIF merges them to
    draw it), nodules first: viewers open on the first finding's image.
    """
    if not findings:
        raise ResultBuildError("no findings to report")
    if not sources:
        raise ResultBuildError("no source instances")
    sources, header = headers.prepare_all(sources)  # checked patient/study attributes
    models = list({f.model.key: f.model for f in findings}.values())
    series_uid, sop_uid = sr_uids(uid_root, sources, models)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in sources}
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(uid_root, "device", OWN_MANUFACTURER),
            name="pacs-ai",
            manufacturer_name=OWN_MANUFACTURER,
            model_name=", ".join(m.name for m in models)[:64],
        ),
    )
    groups: list[Any] = []
    outside: list[Finding] = []
    # nodules first, then whole segments, then classifiers: viewers open on the
    # first group's image (tracking UIDs keep the given order)
    rank = {(True, "segmentation"): 0, (False, "segmentation"): 1}
    ordered = sorted(
        enumerate(findings, start=1), key=lambda item: rank.get((item[1].focal, item[1].kind), 2)
    )
    for index, f in ordered:
        region = _region_of(f, by_sop)
        if region is None:
            outside.append(f)
            continue
        try:
            groups.extend(_groups(f, index, region, by_sop, segs, uid_root, sop_uid))
        except (ValueError, TypeError) as exc:
            raise ResultBuildError(f"SR group of {f.label}: {exc}") from None
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(sources[0]),
        imaging_measurements=groups or None,
        title=codes.cid7021.ImagingMeasurementReport,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            _ENGLISH
        ),
    )
    _append_qualitative(report, outside, summary_text(findings))
    evidence = list(sources) + list(segs.values())
    try:
        ds = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=OWN_MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[m.contributing_equipment() for m in models],
            **_common_kwargs(sources[0], f"AI findings ({NOT_FOR_DIAGNOSIS})"),
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"SR: {phi.describe(exc)}") from None
    _stamp(ds, models)
    header.apply_character_set(ds)
    return ds


def _groups(
    f: Finding,
    index: int,
    region: PlanarRegion,
    by_sop: dict[str, Dataset],
    segs: dict[str, Dataset],
    uid_root: str,
    sop_uid: str,
) -> list[Any]:
    """The measurement groups of one drawn finding, under one tracking identifier
    (see :func:`build_sr`).

    OHIF turns each group whose Tracking Identifier names one of its tools into a
    measurement of that tool, from the "inferred from" coordinates of the group's
    first measurement, or from its region when it has none (a group it cannot read
    so is skipped). Hence: the measurement the viewer shows (a nodule's diameter, a
    classifier's certainty) goes, with the tool's points, into a TID 1501 group;
    the TID 1410 group keeps the region and the other measurements, and is left
    out when it would keep none (a classifier), or takes the arrow's tip as its
    region when the finding has no measurement of its own (the lungs, whose
    volume is the TID 1411 group's)."""
    ds = by_sop[region.sop_instance_uid]
    image = _source_image(region, ds)
    tool = viewer_tool(f, region, ds)
    tracking = _tracking(
        uid_root, sop_uid, index, f"{VIEWER_TOOL_TAG}:{tool.name}:{_tracking_label(f)}"
    )
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": f.code.concept(),
        "finding_category": f.category.concept() if f.category else None,
        "finding_sites": [hd.sr.FindingSite(f.finding_site.concept())] if f.finding_site else None,
        "algorithm_id": f.model.algorithm_id(),
    }
    seg = segs.get(f.model.name)  # only a model with a label volume has a SEG
    number = _segment_number(seg, f) if seg is not None else None
    whole_segment = not f.focal and seg is not None and number is not None
    volume_refs: dict[str, Any] = (
        {"referenced_images": [_segment_source(seg, number)]}
        if seg is not None and number is not None
        else {}
    )
    # (name, value, unit, extra keyword arguments), the one the viewer shows first
    values: list[tuple[Any, float, Any, dict[str, Any]]] = []
    if f.probability is not None:
        values.append(
            (
                codes.DCM.CertaintyOfFinding,
                round(100.0 * float(f.probability), 2),
                codes.UCUM.Percent,
                {},
            )
        )
    if f.focal and f.present and f.longest_diameter_mm is not None:
        values.append(
            (
                codes.SCT.Diameter,
                round(float(f.longest_diameter_mm), 2),
                codes.UCUM.Millimeter,
                {"derivation": codes.SCT.Maximum},
            )
        )
    if f.volume_ml is not None and not whole_segment:
        values.append(
            (
                codes.SCT.Volume,
                round(float(f.volume_ml), 3),
                codes.UCUM.CubicCentimeter,
                volume_refs,
            )
        )

    if tool.name == "Length":  # the line is the diameter's
        values.sort(key=lambda v: v[0] != codes.SCT.Diameter)

    def measurement(
        value: tuple[Any, float, Any, dict[str, Any]], coordinates: Any = None
    ) -> hd.sr.Measurement:
        name, amount, unit, extra = value
        return hd.sr.Measurement(
            name=name,
            value=amount,
            unit=unit,
            algorithm_id=f.model.algorithm_id(),
            referenced_coordinates=[coordinates] if coordinates is not None else None,
            **extra,
        )

    comment = hd.sr.TextContentItem(
        name=_COMMENT,
        value=viewer_label(f),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    out: list[Any] = []
    if values:
        shown = hd.sr.MeasurementsAndQualitativeEvaluations(
            measurements=[
                measurement(
                    values[0],
                    hd.sr.CoordinatesForMeasurement(
                        graphic_type=tool.graphic_type,
                        graphic_data=np.asarray(tool.points, dtype=np.float64),
                        source_image=image,
                    ),
                )
            ],
            qualitative_evaluations=[_presence(f)] if len(values) == 1 else None,
            **common,
        )
        shown[0].ContentSequence.append(comment)
        out.append(shown)
    if len(values) > 1 or not values:
        if not values:  # drawn and read by the viewer from its region: the arrow's tip
            region = PlanarRegion(
                region.sop_instance_uid, tool.points, tool.graphic_type, region.frame_number
            )
        planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=hd.sr.ImageRegion(
                graphic_type=region.graphic_type,
                graphic_data=np.asarray(region.points, dtype=np.float64),
                source_image=image,
            ),
            measurements=[measurement(v) for v in values[1:]] or None,
            qualitative_evaluations=[_presence(f)],
            **common,
        )
        if not values:
            planar[0].ContentSequence.append(comment)
        out.insert(0, planar)  # first: OHIF draws a finding by its first group's region
    if whole_segment:
        assert seg is not None and number is not None
        volume = (
            measurement(
                (
                    codes.SCT.Volume,
                    round(float(f.volume_ml), 3),
                    codes.UCUM.CubicCentimeter,
                    volume_refs,
                )
            )
            if f.volume_ml is not None
            else None
        )
        out.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(
                        str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
                    ),
                ),
                measurements=[volume] if volume is not None else None,
                **common,
            )
        )
    return out


def _segment_number(seg: Dataset, f: Finding) -> int | None:
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if (
            str(prop.CodeValue) == f.code.value
            and str(prop.CodingSchemeDesignator) == f.code.scheme
        ):
            return int(item.SegmentNumber)
    return None


def _append_qualitative(
    report: hd.sr.MeasurementReport, findings: Sequence[Finding], text: str
) -> None:
    """TID 1500 row 12, Qualitative Evaluations: the findings that have no image
    region (present or absent, coded), and a TEXT summary of every finding, so
    viewers that show only text still say what was found."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[Any] = [
        hd.sr.CodeContentItem(
            name=f.code.concept(),
            value=_PRESENT if f.present else _ABSENT,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for f in findings
    ]
    items.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Summary,
            value=text,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    report[0].ContentSequence.append(container)


# -- Regions from masks ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FocalComponent:
    """One 26-connected component of a label: where it is largest."""

    centroid_voxel: tuple[float, float, float]  # (slice, row, column)
    slice_index: int  # the slice with its largest area
    mask: np.ndarray  # bool (rows, cols): the component on that slice


#: outlines are traced on a grid this many times finer than the pixels, so they
#: follow the pixel edges to 1/8 pixel (the centres of the fine border cells)
_OUTLINE_SUBPIXELS = 4


def _fine_contours(mask: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int]]:
    """External contours of ``mask`` on the fine grid, and the crop offset (row, col)."""
    import cv2

    m = np.asarray(mask, dtype=bool)
    rows_hit = np.flatnonzero(m.any(axis=1))
    cols_hit = np.flatnonzero(m.any(axis=0))
    if rows_hit.size == 0:
        return [], (0, 0)
    r0, r1 = int(rows_hit[0]), int(rows_hit[-1]) + 1
    c0, c1 = int(cols_hit[0]), int(cols_hit[-1]) + 1
    k = _OUTLINE_SUBPIXELS
    crop = m[r0:r1, c0:c1]
    fine: np.ndarray[Any, np.dtype[np.uint8]] = np.zeros(
        (crop.shape[0] * k + 2, crop.shape[1] * k + 2), dtype=np.uint8
    )
    fine[1:-1, 1:-1] = np.repeat(np.repeat(crop, k, axis=0), k, axis=1)  # one cell of padding
    contours, _ = cv2.findContours(fine, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours), (r0, c0)


def _to_image(points: np.ndarray, offset: tuple[int, int]) -> tuple[tuple[float, float], ...]:
    """Fine-grid contour points (x, y) -> closed (column, row) image coordinates."""
    k = _OUTLINE_SUBPIXELS
    xy = points.reshape(-1, 2).astype(np.float64) - 1.0  # the padding
    cols = offset[1] + (xy[:, 0] + 0.5) / k
    rows = offset[0] + (xy[:, 1] + 0.5) / k
    out = [(round(float(c), 3), round(float(r), 3)) for c, r in zip(cols, rows, strict=True)]
    return (*out, out[0])


def outline(mask: np.ndarray) -> tuple[tuple[float, float], ...] | None:
    """The closed outline of the largest piece of a 2D mask along its pixel edges,
    in image coordinates (column, row); None for an empty mask."""
    import cv2

    contours, offset = _fine_contours(mask)
    if not contours:
        return None
    biggest = max(contours, key=cv2.contourArea)
    simplified = cv2.approxPolyDP(biggest, 1.0, True)
    if len(simplified) < 3:
        simplified = biggest
    return _to_image(simplified, offset)


def hull(mask: np.ndarray) -> tuple[tuple[float, float], ...] | None:
    """The closed convex hull of every piece of a 2D mask (both lungs in one
    outline), in image coordinates (column, row); None for an empty mask."""
    import cv2

    contours, offset = _fine_contours(mask)
    if not contours:
        return None
    return _to_image(cv2.convexHull(np.concatenate(contours)), offset)


def focal_components(labels: np.ndarray, label_value: int) -> list[FocalComponent]:
    """Each 26-connected component of ``label_value`` in a label volume
    ``(slice, row, column)``, largest first: its centroid, the slice where its
    area is largest and its mask there."""
    from scipy import ndimage

    mask = np.asarray(labels) == label_value
    hits = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (0, 1, 2)
    ]
    if hits[0].size == 0:
        return []
    box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)
    pieces, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    out: list[tuple[int, FocalComponent]] = []
    for number, where in enumerate(ndimage.find_objects(pieces), start=1):
        if where is None:
            continue
        comp = pieces[where] == number
        areas = comp.reshape(comp.shape[0], -1).sum(axis=1)
        k = int(np.argmax(areas))
        z, y, x = (np.nonzero(comp)[axis].mean() for axis in range(3))
        origin = [box[a].start + where[a].start for a in range(3)]
        plane = np.zeros(mask.shape[1:], dtype=bool)
        plane[origin[1] : origin[1] + comp.shape[1], origin[2] : origin[2] + comp.shape[2]] = comp[
            k
        ]
        centroid = (float(z + origin[0]), float(y + origin[1]), float(x + origin[2]))
        out.append((int(comp.sum()), FocalComponent(centroid, origin[0] + k, plane)))
    out.sort(key=lambda item: -item[0])
    return [c for _size, c in out]


def inside_point(mask: np.ndarray) -> tuple[float, float] | None:
    """The pixel of a 2D mask's largest piece farthest from its border, as an image
    point (column, row) at the pixel's centre: where an arrow to a whole structure
    points (a :class:`PlanarRegion` of type POINT); None for an empty mask."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    pieces, count = ndimage.label(m)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    depth = ndimage.distance_transform_edt(pieces == int(np.argmax(sizes)) + 1)
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(col) + 0.5, float(row) + 0.5


def largest_slice(labels: np.ndarray, label_value: int) -> tuple[int, np.ndarray] | None:
    """The slice where ``label_value`` covers the largest area, and its mask there."""
    mask = np.asarray(labels) == label_value
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if areas.max(initial=0) == 0:
        return None
    k = int(np.argmax(areas))
    return k, mask[k]


# -- Key image ------------------------------------------------------------------


def ki_uids(root: str, source_sop_uid: str, models: Sequence[ModelSpec]) -> tuple[str, str]:
    mk = _models_key(models)
    return derived_uid(root, "ki-series", source_sop_uid, mk), derived_uid(
        root, "ki", source_sop_uid, mk
    )


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    positive = vector[axis] >= 0
    return [("L", "R"), ("P", "A"), ("H", "F")][axis][0 if positive else 1]


def _window(pixels: np.ndarray, modality: str) -> np.ndarray:
    if modality.upper() == "CT":
        low, high = -1350.0, 150.0  # lung window: center -600, width 1500
    else:
        low, high = float(np.percentile(pixels, 1)), float(np.percentile(pixels, 99))
        high = high if high > low else low + 1.0
    scaled = (pixels.astype(np.float32) - low) / (high - low)
    return np.clip(scaled * 255.0, 0, 255).astype(np.uint8)


def _outlines(mask: np.ndarray) -> list[tuple[tuple[float, float], ...]]:
    """The closed outline of every piece of a 2D mask, in image coordinates."""
    contours, offset = _fine_contours(mask)
    return [_to_image(c, offset) for c in contours]


#: the key image's text: yellow, the not-for-diagnosis line orange
_TEXT = (255, 255, 0)
_WARNING = (255, 140, 0)
_OUTLINE = (255, 0, 0)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _wrap(line: str, draw: Any, font: Any, width: int) -> list[str]:
    """``line`` split at spaces into parts no wider than ``width`` (a single word
    wider than that stays whole)."""
    parts: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width:
            parts.append(current)
            current = word
        else:
            current = candidate
    return [*parts, current]


def render_key_image(
    pixels: np.ndarray,
    mask: np.ndarray | None,
    banner: Sequence[str],
    modality: str,
    min_width: int = 768,
) -> tuple[np.ndarray, float]:
    """An RGB uint8 image: a black text band on top, the slice below it with the
    outline of ``mask`` in red. Returns the image and the zoom applied to the slice.

    The text stays in its own band, never over anatomy, centred and clear of the
    band's corners, where viewers put their own overlay text (patient, series,
    window, image number); its size follows the image width, so it reads the same
    at any viewer zoom."""
    from PIL import Image, ImageDraw

    grey = _window(pixels, modality)
    rgb = np.stack([grey, grey, grey], axis=-1)
    zoom = max(1, int(np.ceil(min_width / max(1, rgb.shape[1]))))
    image = Image.fromarray(rgb, "RGB")
    if zoom > 1:
        image = image.resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    if mask is not None and mask.any():
        draw = ImageDraw.Draw(image)
        stroke = max(2, zoom)
        for polygon in _outlines(mask):
            draw.line([(x * zoom, y * zoom) for x, y in polygon], fill=_OUTLINE, width=stroke)
    width = image.width
    usable = int(width * 0.64)  # 18 % margin each side: the viewer's corner overlays
    size, smallest = max(12, width // 30), max(12, width // 48)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > smallest and max(probe.textlength(line, font=font) for line in banner) > usable:
        size -= 1
        font = _font(size)
    banner = [part for line in banner for part in _wrap(line, probe, font, usable)]
    line_h = int(size * 1.35)
    pad = max(size // 2, 6)
    band_h = 2 * pad + line_h * len(banner)
    canvas = Image.new("RGB", (width, band_h + image.height), (0, 0, 0))
    canvas.paste(image, (0, band_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(banner):
        x = (width - draw.textlength(line, font=font)) / 2
        colour = _WARNING if i == len(banner) - 1 else _TEXT
        draw.text((x, pad + i * line_h), line, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8), float(zoom)


def build_key_image(
    source: Dataset,
    pixels: np.ndarray,
    mask: np.ndarray | None,
    banner: Sequence[str],
    models: Sequence[ModelSpec],
    uid_root: str,
    row_dir: np.ndarray | None = None,
    col_dir: np.ndarray | None = None,
    series_number: int = KI_SERIES_NUMBER,
) -> Dataset:
    """An RGB Secondary Capture of one source slice with the overlay burned in."""
    header = headers.prepare(source)  # checked patient/study/equipment attributes
    source = header.dataset
    lines = [*banner, f"AI result - {NOT_FOR_DIAGNOSIS.upper()}"]
    rgb, zoom = render_key_image(pixels, mask, lines, str(source.get("Modality", "")))
    series_uid, sop_uid = ki_uids(uid_root, str(source.SOPInstanceUID), models)
    ds = secondary_capture(
        source,
        rgb,
        zoom,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        instance_number=1,
        models=models,
        description=f"AI key image ({NOT_FOR_DIAGNOSIS})",
        comments=lines,
        what="key image",
        row_dir=row_dir,
        col_dir=col_dir,
    )
    header.apply_character_set(ds)
    return ds


def secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    zoom: float,
    *,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    models: Sequence[ModelSpec],
    description: str,
    comments: Sequence[str],
    what: str,
    row_dir: np.ndarray | None = None,
    col_dir: np.ndarray | None = None,
) -> Dataset:
    """An RGB Secondary Capture of one slice of ``source`` (a prepared header's
    dataset) with our drawing burned in (``rgb``, ``zoom`` times the source's
    size): in the source's study, one frame of its series (its modality, body
    part and laterality), referencing it, stamped as ours. ``what`` names the
    object in a :class:`ResultBuildError`. The caller declares the character set
    (:meth:`headers.PreparedHeader.apply_character_set`) once it has added its
    own attributes. Key images and saliency maps are built with it."""
    orientation = ("L", "P")
    if row_dir is not None and col_dir is not None:
        orientation = (_orientation_letter(row_dir), _orientation_letter(col_dir))
    spacing = source.get("PixelSpacing")
    pixel_spacing = None
    if spacing is not None and len(spacing) == 2:
        pixel_spacing = (float(spacing[0]) / zoom, float(spacing[1]) / zoom)
    try:
        ds = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=OWN_MANUFACTURER,
            patient_orientation=orientation,
            pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # floats are valid DS
            contributing_equipment=[m.contributing_equipment() for m in models],
            **_common_kwargs(source, description),
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"{what}: {phi.describe(exc)}") from None
    ds.copy_patient_and_study_information(source)  # as SR and SEG: the checked attributes
    ds.BurnedInAnnotation = "YES"  # our text only: no patient data is drawn
    # the source's modality, not OT: viewers open a cine player over OT and US
    # images (OHIF), and this is one frame of the source series
    ds.Modality = str(source.get("Modality") or "OT")
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(ds, keyword, source.get(keyword))
    ds.ImageComments = " / ".join(comments)[:10240]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = [ref]
    now = dt.datetime.now()
    ds.ContentDate = DA(now.date())
    ds.ContentTime = TM(now.time().replace(microsecond=0))
    _stamp(ds, models)
    return ds


def best_slice(
    labels: np.ndarray, segments: Sequence[SegmentSpec]
) -> tuple[int, np.ndarray] | None:
    """The slice with the largest area of the first focal segment present (else of
    any segment present) and that segment's mask on it; None when all empty."""
    ordered = [s for s in segments if s.focal] + [s for s in segments if not s.focal]
    for spec in ordered:
        mask = labels == spec.label_value
        areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
        if areas.max(initial=0) > 0:
            k = int(np.argmax(areas))
            return k, mask[k]
    return None


__all__ = [
    "BuiltObject",
    "CodeSpec",
    "Finding",
    "FocalComponent",
    "ModelSpec",
    "PlanarRegion",
    "ResultBuildError",
    "SegInput",
    "SegmentSpec",
    "VIEWER_TOOL_TAG",
    "ViewerTool",
    "best_slice",
    "build_key_image",
    "build_seg",
    "build_sr",
    "focal_components",
    "hull",
    "inside_point",
    "largest_slice",
    "long_axis",
    "outline",
    "seg_uids",
    "slice_region",
    "source_key",
    "sr_uids",
    "summary_text",
    "viewer_label",
    "viewer_tool",
]
