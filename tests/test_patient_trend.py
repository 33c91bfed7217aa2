"""The nodule trend per patient, by its handle (no identifiers): a study's
``patient`` (the keyed patient hash's first 16 hex digits), ``pacs-ai patients
trend``, ``GET /api/patients/{patient}/trend`` and the dashboard's panel, on a
real SQLite database whose priors were compared by :func:`attach_priors`."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from db.migrate import upgrade
from db.session import dispose_all, session_scope
from tests.conftest import add_processed_study, free_port, wait_for
from worker.admin.api import create_app
from worker.results.priors import attach_priors, largest_volume_ml
from worker.services.patients import patient_trend
from worker.settings import Settings

ADMIN = "trend-admin-token-0123456789"
READER = "trend-read-token-0123456789"
SEG_MODEL = "chest-ct-lung-seg"


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


#: patient keys as the listener stores them (HMAC-SHA256 hex); two share 8 digits
ALICE, BOB = _key("patient-a"), _key("patient-b")
TWIN_1, TWIN_2 = "0badcafe" + "1" * 56, "0badcafe" + "2" * 56
#: (uid, patient key, StudyDate, nodule volumes), inserted in this (not date) order
STUDIES: list[tuple[str, str | None, dt.date | None, list[float]]] = [
    ("1.2.9.2", ALICE, dt.date(2025, 4, 1), [2.0, 0.5]),
    ("1.2.9.1", ALICE, dt.date(2025, 1, 1), [1.0]),
    ("1.2.9.3", ALICE, dt.date(2025, 9, 28), [1.5]),
    ("1.2.9.4", BOB, dt.date(2025, 2, 1), [3.0]),
    ("1.2.9.5", None, dt.date(2025, 2, 1), [4.0]),
    ("1.2.9.6", TWIN_1, dt.date(2025, 3, 1), [0.7]),
    ("1.2.9.7", TWIN_2, dt.date(2025, 3, 1), [0.8]),
]
ALICE_ORDER = ["1.2.9.1", "1.2.9.2", "1.2.9.3"]


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        data_dir=tmp_path / "data",
        api_token=ADMIN,
        api_read_tokens=READER,
        models_dir=tmp_path / "no-models",
        broker_url="memory://",
    )
    url = settings.effective_database_url
    upgrade(url)
    for uid, patient, date, volumes in STUDIES:
        study_id, nodules = add_processed_study(url, uid, patient, date, volumes)
        attach_priors(settings, study_id, nodules)  # as the pipeline does after each job
    yield settings
    dispose_all()


def _stored_priors(settings: Settings) -> dict[str, Any]:
    """``measurements.prior`` of each study's stored nodule result, by study UID."""
    from db.queries import list_results

    with session_scope(settings.effective_database_url) as session:
        rows = list_results(session, model=SEG_MODEL, finding="Lung nodule")
    return {r["study_instance_uid"]: r["measurements"] for r in rows}


# -- the service ------------------------------------------------------------------------


def test_trend_of_one_patient_in_date_order(settings: Settings) -> None:
    trend = patient_trend(settings, ALICE[:16])
    assert trend["patient"] == ALICE[:16]
    assert [s["study_instance_uid"] for s in trend["studies"]] == ALICE_ORDER
    assert [s["study_date"] for s in trend["studies"]] == ["2025-01-01", "2025-04-01", "2025-09-28"]
    stored = _stored_priors(settings)
    for study in trend["studies"]:
        # one finding each: the nodule result (not the lung's, nor the classification)
        (finding,) = study["findings"]
        measurements = stored[study["study_instance_uid"]]
        prior = measurements["prior"] or {}
        assert finding == {
            "model": SEG_MODEL,
            "finding": "Lung nodule",
            "volume_ml": largest_volume_ml(measurements),
            "change_percent": prior.get("change_percent"),
            "doubling_time_days": prior.get("doubling_time_days"),
            "prior_study_instance_uid": prior.get("study_instance_uid"),
        }
    first, second, third = (s["findings"][0] for s in trend["studies"])
    assert [first["volume_ml"], second["volume_ml"], third["volume_ml"]] == [1.0, 2.0, 1.5]
    assert first["change_percent"] is None and first["prior_study_instance_uid"] is None
    # doubled in 90 days; then shrank by a quarter (no doubling time)
    assert second["change_percent"] == 100.0 and second["doubling_time_days"] == 90.0
    assert second["prior_study_instance_uid"] == "1.2.9.1"
    assert third["change_percent"] == -25.0 and third["doubling_time_days"] is None
    assert third["prior_study_instance_uid"] == "1.2.9.2"
    # the whole key, or 8 digits, name the same patient; another patient is apart
    assert patient_trend(settings, ALICE) == trend == patient_trend(settings, ALICE[:8])
    bob = patient_trend(settings, BOB[:16])
    assert [s["study_instance_uid"] for s in bob["studies"]] == ["1.2.9.4"]
    assert bob["studies"][0]["findings"][0]["change_percent"] is None


@pytest.mark.parametrize(
    "handle",
    ["", "0badcaf", ALICE[:16].upper(), "patient-a", "1234567g", ALICE + "0", "../trend"],
)
def test_malformed_handle_refused(settings: Settings, handle: str) -> None:
    with pytest.raises(ValueError, match="8 to 64 lowercase hex") as err:
        patient_trend(settings, handle)
    assert not handle or handle not in str(err.value)  # never repeated


def test_unknown_and_ambiguous_handles(settings: Settings) -> None:
    with pytest.raises(LookupError, match="no study has this patient handle"):
        patient_trend(settings, "0123456789abcdef")
    with pytest.raises(ValueError, match="ambiguous"):
        patient_trend(settings, "0badcafe")  # the first 8 digits of two patients
    assert patient_trend(settings, TWIN_1[:9])["patient"] == TWIN_1[:16]


# -- the API and its audit records ----------------------------------------------------------


def test_api_trend_for_a_read_only_token(settings: Settings) -> None:
    from db.queries import list_audit

    read = {"Authorization": f"Bearer {READER}"}
    handle = ALICE[:16]
    path = f"/api/patients/{handle}/trend"
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        studies = client.get("/api/studies", headers=read)
        assert studies.status_code == 200
        patients = {s["study_instance_uid"]: s["patient"] for s in studies.json()["items"]}
        assert patients == {uid: key[:16] if key else None for uid, key, _d, _v in STUDIES}
        assert all("identifiers" not in s for s in studies.json()["items"])
        answer = client.get(path, headers=read)
        assert answer.status_code == 200, answer.text
        assert answer.json() == patient_trend(settings, handle)
        assert client.get(path).status_code == 401
        bad = client.get("/api/patients/NOT-A-HANDLE/trend", headers=read)
        assert bad.status_code == 400 and "lowercase hex" in bad.json()["detail"]
        unknown = client.get("/api/patients/0123456789abcdef/trend", headers=read)
        assert unknown.status_code == 404
        ambiguous = client.get("/api/patients/0badcafe/trend", headers=read)
        assert ambiguous.status_code == 400 and "ambiguous" in ambiguous.json()["detail"]
        # the handle only: a whole patient key is never in an answer
        for body in (studies.text, answer.text):
            assert not any(key in body for key in (ALICE, BOB, TWIN_1, TWIN_2))

    with session_scope(settings.effective_database_url) as session:
        records = list(reversed(list_audit(session)))
    trend_records = [r for r in records if r["action"] == "GET /api/patients/{patient}/trend"]
    assert [(r["actor"], r["outcome"]) for r in trend_records] == [
        ("read#0", 200),
        ("anonymous", 401),
        ("read#0", 400),
        ("read#0", 404),
        ("read#0", 400),
    ]
    assert trend_records[0]["studies"] == ALICE_ORDER  # the studies it answered about
    assert all(not r["studies"] for r in trend_records[1:])
    assert not any(handle in json.dumps(r) for r in records)  # never the handle's value


# -- the CLI -----------------------------------------------------------------------------------


def _cli(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
) -> tuple[int, str, str]:
    from worker.cli.main import main

    for name in [n for n in os.environ if n.startswith("PACS_AI_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PACS_AI_DATA_DIR", str(settings.data_dir))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trend(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from db.queries import list_audit

    handle = ALICE[:16]
    code, out, err = _cli(settings, monkeypatch, capsys, "patients", "trend", handle, "--json")
    assert code == 0, err
    assert json.loads(out) == patient_trend(settings, handle)

    code, out, _err = _cli(settings, monkeypatch, capsys, "patients", "trend", handle)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"patient {handle}: 3 studies"
    assert lines[1].split() == [
        "study_date",
        "study_instance_uid",
        "model",
        "finding",
        "volume_ml",
        "change_percent",
        "doubling_time_days",
    ]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["2025-01-01", "1.2.9.1"],
        ["2025-04-01", "1.2.9.2"],
        ["2025-09-28", "1.2.9.3"],
    ]
    assert lines[3].split()[-3:] == ["2.0", "100.0", "90.0"]
    assert lines[4].split()[-3:] == ["1.5", "-25.0", "-"]

    for argv, message in [
        (("patients", "trend", "Alice"), "8 to 64 lowercase hex digits"),
        (("patients", "trend", "0123456789abcdef"), "no study has this patient handle"),
        (("patients", "trend", "0badcafe", "--json"), "ambiguous"),
    ]:
        code, out, err = _cli(settings, monkeypatch, capsys, *argv)
        assert code == 1 and not out
        assert err.startswith("pacs-ai: ") and message in err and err.count("\n") == 1

    with session_scope(settings.effective_database_url) as session:
        cli = [r for r in reversed(list_audit(session)) if r["interface"] == "cli"]
    assert [(r["action"], r["outcome"]) for r in cli] == [
        ("patients trend --json", 0),
        ("patients trend", 0),
        ("patients trend", 1),
        ("patients trend", 1),
        ("patients trend --json", 1),
    ]
    assert not any(handle in json.dumps(r) for r in cli)


# -- the dashboard in a real headless Chromium ------------------------------------------------


@pytest.mark.integration
def test_dashboard_patient_trend(settings: Settings, browser: Any) -> None:
    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, 0.1, what="the API")
        wait = WebDriverWait(browser, 30)
        browser.get(f"http://127.0.0.1:{port}/")
        wait.until(ec.visibility_of_element_located((By.ID, "token"))).send_keys(READER)
        browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        row = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-study="1.2.9.3"]'))
        )
        anonymous = browser.find_element(By.CSS_SELECTOR, 'tr[data-study="1.2.9.5"]')
        assert not anonymous.find_elements(By.CSS_SELECTOR, "button.patient")
        row.find_element(By.CSS_SELECTOR, "button.patient").click()
        panel = wait.until(ec.visibility_of_element_located((By.ID, "trend")))
        wait.until(lambda _: "Patient trend" in panel.text)
        assert ALICE[:16] in panel.text
        shown = [
            tr.get_attribute("data-study")
            for tr in panel.find_elements(By.CSS_SELECTOR, "tbody tr")
        ]
        assert shown == ALICE_ORDER  # Bob's study not among them
        assert "100.0 %" in panel.text and "-25.0 %" in panel.text
        points = panel.find_elements(By.CSS_SELECTOR, "svg.trend-chart circle")
        assert len(points) == 3
        heights = [float(p.get_attribute("cy")) for p in points]
        assert heights[1] < heights[2] < heights[0]  # 2.0 ml highest, then 1.5, 1.0
        assert browser.find_element(By.ID, "detail").is_displayed() is False
        page = browser.find_element(By.TAG_NAME, "body").text
        assert not any(key in page for key in (ALICE, BOB))  # handles only
    finally:
        server.should_exit = True
        thread.join(10)
