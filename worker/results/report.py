"""From a job's model runs to DICOM result objects waiting for delivery.

Called by the pipeline after the job's result rows are committed: builds the SR,
one SEG per segmentation model and (when a destination's profile asks for it)
a key image (:mod:`dicomnode.results`), writes them durably into the outbox
(``<storage>/.outbox``, shared by every worker), records one delivery row per
object and destination, and after commit sends the delivery ids to the
``dispatch`` queue. Running it twice gives the same objects, UIDs and rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from db.repo import DeliveryRecord, upsert_delivery
from db.session import session_scope
from dicomnode.results import (
    BuiltObject,
    CodeSpec,
    Finding,
    ResultBuildError,
    SegInput,
    SegmentSpec,
    build_key_image,
    build_seg,
    build_sr,
)
from dicomnode.uids import uid_digest, validate_uid
from worker.pipeline.kinds import handler_for
from worker.pipeline.kinds.base import ModelResult
from worker.pipeline.kinds.drawing import DrawnFinding, _model_spec, _spec
from worker.results.prior_sr import add_priors_to_sr
from worker.scheduling.jobs import JobError, StudyContext, ensure_current
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.pipeline.saliency import Predictor

log = logging.getLogger(__name__)


def drawn_findings_of(result: ModelResult) -> list[Finding | DrawnFinding]:
    """The findings of one model's result records, by its kind's handler; those
    with an image region come with their slice and mask."""
    return handler_for(result.manifest.task).findings(result)


def findings_of(result: ModelResult) -> list[Finding]:
    """The SR findings of one model's result rows (see :func:`drawn_findings_of`)."""
    return [d.finding if isinstance(d, DrawnFinding) else d for d in drawn_findings_of(result)]


def _headers(ctx: StudyContext, sop_uids: Sequence[str]) -> list[Dataset]:
    paths = {ref.sop_instance_uid: ref.path for ref in ctx.instances}
    cache: dict[str, Dataset] = {}
    out = []
    for uid in sop_uids:
        if uid not in cache:
            path = paths.get(uid)
            if path is None:
                raise JobError(f"instance sop={uid} of a model's series is not in the job")
            cache[uid] = dcmread(path, stop_before_pixels=True)
        out.append(cache[uid])
    return out


def build_objects(
    ctx: StudyContext, results: Sequence[ModelResult], settings: Settings, key_image: bool
) -> list[BuiltObject]:
    """The job's SR, SEGs and optional key image (nothing is written)."""
    root = settings.uid_root
    built: list[BuiltObject] = []
    segs: dict[str, Dataset] = {}
    sources: dict[str, Dataset] = {}
    findings: list[Finding] = []
    ki_candidate: tuple[ModelResult, list[Dataset], list[DrawnFinding]] | None = None
    for result in results:
        volume = result.volume
        unique = list(dict.fromkeys(volume.sop_instance_uids))
        headers = _headers(ctx, unique)
        for ds in headers:
            sources.setdefault(str(ds.SOPInstanceUID), ds)
        drawn = drawn_findings_of(result)
        findings.extend(d.finding if isinstance(d, DrawnFinding) else d for d in drawn)
        if result.labels is None:  # no label volume: nothing to segment
            continue
        segments = [
            SegmentSpec(
                label.value,
                CodeSpec(label.code.value, label.code.scheme, label.code.meaning),
                _spec(label.category),
                _spec(label.finding_site),
                label.focal,
            )
            for label in result.manifest.labels
        ]
        per_slice = _headers(ctx, volume.sop_instance_uids)
        if len(unique) == len(volume.sop_instance_uids):
            seg_source, frames = per_slice, []
        elif len(unique) == 1:
            seg_source, frames = headers, list(volume.frame_numbers)
        else:
            log.warning(
                "job %d: no SEG for %s (series mixes multi-frame instances)",
                ctx.job_id,
                result.manifest.name,
            )
            continue
        seg = build_seg(
            SegInput(_model_spec(result.manifest), result.labels, seg_source, segments, frames),
            root,
            series_number=9910 + len(segs),
        )
        segs[result.manifest.name] = seg
        built.append(BuiltObject("seg", seg))
        if ki_candidate is None and len(unique) == len(volume.sop_instance_uids):
            ki_candidate = (
                result,
                per_slice,
                [d for d in drawn if isinstance(d, DrawnFinding)],
            )
    # findings of a label volume without a SEG cannot reference a segment: left out
    labelled = {r.manifest.name for r in results if r.labels is not None}
    reportable = [f for f in findings if f.model.name not in labelled or f.model.name in segs]
    if reportable:
        sr = build_sr(reportable, list(sources.values()), segs, root)
        add_priors_to_sr(sr, results)  # the prior comparison (worker/results/prior_sr.py)
        built.insert(0, BuiltObject("sr", sr))
    if key_image and ki_candidate is not None:
        result, per_slice, candidates = ki_candidate
        # the largest focal finding (nodule 1), else a segment's largest slice
        ordered = [d for d in candidates if d.finding.focal] + [
            d for d in candidates if not d.finding.focal
        ]
        if ordered:
            chosen = ordered[0]
            k = chosen.slice_index
            ki = build_key_image(
                per_slice[k],
                result.volume.pixels[k],
                chosen.mask,
                key_image_lines(chosen.finding, findings),
                [_model_spec(result.manifest)],
                root,
                result.volume.row_dir,
                result.volume.col_dir,
            )
            built.append(BuiltObject("ki", ki))
    return built


def key_image_lines(shown: Finding, findings: Sequence[Finding]) -> list[str]:
    """The key image's text (the not-for-diagnosis line is added by the builder):
    the finding and its size, the probability a classifier gave the same finding,
    the models and versions."""
    size = []
    if shown.longest_diameter_mm is not None:
        size.append(f"diameter {shown.longest_diameter_mm:.1f} mm")
    if shown.volume_ml is not None:
        size.append(f"volume {shown.volume_ml:.2f} cm3")
    lines = [f"{shown.label}: {', '.join(size)}" if size else shown.label]
    for f in findings:
        if f.probability is not None and f.code == shown.code:
            lines.append(
                f"{f.code.meaning} probability {100.0 * f.probability:.0f} % "
                f"({f.model.name} {f.model.version})"
            )
    lines.append(f"outline: {shown.model.name} {shown.model.version}")
    return lines


def outbox_rel_path(study_uid: str, sop_uid: str) -> str:
    """Where an object lives in the outbox: hashes of validated UIDs only."""
    validate_uid(study_uid, "StudyInstanceUID")
    validate_uid(sop_uid, "SOPInstanceUID")
    return f"{uid_digest(study_uid)[:32]}/{uid_digest(sop_uid)}.dcm"


def write_object(outbox: Path, rel_path: str, ds: Dataset) -> None:
    """Write Part 10 durably: temp file, fsync, rename, fsync the directory."""
    final = outbox / rel_path
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def build_result_objects(
    ctx: StudyContext,
    results: Sequence[ModelResult],
    settings: Settings,
    predictors: Mapping[str, Predictor] | None = None,
) -> dict[str, Any]:
    """Build, store and queue for delivery the job's result objects.

    Returns a summary for the job (objects and the delivery ids queued). With no
    destination configured nothing is built. ``predictors`` (by model name) run
    the classifiers again for their saliency maps (kind ``map``).
    """
    destinations = settings.destination_list
    if not destinations or not results:
        return {"objects": [], "deliveries_queued": 0}
    want_ki = any(d.wants("ki") for d in destinations)
    want_map = any(d.wants("map") for d in destinations) and settings.saliency_budget_seconds > 0
    saliency_summary: dict[str, Any] | None = None
    try:
        objects = build_objects(ctx, results, settings, key_image=want_ki)
        if want_map and predictors:  # saliency maps, referenced from the SR
            from worker.results.explain import saliency_objects, with_maps

            maps, saliency_summary = saliency_objects(ctx, results, settings, predictors)
            objects = with_maps(objects, maps)
    except ResultBuildError as exc:
        raise JobError(f"result objects could not be built: {exc}") from None
    ctx.check_current()  # superseded while building: write nothing
    records: list[DeliveryRecord] = []
    for obj in objects:
        rel = outbox_rel_path(ctx.study_instance_uid, obj.sop_instance_uid)
        write_object(settings.outbox_path, rel, obj.dataset)
        for dest in destinations:
            if dest.wants(obj.kind):
                records.append(
                    DeliveryRecord(
                        study_id=ctx.study_id,
                        job_id=ctx.job_id,
                        study_instance_uid=ctx.study_instance_uid,
                        series_instance_uid=obj.series_instance_uid,
                        sop_instance_uid=obj.sop_instance_uid,
                        sop_class_uid=obj.sop_class_uid,
                        kind=obj.kind,
                        destination=dest.name,
                        rel_path=rel,
                    )
                )
    queued: list[int] = []
    with session_scope(settings.effective_database_url) as session:
        ensure_current(session, ctx)  # a superseded job never creates deliveries
        for rec in records:
            delivery_id = upsert_delivery(session, rec)
            if delivery_id is not None:
                queued.append(delivery_id)
    log.info(
        "job %d: %d result objects (%s), %d deliveries queued",
        ctx.job_id,
        len(objects),
        ", ".join(o.kind for o in objects),
        len(queued),
    )
    from worker.delivery.dispatch import enqueue_deliveries

    enqueue_deliveries(settings, queued)  # after commit; the scheduler covers failures
    return {
        "objects": [
            {
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "sop_class_uid": o.sop_class_uid,
            }
            for o in objects
        ],
        "deliveries_queued": len(queued),
        **({"saliency": saliency_summary} if saliency_summary is not None else {}),
    }
