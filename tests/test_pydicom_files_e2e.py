"""Inference done-when 3: every pydicom test image goes through a real node.

Each pydicom test file of an image storage class (compressed, big endian, RGB,
YBR, palette, multi-frame among them) is sent to an embedded node in its own
transfer syntax. Catch-all copies of the demo models (any modality, one slice
is enough; the greyscale CNN for greyscale series, the colour CNN for colour
ones) make every job decode and run its pixels. Each study's job must end
``done`` (with results, or with each model's stated reason to skip) or
``failed`` with a readable one-line error; none hangs, and the worker still
processes a good study afterwards.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomnode.scp import TRANSFER_SYNTAXES
from tests.conftest import NodeFactory, port_open, send_datasets, send_files_raw, wait_for
from tests.factory import write_ct_series
from worker.pipeline.registry import DEMO_MODELS_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"),
]

STORAGE_CLASSES = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}


def pydicom_image_files() -> tuple[list[Path], dict[str, str]]:
    """Local pydicom test files of an image storage class, and why the others are left out.

    The files are sent as they are on disk (no re-encoding by the test's SCU)."""
    from pydicom.data.data_manager import DATA_ROOT

    paths = sorted(p for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file())
    try:
        import data_store  # the pydicom-data package

        paths += sorted(p for p in (Path(data_store.__file__).parent / "data").glob("*"))
    except ImportError:
        pass
    chosen: list[Path] = []
    left_out: dict[str, str] = {}
    seen_sops: set[str] = set()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True)
            sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
            sop_uid = str(ds.SOPInstanceUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception as exc:
            left_out[path.name] = f"not a readable Part 10 file ({type(exc).__name__})"
            continue
        if "Rows" not in ds:
            left_out[path.name] = "not an image"
        elif sop_class not in STORAGE_CLASSES:
            left_out[path.name] = "not a storage SOP class"
        elif ts not in TRANSFER_SYNTAXES:
            left_out[path.name] = f"transfer syntax {ts} is not accepted by the listener"
        elif sop_uid in seen_sops:
            left_out[path.name] = "same SOP Instance UID as another file (a duplicate)"
        else:
            seen_sops.add(sop_uid)
            chosen.append(path)
    return chosen, left_out


def catch_all_models(target: Path) -> Path:
    """Copies of two demo CNNs routed to any image series."""
    target.mkdir()
    for source, name in (
        ("chest-ct-nodule-cls", "any-grey-cls"),
        ("endoscopy-lesion-cls", "any-colour-cls"),
    ):
        manifest = json.loads((DEMO_MODELS_DIR / f"{source}.json").read_text())
        shutil.copy(DEMO_MODELS_DIR / manifest["file"], target / f"{name}.onnx")
        manifest.update(name=name, file=f"{name}.onnx")
        manifest["routing"] = {"modalities": [], "image_types": [], "min_slices": 1}
        manifest["preprocessing"]["crop"] = None
        (target / f"{name}.json").write_text(json.dumps(manifest))
    return target


def test_every_pydicom_image_is_processed_or_refused_readably(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    files, left_out = pydicom_image_files()
    assert len(files) >= 60, f"only {len(files)} pydicom image files found"
    node = node_factory(
        models_dir=catch_all_models(tmp_path / "models"),
        task_soft_time_limit=120,
        task_time_limit=150,
    )
    node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")

    statuses: dict[Path, int] = {}
    for start in range(0, len(files), 60):
        chunk = files[start : start + 60]
        statuses.update(zip(chunk, send_files_raw(node.port, chunk), strict=True))
    refused = {p.name: s for p, s in statuses.items() if s != 0}
    # a refusal is a failure status with its reason in the log (missing or
    # invalid study UID, unparseable dataset), never an aborted association
    assert all(s in (0xC210, 0xA900) for s in refused.values()), refused
    assert node.logs().count("C-STORE refused") >= len(refused)
    stored = [p for p, s in statuses.items() if s == 0]
    assert len(stored) >= 60, f"only {len(stored)} stored"
    study_uids = {str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in stored}

    def finished() -> list[dict[str, Any]] | None:
        latest: dict[str, dict[str, Any]] = {}
        for job in sorted(node.jobs(), key=lambda j: j["id"]):
            latest[job["study_instance_uid"]] = job
        if set(latest) >= study_uids and all(
            j["status"] in ("done", "failed") for j in latest.values()
        ):
            return list(latest.values())
        return None

    jobs = wait_for(finished, 600, 2, what="every job done or failed")
    processed = skipped = failed = 0
    for job in jobs:
        if job["status"] == "failed":
            failed += 1
            error = job["error"] or ""
            assert error and "\n" not in error and "Traceback" not in error, job
            continue
        models = (job.get("summary") or {}).get("models", {})
        assert models, job
        for outcome in models.values():
            assert outcome["results"] > 0 or outcome["skipped"], (job["id"], outcome)
        if any(o["results"] for o in models.values()):
            processed += 1
        else:
            skipped += 1
    print(
        f"\n{len(files)} files sent ({len(refused)} refused), {len(left_out)} left out; "
        f"{len(jobs)} studies: {processed} processed, {skipped} skipped, {failed} failed"
    )
    assert processed >= len(jobs) // 2, "most studies should be processed"

    # the worker survived all of it: a good study is still processed
    good = write_ct_series(tmp_path / "good", 24)
    good_uid = str(dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    assert set(send_datasets(node.port, good)) == {0}
    node.wait_jobs([good_uid], "done", timeout=120)
