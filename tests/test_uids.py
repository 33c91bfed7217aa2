"""UID validation and the hashed storage layout: no dataset value becomes a path."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.uids import InvalidUID, relative_instance_path, uid_digest, validate_uid

GOOD = [
    "1.2",
    "0.0",
    "1.2.840.10008.1.2.1",
    "2.25.329800735698586629295641978511506172918",
    "1.2.3.0.10",
    "1." + "2" * 62,  # exactly 64 characters
]

BAD = [
    "",
    "   ",
    "1",
    "01.2",
    "1.02",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2.a",
    "1.2-3",
    "1,2,3",
    "1.2 .3",
    "1.2.3\n4",
    "+1.2",
    "-1.2",
    "1.2e3",
    "１.２",  # full-width digits are not DICOM digits
    "../../etc/passwd",
    "1.2/../../x",
    "/etc/passwd",
    "C:\\Windows",
    "1.2.3%2F..",
    "1." + "2" * 63,  # 65 characters
]


@pytest.mark.parametrize("uid", GOOD)
def test_accepts(uid: str) -> None:
    assert validate_uid(uid, "SOPInstanceUID") == uid


@pytest.mark.parametrize("raw", ["1.2.3\x00", "1.2.3 ", " 1.2.3", "1.2.3\x00\x00"])
def test_strips_padding(raw: str) -> None:
    assert validate_uid(raw, "StudyInstanceUID") == "1.2.3"


def test_accepts_pydicom_values() -> None:
    from pydicom.uid import UID

    assert validate_uid(UID("1.2.840.10008.5.1.4.1.1.2"), "SOPClassUID") == (
        "1.2.840.10008.5.1.4.1.1.2"
    )


@pytest.mark.parametrize("uid", BAD, ids=[repr(u)[:24] for u in BAD])
def test_refuses(uid: str) -> None:
    with pytest.raises(InvalidUID) as info:
        validate_uid(uid, "SeriesInstanceUID")
    message = str(info.value)
    assert message.startswith("SeriesInstanceUID ")
    # the message names the problem, not the (possibly hostile) value
    if len(uid.strip()) > 2:
        assert uid.strip() not in message


def test_refuses_missing() -> None:
    with pytest.raises(InvalidUID, match="StudyInstanceUID is missing"):
        validate_uid(None, "StudyInstanceUID")


def test_invalid_uid_is_a_value_error() -> None:
    assert issubclass(InvalidUID, ValueError)


# -- storage layout -------------------------------------------------------------

_LAYOUT = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}/[0-9a-f]{32}/[0-9a-f]{64}\.dcm$")


def _uids(n: int) -> list[tuple[str, str, str]]:
    rng = random.Random(1234)
    out = [(generate_uid(), generate_uid(), generate_uid()) for _ in range(n)]
    # short and adversarial-looking (but valid) UIDs too
    for _ in range(n):
        parts = [str(rng.randint(0, 10 ** rng.randint(1, 12))) for _ in range(rng.randint(2, 6))]
        out.append((".".join(parts), ".".join(parts[:2]), ".".join(parts) + ".0"))
    return out


def test_layout_is_hashes_only(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    for study, series, sop in _uids(200):
        rel = relative_instance_path(study, series, sop)
        assert _LAYOUT.match(rel), rel
        for uid in (study, series, sop):
            assert uid not in rel
        assert rel.startswith(uid_digest(study)[:2] + "/" + uid_digest(study)[:32] + "/")
        assert rel.endswith("/" + uid_digest(sop) + ".dcm")
        final = (root / rel).resolve()
        assert final.is_relative_to(root.resolve())
        assert ".." not in Path(rel).parts and not Path(rel).is_absolute()


def test_layout_is_deterministic_and_distinct() -> None:
    a = relative_instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert a == relative_instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    b = relative_instance_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    c = relative_instance_path("1.2.3", "1.2.3.5", "1.2.3.4.5")
    assert len({a, b, c}) == 3
    # same study and series: same folder
    assert a.rsplit("/", 1)[0] == b.rsplit("/", 1)[0]


def test_uid_digest_is_sha256() -> None:
    assert uid_digest("1.2") == hashlib.sha256(b"1.2").hexdigest()


@pytest.mark.parametrize("bad", ["../../etc", "/abs/path", "1.2/3", "", "1.2.3\x00/x"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_layout_refuses_invalid_input(bad: str, position: int) -> None:
    uids = ["1.2.3", "1.2.3.4", "1.2.3.4.5"]
    uids[position] = bad
    with pytest.raises(InvalidUID):
        relative_instance_path(*uids)
