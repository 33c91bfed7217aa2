"""Ingest benchmark (receive issue, done-when 5): pacs-ai's listener vs dcmtk storescp.

Generates one CT series (default 300 slices of 512x512, 16 bit) in a temp dir,
sends the same files with dcmtk ``storescu`` to

  (a) dcmtk ``storescp`` writing into a temp dir; its time includes an fsync of
      every received file and of the output dir afterwards (storescp itself never
      fsyncs, pacs-ai fsyncs every instance before answering success);
  (b) pacs-ai's listener (``python -m worker.cli.main listen``, embedded SQLite, fresh
      data dir per round, ``db upgrade`` first),

with the same maximum PDU size on the wire for both, and prints instances/s,
MB/s, the ratio pacs-ai / storescp (target >= 0.3x) and the listener's peak RSS
(target < 300 MB). Each target runs ``--rounds`` times, alternating, and the
medians are reported. Always exits 0 unless the benchmark itself fails; each
target is reported as PASS or MISS.

With ``--senders N`` (issue 12, done-when 3) it measures instead the aggregate
ingest of N concurrent ``storescu`` (one series each, its own study) into one
listener process and into ``--processes P`` (default: the number of cores)
sharing the port, alternating, and prints the ratio (target >= 1.4x), with
SQLite or, with ``--pg ADMIN_URL``, a fresh PostgreSQL database per round;
every round checks that nothing was lost (every file stored and recorded, one
study per sender) and every storescu succeeded.

    .venv/bin/python -m bench.ingest [--slices 300] [--size 512] [--rounds 3]
    .venv/bin/python -m bench.ingest --senders 4 --slices 100 [--processes 2]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.factory import write_ct_series

REPO = Path(__file__).resolve().parent.parent

RATIO_TARGET = 0.3
SENDERS_TARGET = 1.4  # aggregate ingest, P listener processes / 1
RSS_TARGET_MB = 300.0
CALLED_AET = "PACSAI"


@dataclass
class Result:
    seconds: float
    instances: int
    nbytes: int
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None  # the listener's CPU time (all threads)

    @property
    def ips(self) -> float:
        return self.instances / self.seconds

    @property
    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout:.0f} s")


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def storescu(port: int, files: list[Path], pdu: int) -> None:
    cmd = [
        "storescu",
        "-aet", "BENCHSCU",
        "-aec", CALLED_AET,
        "--max-pdu", str(pdu),
        "--max-send-pdu", str(pdu),
        "127.0.0.1", str(port),
        *map(str, files),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=dcmtk_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_storescp(work: Path, files: list[Path], nbytes: int, pdu: int) -> Result:
    out = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--max-pdu", str(pdu), "-od", str(out), "-aet", CALLED_AET, str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        t0 = time.perf_counter()
        storescu(port, files, pdu)
        # storescp never fsyncs: make its files (and their directory) durable too.
        received = [str(p) for p in out.iterdir()]
        subprocess.run(["sync", *received, str(out)], check=True)
        seconds = time.perf_counter() - t0
    finally:
        stop(proc)
    if len(received) != len(files):
        raise RuntimeError(f"storescp stored {len(received)} of {len(files)} files")
    shutil.rmtree(out, ignore_errors=True)
    return Result(seconds, len(files), nbytes)


class RssPoller(threading.Thread):
    """Polls the RSS of a process (and its children) until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rss = self.proc.memory_info().rss
                rss += sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def vm_hwm(pid: int) -> int:
    """The kernel's peak resident set size of ``pid`` in bytes (0 if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pacs_ai_env(data: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env.update(
        PACS_AI_DATA_DIR=str(data),
        PACS_AI_HOST="127.0.0.1",
        PACS_AI_PORT=str(port),
        PACS_AI_AE_TITLE=CALLED_AET,
        PACS_AI_STABLE_SECONDS="1000000",  # no job starts during the benchmark
        PACS_AI_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO),
    )
    return env


def pacs_ai(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli.main", *args], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"pacs-ai {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result


@contextmanager
def fresh_pg(admin_url: str | None) -> Iterator[str | None]:
    """A new, empty PostgreSQL database for one round (dropped after), or None."""
    if not admin_url:
        yield None
        return
    import psycopg

    name = f"pacsai_bench_{uuid.uuid4().hex[:12]}"
    dsn = admin_url.replace("postgresql+psycopg://", "postgresql://")

    def admin(sql: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)

    admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_pacs_ai(
    work: Path,
    groups: list[list[Path]],
    nbytes: int,
    pdu: int,
    keep_log: bool,
    processes: int = 0,
    pg_admin: str | None = None,
) -> Result:
    """One round: a fresh listener (``processes`` sharing the port; 0: the
    default), every group sent by its own concurrent storescu."""
    root = Path(tempfile.mkdtemp(prefix="pacs-ai-", dir=work))
    data = root / "data"
    port = free_port()
    env = pacs_ai_env(data, port)
    if processes:
        env["PACS_AI_LISTENER_PROCESSES"] = str(processes)
    total = sum(len(g) for g in groups)
    with fresh_pg(pg_admin) as database_url:
        if database_url:
            env["PACS_AI_DATABASE_URL"] = database_url
        pacs_ai(env, "db", "upgrade")
        log_path = root / "listener.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli.main", "listen"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
        poller: RssPoller | None = None
        try:
            wait_port(port, proc)
            expected = processes or len(os.sched_getaffinity(0))  # the listener's default
            if expected > 1:
                wait_listening(proc, log_path, expected)  # their start-up is not ingest
            poller = RssPoller(proc.pid)
            poller.start()
            cpu0 = tree_cpu(poller.proc)
            t0 = time.perf_counter()
            concurrently([lambda g=g: storescu(port, g, pdu) for g in groups])
            seconds = time.perf_counter() - t0
            cpu = tree_cpu(poller.proc) - cpu0
            poller.stop()
            peak = max(poller.peak, vm_hwm(proc.pid))
        finally:
            if poller is not None and poller.is_alive():
                poller.stop()
            stop(proc)
        verify_pacs_ai(env, data, total, studies=len(groups))
    if keep_log:
        print(f"  listener log: {log_path}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return Result(seconds, total, nbytes, peak / 2**20, cpu)


def concurrently(calls: list[Callable[[], None]]) -> None:
    """Run the calls in threads at once; raise the first failure."""
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def wait_listening(
    proc: subprocess.Popen[bytes], log_path: Path, count: int, timeout: float = 60.0
) -> None:
    """Until all ``count`` listener processes have logged that they listen.

    The extra processes inherit the listening socket, so it shows in theirs
    before they have even imported anything; their log line comes once they
    accept. Their start-up (about a second of CPU each) is not ingest.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the listener exited with status {proc.returncode}")
        if log_path.read_text(errors="replace").count("dicomnode.scp: listening as") >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{count} listener processes did not start within {timeout:.0f} s")


def tree_cpu(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its children (all threads)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def verify_pacs_ai(env: dict[str, str], data: Path, expected: int, studies: int = 1) -> None:
    storage = data / "storage"
    stored = sum(1 for p in storage.rglob("*.dcm") if ".incoming" not in p.parts)
    rows = json.loads(pacs_ai(env, "studies", "list", "--json").stdout)
    in_db = sum(int(s["num_instances"]) for s in rows)
    if stored != expected or in_db != expected or len(rows) != studies:
        raise RuntimeError(
            f"pacs-ai stored {stored} files, {in_db} instances in {len(rows)} studies; "
            f"expected {expected} in {studies}"
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--rounds", type=int, default=3, help="runs per target (medians)")
    parser.add_argument(
        "--pdu", type=int, default=131072, help="max PDU size on the wire (dcmtk: 4096..131072)"
    )
    parser.add_argument("--only", choices=["storescp", "pacs-ai"], help="run one target only")
    parser.add_argument("--keep", action="store_true", help="keep the listener logs")
    parser.add_argument(
        "--senders", type=int, default=1, help="concurrent storescu, one series each (> 1: "
        "compare one listener process with --processes)"
    )  # fmt: skip
    parser.add_argument(
        "--processes", type=int, default=0, help="with --senders: listener processes (0: cores)"
    )
    parser.add_argument("--pg", help="PostgreSQL admin URL: a fresh database per round")
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "sync"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (install dcmtk)", file=sys.stderr)
            return 1
    if args.senders > 1:
        return senders_main(args)

    work = Path(tempfile.mkdtemp(prefix="pacs-ai-bench-"))
    try:
        t0 = time.perf_counter()
        files = write_ct_series(work / "series", args.slices, rows=args.size, cols=args.size)
        nbytes = sum(p.stat().st_size for p in files)
        print(
            f"series: {len(files)} x {args.size}x{args.size} 16-bit CT, "
            f"{nbytes / 1e6:.1f} MB, generated in {time.perf_counter() - t0:.1f} s; "
            f"max PDU {args.pdu}, {args.rounds} rounds per target, {os.cpu_count()} CPUs"
        )
        dcmtk: list[Result] = []
        ours: list[Result] = []
        for i in range(args.rounds):
            if args.only != "pacs-ai":
                r = run_storescp(work, files, nbytes, args.pdu)
                dcmtk.append(r)
                print(f"  round {i + 1} storescp: {r.seconds:6.2f} s  {r.ips:6.1f} inst/s")
            if args.only != "storescp":
                r = run_pacs_ai(work, [files], nbytes, args.pdu, args.keep, pg_admin=args.pg)
                ours.append(r)
                print(
                    f"  round {i + 1} pacs-ai : {r.seconds:6.2f} s  {r.ips:6.1f} inst/s  "
                    f"peak RSS {r.peak_rss_mb:.0f} MB  "
                    f"listener CPU {1000 * (r.cpu_seconds or 0) / r.instances:.1f} ms/instance"
                )
        report(dcmtk, ours)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def senders_main(args: argparse.Namespace) -> int:
    """Aggregate ingest of ``--senders`` concurrent associations: one listener
    process vs ``--processes`` sharing the port."""
    processes = args.processes or len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="pacs-ai-bench-"))
    try:
        t0 = time.perf_counter()
        groups = [
            write_ct_series(work / f"series{i}", args.slices, rows=args.size, cols=args.size)
            for i in range(args.senders)
        ]
        nbytes = sum(p.stat().st_size for g in groups for p in g)
        print(
            f"{args.senders} senders x {args.slices} x {args.size}x{args.size} 16-bit CT "
            f"(one study each), {nbytes / 1e6:.1f} MB in all, generated in "
            f"{time.perf_counter() - t0:.1f} s; max PDU {args.pdu}; "
            f"{'PostgreSQL' if args.pg else 'SQLite'}; 1 vs {processes} listener processes, "
            f"{args.rounds} rounds each; {os.cpu_count()} CPUs"
        )
        results: dict[int, list[Result]] = {1: [], processes: []}
        for i in range(args.rounds):
            for n in results:
                r = run_pacs_ai(work, groups, nbytes, args.pdu, args.keep, n, args.pg)
                results[n].append(r)
                print(
                    f"  round {i + 1} {n} process{'es' if n > 1 else '  '}: {r.seconds:6.2f} s  "
                    f"{r.ips:6.1f} inst/s  {r.mbps:6.1f} MB/s  peak RSS {r.peak_rss_mb:.0f} MB  "
                    f"CPU {1000 * (r.cpu_seconds or 0) / r.instances:.1f} ms/instance",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'listener processes':<20}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}{'peak RSS MB':>13}")
    for n, rs in results.items():
        med = statistics.median
        print(
            f"{n:<20}{med(r.seconds for r in rs):>9.2f}{med(r.ips for r in rs):>9.1f}"
            f"{med(r.mbps for r in rs):>9.1f}{max(r.peak_rss_mb or 0 for r in rs):>13.0f}"
        )
    print("(medians; peak RSS: the most of all the listener's processes together)")
    ratio = statistics.median(r.ips for r in results[processes]) / statistics.median(
        r.ips for r in results[1]
    )
    print(
        f"aggregate ingest, {processes} processes / 1: {ratio:.2f}x (target >= "
        f"{SENDERS_TARGET}x)  {verdict(ratio >= SENDERS_TARGET)}; nothing lost, every "
        "storescu succeeded (checked each round)"
    )
    return 0


def report(dcmtk: list[Result], ours: list[Result]) -> None:
    def med(rs: list[Result], attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in rs)

    print()
    print(f"{'target':<22}{'seconds':>9}{'inst/s':>9}{'MB/s':>9}{'peak RSS MB':>13}")
    if dcmtk:
        print(
            f"{'dcmtk storescp + sync':<22}{med(dcmtk, 'seconds'):>9.2f}"
            f"{med(dcmtk, 'ips'):>9.1f}{med(dcmtk, 'mbps'):>9.1f}{'-':>13}"
        )
    if ours:
        print(
            f"{'pacs-ai listener':<22}{med(ours, 'seconds'):>9.2f}"
            f"{med(ours, 'ips'):>9.1f}{med(ours, 'mbps'):>9.1f}{med(ours, 'peak_rss_mb'):>13.0f}"
        )
    print("(medians)")
    if ours:
        cpu = statistics.median((r.cpu_seconds or 0) / r.instances for r in ours)
        print(f"listener CPU time (user + system, all threads): {1000 * cpu:.1f} ms per instance")
    print()
    if dcmtk and ours:
        ratio = med(ours, "ips") / med(dcmtk, "ips")
        print(f"throughput ratio pacs-ai / storescp: {ratio:.2f}x "
              f"(target >= {RATIO_TARGET}x)  {verdict(ratio >= RATIO_TARGET)}")  # fmt: skip
    if ours:
        peak = max(r.peak_rss_mb or 0.0 for r in ours)
        print(f"listener peak RSS: {peak:.0f} MB (max of rounds; target < {RSS_TARGET_MB:.0f} MB)  "
              f"{verdict(peak < RSS_TARGET_MB)}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
