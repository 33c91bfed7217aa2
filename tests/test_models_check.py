"""`pacs-ai models check` passes on the shipped models and fails, naming the
model, when a file is corrupted, replaced, missing or its manifest is invalid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.pipeline.registry import DEMO_MODELS_DIR, discover, sha256_file

SHIPPED = sorted(p.stem for p in DEMO_MODELS_DIR.glob("*.json"))
pytestmark = pytest.mark.skipif(not SHIPPED, reason="demo models not built")


def check(models_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env["PACS_AI_MODELS_DIR"] = str(models_dir)
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "models", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def models(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(DEMO_MODELS_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return target


def test_shipped_models_pass() -> None:
    assert {"chest-ct-nodule-cls", "chest-ct-lung-seg", "endoscopy-lesion-cls"} <= set(SHIPPED)
    result = check(DEMO_MODELS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in SHIPPED:
        assert f"ok   {name}" in result.stdout
    assert "outputs" in result.stdout
    for path in DEMO_MODELS_DIR.glob("*.onnx"):
        assert path.stat().st_size < 10 * 1024 * 1024, path.name


def test_corrupted_file_fails_naming_the_model(models: Path) -> None:
    onnx = models / "chest-ct-lung-seg.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    onnx.write_bytes(bytes(data))
    result = check(models)
    assert result.returncode == 1
    assert "FAIL chest-ct-lung-seg" in result.stdout and "sha256" in result.stdout
    assert "ok   chest-ct-nodule-cls" in result.stdout  # the others keep running
    # the registry disables it and keeps the others
    found = {m.name: m for m in discover(models)}
    assert not found["chest-ct-lung-seg"].enabled
    assert found["chest-ct-nodule-cls"].enabled


def test_garbage_with_matching_hash_fails_to_load(models: Path) -> None:
    onnx = models / "endoscopy-lesion-cls.onnx"
    onnx.write_bytes(b"not an onnx model at all")
    manifest = models / "endoscopy-lesion-cls.json"
    data = json.loads(manifest.read_text())
    data["sha256"] = sha256_file(onnx)
    manifest.write_text(json.dumps(data))
    result = check(models)
    assert result.returncode == 1
    assert "FAIL endoscopy-lesion-cls" in result.stdout
    assert "onnxruntime" in result.stdout


def test_wrong_hash_missing_file_and_bad_manifest(models: Path) -> None:
    manifest = models / "chest-ct-nodule-cls.json"
    data = json.loads(manifest.read_text())
    data["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    (models / "chest-ct-lung-seg.onnx").unlink()
    (models / "broken.json").write_text('{"name": "broken", "version": "1"}')
    result = check(models)
    assert result.returncode == 1
    assert "FAIL chest-ct-nodule-cls: model chest-ct-nodule-cls: sha256" in result.stdout
    assert "FAIL chest-ct-lung-seg: model chest-ct-lung-seg: ONNX file" in result.stdout
    assert "FAIL broken: broken.json:" in result.stdout
    assert "ok   endoscopy-lesion-cls" in result.stdout
