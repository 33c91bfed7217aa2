"""Done-when 1, 2, 6 of the receive issue: the whole flow, in both modes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import NodeFactory, RedisServer, port_open, send_datasets, wait_for
from tests.factory import CANARY_BIRTH, CANARY_ID, CANARY_NAME, write_ct_series

pytestmark = pytest.mark.integration

PYDICOM_FILES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
]


def _send_and_check(node, tmp_path: Path) -> None:
    echo = subprocess.run(
        ["echoscu", "-aec", "PACSAI", "127.0.0.1", str(node.port)], capture_output=True
    )
    assert echo.returncode == 0, echo.stderr
    series = write_ct_series(tmp_path / "ct", 12)
    expected: dict[str, set[str]] = {
        str(dcmread(series[0]).StudyInstanceUID): {str(dcmread(p).SOPInstanceUID) for p in series}
    }
    assert send_datasets(node.port, series) == [0] * len(series)
    for name in PYDICOM_FILES:
        path = Path(get_testdata_file(name))
        ds = dcmread(path)
        # each file in its own association, proposing only its own transfer syntax
        assert send_datasets(node.port, [path]) == [0], name
        # (MR_small and MR_small_RLE are the same instance: stored once)
        expected.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    node.wait_jobs(list(expected), "done", timeout=90)
    studies = {s["study_instance_uid"]: s for s in node.studies()}
    for uid, sops in expected.items():
        assert studies[uid]["num_instances"] == len(sops), uid
        assert studies[uid]["status"] == "done"
        assert studies[uid]["num_series"] >= 1
        for key in ("modalities", "received_at", "updated_at"):
            assert key in studies[uid]
    ct = studies[next(iter(expected))]
    assert ct["modalities"] == ["CT"] and ct["num_series"] == 1
    jobs = node.jobs()
    for job in jobs:
        assert set(job) >= {
            "id",
            "study_instance_uid",
            "status",
            "attempts",
            "created_at",
            "finished_at",
            "error",
        }
        assert job["status"] == "done" and job["error"] is None and job["attempts"] == 1
    ct_job = next(j for j in jobs if j["study_instance_uid"] == next(iter(expected)))
    assert ct_job["summary"]["instances"] == 12 and ct_job["summary"]["modalities"] == ["CT"]
    # done-when 6: no patient data in any log line
    logs = node.logs()
    assert "stored sop=" in logs  # DEBUG logging was on, so the check means something
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, "CANARY"):
        assert canary not in logs


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_embedded_mode(node_factory: NodeFactory, tmp_path: Path) -> None:
    node = node_factory()
    run = node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")
    _send_and_check(node, tmp_path)
    parts = _descendants(run.pid)
    assert len(parts) >= 4  # listener(s), inference worker, dispatcher, API
    # SIGTERM to the whole process group, as Ctrl-C or `kill -- -PGID` sends it
    rc = node.stop("run", timeout=60)
    stops = [line for line in node.logs().splitlines() if "stopped" in line or "killing" in line]
    assert rc == 0, stops  # clean shutdown on SIGTERM, nothing killed
    assert not [line for line in stops if "killing" in line], stops
    wait_for(lambda: _all_gone(parts), 10, what="every part of the node to end")


def test_parts_end_with_a_killed_supervisor(node_factory: NodeFactory) -> None:
    """`pacs-ai run` SIGKILLed (OOM killer): no listener keeps the port, no worker
    keeps jobs; a new `run` can start at once."""
    node = node_factory()
    run = node.start("run")
    wait_for(lambda: port_open(node.port), 30, what="listener")
    wait_for(lambda: len(_descendants(run.pid)) >= 4, 30, what="the node's parts")
    parts = _descendants(run.pid)
    run.kill()  # the supervisor alone, not its process group
    run.wait(10)
    wait_for(lambda: _all_gone(parts), 30, what="the parts to end with their supervisor")
    assert not port_open(node.port)


def test_production_mode(
    node_factory: NodeFactory, pg_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    node = node_factory(database_url=pg_url, broker_url=redis_server.url)
    node.cli("db", "upgrade")
    node.start_listener()
    node.start("worker", "worker", "--concurrency", "2")
    _send_and_check(node, tmp_path)
    assert node.stop("worker") in (0, None)
    assert node.stop("listen") == 0
