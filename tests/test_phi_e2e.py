"""Issue 10, done-when 2 and 3, with real processes (``pacs-ai run``: listener,
worker, API; SQLite and the filesystem broker):

- a study with odd headers (PatientSex ``U``, empty PatientAge, a name without
  ``^``, malformed dates, an overlong accession number) is done, and its SR, SEG
  and key image reach the destination valid (dciodvfy, 0 errors);
- a canary in every patient-identifying attribute of that study and of one whose
  job fails appears in no log line, job error, API answer, metric or broker
  message.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import (
    NodeFactory,
    dciodvfy_errors,
    free_port,
    have,
    needs_demo_models,
    port_open,
    send_datasets,
    wait_for,
)
from tests.dicom_peers import storescp

pytestmark = [
    pytest.mark.integration,
    needs_demo_models,
    pytest.mark.skipif(not have("storescp"), reason="dcmtk storescp not installed"),
]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

#: every identifying value holds one of these (compared ignoring case)
CANARIES = ("zqcanary", "19030405", "1903-04-05", "ZQID-4711")


def _raw(ds: Dataset, keyword: str, value: str) -> None:
    """A value as the file holds it, unchecked (pydicom refuses invalid ones)."""
    data = value.encode("ascii")
    if len(data) % 2:
        data += b" "
    tag = tag_for_keyword(keyword)
    assert tag is not None
    ds[tag] = RawDataElement(Tag(tag), dictionary_VR(keyword), len(data), data, 0, False, True)


def _canaries(ds: Dataset, patient_name: str) -> None:
    ds.PatientName = patient_name
    ds.PatientID = "ZQID-4711"
    ds.OtherPatientNames = ["Zqcanaryborn^Zqcanarymaiden"]
    ds.OtherPatientIDs = "ZQCANARY-OTHER-1"
    item = Dataset()
    item.PatientID = "ZQCANARY-SEQ-2"
    item.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [item]
    ds.PatientAddress = "Zqcanary Street 5, Zqcanarytown"
    ds.PatientTelephoneNumbers = "zqcanary 555"
    ds.AccessionNumber = "ZQCANARYACC"
    ds.InstitutionName = "Zqcanary General Hospital"
    ds.InstitutionAddress = "Zqcanary Road 1"
    ds.ReferringPhysicianName = "Zqcanarydoc^Referring"
    ds.PerformingPhysicianName = "Zqcanaryperf^Doc"
    ds.StudyDescription = "CT chest zqcanary"
    # the deviations of done-when 2
    _raw(ds, "PatientSex", "U")
    _raw(ds, "PatientAge", "")
    _raw(ds, "PatientBirthDate", "1903-04-05")
    _raw(ds, "StudyDate", "2024-02-30")
    _raw(ds, "AccessionNumber", "ZQCANARYACC-0123456789")


def _study(seed: int, patient_name: str) -> list[Any]:
    phantom = generate_chest_ct(
        seed, matrix=96, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=14.0
    )
    datasets = phantom_to_datasets(phantom, seed=seed)
    for ds in datasets:
        _canaries(ds, patient_name)
    return datasets


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [c for c in CANARIES if c.lower() in low]


def test_odd_headers_done_and_no_canary_anywhere(node_factory: NodeFactory, tmp_path: Path) -> None:
    good = _study(6_100_001, "ZQCANARYNOCARET")  # a name without ^
    bad = _study(6_100_003, "Zqcanaryfamily^Zqcanarygiven")
    good_uid, bad_uid = str(good[0].StudyInstanceUID), str(bad[0].StudyInstanceUID)
    dest_port = free_port()
    node = node_factory(
        ort_threads=2,
        stable_seconds=3,
        destinations=f"DEST@127.0.0.1:{dest_port}/sr+seg+ki",
    )
    api = node.api_url
    received = tmp_path / "received"
    with storescp(dest_port, received):
        node.start_run()
        # the failing study: its files vanish from storage before its job runs
        assert set(send_datasets(node.port, bad)) == {0}
        shutil.rmtree(node.study_dir(bad_uid))
        assert set(send_datasets(node.port, good)) == {0}
        node.wait_jobs([bad_uid], "failed", timeout=120)
        jobs = node.wait_jobs([good_uid], "done", timeout=180)
        assert jobs[-1]["error"] is None
        files = wait_for(
            lambda: sorted(received.iterdir()) if len(list(received.iterdir())) == 3 else None,
            90,
            0.5,
            what="SR, SEG and key image at the destination",
        )
        wait_for(lambda: port_open(int(node.env["PACS_AI_API_PORT"])), 30, what="API")
        answers = [
            httpx.get(api + path, timeout=30).text
            for path in (
                "/",
                "/api/studies",
                f"/api/studies/{good_uid}",
                f"/api/studies/{bad_uid}",
                "/api/jobs",
                "/api/results",
                "/api/deliveries",
                "/api/models",
                "/metrics",
            )
        ]
        time.sleep(1)  # the last log lines
    node.stop_all()

    # done-when 2: valid objects, patient values copied (corrected where needed)
    objects = {str(dcmread(f).SOPClassUID): dcmread(f) for f in files}
    assert set(objects) == {SR_CLASS, SEG_CLASS, SC_CLASS}
    if have("dciodvfy"):
        for path in files:
            assert dciodvfy_errors(path) == [], path.name
    for ds in objects.values():
        assert str(ds.PatientName) == "ZQCANARYNOCARET"
        assert ds.PatientID == "ZQID-4711" and ds.PatientSex == ""
        assert ds.PatientBirthDate == "19030405"  # 1903-04-05, corrected
        assert ds.StudyDate == ""  # 30 February: left empty
        assert ds.AccessionNumber == "ZQCANARYACC-0123"  # SH: 16 characters

    # done-when 3: no canary in any log line, job error, API answer, metric, message
    failed = [j for j in node.jobs() if j["study_instance_uid"] == bad_uid]
    assert failed and failed[-1]["status"] == "failed" and failed[-1]["error"]
    assert _leaks(str(node.jobs())) == []
    assert _leaks(str(node.deliveries())) == []
    for answer in answers:
        assert answer and _leaks(answer) == [], answer[:200]
    logs = node.logs()
    assert "job " in logs and "header of sop=" in logs  # the logs mean something
    assert "PatientSex left empty" in logs
    assert "UserWarning from highdicom" in logs  # the name without ^, reworded
    assert _leaks(logs) == [], [line for line in logs.splitlines() if _leaks(line)][:5]
    broker = Path(node.env["PACS_AI_DATA_DIR"]) / "broker"
    messages = [p for p in broker.rglob("*") if p.is_file()]
    for message in messages:
        assert _leaks(message.read_bytes().decode("utf-8", "replace")) == [], message
