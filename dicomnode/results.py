"""The DICOM objects pacs-ai returns to the PACS, built with highdicom.

- :func:`build_seg`: a BINARY Segmentation per segmentation model, one frame per
  source slice that holds a segment, each frame referencing its source instance
  and carrying that instance's position (so it overlays on the right slice,
  whatever order the source series was stored or sent in).
- :func:`build_sr`: a Comprehensive 3D SR, TID 1500 Measurement Report: a TID
  1501 group per classification finding (certainty in %, present/absent), a
  TID 1411 group per segment (volume in cm3, longest diameter of focal
  findings, referencing the SEG segment), a text summary for text-only viewers.
- :func:`build_key_image`: an RGB Secondary Capture of the most relevant slice
  with the contour and a "not for diagnostic use" banner burned in.

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
class Finding:
    """One result row, as the SR reports it."""

    model: ModelSpec
    kind: str  # classification | segmentation
    code: CodeSpec
    present: bool
    probability: float | None = None  # 0-1, classification
    category: CodeSpec | None = None
    finding_site: CodeSpec | None = None
    label_value: int | None = None  # segmentation: the label in the model's output
    volume_ml: float | None = None
    longest_diameter_mm: float | None = None
    focal: bool = False
    #: classification: the slice with the highest probability
    key_sop_instance_uid: str | None = None


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
    """Series description, and the institution copied from the source."""
    kwargs: dict[str, Any] = {"series_description": description[:64]}
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
    source = seg.source
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
        raise ResultBuildError(f"SEG of {seg.model.name}: {exc}") from None
    _stamp(ds, [seg.model])
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
        parts = [f"{f.code.meaning}: {state}"]
        if f.probability is not None:
            parts.append(f"certainty {100.0 * f.probability:.0f} %")
        if f.volume_ml is not None:
            parts.append(f"volume {f.volume_ml:.2f} cm3")
        if f.longest_diameter_mm is not None and f.present:
            parts.append(f"longest diameter {f.longest_diameter_mm:.1f} mm")
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


def _tracking(uid_root: str, sr_uid: str, index: int, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=derived_uid(uid_root, "tracking", sr_uid, str(index)), identifier=label[:64]
    )


def _presence(f: Finding) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(
        name=f.code.concept(), value=_PRESENT if f.present else _ABSENT
    )


def build_sr(
    findings: Sequence[Finding],
    sources: Sequence[Dataset],
    segs: dict[str, Dataset],
    uid_root: str,
    series_number: int = SR_SERIES_NUMBER,
) -> Dataset:
    """The TID 1500 report of a job: ``sources`` are the headers of the source
    instances the models ran on; ``segs`` the SEG built per model name."""
    if not findings:
        raise ResultBuildError("no findings to report")
    if not sources:
        raise ResultBuildError("no source instances")
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
    for index, f in enumerate(findings, start=1):
        label = f"{f.model.name} {f.code.meaning}"
        sites = [hd.sr.FindingSite(f.finding_site.concept())] if f.finding_site else None
        category = f.category.concept() if f.category else None
        if f.kind == "segmentation":
            seg = segs.get(f.model.name)
            number = _segment_number(seg, f) if seg is not None else None
            if seg is None or number is None:
                raise ResultBuildError(f"no SEG segment for {label}")
            measurements = [
                hd.sr.Measurement(
                    name=codes.SCT.Volume,
                    value=round(float(f.volume_ml or 0.0), 3),
                    unit=codes.UCUM.CubicCentimeter,
                    algorithm_id=f.model.algorithm_id(),
                )
            ]
            if f.focal and f.present and f.longest_diameter_mm is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=codes.SCT.Diameter,
                        value=round(float(f.longest_diameter_mm), 2),
                        unit=codes.UCUM.Millimeter,
                        derivation=codes.SCT.Maximum,
                        algorithm_id=f.model.algorithm_id(),
                    )
                )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(uid_root, sop_uid, index, label),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(seg.SOPClassUID),
                        sop_instance_uid=str(seg.SOPInstanceUID),
                        segment_number=number,
                        source_series=hd.sr.SourceSeriesForSegmentation(
                            str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
                        ),
                    ),
                    finding_type=f.code.concept(),
                    finding_category=category,
                    finding_sites=sites,
                    algorithm_id=f.model.algorithm_id(),
                    measurements=measurements,
                    qualitative_evaluations=[_presence(f)],
                )
            )
        else:
            source_images = None
            key = by_sop.get(f.key_sop_instance_uid or "")
            if key is not None:
                source_images = [
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=str(key.SOPClassUID),
                        referenced_sop_instance_uid=str(key.SOPInstanceUID),
                    )
                ]
            measurements = []
            if f.probability is not None:
                measurements.append(
                    hd.sr.Measurement(
                        name=codes.DCM.CertaintyOfFinding,
                        value=round(100.0 * float(f.probability), 2),
                        unit=codes.UCUM.Percent,
                        algorithm_id=f.model.algorithm_id(),
                    )
                )
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(uid_root, sop_uid, index, label),
                    finding_type=f.code.concept(),
                    finding_category=category,
                    finding_sites=sites,
                    algorithm_id=f.model.algorithm_id(),
                    measurements=measurements or None,
                    qualitative_evaluations=[_presence(f)],
                    source_images=source_images,
                )
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(sources[0]),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        language_of_content_item_and_descendants=hd.sr.LanguageOfContentItemAndDescendants(
            _ENGLISH
        ),
    )
    _append_summary(report, summary_text(findings))
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
        raise ResultBuildError(f"SR: {exc}") from None
    _stamp(ds, models)
    return ds


def _segment_number(seg: Dataset, f: Finding) -> int | None:
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        if (
            str(prop.CodeValue) == f.code.value
            and str(prop.CodingSchemeDesignator) == f.code.scheme
        ):
            return int(item.SegmentNumber)
    return None


def _append_summary(report: hd.sr.MeasurementReport, text: str) -> None:
    """TID 1500 row 12: Qualitative Evaluations CONTAINS a TEXT summary, so viewers
    that show only text still say what was found."""
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Summary,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    report[0].ContentSequence.append(container)


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


def render_key_image(
    pixels: np.ndarray,
    mask: np.ndarray | None,
    banner: Sequence[str],
    modality: str,
    min_width: int = 512,
) -> tuple[np.ndarray, float]:
    """An RGB uint8 image: the slice, the contour of ``mask`` in red and a banner on
    top. Returns the image and the zoom factor applied to the slice."""
    from PIL import Image, ImageDraw, ImageFont
    from scipy import ndimage

    grey = _window(pixels, modality)
    rgb = np.stack([grey, grey, grey], axis=-1)
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = (255, 0, 0)
    zoom = max(1, int(np.ceil(min_width / max(1, rgb.shape[1]))))
    image = Image.fromarray(rgb, "RGB")
    if zoom > 1:
        image = image.resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    width = image.width
    size = max(12, width // 40)
    try:
        font: Any = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    line_h = size + 6
    banner_h = line_h * len(banner) + 8
    canvas = Image.new("RGB", (width, image.height + banner_h), (0, 0, 0))
    canvas.paste(image, (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(banner):
        draw.text((6, 4 + i * line_h), line, fill=(255, 255, 0), font=font)
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
    lines = [*banner, f"AI result - {NOT_FOR_DIAGNOSIS.upper()}"]
    rgb, zoom = render_key_image(pixels, mask, lines, str(source.get("Modality", "")))
    series_uid, sop_uid = ki_uids(uid_root, str(source.SOPInstanceUID), models)
    orientation = None
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
            instance_number=1,
            manufacturer=OWN_MANUFACTURER,
            patient_orientation=orientation or ("L", "P"),
            pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # floats are valid DS
            contributing_equipment=[m.contributing_equipment() for m in models],
            **_common_kwargs(source, f"AI key image ({NOT_FOR_DIAGNOSIS})"),
        )
    except (ValueError, TypeError) as exc:
        raise ResultBuildError(f"key image: {exc}") from None
    ds.BurnedInAnnotation = "YES"
    if source.get("BodyPartExamined"):
        ds.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        ds.Laterality = source.Laterality
    ds.ImageComments = " / ".join(lines)[:10240]
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
    "ModelSpec",
    "ResultBuildError",
    "SegInput",
    "SegmentSpec",
    "best_slice",
    "build_key_image",
    "build_seg",
    "build_sr",
    "seg_uids",
    "source_key",
    "sr_uids",
    "summary_text",
]
