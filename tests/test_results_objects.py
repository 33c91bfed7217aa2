"""Result objects without a network: the SR content tree (TID 1500), the SEG
geometry, deterministic UIDs, destinations, statuses and delivery rows."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.protocols import classify_status, parse_destination, parse_destinations
from dicomnode.results import (
    VIEWER_TOOL_TAG,
    CodeSpec,
    Finding,
    ModelSpec,
    PlanarRegion,
    SegInput,
    SegmentSpec,
    best_slice,
    build_key_image,
    build_seg,
    build_sr,
    focal_components,
    hull,
    inside_point,
    largest_slice,
    long_axis,
    outline,
    render_key_image,
    slice_region,
    summary_text,
    viewer_label,
)
from dicomnode.uids import DEFAULT_UID_ROOT, InvalidUID, derived_uid, validate_uid
from testkit.phantoms import Nodule, generate_chest_ct, phantom_to_datasets, sample_geometry
from tests.conftest import dciodvfy_errors, have
from worker.pipeline.volume import load_series

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


def two_nodules(seed: int, **overrides: Any) -> list[Nodule]:
    """Two nodules, one in each lung of phantom ``seed`` (16 and 11 mm)."""
    geo = sample_geometry(seed, **overrides)
    z_mid = float(np.mean(geo.slab))
    right, left = geo.lungs
    return [
        Nodule((right.center[0], right.center[1], z_mid), 16.0, 0),
        Nodule((left.center[0], left.center[1] + 0.3 * left.axes[1], z_mid), 11.0, 1),
    ]


def _series(
    folder: Path,
    order: str = "as-is",
    seed: int = 5_000_001,
    slices: int = 12,
    nodules: int = 1,
) -> tuple[list[Path], dict[str, np.ndarray], list[Dataset]]:
    """A small phantom (``nodules``: 0, 1 or 2) written in the given file order;
    returns the paths, each instance's true label mask by SOP Instance UID, and
    the datasets."""
    shape: dict[str, Any] = {"matrix": 96, "slices": slices}
    if nodules == 2:
        shape["nodules"] = two_nodules(seed, thickness_mm=3.0, **shape)
        shape["thickness_mm"] = 3.0
    else:
        shape["nodule"] = nodules == 1
        shape["nodule_diameter_mm"] = 15.0 if nodules else None
    phantom = generate_chest_ct(seed, **shape)
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


def _drawn(seg_in: SegInput, findings: list[Finding]) -> list[Finding]:
    """``findings`` with the segmentation ones drawn as the worker draws them: each
    nodule outlined on the slice where it is largest, the lungs' hull on theirs."""
    uids = [str(ds.SOPInstanceUID) for ds in seg_in.source]
    out: list[Finding] = []
    for f in findings:
        if f.kind != "segmentation" or not f.present:
            out.append(f)
        elif f.focal:
            comps = focal_components(seg_in.labels, 2)
            for i, c in enumerate(comps, start=1):
                points = outline(c.mask)
                assert points is not None
                out.append(
                    replace(
                        f,
                        region=PlanarRegion(uids[c.slice_index], points),
                        component=i,
                        components=len(comps),
                    )
                )
        else:
            best = largest_slice(seg_in.labels, 1)
            assert best is not None
            points = hull(best[1])
            assert points is not None
            out.append(replace(f, region=PlanarRegion(uids[best[0]], points)))
    return out


def _groups_by_tracking_uid(sr: Dataset) -> dict[str, list[Dataset]]:
    """Imaging Measurements' groups merged by Tracking Unique Identifier, as OHIF
    merges them before drawing."""
    root = sr.ContentSequence
    groups = _item(root, "Imaging Measurements").ContentSequence
    merged: dict[str, list[Dataset]] = {}
    for group in groups:
        uid = str(_item(group.ContentSequence, "Tracking Unique Identifier").UID)
        merged.setdefault(uid, []).extend(group.ContentSequence)
    return merged


def _scoords(items: list[Dataset]) -> list[Dataset]:
    return [i for i in items if i.ValueType in {"SCOORD", "SCOORD3D"}]


def _drawn_scoord(items: list[Dataset]) -> Dataset:
    """What OHIF draws of a finding before it is tracked: its region, else the
    coordinates its measurements were inferred from."""
    found = _scoords(items) or [
        s for i in items if i.ValueType == "NUM" for s in _scoords(i.get("ContentSequence", []))
    ]
    assert found, "nothing to draw"
    return found[0]


def viewer_measurements(sr: Dataset) -> list[dict[str, Any]]:
    """The measurements OHIF 3.13 makes of an SR's groups when it tracks them
    (@cornerstonejs/adapters ``MeasurementReport.generateToolState``): the tool
    named after the tag in the Tracking Identifier, the points of the "inferred
    from" coordinates of the group's first measurement (of its region when it has
    none; a group with a measurement without coordinates is skipped), the name
    from its Comment, and for a Length its value."""
    out = []
    for group in _item(sr.ContentSequence, "Imaging Measurements").ContentSequence:
        items = list(group.ContentSequence)
        identifier = str(_item(items, "Tracking Identifier").TextValue)
        tag, _, rest = identifier.partition(":")
        assert tag == VIEWER_TOOL_TAG, identifier
        tool = rest.split(":")[0]
        nums = [i for i in items if i.ValueType == "NUM"]
        scoords = _scoords(list(nums[0].get("ContentSequence", []))) if nums else _scoords(items)
        if not scoords:
            continue
        (comment,) = [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121106"]
        scoord = scoords[0]
        points = np.asarray(scoord.GraphicData, dtype=np.float64).reshape(-1, 2)
        found: dict[str, Any] = {
            "tool": tool,
            "label": str(comment.TextValue),
            "points": points,
            "graphic_type": str(scoord.GraphicType),
            "image": str(
                scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            ),
        }
        if tool == "Length":
            assert scoord.GraphicType == "POLYLINE" and len(points) == 2
            value = nums[0].MeasuredValueSequence[0]
            found["value"] = float(value.NumericValue)
            found["unit"] = str(value.MeasurementUnitsCodeSequence[0].CodeValue)
        else:
            assert tool == "ArrowAnnotate" and scoord.GraphicType == "POINT" and len(points) == 1
        out.append(found)
    return out


def test_sr_content_tree(tmp_path: Path) -> None:
    paths, truth, _ = _series(tmp_path / "s")
    seg_in, _volume = _seg_input(paths, truth)
    seg = build_seg(seg_in, "2.25")
    key = str(seg_in.source[5].SOPInstanceUID)
    findings = _drawn(seg_in, _findings(key))
    sr = build_sr(findings, seg_in.source, {SEG_MODEL.name: seg}, "2.25")

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
    # the nodule first (viewers open on the first group), the lungs, the classifier's
    # nodule. Per finding: the region with the measurements that have no points of
    # their own (TID 1410), the measurement a viewer draws with its points (TID 1501),
    # the volume of a whole segment with the SEG segment (TID 1411). The classifier's
    # "Lung" has no slice to draw on: a qualitative evaluation.
    assert [g.ContentTemplateSequence[0].TemplateIdentifier for g in groups] == [
        "1410",
        "1501",
        "1410",
        "1411",
        "1501",
    ]
    nodule_region, nodule_diameter, lung_region, lung_volume, cls_nodule = groups
    for group in groups:
        algo = _item(group.ContentSequence, "Algorithm Name")
        version = _item(group.ContentSequence, "Algorithm Version")
        assert algo.TextValue in {SEG_MODEL.name, CLS_MODEL.name}
        assert version.TextValue in {SEG_MODEL.version, CLS_MODEL.version}

    # one tracking identifier per finding (OHIF merges its groups), naming the
    # viewer tool; every finding is drawn on a source image
    merged = _groups_by_tracking_uid(sr)
    assert len(merged) == 3
    for items in merged.values():
        ref = _drawn_scoord(items).ContentSequence[0].ReferencedSOPSequence[0]
        assert str(ref.ReferencedSOPInstanceUID) in truth
        identifiers = {
            str(i.TextValue)
            for i in items
            if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "112039"
        }
        assert len(identifiers) == 1
    tracking = [str(_item(g.ContentSequence, "Tracking Identifier").TextValue) for g in groups]
    assert (
        tracking[0]
        == tracking[1]
        == (f"{VIEWER_TOOL_TAG}:Length:Lung nodule 1 of 1 (chest-ct-lung-seg)")
    )
    assert tracking[2] == tracking[3] == f"{VIEWER_TOOL_TAG}:ArrowAnnotate:Lung (chest-ct-lung-seg)"
    assert tracking[4] == (
        f"{VIEWER_TOOL_TAG}:ArrowAnnotate:Lung nodule present (chest-ct-nodule-cls)"
    )

    # what OHIF lists once the reader tracks the report: each finding with its values
    shown = viewer_measurements(sr)
    assert [(m["tool"], m["label"]) for m in shown] == [
        ("Length", "Lung nodule 1 of 1: diameter 15.4 mm, volume 1.81 cm3"),
        ("ArrowAnnotate", "Lung: volume 2512.5 cm3"),
        ("ArrowAnnotate", "Lung nodule: present, probability 87 % (chest-ct-nodule-cls)"),
    ]

    # the classifier: finding, finding site, certainty in %, present, the slice that
    # drove it (an arrow at its top)
    items = cls_nodule.ContentSequence
    assert _code(_item(items, "Finding")) == ("786838002", "SCT")
    assert _code(_item(items, "Finding Site")) == ("39607008", "SCT")
    certainty = _item(items, "Certainty of Finding")
    assert certainty.ConceptNameCodeSequence[0].CodeValue == "111012"
    value = certainty.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(87.3)
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert _code(_item(items, "Lung nodule")) == ("52101004", "SCT")  # Present
    (arrow,) = _scoords(certainty.ContentSequence)
    assert arrow.RelationshipType == "INFERRED FROM" and arrow.GraphicType == "POINT"
    assert arrow.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key
    assert not _scoords(list(items))  # no region: a TID 1501 group

    # the nodule: its outline on the slice where it is largest, over the nodule; its
    # volume in cm3 with the SEG segment as its source; its maximum diameter in mm,
    # inferred from a line along its long axis there, as long as the diameter
    items = nodule_region.ContentSequence
    (region,) = _scoords(items)
    assert region.GraphicType == "POLYLINE"
    uid = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    areas = {u: int((m == 2).sum()) for u, m in truth.items()}
    assert areas[uid] == max(areas.values())
    _assert_outlines(region.GraphicData, truth[uid] == 2)
    volume = _item(items, "Volume")
    assert float(volume.MeasuredValueSequence[0].NumericValue) == pytest.approx(1.812)
    assert volume.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "cm3"
    source = _item(volume.ContentSequence, "Source of Measurement").ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert int(source.ReferencedSegmentNumber) == 2
    assert not [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Diameter"]
    diameter = _item(nodule_diameter.ContentSequence, "Diameter")
    assert float(diameter.MeasuredValueSequence[0].NumericValue) == pytest.approx(15.4)
    assert diameter.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    assert _code(_item(diameter.ContentSequence, "Derivation")) == ("56851009", "SCT")
    (axis,) = _scoords(diameter.ContentSequence)
    assert axis.RelationshipType == "INFERRED FROM" and axis.GraphicType == "POLYLINE"
    assert str(axis.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) == uid
    line = shown[0]
    spacing = np.asarray([float(v) for v in seg_in.source[0].PixelSpacing][::-1])
    ends = line["points"] * spacing
    assert float(np.linalg.norm(ends[1] - ends[0])) == pytest.approx(15.4, abs=0.01)
    centre = line["points"].mean(axis=0)
    assert (truth[uid] == 2)[int(centre[1]), int(centre[0])]  # across the nodule
    assert (line["value"], line["unit"]) == (pytest.approx(15.4), "mm")
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "786838002"

    # the lungs: an arrow into them on their largest slice, and the TID 1411 group
    # with the volume, referencing the SEG segment; one tracking UID
    assert _item(lung_region.ContentSequence, "Tracking Unique Identifier").UID == (
        _item(lung_volume.ContentSequence, "Tracking Unique Identifier").UID
    )
    assert not [i for i in lung_region.ContentSequence if i.ValueType == "NUM"]
    (region,) = _scoords(lung_region.ContentSequence)
    assert region.GraphicType == "POINT"
    uid = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    lung_areas = {u: int((m == 1).sum()) for u, m in truth.items()}
    assert lung_areas[uid] == max(lung_areas.values())
    x, y = (float(v) for v in region.GraphicData)
    assert truth[uid][int(y), int(x)] == 1  # the arrow points into a lung
    ref = _item(lung_volume.ContentSequence, "Referenced Segment").ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == seg.SOPClassUID
    assert int(ref.ReferencedSegmentNumber) == 1
    lung_ml = _item(lung_volume.ContentSequence, "Volume").MeasuredValueSequence[0]
    assert float(lung_ml.NumericValue) == pytest.approx(2512.5)
    assert not [
        i
        for i in lung_volume.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Diameter"
    ]

    # findings without a region, and the human-readable summary: Qualitative
    # Evaluations, outside the measurement groups
    evaluations = _item(root, "Qualitative Evaluations").ContentSequence
    assert _code(_item(evaluations, "Lung")) == ("272519000", "SCT")  # Absent
    summary = _item(evaluations, "Summary")
    assert summary.ValueType == "TEXT"
    assert "Lung nodule: present, certainty 87 %" in summary.TextValue
    assert "Lung nodule 1 of 1: present, longest diameter 15.4 mm, volume 1.81" in (
        summary.TextValue
    )
    assert "not for diagnostic use" in summary.TextValue
    assert summary.TextValue == summary_text(findings)

    # evidence: the source instances and the SEG
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for i in se.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence and key in evidence

    # highdicom reads back finding, certainty, volume and diameter
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path).content
    planar = report.get_planar_roi_measurement_groups()
    (nodule,) = [g for g in planar if g.finding_type.meaning == "Lung nodule"]
    (lung,) = [g for g in planar if g.finding_type.meaning == "Lung"]
    assert lung.roi is not None and lung.roi.graphic_type.value == "POINT"
    assert nodule.roi is not None and nodule.roi.graphic_type.value == "POLYLINE"
    assert {m.name.meaning: m.value for m in nodule.get_measurements()} == {
        "Volume": pytest.approx(1.812)
    }
    measured = {
        (str(g.tracking_identifier), m.name.meaning): m.value
        for g in report.get_image_measurement_groups()
        for m in g.get_measurements()
    }
    assert measured == {
        (tracking[1], "Diameter"): pytest.approx(15.4),
        (tracking[4], "Certainty of Finding"): pytest.approx(87.3),
    }
    (cls,) = [
        g
        for g in report.get_image_measurement_groups()
        if CLS_MODEL.name in str(g.tracking_identifier)
    ]
    assert cls.finding_type.value == "786838002"
    (vol,) = report.get_volumetric_roi_measurement_groups()
    assert vol.finding_type.meaning == "Lung"
    assert vol.get_measurements()[0].value == pytest.approx(2512.5)
    assert vol.referenced_segment is not None
    if have("dciodvfy"):
        assert dciodvfy_errors(path) == []
    if have("dsr2html"):
        html = _dsr2html(path)
        for text in (
            "Lung nodule 1 of 1",
            "15.4 mm",
            "1.812 cm3",
            "2512.5 cm3",
            "87.3 %",
            "Lung nodule: present, probability 87 %",
        ):
            assert text in html, text


def _dsr2html(path: Path) -> str:
    out = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _assert_outlines(graphic_data: Any, mask: np.ndarray) -> None:
    """The closed polygon lies on the mask's border (within a pixel) and encloses
    its area."""
    xy = np.asarray(graphic_data, dtype=np.float64).reshape(-1, 2)
    assert np.array_equal(xy[0], xy[-1])  # closed
    x, y = xy[:, 0], xy[:, 1]
    area = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    assert area == pytest.approx(mask.sum(), rel=0.2)
    rows, cols = np.nonzero(mask)
    assert x.min() >= cols.min() - 0.01 and x.max() <= cols.max() + 1.01
    assert y.min() >= rows.min() - 0.01 and y.max() <= rows.max() + 1.01
    # its centre is inside the mask
    assert mask[int(y.mean()), int(x.mean())]


@pytest.mark.parametrize("nodules", [0, 2])
def test_sr_draws_every_finding(tmp_path: Path, nodules: int) -> None:
    """No nodule, two nodules: every finding is drawn (OHIF draws a finding by its
    region or its measurement's points and fails on one without), each nodule
    outlined over itself on the slice where it is largest, and every drawn finding
    is a measurement OHIF lists with its values, each nodule's a line across it."""
    paths, truth, _ = _series(tmp_path / "s", nodules=nodules, seed=5_000_003)
    seg_in, _volume = _seg_input(paths, truth)
    seg = build_seg(seg_in, "2.25")
    key = str(seg_in.source[4].SOPInstanceUID)
    findings = _findings(key)
    if nodules == 0:
        findings = [
            replace(f, present=False, volume_ml=0.0, longest_diameter_mm=None) if f.focal else f
            for f in findings
        ]
    drawn = _drawn(seg_in, findings)
    sr = build_sr(drawn, seg_in.source, {SEG_MODEL.name: seg}, "2.25")
    merged = _groups_by_tracking_uid(sr)
    for items in merged.values():
        _drawn_scoord(items)
    labelled = [
        items
        for items in merged.values()
        if ":Lung nodule " in _item(items, "Tracking Identifier").TextValue
        and "chest-ct-lung-seg" in _item(items, "Tracking Identifier").TextValue
    ]
    assert len(labelled) == nodules
    for items in labelled:
        (region,) = _scoords(items)
        uid = str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        _assert_outlines(region.GraphicData, _component_at(truth[uid] == 2, region.GraphicData))
        assert {
            i.ConceptNameCodeSequence[0].CodeMeaning for i in items if i.ValueType == "NUM"
        } == {
            "Diameter",
            "Volume",
        }
    shown = viewer_measurements(sr)
    lines = [m for m in shown if m["tool"] == "Length"]
    assert [m["label"].split(":")[0] for m in lines] == [
        f"Lung nodule {i} of {nodules}" for i in range(1, nodules + 1)
    ]
    for m in lines:
        centre = m["points"].mean(axis=0)
        assert truth[m["image"]][int(centre[1]), int(centre[0])] == 2
    assert [m["label"] for m in shown if m["tool"] == "ArrowAnnotate"] == [
        "Lung: volume 2512.5 cm3",
        "Lung nodule: present, probability 87 % (chest-ct-nodule-cls)",
    ]
    evaluations = _item(sr.ContentSequence, "Qualitative Evaluations").ContentSequence
    if nodules == 0:
        # the segmentation's "Lung nodule: absent" has nothing to draw
        absent = [
            i
            for i in evaluations
            if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Lung nodule"
        ]
        assert [_code(i) for i in absent] == [("272519000", "SCT")]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    if have("dciodvfy"):
        assert dciodvfy_errors(path) == []


def _component_at(mask: np.ndarray, graphic_data: Any) -> np.ndarray:
    """The 2D piece of ``mask`` under the centre of a polygon."""
    from scipy import ndimage

    xy = np.asarray(graphic_data, dtype=np.float64).reshape(-1, 2)
    pieces, _ = ndimage.label(mask)
    number = pieces[int(xy[:, 1].mean()), int(xy[:, 0].mean())]
    assert number > 0, "the outline's centre is not on the nodule"
    return pieces == number


def test_outline_and_hull_follow_pixel_edges() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:9, 10:16] = True  # a 4 x 6 rectangle: 24 pixels
    mask[12:14, 2:4] = True  # a smaller second piece
    points = outline(mask)
    assert points is not None and points[0] == points[-1]
    xy = np.asarray(points)
    assert xy[:, 0].min() == pytest.approx(10.125) and xy[:, 0].max() == pytest.approx(15.875)
    assert xy[:, 1].min() == pytest.approx(5.125) and xy[:, 1].max() == pytest.approx(8.875)
    _assert_outlines(points, mask & (np.arange(30) >= 10)[None, :])
    around = np.asarray(hull(mask))
    assert around[:, 0].min() == pytest.approx(2.125) and around[:, 1].max() == pytest.approx(
        13.875
    )
    assert outline(np.zeros((4, 4), dtype=bool)) is None
    with pytest.raises(ValueError, match="closed"):
        PlanarRegion("1.2.3", ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)))


def test_viewer_points_and_labels(tmp_path: Path) -> None:
    """Where OHIF's tools go and what they are called: a nodule's line is its long
    axis (in mm, whatever the pixel spacing) resized to its diameter, an arrow to a
    whole structure points into it, a classifier's arrow into the top of its slice;
    names carry the values, probabilities never read 0 % or 100 %."""
    # a diamond 10 pixels wide, 16 high: with 2 x 1 mm pixels its long axis is across
    diamond = ((5.0, 0.0), (10.0, 8.0), (5.0, 16.0), (0.0, 8.0), (5.0, 0.0))
    assert long_axis(diamond) == ((5.0, 0.0), (5.0, 16.0))
    assert long_axis(diamond, (2.0, 1.0)) == ((0.0, 8.0), (10.0, 8.0))
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:18, 2:10] = True  # the larger piece: 16 x 8
    mask[5:9, 20:26] = True
    x, y = inside_point(mask)  # type: ignore[misc]
    assert mask[int(y), int(x)] and 2 + 3 <= x <= 10 - 3
    assert inside_point(np.zeros((4, 4), dtype=bool)) is None

    paths, truth, _ = _series(tmp_path / "s")
    seg_in, _volume = _seg_input(paths, truth)
    seg = build_seg(seg_in, "2.25")
    source = seg_in.source[5]
    key = str(source.SOPInstanceUID)
    findings = _drawn(seg_in, _findings(key))
    # a worker may point at a whole structure itself
    lung_uid = next(f.region.sop_instance_uid for f in findings if f.code == LUNG and f.region)
    point = inside_point(truth[lung_uid] == 1)
    assert point is not None
    findings = [
        replace(f, region=PlanarRegion(lung_uid, (point,), "POINT"))
        if f.code == LUNG and f.region
        else f
        for f in findings
    ]
    sr = build_sr(findings, seg_in.source, {SEG_MODEL.name: seg}, "2.25")
    shown = {m["label"]: m for m in viewer_measurements(sr)}
    lung = shown["Lung: volume 2512.5 cm3"]
    assert tuple(lung["points"][0]) == point
    cls = shown["Lung nodule: present, probability 87 % (chest-ct-nodule-cls)"]
    assert cls["image"] == key
    assert tuple(cls["points"][0]) == (0.5 * int(source.Columns), 0.08 * int(source.Rows))
    assert slice_region(source).points == ((0.5 * int(source.Columns), 0.08 * int(source.Rows)),)

    f = Finding(CLS_MODEL, "classification", NODULE, present=False, probability=0.003)
    assert viewer_label(f) == "Lung nodule: absent, probability <1 % (chest-ct-nodule-cls)"
    assert viewer_label(replace(f, present=True, probability=0.9996)).endswith(
        "present, probability >99 % (chest-ct-nodule-cls)"
    )
    assert viewer_label(replace(f, present=True, probability=1.0)).endswith(
        ">99 % (chest-ct-nodule-cls)"
    )
    nodule = Finding(
        SEG_MODEL,
        "segmentation",
        NODULE,
        True,
        volume_ml=0.8,
        longest_diameter_mm=11.94,
        focal=True,
        component=2,
        components=2,
    )
    assert viewer_label(nodule) == "Lung nodule 2 of 2: diameter 11.9 mm, volume 0.80 cm3"


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
        assert dciodvfy_errors(path) == []


def test_key_image(tmp_path: Path) -> None:
    from worker.results.report import key_image_lines

    paths, truth, _ = _series(tmp_path / "s")
    seg_in, volume = _seg_input(paths, truth)
    best = best_slice(seg_in.labels, SEGMENTS)
    assert best is not None
    k, mask = best
    assert mask.sum() == max((t == 2).sum() for t in truth.values())  # the nodule's widest slice
    findings = _drawn(seg_in, _findings(str(seg_in.source[k].SOPInstanceUID)))
    (nodule,) = [f for f in findings if f.component == 1]
    lines = key_image_lines(nodule, findings)
    assert lines == [
        "Lung nodule 1 of 1: diameter 15.4 mm, volume 1.81 cm3",
        "Lung nodule probability 87 % (chest-ct-nodule-cls 2.1.0)",
        "outline: chest-ct-lung-seg 1.0.0",
    ]
    ki = build_key_image(
        seg_in.source[k],
        volume.pixels[k],  # type: ignore[attr-defined]
        mask,
        lines,
        [SEG_MODEL],
        "2.25",
        volume.row_dir,  # type: ignore[attr-defined]
        volume.col_dir,  # type: ignore[attr-defined]
    )
    assert ki.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # single-frame Secondary Capture
    assert int(ki.get("NumberOfFrames", 1)) == 1
    # the source's modality: OHIF plays OT and US images as cine
    assert ki.Modality == "CT"
    assert ki.PhotometricInterpretation == "RGB" and ki.BurnedInAnnotation == "YES"
    assert ki.StudyInstanceUID == seg_in.source[0].StudyInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in ki.ImageComments
    assert "Lung nodule 1 of 1: diameter 15.4 mm, volume 1.81 cm3" in ki.ImageComments
    assert ki.SourceImageSequence[0].ReferencedSOPInstanceUID == seg_in.source[k].SOPInstanceUID
    _assert_key_image_layout(ki.pixel_array)
    path = tmp_path / "ki.dcm"
    ki.save_as(path, enforce_file_format=True)
    if have("dciodvfy"):
        assert dciodvfy_errors(path) == []


def _assert_key_image_layout(pixels: np.ndarray) -> int:
    """The text is in a black band of its own on top, centred and clear of the
    corners (where viewers put their overlays); the outline is on the image.
    Returns the band's height."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    grey = (r == g) & (g == b) & (r > 20)
    band = int(np.argmax(grey.any(axis=1)))  # the first row of the slice
    assert band > 0
    assert not pixels[:band][~((r[:band] > 0) & (b[:band] < r[:band]))].any()  # black + text
    text = (r > 120) & (b < 60) & (g > 60)  # yellow and orange, antialiased
    rows, cols = np.nonzero(text)
    assert rows.size and rows.max() < band  # all text in the band, none over the image
    width = pixels.shape[1]
    assert cols.min() > 0.17 * width and cols.max() < 0.83 * width
    assert band / pixels.shape[0] < 0.3  # the image keeps most of the height
    # lines of a readable size: a capital is at least 1.3 % of the width tall
    # (10 px of 768, 13 px on a 1000 px wide viewport)
    first_line = np.flatnonzero(np.diff(np.unique(rows)) > 1)
    line_end = np.unique(rows)[first_line[0]] if first_line.size else rows.max()
    assert line_end - rows.min() + 1 >= 0.013 * width
    red = (r == 255) & (g == 0) & (b == 0)
    red_rows, _ = np.nonzero(red)
    assert red_rows.size and red_rows.min() >= band  # the outline is on the slice
    return band


def test_key_image_text_fits_its_band() -> None:
    """Long lines shrink to fit between the corners; a mask outline is drawn."""
    pixels = np.full((256, 256), -1000.0, dtype=np.float32)
    pixels[80:180, 60:200] = 40.0
    mask = np.zeros((256, 256), dtype=bool)
    mask[100:120, 100:130] = True
    lines = [
        "Lung nodule 1 of 12: diameter 15.4 mm, volume 1.81 cm3 and a long tail of words",
        "outline: chest-ct-lung-seg 1.0.0",
        "AI result - NOT FOR DIAGNOSTIC USE",
    ]
    rgb, zoom = render_key_image(pixels, mask, lines, "CT")
    assert zoom == 3 and rgb.shape[1] == 768
    band = _assert_key_image_layout(rgb)
    # the long line was wrapped (4 lines of text), not shrunk below a readable size
    r, g, b = (rgb[:band, :, i].astype(int) for i in range(3))
    rows = np.unique(np.nonzero((r > 120) & (b < 60) & (g > 60))[0])
    assert int(np.sum(np.diff(rows) > 1)) + 1 == 4


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
    from worker.delivery.dispatch import backoff_seconds
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


# -- the worker's findings: one per nodule, drawn where it is largest --------------------------


def test_worker_draws_each_nodule(tmp_path: Path) -> None:
    from worker.pipeline import postprocess
    from worker.pipeline.registry import DEMO_MODELS_DIR, load_manifest
    from worker.results.report import ModelResult, drawn_findings_of, findings_of

    paths, truth, _ = _series(tmp_path / "s", nodules=2, seed=5_000_005)
    seg_in, volume = _seg_input(paths, truth)
    manifest = load_manifest(DEMO_MODELS_DIR / "chest-ct-lung-seg.json")
    labels = seg_in.labels.copy()
    comps = postprocess.components(labels, 2, volume.spacing)  # type: ignore[attr-defined]
    assert len(comps) == 2
    rows: list[dict[str, Any]] = []
    for label in manifest.labels:
        measurements: dict[str, Any] = {"volume_ml": 1.0}
        if label.focal:
            measurements["count"] = 2
            measurements["components"] = [  # the pipeline's order: largest first
                {
                    "volume_ml": round(c.volume_ml, 3),
                    "max_diameter_mm": round(c.max_diameter_mm, 2),
                    "centroid_voxel": list(c.centroid_voxel),
                }
                for c in comps
            ]
        rows.append(
            {
                "finding_code_value": label.code.value,
                "finding_code_scheme": label.code.scheme,
                "finding": label.code.meaning,
                "label_value": label.value,
                "probability": None,
                "present": True,
                "measurements": measurements,
            }
        )
    result = ModelResult(manifest, "1.2.3", volume, rows, labels)  # type: ignore[arg-type]
    drawn = drawn_findings_of(result)
    nodules = [d for d in drawn if getattr(d, "finding", d).focal]
    assert [d.finding.label for d in nodules] == ["Lung nodule 1 of 2", "Lung nodule 2 of 2"]  # type: ignore[union-attr]
    uids = volume.sop_instance_uids  # type: ignore[attr-defined]
    for d, comp in zip(nodules, comps, strict=True):
        f = d.finding  # type: ignore[union-attr]
        assert f.volume_ml == pytest.approx(comp.volume_ml, abs=0.001)
        assert f.longest_diameter_mm == pytest.approx(comp.max_diameter_mm, abs=0.01)
        assert f.region is not None and f.region.frame_number is None
        k = d.slice_index  # type: ignore[union-attr]
        assert f.region.sop_instance_uid == uids[k]
        # the slice where this nodule is largest, the outline over this nodule
        z0, z1 = comp.bbox[0], comp.bbox[3]
        assert z0 <= k < z1
        mask = _component_at(truth[uids[k]] == 2, f.region.points)
        assert np.array_equal(mask, d.mask)  # type: ignore[union-attr]
        _assert_outlines(f.region.points, mask)
    (lung,) = [d for d in drawn if getattr(d, "finding", d).code == LUNG]
    assert lung.finding.region is not None  # type: ignore[union-attr]
    assert [f.label for f in findings_of(result)] == [
        "Lung",
        "Lung nodule 1 of 2",
        "Lung nodule 2 of 2",
    ]
