"""What the end-to-end benchmarks share: a pacs-ai node run through its CLI in a
temp dir, a private Redis, a dcmtk ``storescp`` destination that notes when each
result object arrives, and a C-STORE sender.

Not a benchmark itself; ``bench.latency`` and ``bench.load`` use it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context

REPO = Path(__file__).resolve().parent.parent
CALLED_AET = "PACSAI"
DEST_AET = "BENCHDEST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait(10)


def utc_seconds(iso: str | None) -> float | None:
    """An ISO time from the CLI's JSON as seconds since the epoch."""
    import datetime as dt

    if not iso:
        return None
    value = dt.datetime.fromisoformat(iso)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


# -- Redis ---------------------------------------------------------------------


class Redis:
    """A private, throw-away Redis on a free port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, self.proc, 10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.proc)


# -- the destination -------------------------------------------------------------


@dataclass
class Arrival:
    sop_instance_uid: str
    modality: str
    at: float  # the file's modification time (seconds since the epoch)


class StoreScpDestination:
    """dcmtk ``storescp`` writing every object it receives into its own file
    (``--unique-filenames``: an object sent twice shows as two files); a thread
    reads each new file's header and records when it arrived, per study."""

    def __init__(self, folder: Path, interval: float = 0.005) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.interval = interval
        self.proc = subprocess.Popen(
            ["storescp", "--unique-filenames", "-od", str(folder), "-aet", DEST_AET,
             str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, self.proc, 10)
        self.arrivals: dict[str, list[Arrival]] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @property
    def spec(self) -> str:
        return f"{DEST_AET}@127.0.0.1:{self.port}"

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                names = os.listdir(self.folder)
            except OSError:
                names = []
            for name in names:
                if name in self._seen:
                    continue
                path = self.folder / name
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                    mtime = path.stat().st_mtime
                    study = str(ds.StudyInstanceUID)
                    arrival = Arrival(str(ds.SOPInstanceUID), str(ds.get("Modality", "")), mtime)
                except Exception:  # noqa: BLE001 - still being written: next round
                    continue
                self._seen.add(name)
                with self._lock:
                    self.arrivals.setdefault(study, []).append(arrival)
            self._stop.wait(self.interval)

    def of(self, study_uid: str, modality: str = "SR") -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals.get(study_uid, []) if a.modality == modality]

    def wait_for(self, study_uid: str, modality: str = "SR", timeout: float = 300) -> Arrival:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(study_uid, modality)
            if found:
                return min(found, key=lambda a: a.at)
            time.sleep(self.interval)
        raise RuntimeError(f"no {modality} of study {study_uid} within {timeout:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        stop_process(self.proc)


# -- the node --------------------------------------------------------------------


@dataclass
class NodeProcess:
    """``pacs-ai run`` (listener, inference worker, dispatcher, API) in a temp dir."""

    root: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
        env.update(
            PACS_AI_DATA_DIR=str(self.root / "data"),
            PACS_AI_HOST="127.0.0.1",
            PACS_AI_PORT=str(self.port),
            PACS_AI_AE_TITLE=CALLED_AET,
            PACS_AI_API_PORT=str(free_port()),
            PACS_AI_LOG_LEVEL="INFO",
            PYTHONPATH=str(REPO),
        )
        env.update({f"PACS_AI_{k.upper()}": str(v) for k, v in self.settings.items()})
        self.env = env

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pacs-ai {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def start(self) -> None:
        self.cli("db", "upgrade")
        log = open(self.root / "node.log", "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli.main", "run"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        wait_port(self.port, self.proc, 90)

    def processes(self) -> dict[int, str]:
        """pid -> role of every process of the node (the role from its command line)."""
        if self.proc is None:
            return {}
        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return {}
        roles: dict[int, str] = {}
        for p in procs:
            try:
                cmd = p.cmdline()
                parent = p.ppid()
            except psutil.Error:
                continue
            role = _role(cmd)
            if parent in roles and roles[parent].split(" ")[0] == role:
                role = f"{role} (extra)" if role == "listener" else f"{role} (pool)"
            roles[p.pid] = role
        return roles

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, group=True)
            self.proc = None


def _role(cmd: Sequence[str]) -> str:
    args = list(cmd)
    if "listen" in args:
        return "listener"
    if "worker" in args:
        return "dispatcher" if "dispatch" in args else "worker"
    if "api" in args:
        return "api"
    if "run" in args:
        return "run"
    return " ".join(args[:3])


# -- the sender ------------------------------------------------------------------


def send_study(port: int, datasets: Sequence[Dataset], calling: str = "BENCHSCU") -> float:
    """C-STORE a study in one association; returns the wall time (epoch seconds)
    when the last response came back. Raises on any non-success status."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    pairs = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
    contexts = [build_context(sop, [ts]) for sop, ts in pairs]
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title=CALLED_AET)
    if not assoc.is_established:
        raise RuntimeError("association with pacs-ai not established")
    last = 0.0
    try:
        for i, ds in enumerate(datasets):
            status = assoc.send_c_store(ds)
            last = time.time()
            if "Status" not in status:
                state = "aborted" if assoc.is_aborted else "timed out or lost"
                raise RuntimeError(
                    f"no C-STORE response to instance {i + 1} of {len(datasets)} "
                    f"(association {state})"
                )
            if int(status.Status) != 0:
                raise RuntimeError(f"C-STORE answered 0x{int(status.Status):04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return last


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
