"""Results done-when 2: a real Orthanc as the PACS.

The phantom study is uploaded to a private Orthanc (REST), Orthanc sends it to
pacs-ai by C-STORE (/modalities/{id}/store), and pacs-ai's SR and SEG appear in
the same study in Orthanc (checked over its REST API).
"""

from __future__ import annotations

import io
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import NodeFactory, free_port, have, port_open, wait_for
from tests.factory import CANARY_ID, CANARY_NAME
from worker.pipeline.registry import DEMO_MODELS_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"),
    pytest.mark.skipif(
        not have("Orthanc"), reason="Orthanc not installed (apt-get install orthanc)"
    ),
]


class Orthanc:
    def __init__(self, http_port: int, dicom_port: int) -> None:
        self.http_port = http_port
        self.dicom_port = dicom_port

    def call(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(req, timeout=120) as rsp:  # noqa: S310 - localhost
            data = rsp.read()
        return json.loads(data) if data else None


@pytest.fixture
def orthanc(tmp_path: Path, node_factory: NodeFactory) -> Iterator[tuple[Orthanc, Any]]:
    node = node_factory(ort_threads=2)
    http_port, dicom_port = free_port(), free_port()
    node.env["PACS_AI_DESTINATIONS"] = f"ORTHANC@127.0.0.1:{dicom_port}/sr+seg"
    folder = tmp_path / "orthanc"
    folder.mkdir()
    config = {
        "Name": "pacs-ai-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": {"pacsai": ["PACSAI", "127.0.0.1", node.port]},
        "Plugins": [],
        "HttpServerEnabled": True,
        "StableAge": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: port_open(http_port) and port_open(dicom_port), 30, what="Orthanc")
        yield Orthanc(http_port, dicom_port), node
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_orthanc_round_trip(orthanc: tuple[Orthanc, Any]) -> None:
    server, node = orthanc
    phantom = generate_chest_ct(
        5_000_021, matrix=128, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
    )
    datasets = phantom_to_datasets(
        phantom, shuffle=True, seed=5_000_021, patient_name=CANARY_NAME, patient_id=CANARY_ID
    )
    study_uid = str(datasets[0].StudyInstanceUID)
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        server.call("POST", "/instances", buf.getvalue())
    (found,) = server.call("POST", "/tools/lookup", study_uid.encode())
    study_id = found["ID"]

    node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")
    job = server.call(
        "POST",
        "/modalities/pacsai/store",
        json.dumps({"Resources": [study_id], "Synchronous": True}).encode(),
    )
    assert job is not None
    node.wait_jobs([study_uid], "done", timeout=120)

    def modalities() -> set[str] | None:
        series = server.call("GET", f"/studies/{study_id}/series")
        found = {s["MainDicomTags"].get("Modality") for s in series}
        return found if {"SR", "SEG"} <= found else None

    found_modalities = wait_for(modalities, 60, 0.5, what="SR and SEG in Orthanc")
    assert found_modalities == {"CT", "SR", "SEG"}
    series = server.call("GET", f"/studies/{study_id}/series")
    for s in series:
        if s["MainDicomTags"]["Modality"] in {"SR", "SEG"}:
            assert s["MainDicomTags"]["SeriesDescription"].startswith("AI")
    rows = node.json("deliveries", "list")
    assert {r["kind"] for r in rows} == {"sr", "seg"}
    assert {r["status"] for r in rows} == {"sent"}
