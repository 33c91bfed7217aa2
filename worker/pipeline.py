"""The inference pipeline, wired in one place.

load headers -> select a series per model -> decode (once per series) ->
preprocess -> ONNX in batches -> postprocess -> result rows. The stages are
pure functions in their own modules; this module only calls and persists.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread

from db.repo import replace_results
from db.session import session_scope
from worker import postprocess, recipe
from worker.inference import (
    Deadline,
    ModelRunError,
    RuntimeOptions,
    SessionCache,
    _batches,
    header_vector,
    run_batches,
)
from worker.jobs import InstanceRef, JobError, StudyContext
from worker.registry import Manifest, RegisteredModel, discover
from worker.selection import SeriesCandidate, select_series
from worker.settings import Settings
from worker.volume import (
    Volume,
    VolumeError,
    describe_series_headers,
    load_series,
    patient_features,
)

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
            arr, boxes = recipe.prepare_slices(volume.pixels[part], prep)
        yield part, arr, boxes


def run_model(
    model: RegisteredModel,
    volume: Volume,
    features: dict[str, float | None],
    settings: Settings,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
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
                column, manifest.aggregation, label.threshold
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
        return out_rows, timings
    # segmentation
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    t = time.monotonic()
    for part, arr, boxes in _pixel_batches(volume, manifest):
        timings["preprocess_s"] += time.monotonic() - t
        t = time.monotonic()
        (out,) = run_batches(session, manifest, iter([arr]), extra, deadline)
        timings["inference_s"] += time.monotonic() - t
        t = time.monotonic()
        restored = recipe.restore_slices(out, boxes, (rows, cols))
        labels[part] = np.argmax(restored, axis=1).astype(np.uint8)
        timings["postprocess_s"] += time.monotonic() - t
        t = time.monotonic()
    t = time.monotonic()
    out_rows = []
    for label in manifest.labels:
        volume_ml = postprocess.label_volume_ml(labels, label.value, volume.spacing)
        measurements: dict[str, Any] = {"volume_ml": round(float(volume_ml), 3)}
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
            measurements["count"] = len(comps)
            measurements["components"] = [_component_dict(c) for c in comps[:20]]
            if comps:
                largest = max(comps, key=lambda c: c.volume_ml)
                measurements["largest_diameter_mm"] = round(float(largest.max_diameter_mm), 2)
                if largest.centroid_mm is not None:
                    measurements["centroid_mm"] = [round(float(v), 2) for v in largest.centroid_mm]
        out_rows.append(
            {
                **base,
                **_code(label.code),
                "label_value": label.value,
                "probability": None,
                "present": bool(volume_ml > 0),
                "measurements": measurements,
            }
        )
    timings["postprocess_s"] += time.monotonic() - t
    return out_rows, timings


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
    registry = discover(settings.models_path)
    models = [m for m in registry if m.enabled]
    volumes: dict[str, Volume | VolumeError] = {}
    features: dict[str, dict[str, float | None]] = {}
    outcomes: list[ModelOutcome] = []
    decode_s = 0.0
    for model in models:
        assert model.manifest is not None
        choice, rejected = select_series(candidates, model.manifest.routing)
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
                features[uid] = patient_features(dcmread(paths[0], stop_before_pixels=True))
            except VolumeError as exc:
                volumes[uid] = exc
            decode_s += time.monotonic() - t
        volume = volumes[uid]
        if isinstance(volume, VolumeError):
            outcomes.append(ModelOutcome(model.name, uid, [], {}, error=f"series {uid}: {volume}"))
            continue
        try:
            rows, timings = run_model(model, volume, features[uid], settings)
        except ModelRunError as exc:
            outcomes.append(ModelOutcome(model.name, uid, [], {}, error=str(exc)))
            continue
        for row in rows:
            row["series_instance_uid"] = uid
            row["timings"] = {k: round(v, 3) for k, v in timings.items()}
        outcomes.append(ModelOutcome(model.name, uid, rows, timings))
    study_id = ctx.study_id
    with session_scope(settings.effective_database_url) as session:
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
    return summary


__all__ = ["process_study", "run_model"]
