"""Latency benchmark (issue 12, done-when 2): what pacs-ai's own plumbing adds.

For each mode (``embedded``: SQLite and the filesystem broker; ``redis``:
SQLite and a private Redis), starts ``pacs-ai run`` in a temp dir with a dcmtk
``storescp`` as its destination, then sends a chest CT phantom (default 30 x
256x256) in one association, one study after another, and measures

    last instance answered -> SR file at the destination
    minus the quiet period (PACS_AI_STABLE_SECONDS)
    minus the job's own run time (its started_at -> finished_at)

and splits it into: study complete -> job created, job created -> started
(queue wait), job finished -> SR at the destination. The first study warms the
worker up (model sessions) and is not counted; the median of the next
``--rounds`` is compared with the target (0.3 s).

    .venv/bin/python -m bench.latency [--rounds 5] [--slices 30] [--size 256]
        [--quiet 1] [--modes embedded,redis]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import NodeProcess, Redis, StoreScpDestination, send_study, utc_seconds
from testkit.phantoms import generate_chest_ct, phantom_to_datasets

TARGET_SECONDS = 0.3


@dataclass
class Round:
    total: float  # last instance -> SR at the destination
    quiet: float
    job: float  # the job's run time
    to_job: float  # last instance -> job created, less the quiet period
    queue_wait: float  # job created -> started
    after_job: float  # job finished -> SR at the destination

    @property
    def overhead(self) -> float:
        return self.total - self.quiet - self.job


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> list[Round]:
    root = work / mode
    dest = StoreScpDestination(root / "dest")
    redis = Redis(root) if mode == "redis" else None
    settings = {
        "stable_seconds": args.quiet,
        "destinations": f"{dest.spec}/sr",
        "listener_processes": 1,
        "ort_threads": args.ort_threads,
    }
    if redis is not None:
        settings["broker_url"] = redis.url
    node = NodeProcess(root / "node", settings)
    phantom = generate_chest_ct(
        12_000_001, matrix=args.size, slices=args.slices, thickness_mm=2.5, nodule=True
    )
    rounds: list[Round] = []
    try:
        node.start()
        for i in range(args.rounds + 1):
            datasets = phantom_to_datasets(phantom, seed=None)  # fresh UIDs each time
            study_uid = str(datasets[0].StudyInstanceUID)
            last = send_study(node.port, datasets)
            sr = dest.wait_for(study_uid, timeout=args.timeout)
            jobs = [j for j in node.json("jobs", "list") if j["study_instance_uid"] == study_uid]
            (job,) = jobs
            created = utc_seconds(job["created_at"])
            started = utc_seconds(job["started_at"])
            finished = utc_seconds(job["finished_at"])
            if job["status"] != "done" or None in (created, started, finished):
                raise RuntimeError(f"job {job['id']} of the study ended {job['status']}")
            assert created is not None and started is not None and finished is not None
            r = Round(
                total=sr.at - last,
                quiet=args.quiet,
                job=finished - started,
                to_job=created - last - args.quiet,
                queue_wait=started - created,
                after_job=sr.at - finished,
            )
            label = "warm-up" if i == 0 else f"round {i}"
            print(
                f"  {mode:<9}{label:<9} total {r.total:6.2f} s = quiet {r.quiet:.2f} + job "
                f"{r.job:5.2f} + plumbing {r.overhead * 1000:5.0f} ms (to job "
                f"{r.to_job * 1000:4.0f}, queue wait {r.queue_wait * 1000:4.0f}, job end -> SR "
                f"{r.after_job * 1000:4.0f} ms)",
                flush=True,
            )
            if i > 0:
                rounds.append(r)
            time.sleep(0.5)
    finally:
        node.stop()
        dest.stop()
        if redis is not None:
            redis.stop()
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="studies measured (median)")
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="rows = columns")
    parser.add_argument("--quiet", type=float, default=1.0, help="PACS_AI_STABLE_SECONDS")
    parser.add_argument("--modes", default="embedded,redis", help="embedded, redis or both")
    parser.add_argument("--ort-threads", type=int, default=0, help="PACS_AI_ORT_THREADS")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for an SR")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for tool in ("storescp", *(["redis-server"] if "redis" in modes else [])):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="pacs-ai-latency-"))
    print(
        f"study: {args.slices} x {args.size}x{args.size} CT phantom, quiet period "
        f"{args.quiet:g} s, {args.rounds} rounds per mode after a warm-up; target: plumbing <= "
        f"{TARGET_SECONDS * 1000:.0f} ms (median)"
    )
    results: dict[str, list[Round]] = {}
    try:
        for mode in modes:
            if mode not in {"embedded", "redis"}:
                raise SystemExit(f"unknown mode {mode!r}")
            results[mode] = run_mode(mode, args, work)
    finally:
        if args.keep:
            print(f"logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{'mode':<10}{'plumbing':>10}{'to job':>9}{'queue':>9}{'job->SR':>9}{'job':>8}  (medians)"
    )
    for mode, rounds in results.items():
        med = statistics.median
        overhead = med(r.overhead for r in rounds)
        print(
            f"{mode:<10}{overhead * 1000:>8.0f}ms{med(r.to_job for r in rounds) * 1000:>7.0f}ms"
            f"{med(r.queue_wait for r in rounds) * 1000:>7.0f}ms"
            f"{med(r.after_job for r in rounds) * 1000:>7.0f}ms{med(r.job for r in rounds):>7.2f}s"
            f"  {'PASS' if overhead <= TARGET_SECONDS else 'MISS'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
