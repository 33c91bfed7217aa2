"""Retention (PACS_AI_RETENTION_HOURS) and the storage's free-space watermark
(PACS_AI_MIN_FREE_MB): the policy and the deletion on SQLite and PostgreSQL,
``pacs-ai prune`` and ``studies list`` through the real CLI, the API's
``/api/studies``, reprocess refusal, ``/readyz`` and metrics, the listener's
scheduler, and one study end to end through a real node and destination.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from db.migrate import upgrade
from db.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    Study,
    utcnow,
)
from db.queries import list_studies
from db.repo import (
    DeliveryRecord,
    InstanceRecord,
    ReprocessRefused,
    create_job_if_stable,
    create_reprocess_job,
    finish_delivery,
    finish_job,
    record_instance,
    upsert_delivery,
)
from db.session import dispose_all, session_scope
from dicomnode.uids import relative_instance_path
from tests.conftest import cli_env, free_port, run_cli, wait_for
from worker.admin.api import create_app
from worker.scheduling.retention import outbox_study_dir, prune_interval, prune_once, safe_path
from worker.settings import Settings

HOUR = dt.timedelta(hours=1)
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings of a node in ``tmp_path`` with a migrated database, retention 1 h."""
    url = "" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Settings(
        data_dir=tmp_path / "data",
        database_url=url,
        retention_hours=1.0,
        broker_url="memory://",
        models_dir=tmp_path / "no-models",
    )
    upgrade(s.effective_database_url)
    yield s
    dispose_all()  # before pg_url drops the database


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    s = Settings(
        data_dir=tmp_path / "data",
        retention_hours=1.0,
        broker_url="memory://",
        models_dir=tmp_path / "no-models",
    )
    upgrade(s.effective_database_url)
    return s


@dataclass
class Seeded:
    uid: str
    study_id: int
    job_id: int | None
    files: list[Path]
    outbox: list[Path]


def _outbox_rel(study_uid: str, sop_uid: str) -> str:
    from worker.results.report import outbox_rel_path

    return outbox_rel_path(study_uid, sop_uid)


def seed(
    settings: Settings,
    uid: str,
    *,
    instances: int = 3,
    job: str | None = "done",
    deliveries: tuple[str, ...] = ("sent",),
) -> Seeded:
    """A study of ``instances`` stored files, its job in state ``job`` (None: no
    job) and one outbox object per entry of ``deliveries`` in that state."""
    url = settings.effective_database_url
    files = []
    with session_scope(url) as session:
        for n in range(instances):
            series, sop = f"{uid}.1", f"{uid}.1.{n + 1}"
            rel = relative_instance_path(uid, series, sop)
            path = settings.storage_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * (1000 + n))
            files.append(path)
            record_instance(
                session,
                InstanceRecord(uid, series, sop, SOP_CLASS, "1.2.840.10008.1.2.1", rel, 1000 + n),
            )
    with session_scope(url) as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study_id = study.id
        job_id = None
        if job is not None:
            created = create_job_if_stable(session, study.id, study.last_instance_at)
            assert created is not None
            job_id = created.id
    if job_id is not None and job in ("done", "failed", "running"):
        with session_scope(url) as session:
            if job == "running":
                session.execute(update(Job).where(Job.id == job_id).values(status="running"))
            else:
                finish_job(session, job_id, JobStatus(job), summary={})
                session.add(
                    Result(
                        study_id=study_id,
                        job_id=job_id,
                        series_instance_uid=f"{uid}.1",
                        model="m",
                        model_version="1",
                        model_sha256="0" * 64,
                        kind="classification",
                        finding_code_value="C1",
                        finding_code_scheme="SCT",
                        finding="Lung nodule",
                        probability=0.9,
                        present=True,
                    )
                )
    outbox = []
    for n, state in enumerate(deliveries if job_id is not None else ()):
        assert job_id is not None
        sop = f"{uid}.9.{n + 1}"
        rel = _outbox_rel(uid, sop)
        path = settings.outbox_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\1" * 500)
        outbox.append(path)
        with session_scope(url) as session:
            delivery_id = upsert_delivery(
                session,
                DeliveryRecord(
                    study_id, job_id, uid, f"{uid}.9", sop, SOP_CLASS, "sr", "D@h:1", rel
                ),
            )
            assert delivery_id is not None
            if state != "pending":
                finish_delivery(session, delivery_id, DeliveryStatus(state))
    return Seeded(uid, study_id, job_id, files, outbox)


def later(hours: float = 2.0) -> dt.datetime:
    return utcnow() + dt.timedelta(hours=hours)


def pruned_at(settings: Settings, uid: str) -> str | None:
    with session_scope(settings.effective_database_url) as session:
        row = list_studies(session, study_uid=uid)[0]
    value: str | None = row["pruned_at"]
    return value


def count(settings: Settings, model: Any, study_id: int) -> int:
    with session_scope(settings.effective_database_url) as session:
        return int(
            session.scalar(
                select(func.count()).select_from(model).where(model.study_id == study_id)
            )
            or 0
        )


# -- the policy and the deletion -------------------------------------------------------


def test_prunes_a_delivered_study_and_keeps_its_rows(settings: Settings) -> None:
    study = seed(settings, "1.2.840.1", deliveries=("sent", "sent"))
    other = seed(settings, "1.2.840.2", deliveries=())  # no destination: prunable too
    assert all(p.is_file() for p in study.files + study.outbox)
    assert prune_once(settings, now=utcnow()) == []  # not old enough yet

    done = prune_once(settings, now=later())
    assert {p.study_instance_uid for p in done} == {study.uid, other.uid}
    first = next(p for p in done if p.study_instance_uid == study.uid)
    assert first.files == 5 and first.bytes == 1000 + 1001 + 1002 + 2 * 500
    assert first.errors == 0
    # files and the emptied folders are gone; the roots stay
    assert not any(p.exists() for p in study.files + study.outbox + other.files)
    assert not study.files[0].parent.exists()
    assert not (settings.outbox_path / outbox_study_dir(study.uid)).exists()
    assert settings.storage_path.is_dir() and settings.outbox_path.is_dir()
    assert [p for p in settings.storage_path.rglob("*") if p.is_file()] == []
    # rows and results stay; pruned_at is set and listed
    assert count(settings, Instance, study.study_id) == 3
    assert count(settings, Result, study.study_id) == 1
    assert count(settings, Delivery, study.study_id) == 2
    assert pruned_at(settings, study.uid) is not None
    # a second run finds nothing more to do
    assert prune_once(settings, now=later(3)) == []


def test_dry_run_lists_and_deletes_nothing(settings: Settings) -> None:
    study = seed(settings, "1.2.840.3")
    listed = prune_once(settings, now=later(), dry_run=True)
    assert [(p.study_instance_uid, p.files, p.bytes) for p in listed] == [
        (study.uid, 4, 1000 + 1001 + 1002 + 500)
    ]
    assert all(p.is_file() for p in study.files + study.outbox)
    assert pruned_at(settings, study.uid) is None


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("pending delivery", {"deliveries": ("sent", "pending")}),
        ("failed delivery", {"deliveries": ("failed",)}),
        ("queued job", {"job": "queued"}),
        ("running job", {"job": "running"}),
        ("failed job", {"job": "failed"}),
        ("no job", {"job": None}),
    ],
)
def test_never_pruned(settings: Settings, case: str, kwargs: dict[str, Any]) -> None:
    study = seed(settings, "1.2.840.4", **kwargs)
    assert prune_once(settings, now=later(1000)) == [], case
    assert prune_once(settings, now=later(1000), dry_run=True) == [], case
    assert all(p.is_file() for p in study.files + study.outbox), case
    assert pruned_at(settings, study.uid) is None


def test_new_instances_after_the_job_keep_a_study(settings: Settings) -> None:
    study = seed(settings, "1.2.840.5")
    rel = relative_instance_path(study.uid, f"{study.uid}.1", f"{study.uid}.1.99")
    with session_scope(settings.effective_database_url) as session:
        record_instance(
            session,
            InstanceRecord(
                study.uid,
                f"{study.uid}.1",
                f"{study.uid}.1.99",
                SOP_CLASS,
                "1.2.840.10008.1.2.1",
                rel,
                10,
            ),
        )
    assert prune_once(settings, now=later(1000)) == []
    # even with its flag cleared: its last instance came after its latest job
    with session_scope(settings.effective_database_url) as session:
        session.execute(update(Study).where(Study.id == study.study_id).values(needs_job=False))
    assert prune_once(settings, now=later(1000)) == []


def test_retention_off_prunes_nothing(settings: Settings) -> None:
    study = seed(settings, "1.2.840.6")
    off = settings.model_copy(update={"retention_hours": 0.0})
    assert prune_once(off, now=later(10_000)) == []
    assert all(p.is_file() for p in study.files)


def test_reprocess_of_a_pruned_study_is_refused(settings: Settings) -> None:
    study = seed(settings, "1.2.840.7")
    assert len(prune_once(settings, now=later())) == 1
    with (
        session_scope(settings.effective_database_url) as session,
        pytest.raises(ReprocessRefused, match="pruned by retention"),
    ):
        create_reprocess_job(session, study.uid)


def test_a_reprocess_queued_first_keeps_the_study(settings: Settings) -> None:
    study = seed(settings, "1.2.840.8")
    with session_scope(settings.effective_database_url) as session:
        create_reprocess_job(session, study.uid)
    assert prune_once(settings, now=later()) == []
    assert all(p.is_file() for p in study.files)


def test_only_paths_under_the_roots_are_deleted(sqlite_settings: Settings, tmp_path: Path) -> None:
    settings = sqlite_settings
    study = seed(settings, "1.2.840.9", instances=1)
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"keep me")
    link_target = tmp_path / "linked.dcm"
    link_target.write_bytes(b"keep me too")
    link = settings.storage_path / "ab" / "link.dcm"
    link.parent.mkdir(parents=True)
    link.symlink_to(link_target)
    with session_scope(settings.effective_database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.study_id == study.study_id)
            .values(rel_path=os.path.relpath(outside, settings.storage_path))
        )
        series_id = session.scalar(
            select(Instance.series_id).where(Instance.study_id == study.study_id)
        )
        for n, rel in enumerate([str(outside), "ab/link.dcm", "", ".", "missing/x.dcm"]):
            session.add(
                Instance(
                    study_id=study.study_id,
                    series_id=series_id,
                    sop_instance_uid=f"{study.uid}.7.{n}",
                    sop_class_uid=SOP_CLASS,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    rel_path=rel,
                    size_bytes=1,
                )
            )
    assert safe_path(settings.storage_path, "../x") is None
    assert safe_path(settings.storage_path, "/etc/passwd") is None
    assert safe_path(settings.storage_path, "ab/link.dcm") is None
    assert safe_path(settings.storage_path, "ab/../ab/x.dcm") == settings.storage_path / "ab/x.dcm"
    done = prune_once(settings, now=later())
    assert [p.study_instance_uid for p in done] == [study.uid]
    assert done[0].files == 1  # only the outbox object
    assert outside.read_bytes() == b"keep me"
    assert link_target.read_bytes() == b"keep me too" and link.is_symlink()
    assert study.files[0].is_file()  # its row now points elsewhere: left alone


def test_metrics_count_pruned_studies_and_bytes(sqlite_settings: Settings, tmp_path: Path) -> None:
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: F401

    from worker import metrics

    if metrics.enabled():
        pytest.skip("metrics already set up in this process")
    folder = tmp_path / "metrics"
    metrics.setup(folder)
    try:
        seed(sqlite_settings, "1.2.840.10", instances=2, deliveries=())
        prune_once(sqlite_settings, now=later())
        reg = metrics.registry([])
        assert reg.get_sample_value("pacs_ai_pruned_studies_total") == 1.0
        assert reg.get_sample_value("pacs_ai_pruned_bytes_total") == 2001.0
    finally:
        metrics._metrics = None  # back to no-ops for the other tests
        metrics._directory = None
        os.environ.pop(metrics.ENV, None)


def test_prune_interval() -> None:
    assert prune_interval(Settings(retention_hours=0.001)) == 30.0
    assert prune_interval(Settings(retention_hours=0.5)) == 180.0
    assert prune_interval(Settings(retention_hours=72)) == 600.0


def test_scheduler_prunes_periodically(sqlite_settings: Settings) -> None:
    from worker.scheduling.scheduler import Scheduler

    settings = sqlite_settings.model_copy(update={"retention_hours": 0.0003})  # ~1 s
    study = seed(settings, "1.2.840.11")
    app: Any = None  # nothing to assemble or dispatch: the broker is never used
    scheduler = Scheduler(settings, app, prune_every=0.2)
    scheduler.start()
    try:
        wait_for(lambda: pruned_at(settings, study.uid), 20, what="scheduler pruned the study")
    finally:
        scheduler.stop()
        scheduler.join(10)
    assert not any(p.exists() for p in study.files + study.outbox)


# -- the API -------------------------------------------------------------------------


def test_api_shows_pruned_at_and_refuses_reprocess(sqlite_settings: Settings) -> None:
    study = seed(sqlite_settings, "1.2.840.12")
    kept = seed(sqlite_settings, "1.2.840.13", deliveries=("pending",))
    prune_once(sqlite_settings, now=later())
    client = TestClient(create_app(sqlite_settings), base_url="http://127.0.0.1")
    items = {s["study_instance_uid"]: s for s in client.get("/api/studies").json()["items"]}
    assert items[study.uid]["pruned_at"] is not None
    assert items[kept.uid]["pruned_at"] is None
    detail = client.get(f"/api/studies/{study.uid}").json()
    assert detail["pruned_at"] == items[study.uid]["pruned_at"]
    assert len(detail["results"]) == 1 and len(detail["series"]) == 1
    refused = client.post(f"/api/studies/{study.uid}/reprocess", json={})
    assert refused.status_code == 409
    assert refused.headers["content-type"].startswith("application/json")
    assert "pruned by retention" in refused.json()["detail"]


def test_readyz_and_metrics_below_the_watermark(sqlite_settings: Settings) -> None:
    client = TestClient(create_app(sqlite_settings), base_url="http://127.0.0.1")
    ready = client.get("/readyz")
    assert ready.json()["checks"]["storage"] == "ok"
    assert ready.json()["storage"]["below_watermark"] is False
    text = client.get("/metrics").text
    assert "pacs_ai_storage_below_watermark 0.0" in text
    assert "pacs_ai_storage_free_bytes " in text

    huge = sqlite_settings.model_copy(update={"min_free_mb": 10**12})
    client = TestClient(create_app(huge), base_url="http://127.0.0.1")
    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready"
    assert "below PACS_AI_MIN_FREE_MB" in body["checks"]["storage"]
    assert body["checks"]["database"] == "ok"
    assert body["storage"]["below_watermark"] is True
    assert body["storage"]["min_free_mb"] == 10**12
    assert "pacs_ai_storage_below_watermark 1.0" in client.get("/metrics").text


def test_dashboard_shows_the_disk_warning() -> None:
    from importlib import resources

    static = resources.files("worker.admin").joinpath("static")
    assert 'id="disk-warning"' in static.joinpath("dashboard.html").read_text()
    js = static.joinpath("dashboard.js").read_text()
    assert "renderStorage(ready.body.storage)" in js and "below_watermark" in js


# -- the CLI -------------------------------------------------------------------------


def test_cli_prune_studies_list_and_reprocess(sqlite_settings: Settings) -> None:
    settings = sqlite_settings.model_copy(update={"retention_hours": 0.0002})  # 0.72 s
    study = seed(settings, "1.2.840.14")
    kept = seed(settings, "1.2.840.15", deliveries=("sent", "pending"))
    time.sleep(1.0)
    env = cli_env(data_dir=settings.data_dir, retention_hours="0.0002", broker_url="memory://")
    dry = run_cli(env, "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    body = json.loads(dry.stdout)
    assert body["dry_run"] is True and body["retention_hours"] == 0.0002
    assert [s["study_instance_uid"] for s in body["studies"]] == [study.uid]
    assert body["files"] == 4 and body["bytes"] == 1000 + 1001 + 1002 + 500
    assert all(p.is_file() for p in study.files + study.outbox)
    text = run_cli(env, "prune", "--dry-run")
    assert f"would prune study {study.uid}: 4 files, 3503 bytes" in text.stdout

    done = run_cli(env, "prune", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["dry_run"] is False
    assert [(s["study_instance_uid"], s["files"]) for s in body["studies"]] == [(study.uid, 4)]
    assert not any(p.exists() for p in study.files + study.outbox)
    assert all(p.is_file() for p in kept.files + kept.outbox)

    listed = json.loads(run_cli(env, "studies", "list", "--json").stdout)
    by_uid = {s["study_instance_uid"]: s for s in listed}
    assert by_uid[study.uid]["pruned_at"] is not None
    assert by_uid[kept.uid]["pruned_at"] is None

    refused = run_cli(env, "reprocess", "--study", study.uid, "--no-wait")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "pruned by retention" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr

    off = run_cli({**env, "PACS_AI_RETENTION_HOURS": "0"}, "prune")
    assert off.returncode == 0 and "retention is off" in off.stdout


# -- end to end ----------------------------------------------------------------------


@pytest.mark.integration
def test_end_to_end_delivered_study_is_pruned(node_factory: Any, tmp_path: Path) -> None:
    """A real node receives a study, delivers its results to a real SCP, and then,
    once the retention is set, ``prune --dry-run`` lists it and the listener's
    scheduler prunes it when it starts."""
    from testkit.phantoms import generate_chest_ct, phantom_to_datasets
    from tests.conftest import send_datasets
    from tests.dicom_peers import RecordingSCP
    from worker.pipeline.registry import DEMO_MODELS_DIR

    if not list(DEMO_MODELS_DIR.glob("*.json")):
        pytest.skip("demo models not built")
    destination = RecordingSCP(free_port())
    destination.start()
    try:
        node = node_factory(ort_threads=2, destinations=f"DEST@127.0.0.1:{destination.port}/sr+seg")
        node.start_run()
        phantom = generate_chest_ct(
            777, matrix=128, slices=24, thickness_mm=2.5, nodule=True, nodule_diameter_mm=16.0
        )
        datasets = phantom_to_datasets(phantom, seed=777)
        uid = str(datasets[0].StudyInstanceUID)
        assert set(send_datasets(node.port, datasets)) == {0}
        node.wait_jobs([uid], "done", timeout=180)

        summary = next(j for j in node.jobs() if j["study_instance_uid"] == uid)["summary"]

        def delivered() -> list[dict[str, Any]] | None:
            rows = node.deliveries("--study", uid)
            return rows if rows and all(r["status"] == "sent" for r in rows) else None

        rows = wait_for(delivered, 90, 0.5, what=f"results delivered (job summary {summary})")
        assert {r["kind"] for r in rows} == {"sr", "seg"}
        node.stop("run")
        files = [p for p in node.storage.rglob("*.dcm") if ".incoming" not in p.parts]
        assert len(files) >= len(datasets) + 2  # the instances and the SR and SEG
        results_before = node.json("results", "list", "--study", uid)
        assert results_before

        node.env["PACS_AI_RETENTION_HOURS"] = "0.0001"  # 0.36 s
        time.sleep(0.5)
        dry = json.loads(node.cli("prune", "--dry-run", "--json").stdout)
        assert [s["study_instance_uid"] for s in dry["studies"]] == [uid]
        assert dry["files"] == len(files)
        assert all(p.is_file() for p in files)

        node.start_listener()  # its scheduler prunes at start
        wait_for(
            lambda: next(s for s in node.studies() if s["study_instance_uid"] == uid)["pruned_at"],
            30,
            what="the listener pruned the study",
        )
        assert not any(p.exists() for p in files)
        assert node.json("results", "list", "--study", uid) == results_before
        study = next(s for s in node.studies() if s["study_instance_uid"] == uid)
        assert study["num_instances"] == len(datasets) and study["status"] == "done"
        refused = node.cli("reprocess", "--study", uid, "--no-wait", check=False)
        assert refused.returncode == 1 and "pruned by retention" in refused.stderr
    finally:
        destination.stop()
