"""The model registry: ONNX files plus JSON manifests (see docs/MODELS.md).

A model whose file is missing, whose hash does not match or whose manifest is
invalid is disabled with one clear error; the others keep running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worker.pipeline.kinds.table import REGISTRY
from worker.settings import DEMO_MODELS_DIR as DEMO_MODELS_DIR

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest is invalid; the message names the model and what is wrong."""


class Code(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: str = Field(min_length=1, max_length=32)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=128)


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: int = Field(ge=0, le=255)
    code: Code
    category: Code | None = None
    finding_site: Code | None = None
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    focal: bool = False
    #: focal labels: components smaller than this (ml) are not reported
    min_volume_ml: float = Field(default=0.0, ge=0.0)
    #: focal labels: components less compact than this are not reported;
    #: compactness = volume / volume of the sphere of the component's largest
    #: diameter (1 for a ball, near 0 for a vessel-like tube)
    min_compactness: float = Field(default=0.0, ge=0.0, le=1.0)
    #: focal labels: components whose largest inscribed ball is smaller than
    #: this radius (mm) are not reported (thin, vessel-like structures)
    min_core_radius_mm: float = Field(default=0.0, ge=0.0)
    #: focal labels: volume and diameter are measured after a morphological
    #: opening by a ball of this radius (mm), which cuts off attached vessels
    opening_radius_mm: float = Field(default=0.0, ge=0.0, le=20.0)


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    source: Literal["pixels", "header"] = "pixels"
    shape: list[int]
    dtype: Literal["float32"] = "float32"
    layout: str | None = None
    features: list[str] = Field(default_factory=list)
    missing: dict[str, float] = Field(default_factory=dict)

    @field_validator("features")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = set(value) - HEADER_FEATURES
        if unknown:
            raise ValueError(
                f"unknown header features {sorted(unknown)}; accepted: {sorted(HEADER_FEATURES)}"
            )
        return value


class Routing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    modalities: list[str] = Field(default_factory=list)
    sop_classes: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    image_types: list[str] = Field(default_factory=list)
    min_slices: int = Field(default=1, ge=1)
    description_pattern: str | None = None

    @field_validator("description_pattern")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"description_pattern is not a valid regex ({exc})") from None
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    version: str = Field(min_length=1, max_length=32)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: the task kind: a key of :data:`worker.pipeline.kinds.table.REGISTRY`
    task: str
    model_card: str = ""
    inputs: list[InputSpec] = Field(min_length=1)
    preprocessing: dict[str, Any]
    aggregation: Literal["max", "mean", "top3_mean", "max_consistent"] = "max"
    #: classification, ``max_consistent``: the z window (mm) a finding must fill
    aggregation_window_mm: float = Field(default=3.0, gt=0.0, le=50.0)
    #: segmentation: how volumes are measured. "voxels" counts argmax voxels;
    #: "probability" sums the softmax probability over each structure grown by
    #: one voxel (partial-volume corrected; for models trained on occupancy).
    volume_method: Literal["voxels", "probability"] = "voxels"
    #: segmentation: whether the model outputs logits (softmax applied here) or
    #: probabilities.
    segmentation_output: Literal["logits", "probabilities"] = "logits"
    labels: list[Label] = Field(min_length=1)
    routing: Routing
    time_limit_seconds: float | None = Field(default=None, gt=0)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in REGISTRY:
            raise ValueError(f"task must be one of {', '.join(sorted(REGISTRY))}")
        return value

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError("file must be a plain file name next to the manifest")
        return value

    @property
    def pixel_input(self) -> InputSpec:
        return next(i for i in self.inputs if i.source == "pixels")

    @property
    def header_inputs(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.source == "header"]


HEADER_FEATURES = frozenset({"age_years", "age_years_div100", "sex_male", "sex_female"})


@dataclass(frozen=True)
class RegisteredModel:
    """A manifest found in the models dir, enabled or disabled with a reason."""

    name: str
    manifest_path: Path
    manifest: Manifest | None
    error: str | None

    @property
    def enabled(self) -> bool:
        return self.manifest is not None and self.error is None

    @property
    def onnx_path(self) -> Path:
        assert self.manifest is not None
        return self.manifest_path.parent / self.manifest.file

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "version": m.version if m else None,
            "task": m.task if m else None,
            "sha256": m.sha256 if m else None,
            "file": str(self.manifest_path.parent / m.file) if m else None,
            "enabled": self.enabled,
            "error": self.error,
            "findings": [label.code.meaning for label in m.labels] if m else [],
            "routing": m.routing.model_dump() if m else None,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path.name}: cannot read manifest ({exc})") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise ManifestError(f"{path.name}: {loc}: {msg}") from None


def discover(models_dir: Path, verify_hash: bool = True) -> list[RegisteredModel]:
    """Every manifest in ``models_dir``, each enabled or disabled with one error."""
    found: list[RegisteredModel] = []
    if not models_dir.is_dir():
        log.error("models directory %s does not exist; no model will run", models_dir)
        return found
    seen: set[str] = set()
    for path in sorted(models_dir.glob("*.json")):
        name = path.stem
        try:
            manifest = load_manifest(path)
            name = manifest.name
            if name in seen:
                raise ManifestError(f"{path.name}: a model named {name!r} is already registered")
            onnx = path.parent / manifest.file
            if not onnx.is_file():
                raise ManifestError(f"model {name}: ONNX file {manifest.file} is missing")
            if verify_hash and sha256_file(onnx) != manifest.sha256:
                raise ManifestError(
                    f"model {name}: sha256 of {manifest.file} does not match the manifest "
                    "(file corrupted or replaced)"
                )
        except ManifestError as exc:
            log.error("model disabled: %s", exc)
            found.append(RegisteredModel(name, path, None, str(exc)))
            continue
        seen.add(name)
        found.append(RegisteredModel(name, path, manifest, None))
    return found
