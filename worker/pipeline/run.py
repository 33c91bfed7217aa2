"""The inference pipeline, wired in one place.

load headers -> select a series per model -> decode (once per series) ->
preprocess -> ONNX in batches -> postprocess -> result rows. The stages are
pure functions in their own modules; this module only calls and persists.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread

from db.queries import study_link
from db.repo import replace_results
from db.session import session_scope
from dicomnode import phi
from worker import metrics
from worker.pipeline.inference import (
    Deadline,
    ModelRunError,
    RuntimeOptions,
    SessionCache,
    header_vector,
)
from worker.pipeline.kinds import handler_for
from worker.pipeline.kinds.base import ModelResult, ModelRun, ResultRecord, RunInputs
from worker.pipeline.registry import RegisteredModel, discover
from worker.pipeline.saliency import Predictor, onnx_predictor
from worker.pipeline.selection import SeriesCandidate, select_series
from worker.pipeline.volume import (
    Volume,
    VolumeError,
    describe_series_headers,
    load_series,
    patient_features,
)
from worker.results.priors import attach_priors
from worker.results.report import build_result_objects
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
    rows: list[ResultRecord]
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


def run_model(
    model: RegisteredModel,
    volume: Volume,
    features: dict[str, float | None],
    settings: Settings,
) -> tuple[list[ResultRecord], dict[str, float]]:
    """Result rows and timings of one model on one series."""
    run = run_model_full(model, volume, features, settings)
    return run.rows, run.timings


def run_model_full(
    model: RegisteredModel,
    volume: Volume,
    features: dict[str, float | None],
    settings: Settings,
) -> ModelRun:
    """Run one model on one series through its task kind's handler."""
    manifest = model.manifest
    assert manifest is not None
    inputs = RunInputs(
        model=model,
        manifest=manifest,
        volume=volume,
        session=sessions(settings).get(model),
        deadline=Deadline(model.name, manifest.time_limit_seconds or settings.model_time_limit),
        extra=header_vector(manifest, features),
        settings=settings,
        base={
            "model": model.name,
            "model_version": manifest.version,
            "model_sha256": manifest.sha256,
            "kind": manifest.task,
        },
    )
    return handler_for(manifest.task).run(inputs)


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
    predictors: dict[str, Predictor] = {}  # the models run again for saliency maps
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
        session, extra = sessions(settings).get(model), header_vector(model.manifest, features[uid])
        predictors[model.name] = onnx_predictor(session, model.manifest, extra)
        metrics.record_model_timings(model.name, timings)
    if volumes:
        metrics.record_decode(decode_s)
    study_id = ctx.study_id
    with session_scope(settings.effective_database_url) as session:
        ensure_current(session, ctx)  # a newer job's results are never replaced
        for outcome in outcomes:
            if outcome.error is None and outcome.skipped is None:
                replace_results(session, study_id, ctx.job_id, outcome.model, outcome.rows)
        link = study_link(session, study_id)
    # nodules compared with the patient's prior study (worker/results/priors.py)
    attach_priors(
        settings,
        study_id,
        [r for o in outcomes if o.error is None for r in o.rows],
        processor=process_study,
    )
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
    prior_of = link["prior_of"] if link is not None else None
    if prior_of is not None:
        # fetched from the PACS to compare a newer study with: its results are
        # kept (and compared), but nothing new is written into an old study
        log.info(
            "job %d: study=%s is a prior fetched for study=%s: results kept, none sent",
            ctx.job_id,
            ctx.study_instance_uid,
            prior_of,
        )
        summary["result_objects"] = {"objects": [], "deliveries_queued": 0, "prior_of": prior_of}
        return summary
    summary["result_objects"] = build_result_objects(ctx, reportable, settings, predictors)
    return summary


__all__ = ["ModelRun", "process_study", "run_model", "run_model_full"]
