"""Patient linkage without identifiers in clear (issue 13, done-when 5).

Studies with canary PatientID, IssuerOfPatientID and AccessionNumber go
through a real listener into SQLite and PostgreSQL: no column of any table,
nor the SQLite files, holds a canary; the same patient gets the same patient
key and another patient another; an admin finds the study by its accession
number (CLI and API) and sees its identifiers; a read-only token gets 403 for
that search and no identifier anywhere; the data dir's key file is created
with mode 0600.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid
from sqlalchemy.pool import NullPool

from db.migrate import upgrade
from db.session import dispose_all
from dicomnode.identity import (
    Identifiers,
    IdentityKeys,
    KeyFileError,
    SealedValueError,
    load_keys,
    open_keys,
)
from tests.conftest import Node, NodeFactory, db_rows, listener_node, node_db_url, send_datasets
from tests.factory import CANARY_ID, ct_slice

CANARY_ACCESSION = "ACCCANARY4711"
CANARY_ISSUER = "ISSUERCANARY"
OTHER_ID = "OTHERPATIENT-31337"
ADMIN_TOKEN = "admin-token-" + "a" * 20
READ_TOKEN = "read-token-" + "b" * 20
CANARIES = (CANARY_ID, CANARY_ACCESSION, CANARY_ISSUER, OTHER_ID)


# -- keys and sealing, no database -------------------------------------------------------


def _keys(seed: bytes = b"k") -> IdentityKeys:
    return IdentityKeys(seed * 32)


def test_patient_and_accession_keys() -> None:
    keys = _keys()
    a = keys.patient_key("12345", "HOSP")
    assert a is not None and len(a) == 64 and "12345" not in a
    assert keys.patient_key(" 12345 ", "HOSP\x00") == a  # padding is not identity
    assert keys.patient_key("12345", "OTHER") != a  # the issuer matters
    assert keys.patient_key("1234", "5HOSP") != keys.patient_key("12345", "HOSP")
    assert keys.patient_key("") is None and keys.accession_key("  ") is None
    assert _keys(b"x").patient_key("12345", "HOSP") != a  # another installation
    assert keys.accession_key("A1") != keys.patient_key("A1")  # separate subkeys
    assert keys.key_id == _keys().key_id != _keys(b"x").key_id
    assert "k" * 8 not in repr(keys)


def test_sealed_identifiers_open_only_for_their_study_and_key() -> None:
    keys = _keys()
    ids = Identifiers("12345", "HOSP", "ACC9")
    sealed = keys.seal(ids, "1.2.3")
    assert "12345" not in sealed and "ACC9" not in sealed
    assert keys.seal(ids, "1.2.3") != sealed  # a fresh nonce each time
    assert keys.open(sealed, "1.2.3") == ids
    with pytest.raises(SealedValueError):
        keys.open(sealed, "1.2.4")  # copied to another study's row
    with pytest.raises(SealedValueError):
        _keys(b"x").open(sealed, "1.2.3")
    with pytest.raises(SealedValueError):
        keys.open(sealed[:-4] + "AAAA", "1.2.3")


def test_key_file_created_0600_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret.key"
    with pytest.raises(KeyFileError, match="PACS_AI_SECRET_KEY_FILE: no such file"):
        load_keys(path)  # configured but missing: a clear error, nothing created
    assert not path.exists()
    first = load_keys(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes().strip()) >= 32
    assert load_keys(path, create=True).key_id == first.key_id  # never replaced
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable or writable by every user"):
        load_keys(path)
    path.chmod(0o600)
    path.write_bytes(b"short\n")
    with pytest.raises(KeyFileError, match="fewer than 32"):
        load_keys(path)
    path.chmod(0o000)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(KeyFileError, match="cannot read"):
            load_keys(path)


def test_database_refuses_a_second_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    one, two = tmp_path / "one.key", tmp_path / "two.key"
    keys = open_keys(one, True, url)
    assert open_keys(one, False, url).key_id == keys.key_id
    with pytest.raises(KeyFileError, match="same key file"):
        open_keys(two, True, url)
    dispose_all()


# -- through a real listener ------------------------------------------------------------


def _study(
    patient_id: str, accession: str, date: str, n: int = 2, issuer: str = CANARY_ISSUER
) -> list[Any]:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = ct_slice(study_uid, series_uid, i, rows=16, cols=16, patient_id=patient_id)
        ds.AccessionNumber = accession
        ds.IssuerOfPatientID = issuer
        ds.StudyDate = date
        out.append(ds)
    return out


def _every_value(url: str) -> Iterator[tuple[str, str, str]]:
    """(table, column, value as text) of every column of every row of every table."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)).mappings():
                    for column, value in row.items():
                        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                        yield table.name, str(column), text
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def node(request: pytest.FixtureRequest, node_factory: NodeFactory) -> Node:
    settings: dict[str, Any] = {"api_token": ADMIN_TOKEN, "api_read_tokens": READ_TOKEN}
    if request.param == "postgresql":
        settings["database_url"] = request.getfixturevalue("pg_url")
    return listener_node(node_factory, **settings)


@pytest.mark.integration
def test_no_identifier_in_clear_and_admin_only_lookup(node: Node) -> None:
    first = _study(CANARY_ID, CANARY_ACCESSION, "20250101")
    second = _study(CANARY_ID, "ACC2", "20250701")
    other = _study(OTHER_ID, "ACC3", "20250701", issuer="")
    for datasets in (first, second, other):
        assert send_datasets(node.port, datasets) == [0] * len(datasets)
    uid = str(first[0].StudyInstanceUID)

    # the embedded layout's key: created by the listener in the data dir, mode 0600
    key_file = Path(node.env["PACS_AI_DATA_DIR"]) / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # 1. no canary in any column of any table (nor in the SQLite files)
    url = node_db_url(node)
    values = list(_every_value(url))
    assert any(table == "studies" and column == "identifiers" for table, column, _ in values)
    leaks = [(t, c) for t, c, v in values for canary in CANARIES if canary in v]
    assert not leaks, leaks
    if url.startswith("sqlite"):
        data = Path(node.env["PACS_AI_DATA_DIR"])
        for path in data.glob("pacs-ai.sqlite3*"):
            raw = path.read_bytes()
            assert not any(c.encode() in raw for c in CANARIES), path.name

    # 2. one patient, one key; another patient, another; dates kept for priors
    rows = db_rows(node, "SELECT study_instance_uid, patient_key, study_date FROM studies")
    keys = {str(u): k for u, k, _ in rows}
    assert keys[uid] == keys[str(second[0].StudyInstanceUID)] is not None
    assert keys[str(other[0].StudyInstanceUID)] not in (None, keys[uid])
    assert {str(d)[:10] for _, _, d in rows} == {"2025-01-01", "2025-07-01"}

    # 3. the CLI finds the study by its accession number, and shows its identifiers
    found = node.json("studies", "list", "--accession", CANARY_ACCESSION)
    assert [r["study_instance_uid"] for r in found] == [uid]
    assert "identifiers" not in found[0]
    shown = node.json("studies", "list", "--accession", CANARY_ACCESSION, "--identifiers")
    assert shown[0]["identifiers"] == {
        "patient_id": CANARY_ID,
        "issuer_of_patient_id": CANARY_ISSUER,
        "accession_number": CANARY_ACCESSION,
    }
    missing = node.cli("studies", "list", "--accession", "NOSUCH", check=False)
    assert missing.returncode == 1 and "no study has this accession" in missing.stderr
    plain = node.cli("studies", "list")
    assert not any(c in plain.stdout for c in CANARIES)

    # 4. the API: admins search and see; a read-only token neither
    from fastapi.testclient import TestClient

    from worker.admin.api import create_app
    from worker.settings import load_settings

    env = {k[len("PACS_AI_") :].lower(): v for k, v in node.env.items() if k.startswith("PACS_AI")}
    app = create_app(load_settings(**env))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        got = client.get("/api/studies", params={"accession": CANARY_ACCESSION}, headers=admin)
        assert got.status_code == 200, got.text
        items = got.json()["items"]
        assert [i["study_instance_uid"] for i in items] == [uid]
        assert "identifiers" not in items[0]  # only when asked for
        shown_api = client.get(
            "/api/studies",
            params={"accession": CANARY_ACCESSION, "identifiers": "true"},
            headers=admin,
        ).json()["items"]
        assert shown_api[0]["identifiers"]["patient_id"] == CANARY_ID
        one = client.get(f"/api/studies/{uid}?identifiers=true", headers=admin).json()
        assert one["identifiers"]["accession_number"] == CANARY_ACCESSION
        none = client.get("/api/studies", params={"accession": "NOSUCH"}, headers=admin)
        assert none.status_code == 200 and none.json()["items"] == []

        for path, params in (
            ("/api/studies", {"accession": CANARY_ACCESSION}),
            ("/api/studies", {"identifiers": "true"}),
            (f"/api/studies/{uid}", {"identifiers": "true"}),
        ):
            refused = client.get(path, params=params, headers=read)
            assert refused.status_code == 403, (path, params)
            assert not any(c in refused.text for c in CANARIES)
        for path in (
            "/api/studies",
            f"/api/studies/{uid}",
            "/api/jobs",
            "/api/results",
            "/api/deliveries",
        ):
            answer = client.get(path, headers=read)
            assert answer.status_code == 200, (path, answer.text)
            assert "identifiers" not in answer.text, path
            assert not any(c in answer.text for c in CANARIES), path
    dispose_all()
