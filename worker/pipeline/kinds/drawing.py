"""From result records to findings: what the SR says and where it is drawn.

Shared by the task kinds' handlers (:mod:`worker.pipeline.kinds`): the
:class:`Finding` of each record, and for label volumes the region on the slice
where a structure is largest (each focal component, a nodule, on its own).
Pure functions of the records and the label volume: no database, no files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from dicomnode.results import (
    CodeSpec,
    Finding,
    ModelSpec,
    PlanarRegion,
    focal_components,
    hull,
    largest_slice,
    outline,
)
from worker.pipeline.kinds.base import DrawnFinding, ModelResult
from worker.pipeline.registry import Code, Manifest
from worker.pipeline.volume import Volume


def _spec(code: Code | None) -> CodeSpec | None:
    return CodeSpec(code.value, code.scheme, code.meaning) if code is not None else None


def _model_spec(manifest: Manifest) -> ModelSpec:
    return ModelSpec(manifest.name, manifest.version, manifest.sha256)


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


def _base_pairs(result: ModelResult) -> Iterator[tuple[Finding, dict[str, Any]]]:
    manifest = result.manifest
    volume = result.volume
    labels = {label.value: label for label in manifest.labels}
    model = _model_spec(manifest)
    for row in result.rows:
        label = labels.get(int(row.get("label_value") or 0))
        code = CodeSpec(row["finding_code_value"], row["finding_code_scheme"], row["finding"])
        m = row.get("measurements") or {}
        top = m.get("max_slice_index")
        yield (
            Finding(
                model=model,
                kind=manifest.task,
                code=code,
                present=bool(row.get("present")),
                probability=row.get("probability"),
                category=_spec(label.category) if label else None,
                finding_site=_spec(label.finding_site) if label else None,
                label_value=row.get("label_value"),
                volume_ml=m.get("volume_ml"),
                longest_diameter_mm=m.get("largest_diameter_mm"),
                focal=bool(label.focal) if label else False,
                key_sop_instance_uid=m.get("max_slice_sop_instance_uid"),
                key_frame_number=(
                    _frame_of(volume, int(top))
                    if isinstance(top, int) and 0 <= top < len(volume.sop_instance_uids)
                    else None
                ),
            ),
            m,
        )


def base_findings(result: ModelResult) -> Iterator[Finding]:
    """One finding per record, with no region of its own."""
    for finding, _m in _base_pairs(result):
        yield finding


def drawn_segments(result: ModelResult) -> list[Finding | DrawnFinding]:
    """The findings of a label volume's records: a focal label gives one finding
    per reported component (each nodule on the slice where it is largest); a
    non-focal one its region on the slice where it is largest."""
    out: list[Finding | DrawnFinding] = []
    for base, m in _base_pairs(result):
        drawable = result.labels is not None and base.present and base.label_value is not None
        if not drawable:
            out.append(base)
            continue
        assert result.labels is not None and base.label_value is not None
        if base.focal:
            nodules = _nodules(result, base, m)
            out.extend(nodules or [base])
            continue
        best = largest_slice(result.labels, int(base.label_value))
        region = _region(result.volume, best[0], hull(best[1])) if best is not None else None
        if best is None or region is None:
            out.append(base)
        else:
            out.append(DrawnFinding(replace(base, region=region), best[0], best[1]))
    return out
