"""Load benchmark (issue 12, done-when 4): the whole node under sustained load.

Starts ``pacs-ai run`` (listener processes, inference worker, dispatcher, API)
in a temp dir with a dcmtk ``storescp`` as its destination (SR only). N sender
processes (default 3, like three modalities) send their share of the studies
(default 50 chest CT phantoms of 100 slices, alternating 256x256 and 512x512),
one association per study, one study after another, with fresh UIDs each.
Then it prints

- throughput: studies per minute (first instance sent -> last SR delivered) and
  MB/s in (bytes stored / time the senders took);
- last instance answered -> SR at the destination: p50, p95, max (this includes
  the quiet period, ``--quiet``, and the time a study waits behind others);
- the job queue wait (job created -> started): p50, p95, max;
- the peak RSS of every process of the node, sampled over the run, and whether
  it stays flat: the median of the last tenth of the samples after warm-up (an
  SR delivered for a study of every size) within 10% of the median of the
  first tenth;
- checks: every study's SR arrived exactly once (storescp keeps every object it
  receives in its own file), no job failed, every SR delivery ``sent``.

    .venv/bin/python -m bench.load [--senders 3] [--studies 50] [--slices 100]
        [--sizes 256,512] [--quiet 2] [--mode embedded|redis] [--database-url URL]

Small, for a busy machine: ``--studies 6 --slices 20``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    NodeProcess,
    Redis,
    StoreScpDestination,
    percentile,
    send_study,
    utc_seconds,
)

RSS_FLAT = 1.10  # last tenth within 10% of the first


@dataclass
class Sent:
    index: int
    study_uid: str
    size: int
    started: float  # wall time of the association
    last: float  # wall time the last instance was answered


def sender(
    port: int, work: list[tuple[int, int]], slices: int, out: Any, seed_base: int = 12_100_000
) -> None:
    """One modality: sends its studies one after another (runs in its own process)."""
    from pydicom.uid import generate_uid

    from testkit.phantoms import generate_chest_ct, phantom_to_datasets

    templates: dict[int, list[Any]] = {}
    for index, size in work:
        if size not in templates:
            phantom = generate_chest_ct(
                seed_base + size, matrix=size, slices=slices, thickness_mm=2.5, nodule=True
            )
            templates[size] = phantom_to_datasets(phantom, seed=None)
        datasets = templates[size]
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for ds in datasets:  # fresh UIDs: a new study each time
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        started = time.time()
        try:
            last = send_study(port, datasets, calling=f"MODALITY{index % 100}")
        except Exception as exc:  # noqa: BLE001 - reported; the next study goes on
            when = time.strftime("%H:%M:%S")
            out.put(("error", f"study {index} ({study}) at {when}: {type(exc).__name__}: {exc}"))
            continue
        out.put(("sent", Sent(index, str(study), size, started, last)))
    out.put(("done", None))


class RssSampler(threading.Thread):
    """Samples the RSS of every process of the node."""

    def __init__(self, node: NodeProcess, interval: float) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.interval = interval
        self.samples: list[tuple[float, int, str, int]] = []  # (time, pid, role, rss)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = time.time()
            for pid, role in self.node.processes().items():
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue
                self.samples.append((now, pid, role, rss))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def stored_bytes(url: str) -> int:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            value = conn.execute(
                text("SELECT COALESCE(SUM(size_bytes), 0) FROM instances WHERE NOT produced_by_us")
            ).scalar()
    finally:
        engine.dispose()
    return int(value or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--sizes", default="256,512", help="matrices, used in turn")
    parser.add_argument("--quiet", type=float, default=2.0, help="PACS_AI_STABLE_SECONDS")
    parser.add_argument("--mode", choices=["embedded", "redis"], default="embedded")
    parser.add_argument("--database-url", default="", help="an empty database (else SQLite)")
    parser.add_argument("--listener-processes", type=int, default=0, help="0: the cores")
    parser.add_argument("--sample", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    for tool in ("storescp", *(["redis-server"] if args.mode == "redis" else [])):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 1

    work = Path(tempfile.mkdtemp(prefix="pacs-ai-load-"))
    dest = StoreScpDestination(work / "dest", interval=0.02)
    redis = Redis(work) if args.mode == "redis" else None
    settings: dict[str, Any] = {
        "stable_seconds": args.quiet,
        "destinations": f"{dest.spec}/sr",
        "listener_processes": args.listener_processes,
    }
    if redis is not None:
        settings["broker_url"] = redis.url
    if args.database_url:
        settings["database_url"] = args.database_url
    node = NodeProcess(work / "node", settings)
    url = args.database_url or f"sqlite:///{work / 'node' / 'data' / 'pacs-ai.sqlite3'}"
    print(
        f"load: {args.senders} senders, {args.studies} studies of {args.slices} slices "
        f"({' and '.join(f'{s}x{s}' for s in sizes)} in turn), quiet period {args.quiet:g} s, "
        f"{args.mode}, {'PostgreSQL' if args.database_url else 'SQLite'}, "
        f"{psutil.cpu_count()} CPUs",
        flush=True,
    )
    sent: dict[str, Sent] = {}
    errors: list[str] = []
    sampler: RssSampler | None = None
    try:
        node.start()
        sampler = RssSampler(node, args.sample)
        sampler.start()
        shares: list[list[tuple[int, int]]] = [[] for _ in range(args.senders)]
        for i in range(args.studies):
            shares[i % args.senders].append((i, sizes[i % len(sizes)]))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=sender, args=(node.port, share, args.slices, queue))
            for share in shares
            if share
        ]
        t_start = time.time()
        for p in procs:
            p.start()
        running = len(procs)
        deadline = time.monotonic() + args.timeout
        while running:
            kind, item = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "sent":
                sent[item.study_uid] = item
                if len(sent) % max(1, args.studies // 10) == 0:
                    print(f"  {len(sent)}/{args.studies} studies sent", flush=True)
            elif kind == "error":
                errors.append(item)
            else:
                running -= 1
        for p in procs:
            p.join(10)
        t_sent = max((s.last for s in sent.values()), default=time.time())
        first_sent = min((s.started for s in sent.values()), default=t_start)
        for uid in sent:  # (a study a sender failed to send in full is not waited for)
            dest.wait_for(uid, timeout=max(1.0, deadline - time.monotonic()))
        time.sleep(max(2.0, 3 * args.sample))  # a duplicate would arrive by now
        sampler.stop()
        jobs = node.json("jobs", "list")
        deliveries = node.json("deliveries", "list")
        nbytes = stored_bytes(url)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        node.stop()
        dest.stop()
        if redis is not None:
            redis.stop()

    arrivals = {uid: dest.of(uid) for uid in sent}
    t_end = max(min(a.at for a in arr) for arr in arrivals.values())
    latencies = [min(a.at for a in arrivals[uid]) - s.last for uid, s in sent.items()]
    waits = []
    for job in jobs:
        created, started = utc_seconds(job["created_at"]), utc_seconds(job["started_at"])
        if created is not None and started is not None and job["attempts"] == 1:
            waits.append(started - created)
    failed = [j for j in jobs if j["status"] == "failed"]
    not_once = {uid: len(arr) for uid, arr in arrivals.items() if len(arr) != 1}
    sr_rows = [d for d in deliveries if d["kind"] == "sr"]
    unsent = [d for d in sr_rows if d["status"] != "sent"]

    minutes = (t_end - first_sent) / 60
    print()
    print(f"studies: {len(sent)} sent, {sum(1 for a in arrivals.values() if a)} with an SR")
    print(
        f"throughput: {len(sent) / minutes:.1f} studies/min (first sent -> last SR), "
        f"{nbytes / 1e6 / max(t_sent - first_sent, 1e-9):.1f} MB/s in "
        f"({nbytes / 1e6:.0f} MB in {t_sent - first_sent:.1f} s)"
    )
    print(
        f"last instance -> SR delivered: p50 {percentile(latencies, 50):.2f} s, "
        f"p95 {percentile(latencies, 95):.2f} s, max {max(latencies):.2f} s "
        f"(quiet period {args.quiet:g} s included)"
    )
    print(
        f"job queue wait: p50 {percentile(waits, 50):.2f} s, p95 {percentile(waits, 95):.2f} s, "
        f"max {max(waits, default=float('nan')):.2f} s ({len(jobs)} jobs)"
    )
    print()
    print(f"{'process':<22}{'pid':>8}{'peak MB':>9}{'first 10%':>11}{'last 10%':>10}  flat")
    # warmed up: a study of every size has been through (model sessions, buffers)
    first_sr: dict[int, float] = {}
    for uid, s in sent.items():
        at = min(a.at for a in arrivals[uid])
        first_sr[s.size] = min(at, first_sr.get(s.size, at))
    warm = max(first_sr.values())
    by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
    roles: dict[int, str] = {}
    assert sampler is not None
    for t, pid, role, rss in sampler.samples:
        by_pid[pid].append((t, rss))
        roles[pid] = role
    all_flat = True
    for pid in sorted(by_pid, key=lambda p: (roles[p], p)):
        series = by_pid[pid]
        peak = max(r for _, r in series) / 2**20
        after = [r for t, r in series if t >= warm]
        tenth = max(1, len(after) // 10)
        if len(after) >= 10:
            first = statistics.median(after[:tenth]) / 2**20
            last = statistics.median(after[-tenth:]) / 2**20
            flat = last <= first * RSS_FLAT
            all_flat &= flat
            shown = f"{first:>11.0f}{last:>10.0f}  {'yes' if flat else 'NO'}"
        else:
            shown = f"{'-':>11}{'-':>10}  (too few samples after warm-up)"
        print(f"{roles[pid]:<22}{pid:>8}{peak:>9.0f}{shown}")
    print()
    checks = {
        "no sender error": not errors,
        "every SR delivered exactly once": not not_once and len(arrivals) == args.studies,
        "no job failed": not failed,
        "every SR delivery sent": bool(sr_rows) and not unsent,
        "every process's RSS flat": all_flat,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    for e in errors[:5]:
        print(f"  sender error: {e}")
    if not_once:
        print(f"  SR arrivals per study not 1: {list(not_once.values())[:10]}")
    if failed:
        print(f"  failed jobs: {[(j['id'], j['error']) for j in failed[:5]]}")
    if args.keep or not all(checks.values()):
        print(f"logs in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
