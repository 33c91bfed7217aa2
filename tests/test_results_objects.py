"""Result objects without a network: the SR content tree (TID 1500), the SEG
geometry, deterministic UIDs, destinations, statuses and delivery rows."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.destinations import parse_destination, parse_destinations
from dicomnode.results import (
    CodeSpec,
    Finding,
    ModelSpec,
    SegInput,
    SegmentSpec,
    best_slice,
    build_key_image,
    build_seg,
    build_sr,
    summary_text,
)
from dicomnode.scu import classify_status
from dicomnode.uids import DEFAULT_UID_ROOT, InvalidUID, derived_uid, validate_uid
from tests.conftest import have
from worker.phantoms import generate_chest_ct, phantom_to_datasets
from worker.volume import load_series

LUNG = CodeSpec("39607008", "SCT", "Lung")
NODULE = CodeSpec("786838002", "SCT", "Lung nodule")
ANATOMY = CodeSpec("91723000", "SCT", "Anatomical structure")
ABNORMAL = CodeSpec("49755003", "SCT", "Morphologically abnormal structure")
SEG_MODEL = ModelSpec("chest-ct-lung-seg", "1.0.0", "ab" * 32)
CLS_MODEL = ModelSpec("chest-ct-nodule-cls", "2.1.0", "cd" * 32)
SEGMENTS = [
    SegmentSpec(1, LUNG, ANATOMY),
    SegmentSpec(2, NODULE, ABNORMAL, LUNG, focal=True),
]


def _series(
    folder: Path, order: str = "as-is", seed: int = 5_000_001, slices: int = 12
) -> tuple[list[Path], dict[str, np.ndarray], list[Dataset]]:
    """A small nodule phantom written in the given file order; returns the paths,
    each instance's true label mask by SOP Instance UID, and the datasets."""
    phantom = generate_chest_ct(
        seed, matrix=96, slices=slices, nodule=True, nodule_diameter_mm=15.0
    )
    datasets = phantom_to_datasets(phantom, seed=seed)
    n = phantom.hu.shape[0]
    # instance 1 is the top slice (k = n - 1)
    truth = {str(ds.SOPInstanceUID): phantom.labels[n - int(ds.InstanceNumber)] for ds in datasets}
    if order == "reversed":
        datasets = datasets[::-1]
    elif order == "shuffled":
        random.Random(3).shuffle(datasets)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, truth, datasets


def _seg_input(paths: list[Path], truth: dict[str, np.ndarray]) -> tuple[SegInput, object]:
    volume = load_series(paths)
    headers = {str(dcmread(p).SOPInstanceUID): dcmread(p, stop_before_pixels=True) for p in paths}
    labels = np.stack([truth[uid] for uid in volume.sop_instance_uids]).astype(np.uint8)
    source = [headers[uid] for uid in volume.sop_instance_uids]
    return SegInput(SEG_MODEL, labels, source, SEGMENTS), volume


def _findings(key_uid: str) -> list[Finding]:
    return [
        Finding(
            CLS_MODEL,
            "classification",
            NODULE,
            present=True,
            probability=0.873,
            finding_site=LUNG,
            category=ABNORMAL,
            key_sop_instance_uid=key_uid,
        ),
        Finding(CLS_MODEL, "classification", LUNG, present=False, probability=0.12),
        Finding(SEG_MODEL, "segmentation", LUNG, present=True, volume_ml=2512.5, label_value=1),
        Finding(
            SEG_MODEL,
            "segmentation",
            NODULE,
            present=True,
            volume_ml=1.812,
            longest_diameter_mm=15.4,
            focal=True,
            label_value=2,
            finding_site=LUNG,
            category=ABNORMAL,
        ),
    ]


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's errors; its warnings are printed (``pytest -s`` shows them)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


# -- UIDs ---------------------------------------------------------------------------


def test_derived_uid_is_deterministic_and_valid() -> None:
    a = derived_uid(DEFAULT_UID_ROOT, "sr", "sources", "model:1")
    assert a == derived_uid("2.25", "sr", "sources", "model:1")
    assert a.startswith("2.25.") and validate_uid(a, "uid") == a
    assert a != derived_uid("2.25", "sr", "sources", "model:2")
    assert a != derived_uid("2.25", "seg", "sources", "model:1")
    org = derived_uid("1.2.826.0.1.3680043.10.999", "sr", "x")
    assert org.startswith("1.2.826.0.1.3680043.10.999.") and len(org) <= 64
    validate_uid(org, "uid")
    for bad in ("1.2.x", "1..2", "01.2", "1." + "2" * 60):
        with pytest.raises(InvalidUID):
            derived_uid(bad, "sr")


def test_uids_follow_sources_and_model_versions(tmp_path: Path) -> None:
    paths, truth, _ = _series(tmp_path / "s")
    seg_in, volume = _seg_input(paths, truth)
    seg1 = build_seg(seg_in, "2.25")
    seg2 = build_seg(seg_in, "2.25")
    assert seg1.SOPInstanceUID == seg2.SOPInstanceUID
    assert seg1.SeriesInstanceUID == seg2.SeriesInstanceUID
    key = str(seg_in.source[3].SOPInstanceUID)
    sr1 = build_sr(_findings(key), seg_in.source, {SEG_MODEL.name: seg1}, "2.25")
    sr2 = build_sr(_findings(key), list(reversed(seg_in.source)), {SEG_MODEL.name: seg2}, "2.25")
    assert sr1.SOPInstanceUID == sr2.SOPInstanceUID  # order of the sources does not matter
    # a study that changed (one more instance) gets new UIDs
    extra = Dataset()
    extra.update(seg_in.source[0])
    extra.SOPInstanceUID = derived_uid("2.25", "another instance")
    sr3 = build_sr(_findings(key), [*seg_in.source, extra], {SEG_MODEL.name: seg1}, "2.25")
    assert sr3.SOPInstanceUID != sr1.SOPInstanceUID
    # a new model version gives a new SEG and SR
    newer = ModelSpec(SEG_MODEL.name, "1.0.1", SEG_MODEL.sha256)
    seg4 = build_seg(SegInput(newer, seg_in.labels, seg_in.source, SEGMENTS), "2.25")
    assert seg4.SOPInstanceUID != seg1.SOPInstanceUID
    # another root, other UIDs under it
    seg5 = build_seg(seg_in, "1.2.826.0.1.3680043.10.999")
    assert str(seg5.SOPInstanceUID).startswith("1.2.826.0.1.3680043.10.999.")


# -- SR content tree --------------------------------------------------------------


def _item(items: object, meaning: str) -> Dataset:
    for item in items:  # type: ignore[attr-defined]
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            return item
    raise AssertionError(f"no content item {meaning!r}")


def _code(item: Dataset) -> tuple[str, str]:
    c = item.ConceptCodeSequence[0]
    return str(c.CodeValue), str(c.CodingSchemeDesignator)


def test_sr_content_tree(tmp_path: Path) -> None:
    paths, truth, _ = _series(tmp_path / "s")
    seg_in, _volume = _seg_input(paths, truth)
    seg = build_seg(seg_in, "2.25")
    key = str(seg_in.source[5].SOPInstanceUID)
    sr = build_sr(_findings(key), seg_in.source, {SEG_MODEL.name: seg}, "2.25")

    # header: same patient and study, a new series, our identity
    src = seg_in.source[0]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert sr.get(kw) == src.get(kw)
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert str(sr.SeriesDescription).startswith("AI")
    assert sr.Manufacturer == "pacs-ai"
    assert any("pacs-ai" in str(v) for v in sr.SoftwareVersions)
    names = {str(e.get("ManufacturerModelName")) for e in sr.ContributingEquipmentSequence}
    assert {SEG_MODEL.name, CLS_MODEL.name} <= names
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    root = sr.ContentSequence
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    assert _code(_item(root, "Language of Content Item and Descendants"))[0] == "en-US"
    assert _item(root, "Observer Type").ConceptCodeSequence[0].CodeMeaning == "Device"
    assert _item(root, "Device Observer Name").TextValue == "pacs-ai"
    assert _code(_item(root, "Procedure reported")) == ("24627-2", "LN")
    groups = _item(root, "Imaging Measurements").ContentSequence
    assert len(groups) == 4
    cls_nodule, cls_lung, seg_lung, seg_nodule = groups
    for group in groups:
        algo = _item(group.ContentSequence, "Algorithm Name")
        version = _item(group.ContentSequence, "Algorithm Version")
        assert algo.TextValue in {SEG_MODEL.name, CLS_MODEL.name}
        assert version.TextValue in {SEG_MODEL.version, CLS_MODEL.version}

    # TID 1501: finding, finding site, certainty in %, present / absent
    items = cls_nodule.ContentSequence
    assert cls_nodule.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    assert _code(_item(items, "Finding")) == ("786838002", "SCT")
    assert _code(_item(items, "Finding Site")) == ("39607008", "SCT")
    certainty = _item(items, "Certainty of Finding")
    assert certainty.ConceptNameCodeSequence[0].CodeValue == "111012"
    value = certainty.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(87.3)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert _code(_item(items, "Lung nodule")) == ("52101004", "SCT")  # Present
    image = [i for i in items if i.ValueType == "IMAGE"][0]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key
    assert _code(_item(cls_lung.ContentSequence, "Lung")) == ("272519000", "SCT")  # Absent

    # TID 1411: volume in cm3, longest diameter in mm, referencing the SEG segment
    assert seg_nodule.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    items = seg_nodule.ContentSequence
    volume = _item(items, "Volume").MeasuredValueSequence[0]
    assert float(volume.NumericValue) == pytest.approx(1.812)
    assert volume.MeasurementUnitsCodeSequence[0].CodeValue == "cm3"
    diameter = _item(items, "Diameter")
    assert float(diameter.MeasuredValueSequence[0].NumericValue) == pytest.approx(15.4)
    assert diameter.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    assert _code(_item(diameter.ContentSequence, "Derivation")) == ("56851009", "SCT")
    ref = _item(items, "Referenced Segment").ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == seg.SOPClassUID
    assert int(ref.ReferencedSegmentNumber) == 2
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "786838002"
    assert not [
        i
        for i in seg_lung.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Diameter"
    ]
    assert (
        int(
            _item(seg_lung.ContentSequence, "Referenced Segment")
            .ReferencedSOPSequence[0]
            .ReferencedSegmentNumber
        )
        == 1
    )

    # the human-readable summary, for viewers that show only text
    summary = _item(_item(root, "Qualitative Evaluations").ContentSequence, "Summary")
    assert summary.ValueType == "TEXT"
    assert "Lung nodule: present, certainty 87 %" in summary.TextValue
    assert "not for diagnostic use" in summary.TextValue
    assert summary.TextValue == summary_text(_findings(key))

    # evidence: the source instances and the SEG
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence and key in evidence

    # highdicom reads it back
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path).content
    (group,) = [
        g for g in report.get_image_measurement_groups() if g.finding_type.value == "786838002"
    ]
    assert group.get_measurements()[0].value == pytest.approx(87.3)
    vols = report.get_volumetric_roi_measurement_groups()
    assert {g.finding_type.meaning for g in vols} == {"Lung", "Lung nodule"}
    if have("dciodvfy"):
        assert _dciodvfy(path) == []


# -- SEG geometry -------------------------------------------------------------------


@pytest.mark.parametrize("order", ["as-is", "reversed", "shuffled"])
def test_seg_frames_reference_the_right_slices(tmp_path: Path, order: str) -> None:
    paths, truth, datasets = _series(tmp_path / order, order)
    seg_in, _volume = _seg_input(paths, truth)
    seg = build_seg(seg_in, "2.25")
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    seg = dcmread(path)
    positions = {
        str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient] for ds in datasets
    }
    assert seg.SegmentationType == "BINARY"
    assert seg.Manufacturer == "pacs-ai"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert str(seg.SeriesDescription).startswith("AI")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    seen = set()
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        assert ipp == pytest.approx(positions[uid])
        label = SEGMENTS[number - 1].label_value
        assert np.array_equal(frames[i].astype(bool), truth[uid] == label)
        seen.add((uid, number))
    # every slice that holds a segment has its frame
    expected = {
        (uid, n)
        for uid, mask in truth.items()
        for n, spec in enumerate(SEGMENTS, start=1)
        if (mask == spec.label_value).any()
    }
    assert seen == expected
    if have("dciodvfy"):
        assert _dciodvfy(path) == []


def test_key_image(tmp_path: Path) -> None:
    paths, truth, _ = _series(tmp_path / "s")
    seg_in, volume = _seg_input(paths, truth)
    best = best_slice(seg_in.labels, SEGMENTS)
    assert best is not None
    k, mask = best
    assert mask.sum() == max((t == 2).sum() for t in truth.values())  # the nodule's widest slice
    ki = build_key_image(
        seg_in.source[k],
        volume.pixels[k],  # type: ignore[attr-defined]
        mask,
        ["Lung nodule 1.81 cm3", "chest-ct-lung-seg 1.0.0"],
        [SEG_MODEL],
        "2.25",
        volume.row_dir,  # type: ignore[attr-defined]
        volume.col_dir,  # type: ignore[attr-defined]
    )
    assert ki.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ki.PhotometricInterpretation == "RGB" and ki.BurnedInAnnotation == "YES"
    assert ki.StudyInstanceUID == seg_in.source[0].StudyInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in ki.ImageComments
    assert ki.SourceImageSequence[0].ReferencedSOPInstanceUID == seg_in.source[k].SOPInstanceUID
    pixels = ki.pixel_array
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    assert red.any()  # the contour is burned in
    path = tmp_path / "ki.dcm"
    ki.save_as(path, enforce_file_format=True)
    if have("dciodvfy"):
        assert _dciodvfy(path) == []


# -- destinations and statuses ---------------------------------------------------------


def test_destinations() -> None:
    d = parse_destination("PACS@10.0.0.5:104")
    assert (d.ae_title, d.host, d.port, d.tls) == ("PACS", "10.0.0.5", 104, False)
    assert d.profile == {"sr", "seg"} and d.name == "PACS@10.0.0.5:104"
    d = parse_destination("tls://ARCHIVE@archive.local:2762/sr+seg+ki")
    assert d.tls and d.profile == {"sr", "seg", "ki"}
    assert [x.name for x in parse_destinations("A@h:1, B@h:2/ki,")] == ["A@h:1", "B@h:2"]
    for bad in ("PACS", "PACS@host", "PACS@host:0", "PACS@host:104/xml", "@h:1", "A@h:1,A@h:1"):
        with pytest.raises(ValueError):
            parse_destinations(bad)


def test_status_classes() -> None:
    assert classify_status(0x0000) == "sent"
    assert classify_status(0xB007) == "sent"  # warning: stored with coercion
    assert classify_status(0xA700) == "transient"
    assert classify_status(0xA7FF) == "transient"
    assert classify_status(0xA900) == "permanent"
    assert classify_status(0xC000) == "permanent"
    assert classify_status(0xC210) == "permanent"
    assert classify_status(0x0122) == "permanent"  # SOP class not supported


def test_settings_read_destinations_and_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import SettingsError, load_settings

    s = load_settings(destinations="PACS@10.0.0.5:104/sr+seg+ki", uid_root="1.2.3.4.")
    assert s.uid_root == "1.2.3.4"
    assert [d.name for d in s.destination_list] == ["PACS@10.0.0.5:104"]
    with pytest.raises(SettingsError, match="PACS_AI_DESTINATIONS"):
        load_settings(destinations="PACS@10.0.0.5")
    with pytest.raises(SettingsError, match="PACS_AI_UID_ROOT"):
        load_settings(uid_root="1.2.abc")


# -- delivery rows -----------------------------------------------------------------------


def test_delivery_rows_backoff_and_idempotence(tmp_path: Path) -> None:
    from db.migrate import upgrade
    from db.models import DeliveryStatus, Study, utcnow
    from db.repo import (
        DeliveryRecord,
        claim_delivery,
        due_deliveries,
        finish_delivery,
        reset_deliveries,
        upsert_delivery,
    )
    from db.session import session_scope
    from worker.dispatch import backoff_seconds
    from worker.settings import load_settings

    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    with session_scope(url) as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        rec = DeliveryRecord(
            study.id,
            None,
            "1.2.3",
            "1.2.3.4",
            "1.2.3.4.5",
            "1.2.840.10008.5.1.4.1.1.88.34",
            "sr",
            "PACS@h:104",
            "x/y.dcm",
        )  # type: ignore[arg-type]
        first = upsert_delivery(s, rec)
        assert first is not None
    with session_scope(url) as s:
        assert upsert_delivery(s, rec) == first  # same object, same row
        row = claim_delivery(s, first, 60)
        assert row is not None and row.attempts == 1
        assert claim_delivery(s, first, 60) is None  # leased
        later = utcnow() + dt.timedelta(seconds=30)
        finish_delivery(s, first, DeliveryStatus.PENDING, error="refused", retry_at=later)
    with session_scope(url) as s:
        assert due_deliveries(s, utcnow(), utcnow()) == []  # backing off
        assert due_deliveries(s, later, later) == [(first, "PACS@h:104")]
        finish_delivery(s, first, DeliveryStatus.SENT)
    with session_scope(url) as s:
        assert upsert_delivery(s, rec) is None  # sent: a re-run never sends it again
        assert reset_deliveries(s, study_uid="1.2.3") == [first]  # resend
    settings = load_settings(delivery_retry_base=2, delivery_retry_max=60)
    assert [backoff_seconds(n, settings) for n in (1, 2, 3, 6, 10)] == [2, 4, 8, 60, 60]
