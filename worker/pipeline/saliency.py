"""Where a classifier looked: occlusion sensitivity maps, model-agnostic.

For a classification finding, the slice that drove it (the record's
``max_slice_index``) is prepared exactly as the model saw it (the manifest's
recipe, :mod:`worker.pipeline.recipe`); square patches of that input are then
hidden one at a time and the model run again on every occluded copy (in
batches). A pixel's saliency is the mean drop of the finding's probability over
the occlusions that hid it, averaged over three patch sizes (a seventh, a
quarter and about a third of the input side: small findings and large ones).
A hidden patch is filled with the same input heavily blurred (Gaussian, sigma
half the patch), so occlusion removes local structure without drawing a new
edge the model could react to. The map is put back onto the original pixel grid
through the recipe's own crop box (:func:`recipe.restore_slices`).

Time is bounded per study (``PACS_AI_SALIENCY_BUDGET_SECONDS``): every finding
first gets a coarse pass (stride half a patch), then, while time is left, a
fine one (stride a quarter of a patch) that replaces it. A finding whose coarse
pass did not fit gets no map. Passes are deterministic: the same inputs give
the same map whatever the machine, only how many findings reach the fine pass
depends on the time.

Pure computation on arrays: the model is a ``predict`` callable (batch of
prepared inputs -> one score column per label); :func:`onnx_predictor` makes
one from an onnxruntime session. No database, no files, no DICOM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from worker.pipeline import recipe
from worker.pipeline.inference import Deadline, run_batches
from worker.pipeline.registry import Manifest
from worker.pipeline.volume import Volume

#: a batch of prepared inputs (N, C, H, W) float32 -> scores (N, K), one column per label
Predictor = Callable[[np.ndarray], np.ndarray]

#: patch sides as fractions of the input side (224 -> 32, 56, 80 pixels)
PATCH_FRACTIONS = (1 / 7, 1 / 4, 5 / 14)


class SaliencyError(ValueError):
    """A map cannot be computed for this input (the message says why)."""


@dataclass(frozen=True)
class Target:
    """One classification finding to explain on one slice."""

    key: str  # unique within the job, e.g. "chest-ct-nodule-cls:1"
    model: str
    label_index: int  # column of the model's output
    slice_index: int  # slice of the volume (the one that drove the finding)
    prepared: np.ndarray  # (C, H, W) float32: the model's input of that slice
    box: recipe.Box  # the recipe's crop box of that slice (original pixels)
    shape: tuple[int, int]  # (rows, cols) of the original slice


@dataclass
class SaliencyMap:
    """The occlusion sensitivity of one finding on its slice."""

    key: str
    model: str
    slice_index: int
    heat: np.ndarray  # float32 (rows, cols) on the original grid, 0..1 (1: the hottest)
    baseline: float  # the finding's score on the unoccluded slice
    max_drop: float  # the largest mean score drop (the heat map's 1)
    stride: str  # "coarse" or "fine"
    evaluations: int  # occluded inputs run through the model
    seconds: float

    def hottest(self) -> tuple[int, int]:
        """(row, col) of the hottest pixel."""
        r, c = np.unravel_index(int(np.argmax(self.heat)), self.heat.shape)
        return int(r), int(c)


@dataclass
class _Pass:
    """The occlusions of one target at one stride, and what they gave so far."""

    target: Target
    positions: list[tuple[int, int, int]]  # (patch side, row, col) in the input grid
    scores: list[float] = field(default_factory=list)


def patch_sizes(side: int) -> list[int]:
    """The patch sides for an input ``side`` pixels wide (at least 4, distinct)."""
    return sorted({max(4, min(side, int(round(side * f)))) for f in PATCH_FRACTIONS})


def _offsets(side: int, patch: int, stride: int) -> list[int]:
    out = list(range(0, side - patch + 1, stride))
    if out[-1] != side - patch:
        out.append(side - patch)  # the last patch touches the border
    return out


def occlusion_positions(shape: tuple[int, int], divisor: int) -> list[tuple[int, int, int]]:
    """(patch, row, col) of every occlusion, stride ``patch // divisor``."""
    rows, cols = shape
    out = []
    for patch in patch_sizes(min(rows, cols)):
        stride = max(1, patch // divisor)
        for r in _offsets(rows, patch, stride):
            for c in _offsets(cols, patch, stride):
                out.append((patch, r, c))
    return out


def _fills(prepared: np.ndarray) -> dict[int, np.ndarray]:
    """Per patch side, what hides a patch: the input blurred with sigma patch/2."""
    hwc = np.ascontiguousarray(np.moveaxis(prepared, 0, -1))
    out = {}
    for patch in patch_sizes(min(prepared.shape[1:])):
        blurred = cv2.GaussianBlur(
            hwc, (0, 0), sigmaX=patch / 2, sigmaY=patch / 2, borderType=cv2.BORDER_REFLECT
        )
        out[patch] = np.moveaxis(blurred.reshape(hwc.shape), -1, 0).astype(np.float32)
    return out


def _heat(p: _Pass, baseline: float) -> tuple[np.ndarray, float]:
    """Mean score drop per input pixel, averaged over the patch sizes, scaled to 0..1."""
    _, h, w = p.target.prepared.shape
    per_size: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for (patch, r, c), score in zip(p.positions, p.scores, strict=True):
        acc, cnt = per_size.setdefault(
            patch, (np.zeros((h, w), np.float64), np.zeros((h, w), np.float64))
        )
        acc[r : r + patch, c : c + patch] += max(0.0, baseline - score)
        cnt[r : r + patch, c : c + patch] += 1
    maps = [acc / np.maximum(cnt, 1) for acc, cnt in per_size.values()]
    heat = np.mean(maps, axis=0) if maps else np.zeros((h, w))
    top = float(heat.max())
    return (heat / top if top > 0 else heat).astype(np.float32), top


def _to_original(heat: np.ndarray, target: Target) -> np.ndarray:
    full = recipe.restore_slices(heat[None, None], [target.box], target.shape, fill=0.0)[0, 0]
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def occlusion_maps(
    targets: Sequence[Target],
    predictors: Mapping[str, Predictor],
    budget_seconds: float,
    batch_size: int = 32,
    clock: Callable[[], float] = time.monotonic,
) -> list[SaliencyMap]:
    """Maps of ``targets`` (in their order) within ``budget_seconds``: a coarse
    pass for every target first, then fine passes while time is left.
    ``predictors`` by model name. Targets without a finished pass are left out."""
    if budget_seconds <= 0 or not targets:
        return []
    start = clock()
    deadline = start + budget_seconds
    baselines: dict[str, float] = {}
    done: dict[str, SaliencyMap] = {}
    evaluations: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for divisor, stride in ((2, "coarse"), (4, "fine")):
        for target in targets:
            if clock() >= deadline:
                break
            if stride == "fine" and target.key not in done:
                continue  # its coarse pass did not fit: no fine one either
            t0 = clock()
            predict = predictors[target.model]
            if target.key not in baselines:
                out = predict(target.prepared[None])
                baselines[target.key] = float(out[0, min(target.label_index, out.shape[1] - 1)])
            baseline = baselines[target.key]
            p = _Pass(target, occlusion_positions(target.prepared.shape[1:], divisor))
            fills = _fills(target.prepared)
            finished = True
            for first in range(0, len(p.positions), batch_size):
                if clock() >= deadline:
                    finished = False
                    break
                chunk = p.positions[first : first + batch_size]
                batch = np.repeat(target.prepared[None], len(chunk), axis=0)
                for i, (patch, r, c) in enumerate(chunk):
                    batch[i, :, r : r + patch, c : c + patch] = fills[patch][
                        :, r : r + patch, c : c + patch
                    ]
                out = predict(batch)
                column = out[:, min(target.label_index, out.shape[1] - 1)]
                p.scores.extend(float(v) for v in column)
            evaluations[target.key] = evaluations.get(target.key, 0) + len(p.scores)
            seconds[target.key] = seconds.get(target.key, 0.0) + clock() - t0
            if not finished:
                continue  # a partial pass covers the slice unevenly: keep the last whole one
            heat, top = _heat(p, baseline)
            done[target.key] = SaliencyMap(
                key=target.key,
                model=target.model,
                slice_index=target.slice_index,
                heat=_to_original(heat, target),
                baseline=baseline,
                max_drop=top,
                stride=stride,
                evaluations=evaluations[target.key],
                seconds=seconds[target.key],
            )
    return [done[t.key] for t in targets if t.key in done]


# -- from a model's run to its targets -------------------------------------------------


def prepare_slice(volume: Volume, manifest: Manifest, k: int) -> tuple[np.ndarray, recipe.Box]:
    """Slice ``k`` as the model saw it: (C, H, W) float32 and its crop box."""
    prep = manifest.preprocessing
    rows, cols = volume.pixels.shape[1:3]
    if prep.get("mode") == "rgb_image":
        if not volume.is_rgb:
            raise SaliencyError(f"model {manifest.name}: expects colour images")
        arr = recipe.prepare_rgb(volume.pixels[k : k + 1], prep)
        if prep.get("crop") == "center_square":
            # the box prepare_rgb crops to (the recipe's own rounding)
            box: recipe.Box = recipe._square_box((rows - 1) / 2, (cols - 1) / 2, min(rows, cols))
        else:
            box = recipe.full_box((rows, cols))
        return arr[0], box
    if volume.is_rgb:
        raise SaliencyError(f"model {manifest.name}: expects greyscale slices")
    arr, boxes = recipe.prepare_slices(volume.pixels[k : k + 1], prep)
    return arr[0], boxes[0]


def targets_for(
    model: str, manifest: Manifest, volume: Volume, rows: Sequence[Mapping[str, Any]]
) -> list[Target]:
    """One target per classification record of ``rows`` (those that name the slice
    that drove them, ``measurements.max_slice_index``), present findings first."""
    out: list[tuple[bool, Target]] = []
    prepared: dict[int, tuple[np.ndarray, recipe.Box]] = {}
    label_values = [label.value for label in manifest.labels]
    for row in rows:
        m = row.get("measurements") or {}
        k = m.get("max_slice_index")
        if not isinstance(k, int) or not 0 <= k < volume.pixels.shape[0]:
            continue
        value = row.get("label_value")
        index = label_values.index(value) if value in label_values else 0
        if k not in prepared:
            prepared[k] = prepare_slice(volume, manifest, k)
        arr, box = prepared[k]
        target = Target(
            key=f"{model}:{value}",
            model=model,
            label_index=index,
            slice_index=k,
            prepared=arr,
            box=box,
            shape=(int(volume.pixels.shape[1]), int(volume.pixels.shape[2])),
        )
        out.append((not bool(row.get("present")), target))
    return [t for _, t in sorted(out, key=lambda item: item[0])]


def onnx_predictor(session: Any, manifest: Manifest, extra: dict[str, np.ndarray]) -> Predictor:
    """A :data:`Predictor` over an onnxruntime session (header inputs repeated)."""

    def predict(batch: np.ndarray) -> np.ndarray:
        deadline = Deadline(manifest.name, None)  # the saliency budget bounds the time
        (out,) = run_batches(session, manifest, iter([batch]), extra, deadline)
        return out.reshape(out.shape[0], -1)

    return predict


def budget_note(maps: Sequence[SaliencyMap], targets: Sequence[Target]) -> dict[str, Any]:
    """A summary for the job: maps made, their strides, evaluations and seconds."""
    return {
        "targets": len(targets),
        "maps": len(maps),
        "fine": sum(1 for m in maps if m.stride == "fine"),
        "evaluations": sum(m.evaluations for m in maps),
        "seconds": round(math.fsum(m.seconds for m in maps), 3),
    }


__all__ = [
    "PATCH_FRACTIONS",
    "Predictor",
    "SaliencyError",
    "SaliencyMap",
    "Target",
    "budget_note",
    "occlusion_maps",
    "occlusion_positions",
    "onnx_predictor",
    "patch_sizes",
    "prepare_slice",
    "targets_for",
]
