"""Inference done-when 1: storescu -> embedded node -> results in the database.

A nodule phantom gives "Lung nodule" present, a clean phantom absent, and the
segmented lung and nodule volumes are close to the generator's truth.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import NodeFactory, port_open, wait_for
from tests.factory import CANARY_ID, CANARY_NAME
from worker.pipeline.registry import DEMO_MODELS_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"),
]


def _write(phantom_seed: int, folder: Path, **overrides: object) -> tuple[str, dict]:
    phantom = generate_chest_ct(phantom_seed, **overrides)
    folder.mkdir(parents=True)
    study_uid = ""
    for i, ds in enumerate(
        phantom_to_datasets(
            phantom,
            shuffle=True,
            seed=phantom_seed,
            patient_name=CANARY_NAME,
            patient_id=CANARY_ID,
            signed=phantom_seed % 2 == 0,
        )
    ):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
        study_uid = str(ds.StudyInstanceUID)
    return study_uid, phantom.truth


def test_nodule_and_clean_phantoms(node_factory: NodeFactory, tmp_path: Path) -> None:
    common = dict(matrix=256, slices=60, thickness_mm=2.5, noise_sigma=10.0)
    nodule_uid, nodule_truth = _write(
        5_000_001, tmp_path / "nodule", nodule=True, nodule_diameter_mm=18.0, **common
    )
    clean_uid, clean_truth = _write(5_000_002, tmp_path / "clean", nodule=False, **common)
    assert nodule_truth["nodule_volume_ml"] > 0 and not clean_truth["nodule_volume_ml"]

    node = node_factory(ort_threads=2)
    node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")
    for folder in ("nodule", "clean"):
        sent = subprocess.run(
            [
                "storescu",
                "-aec",
                "PACSAI",
                "+sd",
                "127.0.0.1",
                str(node.port),
                str(tmp_path / folder),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
    node.wait_jobs([nodule_uid, clean_uid], "done", timeout=240)

    def results(uid: str) -> dict[tuple[str, str], dict]:
        rows = node.json("results", "list", "--study", uid)
        return {(r["model"], r["finding"]): r for r in rows}

    nod = results(nodule_uid)
    cls = nod[("chest-ct-nodule-cls", "Lung nodule")]
    assert cls["kind"] == "classification" and cls["present"] is True
    assert 0.5 <= cls["probability"] <= 1.0
    assert cls["model_version"] and cls["series_instance_uid"]
    lung = nod[("chest-ct-lung-seg", "Lung")]
    assert lung["kind"] == "segmentation" and lung["probability"] is None
    assert lung["measurements"]["volume_ml"] == pytest.approx(
        nodule_truth["lung_volume_ml"], rel=0.10
    )
    nodule = nod[("chest-ct-lung-seg", "Lung nodule")]
    assert nodule["measurements"]["volume_ml"] == pytest.approx(
        nodule_truth["nodule_volume_ml"], rel=0.20
    )
    assert nodule["measurements"]["largest_diameter_mm"] == pytest.approx(18.0, rel=0.25)

    clean = results(clean_uid)
    assert clean[("chest-ct-nodule-cls", "Lung nodule")]["present"] is False
    assert clean[("chest-ct-lung-seg", "Lung")]["measurements"]["volume_ml"] == pytest.approx(
        clean_truth["lung_volume_ml"], rel=0.10
    )
    # the endoscopy model is not routed to CT
    assert not any(model == "endoscopy-lesion-cls" for model, _ in clean)

    # re-running the same study replaces, never duplicates, its results
    before = len(node.json("results", "list", "--study", nodule_uid))
    jobs = node.json("jobs", "list", "--study", nodule_uid)
    assert jobs[0]["summary"]["models"]["chest-ct-nodule-cls"]["results"] == 1
    assert before == len(nod)
    logs = node.logs()
    assert CANARY_NAME not in logs and CANARY_ID not in logs
