"""ONNX inference: one onnxruntime session per model per worker process.

Sessions are created lazily in the process that uses them (after the Celery
pool forked), never at import time. Slices go through the model in batches so
memory stays bounded for long series.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.pipeline.registry import Manifest, RegisteredModel

log = logging.getLogger(__name__)


class ModelRunError(RuntimeError):
    """A model could not be loaded or run; the message names the model."""


class ModelTimeout(ModelRunError):
    pass


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int = 0  # 0: onnxruntime decides
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def available_providers(wanted: tuple[str, ...]) -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in have]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(path: Path, options: RuntimeOptions) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if options.threads:
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(
        str(path), sess_options=so, providers=available_providers(options.providers)
    )


class SessionCache:
    """Per-process cache of sessions, keyed by model name and sha256."""

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options
        self._pid = os.getpid()
        self._sessions: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, model: RegisteredModel) -> Any:
        assert model.manifest is not None
        if os.getpid() != self._pid:  # forked: never share a parent's session
            self._sessions.clear()
            self._pid = os.getpid()
        key = (model.name, model.manifest.sha256)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                try:
                    session = create_session(model.onnx_path, self.options)
                except Exception as exc:
                    raise ModelRunError(
                        f"model {model.name}: cannot be loaded by onnxruntime ({exc})"
                    ) from None
                self._sessions[key] = session
            return session


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class Deadline:
    def __init__(self, name: str, seconds: float | None) -> None:
        self.name = name
        self.seconds = seconds
        self.start = time.monotonic()

    def check(self) -> None:
        if self.seconds is not None and time.monotonic() - self.start > self.seconds:
            raise ModelTimeout(
                f"model {self.name}: exceeded its time limit of {self.seconds:.0f} s"
            )


def header_vector(manifest: Manifest, features: dict[str, float | None]) -> dict[str, np.ndarray]:
    """Build the header-derived inputs; a missing value takes the manifest's
    declared default, and a missing value without a default is an error."""
    out: dict[str, np.ndarray] = {}
    for spec in manifest.header_inputs:
        values = []
        for feature in spec.features:
            value = features.get(feature)
            if value is None:
                if feature not in spec.missing:
                    raise ModelRunError(
                        f"model {manifest.name}: header value {feature} is missing and the "
                        "manifest declares no default"
                    )
                value = spec.missing[feature]
            values.append(float(value))
        out[spec.name] = np.asarray([values], dtype=np.float32)
    return out


def run_batches(
    session: Any,
    manifest: Manifest,
    batches: Iterator[np.ndarray],
    extra: dict[str, np.ndarray],
    deadline: Deadline,
) -> Iterator[np.ndarray]:
    """Run the model over prepared batches (N x C x H x W float32)."""
    pixel_name = manifest.pixel_input.name
    output_name = session.get_outputs()[0].name
    for batch in batches:
        deadline.check()
        feeds = {pixel_name: np.ascontiguousarray(batch, dtype=np.float32)}
        for name, vector in extra.items():
            feeds[name] = np.repeat(vector, batch.shape[0], axis=0)
        try:
            (out,) = session.run([output_name], feeds)
        except Exception as exc:
            raise ModelRunError(f"model {manifest.name}: inference failed ({exc})") from None
        yield np.asarray(out, dtype=np.float32)


def dummy_feeds(session: Any, batch: int = 1) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d < 0 else d for d in inp.shape]
        feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def check_model(model: RegisteredModel, options: RuntimeOptions) -> dict[str, Any]:
    """Load the model, run a dummy input, report input/output shapes."""
    session = create_session(model.onnx_path, options)
    feeds = dummy_feeds(session)
    outputs = session.run(None, feeds)
    return {
        "inputs": {name: list(arr.shape) for name, arr in feeds.items()},
        "outputs": {
            o.name: list(np.asarray(v).shape)
            for o, v in zip(session.get_outputs(), outputs, strict=True)
        },
        "providers": session.get_providers(),
    }


__all__ = [
    "Deadline",
    "ModelRunError",
    "ModelTimeout",
    "RuntimeOptions",
    "SessionCache",
    "_batches",
    "check_model",
    "header_vector",
    "run_batches",
]
