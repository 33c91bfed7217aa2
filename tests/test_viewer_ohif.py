"""What the radiologist sees: pacs-ai's results in OHIF 3.13 over Orthanc's DICOMweb.

Four studies go through a real node (models, SR, SEG, key image) into a private
Orthanc with the DICOMweb plugin, which OHIF (its prebuilt ``dist/``, served by
:mod:`tests.viewer`) reads in headless Chromium:

- one nodule: the SR opens without an error screen, on the nodule's slice, its
  outline drawn over the nodule (where the SR's region says, on the image it
  references) and labelled with diameter and volume; the reader answers "Yes" to
  OHIF's "track measurements?" and the measurement panel lists every finding
  with its values (the nodule with diameter and volume, a line across it, the
  lung volume, the classifier's finding and certainty); the SEG opens with its
  segments listed; the key image shows its text band with no cine player;
- no nodule, two nodules, and an endoscopy image (classifier only): the SR
  opens without an error screen, draws its findings, and once tracked the panel
  lists them with their values.

What the panel must list comes from the SR itself
(:func:`tests.test_results_objects.viewer_measurements`, OHIF's rules).
Screenshots go to ``test-output/viewer/`` for a person to look at.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from testkit.phantoms import (
    endoscopy_to_dataset,
    generate_chest_ct,
    generate_endoscopy_image,
    phantom_to_datasets,
)
from tests.conftest import REPO, NodeFactory, port_open, send_datasets, wait_for
from tests.test_results_objects import two_nodules, viewer_measurements
from tests.viewer import OrthancWeb, ViewerServer, chromium, ohif_dist, require_viewer, screenshot
from worker.pipeline.registry import DEMO_MODELS_DIR

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"),
]

SCREENSHOTS = REPO / "test-output" / "viewer"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
ERROR_TEXTS = ("Something went wrong", "Error Boundary", "Cannot read properties")


def _chest(seed: int, **shape: Any) -> list[Dataset]:
    base: dict[str, Any] = {"matrix": 128, "slices": 24, "thickness_mm": 2.5}
    base.update(shape)
    return list(phantom_to_datasets(generate_chest_ct(seed, **base), seed=seed))


def _studies() -> dict[str, list[Dataset]]:
    endoscopy = endoscopy_to_dataset(
        generate_endoscopy_image(5_000_044, lesion=True, size=(384, 384)), seed=5_000_044
    )
    return {
        "one-nodule": _chest(5_000_041, nodule=True, nodule_diameter_mm=16.0),
        "no-nodule": _chest(5_000_042, nodule=False, nodule_diameter_mm=None),
        "two-nodules": _chest(
            5_000_043,
            nodules=two_nodules(5_000_043, matrix=128, slices=24, thickness_mm=2.5),
        ),
        "endoscopy": [endoscopy],
    }


def _objects(orthanc: OrthancWeb, study_uid: str) -> dict[str, Dataset]:
    """Our SR, SEG and key image of a study, read back from Orthanc."""
    out: dict[str, Dataset] = {}
    for instance in orthanc.call("GET", f"/studies/{_orthanc_id(orthanc, study_uid)}/instances"):
        tags = orthanc.call("GET", f"/instances/{instance['ID']}/simplified-tags")
        if tags.get("Manufacturer") != "pacs-ai":
            continue
        raw = _raw(orthanc, f"/instances/{instance['ID']}/file")
        ds = dcmread(raw)
        out[{SR_CLASS: "sr", SEG_CLASS: "seg", SC_CLASS: "ki"}[str(ds.SOPClassUID)]] = ds
    return out


def _orthanc_id(orthanc: OrthancWeb, study_uid: str) -> str:
    (found,) = orthanc.call("POST", "/tools/lookup", study_uid.encode())
    return str(found["ID"])


def _raw(orthanc: OrthancWeb, path: str) -> Any:
    import http.client
    import io

    conn = http.client.HTTPConnection("127.0.0.1", orthanc.http_port, timeout=60)
    try:
        conn.request("GET", path)
        return io.BytesIO(conn.getresponse().read())
    finally:
        conn.close()


def _first_region(sr: Dataset) -> tuple[str, list[float], str]:
    """The first measurement group's region: its image, its points, its label."""
    (imaging,) = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    group = imaging.ContentSequence[0]
    (scoord,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
    (tracking,) = [
        i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112039"
    ]
    uid = str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return uid, [float(v) for v in scoord.GraphicData], str(tracking.TextValue)


# -- the browser side ---------------------------------------------------------------------


class Viewer:
    def __init__(self, driver: Any, base: str) -> None:
        self.driver = driver
        self.base = base
        # OHIF's first-visit tour would cover the viewport: mark it as shown
        driver.get(f"{base}/manifest.json")
        driver.execute_script("localStorage.setItem('shownTours', '[\"basicViewerTour\"]');")

    def open(self, study_uid: str, series_uid: str) -> None:
        self.driver.get(
            f"{self.base}/viewer?StudyInstanceUIDs={study_uid}"
            f"&initialSeriesInstanceUID={series_uid}"
        )

    def click_text(self, text: str) -> bool:
        from selenium.webdriver.common.by import By

        for button in self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{text}']"):
            if button.is_displayed():
                button.click()
                return True
        return False

    def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        return "\n".join(
            e.get_attribute("textContent") or ""
            for e in self.driver.find_elements(By.CSS_SELECTOR, css)
        )

    def errors(self) -> list[str]:
        """The error screen or an exception OHIF caught (its error boundary logs it)."""
        found = [t for t in ERROR_TEXTS if t in self.text("body")]
        for entry in self.driver.get_log("browser"):
            message = str(entry.get("message", ""))
            if any(t in message for t in ERROR_TEXTS):
                found.append(message[:300])
        return found

    def wait_drawn(self, *labels: str, timeout: float = 90) -> str:
        """The viewport's annotation text once every label is drawn."""

        def drawn() -> str | None:
            errors = self.errors()
            assert not errors, errors
            text = self.text("[data-cy=viewport-pane] svg text")
            return text if all(label in text for label in labels) else None

        return str(wait_for(drawn, timeout, 0.5, what=f"OHIF to draw {labels}"))

    def track(self) -> None:
        """Answer "Yes" to OHIF's "continue tracking measurements?" for the SR."""
        from selenium.webdriver.common.by import By

        def prompt() -> Any:
            errors = self.errors()
            assert not errors, errors
            found = self.driver.find_elements(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]")
            return found[0] if found and found[0].is_displayed() else None

        wait_for(prompt, 60, 0.5, what="OHIF to offer tracking the SR").click()

    def panel(self, count: int, timeout: float = 60) -> list[str]:
        """The measurement panel's rows (their text) once it lists ``count``."""
        from selenium.webdriver.common.by import By

        def rows() -> list[str] | None:
            errors = self.errors()
            assert not errors, errors
            for tab in self.driver.find_elements(
                By.CSS_SELECTOR, "[data-cy=trackedMeasurements-btn]"
            ):
                if tab.is_displayed() and not self.driver.find_elements(
                    By.CSS_SELECTOR, "[data-cy^=measurement-table-row]"
                ):
                    tab.click()
            found = [
                str(e.get_attribute("innerText") or "")
                for e in self.driver.find_elements(
                    By.CSS_SELECTOR, "[data-cy^=measurement-table-row]"
                )
            ]
            return found if len(found) >= count else None

        return list(wait_for(rows, timeout, 0.5, what=f"{count} measurements listed"))

    def select(self, index: int) -> None:
        """Click the ``index``-th row of the panel: OHIF shows its measurement."""
        from selenium.webdriver.common.by import By

        row = self.driver.find_elements(By.CSS_SELECTOR, "[data-cy^=measurement-table-row]")[index]
        row.find_element(By.CSS_SELECTOR, "[data-cy=data-row]").click()

    def lines(self) -> list[dict[str, float]]:
        """The SVG lines drawn in the viewport (page coordinates of their ends)."""
        return list(
            self.driver.execute_script(
                """
                return [...document.querySelectorAll('[data-cy=viewport-pane] svg line')]
                  .map(e => {
                    const m = e.getScreenCTM();
                    const p = (x, y) => new DOMPoint(x, y).matrixTransform(m);
                    const a = p(e.x1.baseVal.value, e.y1.baseVal.value);
                    const b = p(e.x2.baseVal.value, e.y2.baseVal.value);
                    return {x1: a.x, y1: a.y, x2: b.x, y2: b.y};
                  });
                """
            )
        )

    def polylines(self) -> list[dict[str, float]]:
        """The SVG polylines drawn in the viewport (page coordinates)."""
        return list(
            self.driver.execute_script(
                """
                return [...document.querySelectorAll('[data-cy=viewport-pane] svg polyline')]
                  .map(e => e.getBoundingClientRect())
                  .filter(b => b.width > 2 && b.height > 2)
                  .map(b => ({x: b.x + b.width / 2, y: b.y + b.height / 2,
                              w: b.width, h: b.height}));
                """
            )
        )

    def to_page(self, x: float, y: float) -> tuple[str, float, float]:
        """The displayed image's id and where its pixel point (column, row) is on the page."""
        imageId, px, py = self.driver.execute_script(
            """
            const cs = window.cornerstone;
            const vp = cs.getEnabledElements()[0].viewport;
            const imageId = vp.getCurrentImageId();
            const world = cs.utilities.imageToWorldCoords(imageId, [arguments[0], arguments[1]]);
            const c = vp.worldToCanvas(world);
            const r = vp.canvas.getBoundingClientRect();
            return [imageId, r.left + c[0], r.top + c[1]];
            """,
            x,
            y,
        )
        return str(imageId), float(px), float(py)


def _shot(viewer: Viewer, name: str) -> Path:
    time.sleep(1.0)  # let the last frame render
    return screenshot(viewer.driver, SCREENSHOTS / f"{name}.png")


# -- the test ------------------------------------------------------------------------------


def test_results_in_ohif(node_factory: NodeFactory, tmp_path: Path) -> None:
    require_viewer()
    studies = _studies()
    orthanc = OrthancWeb(tmp_path / "orthanc")
    orthanc.start()
    try:
        node = node_factory(
            ort_threads=2,
            destinations=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}/sr+seg+ki",
        )
        for datasets in studies.values():
            orthanc.upload(datasets)
        node.start("run")
        wait_for(lambda: port_open(node.port), 90, what="listener")
        uids = {name: str(ds[0].StudyInstanceUID) for name, ds in studies.items()}
        for datasets in studies.values():
            assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs(list(uids.values()), "done", timeout=240)

        def delivered() -> bool:
            rows = list(node.json("deliveries", "list"))
            return bool(rows) and all(r["status"] == "sent" for r in rows) and len(rows) >= 10

        wait_for(delivered, 60, 0.5, what="results in Orthanc")
        objects = {name: _objects(orthanc, uid) for name, uid in uids.items()}
        assert set(objects["one-nodule"]) == {"sr", "seg", "ki"}
        assert set(objects["endoscopy"]) == {"sr"}

        with (
            ViewerServer(ohif_dist(), orthanc.http_port) as web,
            chromium(tmp_path / "chromium-profile") as driver,
        ):
            viewer = Viewer(driver, web.base)
            _one_nodule(viewer, uids["one-nodule"], objects["one-nodule"])
            _two_nodules(viewer, uids["two-nodules"], objects["two-nodules"]["sr"])
            for name, drawn in (("no-nodule", "Volume"), ("endoscopy", "Certainty of Finding")):
                _other(viewer, uids[name], objects[name]["sr"], name, drawn)
    finally:
        orthanc.stop()


def _tracked(viewer: Viewer, sr: Dataset, name: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The reader tracks the open SR: OHIF's measurement panel lists each finding
    the SR draws, by its name with its values; a line shows its length."""
    expected = viewer_measurements(sr)
    assert expected
    viewer.track()
    rows = viewer.panel(len(expected))
    _shot(viewer, f"{name}-sr-panel")
    assert len(rows) == len(expected), rows
    for m in expected:
        (row,) = [r for r in rows if m["label"] in r]
        if m["tool"] == "Length":
            shown = [float(v) for v in re.findall(r"^([0-9.]+) mm$", row, re.M)]
            assert shown and abs(shown[0] - m["value"]) < 0.06, (row, m["value"])
    assert not viewer.errors()
    return expected, rows


def _one_nodule(viewer: Viewer, study_uid: str, objects: dict[str, Dataset]) -> None:
    sr, seg, ki = objects["sr"], objects["seg"], objects["ki"]
    # the SR: drawn on the nodule's slice, over the nodule, labelled
    uid, points, label = _first_region(sr)
    assert ":Lung nodule 1 of 1 " in label
    viewer.open(study_uid, str(sr.SeriesInstanceUID))
    text = viewer.wait_drawn("Diameter", "Volume")
    assert "mm" in text and "cm3" in text
    xs, ys = points[0::2], points[1::2]
    image_id, px, py = viewer.to_page((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
    assert uid in image_id  # the slice the SR references, where the nodule is largest
    nearest = min(viewer.polylines(), key=lambda b: (b["x"] - px) ** 2 + (b["y"] - py) ** 2)
    tolerance = max(6.0, 0.25 * max(nearest["w"], nearest["h"]))
    assert abs(nearest["x"] - px) < tolerance and abs(nearest["y"] - py) < tolerance
    _shot(viewer, "one-nodule-sr")

    # tracked: every finding listed with its values (nodule, lungs, classifier)
    expected, rows = _tracked(viewer, sr, "one-nodule")
    labels = [m["label"] for m in expected]
    assert [m["tool"] for m in expected].count("Length") == 1
    assert any(t.startswith("Lung nodule 1 of 1: diameter ") and "cm3" in t for t in labels)
    assert any(t.startswith("Lung: volume ") for t in labels)
    assert any("probability" in t and "chest-ct-nodule-cls" in t for t in labels)
    # the nodule's line: on its slice, across it, as long as its diameter
    (line,) = [m for m in expected if m["tool"] == "Length"]
    assert line["image"] == uid
    viewer.select([i for i, r in enumerate(rows) if line["label"] in r][0])

    def drawn() -> bool:
        (image_id, ax, ay), (_, bx, by) = (viewer.to_page(*p) for p in line["points"])
        if uid not in image_id:
            return False
        return any(
            min(
                abs(d["x1"] - ax) + abs(d["y1"] - ay) + abs(d["x2"] - bx) + abs(d["y2"] - by),
                abs(d["x1"] - bx) + abs(d["y1"] - by) + abs(d["x2"] - ax) + abs(d["y2"] - ay),
            )
            < 8.0
            for d in viewer.lines()
        )

    wait_for(drawn, 30, 0.5, what="the nodule's line")
    centre = line["points"].mean(axis=0)
    assert min(xs) < centre[0] < max(xs) and min(ys) < centre[1] < max(ys)
    _shot(viewer, "one-nodule-sr-tracked")
    assert not viewer.errors()

    # the SEG: OHIF offers to open it and lists its segments
    viewer.open(study_uid, str(seg.SeriesInstanceUID))
    wait_for(lambda: viewer.click_text("Yes"), 90, 0.5, "OHIF to offer the SEG")

    def segments() -> str | None:
        for tab in viewer.driver.find_elements("css selector", "[data-cy=panelSegmentation-btn]"):
            if tab.is_displayed():
                tab.click()
        text = viewer.text("body")
        return text if "Lung nodule" in text and "Lung" in text else None

    try:
        wait_for(segments, 60, 0.5, what="SEG segments listed")
    finally:
        _shot(viewer, "one-nodule-seg")
    assert not viewer.errors()

    # the key image: one frame, no cine player over its text band
    viewer.open(study_uid, str(ki.SeriesInstanceUID))
    wait_for(
        lambda: "1/1" in viewer.text("[data-cy=viewport-overlay-bottom-right]"),
        90,
        0.5,
        "key image",
    )
    _shot(viewer, "one-nodule-key-image")
    assert "FPS" not in viewer.text("[data-cy=viewport-pane]")  # no cine player
    assert int(ki.get("NumberOfFrames", 1)) == 1
    assert not viewer.errors()


def _two_nodules(viewer: Viewer, study_uid: str, sr: Dataset) -> None:
    viewer.open(study_uid, str(sr.SeriesInstanceUID))
    viewer.wait_drawn("Diameter", "Volume")
    _uid, _points, label = _first_region(sr)
    assert ":Lung nodule 1 of " in label
    _shot(viewer, "two-nodules-sr")
    expected, _rows = _tracked(viewer, sr, "two-nodules")
    nodules = [m["label"] for m in expected if m["tool"] == "Length"]
    assert len(nodules) == 2 and all(" of 2: diameter " in t for t in nodules)


def _other(viewer: Viewer, study_uid: str, sr: Dataset, name: str, drawn: str) -> None:
    """No nodule, endoscopy: the SR opens, draws, and its findings are listed."""
    viewer.open(study_uid, str(sr.SeriesInstanceUID))
    viewer.wait_drawn(drawn)
    _shot(viewer, f"{name}-sr")
    expected, _rows = _tracked(viewer, sr, name)
    labels = [m["label"] for m in expected]
    assert not [m for m in expected if m["tool"] == "Length"]
    assert any("probability" in t for t in labels)
    if name == "no-nodule":
        assert any(t.startswith("Lung: volume ") for t in labels)
