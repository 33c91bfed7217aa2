"""Classification: one probability per label for the series.

The model scores every slice (or image); :func:`postprocess.classify`
aggregates the scores as the manifest says. A record's ``measurements``:
``aggregation``, ``threshold``, ``slices``, ``max_slice_index``,
``max_slice_sop_instance_uid`` and ``max_slice_probability`` (the slice that
drove the finding: the SR frames it there).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from worker.pipeline import postprocess
from worker.pipeline.kinds.base import (
    ModelResult,
    ModelRun,
    ResultRecord,
    RunInputs,
    code_fields,
    pixel_batches,
)

if TYPE_CHECKING:
    from dicomnode.results import Finding
    from worker.pipeline.kinds.base import DrawnFinding


class ClassificationHandler:
    task = "classification"

    def run(self, inputs: RunInputs) -> ModelRun:
        manifest, volume, timings = inputs.manifest, inputs.volume, inputs.timings
        probs = []
        t = time.monotonic()
        for _part, arr, _boxes in pixel_batches(volume, manifest):
            timings["preprocess_s"] += time.monotonic() - t
            out = inputs.infer(arr)
            probs.append(out.reshape(out.shape[0], -1))
            t = time.monotonic()
        t = time.monotonic()
        per_slice = np.concatenate(probs, axis=0)
        out_rows: list[ResultRecord] = []
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
                    **inputs.base,
                    **code_fields(label.code),
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

    def findings(self, result: ModelResult) -> list[Finding | DrawnFinding]:
        from worker.pipeline.kinds.drawing import base_findings

        return list(base_findings(result))


HANDLER = ClassificationHandler()
