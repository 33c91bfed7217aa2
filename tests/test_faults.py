"""Faults on the receive path: nothing accepted is ever lost.

Worker killed mid-job, broker messages lost, database down during C-STORE,
duplicates, and instances arriving after a study's job was made. Every test
drives real pacs-ai processes through the CLI and checks the database, the
storage dir and the jobs' outcome.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread

from tests.conftest import (
    Node,
    NodeFactory,
    RedisServer,
    db_rows,
    incoming_files,
    pg_block,
    port_open,
    send_datasets,
    stored_files,
    wait_for,
)
from tests.factory import write_ct_series

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700

#: Short limits so that recovery happens in seconds (a job's lease is renewed by
#: its heartbeat every quarter of it; a dead worker's expires).
FAST = {
    "requeue_after_seconds": 2,
    "reconcile_interval": 0.5,
    "job_lease_seconds": 4,
    "task_soft_time_limit": 5,
    "task_time_limit": 6,
}


def _study_uid(paths: list[Path]) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _jobs(node: Node, study_uid: str) -> list[dict[str, Any]]:
    rows = db_rows(
        node,
        "SELECT j.id, j.status, j.attempts, j.num_instances, j.enqueued_at, j.error "
        "FROM jobs j JOIN studies s ON s.id = j.study_id "
        "WHERE s.study_instance_uid = :uid ORDER BY j.id",
        uid=study_uid,
    )
    keys = ("id", "status", "attempts", "num_instances", "enqueued_at", "error")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _wait_job(
    node: Node, study_uid: str, status: str, count: int = 1, timeout: float = 30
) -> list[dict[str, Any]]:
    """Wait until the study has ``count`` jobs and the latest one is ``status``."""

    def ready() -> list[dict[str, Any]] | None:
        jobs = _jobs(node, study_uid)
        if len(jobs) == count and jobs[-1]["status"] == status:
            return jobs
        if jobs and jobs[-1]["status"] == "failed" and status != "failed":
            raise AssertionError(f"job failed: {jobs[-1]}\n{node.logs()[-4000:]}")
        return None

    return list(wait_for(ready, timeout, 0.1, what=f"{count} job(s) {status}"))


def _instances(node: Node, study_uid: str) -> int:
    return int(
        db_rows(
            node,
            "SELECT count(*) FROM instances i JOIN studies s ON s.id = i.study_id "
            "WHERE s.study_instance_uid = :uid",
            uid=study_uid,
        )[0][0]
    )


def _study(node: Node, study_uid: str) -> dict[str, Any]:
    """The study as the CLI shows it (``pacs-ai studies list --json``)."""
    return next(s for s in node.studies() if s["study_instance_uid"] == study_uid)


def _llen(redis: RedisServer, queue: str = "inference") -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "LLEN", queue],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


@contextmanager
def _table_locked(pg_url: str, table: str) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on a table: every reader of it waits."""
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def _production_node(
    node_factory: NodeFactory, pg_url: str, redis: RedisServer, **settings: Any
) -> Node:
    node = node_factory(database_url=pg_url, broker_url=redis.url, **{**FAST, **settings})
    node.cli("db", "upgrade")
    node.start_listener()
    return node


def _kill(node: Node) -> None:
    """Stop the node's processes at the end of a test (clean shutdown is tested
    elsewhere; SIGKILL of each process group keeps these tests fast)."""
    for name in list(node.procs):
        node.stop(name, signal.SIGKILL)


def _embedded_node(node_factory: NodeFactory, **settings: Any) -> Node:
    node = node_factory(**{**FAST, **settings})
    node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")
    return node


# -- 3. worker SIGKILLed mid-job ------------------------------------------------------


def test_worker_killed_mid_job_is_rerun(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Production mode; the worker's whole process group is SIGKILLed while the
    job is running, and a restarted worker runs the job again to ``done``.

    The default job reads a study far too fast to be caught running, so the job
    is held mid-run the way a busy database would hold it: the test locks the
    instances table, the worker claims the job (``running``, lease taken) and
    then waits on the lock while loading the study.
    """
    node = _production_node(node_factory, pg_url, redis_server)
    series = write_ct_series(tmp_path / "ct", 40, rows=16, cols=16)
    study = _study_uid(series)
    assert send_datasets(node.port, series) == [SUCCESS] * len(series)
    wait_for(lambda: any(j["enqueued_at"] for j in _jobs(node, study)), 30, 0.1, what="job queued")
    job_id = _jobs(node, study)[0]["id"]

    with _table_locked(pg_url, "instances"):
        node.start("worker", "worker", "--concurrency", "1")
        wait_for(lambda: _jobs(node, study)[0]["status"] == "running", 30, 0.05, what="job running")
        time.sleep(0.5)
        assert _jobs(node, study)[0]["status"] == "running"  # held mid-job
        node.stop("worker", signal.SIGKILL)  # kills the process group
    jobs = _jobs(node, study)
    assert [(j["id"], j["status"], j["attempts"]) for j in jobs] == [(job_id, "running", 1)]

    node.start("worker", "worker", "--concurrency", "1")
    jobs = _wait_job(node, study, "done", timeout=40)
    assert [j["id"] for j in jobs] == [job_id]  # the same job, re-run
    assert jobs[0]["attempts"] >= 2
    assert jobs[0]["num_instances"] == len(series)
    assert _instances(node, study) == len(series)
    assert len(stored_files(node)) == len(series)
    summary = node.json("jobs", "list")[0]["summary"]
    assert summary["instances"] == len(series)
    assert "was running on a worker that is gone; re-enqueued" in node.logs()
    _kill(node)


# -- 4. broker messages lost ------------------------------------------------------------


def test_lost_broker_messages_are_reenqueued(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    node = _production_node(node_factory, pg_url, redis_server)
    series = write_ct_series(tmp_path / "ct", 6, rows=16, cols=16)
    study = _study_uid(series)
    # no worker: the study completes and its job is queued in Redis
    assert send_datasets(node.port, series) == [SUCCESS] * len(series)
    wait_for(lambda: any(j["enqueued_at"] for j in _jobs(node, study)), 30, 0.1, what="job queued")
    assert _llen(redis_server) >= 1
    redis_server.flushall()  # the broker loses every message
    assert _jobs(node, study)[0]["status"] == "queued"

    # the reconciler (the only sender once a job exists) notices that the queued
    # job has no live message and sends it again
    wait_for(lambda: _llen(redis_server) >= 1, 20, 0.2, what="message re-sent")
    node.start("worker", "worker", "--concurrency", "1")
    jobs = _wait_job(node, study, "done", timeout=30)
    assert len(jobs) == 1 and jobs[0]["attempts"] == 1
    assert jobs[0]["num_instances"] == len(series)
    assert _instances(node, study) == len(series)
    assert "still queued with no live message; re-enqueued" in node.logs()
    _kill(node)


# -- 5. database down during C-STORE ------------------------------------------------------


def test_database_down_refuses_with_a700_and_stores_nothing(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    node = _production_node(node_factory, pg_url, redis_server)
    node.start("worker", "worker", "--concurrency", "1")
    series = write_ct_series(tmp_path / "ct", 8, rows=16, cols=16)
    other = write_ct_series(tmp_path / "other", 3, rows=16, cols=16)
    study, other_study = _study_uid(series), _study_uid(other)
    first, rest = series[:3], series[3:]
    assert send_datasets(node.port, first) == [SUCCESS] * 3
    files_before = stored_files(node)
    assert len(files_before) == 3

    pg_block(pg_url, True)
    try:
        statuses = send_datasets(node.port, [*rest, *other])
        assert statuses == [OUT_OF_RESOURCES] * (len(rest) + len(other))
        assert stored_files(node) == files_before  # never a file without its row
        assert wait_for(lambda: incoming_files(node) == [], 5, what="incoming dir empty")
    finally:
        pg_block(pg_url, False)

    # the PACS sends again once the database is back: everything is stored
    assert send_datasets(node.port, [*rest, *other]) == [SUCCESS] * (len(rest) + len(other))
    assert send_datasets(node.port, series) == [SUCCESS] * len(series)  # (duplicates)
    # (the first three may have had a job of their own; the latest covers all)
    wait_for(
        lambda: (
            (j := _jobs(node, study))
            and j[-1]["status"] == "done"
            and j[-1]["num_instances"] == len(series)
        ),
        40,
        0.2,
        what="a done job covering the whole study",
    )
    _wait_job(node, other_study, "done", timeout=40)
    assert _instances(node, study) == len(series)
    assert _instances(node, other_study) == len(other)
    assert len(stored_files(node)) == len(series) + len(other)
    shown = {s["study_instance_uid"]: s for s in node.studies()}
    assert shown[study]["num_instances"] == len(series)
    assert shown[other_study]["num_instances"] == len(other)
    assert shown[study]["status"] == shown[other_study]["status"] == "done"
    assert "C-STORE refused 0xA700" in node.logs()
    _kill(node)


# -- 7. duplicates ------------------------------------------------------------------------


def test_duplicates_are_stored_once_and_start_no_job(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = _embedded_node(node_factory)
    series = write_ct_series(tmp_path / "ct", 5, rows=16, cols=16)
    study = _study_uid(series)
    # the same instances twice in one association, and at the same time in a
    # second association
    with ThreadPoolExecutor(2) as pool:
        twice = pool.submit(send_datasets, node.port, [*series, *series])
        again = pool.submit(send_datasets, node.port, series, "OTHERSCU")
        assert twice.result() == [SUCCESS] * 10
        assert again.result() == [SUCCESS] * 5
    jobs = _wait_job(node, study, "done")
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stored_files(node)}
    assert len(files) == 5

    # and again in two more associations, after the job is done
    assert send_datasets(node.port, series) == [SUCCESS] * 5
    assert send_datasets(node.port, list(reversed(series))) == [SUCCESS] * 5
    # give the assembler every chance to (wrongly) make a second job
    time.sleep(float(node.env["PACS_AI_STABLE_SECONDS"]) + 2.0)
    assert _jobs(node, study) == jobs  # no new job, the old one untouched
    assert _instances(node, study) == 5
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stored_files(node)} == files
    shown = _study(node, study)
    assert shown["num_instances"] == 5 and shown["status"] == "done"
    assert db_rows(
        node, "SELECT needs_job FROM studies WHERE study_instance_uid = :u", u=study
    ) == [(False,)]
    _kill(node)


# -- 9. instances after the job was made ----------------------------------------------------


def test_late_instances_start_a_new_job(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = _embedded_node(node_factory)
    series = write_ct_series(tmp_path / "ct", 8, rows=16, cols=16)
    study = _study_uid(series)
    assert send_datasets(node.port, series[:5]) == [SUCCESS] * 5
    first = _wait_job(node, study, "done")
    assert first[0]["num_instances"] == 5

    assert send_datasets(node.port, series[5:]) == [SUCCESS] * 3
    jobs = _wait_job(node, study, "done", count=2)
    assert jobs[0] == first[0]  # the first job is left as it was
    assert jobs[1]["num_instances"] == 8 and jobs[1]["attempts"] == 1
    assert _instances(node, study) == 8
    listed = {j["id"]: j for j in node.jobs()}
    assert listed[jobs[1]["id"]]["summary"]["instances"] == 8
    shown = _study(node, study)
    assert shown["num_instances"] == 8 and shown["status"] == "done"
    _kill(node)
