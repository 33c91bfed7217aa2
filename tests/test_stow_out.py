"""DICOMweb STOW-RS as a delivery protocol (dicomnode/protocols/stow.py) and the
destination registry (dicomnode/protocols/__init__.py):

- parsing: good and bad ``stow+http(s)://`` URLs, profiles, credentials never
  in a name, a string, a repr or an error;
- a tiny local STOW-RS server answering 202 with a FailedSOPSequence, 503, 401,
  400 ... drives ``dispatch_deliveries``: the right outcome and retry row per
  object, one multipart request per study with the right headers;
- a real node (``pacs-ai run``) delivering its SR and SEG by STOW-RS to Orthanc
  with its DICOMweb plugin and HTTP Basic authentication on: they land in the
  source study.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.migrate import upgrade
from db.models import Delivery, Study, utcnow
from db.session import session_scope
from dicomnode.protocols import (
    KINDS,
    PROTOCOLS,
    Destination,
    SendContext,
    SendResult,
    parse_destination,
    parse_destinations,
)
from dicomnode.protocols.cstore import CStoreDestination
from dicomnode.protocols.stow import StowDestination, interpret
from tests.conftest import (
    NodeFactory,
    canary_chest_ct,
    free_port,
    have,
    send_datasets,
    wait_for,
)
from worker.delivery.dispatch import dispatch_deliveries
from worker.settings import Settings, SettingsError, load_settings

SECRET = "pw-Kx9-never-shown"
TOKEN = "tok-0123456789abcdef-never-shown"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


# -- parsing and the registry --------------------------------------------------------


def test_registry_keys_protocols_by_scheme() -> None:
    assert set(PROTOCOLS) == {"", "tls", "stow+http", "stow+https"}
    assert isinstance(parse_destination("PACS@10.0.0.5:104"), CStoreDestination)
    assert isinstance(parse_destination("tls://PACS@pacs:2762/sr"), CStoreDestination)
    assert isinstance(parse_destination("stow+http://pacs:8042/dicom-web"), StowDestination)
    assert isinstance(parse_destination("stow+https://pacs/dicom-web"), StowDestination)
    # the C-STORE row key is what it always was, so existing delivery rows still match
    assert parse_destination("tls://PACS@pacs:2762/sr").name == "PACS@pacs:2762"
    assert KINDS == ("sr", "seg", "ki", "map")


@pytest.mark.parametrize(
    ("text", "name", "shown", "profile", "https", "path"),
    [
        (
            "stow+http://pacs:8042/dicom-web#sr+seg",
            "stow+http://pacs:8042/dicom-web",
            "stow+http://pacs:8042/dicom-web#sr+seg",
            {"sr", "seg"},
            False,
            "/dicom-web",
        ),
        (
            "stow+https://PACS.example.org/dicom-web/",
            "stow+https://pacs.example.org:443/dicom-web",
            "stow+https://pacs.example.org:443/dicom-web#sr+seg",
            {"sr", "seg"},
            True,
            "/dicom-web",
        ),
        (
            f"stow+http://alice:{SECRET}@127.0.0.1:8042/wado/rs#ki+sr",
            "stow+http://127.0.0.1:8042/wado/rs",
            "stow+http://***@127.0.0.1:8042/wado/rs#sr+ki",
            {"sr", "ki"},
            False,
            "/wado/rs",
        ),
        (
            "STOW+HTTP://[::1]:8042#seg",
            "stow+http://[::1]:8042",
            "stow+http://[::1]:8042#seg",
            {"seg"},
            False,
            "",
        ),
    ],
)
def test_stow_destinations_parse(
    text: str, name: str, shown: str, profile: set[str], https: bool, path: str
) -> None:
    dest = parse_destination(text)
    assert isinstance(dest, StowDestination)
    assert (dest.name, str(dest), dest.profile, dest.https, dest.path) == (
        name,
        shown,
        profile,
        https,
        path,
    )
    for kind in KINDS:
        assert dest.wants(kind) == (kind in profile)
    assert SECRET not in repr(dest)


def test_url_credentials_are_percent_decoded_and_hidden() -> None:
    dest = parse_destination(f"stow+https://d%40partment:{SECRET}%2C%23@pacs/dicom-web")
    assert isinstance(dest, StowDestination)
    assert (dest.username, dest.password) == ("d@partment", f"{SECRET},#")
    for text in (dest.name, str(dest), repr(dest)):
        assert SECRET not in text and "partment" not in text
    assert dest.has_credentials


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"ftp://u:{SECRET}@pacs/dicom-web", "unknown scheme 'ftp'"),
        (f"http://u:{SECRET}@pacs/dicom-web", "unknown scheme 'http'"),
        (f"stow+http://u:{SECRET}@pacs:99999/x", "not of the form"),
        (f"stow+http://u:{SECRET}@pacs:0/x", "port 0"),
        (f"stow+http://u:{SECRET}@/dicom-web", "host"),
        (f"stow+http://u:{SECRET}@pa_cs/dicom-web", "host"),
        (f"stow+http://u:{SECRET}@pacs/dicom web", "not of the form"),
        (f"stow+http://u:{SECRET}@pacs/dicom-web?x=1", "no query string"),
        (f"stow+http://u:{SECRET}@pacs/dicom-web#xml", "profile 'xml'"),
        (f"stow+http://u:{SECRET}@pacs/dicom-web#", "profile ''"),
        (f"stow+http://u:pw#{SECRET}@pacs/dicom-web", "not of the form"),
        (f"stow+http://u:{SECRET}/dicom-web", "'stow+http://***/dicom-web' is not of the form"),
        ("stow+http://pacs/" + "x" * 120, "longer than 128"),
    ],
)
def test_bad_stow_destinations_never_echo_credentials(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="destination") as info:
        parse_destination(text)
    assert fragment in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(SettingsError) as bad:
        load_settings(destinations=f"PACS@h:104,{text}")
    assert "PACS_AI_DESTINATIONS" in str(bad.value) and SECRET not in str(bad.value)


def test_destination_lists_mix_protocols() -> None:
    dests = parse_destinations(
        f"PACS@10.0.0.5:104, stow+http://u:{SECRET}@pacs:8042/dicom-web#sr ,"
        "stow+https://pacs:8043/dicom-web"
    )
    assert [d.name for d in dests] == [
        "PACS@10.0.0.5:104",
        "stow+http://pacs:8042/dicom-web",
        "stow+https://pacs:8043/dicom-web",
    ]
    # same server, path and port: one destination, whatever the credentials
    with pytest.raises(ValueError, match="listed twice"):
        parse_destinations("stow+http://a:b@pacs:80/x,stow+http://PACS/x/")


def test_settings_hold_the_token_without_showing_it() -> None:
    s = load_settings(
        dicomweb_token=f" {TOKEN} ",
        destinations=f"stow+http://u:{SECRET}@pacs:8042/dicom-web",
    )
    assert s.dicomweb_token == TOKEN
    assert TOKEN not in repr(s) and SECRET not in repr(s)
    assert [d.name for d in s.destination_list] == ["stow+http://pacs:8042/dicom-web"]
    with pytest.raises(SettingsError, match="PACS_AI_DICOMWEB_TOKEN") as bad:
        load_settings(dicomweb_token="two words\r\nX-Injected: 1")
    assert "Injected" not in str(bad.value)


# -- what a response means, without a network ------------------------------------------


def _sop_item(uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "00081150": {"vr": "UI", "Value": [SR_CLASS]},
        "00081155": {"vr": "UI", "Value": [uid]},
    }
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def stow_response(sent: list[str], failed: dict[str, int]) -> bytes:
    """A STOW-RS response in DICOM JSON: ReferencedSOPSequence, FailedSOPSequence."""
    doc: dict[str, Any] = {
        "00081198": {"vr": "SQ", "Value": [_sop_item(u, r) for u, r in failed.items()]},
        "00081199": {"vr": "SQ", "Value": [_sop_item(u) for u in sent]},
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "sent"),
        (408, "transient"),
        (429, "transient"),
        (500, "transient"),
        (503, "transient"),
        (401, "transient"),
        (403, "transient"),
        (400, "permanent"),
        (404, "permanent"),
        (409, "permanent"),
        (413, "permanent"),
        (415, "permanent"),
        (301, "permanent"),
    ],
)
def test_http_status_outcomes(status: int, outcome: str) -> None:
    (result,) = interpret("stow+http://h:80", status, "Whatever", b"", ["1.2.3"])
    assert result.outcome == outcome
    if status in (401, 403):
        assert "PACS_AI_DICOMWEB_TOKEN" in result.message and f"HTTP {status}" in result.message


def test_per_instance_outcomes_from_the_response() -> None:
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5"]
    body = stow_response(["1.1"], {"1.2": 0xA700, "1.3": 0xC000, "1.4": 0x0111})
    got = [r.outcome for r in interpret("d", 202, "Accepted", body, uids)]
    assert got == ["sent", "transient", "permanent", "sent", "transient"]  # 1.5: not confirmed
    # 409: per instance when the body says, else permanent
    got = [r.outcome for r in interpret("d", 409, "Conflict", body, uids)]
    assert got == ["sent", "transient", "permanent", "sent", "permanent"]
    # 200 trusts an explicit failure, and the rest is sent
    got = [r.outcome for r in interpret("d", 200, "OK", body, uids)]
    assert got == ["sent", "transient", "permanent", "sent", "sent"]
    # 202 without a readable body: nothing confirmed, retry (a duplicate counts as sent)
    assert {r.outcome for r in interpret("d", 202, "", b"<html>", uids)} == {"transient"}
    # a failure without a reason is permanent; a list wrapper is accepted
    wrapped = b"[" + stow_response(["1.1"], {}) + b"]"
    assert interpret("d", 202, "", wrapped, ["1.1"])[0].outcome == "sent"
    no_reason = json.dumps({"00081198": {"vr": "SQ", "Value": [_sop_item("1.1")]}}).encode()
    assert interpret("d", 202, "", no_reason, ["1.1"])[0].outcome == "permanent"
    message = interpret("d", 202, "", body, uids)[2].message
    assert "0xC000" in message


# -- a tiny STOW-RS server -------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    parts: list[bytes]

    @property
    def sop_uids(self) -> list[str]:
        return [str(dcmread(io.BytesIO(p)).SOPInstanceUID) for p in self.parts]


Answer = Callable[[Received], tuple[int, bytes]]


@dataclass
class FakeStow:
    """Records each POST (its multipart parts decoded by the stdlib's email
    parser) and answers what ``answer`` returns."""

    answer: Answer
    delay: float = 0.0
    tls: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = message_from_bytes(head + body)
                parts = [p.get_payload(decode=True) for p in message.get_payload()]
                got = Received(self.path, dict(self.headers.items()), parts)
                fake.received.append(got)
                time.sleep(fake.delay)
                status, payload = fake.answer(got)
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_stow() -> Iterator[Callable[..., FakeStow]]:
    servers: list[FakeStow] = []

    def make(answer: Answer, delay: float = 0.0, tls: ssl.SSLContext | None = None) -> FakeStow:
        servers.append(FakeStow(answer, delay, tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _settings(tmp_path: Path, destinations: str, **kw: Any) -> Settings:
    s = Settings(
        data_dir=tmp_path / "data",
        broker_url="memory://",
        destinations=destinations,
        delivery_retry_base=30,
        delivery_retry_max=60,
        **kw,
    )
    upgrade(s.effective_database_url)
    return s


def _object(study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SR_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.Manufacturer = "SR", "pacs-ai"
    return ds


def _queue(settings: Settings, studies: list[str], per_study: int) -> list[tuple[int, Path]]:
    """Outbox files and pending delivery rows for the (only) destination."""
    (dest,) = settings.destination_list
    out = []
    with session_scope(settings.effective_database_url) as session:
        for study_uid in studies:
            study = Study(study_instance_uid=study_uid)
            session.add(study)
            session.flush()
            series_uid = generate_uid()
            for _ in range(per_study):
                ds = _object(study_uid, series_uid)
                rel = f"{study_uid}/{ds.SOPInstanceUID}.dcm"
                path = settings.outbox_path / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                row = Delivery(
                    study_id=study.id,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=SR_CLASS,
                    kind="sr",
                    destination=dest.name,
                    rel_path=rel,
                )
                session.add(row)
                session.flush()
                out.append((row.id, path))
    return out


def _rows(settings: Settings) -> dict[int, Delivery]:
    with session_scope(settings.effective_database_url) as session:
        found = {d.id: d for d in session.query(Delivery)}
        session.expunge_all()
        return found


def test_stow_202_per_instance_outcomes_and_retry_rows(
    tmp_path: Path, fake_stow: Callable[..., FakeStow]
) -> None:
    decided: dict[str, int] = {}

    def answer(got: Received) -> tuple[int, bytes]:
        uids = got.sop_uids
        if len(uids) == 1:  # the second study: all stored
            return 200, stow_response(uids, {})
        decided.update({uids[1]: 0xA700, uids[2]: 0xC000, uids[3]: 0x0111})
        return 202, stow_response([uids[0]], {u: decided[u] for u in uids[1:]})

    server = fake_stow(answer)
    settings = _settings(
        tmp_path,
        f"stow+http://127.0.0.1:{server.port}/dicom-web/#sr+seg",
        dicomweb_token=TOKEN,
    )
    study_a, study_b = generate_uid(), generate_uid()
    queued = _queue(settings, [study_a], 4) + _queue(settings, [study_b], 1)
    counts = dispatch_deliveries([i for i, _ in queued], settings)
    assert counts == {"sent": 3, "retry": 1, "failed": 1, "skipped": 0}

    # one request per study, every file of the study in it, in the batch's order
    assert [r.path for r in server.received] == [
        f"/dicom-web/studies/{study_a}",
        f"/dicom-web/studies/{study_b}",
    ]
    assert [len(r.parts) for r in server.received] == [4, 1]
    assert server.received[0].parts == [p.read_bytes() for _, p in queued[:4]]
    for got in server.received:
        assert got.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
        assert got.headers["Accept"] == "application/dicom+json"
        assert got.headers["Authorization"] == f"Bearer {TOKEN}"

    rows = _rows(settings)
    ids = [i for i, _ in queued]
    assert [rows[i].status for i in ids] == ["sent", "pending", "failed", "sent", "sent"]
    retry = rows[ids[1]]
    assert retry.attempts == 1 and "0xA700" in (retry.last_error or "")
    assert retry.next_attempt_at > utcnow() + dt.timedelta(seconds=20)
    assert "0xC000" in (rows[ids[2]].last_error or "")
    assert {rows[i].destination for i in ids} == {f"stow+http://127.0.0.1:{server.port}/dicom-web"}


@pytest.mark.parametrize(
    ("status", "row_status", "says"),
    [
        (503, "pending", "HTTP 503"),
        (429, "pending", "HTTP 429"),
        (401, "pending", "refused our credentials"),
        (403, "pending", "refused access"),
        (400, "failed", "HTTP 400"),
        (404, "failed", "HTTP 404"),
        (413, "failed", "HTTP 413"),
        (415, "failed", "HTTP 415"),
        (409, "failed", "HTTP 409"),
    ],
)
def test_stow_http_statuses_give_retry_rows(
    tmp_path: Path,
    fake_stow: Callable[..., FakeStow],
    status: int,
    row_status: str,
    says: str,
) -> None:
    server = fake_stow(lambda _got: (status, b""))
    settings = _settings(
        tmp_path,
        f"stow+http://alice:{SECRET}@127.0.0.1:{server.port}/dicom-web",
        dicomweb_token=TOKEN,  # the URL's user:password wins
    )
    queued = _queue(settings, [generate_uid()], 2)
    dispatch_deliveries([i for i, _ in queued], settings)
    (got,) = server.received
    basic = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert got.headers["Authorization"] == f"Basic {basic}"
    for row in _rows(settings).values():
        assert row.status == row_status and says in (row.last_error or "")
        assert SECRET not in (row.last_error or "") and SECRET not in row.destination
        if row_status == "pending":
            assert row.next_attempt_at > utcnow()


def test_stow_unreachable_or_silent_server_is_transient(
    tmp_path: Path, fake_stow: Callable[..., FakeStow]
) -> None:
    dead = _settings(tmp_path / "dead", f"stow+http://127.0.0.1:{free_port()}/dicom-web")
    queued = _queue(dead, [generate_uid()], 1)
    assert dispatch_deliveries([queued[0][0]], dead)["retry"] == 1
    (row,) = _rows(dead).values()
    assert "cannot reach" in (row.last_error or "")

    slow = fake_stow(lambda got: (200, stow_response(got.sop_uids, {})), delay=3)
    settings = _settings(
        tmp_path / "slow", f"stow+http://127.0.0.1:{slow.port}", dispatch_timeout=0.5
    )
    queued = _queue(settings, [generate_uid()], 1)
    assert dispatch_deliveries([queued[0][0]], settings)["retry"] == 1
    (row,) = _rows(settings).values()
    assert "did not answer within 0.5 s" in (row.last_error or "")
    assert slow.received[0].path.startswith("/studies/")  # no DICOMweb root: /studies


def test_missing_outbox_file_is_permanent_and_the_rest_still_goes(
    tmp_path: Path, fake_stow: Callable[..., FakeStow]
) -> None:
    server = fake_stow(lambda got: (200, stow_response(got.sop_uids, {})))
    settings = _settings(tmp_path, f"stow+http://127.0.0.1:{server.port}/dicom-web")
    queued = _queue(settings, [generate_uid()], 2)
    queued[0][1].unlink()
    assert dispatch_deliveries([i for i, _ in queued], settings) == {
        "sent": 1,
        "retry": 0,
        "failed": 1,
        "skipped": 0,
    }
    assert len(server.received[0].parts) == 1


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_stow_https_verifies_the_server_and_presents_our_certificate(
    tmp_path: Path, fake_stow: Callable[..., FakeStow]
) -> None:
    from tests.test_listener_hostile import make_pki

    pki = make_pki(tmp_path / "pki")  # server CN=localhost, client CN=TESTPACS, one CA
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca.crt"]))
    tls.load_cert_chain(str(pki["server.crt"]), str(pki["server.key"]))
    tls.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no request
    server = fake_stow(lambda got: (200, stow_response(got.sop_uids, {})), tls=tls)
    url = f"stow+https://localhost:{server.port}/dicom-web"
    trusted = _settings(
        tmp_path / "ok",
        url,
        tls_ca_file=pki["ca.crt"],
        tls_cert_file=pki["client.crt"],
        tls_key_file=pki["client.key"],
    )
    queued = _queue(trusted, [generate_uid()], 2)
    assert dispatch_deliveries([i for i, _ in queued], trusted)["sent"] == 2
    assert len(server.received) == 1

    # the system store does not know our CA: transient, and nothing was received
    untrusted = _settings(tmp_path / "no-ca", url)
    queued = _queue(untrusted, [generate_uid()], 1)
    assert dispatch_deliveries([queued[0][0]], untrusted)["retry"] == 1
    (row,) = _rows(untrusted).values()
    assert "SSLCertVerificationError" in (row.last_error or "")
    # a bad client key file: transient too (an administrator fixes it)
    broken = _settings(tmp_path / "bad-key", url, tls_cert_file=tmp_path / "none.crt")
    queued = _queue(broken, [generate_uid()], 1)
    assert dispatch_deliveries([queued[0][0]], broken)["retry"] == 1
    (row,) = _rows(broken).values()
    assert "TLS set-up failed" in (row.last_error or "")
    assert len(server.received) == 1


@dataclass(frozen=True, slots=True)
class _Pigeon(Destination):
    """A protocol added by a test: one class and one registration line."""

    host: str
    profile: frozenset[str] = frozenset({"sr"})

    @property
    def name(self) -> str:
        return f"pigeon://{self.host}"

    def __str__(self) -> str:
        return self.name

    def send(self, paths: Any, ctx: SendContext) -> list[SendResult]:
        assert ctx.dicomweb_token == TOKEN and ctx.timeout == 7
        return [
            SendResult("sent", "") if p.exists() else SendResult("permanent", "?") for p in paths
        ]


def test_a_new_protocol_is_one_registration_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PROTOCOLS, "pigeon", _Pigeon)
    settings = _settings(tmp_path, "pigeon://loft", dicomweb_token=TOKEN, dispatch_timeout=7)
    queued = _queue(settings, [generate_uid()], 2)
    assert dispatch_deliveries([i for i, _ in queued], settings)["sent"] == 2


# -- a real node, a real Orthanc with its DICOMweb plugin -------------------------------


def _orthanc_e2e_ready() -> str:
    from tests.viewer import DICOMWEB_PLUGIN
    from worker.pipeline.registry import DEMO_MODELS_DIR

    if not have("Orthanc") or not DICOMWEB_PLUGIN.is_file():
        return "Orthanc with its DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)"
    if not list(DEMO_MODELS_DIR.glob("*.json")):
        return "demo models not built"
    return ""


@pytest.mark.integration
@pytest.mark.skipif(bool(_orthanc_e2e_ready()), reason=_orthanc_e2e_ready() or "ready")
def test_node_delivers_sr_and_seg_to_orthanc_by_stow_rs(
    tmp_path: Path, node_factory: NodeFactory
) -> None:
    from tests.viewer import OrthancWeb

    # HTTP Basic authentication on (user alice)
    orthanc = OrthancWeb(tmp_path / "orthanc", "pacs-ai-stow-test")
    auth = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    orthanc.headers["Authorization"] = f"Basic {auth}"
    orthanc.start(AuthenticationEnabled=True, RegisteredUsers={"alice": SECRET})
    try:
        url = f"stow+http://alice:{SECRET}@127.0.0.1:{orthanc.http_port}/dicom-web#sr+seg"
        node = node_factory(ort_threads=2, destinations=url, dispatch_timeout=30)
        datasets = canary_chest_ct(5_100_031)
        study_uid = str(datasets[0].StudyInstanceUID)
        orthanc.upload(datasets)  # the PACS has the study ...
        node.start_run()
        assert set(send_datasets(node.port, datasets)) == {0}  # ... and sends it to pacs-ai
        node.wait_jobs([study_uid], "done", timeout=180)

        def delivered() -> list[dict[str, Any]] | None:
            rows = node.deliveries()
            return rows if rows and all(r["status"] == "sent" for r in rows) else None

        rows = wait_for(delivered, 60, 0.5, what="deliveries sent by STOW-RS")
        assert {r["kind"] for r in rows} == {"sr", "seg"}
        assert {r["destination"] for r in rows} == {
            f"stow+http://127.0.0.1:{orthanc.http_port}/dicom-web"
        }
        # SR and SEG are in the source study, next to its CT, as QIDO-RS shows them
        series = orthanc.series_of(study_uid)
        modalities = sorted(s["00080060"]["Value"][0] for s in series)
        assert modalities == ["CT", "SEG", "SR"]
        for s in series:
            if s["00080060"]["Value"][0] != "CT":
                assert s["0008103E"]["Value"][0].startswith("AI")
        sent_uids = {r["sop_instance_uid"] for r in rows}
        stored = {
            i["00080018"]["Value"][0]
            for s in series
            if s["00080060"]["Value"][0] != "CT"
            for i in orthanc.call(
                "GET",
                f"/dicom-web/studies/{study_uid}/series/{s['0020000E']['Value'][0]}/instances",
            )
        }
        assert stored == sent_uids
        assert SECRET not in node.logs()
    finally:
        orthanc.stop()
