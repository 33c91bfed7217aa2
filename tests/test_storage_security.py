"""Storage integrity and hostile input at the listener (fault/security issue).

Every test runs the real listener process (``pacs-ai listen``) and checks that
what is accepted is stored byte for byte and recorded, and that what is refused
leaves nothing behind: no file inside or outside the storage dir, no row.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from dicomnode.uids import relative_instance_path
from tests.conftest import (
    Node,
    NodeFactory,
    db_count,
    db_rows,
    incoming_files,
    listener_node,
    scu_sends_any_uid,
    send_datasets,
    send_files_raw,
    stored_files,
    wait_for,
)
from tests.factory import ct_slice, write_ct_series

pytestmark = [
    pytest.mark.integration,
    # the SCU side encodes hostile UIDs on purpose
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:The value length .* exceeds"),
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

#: pydicom test files (shipped with pydicom) with distinct SOP Instance UIDs:
#: explicit LE, JPEG 2000, explicit BE, deflated, RLE, JPEG baseline, and a
#: waveform with sequences.
RAW_FILES = [
    "CT_small.dcm",
    "JPEG2000.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "waveform_ecg.dcm",
]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its preamble and file meta."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _stored_by_sop(node: Node) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in stored_files(node):
        meta = split_dataset(path)[0]
        sop = str(meta.MediaStorageSOPInstanceUID)
        assert sop not in out, f"instance {sop} stored twice"
        out[sop] = path
    return out


def _rel_paths(node: Node) -> dict[str, str]:
    return dict(db_rows(node, "SELECT sop_instance_uid, rel_path FROM instances"))  # type: ignore[arg-type]


def _tree(root: Path, skip: Path) -> set[str]:
    """Every file and directory below ``root`` (relative), except below ``skip``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            continue
        for name in dirnames + filenames:
            out.add(str((here / name).relative_to(root)))
    return out


def _series(n: int, ts: str) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = ct_slice(study, series, i)
        ds.file_meta.TransferSyntaxUID = ts
        out.append(ds)
    return out


# -- 1. stored bytes are exactly the bytes sent -----------------------------------


def test_stored_files_hold_exactly_the_sent_dataset(node_factory: NodeFactory) -> None:
    node = listener_node(node_factory)

    # a) files sent as they are on disk, each in its own syntax and association
    raw = {}
    for name in RAW_FILES:
        path = Path(get_testdata_file(name))
        meta = split_dataset(path)[0]
        assert send_files_raw(node.port, [path]) == [SUCCESS], name
        raw[str(meta.MediaStorageSOPInstanceUID)] = (path, str(meta.TransferSyntaxUID))

    # b) datasets encoded by pynetdicom's SCU in the negotiated syntax
    encoded: dict[str, tuple[bytes, str]] = {}
    for ts in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        datasets = _series(3, ts)
        assert send_datasets(node.port, datasets) == [SUCCESS] * 3, ts
        for ds in datasets:
            sent = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            assert sent
            encoded[str(ds.SOPInstanceUID)] = (sent, ts)

    stored = _stored_by_sop(node)
    assert set(stored) == set(raw) | set(encoded)
    rel_paths = _rel_paths(node)
    assert set(rel_paths) == set(stored)
    for sop, (path, ts) in raw.items():
        assert _dataset_bytes(stored[sop]) == _dataset_bytes(path), path.name
        assert str(split_dataset(stored[sop])[0].TransferSyntaxUID) == ts
        assert node.storage / rel_paths[sop] == stored[sop]
    for sop, (sent, ts) in encoded.items():
        assert _dataset_bytes(stored[sop]) == sent, ts
        assert str(split_dataset(stored[sop])[0].TransferSyntaxUID) == ts
        assert node.storage / rel_paths[sop] == stored[sop]
        # and the file reads back as the instance that was sent
        assert str(dcmread(stored[sop], stop_before_pixels=True).SOPInstanceUID) == sop
    assert db_count(node, "instances") == len(stored)
    assert incoming_files(node) == []


# -- 2. hostile UIDs ----------------------------------------------------------------

HOSTILE = [
    "../../etc/x",
    "/etc/x",
    "1.2.3/../../../x",
    "1." + "2" * 70,  # 72 characters
    "1.2.840.abc",
    "1.2.840.10008..1",
    "1.02.3",
]


def test_hostile_uids_are_refused_and_write_nothing(node_factory: NodeFactory) -> None:
    node = listener_node(node_factory)
    root = node.root.parent  # the test's temp dir: every node lives below it
    before = _tree(root, node.log_dir)

    hostile: list[Dataset] = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for value in HOSTILE:
            ds = _series(1, ExplicitVRLittleEndian)[0]
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
            hostile.append(ds)
    good = _series(2, ExplicitVRLittleEndian)
    # hostile ones first, then good ones in the same association: still served
    with scu_sends_any_uid():
        statuses = send_datasets(node.port, [*hostile, *good])
    assert statuses == [DATASET_DOES_NOT_MATCH] * len(hostile) + [SUCCESS] * 2

    # a request whose Affected SOP Instance UID is hostile but whose dataset is
    # valid (file meta and dataset disagree, sent as raw bytes)
    mismatched = []
    for i, value in enumerate(HOSTILE):
        ds = _series(1, ExplicitVRLittleEndian)[0]
        ds.file_meta.MediaStorageSOPInstanceUID = value
        path = node.root.parent / f"mismatch{i}.dcm"
        path.write_bytes(_part10(ds.file_meta, encode(ds, False, True) or b""))
        mismatched.append(path)
    before |= {p.name for p in mismatched}
    with scu_sends_any_uid():
        statuses = send_files_raw(node.port, mismatched)
    assert statuses == [DATASET_DOES_NOT_MATCH] * len(mismatched)

    # nothing of the hostile datasets anywhere: not in storage, not in the DB,
    # not outside the storage dir, not left in the incoming dir
    stored = _stored_by_sop(node)
    assert set(stored) == {str(ds.SOPInstanceUID) for ds in good}
    assert db_count(node, "instances") == 2
    assert db_count(node, "series") == 1
    assert db_count(node, "studies") == 1
    assert wait_for(lambda: incoming_files(node) == [], 5, what="incoming dir empty")
    after = _tree(root, node.log_dir)
    storage_rel = str(node.storage.relative_to(root))
    new = {p for p in after - before if not p.startswith(storage_rel + os.sep)}
    # the listener's own files: SQLite's WAL, the Prometheus files of a listener
    # process that recorded its first metric meanwhile, and the filesystem
    # broker's folders its scheduler makes on first use
    own = tuple(
        str((node.storage.parent / name).relative_to(root)) for name in ("metrics", "broker")
    )
    assert {
        p
        for p in new
        if not p.endswith(("sqlite3-wal", "sqlite3-shm"))
        and not any(p == d or p.startswith(d + os.sep) for d in own)
    } == set()
    new_in_storage = {p for p in after - before if p.startswith(storage_rel + os.sep)}
    assert len([p for p in new_in_storage if p.endswith(".dcm")]) == 2
    for base in (node.storage, node.storage / ".incoming", node.root, Path.cwd()):
        for value in HOSTILE[:3]:
            assert not (base / value.lstrip("/")).exists()
    assert "C-STORE refused 0xA900" in node.logs()


# -- 6. truncated or garbage datasets ---------------------------------------------


def _part10(meta: FileMetaDataset, dataset: bytes) -> bytes:
    """A Part 10 file with exactly this file meta (pydicom's ``save_as`` would
    correct a hostile Media Storage SOP Instance UID) and these dataset bytes."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + dataset


def _with_dataset(src: Path, dst: Path, dataset: bytes) -> Path:
    """A copy of ``src`` with valid file meta and the given dataset bytes."""
    _, offset = split_dataset(src)
    dst.write_bytes(src.read_bytes()[:offset] + dataset)
    return dst


def test_truncated_or_garbage_dataset_refused_association_goes_on(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = listener_node(node_factory)
    series = write_ct_series(tmp_path / "ct", 8)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    data = [_dataset_bytes(p) for p in series]
    rng = __import__("random").Random(1)
    bad = {
        # cut inside the pixel data value
        "truncated pixels": _with_dataset(series[1], bad_dir / "a.dcm", data[1][:-100]),
        # cut in the middle of an element header
        "truncated header": _with_dataset(series[2], bad_dir / "b.dcm", data[2][:203]),
        # random bytes
        "garbage": _with_dataset(
            series[3], bad_dir / "c.dcm", bytes(rng.randrange(256) for _ in range(4000))
        ),
        # a valid start followed by garbage
        "garbage tail": _with_dataset(series[4], bad_dir / "d.dcm", data[4][:300] + b"\xff" * 64),
        "empty": _with_dataset(series[5], bad_dir / "e.dcm", b""),
    }
    good = [series[0], series[6], series[7]]
    order = [good[0], *bad.values(), good[1], good[2]]
    statuses = send_files_raw(node.port, order)
    expected = [SUCCESS] + [CANNOT_UNDERSTAND] * len(bad) + [SUCCESS, SUCCESS]
    assert statuses == expected, dict(zip([p.name for p in order], statuses, strict=True))

    good_sops = {str(dcmread(p).SOPInstanceUID) for p in good}
    stored = _stored_by_sop(node)
    assert set(stored) == good_sops
    for path in good:
        sop = str(dcmread(path).SOPInstanceUID)
        assert _dataset_bytes(stored[sop]) == _dataset_bytes(path)
    assert db_count(node, "instances") == 3
    assert wait_for(lambda: incoming_files(node) == [], 5, what="incoming dir empty")

    # the refused instances are not lost for good: sent again intact, they are stored
    assert send_files_raw(node.port, series) == [SUCCESS] * len(series)
    assert db_count(node, "instances") == len(series)
    assert len(stored_files(node)) == len(series)


# -- 8. calling AE title allow-list -------------------------------------------------


def test_calling_aet_not_allowed_is_rejected(node_factory: NodeFactory) -> None:
    node = listener_node(node_factory, allowed_calling_aets="GOODSCU, OTHERPACS")
    ds = _series(1, ExplicitVRLittleEndian)[0]

    ae = AE(ae_title="EVILSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    cx = build_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, contexts=[cx], ae_title="PACSAI")
    assert assoc.is_rejected
    assert not assoc.is_established
    assert stored_files(node) == []
    assert db_count(node, "instances") == 0

    assert send_datasets(node.port, [ds], ae_title="GOODSCU") == [SUCCESS]
    assert send_datasets(node.port, _series(1, ExplicitVRLittleEndian), ae_title="OTHERPACS") == [
        SUCCESS
    ]
    assert db_count(node, "instances") == 2
    assert db_rows(
        node, "SELECT calling_aet FROM instances WHERE sop_instance_uid = :s", s=ds.SOPInstanceUID
    ) == [("GOODSCU",)]
    assert "association rejected from EVILSCU" in node.logs()


# -- 5. every storage SOP class ---------------------------------------------------


def test_every_storage_sop_class_is_accepted(node_factory: NodeFactory) -> None:
    """A PACS may forward any storage object of a study (mammography, parametric
    maps, waveforms, new RT objects, ...): each is stored, none aborts the
    association."""
    node = listener_node(node_factory)
    sop_classes = sorted(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
    assert len(sop_classes) > 128  # more than one association can propose
    study = generate_uid()
    datasets = []
    for i, sop_class in enumerate(sop_classes):
        ds = ct_slice(study, generate_uid(), i, rows=8, cols=8)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        datasets.append(ds)
    statuses = []
    for start in range(0, len(datasets), 100):
        statuses += send_datasets(node.port, datasets[start : start + 100])
    assert statuses == [SUCCESS] * len(datasets)
    assert db_count(node, "instances") == len(datasets)
    assert {str(split_dataset(p)[0].MediaStorageSOPClassUID) for p in stored_files(node)} == set(
        sop_classes
    )


# -- 6. the file cannot be stored ---------------------------------------------------


def test_instance_that_cannot_be_stored_is_refused_with_a700(node_factory: NodeFactory) -> None:
    """When the storage refuses the file (disk full, a broken mount, a file in
    the way), the answer is 0xA700, nothing is recorded and the association
    goes on."""
    node = listener_node(node_factory)
    blocked = _series(2, ExplicitVRLittleEndian)
    rel = relative_instance_path(
        str(blocked[0].StudyInstanceUID),
        str(blocked[0].SeriesInstanceUID),
        str(blocked[0].SOPInstanceUID),
    )
    # a plain file where the study's directory must go: mkdir fails (ENOTDIR)
    obstacle = node.storage / Path(rel).parts[0] / Path(rel).parts[1]
    obstacle.parent.mkdir(parents=True, exist_ok=True)
    obstacle.write_bytes(b"not a directory")
    good = _series(1, ExplicitVRLittleEndian)

    assert send_datasets(node.port, [*blocked, *good]) == [OUT_OF_RESOURCES] * 2 + [SUCCESS]
    assert db_count(node, "instances") == 1
    good_rel = relative_instance_path(
        str(good[0].StudyInstanceUID), str(good[0].SeriesInstanceUID), str(good[0].SOPInstanceUID)
    )
    assert [p for p in stored_files(node) if p != obstacle] == [node.storage / good_rel]
    assert incoming_files(node) == []
    assert "C-STORE refused 0xA700: cannot store instance" in node.logs()
