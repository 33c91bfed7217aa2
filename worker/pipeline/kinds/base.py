"""What every task kind shares: the typed result records, the inputs of one
model run, and the handler interface a kind implements.

A handler turns one model's output on one series into result records (stored
as they are in ``results``) and turns those records back into the findings the
SR, SEG and key image show. It must not import the database, Celery or the
API; :mod:`worker.pipeline.run` persists and :mod:`worker.results.report`
builds objects.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import numpy as np

from worker.pipeline import recipe
from worker.pipeline.inference import Deadline, ModelRunError, _batches, run_batches
from worker.pipeline.registry import Code, Manifest, RegisteredModel
from worker.pipeline.volume import Volume

if TYPE_CHECKING:
    from dicomnode.results import Finding
    from worker.settings import Settings


class ResultRecord(TypedDict, total=False):
    """One row of ``results``: a finding of one model on one series.

    ``measurements`` depends on the kind (see each handler's module); the other
    keys are common to every kind."""

    model: str
    model_version: str
    model_sha256: str
    kind: str
    finding_code_value: str
    finding_code_scheme: str
    finding: str
    label_value: int | None
    probability: float | None
    present: bool
    measurements: dict[str, Any]
    series_instance_uid: str
    timings: dict[str, float]


@dataclass
class ModelRun:
    """What one model produced on one series."""

    rows: list[ResultRecord]
    timings: dict[str, float]
    #: segmentation: uint8 label volume (slices in ``volume`` order); else None
    labels: np.ndarray | None


@dataclass
class ModelResult:
    """What one model produced on one series, as the reporting step needs it."""

    manifest: Manifest
    series_instance_uid: str
    volume: Volume
    rows: list[ResultRecord] | list[dict[str, Any]]
    labels: np.ndarray | None  # segmentation label volume, slices in volume order


@dataclass
class RunInputs:
    """Everything a handler needs to run one model on one series."""

    model: RegisteredModel
    manifest: Manifest
    volume: Volume
    session: Any  # an onnxruntime InferenceSession
    deadline: Deadline
    extra: dict[str, np.ndarray]  # header features for models that take them
    settings: Settings
    base: ResultRecord = field(default_factory=lambda: ResultRecord())
    timings: dict[str, float] = field(
        default_factory=lambda: {"preprocess_s": 0.0, "inference_s": 0.0, "postprocess_s": 0.0}
    )

    def infer(self, arr: np.ndarray) -> np.ndarray:
        """Run the model on one prepared batch (timed as inference)."""
        t = time.monotonic()
        (out,) = run_batches(self.session, self.manifest, iter([arr]), self.extra, self.deadline)
        self.timings["inference_s"] += time.monotonic() - t
        return out


@dataclass(frozen=True)
class DrawnFinding:
    """A finding and where it is drawn: its slice in the model's volume and its
    mask there (the key image outlines it)."""

    finding: Finding
    slice_index: int
    mask: np.ndarray


class KindHandler(Protocol):
    """One task kind (the manifest's ``task``)."""

    task: str

    def run(self, inputs: RunInputs) -> ModelRun:
        """Result records (and for a segmentation its label volume)."""
        ...

    def findings(self, result: ModelResult) -> list[Finding | DrawnFinding]:
        """The findings of the result records; drawn ones with slice and mask."""
        ...


def code_fields(code: Code) -> ResultRecord:
    return {
        "finding_code_value": code.value,
        "finding_code_scheme": code.scheme,
        "finding": code.meaning,
    }


def pixel_batches(
    volume: Volume, manifest: Manifest
) -> Iterator[tuple[slice, np.ndarray, list[Any]]]:
    """The model's input in batches: (slice range, prepared array, crop boxes)."""
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
