"""Completion by count, the explicit trigger, and a scheduler that is woken
instead of polling (issue 12).

Unit tests first (the count policy, the PACS probe with a fake query, the
scheduler on SQLite, the doorbell); then a real Orthanc answering C-FIND, an
unreachable PACS, and the CLI and API triggers.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Delivery, Job, JobStatus, Study, utcnow
from db.repo import record_instance
from db.session import dispose_all, session_scope
from dicomnode.pacs_query import PacsCounts, QueryPeer, parse_peer, query_counts
from tests.conftest import (
    Node,
    NodeFactory,
    Orthanc,
    ct_record,
    free_port,
    node_db_url,
    send_datasets,
    wait_for,
)
from tests.factory import ct_slice
from worker.scheduling.completion import (
    ANSWER_TTL_SECONDS,
    FIRST_RETRY_SECONDS,
    CountProbe,
    NothingToComplete,
    Received,
    complete_now,
    counts_match,
    received_counts,
)
from worker.scheduling.doorbell import Bell, Doorbell, RingingObserver, bell_address
from worker.scheduling.scheduler import Scheduler
from worker.settings import Settings, SettingsError, load_settings

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
STUDY = "1.2.826.0.1.3680043.10.12"
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


# -- the count policy (pure) ------------------------------------------------------


def counts(study: int | None, **series: int | None) -> PacsCounts:
    return PacsCounts(study, {uid.replace("_", "."): n for uid, n in series.items()})


RECEIVED = {"s.1": 100, "s.2": 3}


@pytest.mark.parametrize(
    ("pacs", "expected"),
    [
        (counts(103, s_1=100, s_2=3), True),
        (counts(None, s_1=100, s_2=3), True),  # series counts alone
        (counts(103), True),  # the study count alone
        (counts(103, s_1=None, s_2=None), True),  # series listed without counts
        (counts(None), False),  # nothing to compare
        (counts(104, s_1=100, s_2=3), False),  # the PACS holds one more somewhere
        (counts(103, s_1=99, s_2=4), False),  # same total, different series
        (counts(None, s_1=100), False),  # a series the PACS does not have
        (counts(None, s_1=100, s_2=3, s_3=5), False),  # one not (yet) forwarded
        (counts(103, s_1=100, s_2=None), True),  # a count missing, the rest agrees
        (counts(103, s_1=99, s_2=None), False),  # a count given disagrees
        (counts(None, s_1=100, s_2=None), False),  # a count missing, no study count
        (counts(103, s_1=100), False),  # the PACS lists one series only
        (counts(102, s_1=100, s_2=2), False),  # we received more than the PACS holds
    ],
)
def test_counts_match(pacs: PacsCounts, expected: bool) -> None:
    assert counts_match(RECEIVED, pacs, frozenset()) is expected


def test_own_series_are_left_out() -> None:
    """The PACS holds our SR (sent back into the study): it counts neither way."""
    assert counts_match(RECEIVED, counts(104, s_1=100, s_2=3, ai_1=1), {"ai.1"})
    assert counts_match(RECEIVED, counts(104, ai_1=1), {"ai.1"})
    # our SR also came back to us: still left out
    assert counts_match({**RECEIVED, "ai.1": 1}, counts(103, s_1=100, s_2=3), {"ai.1"})
    # the PACS lists our series without a count: the study count cannot be used
    assert not counts_match(RECEIVED, counts(104, ai_1=None), {"ai.1"})
    # nothing received but our own objects: never complete by count
    assert not counts_match({"ai.1": 1}, counts(1, ai_1=1), {"ai.1"})
    assert not counts_match({}, counts(0), frozenset())


def test_pacs_setting() -> None:
    assert parse_peer("ORTHANC@127.0.0.1:4242") == QueryPeer("ORTHANC", "127.0.0.1", 4242)
    assert parse_peer(" tls://PACS@pacs.example.org:2762 ").tls
    assert parse_peer("PACS@[::1]:104").host == "::1"
    for bad in ("PACS", "PACS@host", "@host:104", "PACS@host:0", "A" * 17 + "@h:1", "P@ho st:1"):
        with pytest.raises(ValueError):
            parse_peer(bad)
    assert load_settings(pacs="").pacs_peer is None
    assert load_settings(pacs="PACS@10.0.0.5:104").pacs_peer == QueryPeer("PACS", "10.0.0.5", 104)
    with pytest.raises(SettingsError, match="PACS_AI_PACS"):
        load_settings(pacs="PACS@10.0.0.5")


def test_query_of_an_unreachable_pacs_is_none_and_quick() -> None:
    t0 = time.monotonic()
    assert query_counts(QueryPeer("NOBODY", "127.0.0.1", free_port()), STUDY, "PACSAI", 2) is None
    assert time.monotonic() - t0 < 2.5


def test_query_counts_against_a_find_scp(caplog: pytest.LogCaptureFixture) -> None:
    """A pynetdicom C-FIND SCP that also returns patient data: only the counts
    are read back, and nothing of the answers reaches a log line."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as FIND,
    )

    from tests.factory import CANARY_ID, CANARY_NAME

    failing = {"now": False}

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if failing["now"]:
            yield 0xC000, None
            return
        if str(query.StudyInstanceUID) != STUDY:
            return
        if query.QueryRetrieveLevel == "STUDY":
            found = Dataset()
            found.QueryRetrieveLevel = "STUDY"
            found.StudyInstanceUID = STUDY
            found.PatientName, found.PatientID = CANARY_NAME, CANARY_ID
            found.NumberOfStudyRelatedInstances = 5
            yield 0xFF00, found
            return
        for uid, n in ((f"{STUDY}.1", 3), (f"{STUDY}.2", 2)):
            found = Dataset()
            found.QueryRetrieveLevel = "SERIES"
            found.StudyInstanceUID, found.SeriesInstanceUID = STUDY, uid
            found.PatientName = CANARY_NAME
            found.NumberOfSeriesRelatedInstances = n
            yield 0xFF00, found

    ae = AE("FAKEPACS")
    ae.add_supported_context(FIND)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    peer = QueryPeer("FAKEPACS", "127.0.0.1", port)
    caplog.set_level("DEBUG")
    try:
        got = query_counts(peer, STUDY, "PACSAI", 5)
        assert got == PacsCounts(5, {f"{STUDY}.1": 3, f"{STUDY}.2": 2})
        assert counts_match({f"{STUDY}.1": 3, f"{STUDY}.2": 2}, got)
        assert query_counts(peer, f"{STUDY}.9", "PACSAI", 5) is None  # unknown study
        failing["now"] = True
        assert query_counts(peer, STUDY, "PACSAI", 5) is None  # a failure status
        assert query_counts(peer, "not a uid", "PACSAI", 5) is None
    finally:
        server.shutdown()
    assert CANARY_NAME not in caplog.text and CANARY_ID not in caplog.text
    assert "CANARY" not in caplog.text


# -- the probe (fake PACS, fake clock) --------------------------------------------


class FakePacs:
    def __init__(self, answer: PacsCounts | None) -> None:
        self.answer = answer
        self.asked: list[str] = []
        self.answered = threading.Event()

    def __call__(self, study_uid: str) -> PacsCounts | None:
        self.asked.append(study_uid)
        self.answered.set()
        return self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def settle(probe: CountProbe, pacs: FakePacs) -> None:
    """Wait for the question in flight to be answered and recorded."""
    assert pacs.answered.wait(5)
    pacs.answered.clear()
    deadline = time.monotonic() + 5
    while any(p.in_flight for p in probe._probes.values()):
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_probe_asks_once_then_uses_the_answer() -> None:
    pacs, clock = FakePacs(counts(3, s_1=3)), Clock()
    state = {"received": Received(T0, {"s.1": 2}, frozenset())}
    loads: list[int] = []

    def load(study_id: int) -> Received:
        loads.append(study_id)
        return state["received"]

    probe = CountProbe(pacs, load, lambda: None, clock=clock)
    try:
        # 2 of 3 received: ask, no match
        assert not probe.check(1, STUDY, T0).matched
        settle(probe, pacs)
        verdict = probe.check(1, STUDY, T0)
        assert not verdict.matched and verdict.recheck_in == pytest.approx(FIRST_RETRY_SECONDS)
        assert pacs.asked == [STUDY] and loads == [1]  # our counts read once per state
        # the third arrives: the cached answer matches, no new question
        state["received"] = Received(T0 + dt.timedelta(seconds=1), {"s.1": 3}, frozenset())
        verdict = probe.check(1, STUDY, T0 + dt.timedelta(seconds=1))
        assert verdict.matched and verdict.received == state["received"]
        assert pacs.asked == [STUDY]
        # an old answer is not trusted: asked again after the TTL
        clock.now += ANSWER_TTL_SECONDS
        assert not probe.check(1, STUDY, T0 + dt.timedelta(seconds=1)).matched
        settle(probe, pacs)
        assert probe.check(1, STUDY, T0 + dt.timedelta(seconds=1)).matched
        assert len(pacs.asked) == 2
    finally:
        probe.close()


def test_probe_backs_off_on_unchanged_counts_and_on_silence() -> None:
    pacs, clock = FakePacs(counts(5, s_1=5)), Clock()
    received = Received(T0, {"s.1": 3}, frozenset())
    probe = CountProbe(pacs, lambda _: received, lambda: None, clock=clock)
    try:
        waits = []
        for _ in range(4):
            assert not probe.check(1, STUDY, T0).matched
            settle(probe, pacs)
            verdict = probe.check(1, STUDY, T0)
            assert verdict.recheck_in is not None
            waits.append(verdict.recheck_in)
            clock.now += verdict.recheck_in
        assert waits == pytest.approx([FIRST_RETRY_SECONDS * 2**i for i in range(4)])
        # unreachable (or unknown study): asked again only after the TTL
        pacs.answer = None
        assert not probe.check(1, STUDY, T0).matched
        settle(probe, pacs)
        assert probe.check(1, STUDY, T0).recheck_in == pytest.approx(ANSWER_TTL_SECONDS)
        probe.forget_except(set())
        assert probe._probes == {}
    finally:
        probe.close()


# -- the scheduler on SQLite --------------------------------------------------------


class FakeApp:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_task(self, name: str, args: list[Any], queue: str | None = None) -> None:
        self.sent.append(int(args[0]))


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = load_settings(data_dir=tmp_path / "data", stable_seconds=30.0, broker_url="memory://")
    upgrade(s.effective_database_url)
    yield s
    dispose_all()


def receive(
    settings: Settings, n: int, at: dt.datetime | None = None, series: str = f"{STUDY}.1"
) -> None:
    with session_scope(settings.effective_database_url) as session:
        for i in range(n):
            sop = f"{series}.{time.monotonic_ns()}.{i}"
            record_instance(session, ct_record(STUDY, series, sop, modality="CT"), now=at)


def jobs(settings: Settings) -> list[tuple[int, dt.datetime, str]]:
    with session_scope(settings.effective_database_url) as session:
        return [
            (j.id, j.created_at, j.status) for j in session.scalars(select(Job).order_by(Job.id))
        ]


def last_instance_at(settings: Settings) -> dt.datetime:
    with session_scope(settings.effective_database_url) as session:
        found = session.scalar(select(Study.last_instance_at))
        assert found is not None
        return found


def test_received_counts_leave_out_what_we_made(settings: Settings) -> None:
    receive(settings, 3)
    receive(settings, 1, series=f"{STUDY}.2")
    with session_scope(settings.effective_database_url) as session:
        study_id = session.scalars(select(Study.id)).one()
        session.add(
            Delivery(
                study_id=study_id,
                study_instance_uid=STUDY,
                series_instance_uid=f"{STUDY}.99",
                sop_instance_uid=f"{STUDY}.99.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                kind="sr",
                destination="PACS@h:104",
                rel_path="x.dcm",
            )
        )
    got = received_counts(settings, study_id)
    assert got is not None
    assert got.per_series == {f"{STUDY}.1": 3, f"{STUDY}.2": 1}
    assert got.own_series == {f"{STUDY}.99"}
    assert received_counts(settings, study_id + 1) is None


def test_scheduler_completes_by_count_at_once(settings: Settings) -> None:
    app = FakeApp()
    pacs = FakePacs(PacsCounts(4, {f"{STUDY}.1": 4}))
    scheduler = Scheduler(settings, app, query=pacs, doorbell=False)  # type: ignore[arg-type]
    try:
        receive(settings, 3, at=utcnow() - dt.timedelta(seconds=0.1))
        # first sight: the PACS is asked at once, while instances still arrive
        due = scheduler.look()
        assert due is not None and 0.1 < due < 0.25
        assert scheduler.probe is not None
        settle(scheduler.probe, pacs)
        assert pacs.asked == [STUDY] and jobs(settings) == []
        assert scheduler._wake.is_set()  # the answer wakes the scheduler
        receive(settings, 1)
        scheduler.look()  # not quiet yet: not asked again
        assert pacs.asked == [STUDY] and jobs(settings) == []
        # quiet: the answer at hand matches the 4 received, no second question
        scheduler.look(now=utcnow() + dt.timedelta(seconds=0.3))
        assert pacs.asked == [STUDY]
        ((job_id, created, status),) = jobs(settings)
        assert status == JobStatus.QUEUED.value and app.sent == [job_id]
        assert created - last_instance_at(settings) < dt.timedelta(seconds=1)
    finally:
        assert scheduler.probe is not None
        scheduler.probe.close()


@pytest.mark.parametrize("answer", [None, counts(5)])
def test_scheduler_falls_back_to_the_quiet_period(
    settings: Settings, answer: PacsCounts | None
) -> None:
    """The PACS is unreachable (None) or holds more than was received."""
    app = FakeApp()
    pacs = FakePacs(answer)
    scheduler = Scheduler(settings, app, query=pacs, doorbell=False)  # type: ignore[arg-type]
    try:
        receive(settings, 4, at=utcnow() - dt.timedelta(seconds=1))
        scheduler.look()
        assert scheduler.probe is not None
        settle(scheduler.probe, pacs)
        due = scheduler.look()
        assert jobs(settings) == [] and due is not None and due <= 29.0
        scheduler.look(now=utcnow() + dt.timedelta(seconds=29.5))
        assert len(jobs(settings)) == 1 and pacs.asked
    finally:
        assert scheduler.probe is not None
        scheduler.probe.close()


def test_scheduler_thread_is_woken_and_queues_on_time(settings: Settings) -> None:
    """No PACS, a short quiet period: the job is queued within moments of the
    study's quiet period ending, though the scheduler's safety tick is 5 s."""
    fast = settings.model_copy(update={"stable_seconds": 0.4, "assembler_interval": 5.0})
    app = FakeApp()
    scheduler = Scheduler(fast, app)
    scheduler.start()
    bell = Bell(bell_address(fast.data_path))
    try:
        time.sleep(0.3)  # the first look is done: the next safety look is 5 s away
        receive(fast, 3)
        bell.ring()
        wait_for(lambda: jobs(fast), 5, 0.01, what="job")
        ((_, created, _),) = jobs(fast)
        late = (created - last_instance_at(fast)).total_seconds() - fast.stable_seconds
        assert 0 <= late < 0.15, f"queued {late * 1000:.0f} ms after the quiet period"
    finally:
        bell.close()
        scheduler.stop()
        scheduler.join(5)
    assert not scheduler.is_alive()


def test_complete_now(settings: Settings) -> None:
    app = FakeApp()
    with pytest.raises(LookupError):
        complete_now(settings, app, STUDY)
    receive(settings, 2)
    done = complete_now(settings, app, STUDY)
    assert done.sent and app.sent == [done.job_id]
    with pytest.raises(NothingToComplete, match=f"job {done.job_id}"):
        complete_now(settings, app, STUDY)
    receive(settings, 1)  # a late instance: a new job, which supersedes the first
    again = complete_now(settings, app, STUDY)
    assert [s for _, _, s in jobs(settings)] == ["superseded", "queued"]
    assert again.job_id != done.job_id


# -- the doorbell -----------------------------------------------------------------


def test_doorbell_rings_across_sockets(tmp_path: Path) -> None:
    rung = threading.Event()
    address = bell_address(tmp_path)
    bell_ring = Doorbell(address, rung.set)
    assert bell_ring.open()
    second = Doorbell(address, rung.set)
    assert not second.open()  # one scheduler per data directory
    bell = Bell(address)
    try:
        bell.ring()
        assert rung.wait(2)
    finally:
        bell_ring.close()
        bell.close()
    assert not bell_ring.is_alive()
    Bell(address).ring()  # nobody listening: dropped, no error


def test_ringing_observer_rings_for_new_instances_only() -> None:
    calls: list[tuple[str, Any]] = []

    class Inner:
        def record_association(self, accepted: bool) -> None:
            calls.append(("association", accepted))

        def record_instance(self, size_bytes: int, duplicate: bool) -> None:
            calls.append(("instance", duplicate))

        def record_cstore_failure(self, status: int) -> None:
            calls.append(("failure", status))

    class CountingBell(Bell):
        rings = 0

        def ring(self) -> None:
            self.rings += 1

    bell = CountingBell("")
    observer = RingingObserver(Inner(), bell)
    observer.record_association(True)
    observer.record_instance(10, duplicate=True)
    observer.record_cstore_failure(0xA700)
    assert bell.rings == 0
    observer.record_instance(10, duplicate=False)
    assert bell.rings == 1
    assert calls == [
        ("association", True),
        ("instance", True),
        ("failure", 0xA700),
        ("instance", False),
    ]


# -- the API trigger (in process) ---------------------------------------------------


def test_api_complete_needs_an_admin_token(tmp_path: Path) -> None:
    from worker.admin.api import create_app

    s = Settings(
        data_dir=tmp_path / "data",
        api_token=ADMIN,
        api_read_tokens=READER,
        models_dir=tmp_path / "no-models",
        broker_url="memory://",
    )
    upgrade(s.effective_database_url)
    try:
        receive(s, 2)
        client = TestClient(create_app(s), base_url="http://127.0.0.1")
        url = f"/api/studies/{STUDY}/complete"
        assert client.post(url, json={}).status_code == 401
        read = {"Authorization": f"Bearer {READER}"}
        assert client.post(url, headers=read, json={}).status_code == 403
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert client.post("/api/studies/1.2.3/complete", headers=admin, json={}).status_code == 404
        done = client.post(url, headers=admin, json={})
        assert done.status_code == 202, done.text
        body = done.json()
        assert body["job"]["status"] == "queued" and body["job"]["study_instance_uid"] == STUDY
        assert body["sent"] is True
        again = client.post(url, headers=admin, json={})
        assert again.status_code == 409 and "job" in again.json()["detail"]
    finally:
        dispose_all()


# -- real processes: Orthanc as the PACS, the CLI ------------------------------------


def study_files(tmp_path: Path, n: int = 12) -> tuple[str, list[Path]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    study_uid = f"{STUDY}.{time.monotonic_ns()}"
    series_uid = f"{study_uid}.1"
    paths = []
    for i in range(n):
        ds = ct_slice(study_uid, series_uid, i, rows=32, cols=32)
        path = tmp_path / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def latency(node: Node, study_uid: str) -> float:
    """Job created - last instance received, in seconds (the node's database)."""
    url = node_db_url(node)
    try:
        with session_scope(url) as session:
            row = session.execute(
                select(Job.created_at, Study.last_instance_at)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid)
                .order_by(Job.id)
            ).first()
    finally:
        dispose_all()
    assert row is not None
    return float((row[0] - row[1]).total_seconds())


@pytest.fixture
def orthanc_pacs(node_factory: NodeFactory, orthanc_server: Orthanc) -> tuple[Orthanc, Node]:
    node = node_factory(stable_seconds=30, pacs=f"ORTHANC@127.0.0.1:{orthanc_server.dicom_port}")
    orthanc_server.start(node.port, Name="pacs-ai-completion")
    return orthanc_server, node


@pytest.mark.integration
def test_orthanc_counts_complete_a_forwarded_study_at_once(
    tmp_path: Path, orthanc_pacs: tuple[Orthanc, Node]
) -> None:
    server, node = orthanc_pacs
    study_uid, paths = study_files(tmp_path)
    for path in paths:
        server.call("POST", "/instances", path.read_bytes())
    (found,) = server.call("POST", "/tools/lookup", study_uid.encode())
    node.cli("db", "upgrade")
    node.start_listener()  # no worker: the job stays queued, its time is what counts
    body = {"Resources": [found["ID"]], "Synchronous": True}
    server.call("POST", "/modalities/pacsai/store", json.dumps(body).encode())
    (job,) = wait_for(lambda: node.jobs(), 10, 0.2, what="a job")
    assert job["study_instance_uid"] == study_uid and job["num_instances"] == len(paths)
    took = latency(node, study_uid)
    print(f"complete by count {took * 1000:.0f} ms after the last instance (quiet period 30 s)")
    assert 0 <= took < 1.0, f"complete {took:.2f} s after its last instance (quiet period 30 s)"
    assert "match the PACS's counts" in node.logs()


@pytest.mark.integration
def test_unreachable_pacs_falls_back_to_the_quiet_period(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    node = node_factory(stable_seconds=2, pacs=f"NOBODY@127.0.0.1:{free_port()}")
    node.cli("db", "upgrade")
    node.start_listener()
    study_uid, paths = study_files(tmp_path, 5)
    assert send_datasets(node.port, paths) == [0] * len(paths)
    wait_for(lambda: node.jobs(), 10, 0.2, what="a job")
    took = latency(node, study_uid)
    print(f"PACS unreachable: complete {took * 1000:.0f} ms after the last instance (quiet 2 s)")
    assert 2.0 <= took < 3.0, f"complete {took:.2f} s after its last instance (quiet period 2 s)"
    assert "no instance counts from the PACS" in node.logs()


@pytest.mark.integration
def test_cli_complete(tmp_path: Path, node_factory: NodeFactory) -> None:
    node = node_factory(stable_seconds=30)
    node.cli("db", "upgrade")
    node.start_listener()
    study_uid, paths = study_files(tmp_path, 3)
    assert send_datasets(node.port, paths) == [0, 0, 0]
    out = node.cli("complete", "--study", study_uid).stdout
    assert out.startswith("queued job ") and study_uid in out
    (job,) = node.jobs()
    assert job["status"] == "queued" and job["num_instances"] == 3
    again = node.cli("complete", "--study", study_uid, check=False)
    assert again.returncode == 1 and "no instances that a job does not cover" in again.stderr
    unknown = node.cli("complete", "--study", "1.2.3.4", check=False)
    assert unknown.returncode == 1 and "no study 1.2.3.4" in unknown.stderr


@pytest.mark.integration
def test_every_listener_process_wakes_the_scheduler(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    """Two listener processes, a safety tick of 10 s: each study's job is still
    queued right when its quiet period ends, whichever process received it."""
    node = node_factory(stable_seconds=0.5, assembler_interval=10, listener_processes=2)
    node.cli("db", "upgrade")
    node.start_listener()
    time.sleep(2)  # both processes up, the scheduler's first look done
    studies = []
    for i in range(4):
        study_uid, paths = study_files(tmp_path / f"s{i}", 3)
        assert send_datasets(node.port, paths) == [0, 0, 0]
        studies.append(study_uid)
    wait_for(lambda: len(node.jobs()) == len(studies), 10, 0.2, what="the jobs")
    late = [latency(node, uid) - 0.5 for uid in studies]
    print(f"queued {', '.join(f'{x * 1000:.0f}' for x in late)} ms after the quiet period")
    assert all(0 <= x < 0.2 for x in late), late
