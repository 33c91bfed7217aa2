"""Operate it: the admin API, metrics, log canaries and reprocessing, against one
embedded node (``pacs-ai run``: listener, worker and API processes) on a real
PostgreSQL database, with studies received over DICOM.

The node is shared by the tests of this module (set-up is the slow part); the
tests run in file order: metrics first (exact counts), reprocessing last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, build_context

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import (
    PG_ADMIN_URL,
    REPO,
    Node,
    _pg_exec,
    cli_env,
    free_port,
    pg_block,
    port_open,
    run_cli,
    send_datasets,
    send_files_raw,
    wait_for,
)
from tests.dicom_peers import RecordingSCP
from tests.factory import CANARY_BIRTH, CANARY_ID, CANARY_NAME, ct_slice
from worker.pipeline.registry import DEMO_MODELS_DIR

MODELS_SRC = Path(os.environ.get("PACS_AI_TEST_MODELS_DIR") or DEMO_MODELS_DIR)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not list(MODELS_SRC.glob("*.json")), reason="demo models not built"),
]

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
READ_TOKEN = "reader-" + uuid.uuid4().hex
# the read-only token is configured by its hash only
READ_HASH = "sha256:" + hashlib.sha256(READ_TOKEN.encode()).hexdigest()
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}

GOOD_SLICES = 20
BAD_SLICES = 3


def node_env(root: Path, **settings: str) -> dict[str, str]:
    defaults = {
        "data_dir": str(root / "data"),
        "host": "127.0.0.1",
        "stable_seconds": "1.5",
        "assembler_interval": "0.3",
        "log_level": "DEBUG",
    }
    return cli_env(**{**defaults, **settings})


@dataclass
class ApiNode:
    node: Node
    base: str
    db_url: str
    models_dir: Path
    good_uid: str
    bad_uid: str
    sent_bytes: int
    destination: RecordingSCP

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
        return httpx.get(
            self.base + path,
            headers=ADMIN if headers is None else headers,
            params=params,
            timeout=30,
        )

    def json(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()


def _chest_ct(folder: Path) -> tuple[str, list[Path]]:
    phantom = generate_chest_ct(
        4242,
        matrix=128,
        slices=GOOD_SLICES,
        thickness_mm=5.0,
        noise_sigma=10.0,
        nodule=True,
        nodule_diameter_mm=20.0,
        sex="F",
        age_years=61,
    )
    folder.mkdir(parents=True)
    paths = []
    uid = ""
    for i, ds in enumerate(
        phantom_to_datasets(phantom, seed=4242, patient_name=CANARY_NAME, patient_id=CANARY_ID)
    ):
        ds.PatientBirthDate = CANARY_BIRTH
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uid = str(ds.StudyInstanceUID)
    return uid, paths


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    root = tmp_path_factory.mktemp("apinode")
    db_name = f"pacsai_test_{uuid.uuid4().hex[:12]}"
    _pg_exec(f'CREATE DATABASE "{db_name}"')
    db_url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{db_name}"
    models_dir = root / "models"
    shutil.copytree(MODELS_SRC, models_dir)
    port, api_port = free_port(), free_port()
    destination = RecordingSCP(free_port())
    destination.start()
    env = node_env(
        root,
        port=str(port),
        api_port=str(api_port),
        database_url=db_url,
        models_dir=str(models_dir),
        api_token=ADMIN_TOKEN,
        api_read_tokens=READ_HASH,
        allowed_calling_aets="TESTSCU",
        log_format="json",
        ort_threads="2",
        destinations=f"DEST@127.0.0.1:{destination.port}",
    )
    node = Node(root=root, env=env, port=port)
    node.log_dir.mkdir()
    base = f"http://127.0.0.1:{api_port}"
    try:
        node.start_run(api=True)

        good_uid, good = _chest_ct(root / "good")
        assert send_datasets(port, good) == [0] * GOOD_SLICES
        # a study whose files vanish from storage before its job runs: a real failed job
        bad_uid, series_uid = generate_uid(), generate_uid()
        bad = [ct_slice(bad_uid, series_uid, i) for i in range(BAD_SLICES)]
        assert send_datasets(port, bad) == [0] * BAD_SLICES
        study_dir = node.study_dir(bad_uid)
        assert study_dir.is_dir()
        shutil.rmtree(study_dir)
        sent_bytes = sum(p.stat().st_size for p in good)
        yield_node = ApiNode(
            node, base, db_url, models_dir, good_uid, bad_uid, sent_bytes, destination
        )

        def finished() -> bool:
            jobs = yield_node.json("/api/jobs")["items"]
            status = {j["study_instance_uid"]: j["status"] for j in jobs}
            errors = {j["study_instance_uid"]: j["error"] for j in jobs}
            assert status.get(good_uid) != "failed", errors[good_uid]
            if status.get(good_uid) != "done" or status.get(bad_uid) != "failed":
                return False
            sent = yield_node.json("/api/deliveries", study=good_uid)["items"]
            return bool(sent) and all(d["status"] == "sent" for d in sent)

        wait_for(finished, 240, 0.5, what="good job done and delivered, the bad one failed")
        yield yield_node
    finally:
        node.stop_all()
        destination.stop()
        _pg_exec(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
        _pg_exec(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_text = key.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == want:
            return float(value)
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


# -- metrics (first: exact counts) -------------------------------------------------------


def test_metrics_after_studies_went_through(api: ApiNode, tmp_path: Path) -> None:
    # one refused C-STORE (truncated dataset: 0xC210) and one rejected association
    src = tmp_path / "src.dcm"
    ct_slice(generate_uid(), generate_uid(), 0).save_as(src, enforce_file_format=True)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(src.read_bytes()[:-100])
    assert send_files_raw(api.node.port, [truncated]) == [0xC210]
    intruder = AE(ae_title="INTRUDER")
    assoc = intruder.associate(
        "127.0.0.1", api.node.port, contexts=[build_context("1.2.840.10008.1.1")], ae_title="PACSAI"
    )
    assert assoc.is_rejected

    def scrape() -> str:
        response = api.get("/metrics", headers=READ)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return response.text

    text = wait_for(
        lambda: (
            (t := scrape()) and _metric(t, "pacs_ai_associations_total", result="rejected") and t
        ),
        10,
        what="rejected association counted",
    )
    received = GOOD_SLICES + BAD_SLICES
    assert _metric(text, "pacs_ai_instances_received_total") == received
    good_bytes = api.sent_bytes
    assert _metric(text, "pacs_ai_received_bytes_total") >= good_bytes  # + the bad study
    assert _metric(text, "pacs_ai_instances_duplicate_total") == 0
    assert _metric(text, "pacs_ai_associations_total", result="accepted") == 3
    assert _metric(text, "pacs_ai_associations_total", result="rejected") == 1
    assert _metric(text, "pacs_ai_cstore_failures_total", status="0xC210") == 1
    # jobs: counters from the worker processes, gauges from the database
    assert _metric(text, "pacs_ai_jobs_finished_total", status="done") == 1
    assert _metric(text, "pacs_ai_jobs_finished_total", status="failed") == 1
    assert _metric(text, "pacs_ai_jobs", status="done") == 1
    assert _metric(text, "pacs_ai_jobs", status="failed") == 1
    assert _metric(text, "pacs_ai_jobs", status="queued") == 0
    deliveries = api.json("/api/deliveries", limit=1000)["items"]
    assert deliveries and {d["status"] for d in deliveries} == {"sent"}
    assert _metric(text, "pacs_ai_deliveries", status="sent") == len(deliveries)
    assert _metric(text, "pacs_ai_deliveries", status="failed") == 0
    assert _metric(text, "pacs_ai_deliveries_total", status="sent") == len(deliveries)
    assert _metric(text, "pacs_ai_dispatch_seconds_count", status="sent") == len(deliveries)
    assert _metric(text, "pacs_ai_study_latency_seconds_count", stage="delivered") >= 1
    assert len(api.destination.received) == len(deliveries)
    assert _metric(text, "pacs_ai_job_queue_wait_seconds_count") == 2
    assert _metric(text, "pacs_ai_job_duration_seconds_count", status="done") == 1
    assert _metric(text, "pacs_ai_study_latency_seconds_count", stage="results") == 1
    assert _metric(text, "pacs_ai_series_decode_seconds_count") == 1
    ran = [m["name"] for m in api.json("/api/models") if m["enabled"]]
    results = api.json("/api/results", study=api.good_uid)["items"]
    for model in {r["model"] for r in results}:
        assert model in ran
        for stage in ("preprocess", "inference", "postprocess"):
            assert _metric(text, "pacs_ai_model_stage_seconds_count", model=model, stage=stage) == 1


# -- the API ------------------------------------------------------------------------


def test_access_control(api: ApiNode) -> None:
    assert api.get("/healthz", headers={}).json() == {"status": "ok"}
    for path in (
        "/api/studies",
        "/api/jobs",
        "/api/results",
        "/api/deliveries",
        "/api/models",
        f"/api/studies/{api.good_uid}",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ):
        response = api.get(path, headers={})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert (
            api.get(path, headers={"Authorization": "Bearer wrong-token-12345678"}).status_code
            == 401
        )
        assert api.get(path, headers=READ).status_code == 200, path
        assert api.get(path, headers=ADMIN).status_code == 200, path
    url = f"{api.base}/api/studies/{api.good_uid}/reprocess"
    assert httpx.post(url, json={}).status_code == 401
    forbidden = httpx.post(url, headers=READ, json={})
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
    # the dashboard page itself carries no data and needs no token
    page = api.get("/", headers={})
    assert page.status_code == 200 and "pacs-ai" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_openapi(api: ApiNode) -> None:
    schema = api.json("/openapi.json")
    paths = set(schema["paths"])
    assert {
        "/api/studies",
        "/api/studies/{study_uid}",
        "/api/jobs",
        "/api/results",
        "/api/deliveries",
        "/api/models",
        "/api/studies/{study_uid}/reprocess",
        "/api/studies/{study_uid}/resend",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= paths
    params = {p["name"] for p in schema["paths"]["/api/results"]["get"]["parameters"]}
    assert {
        "model",
        "finding",
        "present",
        "min_probability",
        "since",
        "until",
        "study",
        "limit",
        "offset",
    } <= params


def test_studies_and_study_detail(api: ApiNode) -> None:
    page = api.json("/api/studies")
    assert page["limit"] == 50 and page["offset"] == 0 and page["next_offset"] is None
    by_uid = {s["study_instance_uid"]: s for s in page["items"]}
    assert set(by_uid) == {api.good_uid, api.bad_uid}
    good = by_uid[api.good_uid]
    assert good["status"] == "done" and good["modalities"] == ["CT"]
    assert good["num_series"] == 1 and good["num_instances"] == GOOD_SLICES
    assert (
        isinstance(good["findings"], list)
        and good["deliveries"] == {}
        or isinstance(good["deliveries"], dict)
    )
    assert by_uid[api.bad_uid]["status"] == "failed"
    # the same objects as the CLI
    cli = api.node.json("studies", "list")
    assert {s["study_instance_uid"]: s for s in cli} == by_uid

    # pagination
    first = api.json("/api/studies", limit=1)
    assert len(first["items"]) == 1 and first["next_offset"] == 1
    second = api.json("/api/studies", limit=1, offset=1)
    assert second["next_offset"] is None
    assert {first["items"][0]["study_instance_uid"], second["items"][0]["study_instance_uid"]} == {
        api.good_uid,
        api.bad_uid,
    }
    assert api.get("/api/studies", limit=0).status_code == 422
    assert api.get("/api/studies", limit=5000).status_code == 422

    detail = api.json(f"/api/studies/{api.good_uid}")
    assert detail["study_instance_uid"] == api.good_uid
    assert [s["num_instances"] for s in detail["series"]] == [GOOD_SLICES]
    assert detail["series"][0]["modality"] == "CT"
    assert [j["status"] for j in detail["jobs"]] == ["done"]
    assert detail["results"] and all(
        r["study_instance_uid"] == api.good_uid for r in detail["results"]
    )
    assert detail["deliveries"] == [] or all(
        d["study_instance_uid"] == api.good_uid for d in detail["deliveries"]
    )
    assert sorted(detail["findings"]) == sorted(
        {r["finding"] for r in detail["results"] if r["present"]}
    )
    assert api.get(f"/api/studies/{generate_uid()}").status_code == 404


def test_jobs(api: ApiNode) -> None:
    jobs = api.json("/api/jobs")["items"]
    assert {j["study_instance_uid"] for j in jobs} == {api.good_uid, api.bad_uid}
    failed = api.json("/api/jobs", status="failed")["items"]
    assert [j["study_instance_uid"] for j in failed] == [api.bad_uid]
    assert failed[0]["error"]  # the reason, as the worker gave it
    done = api.json("/api/jobs", study=api.good_uid)["items"]
    assert [j["status"] for j in done] == ["done"]
    job = done[0]
    assert set(job) >= {
        "id",
        "status",
        "attempts",
        "created_at",
        "started_at",
        "finished_at",
        "error",
        "summary",
    }
    assert job["summary"]["instances"] == GOOD_SLICES
    assert api.get("/api/jobs", status="bogus").status_code == 422
    assert api.json("/api/jobs", limit=1)["next_offset"] == 1


def test_results_filters(api: ApiNode) -> None:
    everything = api.json("/api/results", limit=1000)["items"]
    assert everything and {r["study_instance_uid"] for r in everything} == {api.good_uid}
    row = everything[0]
    assert set(row) >= {
        "model",
        "model_version",
        "model_sha256",
        "kind",
        "finding",
        "finding_code",
        "probability",
        "present",
        "measurements",
        "series_instance_uid",
        "job_id",
        "created_at",
    }
    cli = json.loads(api.node.cli("results", "list", "--json").stdout)
    assert cli == everything

    model = row["model"]
    assert {r["model"] for r in api.json("/api/results", model=model)["items"]} == {model}
    assert api.json("/api/results", model="no-such-model")["items"] == []
    finding = row["finding"]
    by_finding = api.json("/api/results", finding=finding.upper())["items"]
    assert by_finding and {r["finding"] for r in by_finding} == {finding}
    present = api.json("/api/results", present="true")["items"]
    absent = api.json("/api/results", present="false")["items"]
    assert len(present) + len(absent) == len(everything)
    assert all(r["present"] is True for r in present) and all(r["present"] is False for r in absent)
    probs = [r["probability"] for r in everything if r["probability"] is not None]
    if probs:
        cut = sorted(probs)[len(probs) // 2]
        above = api.json("/api/results", min_probability=cut)["items"]
        assert above and all(r["probability"] >= cut for r in above)
        assert len(above) == sum(p >= cut for p in probs)
    created = dt.datetime.fromisoformat(row["created_at"])
    before = (created - dt.timedelta(minutes=5)).isoformat()
    after = (created + dt.timedelta(minutes=5)).isoformat()
    assert len(api.json("/api/results", since=before, limit=1000)["items"]) == len(everything)
    assert api.json("/api/results", since=after)["items"] == []
    assert api.json("/api/results", until=before)["items"] == []
    assert len(api.json("/api/results", until=after, limit=1000)["items"]) == len(everything)
    assert len(api.json("/api/results", study=api.good_uid, limit=1000)["items"]) == len(everything)
    assert api.json("/api/results", study=api.bad_uid)["items"] == []
    page = api.json("/api/results", limit=1, offset=1)
    assert page["items"] == everything[1:2]
    assert api.get("/api/results", min_probability=2).status_code == 422
    assert api.get("/api/results", since="yesterday").status_code == 422


def test_results_cli_csv_and_filters(api: ApiNode) -> None:
    everything = api.json("/api/results", limit=1000)["items"]
    out = api.node.cli("results", "list", "--csv").stdout.splitlines()
    assert out[0].startswith("id,job_id,study_instance_uid,series_instance_uid,model,")
    assert len(out) == 1 + len(everything)
    present = api.node.cli("results", "list", "--csv", "--present", "true").stdout.splitlines()
    assert len(present) - 1 == sum(r["present"] is True for r in everything)
    finding = everything[0]["finding"]
    by_finding = json.loads(api.node.cli("results", "list", "--json", "--finding", finding).stdout)
    assert by_finding == [r for r in everything if r["finding"].lower() == finding.lower()]
    tomorrow = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    assert api.node.cli("results", "list", "--csv", "--since", tomorrow).stdout.splitlines() == [
        out[0]
    ]
    assert len(
        api.node.cli("results", "list", "--csv", "--since", "2000-01-01").stdout.splitlines()
    ) == len(out)
    bad = api.node.cli("results", "list", "--since", "soon", check=False)
    assert bad.returncode == 2 and "not a date" in bad.stderr


def test_models_and_deliveries(api: ApiNode) -> None:
    models = api.json("/api/models")
    manifests = {
        json.loads(p.read_text())["name"]: json.loads(p.read_text())["version"]
        for p in api.models_dir.glob("*.json")
    }
    assert {m["name"]: m["version"] for m in models} == manifests
    assert all(m["enabled"] for m in models)
    deliveries = api.json("/api/deliveries")
    assert set(deliveries) == {"items", "limit", "offset", "next_offset"}
    assert isinstance(deliveries["items"], list)
    assert api.json("/api/deliveries", status="sent", study=api.good_uid)["next_offset"] is None


def test_reprocess_endpoint(api: ApiNode) -> None:
    url = f"{api.base}/api/studies/{{}}/reprocess"
    assert httpx.post(url.format(generate_uid()), headers=ADMIN, json={}).status_code == 404
    response = httpx.post(url.format(api.bad_uid), headers=ADMIN, json={})
    assert response.status_code == 202, response.text
    body = response.json()
    job = body["job"]
    assert job["study_instance_uid"] == api.bad_uid and job["status"] in {
        "queued",
        "running",
        "failed",
    }
    assert body["sent"] is True
    # a new job, run by the worker the normal way (and failing again: no files)
    wait_for(
        lambda: api.json("/api/jobs", study=api.bad_uid)["items"][0]["status"] == "failed",
        60,
        what="the reprocessed job to run",
    )
    jobs = api.json("/api/jobs", study=api.bad_uid)["items"]
    assert len(jobs) == 2 and jobs[0]["id"] == job["id"] and jobs[0]["attempts"] == 1


def test_resend_endpoint(api: ApiNode) -> None:
    before = api.json("/api/deliveries", study=api.good_uid, limit=1000)["items"]
    received = len(api.destination.received)
    url = f"{api.base}/api/studies/{api.good_uid}/resend"
    assert httpx.post(url, headers=READ, json={}).status_code == 403
    response = httpx.post(url, headers=ADMIN, json={})
    assert response.status_code == 202, response.text
    assert sorted(response.json()["deliveries"]) == sorted(d["id"] for d in before)
    wait_for(
        lambda: len(api.destination.received) == received + len(before),
        60,
        what="the objects sent again",
    )
    wait_for(
        lambda: all(
            d["status"] == "sent"
            for d in api.json("/api/deliveries", study=api.good_uid, limit=1000)["items"]
        ),
        30,
        what="deliveries sent again",
    )
    assert (
        httpx.post(
            f"{api.base}/api/studies/{api.bad_uid}/resend", headers=ADMIN, json={}
        ).status_code
        == 404
    )


# -- the dashboard in a real headless Chromium --------------------------------------------

SCREENSHOTS = REPO / "test-output"


def test_dashboard_in_chromium(api: ApiNode, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(api.base + "/")
    # tokens are configured: the page asks for one
    token_input = wait.until(ec.visibility_of_element_located((By.ID, "token")))
    token_input.send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()

    good_row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-study="{api.good_uid}"]'))
    )
    assert "done" in good_row.text and "CT" in good_row.text
    present = sorted(api.json(f"/api/studies/{api.good_uid}")["findings"])
    findings_text = good_row.find_element(By.CSS_SELECTOR, "td.findings").text
    if present:
        assert all(f in findings_text for f in present)
    else:
        assert findings_text == "none present"
    bad_row = browser.find_element(By.CSS_SELECTOR, f'tr[data-study="{api.bad_uid}"]')
    assert "failed" in bad_row.text

    # the failed job with its error and a reprocess button
    failed_jobs = api.json("/api/jobs", status="failed")["items"]
    failed_row = browser.find_element(
        By.CSS_SELECTOR, f'#failed tr[data-job="{failed_jobs[0]["id"]}"]'
    )
    assert failed_jobs[0]["error"][:40] in failed_row.text
    assert browser.find_element(By.ID, "ready").text == "ready"
    models_text = browser.find_element(By.ID, "models").text
    for model in api.json("/api/models"):
        assert model["name"] in models_text and model["version"] in models_text

    # the study's findings in its detail panel
    good_row.click()
    detail = wait.until(ec.visibility_of_element_located((By.ID, "detail")))
    results = api.json("/api/results", study=api.good_uid, limit=1000)["items"]
    wait.until(lambda _: results[0]["model"] in detail.text)
    for r in results:
        assert r["finding"] in detail.text and r["model_version"] in detail.text
    page_text = browser.find_element(By.TAG_NAME, "body").text
    assert "CANARY" not in page_text and CANARY_ID not in page_text

    SCREENSHOTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(SCREENSHOTS / "dashboard.png"))

    # reprocess the failed study from the dashboard
    jobs_before = len(api.json("/api/jobs", study=api.bad_uid)["items"])
    failed_row = browser.find_element(
        By.CSS_SELECTOR, f'#failed tr[data-job="{failed_jobs[0]["id"]}"]'
    )
    failed_row.find_element(By.TAG_NAME, "button").click()
    toast = wait.until(ec.visibility_of_element_located((By.ID, "toast")))
    assert toast.text.startswith("Reprocess queued: job "), toast.text
    job_id = int(toast.text.split("job ")[1].split()[0])
    jobs = api.json("/api/jobs", study=api.bad_uid)["items"]
    assert len(jobs) == jobs_before + 1 and jobs[0]["id"] == job_id
    browser.save_screenshot(str(SCREENSHOTS / "dashboard-reprocess.png"))
    wait_for(
        lambda: api.json("/api/jobs", study=api.bad_uid)["items"][0]["status"] == "failed",
        60,
        what="the reprocessed job to run",
    )


# -- logs ------------------------------------------------------------------------------


def test_no_patient_data_in_any_log(api: ApiNode) -> None:
    # the API was asked for the canary study
    assert api.json(f"/api/studies/{api.good_uid}")["study_instance_uid"] == api.good_uid
    api.json("/api/results", study=api.good_uid)
    time.sleep(0.5)
    logs = api.node.logs()
    for process in ("listener", "worker", "api", "run"):
        assert f'"process": "{process}"' in logs, process
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, "CANARY", "Zyxwvut"):
        assert canary not in logs, canary
    # every JSON line about the job carries its id and the Study Instance UID
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    job_lines = [
        rec
        for rec in lines
        if rec.get("process") == "worker"
        and rec["message"].startswith("job ")
        and "started" in rec["message"]
    ]
    assert job_lines
    assert all("job_id" in rec and rec.get("study") for rec in job_lines)
    assert any(rec.get("study") == api.good_uid for rec in job_lines)


# -- refusals and readiness ------------------------------------------------------------------


def test_refuses_public_address_without_token(tmp_path: Path) -> None:
    env = node_env(tmp_path, api_host="0.0.0.0", api_port=str(free_port()))
    for command in (["api"], ["run"]):
        result = run_cli(env, *command, cwd=tmp_path, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert (
            len(lines) == 1 and "refusing to serve the API on 0.0.0.0 without a token" in lines[0]
        )
    weak = run_cli({**env, "PACS_AI_API_TOKEN": "short"}, "api", timeout=60)
    assert weak.returncode == 2 and "at least 16 characters" in weak.stderr
    assert "short" not in weak.stderr.replace("PACS_AI", "")


def test_readyz_503_with_database_down(api: ApiNode) -> None:
    ready = api.json("/readyz")
    assert ready["status"] == "ready"
    assert ready["checks"]["database"] == "ok" and ready["checks"]["broker"] == "ok"
    pg_block(api.db_url, True)
    try:
        response = api.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["database"].startswith("unreachable")
        assert response.json()["checks"]["broker"] == "ok"
        assert api.get("/healthz").status_code == 200
        assert api.get("/api/studies").status_code == 503
    finally:
        pg_block(api.db_url, False)
    wait_for(lambda: api.get("/readyz").status_code == 200, 30, what="ready again")


# -- reprocess after a model upgrade (last: changes the models) ---------------------------------


def test_reprocess_model_after_upgrade(api: ApiNode) -> None:
    results = api.json("/api/results", study=api.good_uid, limit=1000)["items"]
    model = results[0]["model"]
    manifest_path = next(
        p for p in api.models_dir.glob("*.json") if json.loads(p.read_text())["name"] == model
    )
    manifest = json.loads(manifest_path.read_text())
    old_version = manifest["version"]
    assert {r["model_version"] for r in results if r["model"] == model} == {old_version}
    manifest["version"] = old_version + "-upgraded"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    wait_for(
        lambda: (
            {m["name"]: m["version"] for m in api.json("/api/models")}[model] == manifest["version"]
        ),
        10,
        what="the registry to see the new version",
    )

    jobs_before = {j["id"] for j in api.json("/api/jobs", limit=1000)["items"]}
    out = api.node.cli("reprocess", "--model", model, "--timeout", "240", timeout=300)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("queued job ") and lines[0].endswith(f"for study {api.good_uid}")
    assert any(line.startswith("job ") and " done " in line and "(1/1)" in line for line in lines)
    assert lines[-1] == "1 done, 0 failed"
    new = [j for j in api.json("/api/jobs", limit=1000)["items"] if j["id"] not in jobs_before]
    assert [(j["study_instance_uid"], j["status"]) for j in new] == [(api.good_uid, "done")]
    after = api.json("/api/results", study=api.good_uid, model=model, limit=1000)["items"]
    assert after and {r["model_version"] for r in after} == {manifest["version"]}
    assert {r["job_id"] for r in after} == {new[0]["id"]}
    # nothing duplicated: the same findings as before, once each
    assert sorted(r["finding"] for r in after) == sorted(
        r["finding"] for r in results if r["model"] == model
    )

    # --since after every study: nothing to do; an unknown study is skipped
    later = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    none = api.node.cli("reprocess", "--model", model, "--since", later)
    assert "nothing to reprocess" in none.stdout
    unknown = api.node.cli("reprocess", "--study", generate_uid(), "--no-wait", check=False)
    assert unknown.returncode == 1 and "not found" in unknown.stderr


def test_listener_serves_its_own_metrics(node_factory: Any, tmp_path: Path) -> None:
    """PACS_AI_METRICS_PORT: a host without an API process is scraped directly."""
    metrics_port = free_port()
    node = node_factory(metrics_port=metrics_port)
    node.cli("db", "upgrade")
    node.start_listener()
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    assert send_datasets(node.port, [ds, ds]) == [0, 0]  # the second one is a duplicate
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    assert _metric(text, "pacs_ai_instances_received_total") == 1
    assert _metric(text, "pacs_ai_instances_duplicate_total") == 1
    assert _metric(text, "pacs_ai_associations_total", result="accepted") == 1


def test_api_over_tls(tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    api_port = free_port()
    env = node_env(
        tmp_path,
        api_port=str(api_port),
        api_tls_cert=str(cert),
        api_tls_key=str(key),
        api_token=ADMIN_TOKEN,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli.main", "api"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(api_port), 30, what="API over TLS")
        base = f"https://127.0.0.1:{api_port}"
        trust = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(base + "/healthz", verify=trust).json() == {"status": "ok"}
        assert httpx.get(base + "/api/models", verify=trust).status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)
