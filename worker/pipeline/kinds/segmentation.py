"""Segmentation: a label volume on the series' grid, and one record per label.

The model's per-slice output is restored to the original grid (argmax labels,
and for ``volume_method: probability`` each label's probability as uint8).
A record's ``measurements``: ``volume_ml``, ``volume_method``; for a focal
label (a nodule) also ``count``, ``components`` (each with ``volume_ml``,
``max_diameter_mm``, ``centroid_mm``, ``centroid_voxel``),
``largest_diameter_mm``, ``centroid_mm`` and ``discarded_components``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.pipeline import postprocess, recipe
from worker.pipeline.kinds.base import ModelResult, ModelRun, ResultRecord, RunInputs
from worker.pipeline.kinds.base import code_fields as code_fields
from worker.pipeline.kinds.base import pixel_batches as pixel_batches
from worker.pipeline.volume import Volume

if TYPE_CHECKING:  # the reporting side's types (imported there on use)
    from dicomnode.results import Finding
    from worker.pipeline.kinds.base import DrawnFinding


class SegmentationHandler:
    task = "segmentation"

    def run(self, inputs: RunInputs) -> ModelRun:
        manifest, volume, timings = inputs.manifest, inputs.volume, inputs.timings
        n, rows, cols = volume.pixels.shape[:3]
        # segmentation: argmax labels on the original grid, plus (for
        # volume_method "probability") each label's probability stored as uint8
        # so that a 500-slice 512x512 series stays within a few hundred MB
        soft = manifest.volume_method == "probability"
        n_labels = max((label.value for label in manifest.labels), default=0)
        labels = np.zeros((n, rows, cols), dtype=np.uint8)
        soft_probs = np.zeros((n_labels, n, rows, cols), dtype=np.uint8) if soft else None
        t = time.monotonic()
        for part, arr, boxes in pixel_batches(volume, manifest):
            timings["preprocess_s"] += time.monotonic() - t
            out = inputs.infer(arr)
            t = time.monotonic()
            logits = manifest.segmentation_output == "logits"
            if logits:
                out = _softmax(out)
            recipe.restore_segmentation(
                out,
                boxes,
                labels[part],
                soft_probs[:, part] if soft_probs is not None else None,
                normalized=logits,
            )
            timings["postprocess_s"] += time.monotonic() - t
            t = time.monotonic()
        t = time.monotonic()
        out_rows: list[ResultRecord] = []
        for label in manifest.labels:
            mask = labels == label.value
            if soft_probs is not None:
                volume_ml = postprocess.soft_volume_ml(
                    soft_probs[label.value - 1], mask, volume.spacing, scale=255.0
                )
            else:
                volume_ml = postprocess.label_volume_ml(labels, label.value, volume.spacing)
            measurements: dict[str, Any] = {
                "volume_ml": round(float(volume_ml), 3),
                "volume_method": manifest.volume_method,
            }
            if label.focal:
                comps = postprocess.components(
                    labels,
                    label.value,
                    volume.spacing,
                    origin=volume.origin,
                    row_dir=volume.row_dir,
                    col_dir=volume.col_dir,
                    normal=volume.normal,
                )
                kept: list[dict[str, Any]] = []
                discarded = 0
                for comp in comps[:_MAX_COMPONENTS]:
                    item = _component_dict(comp)
                    if soft_probs is not None:
                        item["volume_ml"] = round(
                            _component_soft_volume(
                                soft_probs[label.value - 1], labels, comp, volume
                            ),
                            3,
                        )
                    if label.min_core_radius_mm > 0:
                        item["core_radius_mm"] = round(
                            _core_radius_mm(labels, comp, volume.spacing), 2
                        )
                    if _reportable(item, label):
                        if label.opening_radius_mm > 0:
                            _measure_opened(item, soft_probs, labels, comp, volume, label)
                        kept.append(item)
                    else:
                        _erase_component(labels, comp)
                        discarded += 1
                for comp in comps[_MAX_COMPONENTS:]:  # the smallest: never reported
                    _erase_component(labels, comp)
                    discarded += 1
                if discarded:
                    mask = labels == label.value
                    volume_ml = sum(c["volume_ml"] for c in kept)
                    measurements["volume_ml"] = round(float(volume_ml), 3)
                    measurements["discarded_components"] = discarded
                measurements["count"] = len(kept)
                measurements["components"] = kept[:20]
                if kept:
                    largest = max(kept, key=lambda c: c["volume_ml"])
                    measurements["largest_diameter_mm"] = largest["max_diameter_mm"]
                    if largest["centroid_mm"] is not None:
                        measurements["centroid_mm"] = largest["centroid_mm"]
            out_rows.append(
                {
                    **inputs.base,
                    **code_fields(label.code),
                    "label_value": label.value,
                    "probability": None,
                    "present": bool(mask.any()),
                    "measurements": measurements,
                }
            )
        timings["postprocess_s"] += time.monotonic() - t
        return ModelRun(out_rows, timings, labels)

    def findings(self, result: ModelResult) -> list[Finding | DrawnFinding]:
        from worker.pipeline.kinds.drawing import drawn_segments

        return drawn_segments(result)


HANDLER = SegmentationHandler()


#: focal components measured per label (largest first); smaller ones are dropped
_MAX_COMPONENTS = 200


def _reportable(component: dict[str, Any], label: Any) -> bool:
    """A focal component passes the label's size and compactness filters."""
    volume_ml = float(component["volume_ml"])
    if volume_ml < label.min_volume_ml:
        return False
    if float(component.get("core_radius_mm", np.inf)) < label.min_core_radius_mm:
        return False
    if label.min_compactness > 0:
        d = float(component["max_diameter_mm"])
        sphere_ml = np.pi * d**3 / 6.0 / 1000.0
        if sphere_ml > 0 and volume_ml / sphere_ml < label.min_compactness:
            return False
    return True


def _component_mask(labels: np.ndarray, comp: Any) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding-box slices of a component and its mask within them (the
    largest connected piece of its label in the box: the component itself)."""
    from scipy import ndimage

    z0, y0, x0, z1, y1, x1 = comp.bbox
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    pieces, count = ndimage.label(labels[box] == comp.label, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return box, np.zeros(pieces.shape, bool)
    biggest = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
    return box, pieces == biggest


def _core_radius_mm(labels: np.ndarray, comp: Any, spacing: Any) -> float:
    """Radius (mm) of the largest ball inside a component: its Euclidean
    distance transform's maximum. A nodule's core is about its radius even
    with a vessel attached; a vessel or a vessel crossing stays thin."""
    from scipy import ndimage

    _box, mask = _component_mask(labels, comp)
    if not mask.any():
        return 0.0
    padded = np.pad(mask, 1)
    return float(ndimage.distance_transform_edt(padded, sampling=spacing).max())


def _erase_component(labels: np.ndarray, comp: Any) -> None:
    """Set one component of ``labels`` to background."""
    box, mask = _component_mask(labels, comp)
    labels[box][mask] = 0


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32, copy=True)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _measure_opened(
    item: dict[str, Any],
    soft_probs: np.ndarray | None,
    labels: np.ndarray,
    comp: Any,
    volume: Volume,
    label: Any,
) -> None:
    """Volume and largest diameter of a focal component after an opening by
    the label's ball (attached vessels cut off); unchanged when the opening
    leaves nothing."""
    n, rows, cols = labels.shape
    z0, y0, x0, z1, y1, x1 = comp.bbox
    box = (
        slice(max(z0 - 1, 0), min(z1 + 1, n)),
        slice(max(y0 - 1, 0), min(y1 + 1, rows)),
        slice(max(x0 - 1, 0), min(x1 + 1, cols)),
    )
    inner = (
        slice(z0 - box[0].start, z1 - box[0].start),
        slice(y0 - box[1].start, y1 - box[1].start),
        slice(x0 - box[2].start, x1 - box[2].start),
    )
    _box, own = _component_mask(labels, comp)
    mask = np.zeros(labels[box].shape, dtype=bool)
    mask[inner] = own
    opened = postprocess.open_mask(mask, volume.spacing, label.opening_radius_mm)
    if not opened.any():
        return
    if soft_probs is not None:
        volume_ml = postprocess.soft_volume_ml(
            soft_probs[label.value - 1][box], opened, volume.spacing, scale=255.0
        )
    else:
        volume_ml = postprocess.label_volume_ml(opened, 1, volume.spacing)
    item["volume_ml"] = round(float(volume_ml), 3)
    item["max_diameter_mm"] = round(postprocess.max_diameter_mm(opened, volume.spacing), 2)


def _component_soft_volume(
    prob: np.ndarray, labels: np.ndarray, comp: Any, volume: Volume
) -> float:
    """Soft volume of one component: probability over its bounding box grown
    by one voxel, restricted to the component's label grown by one voxel."""
    z0, y0, x0, z1, y1, x1 = comp.bbox
    n, rows, cols = labels.shape
    sl = (
        slice(max(z0 - 1, 0), min(z1 + 1, n)),
        slice(max(y0 - 1, 0), min(y1 + 1, rows)),
        slice(max(x0 - 1, 0), min(x1 + 1, cols)),
    )
    return postprocess.soft_volume_ml(
        prob[sl], labels[sl] == comp.label, volume.spacing, scale=255.0
    )


def _component_dict(comp: Any) -> dict[str, Any]:
    return {
        "volume_ml": round(float(comp.volume_ml), 3),
        "max_diameter_mm": round(float(comp.max_diameter_mm), 2),
        "centroid_mm": (
            [round(float(v), 2) for v in comp.centroid_mm] if comp.centroid_mm is not None else None
        ),
        "centroid_voxel": [round(float(v), 1) for v in comp.centroid_voxel],
    }
