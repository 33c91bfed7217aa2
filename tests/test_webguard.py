"""Unit tests of the API's browser-facing guards (worker/admin/webguard.py): the Host
allow-list against DNS rebinding, and cross-site writes refused, with and
without tokens, on the real app in process (FastAPI's TestClient, SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from db.migrate import upgrade
from db.models import Instance, Job, Series, Study
from db.session import session_scope
from worker.admin.api import create_app
from worker.admin.webguard import HostAllowList, allowed_hosts, same_origin, split_host
from worker.settings import Settings, SettingsError, load_settings

ADMIN = "admin-token-0123456789abcdef"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost.:8080", ("localhost", 8080)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("evil.example", ("evil.example", None)),
        ("", None),
        ("a b", None),
        ("host:port", None),
        ("host:0", None),
        ("host:70000", None),
        ("[::1", None),
        ("[::1]x", None),
        ("user@host", None),
        ("host/path", None),
    ],
)
def test_split_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(value) == parsed


def test_allow_list() -> None:
    allowed = allowed_hosts("127.0.0.1", ["pacs-ai.example.org", "*.lab.example"])
    for host in ("localhost", "127.0.0.1", "::1", "PACS-AI.example.org", "x.lab.example"):
        assert allowed.allows(host), host
    for host in ("evil.example", "lab.example", "127.0.0.2", "example.org", "localhost.evil"):
        assert not allowed.allows(host), host
    assert allowed_hosts("10.1.2.3").allows("10.1.2.3")
    assert allowed_hosts("::").allows("::")  # and this machine's names
    assert HostAllowList.of(["*"]).allows("anything.example")


def test_same_origin() -> None:
    host = ("127.0.0.1", 8080)
    assert same_origin("http://127.0.0.1:8080", host)
    assert same_origin("https://127.0.0.1:8080", host)
    assert not same_origin("http://127.0.0.1:8081", host)
    assert not same_origin("http://evil.example:8080", host)
    assert not same_origin("null", host)
    assert not same_origin("file://", host)
    assert not same_origin("http://127.0.0.1:99999", host)
    assert same_origin("https://pacs-ai.example.org", ("pacs-ai.example.org", None))
    assert same_origin("https://pacs-ai.example.org", ("pacs-ai.example.org", 443))
    assert not same_origin("http://pacs-ai.example.org", ("pacs-ai.example.org", 443))
    assert same_origin("http://[::1]:8080", ("::1", 8080))


def test_allowed_hosts_setting_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AI_API_ALLOWED_HOSTS", "pacs-ai.example.org, *.lab.example,[::1]")
    assert load_settings().api_allowed_host_list == (
        "pacs-ai.example.org",
        "*.lab.example",
        "[::1]",
    )
    for bad in ("http://pacs-ai.example.org", "host:8080", "a b", "host/path"):
        monkeypatch.setenv("PACS_AI_API_ALLOWED_HOSTS", bad)
        with pytest.raises(SettingsError, match="PACS_AI_API_ALLOWED_HOSTS"):
            load_settings()


def _settings(tmp_path: Path, **extra: str) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "no-models",
        broker_url="memory://",
        **extra,  # type: ignore[arg-type]
    )
    upgrade(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as session:
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid="1.2.3.4.1", modality="CT")
        session.add(series)
        session.flush()
        session.add(
            Instance(
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid="1.2.3.4.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                rel_path="x.dcm",
                size_bytes=10,
            )
        )
    return settings


def _jobs(settings: Settings) -> int:
    with session_scope(settings.effective_database_url) as session:
        return session.query(Job).count()


@pytest.mark.parametrize("token", ["", ADMIN])
def test_foreign_host_and_cross_site_writes_refused(tmp_path: Path, token: str) -> None:
    settings = _settings(tmp_path, api_token=token)
    client = TestClient(create_app(settings), base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    url = "/api/studies/1.2.3.4/reprocess"

    # DNS rebinding: a foreign Host, on reads, writes and the page itself
    for path in ("/", "/api/studies", "/healthz", "/metrics"):
        refused = client.get(path, headers={**auth, "Host": "evil.example:8080"})
        assert refused.status_code == 421, path
        assert "PACS_AI_API_ALLOWED_HOSTS" in refused.json()["detail"]
    rebound = client.post(url, json={}, headers={**auth, "Host": "evil.example"})
    assert rebound.status_code == 421
    assert client.get("/api/studies", headers={**auth, "Host": "localhost:8080"}).status_code == 200
    assert client.get("/api/studies", headers={**auth, "Host": "[::1]:9"}).status_code == 200

    # a cross-site form post (text/plain, no preflight), with and without Origin
    form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    assert client.post(url, content=b'{"a": 1}', headers={**auth, **form}).status_code == 403
    plain = client.post(url, content=b"{}", headers={**auth, "Content-Type": "text/plain"})
    assert plain.status_code == 403 and "application/json" in plain.json()["detail"]
    urlenc = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post(url, content=b"a=1", headers={**auth, **urlenc}).status_code == 403
    assert client.post(url, headers=auth).status_code == 403  # no body at all
    # JSON from a foreign origin, or a browser saying cross-site
    evil = {"Origin": "http://evil.example"}
    assert client.post(url, json={}, headers={**auth, **evil}).status_code == 403
    null = {"Origin": "null"}
    assert client.post(url, json={}, headers={**auth, **null}).status_code == 403
    other_port = {"Origin": "http://127.0.0.1:9999"}
    assert client.post(url, json={}, headers={**auth, **other_port}).status_code == 403
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert client.post(url, json={}, headers={**auth, **cross}).status_code == 403
    # not JSON, or not an object
    bad = {"Content-Type": "application/json"}
    assert client.post(url, content=b"a=1", headers={**auth, **bad}).status_code == 400
    assert client.post(url, content=b"[]", headers={**auth, **bad}).status_code == 400
    assert client.post(url, content=b"", headers={**auth, **bad}).status_code == 400
    big = b'{"x": "' + b"a" * 70_000 + b'"}'
    assert client.post(url, content=big, headers={**auth, **bad}).status_code == 413
    assert _jobs(settings) == 0  # nothing was queued

    # the dashboard's own request: JSON, same origin
    same = {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}
    created = client.post(
        url, content=b"{}", headers={**auth, **same, "Content-Type": "application/json"}
    )
    assert created.status_code == 202, created.text
    assert _jobs(settings) == 1
    if token:  # the token is still needed after the guard
        again = client.post(url, json={}, headers=same)
        assert again.status_code == 401


def test_allowed_hosts_setting_in_app(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_allowed_hosts="pacs-ai.example.org")
    client = TestClient(create_app(settings), base_url="http://pacs-ai.example.org")
    assert client.get("/api/studies").status_code == 200
    assert client.get("/api/studies", headers={"Host": "127.0.0.1:8080"}).status_code == 200
    assert client.get("/api/studies", headers={"Host": "evil.example"}).status_code == 421
    origin = {"Origin": "http://pacs-ai.example.org"}
    assert client.post("/api/studies/1.2.3.4/reprocess", json={}, headers=origin).status_code == 202
