"""Saliency maps of a job's classification findings, as objects to deliver.

Called by :func:`worker.results.report.build_result_objects` when a destination's
profile asks for ``map``: computes the occlusion sensitivity of every
classification finding within ``PACS_AI_SALIENCY_BUDGET_SECONDS``
(:mod:`worker.pipeline.saliency`), builds one Secondary Capture per map
(:func:`dicomnode.maps.build_saliency_sc`) and lists them in the job's SR
(:func:`dicomnode.maps.reference_maps`). Nothing is written here; the report
writes and queues the objects like the SR, SEG and key image. A map that cannot
be made is logged and left out: it never costs the job its SR and SEG.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydicom import dcmread

from dicomnode.maps import MAP_SERIES_NUMBER, MapCaption, build_saliency_sc, reference_maps
from dicomnode.results import BuiltObject, ModelSpec, ResultBuildError
from worker.pipeline import saliency
from worker.pipeline.inference import ModelRunError
from worker.pipeline.kinds.base import ModelResult
from worker.pipeline.recipe import RecipeError
from worker.scheduling.jobs import JobError, StudyContext
from worker.settings import Settings

log = logging.getLogger(__name__)


def _method(m: saliency.SaliencyMap, side: int) -> str:
    sizes = "/".join(str(s) for s in saliency.patch_sizes(side))
    return f"occlusion sensitivity, patches {sizes} of {side} px, {m.stride} stride"


def saliency_objects(
    ctx: StudyContext,
    results: Sequence[ModelResult],
    settings: Settings,
    predictors: Mapping[str, saliency.Predictor],
) -> tuple[list[BuiltObject], dict[str, Any]]:
    """The map objects of the job's classification findings and a summary."""
    targets: list[saliency.Target] = []
    owner: dict[str, tuple[int, ModelResult, Mapping[str, Any]]] = {}
    try:
        for index, result in enumerate(results):
            name = result.manifest.name
            if name not in predictors:
                continue
            found = saliency.targets_for(name, result.manifest, result.volume, result.rows)
            rows = {f"{name}:{r.get('label_value')}": r for r in result.rows}
            for target in found:
                targets.append(target)
                owner[target.key] = (index, result, rows[target.key])
        maps = saliency.occlusion_maps(targets, predictors, settings.saliency_budget_seconds)
    except (ModelRunError, saliency.SaliencyError, RecipeError) as exc:
        # a map explains a result; it never costs the job its SR and SEG
        log.warning("job %d: no saliency maps (%s)", ctx.job_id, exc)
        return [], {"targets": len(targets), "maps": 0, "error": str(exc)}
    summary = saliency.budget_note(maps, targets)
    if len(maps) < len(targets):
        log.warning(
            "job %d: %d of %d saliency maps fit in %.0f s",
            ctx.job_id,
            len(maps),
            len(targets),
            settings.saliency_budget_seconds,
        )
    paths = {ref.sop_instance_uid: ref.path for ref in ctx.instances}
    built: list[BuiltObject] = []
    per_series: dict[str, int] = {}
    for m in maps:
        index, result, row = owner[m.key]
        volume = result.volume
        sop_uid = volume.sop_instance_uids[m.slice_index]
        path = paths.get(sop_uid)
        if path is None:
            raise JobError(f"instance sop={sop_uid} of a model's series is not in the job")
        header = dcmread(path, stop_before_pixels=True)
        manifest = result.manifest
        side = saliency_input_side(manifest)
        caption = MapCaption(
            finding=str(row.get("finding") or ""),
            present=bool(row.get("present")),
            probability=row.get("probability"),
            model=ModelSpec(manifest.name, manifest.version, manifest.sha256),
            method=_method(m, side),
        )
        number = per_series[manifest.name] = per_series.get(manifest.name, 0) + 1
        try:
            ds = build_saliency_sc(
                header,
                volume.pixels[m.slice_index],
                m.heat,
                caption,
                m.key,
                settings.uid_root,
                row_dir=volume.row_dir if volume.positions_known else None,
                col_dir=volume.col_dir if volume.positions_known else None,
                series_number=MAP_SERIES_NUMBER + index,
                instance_number=number,
            )
        except ResultBuildError as exc:
            log.warning("job %d: saliency map of %s not built (%s)", ctx.job_id, m.key, exc)
            summary["maps"] -= 1
            continue
        built.append(BuiltObject("map", ds))
    return built, summary


def saliency_input_side(manifest: Any) -> int:
    """The side of the model's (square or not) input: the smaller of H and W."""
    size = manifest.preprocessing.get("size") or [0, 0]
    return int(min(int(size[0]), int(size[1])))


def with_maps(objects: Sequence[BuiltObject], maps: Sequence[BuiltObject]) -> list[BuiltObject]:
    """``objects`` with the SR referencing ``maps`` (its UIDs unchanged), then the maps."""
    datasets = [m.dataset for m in maps]
    out = [
        BuiltObject("sr", reference_maps(o.dataset, datasets)) if o.kind == "sr" and maps else o
        for o in objects
    ]
    return [*out, *maps]


__all__ = ["saliency_objects", "with_maps"]
