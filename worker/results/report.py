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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from db.repo import DeliveryRecord, upsert_delivery
from db.session import session_scope
from dicomnode.results import (
    BuiltObject,
    CodeSpec,
    Finding,
    ModelSpec,
    PlanarRegion,
    ResultBuildError,
    SegInput,
    SegmentSpec,
    build_key_image,
    build_seg,
    build_sr,
    focal_components,
    hull,
    largest_slice,
    outline,
)
from dicomnode.uids import uid_digest, validate_uid
from worker.pipeline.registry import Code, Manifest
from worker.pipeline.volume import Volume
from worker.scheduling.jobs import JobError, StudyContext, ensure_current
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelResult:
    """What one model produced on one series, as the reporting step needs it."""

    manifest: Manifest
    series_instance_uid: str
    volume: Volume
    rows: list[dict[str, Any]]
    labels: np.ndarray | None  # segmentation label volume, slices in volume order


def _spec(code: Code | None) -> CodeSpec | None:
    return CodeSpec(code.value, code.scheme, code.meaning) if code is not None else None


def _model_spec(manifest: Manifest) -> ModelSpec:
    return ModelSpec(manifest.name, manifest.version, manifest.sha256)


@dataclass(frozen=True)
class DrawnFinding:
    """A finding and where it is drawn: its slice in the model's volume and its
    mask there (the key image outlines it)."""

    finding: Finding
    slice_index: int
    mask: np.ndarray


def _frame_of(volume: Volume, k: int) -> int | None:
    """The frame number of slice ``k`` when its instance is multi-frame."""
    uid = volume.sop_instance_uids[k]
    if volume.sop_instance_uids.count(uid) > 1:
        return int(volume.frame_numbers[k])
    return None


def _region(volume: Volume, k: int, points: Any) -> PlanarRegion | None:
    if points is None:
        return None
    return PlanarRegion(
        volume.sop_instance_uids[k], tuple(points), "POLYLINE", _frame_of(volume, k)
    )


def _nodules(result: ModelResult, base: Finding, m: dict[str, Any]) -> list[DrawnFinding]:
    """One finding per reported focal component (largest first), drawn on the slice
    where it is largest: the stored measurements matched to the components of the
    label volume by their centroids."""
    assert result.labels is not None and base.label_value is not None
    found = focal_components(result.labels, int(base.label_value))
    rows = [c for c in m.get("components") or [] if c.get("centroid_voxel") is not None]
    total = max(int(m.get("count") or 0), len(rows))
    out: list[DrawnFinding] = []
    for number, row in enumerate(rows, start=1):
        if not found:
            break
        where = np.asarray(row["centroid_voxel"], dtype=np.float64)
        nearest = min(
            range(len(found)),
            key=lambda i: float(np.sum((np.asarray(found[i].centroid_voxel) - where) ** 2)),
        )
        comp = found.pop(nearest)
        region = _region(result.volume, comp.slice_index, outline(comp.mask))
        if region is None:
            continue
        finding = replace(
            base,
            volume_ml=row.get("volume_ml"),
            longest_diameter_mm=row.get("max_diameter_mm"),
            region=region,
            component=number,
            components=total,
        )
        out.append(DrawnFinding(finding, comp.slice_index, comp.mask))
    return out


def drawn_findings_of(result: ModelResult) -> list[Finding | DrawnFinding]:
    """The findings of one model's result rows; those with an image region come
    with their slice and mask. A focal segmentation row gives one finding per
    reported component (each nodule on the slice where it is largest); a
    non-focal one its region on the slice where it is largest."""
    manifest = result.manifest
    volume = result.volume
    labels = {label.value: label for label in manifest.labels}
    model = _model_spec(manifest)
    out: list[Finding | DrawnFinding] = []
    for row in result.rows:
        label = labels.get(int(row.get("label_value") or 0))
        code = CodeSpec(row["finding_code_value"], row["finding_code_scheme"], row["finding"])
        m = row.get("measurements") or {}
        top = m.get("max_slice_index")
        base = Finding(
            model=model,
            kind=manifest.task,
            code=code,
            present=bool(row.get("present")),
            probability=row.get("probability"),
            category=_spec(label.category) if label else None,
            finding_site=_spec(label.finding_site) if label else None,
            label_value=row.get("label_value"),
            volume_ml=m.get("volume_ml") if manifest.task == "segmentation" else None,
            longest_diameter_mm=m.get("largest_diameter_mm"),
            focal=bool(label.focal) if label else False,
            key_sop_instance_uid=m.get("max_slice_sop_instance_uid"),
            key_frame_number=(
                _frame_of(volume, int(top))
                if isinstance(top, int) and 0 <= top < len(volume.sop_instance_uids)
                else None
            ),
        )
        drawable = (
            manifest.task == "segmentation"
            and result.labels is not None
            and base.present
            and base.label_value is not None
        )
        if not drawable:
            out.append(base)
            continue
        assert result.labels is not None and base.label_value is not None
        if base.focal:
            nodules = _nodules(result, base, m)
            out.extend(nodules or [base])
            continue
        best = largest_slice(result.labels, int(base.label_value))
        region = _region(volume, best[0], hull(best[1])) if best is not None else None
        if best is None or region is None:
            out.append(base)
        else:
            out.append(DrawnFinding(replace(base, region=region), best[0], best[1]))
    return out


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
        if result.manifest.task != "segmentation" or result.labels is None:
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
    # the SEG-less segmentation findings cannot reference a segment: report without them
    reportable = [f for f in findings if f.kind != "segmentation" or f.model.name in segs]
    if reportable:
        sr = build_sr(reportable, list(sources.values()), segs, root)
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
        if f.kind == "classification" and f.code == shown.code and f.probability is not None:
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
    ctx: StudyContext, results: Sequence[ModelResult], settings: Settings
) -> dict[str, Any]:
    """Build, store and queue for delivery the job's result objects.

    Returns a summary for the job (objects and the delivery ids queued). With no
    destination configured nothing is built.
    """
    destinations = settings.destination_list
    if not destinations or not results:
        return {"objects": [], "deliveries_queued": 0}
    want_ki = any(d.wants("ki") for d in destinations)
    try:
        objects = build_objects(ctx, results, settings, key_image=want_ki)
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
    }
