"""The admin API as a real process (`pacs-ai api`), with and without tokens: a
foreign Host header (DNS rebinding) and a cross-site POST (a text/plain form,
no preflight; or JSON from a foreign Origin) are refused and queue nothing; the
same request from the API's own origin, as JSON, is accepted."""

from __future__ import annotations

import uuid

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.conftest import NodeFactory, db_count, port_open, send_datasets, wait_for
from tests.factory import CANARY_ID, CANARY_NAME, ct_slice

pytestmark = [pytest.mark.integration]

TOKEN = "admin-" + uuid.uuid4().hex


@pytest.mark.parametrize("token", ["", TOKEN], ids=["no-token", "token"])
def test_foreign_host_and_cross_site_post_refused(node_factory: NodeFactory, token: str) -> None:
    # no job from the assembler (a study is complete only after an hour of quiet)
    node = node_factory(stable_seconds=3600, api_token=token)
    node.cli("db", "upgrade")
    node.start_listener()
    study_uid, series_uid = generate_uid(), generate_uid()
    assert send_datasets(node.port, [ct_slice(study_uid, series_uid, i) for i in range(2)]) == [
        0,
        0,
    ]
    api_port = int(node.env["PACS_AI_API_PORT"])
    node.start("api")
    wait_for(lambda: port_open(api_port), 60, what="API")
    base = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{base}/api/studies/{study_uid}/reprocess"

    with httpx.Client(timeout=30) as client:
        # DNS rebinding: evil.example resolved to 127.0.0.1, the browser sends its name
        for path in ("/", "/api/studies", f"/api/studies/{study_uid}", "/metrics", "/healthz"):
            refused = client.get(base + path, headers={**auth, "Host": f"evil.example:{api_port}"})
            assert refused.status_code == 421, path
            assert study_uid not in refused.text
        rebound = {"Host": "evil.example", "Origin": "http://evil.example"}
        assert client.post(url, json={}, headers={**auth, **rebound}).status_code == 421

        # a cross-site form (text/plain: no preflight), with and without a token
        form = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        assert client.post(url, content=b'{"x":"=1"}', headers={**auth, **form}).status_code == 403
        assert client.post(url, content=b"{}", headers={**form}).status_code == 403
        no_origin = {"Content-Type": "text/plain"}
        assert client.post(url, content=b"{}", headers={**auth, **no_origin}).status_code == 403
        foreign = {"Origin": "http://evil.example"}
        assert client.post(url, json={}, headers={**auth, **foreign}).status_code == 403
        assert db_count(node, "jobs") == 0  # nothing was queued

        # the API's own origin, JSON: accepted (and, with tokens, only with the token)
        own = {"Origin": base}
        if token:
            assert client.post(url, json={}, headers=own).status_code == 401
        accepted = client.post(url, json={}, headers={**auth, **own})
        assert accepted.status_code == 202, accepted.text
        assert db_count(node, "jobs") == 1
        for host in (f"localhost:{api_port}", f"[::1]:{api_port}", "127.0.0.1"):
            assert client.get(f"{base}/healthz", headers={"Host": host}).status_code == 200

    node.stop_all()
    logs = node.logs()
    assert "evil.example" in logs  # the refusals are logged ...
    for secret in (CANARY_NAME, CANARY_ID, *([token] if token else [])):
        assert secret not in logs  # ... without patient data or the token
