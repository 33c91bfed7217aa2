"""Results back into the PACS, end to end: a phantom study goes into an embedded
node, its SR, SEG and key image reach a destination, valid and exactly once.

- dcmtk storescp as the destination: dciodvfy finds no error, highdicom reads
  the finding, its probability and the volume back, each SEG frame references
  a source instance at its position (done-when 1).
- the same study sent to a second node gives the same SOP Instance UIDs
  (done-when 4); our SR/SEG sent back to the listener start no job (done-when 5).
- a destination down when results are ready gets each object exactly once
  after it comes up; a permanent failure status is not retried (done-when 3).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread

from tests.conftest import (
    Node,
    NodeFactory,
    canary_chest_ct,
    db_rows,
    dciodvfy_errors,
    free_port,
    have,
    needs_demo_models,
    send_datasets,
    wait_for,
)
from tests.dicom_peers import RecordingSCP, storescp
from tests.factory import CANARY_ID, CANARY_NAME

pytestmark = [
    pytest.mark.integration,
    needs_demo_models,
    pytest.mark.skipif(not have("storescp"), reason="dcmtk storescp not installed"),
]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _settled(node: Node, count: int) -> list[dict[str, Any]] | None:
    rows = node.deliveries()
    if len(rows) == count and all(r["status"] != "pending" for r in rows):
        return rows
    return None


def test_results_reach_storescp(node_factory: NodeFactory, tmp_path: Path) -> None:
    datasets = canary_chest_ct(5_000_011)
    study_uid = str(datasets[0].StudyInstanceUID)
    dest_port = free_port()
    dest = f"DEST@127.0.0.1:{dest_port}/sr+seg+ki"
    node = node_factory(ort_threads=2, destinations=dest)
    received = tmp_path / "received"
    with storescp(dest_port, received):
        node.start_run(30)
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([study_uid], "done", timeout=120)
        rows = wait_for(lambda: _settled(node, 3), 60, 0.5, what="deliveries settled")
        files = wait_for(
            lambda: sorted(received.iterdir()) if len(list(received.iterdir())) == 3 else None, 20
        )

    # deliveries list tells the story
    assert {r["status"] for r in rows} == {"sent"}
    assert {r["kind"] for r in rows} == {"sr", "seg", "ki"}
    assert {r["sop_class_uid"] for r in rows} == {SR_CLASS, SEG_CLASS, SC_CLASS}
    for r in rows:
        assert r["study_instance_uid"] == study_uid
        assert r["destination"] == f"DEST@127.0.0.1:{dest_port}"
        assert r["attempts"] == 1 and r["last_error"] is None

    objects = {str(dcmread(f).SOPClassUID): f for f in files}
    assert set(objects) == {SR_CLASS, SEG_CLASS, SC_CLASS}
    if have("dciodvfy"):
        for path in objects.values():
            assert dciodvfy_errors(path) == [], path.name
    sources = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for path in objects.values():
        ds = dcmread(path)
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == CANARY_ID and str(ds.PatientName) == CANARY_NAME
        assert ds.Manufacturer == "pacs-ai"
        assert str(ds.SeriesDescription).startswith("AI")

    # highdicom reads the finding, probability, volume and diameter back from the
    # SR; every finding is drawn on a source image (a region, or the points its
    # measurement was inferred from)
    results = {
        (r["model"], r["finding"]): r for r in node.json("results", "list", "--study", study_uid)
    }
    report = hd.sr.srread(objects[SR_CLASS]).content
    planar = report.get_planar_roi_measurement_groups()
    for g in planar:
        assert g.roi is not None
        image = g.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert str(image.ReferencedSOPInstanceUID) in sources
    shown = report.get_image_measurement_groups()  # TID 1501: what a viewer draws
    for g in shown:
        (m,) = g.get_measurements()
        assert m.referenced_coordinates
        image = m.referenced_coordinates[0].ContentSequence[0].ReferencedSOPSequence[0]
        assert str(image.ReferencedSOPInstanceUID) in sources
    cls = results[("chest-ct-nodule-cls", "Lung nodule")]
    (group,) = [g for g in shown if "chest-ct-nodule-cls" in str(g.tracking_identifier)]
    assert group.finding_type.meaning == "Lung nodule"
    (certainty,) = group.get_measurements()
    assert certainty.value == pytest.approx(100 * cls["probability"], abs=0.01)
    assert certainty.unit.value == "%"
    (presence,) = [
        q for q in group.get_qualitative_evaluations() if q.name.meaning == "Lung nodule"
    ]
    assert presence.value.meaning == ("Present" if cls["present"] else "Absent")
    (lung,) = report.get_volumetric_roi_measurement_groups()  # with the SEG segment
    assert lung.finding_type.meaning == "Lung" and lung.referenced_segment is not None
    (volume,) = lung.get_measurements()
    lung_row = results[("chest-ct-lung-seg", "Lung")]
    assert volume.value == pytest.approx(lung_row["measurements"]["volume_ml"], abs=0.001)
    assert volume.unit.value == "cm3"
    nodule_row = results[("chest-ct-lung-seg", "Lung nodule")]
    components = nodule_row["measurements"]["components"]
    assert components  # the phantom's 16 mm nodule is found

    def nodules(groups: list[Any]) -> list[Any]:
        return [
            g
            for g in groups
            if g.finding_type.meaning == "Lung nodule"
            and "chest-ct-lung-seg" in str(g.tracking_identifier)
        ]

    # per nodule: its outline and volume (TID 1410), its diameter (TID 1501)
    outlined, measured = nodules(planar), nodules(shown)
    assert len(outlined) == len(measured) == len(components)
    for g, d, component in zip(outlined, measured, components, strict=True):
        assert str(g.tracking_identifier) == str(d.tracking_identifier)
        (volume,) = g.get_measurements()
        assert volume.name.meaning == "Volume"
        assert volume.value == pytest.approx(component["volume_ml"], abs=0.001)
        assert volume.unit.value == "cm3"
        (diameter,) = d.get_measurements()
        assert diameter.name.meaning == "Diameter"
        assert diameter.value == pytest.approx(component["max_diameter_mm"], abs=0.01)
        assert diameter.unit.value == "mm"

    # the key image: one frame, the source's modality (no cine), the text in its band
    ki = dcmread(objects[SC_CLASS])
    assert int(ki.get("NumberOfFrames", 1)) == 1 and ki.Modality == "CT"
    assert "diameter" in str(ki.ImageComments) and "NOT FOR DIAGNOSTIC USE" in ki.ImageComments

    # each SEG frame references a source instance at its position
    seg = dcmread(objects[SEG_CLASS])
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) > 0
    for fg in seg.PerFrameFunctionalGroupsSequence:
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        assert ipp == pytest.approx([float(v) for v in sources[uid].ImagePositionPatient])

    # our SR and SEG sent back to the listener are stored but start no job
    jobs_before = len(node.jobs())
    back = [dcmread(objects[SR_CLASS]), dcmread(objects[SEG_CLASS])]
    assert send_datasets(node.port, back) == [0, 0]
    time.sleep(3)  # several assembler rounds (PACS_AI_STABLE_SECONDS=1)
    assert len(node.jobs()) == jobs_before
    ours = db_rows(node, "SELECT sop_instance_uid FROM instances WHERE produced_by_us")
    assert {u for (u,) in ours} == {str(d.SOPInstanceUID) for d in back}
    study = [s for s in node.studies() if s["study_instance_uid"] == study_uid][0]
    assert study["status"] == "done"

    # the same study into a second node: the same SOP Instance UIDs, nothing new
    node2 = node_factory(ort_threads=2, destinations=dest)
    with storescp(dest_port, received):
        node2.start_run(30)
        assert set(send_datasets(node2.port, datasets)) == {0}
        node2.wait_jobs([study_uid], "done", timeout=120)
        rows2 = wait_for(lambda: _settled(node2, 3), 60, 0.5, what="deliveries settled")
    assert {r["sop_instance_uid"] for r in rows2} == {r["sop_instance_uid"] for r in rows}
    assert sorted(received.iterdir()) == files  # storescp names files by SOP Instance UID

    logs = node.logs() + node2.logs()
    assert CANARY_NAME not in logs and CANARY_ID not in logs


def test_destination_down_then_up_and_permanent_failure(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    datasets = canary_chest_ct(5_000_013)
    study_uid = str(datasets[0].StudyInstanceUID)
    late = RecordingSCP(free_port(), "LATE")
    bad = RecordingSCP(free_port(), "BAD", status=0xA900)
    bad.start()
    node = node_factory(
        ort_threads=2,
        destinations=f"LATE@127.0.0.1:{late.port}/sr+seg,BAD@127.0.0.1:{bad.port}/sr",
        delivery_retry_base=0.5,
        delivery_retry_max=2,
        dispatch_timeout=5,
    )
    try:
        node.start_run(30)
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([study_uid], "done", timeout=120)

        def retrying() -> list[dict[str, Any]] | None:
            rows = node.deliveries(to="LATE@")
            if len(rows) == 2 and all(
                r["status"] == "pending" and r["attempts"] >= 2 for r in rows
            ):
                return rows
            return None

        rows = wait_for(retrying, 60, 0.5, what="deliveries retrying")
        assert all(r["last_error"] for r in rows)
        assert late.uids() == []
        late.start()  # the destination comes up
        settled = wait_for(lambda: _settled(node, 3), 60, 0.5, what="deliveries settled")
        time.sleep(2)  # nothing more arrives
        by_dest = {(r["destination"].split("@")[0], r["kind"]): r for r in settled}
        assert by_dest[("LATE", "sr")]["status"] == "sent"
        assert by_dest[("LATE", "seg")]["status"] == "sent"
        # each object exactly once
        assert sorted(late.uids()) == sorted(
            r["sop_instance_uid"] for r in settled if r["destination"].startswith("LATE@")
        )
        # a permanent failure is not retried
        failed = by_dest[("BAD", "sr")]
        assert failed["status"] == "failed" and failed["attempts"] == 1
        assert "0xA900" in failed["last_error"]
        assert bad.uids() == [failed["sop_instance_uid"]]

        # resend: every object of the study goes out again, once more
        out = node.cli("resend", "--study", study_uid)
        assert "3 deliveries pending again" in out.stdout
        again = wait_for(
            lambda: _settled(node, 3) if len(late.uids()) == 4 and len(bad.uids()) == 2 else None,
            60,
            0.5,
            what="resent",
        )
        assert {r["status"] for r in again if r["destination"].startswith("LATE@")} == {"sent"}
        assert sorted(late.uids()) == sorted(
            2 * [r["sop_instance_uid"] for r in settled if r["destination"].startswith("LATE@")]
        )
    finally:
        late.stop()
        bad.stop()
    logs = node.logs()
    assert CANARY_NAME not in logs and CANARY_ID not in logs
