"""No patient data in text (dicomnode/phi.py, worker/logging_setup.py): library
warnings, log lines, exceptions and tracebacks reworded; a job's known header
values masked in its log lines, stored error and the API's answer. In process;
tests/test_phi_e2e.py does it with real processes."""

from __future__ import annotations

import datetime as dt
import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom.valuerep
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from db.migrate import upgrade
from db.models import utcnow
from db.repo import InstanceRecord, record_instance
from db.session import dispose_all, session_scope
from dicomnode import phi
from dicomnode.uids import relative_instance_path
from worker.admin.api import create_app
from worker.logging_setup import configure_logging, log_context
from worker.scheduling.jobs import JobError, StudyContext, run_job
from worker.scheduling.scheduler import assemble_once
from worker.settings import Settings, load_settings

NAME = "Zqcanaryfamily^Zqcanarygiven"
PATIENT_ID = "ZQID-55501"
BIRTH = "19020304"
ACCESSION = "ZQACC7781"
STUDY = "1.2.826.0.1.3680043.10.77"
CANARIES = ("Zqcanary", PATIENT_ID, BIRTH, ACCESSION)


def header() -> Dataset:
    ds = Dataset()
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH
    ds.AccessionNumber = ACCESSION
    ds.OtherPatientNames = ["Zqcanaryother"]
    return ds


def assert_clean(text: str) -> None:
    for canary in CANARIES:
        assert canary.lower() not in text.lower(), (canary, text)


@pytest.fixture
def log_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """This process's logging as an entry point sets it up, into a buffer."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level, warnings.showwarning
    hooks = sys.excepthook, threading.excepthook
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("DEBUG", "text", "test")
    try:
        yield stream
    finally:
        root.handlers[:], root.level, warnings.showwarning = saved
        sys.excepthook, threading.excepthook = hooks
        logging.captureWarnings(False)


# -- exceptions ---------------------------------------------------------------------


def _library_error() -> ValueError:
    try:
        hd.PatientSexValues(f"U {NAME}")
    except ValueError as exc:
        return exc
    raise AssertionError("highdicom accepted it")


def test_describe_and_traceback_keep_type_and_our_frames() -> None:
    exc = _library_error()
    assert NAME in str(exc)  # what would have leaked
    assert phi.describe(exc) == "ValueError in enum"
    try:
        try:
            raise exc
        except ValueError as inner:
            raise JobError(f"SEG failed: {phi.describe(inner)}") from inner
    except JobError as outer:
        text = phi.format_traceback(outer)
    assert_clean(text)
    assert "ValueError (message withheld" in text
    assert "worker.scheduling.jobs.JobError: SEG failed: ValueError in enum" in text
    assert "direct cause of the following exception" in text
    assert "test_phi.py" not in text  # not our package: a summarised frame
    assert "frames in tests.test_phi, enum]" in text


def test_scrub_masks_remembered_values_inside_a_scope() -> None:
    text = f"failed for {NAME} ({PATIENT_ID}, born {BIRTH}, acc {ACCESSION}); zqcanaryGIVEN"
    assert phi.scrub(text) == text  # outside a scope nothing is known
    with phi.scope():
        phi.remember(header())
        masked = phi.scrub(text)
        assert_clean(masked)
        assert masked.startswith("failed for ***")
        assert phi.scrub_json({"a": [text], "b": 1}) == {"a": [masked], "b": 1}
    assert phi.scrub(text) == text


# -- log lines ----------------------------------------------------------------------


def test_library_log_lines_and_warnings_are_reworded(log_stream: io.StringIO) -> None:
    logging.getLogger("highdicom.base").warning('value of "patient_name" is odd: "%s"', NAME)
    logging.getLogger("pydicom").info("Invalid value for VR DA: %r", BIRTH)
    logging.getLogger("pynetdicom.assoc").error("dataset of %s", PATIENT_ID)
    warnings.warn_explicit(
        f"Invalid value for VR PN: {NAME!r}",
        UserWarning,
        pydicom.valuerep.__file__,
        440,
        module="pydicom.valuerep",
    )
    logging.captureWarnings(True)  # what Celery's worker does
    warnings.warn_explicit(f"odd {NAME}", UserWarning, hd.__file__, 199, module="highdicom")
    logging.getLogger("celery.app.trace").error(
        "Task %(name)s[%(id)s] %(description)s: %(exc)s",
        {"name": "t", "id": "1", "description": "raised unexpected", "exc": f"ValueError({NAME})"},
    )
    exc = _library_error()
    logging.getLogger("worker.scheduling.jobs").warning("job %d failed: %s", 7, exc)
    try:
        raise exc
    except ValueError:
        logging.getLogger("worker.scheduling.jobs").exception("job %d failed", 7)
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    out = log_stream.getvalue()
    assert_clean(out)
    assert "highdicom.base: warning message withheld" in out
    assert "Invalid value for VR DA" not in out  # a library INFO line: dropped
    assert "pynetdicom.assoc: error message withheld" in out
    assert "UserWarning from pydicom.valuerep:440 (text withheld)" in out
    assert "UserWarning from highdicom:199 (text withheld)" in out
    assert "raised unexpected: (exception text withheld)" in out
    assert "job 7 failed: ValueError in enum" in out
    assert out.count("ValueError (message withheld") == 2
    assert "Exception in ASGI application" in out


def test_a_jobs_values_are_masked_in_our_own_lines(log_stream: io.StringIO) -> None:
    with log_context(job_id=3, study=STUDY):
        phi.remember(header())
        logging.getLogger("worker.pipeline.run").info("reading %s of %s", ACCESSION, NAME)
    logging.getLogger("worker.pipeline.run").info("after the job: %s", PATIENT_ID)
    out = log_stream.getvalue()
    assert "reading *** of ***" in out and "job_id=3" in out
    assert f"after the job: {PATIENT_ID}" in out  # nothing known outside a job


def test_uncaught_exception_in_a_thread_is_logged_without_its_message(
    log_stream: io.StringIO,
) -> None:
    def boom() -> None:
        hd.PatientSexValues(NAME)

    thread = threading.Thread(target=boom, name="assoc-1")
    thread.start()
    thread.join()
    out = log_stream.getvalue()
    assert "uncaught exception in thread assoc-1" in out
    assert "ValueError (message withheld" in out
    assert_clean(out)


# -- a failed job: its error in the database and the API ----------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    s = load_settings(data_dir=tmp_path / "data", database_url=url, stable_seconds=0)
    upgrade(url)
    series = f"{STUDY}.1"
    with session_scope(url) as session:
        record_instance(
            session,
            InstanceRecord(
                study_instance_uid=STUDY,
                series_instance_uid=series,
                sop_instance_uid=f"{series}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                rel_path=relative_instance_path(STUDY, series, f"{series}.1"),
                size_bytes=100,
                modality="CT",
            ),
        )
    yield s
    dispose_all()


class _App:
    def send_task(self, name: str, args: list[Any], queue: str | None = None) -> None:
        pass


def _job(settings: Settings) -> int:
    (job_id,) = assemble_once(settings, _App(), now=utcnow() + dt.timedelta(seconds=1))
    return int(job_id)


def our_error(ctx: StudyContext, settings: Settings) -> dict[str, Any]:
    phi.remember(header())
    raise JobError(
        f"header of {NAME} ({PATIENT_ID}) odd",
        {"models": {"m": {"error": f"series of {ACCESSION}"}}},
    )


def library_error(ctx: StudyContext, settings: Settings) -> dict[str, Any]:
    phi.remember(header())
    hd.PatientSexValues(NAME)
    return {}


@pytest.mark.parametrize("processor", [our_error, library_error])
def test_failed_job_error_and_api_hold_no_patient_data(
    settings: Settings, log_stream: io.StringIO, processor: Any
) -> None:
    job_id = _job(settings)
    assert run_job(job_id, settings, processor) == "failed"
    client = TestClient(create_app(settings), base_url="http://127.0.0.1")
    (job,) = client.get("/api/jobs").json()["items"]
    assert job["id"] == job_id and job["status"] == "failed" and job["error"]
    answer = client.get(f"/api/studies/{STUDY}").text + client.get("/api/jobs").text
    out = log_stream.getvalue()
    assert f"job {job_id} failed" in out
    for text in (job["error"], answer, out, client.get("/metrics").text):
        assert_clean(text)
    if processor is our_error:
        assert job["error"] == "header of *** (***) odd"
        assert job["summary"]["models"]["m"]["error"] == "series of ***"
    else:
        assert job["error"] == "internal error: ValueError"
        assert "ValueError (message withheld" in out
