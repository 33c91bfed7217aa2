"""Results done-when 2: a real Orthanc as the PACS.

The phantom study is uploaded to a private Orthanc (REST), Orthanc sends it to
pacs-ai by C-STORE (/modalities/{id}/store), and pacs-ai's SR and SEG appear in
the same study in Orthanc (checked over its REST API).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    Node,
    NodeFactory,
    Orthanc,
    canary_chest_ct,
    have,
    needs_demo_models,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    needs_demo_models,
    pytest.mark.skipif(
        not have("Orthanc"), reason="Orthanc not installed (apt-get install orthanc)"
    ),
]


@pytest.fixture
def orthanc(node_factory: NodeFactory, orthanc_server: Orthanc) -> tuple[Orthanc, Node]:
    node = node_factory(
        ort_threads=2, destinations=f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}/sr+seg"
    )
    orthanc_server.start(node.port, StableAge=1)
    return orthanc_server, node


def test_orthanc_round_trip(orthanc: tuple[Orthanc, Node]) -> None:
    server, node = orthanc
    datasets = canary_chest_ct(5_000_021)
    study_uid = str(datasets[0].StudyInstanceUID)
    server.upload(datasets)
    (found,) = server.call("POST", "/tools/lookup", study_uid.encode())
    study_id = found["ID"]

    node.start_run(30)
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
    rows = node.deliveries()
    assert {r["kind"] for r in rows} == {"sr", "seg"}
    assert {r["status"] for r in rows} == {"sent"}
