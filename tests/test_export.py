"""De-identified export (issue 13, done-when 4).

A canary in every PHI attribute of the source images (names, IDs, dates,
accession, institution, descriptions, comments, a nested request sequence,
private tags) appears in no exported byte, SR, SEG, saliency map and key image
included; the references between the exported objects (SEG -> images, SR -> SEG,
images and map, map and key image -> image, frame of reference) point at the new
UIDs; everything reads back with pydicom and highdicom. The options: Retain
Longitudinal Temporal Information keeps the dates (never the birth date), Clean
Descriptors keeps the descriptions cleaned of identifying values. End to end:
``pacs-ai export --study UID --deidentify DIR`` on a study a node processed.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.deid import Deidentifier, Options
from dicomnode.maps import MapCaption, build_saliency_sc
from dicomnode.results import (
    CodeSpec,
    Finding,
    ModelSpec,
    SegInput,
    SegmentSpec,
    build_key_image,
    build_seg,
    build_sr,
)
from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import NodeFactory, free_port, have, port_open, send_datasets, wait_for
from tests.dicom_peers import storescp
from worker.pipeline.registry import DEMO_MODELS_DIR
from worker.pipeline.volume import Volume, load_series

LUNG = CodeSpec("39607008", "SCT", "Lung")
NODULE = CodeSpec("786838002", "SCT", "Lung nodule")
ABNORMAL = CodeSpec("49755003", "SCT", "Morphologically abnormal structure")
ANATOMY = CodeSpec("91723000", "SCT", "Anatomical structure")
SEG_MODEL = ModelSpec("chest-ct-lung-seg", "1.0.0", "ab" * 32)
CLS_MODEL = ModelSpec("chest-ct-nodule-cls", "1.0.0", "cd" * 32)
SEGMENTS = [SegmentSpec(1, LUNG, ANATOMY), SegmentSpec(2, NODULE, ABNORMAL, LUNG, focal=True)]

CANARY = "QXCANARY"  # in every identifying text value
BIRTH = "19010203"
DAY = "19020304"  # study, series, acquisition and content dates
TIME = "135724"
#: every byte string that must not survive (dates in both DICOM and ISO forms)
NEEDLES = [CANARY.encode(), BIRTH.encode(), DAY.encode(), b"1902-03-04", b"1901-02-03"]


def _canaries(ds: Dataset) -> None:
    """Identifying values, each holding a canary, in every PHI attribute."""
    ds.PatientName = f"{CANARY}^Zyxwvut"
    ds.PatientID = f"{CANARY}-ID-98765"
    ds.IssuerOfPatientID = f"{CANARY} ISSUER"
    ds.OtherPatientIDs = f"{CANARY}-OTHER"
    ds.PatientBirthDate = BIRTH
    ds.PatientAddress = f"1 {CANARY} Street"
    ds.PatientTelephoneNumbers = f"{CANARY} 555"
    ds.PatientComments = f"comment {CANARY}"
    ds.AdditionalPatientHistory = f"history {CANARY}"
    ds.AccessionNumber = f"{CANARY}ACC"
    ds.StudyID = f"{CANARY}S"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = DAY
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = TIME
    ds.InstanceCreationDate = DAY
    ds.ReferringPhysicianName = f"{CANARY}DOC^Ref"
    ds.PerformingPhysicianName = f"{CANARY}PERF^Doc"
    ds.OperatorsName = f"{CANARY}OP^Tech"
    ds.NameOfPhysiciansReadingStudy = f"{CANARY}READ^Doc"
    ds.InstitutionName = f"{CANARY} Hospital"
    ds.InstitutionAddress = f"2 {CANARY} Road"
    ds.InstitutionalDepartmentName = f"{CANARY} Radiology"
    ds.StationName = f"{CANARY}ST"
    ds.DeviceSerialNumber = f"{CANARY}SN"
    ds.StudyDescription = f"{CANARY} chest study"
    ds.SeriesDescription = f"{CANARY} axial series"
    ds.ProtocolName = f"{CANARY} protocol"
    ds.ImageComments = f"image of {CANARY}"
    ds.RequestedProcedureDescription = f"{CANARY} request"
    request = Dataset()
    request.AccessionNumber = f"{CANARY}ACC"
    request.RequestedProcedureID = f"{CANARY}RP"
    request.ScheduledProcedureStepID = f"{CANARY}SPS"
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0029, f"{CANARY} VENDOR", create=True)
    block.add_new(0x10, "LO", f"private {CANARY}")
    block.add_new(0x11, "DA", DAY)


def _write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def study(tmp_path: Path) -> Iterator[tuple[list[Path], list[Path], Volume]]:
    """The canary phantom's image files, and pacs-ai's objects built from them
    (SEG, SR, saliency map, key image) as files."""
    seed = 5_200_001
    phantom = generate_chest_ct(
        seed, matrix=96, slices=10, thickness_mm=3.0, nodule=True, nodule_diameter_mm=15.0
    )
    datasets = phantom_to_datasets(phantom, seed=seed)
    for ds in datasets:
        _canaries(ds)
    images = _write(datasets, tmp_path / "images")
    volume = load_series(images)
    headers = {str(ds.SOPInstanceUID): ds for ds in datasets}
    source = [headers[u] for u in volume.sop_instance_uids]
    n = phantom.hu.shape[0]
    number = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in datasets}
    labels = np.stack([phantom.labels[n - number[u]] for u in volume.sop_instance_uids])
    seg = build_seg(SegInput(SEG_MODEL, labels.astype(np.uint8), source, SEGMENTS), "2.25")
    k = int(np.argmax((labels == 2).sum(axis=(1, 2))))
    key = str(source[k].SOPInstanceUID)
    heat = np.zeros(volume.pixels.shape[1:], np.float32)
    heat[30:50, 20:40] = 1.0
    caption = MapCaption("Lung nodule", True, 0.9, CLS_MODEL, "occlusion sensitivity")
    saliency_map = build_saliency_sc(source[k], volume.pixels[k], heat, caption, "c:1", "2.25")
    findings = [
        Finding(CLS_MODEL, "classification", NODULE, True, 0.9, key_sop_instance_uid=key),
        Finding(SEG_MODEL, "segmentation", LUNG, True, volume_ml=2000.0, label_value=1),
    ]
    from dicomnode.maps import reference_maps

    sr = reference_maps(build_sr(findings, source, {SEG_MODEL.name: seg}, "2.25"), [saliency_map])
    ki = build_key_image(
        source[k], volume.pixels[k], labels[k] == 2, ["Lung nodule"], [SEG_MODEL], "2.25"
    )
    ours = _write([seg, sr, saliency_map, ki], tmp_path / "ours")
    yield images, ours, volume


def _deidentify(files: list[Path], out: Path, options: Options) -> list[Path]:
    deid = Deidentifier(options)
    deid.learn(dcmread(p, stop_before_pixels=True) for p in files)
    out.mkdir()
    written = []
    for i, path in enumerate(files):
        target = out / f"{i:04d}.dcm"
        deid.apply(dcmread(path)).save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _leaks(paths: list[Path], needles: list[bytes]) -> list[str]:
    found = []
    for path in paths:
        data = path.read_bytes().lower()
        found += [f"{path.name}: {n!r}" for n in needles if n.lower() in data]
    return found


def _references(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID in ``ds``, at any depth."""
    out: set[str] = set()

    def visit(d: Dataset, elem: Any) -> None:
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(str(elem.value))

    ds.walk(visit)
    return out


def _check_export(files: list[Path]) -> dict[str, list[Dataset]]:
    """The references between the exported objects, checked; the objects by kind."""
    by_kind: dict[str, list[Dataset]] = {"image": [], "seg": [], "sr": [], "sc": []}
    for path in files:
        ds = dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        modality = str(ds.Modality)
        kind = {"SEG": "seg", "SR": "sr"}.get(modality) or (
            "sc" if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" else "image"
        )
        by_kind[kind].append(ds)
    images = {str(ds.SOPInstanceUID): ds for ds in by_kind["image"]}
    (seg,) = by_kind["seg"]
    (sr,) = by_kind["sr"]
    studies = {str(ds.StudyInstanceUID) for kind in by_kind.values() for ds in kind}
    assert len(studies) == 1  # one study, every object in it
    patients = {str(ds.PatientID) for kind in by_kind.values() for ds in kind}
    assert len(patients) == 1 and next(iter(patients)).startswith("DEID-")
    assert {str(ds.PatientName) for kind in by_kind.values() for ds in kind} == {
        next(iter(patients)).replace("-", "^", 1)
    }
    frames = {str(ds.FrameOfReferenceUID) for ds in by_kind["image"]}
    assert len(frames) == 1 and str(seg.FrameOfReferenceUID) in frames
    # SEG -> images (series, instances, each frame's source)
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(
        next(iter(images.values())).SeriesInstanceUID
    )
    assert _references(seg) and _references(seg) <= set(images)
    # maps and key image -> their image
    for sc in by_kind["sc"]:
        assert _references(sc) and _references(sc) <= set(images)
    # SR -> SEG, images and the map; its evidence lists them all
    targets = (
        set(images) | {str(seg.SOPInstanceUID)} | {str(s.SOPInstanceUID) for s in by_kind["sc"]}
    )
    referenced = _references(sr)
    assert str(seg.SOPInstanceUID) in referenced
    assert referenced & set(images)
    assert referenced <= targets, "every SR reference resolves to an exported object"
    saliency = [s for s in by_kind["sc"] if "saliency" in str(s.get("SeriesDescription", ""))]
    for s in saliency:
        assert str(s.SOPInstanceUID) in referenced
    return by_kind


def test_no_canary_survives_and_references_hold(
    study: tuple[list[Path], list[Path], Volume], tmp_path: Path
) -> None:
    images, ours, _ = study
    # the canaries are there before
    assert _leaks(images, [CANARY.encode(), BIRTH.encode(), DAY.encode()])
    assert all(_leaks([p], [CANARY.encode()]) for p in ours)  # copied into our objects
    old_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images + ours}
    out = _deidentify(images + ours, tmp_path / "out", Options())
    assert _leaks(out, NEEDLES) == []
    assert _leaks(out, [TIME.encode()]) == []
    assert _leaks(out, [u.encode() for u in old_uids]) == []  # no original UID either
    by_kind = _check_export(out)
    for ds in by_kind["image"]:
        assert "RequestAttributesSequence" not in ds or all(
            "AccessionNumber" not in i or not i.AccessionNumber
            for i in ds.RequestAttributesSequence
        )
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.pixel_array.shape == (96, 96)
    # highdicom reads them back
    seg_path = next(p for p in out if dcmread(p, stop_before_pixels=True).Modality == "SEG")
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_segments == 2
    sr_path = next(p for p in out if dcmread(p, stop_before_pixels=True).Modality == "SR")
    report = hd.sr.srread(sr_path)
    content = report.content
    groups = [
        *content.get_planar_roi_measurement_groups(),
        *content.get_volumetric_roi_measurement_groups(),
        *content.get_image_measurement_groups(),
    ]
    assert "Lung nodule" in {g.finding_type.meaning for g in groups if g.finding_type}
    for p in out:
        if dcmread(p, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.7":
            assert hd.imread(p).get_frame(1).shape[-1] == 3
    # pacs-ai's objects stay valid de-identified (the phantom images lack a Type 2
    # attribute of their own, Acquisition Number)
    if have("dciodvfy"):
        for p in out[len(images) :]:
            assert _dciodvfy(p) == [], p.name


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's errors; its warnings are printed (``pytest -s`` shows them)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


def test_the_same_export_twice_gives_other_uids(
    study: tuple[list[Path], list[Path], Volume], tmp_path: Path
) -> None:
    images, ours, _ = study
    first = _deidentify(images[:2], tmp_path / "a", Options())
    second = _deidentify(images[:2], tmp_path / "b", Options())
    uid = [str(dcmread(p).SOPInstanceUID) for p in first + second]
    assert len(set(uid)) == 4  # the key is random per export: exports cannot be linked


def test_retain_dates_and_clean_descriptors(
    study: tuple[list[Path], list[Path], Volume], tmp_path: Path
) -> None:
    images, ours, _ = study
    options = Options(retain_dates=True, clean_descriptors=True)
    out = _deidentify(images + ours, tmp_path / "out", options)
    # dates kept, the birth date never; names, IDs and the canary still gone
    assert _leaks(out, [CANARY.encode(), BIRTH.encode(), b"1901-02-03"]) == []
    image = dcmread(out[0])
    assert image.StudyDate == DAY and image.SeriesDate == DAY
    assert image.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert "PatientBirthDate" not in image or not image.PatientBirthDate
    # descriptions kept, cleaned of the identifying values (the canary is in the name)
    assert image.StudyDescription == "*** chest study"
    assert image.SeriesDescription == "*** axial series"
    codes = [i.CodeValue for i in image.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113106"]
    _check_export(out)


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built")
@pytest.mark.skipif(not have("storescp"), reason="dcmtk storescp not installed")
def test_cli_export_of_a_processed_study(node_factory: NodeFactory, tmp_path: Path) -> None:
    seed = 5_200_010
    phantom = generate_chest_ct(
        seed, matrix=128, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
    )
    datasets = phantom_to_datasets(phantom, shuffle=True, seed=seed)
    for ds in datasets:
        _canaries(ds)
    study_uid = str(datasets[0].StudyInstanceUID)
    dest_port = free_port()
    node = node_factory(ort_threads=2, destinations=f"DEST@127.0.0.1:{dest_port}/sr+seg+ki+map")

    def settled() -> list[dict[str, Any]] | None:
        rows = list(node.json("deliveries", "list"))
        if {r["kind"] for r in rows} >= {"sr", "seg", "ki", "map"} and all(
            r["status"] != "pending" for r in rows
        ):
            return rows
        return None

    with storescp(dest_port, tmp_path / "received"):
        node.start("run")
        wait_for(lambda: port_open(node.port), 30, what="listener")
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([study_uid], "done", timeout=180)
        wait_for(settled, 60, 0.5, what="deliveries settled")
    out = tmp_path / "export"
    manifest = json.loads(
        node.cli("export", "--study", study_uid, "--deidentify", str(out), "--json").stdout
    )
    files = sorted(out.rglob("*.dcm"))
    assert manifest["counts"] == {"image": 24, "ki": 1, "map": 1, "seg": 1, "sr": 1}
    assert len(files) == 28 and (out / "manifest.json").is_file()
    assert _leaks([*files, out / "manifest.json"], NEEDLES) == []
    assert _leaks([*files, out / "manifest.json"], [study_uid.encode()]) == []
    text = (out / "manifest.json").read_text()
    for ds in datasets[:3]:
        assert str(ds.SOPInstanceUID) not in text
    assert not re.search(r"\b19020304\b", text)
    _check_export(files)
    assert {f["path"].split("/")[0] for f in manifest["files"]} == {
        "images",
        "sr",
        "seg",
        "maps",
        "key-images",
    }
    # a second export into the same folder is refused
    again = node.cli("export", "--study", study_uid, "--deidentify", str(out), check=False)
    assert again.returncode != 0 and "not an empty folder" in again.stderr
