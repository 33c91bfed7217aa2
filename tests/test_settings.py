"""Settings: defaults, derived values, and one readable line for every bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PACS_AI_"):
            monkeypatch.delenv(key)


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.data_dir == Path("./pacs-ai-data")
    assert s.data_path == tmp_path.resolve() / "pacs-ai-data"
    assert s.ae_title == "PACSAI"
    assert s.host == "0.0.0.0"
    assert s.port == 11112
    assert s.stable_seconds == 30.0
    assert s.allowed_aets == frozenset()
    assert s.max_pdu_size == 262144 and s.tls_port == 0 and s.max_associations == 32
    assert s.network_timeout == 60.0
    assert s.assembler_interval == 1.0
    assert s.reconcile_interval == 60.0
    assert s.requeue_after_seconds == 600.0
    assert s.task_soft_time_limit == 1800.0
    assert s.task_time_limit == 1900.0
    assert s.worker_concurrency == 1
    assert s.job_max_attempts == 3
    assert s.models_dir is None
    assert s.ort_threads == 0
    assert s.ort_providers == "CPUExecutionProvider"
    assert s.model_time_limit == 600.0
    assert s.log_level == "INFO"
    assert s.log_format == "text"
    # embedded defaults: SQLite file and filesystem broker inside the data dir
    assert s.storage_path == s.data_path / "storage"
    assert s.effective_database_url == f"sqlite:///{s.data_path / 'pacs-ai.sqlite3'}"
    assert s.is_filesystem_broker
    assert s.effective_broker_url == "filesystem://"
    assert s.broker_folder == s.data_path / "broker"


def test_every_setting_is_documented() -> None:
    """The README's configuration table names every setting."""
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`PACS_AI_{name.upper()}`" in readme, name


def test_environment_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "PACS_AI_DATA_DIR": str(tmp_path / "data"),
        "PACS_AI_STORAGE_DIR": str(tmp_path / "shared"),
        "PACS_AI_AE_TITLE": " AI_NODE ",
        "PACS_AI_PORT": "104",
        "PACS_AI_DATABASE_URL": "postgresql+psycopg://pacs@db/pacs",
        "PACS_AI_BROKER_URL": "redis://redis:6379/0",
        "PACS_AI_ALLOWED_CALLING_AETS": "PACS1, PACS2 ,,",
        "PACS_AI_STABLE_SECONDS": "0",
        "PACS_AI_LOG_LEVEL": "debug",
        "PACS_AI_LOG_FORMAT": "json",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    assert s.storage_path == tmp_path / "shared"
    assert s.ae_title == "AI_NODE"
    assert s.port == 104
    assert s.effective_database_url == "postgresql+psycopg://pacs@db/pacs"
    assert not s.is_filesystem_broker
    assert s.effective_broker_url == "redis://redis:6379/0"
    assert s.allowed_aets == frozenset({"PACS1", "PACS2"})
    assert s.stable_seconds == 0
    assert s.log_level == "DEBUG"


def test_empty_variable_means_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DATA_DIR", "STORAGE_DIR", "HOST", "PORT", "AE_TITLE", "DATABASE_URL"):
        monkeypatch.setenv(f"PACS_AI_{name}", "")
    s = load_settings()
    assert s.storage_path == tmp_path.resolve() / "pacs-ai-data" / "storage"
    assert s.host == "0.0.0.0" and s.port == 11112 and s.ae_title == "PACSAI"


BAD: list[tuple[str, str]] = [
    ("PORT", "abc"),
    ("PORT", "0"),
    ("PORT", "65536"),
    ("PORT", "1.5"),
    ("AE_TITLE", "   "),
    ("AE_TITLE", "A" * 17),
    ("AE_TITLE", "BAD\\AET"),
    ("AE_TITLE", "TAB\tAET"),
    ("DATABASE_URL", "mysql://user@host/db"),
    ("DATABASE_URL", "postgres.example.org"),
    ("BROKER_URL", "http://redis:6379"),
    ("BROKER_URL", "localhost:6379"),
    ("STABLE_SECONDS", "-1"),
    ("STABLE_SECONDS", "soon"),
    ("STABLE_SECONDS", "inf"),
    ("STABLE_SECONDS", "nan"),
    ("ALLOWED_CALLING_AETS", "PACS1,BAD\\AET"),
    ("ALLOWED_CALLING_AETS", "PACS1," + "B" * 17),
    ("MAX_PDU_SIZE", "-1"),
    ("NETWORK_TIMEOUT", "0"),
    ("NETWORK_TIMEOUT", "inf"),
    ("ASSEMBLER_INTERVAL", "0"),
    ("RECONCILE_INTERVAL", "-5"),
    ("REQUEUE_AFTER_SECONDS", "0"),
    ("TASK_SOFT_TIME_LIMIT", "0"),
    ("TASK_TIME_LIMIT", "0"),
    ("TASK_TIME_LIMIT", "1800"),  # not greater than the soft limit
    ("WORKER_CONCURRENCY", "0"),
    ("WORKER_CONCURRENCY", "65"),
    ("JOB_MAX_ATTEMPTS", "0"),
    ("ORT_THREADS", "-1"),
    ("ORT_THREADS", "257"),
    ("MODEL_TIME_LIMIT", "0"),
    ("MODEL_TIME_LIMIT", "inf"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_FORMAT", "xml"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v[:12]!r}" for n, v in BAD])
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"PACS_AI_{name}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid configuration: ")
    assert f"PACS_AI_{name}" in message
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_soft_limit_above_hard_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AI_TASK_SOFT_TIME_LIMIT", "2000")
    with pytest.raises(SettingsError, match="PACS_AI_TASK_TIME_LIMIT must be greater"):
        load_settings()


def test_overrides_are_validated_too() -> None:
    with pytest.raises(SettingsError, match="PACS_AI_PORT"):
        load_settings(port=0)
    assert load_settings(port=2000).port == 2000


@pytest.mark.parametrize("command", [["studies", "list"], ["jobs", "list", "--json"]])
def test_cli_bad_setting_exits_2_with_one_line(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env.update(PACS_AI_PORT="not-a-port", PACS_AI_DATA_DIR=str(tmp_path / "data"))
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pacs-ai: invalid configuration: PACS_AI_PORT")
    assert "not-a-port" in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was created before the check


def test_cli_unmigrated_database_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env.update(PACS_AI_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", "studies", "list", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "pacs-ai: the database schema is not up to date; run `pacs-ai db upgrade`"
    ]


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@pytest.mark.parametrize("name", ["embedded.env", "production.env"])
def test_deploy_examples_are_valid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    values = _env_file(REPO / "deploy" / name)
    known = {f"PACS_AI_{field.upper()}" for field in Settings.model_fields}
    assert set(values) <= known, set(values) - known  # no typo is silently ignored
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    s = load_settings()
    if name == "embedded.env":
        assert s.is_filesystem_broker and s.effective_database_url.startswith("sqlite:///")
    else:
        assert not s.is_filesystem_broker
        assert s.effective_database_url.startswith("postgresql")


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"PACS_AI_ALLOWED_HOSTS": "10.0.0.0/8, not-an-ip"}, "PACS_AI_ALLOWED_HOSTS"),
        ({"PACS_AI_PORT": "0"}, "PACS_AI_TLS_PORT are both 0"),
        ({"PACS_AI_TLS_PORT": "2762"}, "PACS_AI_LISTENER_TLS_CERT"),
        ({"PACS_AI_MAX_PDU_SIZE": "0"}, "PACS_AI_MAX_PDU_SIZE"),
        ({"PACS_AI_MAX_ASSOCIATIONS": "4", "PACS_AI_MAX_ASSOCIATIONS_PER_HOST": "8"}, "PER_HOST"),
        ({"PACS_AI_LISTENER_TLS_CA": "/nonexistent/ca.pem"}, "PACS_AI_LISTENER_TLS_CA"),
    ],
)
def test_listener_network_settings_refused_with_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], fragment: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_allowed_hosts_accepts_addresses_and_cidrs(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.guard import ConnectionGuard, GuardConfig

    monkeypatch.setenv("PACS_AI_ALLOWED_HOSTS", "10.1.0.0/16, 192.168.1.7 ,fd00::/8")
    s = load_settings()
    guard = ConnectionGuard(GuardConfig(allowed_hosts=s.allowed_host_list))
    assert guard.host_allowed("10.1.200.3")
    assert guard.host_allowed("::ffff:192.168.1.7")  # IPv4-mapped
    assert guard.host_allowed("fd00::1")
    assert not guard.host_allowed("10.2.0.1")
    assert not guard.host_allowed("192.168.1.8")
