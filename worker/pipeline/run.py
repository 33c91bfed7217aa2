"""The inference pipeline, wired in one place.

load headers -> select a series per model -> decode (once per series) ->
preprocess -> ONNX in batches -> postprocess -> result rows. The stages are
pure functions in their own modules; this module only calls and persists.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread

from db.repo import replace_results
from db.session import session_scope
from dicomnode import phi
from worker import metrics
from worker.pipeline import postprocess, recipe
from worker.pipeline.inference import (
    Deadline,
    ModelRunError,
    RuntimeOptions,
    SessionCache,
    _batches,
    header_vector,
    run_batches,
)
from worker.pipeline.registry import Manifest, RegisteredModel, discover
from worker.pipeline.selection import SeriesCandidate, select_series
from worker.pipeline.volume import (
    Volume,
    VolumeError,
    describe_series_headers,
    load_series,
    patient_features,
)
from worker.results.report import ModelResult, build_result_objects
from worker.scheduling.jobs import InstanceRef, JobError, StudyContext, ensure_current
from worker.settings import Settings

log = logging.getLogger(__name__)

_sessions: SessionCache | None = None


def sessions(settings: Settings) -> SessionCache:
    """The process's session cache (created on first use, after fork)."""
    global _sessions
    options = RuntimeOptions(threads=settings.ort_threads, providers=settings.ort_provider_list)
    if _sessions is None or _sessions.options != options:
        _sessions = SessionCache(options)
    return _sessions


@dataclass
class ModelOutcome:
    model: str
    series_instance_uid: str | None
    rows: list[dict[str, Any]]
    timings: dict[str, float]
    skipped: str | None = None
    error: str | None = None


def _candidate(series_uid: str, refs: list[InstanceRef]) -> SeriesCandidate:
    info = describe_series_headers([r.path for r in refs])
    iop = dcmread(
        refs[0].path, stop_before_pixels=True, specific_tags=["ImageOrientationPatient"]
    ).get("ImageOrientationPatient")
    axial = True
    if iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        axial = abs(float(normal[2])) > 0.9
    image_type = list(info.image_type)
    image_type += ["LOCALIZER"] * info.is_localizer + ["DERIVED"] * info.is_derived
    return SeriesCandidate(
        series_instance_uid=series_uid,
        modality=info.modality,
        sop_class_uid=info.sop_class_uid,
        body_part=info.body_part,
        image_type=tuple(image_type),
        num_slices=info.n_slices,
        description=info.series_description,
        is_axial=axial,
        has_pixels=info.rows > 0,
        produced_by_us=info.produced_by_us,
        is_colour=info.photometric.upper() not in ("MONOCHROME1", "MONOCHROME2", ""),
    )


def _pixel_batches(
    volume: Volume, manifest: Manifest
) -> Iterator[tuple[slice, np.ndarray, list[Any]]]:
    prep = manifest.preprocessing
    size = int(prep.get("batch_size", 16))
    for part in _batches(volume.pixels.shape[0], size):
        if prep.get("mode") == "rgb_image":
            if not volume.is_rgb:
                raise ModelRunError(f"model {manifest.name}: expects colour images")
            arr = recipe.prepare_rgb(volume.pixels[part], prep)
            boxes: list[Any] = []
        else:
            if volume.is_rgb:
                raise ModelRunError(f"model {manifest.name}: expects greyscale slices")
            known = _body_boxes(volume) if prep.get("crop") == "body" else None
            arr, boxes = recipe.prepare_slices(
                volume.pixels[part], prep, boxes=known[part] if known is not None else None
            )
        yield part, arr, boxes


#: body crop boxes of the last volume (the slow part of preprocessing): every
#: model with a "body" crop on the same series reuses them
_box_cache: tuple[weakref.ref[np.ndarray], list[Any]] | None = None


def _body_boxes(volume: Volume) -> list[Any]:
    global _box_cache
    if _box_cache is None or _box_cache[0]() is not volume.pixels:
        boxes = [recipe.crop_box_body(sl) for sl in volume.pixels]
        _box_cache = (weakref.ref(volume.pixels), boxes)
    return _box_cache[1]


@dataclass
class ModelRun:
    """What one model produced on one series."""

    rows: list[dict[str, Any]]
    timings: dict[str, float]
    #: segmentation: uint8 label volume (slices in ``volume`` order); else None
    labels: np.ndarray | None


def run_model(
    model: RegisteredModel,
    volume: Volume,
    features: dict[str, float | None],
    settings: Settings,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Result rows and timings of one model on one series."""
    run = run_model_full(model, volume, features, settings)
    return run.rows, run.timings


def run_model_full(
    model: RegisteredModel,
    volume: Volume,
    features: dict[str, float | None],
    settings: Settings,
) -> ModelRun:
    manifest = model.manifest
    assert manifest is not None
    session = sessions(settings).get(model)
    deadline = Deadline(model.name, manifest.time_limit_seconds or settings.model_time_limit)
    extra = header_vector(manifest, features)
    timings = {"preprocess_s": 0.0, "inference_s": 0.0, "postprocess_s": 0.0}
    base = {
        "model": model.name,
        "model_version": manifest.version,
        "model_sha256": manifest.sha256,
        "kind": manifest.task,
    }
    n, rows, cols = volume.pixels.shape[:3]
    if manifest.task == "classification":
        probs = []
        t = time.monotonic()
        for _part, arr, _boxes in _pixel_batches(volume, manifest):
            timings["preprocess_s"] += time.monotonic() - t
            t = time.monotonic()
            (out,) = run_batches(session, manifest, iter([arr]), extra, deadline)
            timings["inference_s"] += time.monotonic() - t
            probs.append(out.reshape(out.shape[0], -1))
            t = time.monotonic()
        t = time.monotonic()
        per_slice = np.concatenate(probs, axis=0)
        out_rows = []
        for index, label in enumerate(manifest.labels):
            column = per_slice[:, min(index, per_slice.shape[1] - 1)]
            probability, present = postprocess.classify(
                column,
                manifest.aggregation,
                label.threshold,
                slice_spacing_mm=float(volume.spacing[0]) if volume.positions_known else None,
                window_mm=manifest.aggregation_window_mm,
            )
            top = int(np.argmax(column))
            out_rows.append(
                {
                    **base,
                    **_code(label.code),
                    "label_value": label.value,
                    "probability": round(float(probability), 6),
                    "present": bool(present),
                    "measurements": {
                        "aggregation": manifest.aggregation,
                        "threshold": label.threshold,
                        "slices": int(column.shape[0]),
                        "max_slice_index": top,
                        "max_slice_sop_instance_uid": volume.sop_instance_uids[top],
                        "max_slice_probability": round(float(column[top]), 6),
                    },
                }
            )
        timings["postprocess_s"] += time.monotonic() - t
        return ModelRun(out_rows, timings, None)
    # segmentation: argmax labels on the original grid, plus (for
    # volume_method "probability") each label's probability stored as uint8
    # so that a 500-slice 512x512 series stays within a few hundred MB
    soft = manifest.volume_method == "probability"
    n_labels = max((label.value for label in manifest.labels), default=0)
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    soft_probs = np.zeros((n_labels, n, rows, cols), dtype=np.uint8) if soft else None
    t = time.monotonic()
    for part, arr, boxes in _pixel_batches(volume, manifest):
        timings["preprocess_s"] += time.monotonic() - t
        t = time.monotonic()
        (out,) = run_batches(session, manifest, iter([arr]), extra, deadline)
        timings["inference_s"] += time.monotonic() - t
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
    out_rows = []
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
                        _component_soft_volume(soft_probs[label.value - 1], labels, comp, volume), 3
                    )
                if label.min_core_radius_mm > 0:
                    item["core_radius_mm"] = round(_core_radius_mm(labels, comp, volume.spacing), 2)
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
                **base,
                **_code(label.code),
                "label_value": label.value,
                "probability": None,
                "present": bool(mask.any()),
                "measurements": measurements,
            }
        )
    timings["postprocess_s"] += time.monotonic() - t
    return ModelRun(out_rows, timings, labels)


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


def _code(code: Any) -> dict[str, str]:
    return {
        "finding_code_value": code.value,
        "finding_code_scheme": code.scheme,
        "finding": code.meaning,
    }


def _component_dict(comp: Any) -> dict[str, Any]:
    return {
        "volume_ml": round(float(comp.volume_ml), 3),
        "max_diameter_mm": round(float(comp.max_diameter_mm), 2),
        "centroid_mm": (
            [round(float(v), 2) for v in comp.centroid_mm] if comp.centroid_mm is not None else None
        ),
        "centroid_voxel": [round(float(v), 1) for v in comp.centroid_voxel],
    }


def process_study(ctx: StudyContext, settings: Settings) -> dict[str, Any]:
    """Run every enabled model on its series; persist results; return a summary."""
    if not ctx.instances:
        raise JobError("the study has no instances to process")
    t_start = time.monotonic()
    by_series: dict[str, list[InstanceRef]] = defaultdict(list)
    for ref in ctx.instances:
        by_series[ref.series_instance_uid].append(ref)
    try:
        candidates = [_candidate(uid, refs) for uid, refs in by_series.items()]
    except FileNotFoundError:
        raise JobError("an instance of the study is missing from storage") from None
    except VolumeError as exc:
        raise JobError(f"cannot read the study's headers: {exc}") from None
    registry = discover(settings.models_path)
    models = [m for m in registry if m.enabled]
    volumes: dict[str, Volume | VolumeError] = {}
    features: dict[str, dict[str, float | None]] = {}
    outcomes: list[ModelOutcome] = []
    reportable: list[ModelResult] = []  # for the SR/SEG (worker/results/report.py)
    decode_s = 0.0
    for model in models:
        assert model.manifest is not None
        ctx.check_current()  # superseded meanwhile: stop before the next model
        colour = model.manifest.preprocessing.get("mode") == "rgb_image"
        choice, rejected = select_series(candidates, model.manifest.routing, colour)
        if choice is None:
            reason = "; ".join(sorted(set(rejected.values()))) or "no series"
            outcomes.append(ModelOutcome(model.name, None, [], {}, skipped=reason))
            continue
        uid = choice.series_instance_uid
        if uid not in volumes:
            t = time.monotonic()
            paths = [r.path for r in by_series[uid]]
            try:
                volumes[uid] = load_series(paths)
                header = dcmread(paths[0], stop_before_pixels=True)
                phi.remember(header)  # masked in this job's log lines and errors
                features[uid] = patient_features(header)
            except VolumeError as exc:
                volumes[uid] = exc
            decode_s += time.monotonic() - t
        volume = volumes[uid]
        if isinstance(volume, VolumeError):
            outcomes.append(ModelOutcome(model.name, uid, [], {}, error=f"series {uid}: {volume}"))
            continue
        ctx.check_current()
        log.debug("job %d: running %s on series %s", ctx.job_id, model.name, uid)
        try:
            run = run_model_full(model, volume, features[uid], settings)
        except ModelRunError as exc:
            outcomes.append(ModelOutcome(model.name, uid, [], {}, error=str(exc)))
            continue
        rows, timings = run.rows, run.timings
        for row in rows:
            row["series_instance_uid"] = uid
            row["timings"] = {k: round(v, 3) for k, v in timings.items()}
        outcomes.append(ModelOutcome(model.name, uid, rows, timings))
        reportable.append(ModelResult(model.manifest, uid, volume, rows, run.labels))
        metrics.record_model_timings(model.name, timings)
    if volumes:
        metrics.record_decode(decode_s)
    study_id = ctx.study_id
    with session_scope(settings.effective_database_url) as session:
        ensure_current(session, ctx)  # a newer job's results are never replaced
        for outcome in outcomes:
            if outcome.error is None and outcome.skipped is None:
                replace_results(session, study_id, ctx.job_id, outcome.model, outcome.rows)
    summary: dict[str, Any] = {
        "series": len(by_series),
        "instances": len(ctx.instances),
        "modalities": sorted({c.modality for c in candidates if c.modality}),
        "decode_s": round(decode_s, 3),
        "models": {
            o.model: {
                "series_instance_uid": o.series_instance_uid,
                "results": len(o.rows),
                "skipped": o.skipped,
                "error": o.error,
                "timings": {k: round(v, 3) for k, v in o.timings.items()},
            }
            for o in outcomes
        },
        "disabled_models": {m.name: m.error for m in registry if not m.enabled},
        "pipeline_s": round(time.monotonic() - t_start, 3),
    }
    errors = [o.error for o in outcomes if o.error]
    if errors:
        raise JobError("; ".join(errors), summary)
    summary["result_objects"] = build_result_objects(ctx, reportable, settings)
    return summary


__all__ = ["ModelRun", "process_study", "run_model", "run_model_full"]
