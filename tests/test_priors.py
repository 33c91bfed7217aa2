"""Priors (issue 13, done-when 1 and 2): a nodule result compared with the same
patient's earlier study.

- the comparison itself: change, volume doubling time, nodule matching;
- stored out of order: a prior processed after its follow-up reaches the
  follow-up's stored result;
- two chest CT phantoms of one patient 180 days apart, the nodule grown from
  14 to 24 mm, through a real node: the second study's result carries the
  prior's volume, the change and the doubling time within 25 % of the truth;
  another patient's study has ``prior: null``;
- ``PACS_AI_PRIORS=pacs``: Orthanc holds the older study, which pacs-ai never
  received; pacs-ai finds it (C-FIND), fetches it (C-MOVE to its own AE),
  processes it and compares the new study with it.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest

from testkit.phantoms import Nodule, Phantom, generate_chest_ct, phantom_to_datasets
from tests.conftest import (
    Node,
    NodeFactory,
    Orthanc,
    add_processed_study,
    db_rows,
    dciodvfy_errors,
    free_port,
    have,
    needs_demo_models,
    send_datasets,
    wait_for,
)
from worker.results.priors import MATCH_MM, compare, match_nodule

SEG_MODEL = "chest-ct-lung-seg"
FIRST, SECOND = dt.date(2025, 1, 1), dt.date(2025, 6, 30)  # 180 days apart


# -- the comparison --------------------------------------------------------------------


def _comp(volume: float, centroid: tuple[float, float, float] | None = None) -> dict[str, Any]:
    return {"volume_ml": volume, "max_diameter_mm": 10.0, "centroid_mm": centroid}


def test_change_and_doubling_time() -> None:
    grown = compare(
        {"components": [_comp(2.0)]}, SECOND, {"components": [_comp(1.0)]}, FIRST, "1.2.3"
    )
    assert grown == {
        "study_instance_uid": "1.2.3",
        "study_date": "2025-01-01",
        "volume_ml": 1.0,
        "change_percent": 100.0,
        "doubling_time_days": 180.0,  # doubled in 180 days
        "interval_days": 180,
        "matched_by": "largest",
    }
    shrunk = compare({"components": [_comp(0.5)]}, SECOND, {"components": [_comp(1.0)]}, FIRST, "")
    assert shrunk["change_percent"] == -50.0 and shrunk["doubling_time_days"] is None
    same = compare({"components": [_comp(1.0)]}, SECOND, {"components": [_comp(1.0)]}, FIRST, "")
    assert same["change_percent"] == 0.0 and same["doubling_time_days"] is None
    new = compare({"components": [_comp(1.0)]}, SECOND, {"components": []}, FIRST, "")
    assert new["volume_ml"] == 0.0 and new["change_percent"] is None
    assert new["doubling_time_days"] is None and new["matched_by"] is None
    gone = compare({"components": []}, SECOND, {"components": [_comp(1.0)]}, FIRST, "")
    assert gone["change_percent"] == -100.0 and gone["doubling_time_days"] is None


def test_nodules_matched_by_nearest_centroid() -> None:
    current = _comp(1.0, (10.0, 0.0, 0.0))
    big_far = _comp(3.0, (-80.0, 0.0, 0.0))
    small_near = _comp(0.4, (12.0, 3.0, -2.0))
    assert match_nodule(current, [big_far, small_near]) == (small_near, "centroid")
    # nothing within MATCH_MM: the prior's largest
    far = _comp(0.4, (10.0 + MATCH_MM + 1, 0.0, 0.0))
    assert match_nodule(current, [big_far, far]) == (big_far, "largest")
    # one prior nodule, or no coordinates: the prior's largest
    assert match_nodule(current, [big_far]) == (big_far, "largest")
    assert match_nodule(_comp(1.0), [small_near, big_far]) == (big_far, "largest")
    assert match_nodule(current, []) == (None, None)


# -- out of order, on the database alone ------------------------------------------------------


def test_prior_stored_after_its_follow_up_is_caught_up(tmp_path: Path) -> None:
    from db.migrate import upgrade
    from db.models import Result, Study
    from db.session import dispose_all, session_scope
    from worker.results.priors import attach_priors
    from worker.settings import load_settings

    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    settings = load_settings(data_dir=tmp_path, database_url=url)

    def study(uid: str, patient: str | None, date: dt.date, volume: float) -> tuple[int, Any]:
        study_id, (nodule,) = add_processed_study(url, uid, patient, date, [volume])
        return study_id, nodule

    def stored(uid: str) -> Any:
        with session_scope(url) as session:
            return (
                session.query(Result.measurements)
                .join(Study, Study.id == Result.study_id)
                .filter(Study.study_instance_uid == uid, Result.finding == "Lung nodule")
                .filter(Result.kind == "segmentation")
                .scalar()
                .get("prior", "missing")
            )

    # the follow-up first: nothing to compare with yet
    late_id, late = study("1.2.3.2", "p" * 64, SECOND, 2.0)
    attach_priors(settings, late_id, [late])
    assert late["measurements"]["prior"] is None and stored("1.2.3.2") is None
    # then its prior: the follow-up's stored result is compared now
    early_id, early = study("1.2.3.1", "p" * 64, FIRST, 1.0)
    attach_priors(settings, early_id, [early])
    assert early["measurements"]["prior"] is None
    caught_up = stored("1.2.3.2")
    assert caught_up["study_instance_uid"] == "1.2.3.1"
    assert caught_up["doubling_time_days"] == 180.0
    # another patient, and a study without a patient key: no prior
    other_id, other = study("1.2.3.3", "q" * 64, SECOND, 1.0)
    attach_priors(settings, other_id, [other])
    anonymous_id, anonymous = study("1.2.3.4", None, SECOND, 1.0)
    attach_priors(settings, anonymous_id, [anonymous])
    assert stored("1.2.3.3") is None and stored("1.2.3.4") is None
    # off: nothing is added
    off = load_settings(data_dir=tmp_path, database_url=url, priors="off")
    again_id, again = study("1.2.3.5", "p" * 64, SECOND + dt.timedelta(days=1), 3.0)
    attach_priors(off, again_id, [again])
    assert "prior" not in again["measurements"] and stored("1.2.3.5") == "missing"
    dispose_all()


# -- through a real node ------------------------------------------------------------------


def _pair(seed: int, matrix: int, slices: int) -> tuple[Phantom, Phantom]:
    """One patient's chest CT before and after its nodule grew from 14 to 24 mm
    (the same anatomy: same seed, the nodule at the same place)."""
    common: dict[str, Any] = dict(matrix=matrix, slices=slices, thickness_mm=2.5, noise_sigma=10.0)
    placed = generate_chest_ct(seed, nodule_diameter_mm=24.0, **common).geometry.nodules[0]
    before, after = (
        generate_chest_ct(seed, nodules=[Nodule(placed.center, d, placed.lung)], **common)
        for d in (14.0, 24.0)
    )
    return before, after


def _datasets(phantom: Phantom, patient_id: str, date: dt.date, seed: int) -> list[Any]:
    return phantom_to_datasets(
        phantom, seed=seed, patient_id=patient_id, date=date.strftime("%Y%m%d")
    )


def _nodule(node: Node, study_uid: str) -> dict[str, Any]:
    rows = node.json("results", "list", "--study", study_uid, "--model", SEG_MODEL)
    (found,) = [r for r in rows if "components" in r["measurements"]]
    return dict(found["measurements"])


def _truth(before: Phantom, after: Phantom) -> dict[str, float]:
    v0, v = before.truth["nodule_volume_ml"], after.truth["nodule_volume_ml"]
    return {
        "volume_ml": v0,
        "change_percent": 100.0 * (v - v0) / v0,
        "doubling_time_days": 180 * math.log(2) / math.log(v / v0),
    }


def _sr_priors(path: Path) -> dict[str, Any]:
    """The prior comparison's items in an SR file: concept meaning -> value."""
    from pydicom import dcmread

    found: dict[str, Any] = {}

    def walk(items: Any) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if name is not None and name.CodingSchemeDesignator == "99PACSAI":
                found[str(name.CodeMeaning)] = float(item.MeasuredValueSequence[0].NumericValue)
                for sub in item.get("ContentSequence", []):
                    if sub.ValueType == "UIDREF":
                        found["study_instance_uid"] = str(sub.UID)
                    if sub.ValueType == "DATE":
                        found["study_date"] = str(sub.Date)
            walk(item.get("ContentSequence", []))

    walk(dcmread(path).ContentSequence)
    return found


@pytest.mark.integration
@needs_demo_models
def test_follow_up_carries_its_prior(node_factory: NodeFactory, tmp_path: Path) -> None:
    from tests.dicom_peers import storescp

    before, after = _pair(7_003, 256, 60)
    old = _datasets(before, "PRIOR-PATIENT-1", FIRST, 1)
    new = _datasets(after, "PRIOR-PATIENT-1", SECOND, 2)
    other = _datasets(after, "ANOTHER-PATIENT-2", SECOND, 3)
    port = free_port()
    received = tmp_path / "received"
    node = node_factory(ort_threads=2, destinations=f"DEST@127.0.0.1:{port}/sr")
    with storescp(port, received):
        _follow_up(node, old, new, other, before, after, received)


def _follow_up(
    node: Node,
    old: list[Any],
    new: list[Any],
    other: list[Any],
    before: Phantom,
    after: Phantom,
    received: Path,
) -> None:
    node.start_run()
    for datasets in (old, new, other):  # one at a time: each is the latest when processed
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([str(datasets[0].StudyInstanceUID)], "done", timeout=300)

    first = _nodule(node, str(old[0].StudyInstanceUID))
    assert first["prior"] is None  # the patient's first study
    prior = _nodule(node, str(new[0].StudyInstanceUID))["prior"]
    assert prior["study_instance_uid"] == str(old[0].StudyInstanceUID)
    assert prior["study_date"] == "2025-01-01" and prior["interval_days"] == 180
    assert prior["matched_by"] == "largest"  # one nodule in the prior
    truth = _truth(before, after)
    for key, value in truth.items():
        assert prior[key] == pytest.approx(value, rel=0.25), (key, prior)
    assert _nodule(node, str(other[0].StudyInstanceUID))["prior"] is None

    # the SR carries the same, with the prior study's UID and date; dciodvfy: 0 errors
    new_uid = str(new[0].StudyInstanceUID)

    def sr_file() -> Path | None:
        sent = [
            d
            for d in node.deliveries("--study", new_uid)
            if d["kind"] == "sr" and d["status"] == "sent"
        ]
        if not sent:
            return None
        return next(iter(received.glob(f"*{sent[0]['sop_instance_uid']}*")), None)

    sr_path = wait_for(sr_file, 120, 0.5, what="the follow-up's SR")
    in_sr = _sr_priors(sr_path)
    assert in_sr["study_instance_uid"] == str(old[0].StudyInstanceUID)
    assert in_sr["study_date"] == "20250101"
    assert in_sr["Nodule volume in prior study"] == pytest.approx(prior["volume_ml"], abs=1e-3)
    assert in_sr["Nodule volume change since prior study"] == prior["change_percent"]
    assert in_sr["Nodule volume doubling time"] == prior["doubling_time_days"]
    assert in_sr["Interval since prior study"] == 180
    if have("dciodvfy"):
        errors = dciodvfy_errors(sr_path)
        assert not errors, errors


# -- PACS_AI_PRIORS=pacs: the prior is on the PACS only -----------------------------------


@pytest.fixture
def pacs_node(node_factory: NodeFactory, orthanc_server: Orthanc) -> tuple[Orthanc, Node]:
    node = node_factory(
        ort_threads=2,
        priors="pacs",
        pacs=f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}",
        destinations=f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}/sr",
        prior_wait_seconds=240,
    )
    orthanc_server.start(node.port, Name="pacs-ai-priors")
    return orthanc_server, node


@pytest.mark.integration
@needs_demo_models
def test_prior_fetched_from_the_pacs(pacs_node: tuple[Orthanc, Node]) -> None:
    orthanc, node = pacs_node
    before, after = _pair(7_002, 128, 40)
    old = _datasets(before, "PACS-PRIOR-7", FIRST, 11)
    new = _datasets(after, "PACS-PRIOR-7", SECOND, 12)
    old_uid, new_uid = str(old[0].StudyInstanceUID), str(new[0].StudyInstanceUID)
    orthanc.upload(old)  # on the PACS only: pacs-ai never received it
    node.start_run()
    assert set(send_datasets(node.port, new)) == {0}
    node.wait_jobs([new_uid], "done", timeout=420)

    # the prior was fetched, processed (in the new study's job) and compared
    studies = {s["study_instance_uid"]: s for s in node.studies()}
    assert studies[old_uid]["num_instances"] == len(old)
    assert studies[old_uid]["status"] == "done"
    (prior_of,) = db_rows(
        node, "SELECT prior_of FROM studies WHERE study_instance_uid = :u", u=old_uid
    )
    assert prior_of == (new_uid,)
    assert _nodule(node, old_uid)["prior"] is None  # its own prior is looked up locally only
    prior = _nodule(node, new_uid)["prior"]
    assert prior is not None and prior["study_instance_uid"] == old_uid
    assert prior["interval_days"] == 180
    truth = _truth(before, after)
    assert prior["volume_ml"] == pytest.approx(truth["volume_ml"], rel=0.35)
    assert prior["change_percent"] > 100 and prior["doubling_time_days"] is not None
    assert "PACS-PRIOR-7" not in node.logs()
    # the new study's SR goes back to the PACS; nothing is written into the prior
    sent = wait_for(
        lambda: [d for d in node.deliveries() if d["status"] == "sent"], 60, what="the SR sent"
    )
    assert {d["study_instance_uid"] for d in node.deliveries()} == {new_uid}
    assert [d["kind"] for d in sent] == ["sr"]
    assert "is a prior fetched for" in node.logs()
