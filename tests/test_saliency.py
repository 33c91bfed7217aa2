"""Saliency maps of classification findings (issue 13, done-when 3).

- on phantoms, the hottest region of the occlusion map overlaps the known
  lesion: the chest CT nodule and the endoscopy lesion, through the demo models
  and the runtime's own recipe;
- the time budget: a coarse pass for every finding before any fine one, no map
  for a finding whose pass did not fit, nothing with a budget of 0;
- the map object (an RGB Secondary Capture) and the SR that lists it pass
  dciodvfy with 0 errors and read back with highdicom;
- end to end: a destination with profile ``map`` receives the map in the
  study, in a series of its own, referenced from the SR.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.maps import (
    NOT_FOR_DIAGNOSIS,
    MapCaption,
    build_saliency_sc,
    reference_maps,
    render_saliency,
)
from dicomnode.results import CodeSpec, Finding, ModelSpec, build_sr
from testkit.phantoms import (
    endoscopy_to_dataset,
    generate_chest_ct,
    generate_endoscopy_image,
    phantom_to_datasets,
)
from tests.conftest import NodeFactory, free_port, have, port_open, send_datasets, wait_for
from tests.dicom_peers import storescp
from tests.factory import CANARY_ID, CANARY_NAME
from worker.pipeline import saliency
from worker.pipeline.inference import RuntimeOptions, SessionCache, header_vector
from worker.pipeline.registry import DEMO_MODELS_DIR, RegisteredModel, discover
from worker.pipeline.run import run_model_full
from worker.pipeline.volume import Volume, load_series, patient_features
from worker.settings import Settings

needs_models = pytest.mark.skipif(
    not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"
)
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
NODULE = CodeSpec("786838002", "SCT", "Lung nodule")
CLS = ModelSpec("chest-ct-nodule-cls", "1.0.0", "ab" * 32)


@pytest.fixture(scope="module")
def models() -> dict[str, RegisteredModel]:
    return {m.name: m for m in discover(DEMO_MODELS_DIR) if m.enabled}


@pytest.fixture(scope="module")
def cache() -> SessionCache:
    return SessionCache(RuntimeOptions(threads=2))


def _write(datasets: list[Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _maps(
    model: RegisteredModel, cache: SessionCache, volume: Volume, header: Dataset, budget: float
) -> tuple[list[dict[str, Any]], list[saliency.SaliencyMap]]:
    """The model's result rows on ``volume`` and the maps of its findings."""
    manifest = model.manifest
    assert manifest is not None
    run = run_model_full(model, volume, patient_features(header), Settings())
    extra = header_vector(manifest, patient_features(header))
    predictors = {model.name: saliency.onnx_predictor(cache.get(model), manifest, extra)}
    rows = [dict(r) for r in run.rows]
    targets = saliency.targets_for(model.name, manifest, volume, rows)
    return rows, saliency.occlusion_maps(targets, predictors, budget)


def _hot_region(heat: np.ndarray) -> np.ndarray:
    """The hottest region: the connected part at or above half the maximum that
    holds the maximum."""
    labels, _ = ndimage.label(heat >= 0.5 * heat.max())
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return np.asarray(labels == labels[r, c])


# -- on phantoms --------------------------------------------------------------------------


@needs_models
@pytest.mark.parametrize("seed", [5_100_001, 5_100_002, 5_100_003])
def test_ct_nodule_is_the_hottest_region(
    seed: int, models: dict[str, RegisteredModel], cache: SessionCache, tmp_path: Path
) -> None:
    phantom = generate_chest_ct(
        seed, matrix=192, slices=20, thickness_mm=2.5, nodule=True, nodule_diameter_mm=14.0
    )
    datasets = phantom_to_datasets(phantom, seed=seed, shuffle=True)
    volume = load_series(_write(datasets, tmp_path))
    # phantom slice of each volume slice (instance 1 is the top slice, k = n - 1)
    n = phantom.hu.shape[0]
    number = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in datasets}
    t = time.monotonic()
    rows, maps = _maps(models["chest-ct-nodule-cls"], cache, volume, datasets[0], 60.0)
    seconds = time.monotonic() - t
    (row,) = rows
    assert row["present"]
    (m,) = maps
    assert m.stride == "fine" and m.heat.shape == phantom.hu.shape[1:]
    assert m.heat.max() == pytest.approx(1.0) and m.heat.min() >= 0.0
    k = n - number[volume.sop_instance_uids[m.slice_index]]
    nodule = phantom.labels[k] == 2
    assert nodule.any(), "the finding's slice goes through the nodule"
    hot = _hot_region(m.heat)
    assert (hot & nodule).any(), "the hottest region overlaps the nodule"
    assert hot.mean() < 0.15, "and is a region, not the whole slice"
    print(f"CT {seed}: {m.evaluations} evaluations, {seconds:.1f} s, hot {hot.mean():.3f}")


@needs_models
@pytest.mark.parametrize("seed", [4, 5, 13])
def test_endoscopy_lesion_is_the_hottest_region(
    seed: int, models: dict[str, RegisteredModel], cache: SessionCache, tmp_path: Path
) -> None:
    image = generate_endoscopy_image(seed, lesion=True)
    assert image.lesion_center is not None and image.lesion_radius_px is not None
    ds = endoscopy_to_dataset(image, seed=seed)
    volume = load_series(_write([ds], tmp_path))
    rows, maps = _maps(models["endoscopy-lesion-cls"], cache, volume, ds, 60.0)
    (row,) = rows
    assert row["present"]
    (m,) = maps
    assert m.heat.shape == image.rgb.shape[:2]
    yy, xx = np.mgrid[: m.heat.shape[0], : m.heat.shape[1]]
    cy, cx = image.lesion_center
    lesion = np.hypot(yy - cy, xx - cx) <= image.lesion_radius_px
    hot = _hot_region(m.heat)
    assert (hot & lesion).any(), "the hottest region overlaps the lesion"
    assert hot.mean() < 0.3


# -- the budget ------------------------------------------------------------------------------


class FakeClock:
    """A clock that advances a fixed step per model call."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_targets(count: int) -> list[saliency.Target]:
    out = []
    for i in range(count):
        prepared = np.zeros((1, 28, 28), np.float32)
        prepared[0, 4:10, 14:20] = 1.0  # the "lesion" the fake model sees
        out.append(saliency.Target(f"m:{i}", "m", 0, 0, prepared, (0, 56, 0, 56), (56, 56)))
    return out


def _fake_predictor(clock: FakeClock, step: float) -> saliency.Predictor:
    def predict(batch: np.ndarray) -> np.ndarray:
        clock.now += step
        return batch[:, 0, 4:10, 14:20].mean(axis=(1, 2))[:, None]  # lesion visible -> 1

    return predict


def test_occlusion_finds_the_fake_lesion_on_the_original_grid() -> None:
    clock = FakeClock()
    (m,) = saliency.occlusion_maps(
        _fake_targets(1), {"m": _fake_predictor(clock, 0.0)}, 10.0, clock=clock
    )
    assert m.stride == "fine" and m.heat.shape == (56, 56)  # box 2x the input
    r, c = m.hottest()
    assert 8 <= r < 20 and 28 <= c < 40  # the lesion (4:10, 14:20) at twice the size
    assert m.baseline == pytest.approx(1.0) and m.max_drop > 0.2


def test_budget_coarse_first_then_fine() -> None:
    targets = _fake_targets(3)
    coarse = len(saliency.occlusion_positions((28, 28), 2))
    fine = len(saliency.occlusion_positions((28, 28), 4))
    calls_coarse = 1 + -(-coarse // 32)  # baseline + batches of 32
    calls_fine = -(-fine // 32)
    # time for every coarse pass and the first fine one, not the second
    budget = 3 * calls_coarse + calls_fine + 0.5
    clock = FakeClock()
    maps = saliency.occlusion_maps(targets, {"m": _fake_predictor(clock, 1.0)}, budget, clock=clock)
    assert [m.key for m in maps] == ["m:0", "m:1", "m:2"]
    assert [m.stride for m in maps] == ["fine", "coarse", "coarse"]
    # a budget for one coarse pass and a half: the second finding gets no map
    clock = FakeClock()
    maps = saliency.occlusion_maps(
        targets, {"m": _fake_predictor(clock, 1.0)}, calls_coarse * 1.5, clock=clock
    )
    assert [m.key for m in maps] == ["m:0"]
    assert saliency.occlusion_maps(targets, {"m": _fake_predictor(clock, 1.0)}, 0.0) == []


def test_patch_sizes_and_positions_cover_the_input() -> None:
    assert saliency.patch_sizes(224) == [32, 56, 80]
    for divisor in (2, 4):
        cover = np.zeros((224, 224), int)
        for patch, r, c in saliency.occlusion_positions((224, 224), divisor):
            assert r + patch <= 224 and c + patch <= 224
            cover[r : r + patch, c : c + patch] += 1
        assert cover.min() >= 3  # every pixel hidden at least once per patch size


# -- the object --------------------------------------------------------------------------


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's errors; its warnings are printed (``pytest -s`` shows them)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture
def ct_sources(tmp_path: Path) -> Iterator[tuple[list[Dataset], Volume]]:
    phantom = generate_chest_ct(5_100_010, matrix=96, slices=8, nodule=True)
    datasets = phantom_to_datasets(
        phantom, seed=5_100_010, patient_name=CANARY_NAME, patient_id=CANARY_ID
    )
    volume = load_series(_write(datasets, tmp_path / "src"))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    yield [by_uid[u] for u in volume.sop_instance_uids], volume


def _caption() -> MapCaption:
    return MapCaption("Lung nodule", True, 0.97, CLS, "occlusion sensitivity, fine stride")


def test_map_object_is_valid_and_reads_back(
    ct_sources: tuple[list[Dataset], Volume], tmp_path: Path
) -> None:
    sources, volume = ct_sources
    k = 4
    heat = np.zeros(volume.pixels.shape[1:], np.float32)
    heat[40:56, 30:46] = 1.0
    ds = build_saliency_sc(
        sources[k],
        volume.pixels[k],
        heat,
        _caption(),
        "chest-ct-nodule-cls:1",
        "2.25",
        row_dir=volume.row_dir,
        col_dir=volume.col_dir,
    )
    again = build_saliency_sc(
        sources[k], volume.pixels[k], heat, _caption(), "chest-ct-nodule-cls:1", "2.25"
    )
    assert ds.SOPInstanceUID == again.SOPInstanceUID  # deterministic UIDs
    assert ds.StudyInstanceUID == sources[k].StudyInstanceUID
    assert ds.SeriesInstanceUID != sources[k].SeriesInstanceUID
    assert ds.SOPClassUID == SC_CLASS and ds.PhotometricInterpretation == "RGB"
    assert ds.Manufacturer == "pacs-ai" and ds.BurnedInAnnotation == "YES"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
    assert str(ds.PatientName) == CANARY_NAME
    assert "not for diagnosis" in ds.ImageComments
    path = tmp_path / "map.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = hd.imread(path)
    assert back.get_frame(1).shape[-1] == 3
    if have("dciodvfy"):
        assert _dciodvfy(path) == []


def test_render_puts_heat_on_the_region_and_text_in_its_band() -> None:
    grey = np.full((64, 64), -600.0, np.float32)
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 40:50] = 1.0
    rgb, zoom = render_saliency(grey, heat, ["Lung nodule: present", NOT_FOR_DIAGNOSIS], "CT")
    band = rgb.shape[0] - 64 * int(zoom)
    image = rgb[band:].astype(int)
    hot = image[int(15 * zoom), int(45 * zoom)]
    cold = image[int(50 * zoom), int(10 * zoom)]
    assert hot[0] > hot[2] + 60  # red over the hot region
    assert cold[0] == cold[1] == cold[2]  # grey elsewhere
    assert rgb[:band].any()  # the text band is drawn


def test_sr_lists_the_maps(ct_sources: tuple[list[Dataset], Volume], tmp_path: Path) -> None:
    sources, volume = ct_sources
    k = 4
    finding = Finding(
        CLS,
        "classification",
        NODULE,
        present=True,
        probability=0.97,
        key_sop_instance_uid=str(sources[k].SOPInstanceUID),
    )
    sr = build_sr([finding], sources, {}, "2.25")
    heat = np.zeros(volume.pixels.shape[1:], np.float32)
    heat[40:56, 30:46] = 1.0
    m = build_saliency_sc(sources[k], volume.pixels[k], heat, _caption(), "x:1", "2.25")
    with_map = reference_maps(sr, [m])
    assert with_map.SOPInstanceUID == sr.SOPInstanceUID
    assert "Image Library" not in str(sr.ContentSequence)  # the original is unchanged
    names = [item.ConceptNameCodeSequence[0].CodeMeaning for item in with_map.ContentSequence]
    assert names.index("Image Library") < names.index("Imaging Measurements")
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in with_map.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert str(m.SOPInstanceUID) in evidence
    path = tmp_path / "sr.dcm"
    with_map.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path)
    root = report.content[0]
    (library,) = [
        c
        for c in root.ContentSequence
        if c.ValueType == "CONTAINER" and c.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    referenced = [
        str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    ]
    assert referenced == [str(m.SOPInstanceUID)]
    if have("dciodvfy"):
        assert _dciodvfy(path) == []


# -- end to end -----------------------------------------------------------------------------


@needs_models
@pytest.mark.integration
@pytest.mark.skipif(not have("storescp"), reason="dcmtk storescp not installed")
def test_map_reaches_a_map_destination(node_factory: NodeFactory, tmp_path: Path) -> None:
    seed = 5_100_020
    phantom = generate_chest_ct(
        seed, matrix=128, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
    )
    datasets = phantom_to_datasets(
        phantom, shuffle=True, seed=seed, patient_name=CANARY_NAME, patient_id=CANARY_ID
    )
    study_uid = str(datasets[0].StudyInstanceUID)
    dest_port = free_port()
    node = node_factory(ort_threads=2, destinations=f"DEST@127.0.0.1:{dest_port}/sr+map")
    received = tmp_path / "received"

    def settled() -> list[dict[str, Any]] | None:
        rows = list(node.json("deliveries", "list"))
        kinds = {r["kind"] for r in rows}
        if "map" in kinds and all(r["status"] != "pending" for r in rows):
            return rows
        return None

    with storescp(dest_port, received):
        node.start("run")
        wait_for(lambda: port_open(node.port), 30, what="listener")
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([study_uid], "done", timeout=180)
        rows = wait_for(settled, 60, 0.5, what="deliveries settled")
        wait_for(lambda: len(list(received.iterdir())) >= len(rows), 20, what="files")
    assert {r["status"] for r in rows} == {"sent"}
    assert sorted(r["kind"] for r in rows) == ["map", "sr"]  # one classification finding
    files = {str(dcmread(f).SOPClassUID): f for f in received.iterdir()}
    assert set(files) == {SC_CLASS, SR_CLASS}
    m = dcmread(files[SC_CLASS])
    assert m.StudyInstanceUID == study_uid and m.Manufacturer == "pacs-ai"
    assert m.SeriesInstanceUID not in {str(ds.SeriesInstanceUID) for ds in datasets}
    sources = {str(ds.SOPInstanceUID): ds for ds in datasets}
    assert str(m.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources
    assert "SeriesNumber" in m and int(m.SeriesNumber) >= 9960
    if have("dciodvfy"):
        for path in files.values():
            assert _dciodvfy(path) == [], path.name
    sr = dcmread(files[SR_CLASS])
    assert str(m.SOPInstanceUID) in str(sr.ContentSequence)  # the SR lists the map
    (row,) = [r for r in rows if r["kind"] == "map"]
    assert row["sop_instance_uid"] == str(m.SOPInstanceUID)
