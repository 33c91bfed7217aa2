"""Unit tests of the admin API's building blocks: tokens and roles, the bind
check, settings, the log context, the CLI progress output, and the API on an
in-process SQLite database (FastAPI's TestClient, no server)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from db.migrate import upgrade
from db.models import Instance, Job, JobStatus, Result, Series, Study
from db.session import session_scope
from worker import metrics
from worker.admin.api import TokenCheck, check_bind, create_app, is_loopback
from worker.cli.main import _Progress
from worker.logging_setup import JsonFormatter, TextFormatter, _ProcessName, log_context
from worker.settings import Settings, SettingsError, load_settings

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


def test_token_roles_plain_and_hashed() -> None:
    hashed = "sha256:" + hashlib.sha256(READER.encode()).hexdigest()
    check = TokenCheck((ADMIN,), (hashed,))
    assert check.enabled
    assert check.role(ADMIN) == "admin"
    assert check.role(READER) == "read"
    assert check.role(hashed) is None  # the stored hash is not itself a token
    assert check.role("nope-nope-nope-nope") is None
    assert check.role(None) is None and check.role("") is None
    # a token listed in both roles gets the stronger one
    assert TokenCheck((ADMIN,), (ADMIN,)).role(ADMIN) == "admin"
    # no token configured: open (loopback only, see check_bind)
    assert TokenCheck((), ()).role(None) == "admin"


def test_token_settings_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AI_API_TOKEN", "short")
    with pytest.raises(SettingsError, match="at least 16 characters") as err:
        load_settings()
    assert "'short'" not in str(err.value)  # a rejected token is never printed
    monkeypatch.setenv("PACS_AI_API_TOKEN", "sha256:abc")
    with pytest.raises(SettingsError, match="64 lowercase hex"):
        load_settings()
    monkeypatch.setenv("PACS_AI_API_TOKEN", f"{ADMIN}, sha256:{'a' * 64}")
    monkeypatch.setenv("PACS_AI_API_READ_TOKENS", READER)
    settings = load_settings()
    assert settings.api_admin_token_list == (ADMIN, "sha256:" + "a" * 64)
    assert settings.api_read_token_list == (READER,)
    assert settings.api_auth_enabled
    assert settings.api_host == "127.0.0.1" and settings.api_port == 8080
    monkeypatch.setenv("PACS_AI_API_TLS_CERT", "/nonexistent/cert.pem")
    with pytest.raises(SettingsError, match="TLS"):
        load_settings()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("pacs-ai.example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_check_bind() -> None:
    check_bind(Settings(api_host="127.0.0.1"))
    check_bind(Settings(api_host="0.0.0.0", api_token=ADMIN))
    check_bind(Settings(api_host="0.0.0.0", api_read_tokens=READER))
    with pytest.raises(SettingsError, match="refusing to serve the API on 0.0.0.0"):
        check_bind(Settings(api_host="0.0.0.0"))


def _record(msg: str) -> logging.LogRecord:
    record = logging.LogRecord("worker.scheduling.jobs", logging.INFO, __file__, 1, msg, (), None)
    _ProcessName("worker").filter(record)
    return record


def test_log_context_in_text_and_json() -> None:
    with log_context(job_id=7, study="1.2.3"):
        with log_context(series="1.2.3.4"):
            inner = _record("job 7 started")
        outer = _record("job 7 done")
    after = _record("idle")
    text = TextFormatter("%(process_name)s %(message)s")
    assert text.format(inner) == "worker job 7 started [job_id=7 study=1.2.3 series=1.2.3.4]"
    assert text.format(outer) == "worker job 7 done [job_id=7 study=1.2.3]"
    assert text.format(after) == "worker idle"
    payload = json.loads(JsonFormatter().format(outer))
    assert payload["job_id"] == 7 and payload["study"] == "1.2.3"
    assert payload["message"] == "job 7 done" and payload["process"] == "worker"
    assert "job_id" not in json.loads(JsonFormatter().format(after))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_and_bar() -> None:
    plain = io.StringIO()
    progress = _Progress(2, plain)
    progress.update(5, "1.2.3", "done")
    progress.update(6, "1.2.4", "failed")
    assert plain.getvalue().splitlines() == [
        "job 5 done study=1.2.3 (1/2)",
        "job 6 failed study=1.2.4 (2/2)",
    ]
    tty = _Tty()
    bar = _Progress(2, tty)
    bar.update(5, "1.2.3", "done")
    assert tty.getvalue() == "\r[" + "#" * 15 + "-" * 15 + "] 1/2 finished, 0 failed"
    bar.update(6, "1.2.4", "done")
    assert tty.getvalue().endswith("] 2/2 finished, 0 failed\n")


def test_metrics_are_noops_until_set_up() -> None:
    if metrics.enabled():
        pytest.skip("metrics already set up in this process")
    metrics.record_instance(10, duplicate=False)  # nothing happens, nothing fails
    metrics.record_job_finished("done", 1.0)


# -- the app on SQLite, in process -------------------------------------------------


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data",
        api_token=ADMIN,
        api_read_tokens=READER,
        models_dir=tmp_path / "no-models",
        broker_url="memory://",
    )
    upgrade(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        for n in range(3):
            study = Study(study_instance_uid=f"1.2.3.{n}")
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"1.2.3.{n}.1", modality="CT")
            session.add(series)
            session.flush()
            session.add(
                Instance(
                    study_id=study.id,
                    series_id=series.id,
                    sop_instance_uid=f"1.2.3.{n}.1.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    rel_path="x.dcm",
                    size_bytes=10,
                )
            )
            job = Job(study_id=study.id, status=JobStatus.DONE.value, attempts=1)
            session.add(job)
            session.flush()
            session.add(
                Result(
                    study_id=study.id,
                    job_id=job.id,
                    series_instance_uid=f"1.2.3.{n}.1",
                    model="m",
                    model_version="1",
                    model_sha256="0" * 64,
                    kind="classification",
                    finding_code_value="C1",
                    finding_code_scheme="SCT",
                    finding="Lung nodule",
                    probability=0.3 * n,
                    present=n == 2,
                )
            )
    return settings


def test_app_on_sqlite(sqlite_settings: Settings) -> None:
    client = TestClient(create_app(sqlite_settings), base_url="http://127.0.0.1")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    read = {"Authorization": f"Bearer {READER}"}
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/studies").status_code == 401
    page = client.get("/api/studies", headers=read, params={"limit": 2}).json()
    assert [s["study_instance_uid"] for s in page["items"]] == ["1.2.3.2", "1.2.3.1"]
    assert page["next_offset"] == 2
    assert page["items"][0]["findings"] == ["Lung nodule"]
    assert page["items"][1]["findings"] == []
    rest = client.get("/api/studies", headers=read, params={"limit": 2, "offset": 2}).json()
    assert [s["study_instance_uid"] for s in rest["items"]] == ["1.2.3.0"]
    assert rest["next_offset"] is None
    results = client.get("/api/results", headers=read, params={"min_probability": 0.5}).json()
    assert [r["study_instance_uid"] for r in results["items"]] == ["1.2.3.2"]
    assert client.get("/api/models", headers=read).json() == []
    # writes: read-only token refused; admin creates a job; a second one is refused
    url = "/api/studies/1.2.3.1/reprocess"
    assert client.post(url, headers=read, json={}).status_code == 403
    created = client.post(url, headers=admin, json={})
    assert created.status_code == 202, created.text
    assert created.json()["job"]["status"] == "queued"
    again = client.post(url, headers=admin, json={})
    assert again.status_code == 409 and "already has job" in again.json()["detail"]
    assert client.post("/api/studies/9.9/reprocess", headers=admin, json={}).status_code == 404
    assert client.post("/api/studies/1.2.3.1/resend", headers=read, json={}).status_code == 403
    assert client.post("/api/studies/1.2.3.1/resend", headers=admin, json={}).status_code == 404
    ready = client.get("/readyz", headers=read)
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    text = client.get("/metrics", headers=read).text
    assert 'pacs_ai_jobs{status="queued"} 1.0' in text
    assert 'pacs_ai_jobs{status="done"} 3.0' in text
