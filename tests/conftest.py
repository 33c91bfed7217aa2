"""Shared fixtures: real pacs-ai processes, real PostgreSQL and Redis, a DICOM SCU."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context

from db.models import Job, Result, Study
from db.repo import InstanceRecord
from db.session import session_scope
from dicomnode.uids import relative_instance_path, uid_digest
from tests.factory import CANARY_ID, CANARY_NAME
from worker.settings import DEMO_MODELS_DIR

PG_ADMIN_URL = os.environ.get(
    "PACS_AI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REPO = Path(__file__).resolve().parent.parent

#: for the tests that run the demo models (``make models`` builds them)
needs_demo_models = pytest.mark.skipif(
    not list(DEMO_MODELS_DIR.glob("*.json")), reason="demo models not built"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- DICOM SCU ----------------------------------------------------------------


def send_datasets(
    port: int,
    items: Sequence[Path | Dataset],
    ae_title: str = "TESTSCU",
    called: str = "PACSAI",
) -> list[int]:
    """C-STORE each item in one association, proposing each file's own transfer
    syntax (as a PACS does). Returns the status of each C-STORE (-1 if none)."""
    datasets = [dcmread(p) if isinstance(p, Path) else p for p in items]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    assert len(pairs) <= 128
    contexts = [build_context(sop, [ts]) for sop, ts in sorted(pairs)]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def canary_chest_ct(seed: int) -> list[Dataset]:
    """The end-to-end chest CT phantom: 24 slices of 2.5 mm, 128 x 128, one 16 mm
    nodule, in shuffled order, with the canary patient name and ID."""
    from testkit.phantoms import generate_chest_ct, phantom_to_datasets

    phantom = generate_chest_ct(
        seed, matrix=128, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
    )
    return list(
        phantom_to_datasets(
            phantom, shuffle=True, seed=seed, patient_name=CANARY_NAME, patient_id=CANARY_ID
        )
    )


def ct_record(
    study: str, series: str, sop: str, size_bytes: int = 100, **fields: Any
) -> InstanceRecord:
    """What the listener records for a CT instance (Explicit VR Little Endian)
    at its storage path; ``fields``: the record's optional fields."""
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        rel_path=relative_instance_path(study, series, sop),
        size_bytes=size_bytes,
        **fields,
    )


# -- services -----------------------------------------------------------------


def _pg_exec(sql: str) -> None:
    import psycopg

    dsn = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the local server."""
    name = f"pacsai_test_{uuid.uuid4().hex[:12]}"
    _pg_exec(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _pg_exec(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_block(url: str, blocked: bool) -> None:
    """Make a test database unreachable (and cut its sessions), or reachable again."""
    name = url.rsplit("/", 1)[1]
    _pg_exec(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if blocked else "true"}')
    if blocked:
        _pg_exec(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flushall(self) -> None:
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis on a free port (so a test may flush or kill it)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(port), 10, what="redis")
    yield RedisServer(port, proc)
    proc.terminate()
    proc.wait(10)


# -- pacs-ai processes ----------------------------------------------------------


def cli_env(**settings: Any) -> dict[str, str]:
    """This process's environment without its ``PACS_AI_*`` variables, plus these
    settings (``data_dir=...`` is ``PACS_AI_DATA_DIR``), with this checkout on
    ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env["PYTHONPATH"] = str(REPO)
    env.update({f"PACS_AI_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def run_cli(
    env: dict[str, str], *args: str, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``pacs-ai ARGS`` in a child process with this environment (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@dataclass
class Node:
    """A pacs-ai installation in a temp dir, driven through its real CLI."""

    root: Path
    env: dict[str, str]
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def storage(self) -> Path:
        return Path(self.env["PACS_AI_DATA_DIR"]) / "storage"

    @property
    def api_url(self) -> str:
        """The base URL of the API that ``pacs-ai run`` serves."""
        return f"http://127.0.0.1:{self.env['PACS_AI_API_PORT']}"

    def study_dir(self, study_uid: str) -> Path:
        """Where the study's instances are stored (the folder need not exist)."""
        digest = uid_digest(study_uid)
        return self.storage / digest[:2] / digest[:32]

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = run_cli(self.env, *args, cwd=self.root, timeout=timeout)
        with open(self.log_dir / "cli.log", "a") as fh:
            fh.write(result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"pacs-ai {' '.join(args)} failed: {result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", *(args or (name,))],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_listener(self) -> None:
        self.start("listen")
        wait_for(lambda: port_open(self.port), 30, what="listener port")

    def start_run(self, timeout: float = 60, api: bool = False) -> None:
        """``pacs-ai run`` (listener, workers and API); wait for the listener's port
        (and, with ``api``, the API's)."""
        self.start("run")
        wait_for(lambda: port_open(self.port), timeout, what="listener")
        if api:
            api_port = int(self.env["PACS_AI_API_PORT"])
            wait_for(lambda: port_open(api_port), timeout, what="API")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def logs(self) -> str:
        if not self.log_dir.exists():
            return ""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def studies(self) -> list[dict[str, Any]]:
        return list(self.json("studies", "list"))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self.json("jobs", "list"))

    def deliveries(self, *args: str, to: str = "") -> list[dict[str, Any]]:
        """``pacs-ai deliveries list ARGS``: those whose destination starts with ``to``."""
        rows = self.json("deliveries", "list", *args)
        return [r for r in rows if r["destination"].startswith(to)]

    def wait_jobs(
        self, study_uids: Sequence[str], status: str = "done", timeout: float = 60
    ) -> list[dict[str, Any]]:
        wanted = set(study_uids)

        def ready() -> list[dict[str, Any]] | None:
            jobs = [j for j in self.jobs() if j["study_instance_uid"] in wanted]
            latest: dict[str, dict[str, Any]] = {}
            for job in sorted(jobs, key=lambda j: j["id"]):
                latest[job["study_instance_uid"]] = job
            if set(latest) == wanted and all(j["status"] == status for j in latest.values()):
                return jobs
            return None

        return list(wait_for(ready, timeout, 0.5, what=f"jobs {status}"))


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    nodes: list[Node] = []

    def make(database_url: str = "", broker_url: str = "", **settings: Any) -> Node:
        root = tmp_path / f"node{len(nodes)}"
        root.mkdir()
        port = free_port()
        defaults: dict[str, Any] = {
            "data_dir": root / "data",
            "port": port,
            "host": "127.0.0.1",
            "stable_seconds": "1",
            "assembler_interval": "0.3",
            "log_level": "DEBUG",
            "api_port": free_port(),  # `run` serves the API too
        }
        if database_url:
            defaults["database_url"] = database_url
        if broker_url:
            defaults["broker_url"] = broker_url
        node = Node(root=root, env=cli_env(**{**defaults, **settings}), port=port)
        node.log_dir.mkdir()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop_all()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's (dicom3tools) errors about a DICOM file; its warnings are
    printed (``pytest -s`` shows them)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    lines = (out.stdout + out.stderr).decode("utf-8", "replace").splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith("Error")]


# -- peers: Orthanc, Chromium -------------------------------------------------------


class Orthanc:
    """A private Orthanc (Debian ``orthanc``) on free ports, filled and read over
    its REST API (a status of 400 or more fails the test)."""

    def __init__(self, folder: Path, name: str = "pacs-ai-test") -> None:
        self.folder = folder
        self.name = name
        self.http_port = free_port()
        self.dicom_port = free_port()
        #: sent with every REST call (``Authorization``, when it is switched on)
        self.headers: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, pacs_ai_port: int | None = None, **config: Any) -> None:
        """Write its configuration and start it; ``pacs_ai_port``: pacs-ai's
        listener, Orthanc's modality ``pacsai`` (where a C-MOVE to PACSAI or
        ``/modalities/pacsai/store`` sends); ``config`` adds or replaces entries."""
        self.folder.mkdir(parents=True, exist_ok=True)
        modalities = {"pacsai": ["PACSAI", "127.0.0.1", pacs_ai_port]} if pacs_ai_port else {}
        settings = {
            "Name": self.name,
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities,
            "Plugins": [],
            "HttpServerEnabled": True,
            **config,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(settings))
        with open(self.folder / "orthanc.log", "wb") as log:  # the child keeps its copy
            self._proc = subprocess.Popen(
                ["Orthanc", str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(
            lambda: port_open(self.http_port) and port_open(self.dicom_port), 30, what="Orthanc"
        )

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            self._proc = None

    def call(self, method: str, path: str, body: bytes | None = None) -> Any:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=self.headers)
            rsp = conn.getresponse()
            data = rsp.read()
            if rsp.status >= 400:
                raise AssertionError(f"Orthanc {method} {path}: {rsp.status} {data[:200]!r}")
        finally:
            conn.close()
        return json.loads(data) if data else None

    def upload(self, datasets: Sequence[Dataset]) -> None:
        """Store each dataset in Orthanc (``POST /instances``)."""
        import io

        for ds in datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.call("POST", "/instances", buf.getvalue())


@pytest.fixture
def orthanc_server(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc not started yet (its ports are chosen), stopped after the test;
    the test is skipped where Orthanc is not installed."""
    if not have("Orthanc"):
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    server = Orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop()


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Chromium as root in a container: no sandbox, no GPU, no network of its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextmanager
def headless_chromium(*flags: str, console_log: bool = False) -> Iterator[Any]:
    """Debian's Chromium (never a downloaded one) through chromedriver (selenium),
    with :data:`CHROMIUM_FLAGS` and ``flags``; ``console_log`` keeps the pages'
    console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, *flags):
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium with a 1440 x 2000 window (skipped without Debian's
    chromium and chromium-driver)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian packages chromium and chromium-driver are not installed")
    with headless_chromium("--window-size=1440,2000") as driver:
        yield driver


# -- helpers for fault and security tests ----------------------------------------


def send_files_raw(
    port: int,
    paths: Sequence[Path],
    ae_title: str = "TESTSCU",
    called: str = "PACSAI",
) -> list[int]:
    """C-STORE Part 10 files in one association, sending each file's dataset
    bytes exactly as they are on disk (pynetdicom's chunked send: nothing is
    decoded or re-encoded, so truncated or garbage datasets go out as they are).
    Each file's own transfer syntax is proposed. Returns the statuses."""
    from pynetdicom import _config
    from pynetdicom.dsutils import split_dataset

    metas = [split_dataset(Path(p))[0] for p in paths]
    pairs = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    contexts = [build_context(sop, [ts]) for sop, ts in sorted(pairs)]
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=called)
        assert assoc.is_established, "association was not accepted"
        statuses = []
        try:
            for path in paths:
                status = assoc.send_c_store(Path(path))
                statuses.append(int(status.Status) if "Status" in status else -1)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    return statuses


def listener_node(node_factory: NodeFactory, **settings: Any) -> Node:
    """A node running only its listener (SQLite, migrated): for storage tests."""
    node = node_factory(**settings)
    node.cli("db", "upgrade")
    node.start_listener()
    return node


def node_db_url(node: Node) -> str:
    url = node.env.get("PACS_AI_DATABASE_URL")
    return url or f"sqlite:///{node.env['PACS_AI_DATA_DIR']}/pacs-ai.sqlite3"


def db_rows(node: Node, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run a read-only SQL query on the node's database (no pooled connections)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(node_db_url(node), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params).all()]
    finally:
        engine.dispose()


def db_count(node: Node, table: str) -> int:
    return int(db_rows(node, f"SELECT count(*) FROM {table}")[0][0])


def stored_files(node: Node) -> list[Path]:
    """Committed instance files in the node's storage (not the incoming dir)."""
    if not node.storage.exists():
        return []
    return sorted(p for p in node.storage.rglob("*") if p.is_file() and ".incoming" not in p.parts)


def incoming_files(node: Node) -> list[Path]:
    inc = node.storage / ".incoming"
    return sorted(p for p in inc.rglob("*") if p.is_file()) if inc.exists() else []


@contextmanager
def scu_sends_any_uid() -> Iterator[None]:
    """Let this process's pynetdicom (the SCU side only) put any value into a
    request's UID parameters, so that a hostile or overlong SOP Instance UID
    reaches the listener under test, which must refuse it itself."""
    from pynetdicom import _config

    saved = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.VALIDATORS["UI"] = saved


# -- processed studies, straight into the database ------------------------------------

SEG_MODEL_NAME = "chest-ct-lung-seg"


def nodule_component(volume: float) -> dict[str, Any]:
    return {"volume_ml": volume, "max_diameter_mm": 10.0, "centroid_mm": None}


def add_processed_study(
    url: str, uid: str, patient: str | None, date: dt.date | None, volumes: list[float]
) -> tuple[int, list[dict[str, Any]]]:
    """A processed study (its job done) in the database at ``url``: a nodule
    result with one component per volume, a lung result (no components) and a
    classification result; returns its id and its nodule record (for priors)."""
    with session_scope(url) as session:
        study = Study(study_instance_uid=uid, patient_key=patient, study_date=date)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, status="done")
        session.add(job)
        session.flush()
        common: dict[str, Any] = {
            "model": SEG_MODEL_NAME,
            "model_version": "1",
            "model_sha256": "0" * 64,
            "series_instance_uid": uid + ".1",
        }
        nodule: dict[str, Any] = {
            **common,
            "kind": "segmentation",
            "finding_code_value": "N",
            "finding_code_scheme": "SCT",
            "finding": "Lung nodule",
            "label_value": 2,
            "present": True,
            "measurements": {
                "volume_ml": sum(volumes),
                "count": len(volumes),
                "components": [nodule_component(v) for v in volumes],
            },
        }
        lung = {
            **common,
            "kind": "segmentation",
            "finding_code_value": "L",
            "finding_code_scheme": "SCT",
            "finding": "Lung",
            "label_value": 1,
            "present": True,
            "measurements": {"volume_ml": 4200.0},
        }
        score = {
            **common,
            "model": "chest-ct-nodule-cls",
            "kind": "classification",
            "finding_code_value": "N",
            "finding_code_scheme": "SCT",
            "finding": "Lung nodule",
            "probability": 0.9,
            "present": True,
        }
        for row in (nodule, lung, score):
            session.add(Result(study_id=study.id, job_id=job.id, **row))
        return study.id, [nodule]
