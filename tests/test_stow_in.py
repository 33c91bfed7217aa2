"""STOW-RS in (worker/admin/stow_rs.py): instances stored over HTTP with the
guarantees of C-STORE, through the same ingest service (dicomnode/ingest.py).

The multipart reader and the answers are tested in process (FastAPI's
TestClient, SQLite, a temp storage); one test uploads a study with curl to a
real ``pacs-ai run`` node and waits for its job, as for a study sent by C-STORE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

from db.migrate import upgrade
from dicomnode.ingest import IngestService, Source
from dicomnode.uids import relative_instance_path
from tests.conftest import NodeFactory, db_rows, have, port_open, wait_for
from tests.factory import CANARY_BIRTH, CANARY_ID, CANARY_NAME, ct_slice
from worker.admin.api import create_app
from worker.admin.stow_rs import (
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    REFERENCED_SOP_CLASS_UID,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_SOP_SEQUENCE,
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
)
from worker.settings import Settings

ADMIN = "admin-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
STOW = "stow-token-0123456789abcdef"
BOUNDARY = "pacs-ai-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

pytestmark = [
    # hostile UIDs are encoded on purpose
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:The value length .* exceeds"),
]


# -- helpers ------------------------------------------------------------------------------


def part10(ds: Dataset) -> bytes:
    """A Part 10 file with exactly ``ds.file_meta`` (pydicom's ``save_as`` would
    correct a hostile Media Storage SOP Instance UID) and ``ds`` as explicit VR LE."""
    meta, body = DicomBytesIO(), DicomBytesIO()
    for buf in (meta, body):
        buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    write_dataset(body, ds)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue()


def multipart(
    parts: list[bytes], boundary: str = BOUNDARY, types: dict[int, str] | None = None
) -> bytes:
    out = BytesIO()
    out.write(b"a preamble that is ignored\r\n")
    for i, data in enumerate(parts):
        out.write(f"--{boundary}\r\n".encode())
        out.write(f"Content-Type: {(types or {}).get(i, 'application/dicom')}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\nan epilogue\r\n".encode())
    return out.getvalue()


def series(n: int, study: str | None = None, **kw: Any) -> list[Dataset]:
    study, series_uid = study or generate_uid(), generate_uid()
    return [ct_slice(study, series_uid, i, **kw) for i in range(n)]


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=tmp_path / "no-models",
        broker_url="memory://",
        **extra,
    )
    upgrade(settings.effective_database_url)
    return settings


def _client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8080")


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": CONTENT_TYPE}


def _rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(settings.effective_database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql)).all()]
    finally:
        engine.dispose()


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def _uid_of(item: dict[str, Any], tag: str) -> str | None:
    values = item[tag].get("Value")
    return str(values[0]) if values else None


def _incoming(settings: Settings) -> list[Path]:
    inc = settings.storage_path / ".incoming"
    return sorted(inc.iterdir()) if inc.exists() else []


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- the multipart reader -----------------------------------------------------------------


def _read(body: bytes, boundary: str, chunk: int) -> list[tuple[dict[str, str], bytes]]:
    reader = MultipartReader(boundary)
    parts: list[tuple[dict[str, str], bytes]] = []
    headers: dict[str, str] = {}
    data = b""
    for start in range(0, len(body), chunk):
        for event in reader.feed(body[start : start + chunk]):
            if isinstance(event, PartStart):
                headers, data = event.headers, b""
            elif isinstance(event, PartData):
                data += event.data
            else:
                assert isinstance(event, PartEnd)
                parts.append((headers, data))
    reader.close()
    return parts


def test_multipart_reader_in_chunks_of_any_size() -> None:
    boundary = "b0und'ary (x)"
    rng = random.Random(7)
    tricky = [
        bytes(rng.getrandbits(8) for _ in range(3000)),
        b"\r\n--b0und'ary (y)\r\n--b0und" + b"\r\n-" * 50,  # almost delimiters
        b"",
        b"--b0und'ary (x)",  # the boundary without CRLF before it is data
    ]
    body = b"preamble\r\n--b0und'ary (x)\r\n"
    body += b"Content-Type: application/dicom\r\nX-Folded: a\r\n b\r\n\r\n" + tricky[0]
    body += b"\r\n--b0und'ary (x)  \r\n\r\n" + tricky[1]  # padding; a part without headers
    body += b"\r\n--b0und'ary (x)\r\ncontent-type: application/dicom\r\n\r\n" + tricky[2]
    body += b"\r\n--b0und'ary (x)\r\n\r\n" + tricky[3]
    body += b"\r\n--b0und'ary (x)--\r\nepilogue --b0und'ary (x)\r\n"
    for chunk in (1, 2, 3, 7, 64, 1000, len(body)):
        parts = _read(body, boundary, chunk)
        assert [data for _, data in parts] == tricky, chunk
        assert parts[0][0] == {"content-type": "application/dicom", "x-folded": "a b"}
        assert parts[1][0] == {}
    # a body that starts with its first delimiter, no preamble
    assert _read(b"--x\r\n\r\nabc\r\n--x--", "x", 1) == [({}, b"abc")]


@pytest.mark.parametrize(
    "body",
    [
        b"--x\r\n\r\nabc",  # no closing delimiter
        b"--x\r\n\r\nabc\r\n--x",  # ... nor the final "--"
        b"no delimiter at all",
        b"--x\r\nnot a header\r\n\r\nabc\r\n--x--",
        b"--x junk\r\n\r\nabc\r\n--x--",
        b"--x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\nabc\r\n--x--",
    ],
)
def test_multipart_reader_refuses_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MultipartError):
        _read(body, "x", 5)


# -- the endpoint in process --------------------------------------------------------------


def test_study_stored_durably_recorded_and_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, api_token=ADMIN)
    client = _client(settings)
    datasets = series(4)
    sent = {str(ds.SOPInstanceUID): part10(ds) for ds in datasets}
    answer = client.post(
        "/dicomweb/studies", content=multipart(list(sent.values())), headers=_auth(ADMIN)
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    body = answer.json()
    assert FAILED_SOP_SEQUENCE not in body
    refs = _items(body, REFERENCED_SOP_SEQUENCE)
    assert [_uid_of(r, REFERENCED_SOP_INSTANCE_UID) for r in refs] == list(sent)
    assert {_uid_of(r, REFERENCED_SOP_CLASS_UID) for r in refs} == {"1.2.840.10008.5.1.4.1.1.2"}

    # on disk byte for byte at the hashed path, recorded, nothing left in .incoming
    rows = _rows(
        settings, "SELECT sop_instance_uid, rel_path, calling_aet, size_bytes FROM instances"
    )
    assert {r[0] for r in rows} == set(sent)
    for sop, rel, aet, size in rows:
        ds = next(d for d in datasets if str(d.SOPInstanceUID) == sop)
        assert rel == relative_instance_path(
            str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop
        )
        assert (settings.storage_path / rel).read_bytes() == sent[sop]
        assert aet == "STOW-RS" and size == len(sent[sop])
    assert _rows(settings, "SELECT needs_job FROM studies") == [(1,)]  # the assembler's cue
    assert _incoming(settings) == []

    # sent again: duplicates are fine, stored once
    again = client.post(
        "/dicomweb/studies", content=multipart(list(sent.values())), headers=_auth(ADMIN)
    )
    assert again.status_code == 200
    assert len(_items(again.json(), REFERENCED_SOP_SEQUENCE)) == 4
    assert len(_rows(settings, "SELECT id FROM instances")) == 4

    logs = caplog.text
    assert "STOW-RS from testclient: 4 stored, 0 duplicate, 0 failed" in logs
    assert "STOW-RS from testclient: 0 stored, 4 duplicate, 0 failed" in logs
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, ADMIN):
        assert canary not in logs


def test_mixed_upload_stores_the_good_parts_and_reports_the_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, api_token=ADMIN, max_instance_bytes=64 * 1024)
    client = _client(settings)
    root = tmp_path
    study = generate_uid()
    good = series(2, study)
    hostile = series(1, study)[0]
    hostile.SOPInstanceUID = "../../etc/x"
    hostile.file_meta.MediaStorageSOPInstanceUID = "../../etc/x"
    hostile_study = series(1, study)[0]
    hostile_study.StudyInstanceUID = "1.2.3/../../../x"
    other_study = series(1)[0]
    oversize = series(1, study, rows=256, cols=256)[0]  # 128 KiB of pixels
    not_dicom = series(1, study)[0]
    parts = [
        part10(good[0]),
        b"garbage, not DICOM at all" * 10,
        part10(hostile),
        part10(hostile_study),
        part10(other_study),
        part10(oversize),
        part10(not_dicom),
        part10(good[1]),
    ]
    before = _files(root)
    answer = client.post(
        f"/dicomweb/studies/{study}",
        content=multipart(parts, types={6: "text/plain"}),
        headers=_auth(ADMIN),
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    refs = _items(body, REFERENCED_SOP_SEQUENCE)
    assert [_uid_of(r, REFERENCED_SOP_INSTANCE_UID) for r in refs] == [
        str(ds.SOPInstanceUID) for ds in good
    ]
    failed = [
        (_uid_of(f, REFERENCED_SOP_INSTANCE_UID), f[FAILURE_REASON]["Value"][0])
        for f in _items(body, FAILED_SOP_SEQUENCE)
    ]
    assert failed == [
        (None, 0xC210),  # garbage: cannot understand
        (None, 0xA900),  # a hostile SOP Instance UID is never echoed
        (str(hostile_study.SOPInstanceUID), 0xA900),  # hostile Study Instance UID
        (str(other_study.SOPInstanceUID), 0xA900),  # not of the study in the URL
        (str(oversize.SOPInstanceUID), 0xA700),  # larger than PACS_AI_MAX_INSTANCE_BYTES
        (None, 0xC210),  # a text/plain part
    ]
    # only the good ones: in the database, in the storage; nothing anywhere else
    assert {r[0] for r in _rows(settings, "SELECT sop_instance_uid FROM instances")} == {
        str(ds.SOPInstanceUID) for ds in good
    }
    assert _rows(settings, "SELECT study_instance_uid FROM studies") == [(study,)]
    new = _files(root) - before
    storage = str(settings.storage_path.relative_to(root))
    stored = {p for p in new if p.startswith(storage + "/")}
    assert len(stored) == 2 and all(p.endswith(".dcm") for p in stored)
    # besides: the database's WAL files, and the embedded mode's key for patient links
    key = str(settings.secret_key_path.relative_to(root))
    assert {p for p in new - stored if not p.endswith(("-wal", "-shm")) and p != key} == set()
    for base in (settings.storage_path, root, Path.cwd()):
        assert not (base / "etc" / "x").exists() and not (base / "x").exists()
    assert _incoming(settings) == []
    logs = caplog.text
    assert "STOW-RS refused 0xA900" in logs and "STOW-RS refused 0xA700" in logs
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH):
        assert canary not in logs


def test_below_watermark_every_part_fails_409(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_token=ADMIN, min_free_mb=10**9)
    answer = _client(settings).post(
        "/dicomweb/studies",
        content=multipart([part10(ds) for ds in series(2)]),
        headers=_auth(ADMIN),
    )
    assert answer.status_code == 409, answer.text
    reasons = [f[FAILURE_REASON]["Value"][0] for f in _items(answer.json(), FAILED_SOP_SEQUENCE)]
    assert reasons == [0xA700, 0xA700]
    assert REFERENCED_SOP_SEQUENCE not in answer.json()
    assert _rows(settings, "SELECT id FROM instances") == []
    assert _incoming(settings) == []
    assert not [p for p in settings.storage_path.rglob("*.dcm")]


def test_tokens(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_token=ADMIN, api_read_tokens=READER, stow_tokens=STOW)
    client = _client(settings)

    def post(headers: dict[str, str]) -> httpx.Response:
        return client.post(
            "/dicomweb/studies", content=multipart([part10(series(1)[0])]), headers=headers
        )

    assert post({"Content-Type": CONTENT_TYPE}).status_code == 403  # the web guard: no bearer
    assert post(_auth("wrong-token-0123456789abcdef")).status_code == 401
    assert post(_auth(READER)).status_code == 403
    assert post(_auth(STOW)).status_code == 200
    assert post(_auth(ADMIN)).status_code == 200
    # a STOW-RS token stores, and does nothing else
    stow = {"Authorization": f"Bearer {STOW}"}
    assert client.get("/api/studies", headers=stow).status_code == 401
    assert client.post("/api/studies/1.2.3/reprocess", json={}, headers=stow).status_code == 401
    # hashed, as the API tokens
    digest = "sha256:" + hashlib.sha256(STOW.encode()).hexdigest()
    hashed = _client(_settings(tmp_path / "h", api_token=ADMIN, stow_tokens=digest))
    answer = hashed.post(
        "/dicomweb/studies", content=multipart([part10(series(1)[0])]), headers=_auth(STOW)
    )
    assert answer.status_code == 200
    # STOW tokens only, no API token: the API is open, STOW-RS still needs its token
    only = _client(_settings(tmp_path / "o", stow_tokens=STOW))
    body = multipart([part10(series(1)[0])])
    assert only.post("/dicomweb/studies", content=body, headers=_auth("x" * 20)).status_code == 401
    assert only.post("/dicomweb/studies", content=body, headers=_auth(STOW)).status_code == 200


def test_media_types_bodies_and_limits(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_token=ADMIN, stow_max_request_bytes=100_000)
    client = _client(settings)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    good = multipart([part10(series(1)[0])])

    def post(body: bytes, content_type: str, path: str = "/dicomweb/studies") -> httpx.Response:
        return client.post(path, content=body, headers={**auth, "Content-Type": content_type})

    for wrong in (
        "application/json",
        "application/dicom",
        "text/plain",
        "multipart/form-data; boundary=x",
        'multipart/related; type="application/dicom+xml"; boundary=x',
    ):
        assert post(good, wrong).status_code == 415, wrong
    assert post(good, 'multipart/related; type="application/dicom"').status_code == 400
    assert post(good, "multipart/related; boundary=" + "x" * 71).status_code == 400
    assert post(good[:-20], CONTENT_TYPE).status_code == 400  # cut short
    assert post(b"--" + BOUNDARY.encode() + b"--\r\n", CONTENT_TYPE).status_code == 400  # no part
    assert post(good, CONTENT_TYPE, "/dicomweb/studies/1.02.abc").status_code == 400
    # an encoded slash is not a study (the guard lets no such path through)
    assert post(good, CONTENT_TYPE, "/dicomweb/studies/..%2F..%2Fetc").status_code == 403
    assert post(good, CONTENT_TYPE, "/dicomweb/studies/1.2.3.4").status_code == 409  # wrong study
    # the type parameter may be left out; quoted or not, any case
    assert post(good, f"Multipart/Related; boundary={BOUNDARY}").status_code == 200
    big = multipart([part10(ds) for ds in series(12)])  # ~120 KB
    assert post(big, CONTENT_TYPE).status_code == 413
    # the web guard still refuses a foreign origin, bearer or not
    foreign = {**auth, "Content-Type": CONTENT_TYPE, "Origin": "http://evil.example"}
    assert client.post("/dicomweb/studies", content=good, headers=foreign).status_code == 403
    assert _incoming(settings) == []


def test_open_api_takes_stow_with_any_bearer_only(tmp_path: Path) -> None:
    """Without any token (a loopback-only API) STOW-RS is open, but a request
    still needs an Authorization header to pass the web guard's CSRF rule."""
    client = _client(_settings(tmp_path))
    body = multipart([part10(series(1)[0])])
    headers = {"Content-Type": CONTENT_TYPE}
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 403
    headers["Authorization"] = "Bearer anything"
    assert client.post("/dicomweb/studies", content=body, headers=headers).status_code == 200


def test_ingest_dataset_is_the_same_step(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    service = IngestService(settings.storage_path, settings.effective_database_url)
    ds = series(1)[0]
    source = Source("test", "TESTER")
    first = service.ingest_dataset(ds, source)
    assert first.result == "stored" and first.sop_instance_uid == str(ds.SOPInstanceUID)
    assert service.ingest_dataset(ds, source).result == "duplicate"
    wrong = service.ingest_dataset(series(1)[0], source, study_instance_uid="1.2.3")
    assert (wrong.result, wrong.status) == ("refused", 0xA900)
    assert _rows(settings, "SELECT calling_aet FROM instances") == [("TESTER",)]
    assert _incoming(settings) == []


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(not have("curl"), reason="curl not installed")
def test_study_sent_with_curl_runs_like_a_c_store_one(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory(api_token=ADMIN, stow_tokens=STOW)
    node.start("run")
    api_port = int(node.env["PACS_AI_API_PORT"])
    wait_for(lambda: port_open(node.port) and port_open(api_port), 60, what="listener and API")
    datasets = series(12)
    study = str(datasets[0].StudyInstanceUID)
    body = tmp_path / "study.multipart"
    body.write_bytes(multipart([part10(ds) for ds in datasets]))
    sent = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail-with-body",
            "-X",
            "POST",
            "-H",
            f"Authorization: Bearer {STOW}",
            "-H",
            f"Content-Type: {CONTENT_TYPE}",
            "--data-binary",
            f"@{body}",
            f"http://127.0.0.1:{api_port}/dicomweb/studies/{study}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    answer = json.loads(sent.stdout)
    assert len(_items(answer, REFERENCED_SOP_SEQUENCE)) == 12
    assert FAILED_SOP_SEQUENCE not in answer

    node.wait_jobs([study], "done", timeout=120)
    found = {s["study_instance_uid"]: s for s in node.studies()}[study]
    assert found["num_instances"] == 12 and found["status"] == "done"
    assert found["modalities"] == ["CT"]
    job = next(j for j in node.jobs() if j["study_instance_uid"] == study)
    assert job["error"] is None and job["attempts"] == 1
    assert job["summary"]["instances"] == 12 and job["summary"]["modalities"] == ["CT"]
    assert {r[0] for r in db_rows(node, "SELECT calling_aet FROM instances")} == {"STOW-RS"}
    node.stop_all()
    logs = node.logs()
    assert "STOW-RS from 127.0.0.1" in logs and "12 stored" in logs
    for secret in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, STOW, ADMIN):
        assert secret not in logs
