"""Faults while a job runs, with real pacs-ai processes and the demo models.

- a worker SIGKILLed mid-inference: its job is ``done`` soon after a worker is
  back (embedded mode, and PostgreSQL + Redis), through a short lease that
  nobody renews any more (the job's heartbeat died with the worker);
- PostgreSQL unreachable for 20 s mid-job: the job ends ``done`` with no manual
  step and no attempt used up (the retry takes over its own lease);
- instances arriving while a job runs: the newer job supersedes it, and the
  results and the objects at the destination are the newer job's, covering every
  instance.

Leases are short here (4 s) so that the tests run in seconds; the task time
limits keep their defaults, which no longer decide how fast a job recovers.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil
import pytest

from testkit.phantoms import generate_chest_ct, phantom_to_datasets
from tests.conftest import (
    Node,
    NodeFactory,
    RedisServer,
    db_rows,
    free_port,
    needs_demo_models,
    pg_block,
    send_datasets,
    wait_for,
)
from tests.dicom_peers import RecordingSCP

pytestmark = [pytest.mark.integration, needs_demo_models]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SHORT = {"job_lease_seconds": 4, "ort_threads": 1}


def _ct(seed: int, slices: int) -> list[Any]:
    """A chest CT phantom, slices in order (a prefix is a contiguous volume)."""
    phantom = generate_chest_ct(
        seed, matrix=128, slices=slices, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
    )
    return phantom_to_datasets(phantom, seed=seed, patient_name="DOE^JANE")


def _jobs(node: Node, study_uid: str) -> list[dict[str, Any]]:
    rows = db_rows(
        node,
        "SELECT j.id, j.status, j.attempts, j.num_instances, j.error FROM jobs j "
        "JOIN studies s ON s.id = j.study_id WHERE s.study_instance_uid = :uid ORDER BY j.id",
        uid=study_uid,
    )
    keys = ("id", "status", "attempts", "num_instances", "error")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _latest(node: Node, study_uid: str, status: str) -> dict[str, Any] | None:
    jobs = _jobs(node, study_uid)
    if jobs and jobs[-1]["status"] == "failed":
        raise AssertionError(f"job failed: {jobs[-1]}\n{node.logs()[-4000:]}")
    return jobs[-1] if jobs and jobs[-1]["status"] == status else None


def _inferring(node: Node, job_id: int | None = None) -> bool:
    """The worker has started running a model (the pipeline's debug line)."""
    marker = f"job {job_id}: running " if job_id else ": running "
    return marker in node.logs()


def _first_job_id(node: Node, study_uid: str) -> int | None:
    jobs = _jobs(node, study_uid)
    return int(jobs[0]["id"]) if jobs else None


def _kill_inference_worker(node: Node) -> int:
    """SIGKILL the inference worker that ``pacs-ai run`` supervises (its Celery
    main process and pool children); return how many processes were killed."""
    run = psutil.Process(node.procs["run"].pid)
    workers = [
        p
        for p in run.children()
        if "worker" in p.cmdline() and not any("dispatch" in a for a in p.cmdline())
    ]
    assert len(workers) == 1, [p.cmdline() for p in run.children()]
    victims = [workers[0], *workers[0].children(recursive=True)]
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def _stop(node: Node) -> None:
    for name in list(node.procs):
        node.stop(name, signal.SIGKILL)


# -- a worker SIGKILLed mid-inference ------------------------------------------------


def test_worker_killed_mid_inference_embedded(node_factory: NodeFactory) -> None:
    node = node_factory(**SHORT)
    node.start_run(90)
    datasets = _ct(7_100_001, 60)
    study = str(datasets[0].StudyInstanceUID)
    assert set(send_datasets(node.port, datasets)) == {0}
    wait_for(lambda: _inferring(node), 60, 0.05, what="inference started")
    killed_at = time.monotonic()
    assert _kill_inference_worker(node) >= 1
    # `pacs-ai run` restarts the worker
    wait_for(lambda: "worker exited with status -9; restarting it" in node.logs(), 10, 0.1)
    back_at = time.monotonic()
    job = wait_for(lambda: _latest(node, study, "done"), 120, 0.2, what="job done")
    done_at = time.monotonic()
    print(
        f"\nembedded: worker back {back_at - killed_at:.1f} s after the kill, "
        f"job done {done_at - back_at:.1f} s after that"
    )
    assert done_at - back_at < 120
    assert len(_jobs(node, study)) == 1 and job["attempts"] == 2
    assert job["num_instances"] == len(datasets)
    assert "was running on a worker that is gone" in node.logs()
    _stop(node)


def test_worker_killed_mid_inference_postgresql_redis(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer
) -> None:
    node = node_factory(database_url=pg_url, broker_url=redis_server.url, **SHORT)
    node.cli("db", "upgrade")
    node.start_listener()
    node.start("worker", "worker", "--queues", "inference")
    datasets = _ct(7_100_002, 60)
    study = str(datasets[0].StudyInstanceUID)
    assert set(send_datasets(node.port, datasets)) == {0}
    wait_for(lambda: _inferring(node), 60, 0.05, what="inference started")
    node.stop("worker", signal.SIGKILL)  # the whole process group
    (running,) = _jobs(node, study)
    assert running["status"] == "running"
    node.start("worker", "worker", "--queues", "inference")
    back_at = time.monotonic()
    job = wait_for(lambda: _latest(node, study, "done"), 120, 0.2, what="job done")
    print(f"\nPostgreSQL + Redis: job done {time.monotonic() - back_at:.1f} s after the restart")
    assert time.monotonic() - back_at < 120
    assert job["id"] == running["id"] and job["attempts"] == 2
    _stop(node)


# -- the database down for 20 s mid-job -------------------------------------------------


def test_database_outage_mid_job_ends_done(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer
) -> None:
    """The default 60 s lease: the retries (5, 10, 15 s ...) take over the lease
    their first try still holds, so no attempt is used up."""
    node = node_factory(database_url=pg_url, broker_url=redis_server.url, ort_threads=1)
    node.cli("db", "upgrade")
    node.start_listener()
    node.start("worker", "worker", "--queues", "inference")
    datasets = _ct(7_100_003, 50)
    study = str(datasets[0].StudyInstanceUID)
    assert set(send_datasets(node.port, datasets)) == {0}
    wait_for(lambda: _inferring(node), 60, 0.05, what="inference started")
    pg_block(pg_url, True)
    try:
        time.sleep(20)
    finally:
        pg_block(pg_url, False)
    back_at = time.monotonic()
    job = wait_for(lambda: _latest(node, study, "done"), 120, 0.5, what="job done")
    print(f"\ndatabase outage: job done {time.monotonic() - back_at:.1f} s after it was back")
    assert job["attempts"] == 1 and job["error"] is None
    assert len(_jobs(node, study)) == 1
    logs = node.logs()
    assert "hit a transient error" in logs
    assert "was running on a worker that is gone" not in logs
    _stop(node)


# -- late instances while a job runs --------------------------------------------------


def test_late_instances_newest_job_wins(node_factory: NodeFactory) -> None:
    scp = RecordingSCP(free_port())
    scp.start()
    try:
        node = node_factory(destinations=f"DEST@127.0.0.1:{scp.port}", **SHORT)
        node.start_run(90)
        datasets = _ct(7_100_004, 100)
        study = str(datasets[0].StudyInstanceUID)
        first, late = datasets[:80], datasets[80:]
        assert set(send_datasets(node.port, first)) == {0}
        old_id = wait_for(lambda: _first_job_id(node, study), 30, 0.1, what="first job")
        wait_for(lambda: _inferring(node, old_id), 60, 0.05, what="inference started")
        assert set(send_datasets(node.port, late)) == {0}

        def newest_done() -> list[dict[str, Any]] | None:
            jobs = _jobs(node, study)
            return jobs if len(jobs) == 2 and jobs[-1]["status"] == "done" else None

        old, new = wait_for(newest_done, 120, 0.2, what="the newer job done")
        assert old["id"] == old_id and old["status"] == "superseded", old
        assert new["num_instances"] == len(datasets)
        results = db_rows(node, "SELECT DISTINCT job_id FROM results")
        assert results == [(new["id"],)]
        deliveries = wait_for(
            lambda: (
                rows
                if (rows := node.deliveries()) and all(r["status"] == "sent" for r in rows)
                else None
            ),
            60,
            0.5,
            what="deliveries sent",
        )
        assert {r["job_id"] for r in deliveries} == {new["id"]}
        wait_for(lambda: len(scp.received) >= len(deliveries), 20, 0.2, what="objects received")
        time.sleep(1.0)  # nothing else arrives
        assert sorted(scp.uids()) == sorted(r["sop_instance_uid"] for r in deliveries)
        (seg,) = [ds for ds in scp.received if ds.SOPClassUID == SEG_CLASS]
        sources = {
            str(item.ReferencedSOPInstanceUID)
            for series in seg.ReferencedSeriesSequence
            for item in series.ReferencedInstanceSequence
        }
        assert sources == {str(ds.SOPInstanceUID) for ds in datasets}  # every instance
        assert f"job {old_id} superseded by job {new['id']}" in node.logs()
        _stop(node)
    finally:
        scp.stop()
