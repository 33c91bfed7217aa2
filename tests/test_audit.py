"""The audit log (issue 13, done-when 6): one record for every API request and
every CLI command that reads or changes data, naming who (the token's role and
index, never the token or its digest), what, which study, when, from where and
the outcome; ``pacs-ai audit list`` shows them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from db.migrate import upgrade
from db.session import dispose_all
from tests.conftest import cli_env, run_cli

ADMIN_TOKEN = "audit-admin-" + "1" * 20
READ_TOKENS = ("audit-read-zero-" + "2" * 20, "audit-read-one-" + "3" * 20)
SECRETS = (ADMIN_TOKEN, *READ_TOKENS)
DIGESTS = tuple(hashlib.sha256(t.encode()).hexdigest() for t in SECRETS)
UID = "1.2.826.0.1.3680043.10.99.1"


def _all_text(url: str) -> str:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(
                json.dumps([str(v) for v in row])
                for table in meta.sorted_tables
                for row in conn.execute(sa.select(table)).all()
            )
    finally:
        engine.dispose()


def _audit(url: str) -> list[dict[str, Any]]:
    from db.queries import list_audit
    from db.session import session_scope

    with session_scope(url) as session:
        return list(reversed(list_audit(session)))


def test_every_api_request_is_audited(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from worker.admin.api import create_app
    from worker.settings import load_settings

    url = f"sqlite:///{tmp_path / 'pacs-ai.sqlite3'}"
    upgrade(url)
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=url,
        api_token=ADMIN_TOKEN,
        # the second read-only token is configured by its digest only
        api_read_tokens=f"{READ_TOKENS[0]},sha256:{DIGESTS[2]}",
    )
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    read0 = {"Authorization": f"Bearer {READ_TOKENS[0]}"}
    read1 = {"Authorization": f"Bearer {READ_TOKENS[1]}"}
    wrong = {"Authorization": "Bearer not-a-token-at-all-123456"}
    post = {"Content-Type": "application/json"}
    # (method, path, params, headers, expected: actor, action, studies, status)
    calls: list[tuple[str, str, dict[str, str], dict[str, str], tuple[Any, ...]]] = [
        ("GET", "/api/studies", {}, admin, ("admin#0", "GET /api/studies", [], 200)),
        (
            "GET",
            f"/api/studies/{UID}",
            {},
            read1,
            ("read#1", "GET /api/studies/{study_uid}", [UID], 404),
        ),
        (
            "GET",
            "/api/jobs",
            {"status": "done", "study": UID},
            read0,
            ("read#0", "GET /api/jobs?status,study", [UID], 200),
        ),
        ("GET", "/api/results", {}, {}, ("anonymous", "GET /api/results", [], 401)),
        ("GET", "/api/deliveries", {}, wrong, ("anonymous", "GET /api/deliveries", [], 401)),
        (
            "GET",
            "/api/studies",
            {"accession": "ACC-SECRET-1"},
            read0,
            ("read#0", "GET /api/studies?accession", [], 403),
        ),
        (
            "GET",
            "/api/studies",
            {"accession": "ACC-SECRET-1"},
            admin,
            ("admin#0", "GET /api/studies?accession", [], 200),
        ),
        (
            "POST",
            f"/api/studies/{UID}/reprocess",
            {},
            {**read0, **post},
            ("read#0", "POST /api/studies/{study_uid}/reprocess", [UID], 403),
        ),
        (
            "POST",
            f"/api/studies/{UID}/reprocess",
            {},
            {**admin, **post},
            ("admin#0", "POST /api/studies/{study_uid}/reprocess", [UID], 404),
        ),
        ("GET", "/api/models", {}, admin, ("admin#0", "GET /api/models", [], 200)),
        ("GET", "/metrics", {}, read1, ("read#1", "GET /metrics", [], 200)),
        ("GET", "/api/nothing-here", {}, admin, ("admin#0", "GET (no such endpoint)", [], 404)),
    ]
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for method, path, params, headers, expected in calls:
            body = "{}" if method == "POST" else None
            answer = client.request(method, path, params=params, headers=headers, content=body)
            assert answer.status_code == expected[3], (path, answer.text)
        assert client.get("/healthz").status_code == 200  # reads nothing: not audited
        assert client.get("/").status_code == 200  # the dashboard's static page: not audited
        # a foreign Host header (DNS rebinding) is refused, and recorded
        rebound = client.get("/api/studies", headers={**admin, "Host": "evil.example"})
        assert rebound.status_code == 421
    calls.append(("GET", "", {}, {}, ("admin#0", "GET (no such endpoint)", [], 421)))

    records = _audit(url)
    assert len(records) == len(calls), [r["action"] for r in records]
    for record, (_m, _p, _q, _h, (actor, action, studies, status)) in zip(
        records, calls, strict=True
    ):
        assert record["interface"] == "api"
        assert (record["actor"], record["action"], record["studies"], record["outcome"]) == (
            actor,
            action,
            studies,
            status,
        )
        assert record["source"] == "testclient"
        assert record["at"]
    everything = _all_text(url)
    assert not any(secret in everything for secret in SECRETS + DIGESTS)
    assert "ACC-SECRET-1" not in everything  # a query's value is never recorded
    dispose_all()


@pytest.mark.integration
def test_every_cli_command_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = cli_env(data_dir=data)
    commands: list[tuple[list[str], str, list[str], int]] = [
        (["db", "upgrade"], "db upgrade", [], 0),
        (["studies", "list", "--json"], "studies list --json", [], 0),
        (["studies", "list", "--accession", "ACC-SECRET-2"], "studies list --accession", [], 1),
        (["jobs", "list", "--study", UID], "jobs list --study", [UID], 0),
        (["results", "list", "--csv", "--limit", "5"], "results list --csv --limit", [], 0),
        (["deliveries", "list"], "deliveries list", [], 0),
        (["deliveries", "backlog", "--json"], "deliveries backlog --json", [], 0),
        (["reprocess", f"--study={UID}", "--no-wait"], "reprocess --study --no-wait", [UID], 1),
        (["resend", "--study", UID], "resend --study", [UID], 1),
        (["prune", "--dry-run"], "prune --dry-run", [], 0),
        (["audit", "list", "--limit", "3"], "audit list --limit", [], 0),
    ]
    for argv, _action, _studies, status in commands:
        result = run_cli(env, *argv, cwd=data)
        assert result.returncode == status, (argv, result.stderr)
        assert "audit record" not in result.stderr
    shown = json.loads(run_cli(env, "audit", "list", "--json", "--limit", "100", cwd=data).stdout)
    records = [r for r in reversed(shown) if r["interface"] == "cli"]
    # the last `audit list --json` is recorded after it printed
    assert len(records) == len(commands), [r["action"] for r in records]
    for record, (_argv, action, studies, status) in zip(records, commands, strict=True):
        assert (record["action"], record["studies"], record["outcome"]) == (action, studies, status)
        assert record["source"] == f"cli:{record['actor']}" and record["actor"]
    url = f"sqlite:///{data / 'pacs-ai.sqlite3'}"
    assert len(_audit(url)) == len(commands) + 1
    assert "ACC-SECRET-2" not in _all_text(url)
    dispose_all()


@pytest.mark.parametrize(
    ("argv", "action"),
    [
        (["patients", "trend", "abcdefabcdefabcd"], "patients trend"),  # a handle of letters
        (["studies", "list", "--accession", "abc"], "studies list --accession"),
        (["run"], "run"),
        (["export", "--study", "1.2.3", "--deidentify=out"], "export --study --deidentify"),
    ],
)
def test_cli_record_keeps_command_words_not_values(argv: list[str], action: str) -> None:
    import argparse

    from worker.cli.audit import cli_entry

    entry = cli_entry(argparse.Namespace(), argv, 0)
    assert entry.action == action


def test_audit_records_past_their_retention_are_pruned(tmp_path: Path) -> None:
    """PACS_AI_AUDIT_RETENTION_DAYS: `pacs-ai prune` deletes older records only;
    unset, nothing is deleted."""
    import datetime as dt

    from db.repo import AuditEntry, append_audit
    from db.session import session_scope

    data = tmp_path / "data"
    data.mkdir()
    url = f"sqlite:///{data / 'pacs-ai.sqlite3'}"
    upgrade(url)
    now = dt.datetime.now(dt.UTC)
    with session_scope(url) as session:
        for days in (400, 40, 5):
            entry = AuditEntry("api", "read#0", "127.0.0.1", f"GET /api/old-{days}", 200)
            append_audit(session, entry, at=now - dt.timedelta(days=days))
    dispose_all()
    kept = run_cli(cli_env(data_dir=data), "prune", "--json", cwd=data)
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["audit_records_deleted"] == 0
    pruned = run_cli(cli_env(data_dir=data, audit_retention_days=30), "prune", "--json", cwd=data)
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["audit_records_deleted"] == 2
    actions = [r["action"] for r in _audit(url)]
    assert "GET /api/old-5" in actions
    assert not [a for a in actions if a in ("GET /api/old-40", "GET /api/old-400")]
    # the prune commands themselves were audited
    assert actions.count("prune --json") == 2
