"""Saliency maps as objects viewers show, and their reference from the SR.

- :func:`build_saliency_sc`: an RGB Secondary Capture of the slice that drove a
  classification finding, the occlusion sensitivity heat map blended on the
  windowed image, and a text band of its own above the image (the finding, its
  probability, the model, how the map was made and "saliency — not for
  diagnosis"); in the source's study, in a series of its own per model.
- :func:`reference_maps`: the SR's hook: the maps in a TID 1600 Image Library
  of the report (and in its evidence), so a reader of the SR finds them.
- :func:`render_saliency`: the picture itself (numpy and Pillow).

Pure functions of datasets and arrays, like :mod:`dicomnode.results`: UIDs are
derived deterministically from the source SOP Instance UID, the model and the
finding, so building twice gives the same UIDs; nothing is logged. Never
imported by the listener (highdicom).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicomnode import headers, phi
from dicomnode.results import ModelSpec, ResultBuildError, secondary_capture
from dicomnode.uids import derived_uid

#: Series number of the saliency maps (fixed, never random; + the model's index)
MAP_SERIES_NUMBER = 9960

#: the last line of every map's text band
NOT_FOR_DIAGNOSIS = "saliency \u2014 not for diagnosis"

_TEXT = (255, 255, 0)
_WARNING = (255, 140, 0)
_DASH = "\u2014"


@dataclass(frozen=True, slots=True)
class MapCaption:
    """What a map shows, for its text band and Image Comments."""

    finding: str  # code meaning, e.g. "Lung nodule"
    present: bool
    probability: float | None
    model: ModelSpec
    method: str  # e.g. "occlusion sensitivity, 3 patch sizes, fine stride"

    def lines(self) -> list[str]:
        state = "present" if self.present else "absent"
        head = f"{self.finding}: {state}"
        if self.probability is not None:
            head += f", probability {100.0 * self.probability:.0f} %"
        return [
            head,
            f"where {self.model.name} {self.model.version} looked: {self.method}",
            NOT_FOR_DIAGNOSIS,
        ]


def map_uids(
    root: str, study_uid: str, source_sop_uid: str, model: ModelSpec, finding_key: str
) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the map of one finding on one source image:
    one series per model and study."""
    return (
        derived_uid(root, "map-series", study_uid, model.key),
        derived_uid(root, "map", source_sop_uid, model.key, finding_key),
    )


# -- the picture -------------------------------------------------------------------------


def _grey(pixels: np.ndarray, modality: str) -> np.ndarray:
    """The slice as 8-bit grey: CT in the lung window, colour as luminance, other
    greyscale between its 1st and 99th percentiles."""
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim == 3:  # RGB
        lum = 0.299 * arr[..., 0] + 0.587 * arr[..., 1] + 0.114 * arr[..., 2]
        return np.clip(lum, 0, 255).astype(np.uint8)
    if modality.upper() == "CT":
        low, high = -1350.0, 150.0  # center -600, width 1500
    else:
        low, high = float(np.percentile(arr, 1)), float(np.percentile(arr, 99))
        high = high if high > low else low + 1.0
    return np.clip((arr - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A 0..1 map as RGB float (0..255): blue, cyan, yellow, red (a "jet" ramp)."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * h - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * h - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * h - 1.0), 0.0, 1.0)
    return np.stack([r, g, b], axis=-1) * 255.0


def blend(grey: np.ndarray, heat: np.ndarray, floor: float = 0.2) -> np.ndarray:
    """The heat map over the grey image: invisible below ``floor``, then more
    opaque as it gets hotter (at most 60 %)."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    alpha = (np.clip((h - floor) / (1.0 - floor), 0.0, 1.0) * 0.6)[..., None]
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    out = base * (1.0 - alpha) + heat_colours(h) * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: Any, text: str, font: Any, size: int) -> float:
    parts = text.split(_DASH)
    width = sum(draw.textlength(p, font=font) for p in parts)
    return width + (len(parts) - 1) * size


def _draw_text(
    draw: Any, x: float, y: float, text: str, font: Any, size: int, fill: tuple[int, int, int]
) -> None:
    """Text with each em dash drawn as a bar (the default font has no glyph for it)."""
    parts = text.split(_DASH)
    for i, part in enumerate(parts):
        draw.text((x, y), part, fill=fill, font=font)
        x += draw.textlength(part, font=font)
        if i < len(parts) - 1:
            mid = y + size * 0.62
            draw.line(
                [(x + size * 0.1, mid), (x + size * 0.9, mid)], fill=fill, width=max(1, size // 12)
            )
            x += size


def render_saliency(
    pixels: np.ndarray,
    heat: np.ndarray,
    lines: Sequence[str],
    modality: str,
    min_width: int = 768,
) -> tuple[np.ndarray, float]:
    """An RGB uint8 image: a black text band on top (``lines``, the last in orange,
    and a colour bar from "low" to "high"), the blended slice below it. Returns the
    image and the zoom applied to the slice. The text stays clear of the band's
    corners, where viewers put their own overlay text."""
    from PIL import Image, ImageDraw

    grey = _grey(pixels, modality)
    if heat.shape != grey.shape:
        raise ResultBuildError(f"saliency map {heat.shape} and slice {grey.shape} differ")
    rgb = blend(grey, heat)
    zoom = max(1, int(np.ceil(min_width / max(1, rgb.shape[1]))))
    image = Image.fromarray(rgb, "RGB")
    if zoom > 1:
        image = image.resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.BILINEAR)
    width = image.width
    usable = int(width * 0.64)  # 18 % margin each side: the viewer's corner overlays
    size, smallest = max(12, width // 34), max(10, width // 56)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(size)
    while size > smallest and max(_text_width(probe, ln, font, size) for ln in lines) > usable:
        size -= 1
        font = _font(size)
    line_h = int(size * 1.35)
    pad = max(size // 2, 6)
    bar_h = max(6, size // 2)
    band_h = 2 * pad + line_h * len(lines) + bar_h + line_h
    canvas = Image.new("RGB", (width, band_h + image.height), (0, 0, 0))
    canvas.paste(image, (0, band_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        x = (width - _text_width(draw, line, font, size)) / 2
        colour = _WARNING if i == len(lines) - 1 else _TEXT
        _draw_text(draw, x, pad + i * line_h, line, font, size, colour)
    # the colour bar: what the colours mean
    y0 = pad + line_h * len(lines) + line_h // 4
    low, high = "low", "high"
    bar_w = usable // 2
    x0 = (width - bar_w) // 2
    ramp = heat_colours(np.linspace(0.0, 1.0, bar_w)[None, :]).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp, bar_h, axis=0), "RGB"), (x0, y0))
    draw.text(
        (x0 - draw.textlength(low, font=font) - size // 2, y0 + bar_h / 2 - size * 0.6),
        low,
        fill=_TEXT,
        font=font,
    )
    draw.text((x0 + bar_w + size // 2, y0 + bar_h / 2 - size * 0.6), high, fill=_TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8), float(zoom)


# -- the object ----------------------------------------------------------------------------


def build_saliency_sc(
    source: Dataset,
    pixels: np.ndarray,
    heat: np.ndarray,
    caption: MapCaption,
    finding_key: str,
    uid_root: str,
    *,
    row_dir: np.ndarray | None = None,
    col_dir: np.ndarray | None = None,
    series_number: int = MAP_SERIES_NUMBER,
    instance_number: int = 1,
) -> Dataset:
    """An RGB Secondary Capture of one source slice with its saliency map blended
    in, in the source's study (patient and study attributes are the source's,
    checked as for the SR), referencing the source image."""
    header = headers.prepare(source)  # checked patient/study/equipment attributes
    source = header.dataset
    lines = caption.lines()
    rgb, zoom = render_saliency(pixels, heat, lines, str(source.get("Modality", "")))
    series_uid, sop_uid = map_uids(
        uid_root,
        str(source.StudyInstanceUID),
        str(source.SOPInstanceUID),
        caption.model,
        finding_key,
    )
    ds = secondary_capture(
        source,
        rgb,
        zoom,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        instance_number=instance_number,
        models=[caption.model],
        description=f"AI saliency map ({caption.model.name})",
        comments=[line.replace(_DASH, "-") for line in lines],
        what="saliency map",
        row_dir=row_dir,
        col_dir=col_dir,
    )
    ds.DerivationDescription = (
        f"Occlusion sensitivity of {caption.model.name} {caption.model.version} ({caption.method})"
    )[:1024]
    header.apply_character_set(ds)
    return ds


# -- the SR's reference ------------------------------------------------------------------


def _evidence_add(sr: Dataset, maps: Sequence[Dataset]) -> None:
    """The maps in the SR's Current Requested Procedure Evidence Sequence (every
    instance the content tree references must be listed there)."""
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence")
    if evidence is None:
        evidence = DicomSequence()
        sr.CurrentRequestedProcedureEvidenceSequence = evidence
    for ds in maps:
        study = next(
            (s for s in evidence if s.get("StudyInstanceUID") == ds.StudyInstanceUID), None
        )
        if study is None:
            study = Dataset()
            study.StudyInstanceUID = ds.StudyInstanceUID
            study.ReferencedSeriesSequence = DicomSequence()
            evidence.append(study)
        series = next(
            (
                s
                for s in study.ReferencedSeriesSequence
                if s.get("SeriesInstanceUID") == ds.SeriesInstanceUID
            ),
            None,
        )
        if series is None:
            series = Dataset()
            series.SeriesInstanceUID = ds.SeriesInstanceUID
            series.ReferencedSOPSequence = DicomSequence()
            study.ReferencedSeriesSequence.append(series)
        if any(
            i.ReferencedSOPInstanceUID == ds.SOPInstanceUID for i in series.ReferencedSOPSequence
        ):
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series.ReferencedSOPSequence.append(item)


def _image_library(maps: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one group holding an IMAGE item per map
    (highdicom's ImageLibrary wants a cross-sectional image's geometry, which a
    Secondary Capture of a CT slice does not carry)."""
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    try:
        items = [
            hd.sr.ImageContentItem(
                name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for ds in maps
        ]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultBuildError(f"image library of the saliency maps: {phi.describe(exc)}") from None
    group.ContentSequence = hd.sr.ContentSequence(items)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def reference_maps(sr: Dataset, maps: Sequence[Dataset]) -> Dataset:
    """A copy of the TID 1500 ``sr`` whose report lists ``maps`` in its Image
    Library (TID 1600, row 4 of TID 1500: after the procedure reported, before the
    imaging measurements; merged into an Image Library already there) and in its
    evidence. The SR keeps its UIDs; ``sr`` itself is not changed."""
    if not maps:
        return sr
    out = copy.deepcopy(sr)
    library = _image_library(maps)
    content = out.ContentSequence
    existing = next(
        (
            item
            for item in content
            if item.get("ValueType") == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImageLibrary.value
        ),
        None,
    )
    if existing is not None:
        existing.ContentSequence.extend(library.ContentSequence)
    else:
        position = len(content)
        for i, item in enumerate(content):
            code = (
                item.ConceptNameCodeSequence[0].CodeValue
                if "ConceptNameCodeSequence" in item
                else None
            )
            if item.get("ValueType") == "CONTAINER" and code == codes.DCM.ImagingMeasurements.value:
                position = i
                break
        content.insert(position, library)
    _evidence_add(out, maps)
    return out


__all__ = [
    "MAP_SERIES_NUMBER",
    "NOT_FOR_DIAGNOSIS",
    "MapCaption",
    "blend",
    "build_saliency_sc",
    "heat_colours",
    "map_uids",
    "reference_maps",
    "render_saliency",
]
