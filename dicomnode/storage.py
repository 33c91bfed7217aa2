"""Durable instance storage and a structural check of received datasets.

An instance is written to a temporary file in the storage file system, fsynced,
atomically renamed to its final hashed path and the directory fsynced, before
the database row is committed and success is returned to the peer.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

INCOMING_DIRNAME = ".incoming"

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SPECIFIC_CHARACTER_SET = 0x00080005
_MAX_KEPT_VALUE = 1024


class MalformedDataset(ValueError):
    """The received bytes are not a complete DICOM dataset."""


class DatasetTooLarge(MalformedDataset):
    """The dataset is (or inflates to) more than the instance size limit."""


_INFLATE_CHUNK = 1024 * 1024
#: Real deflated datasets (SR, documents, images) shrink a few times, rarely 50x;
#: deflate's ceiling is about 1000:1, which only crafted data reaches.
_MAX_DEFLATE_RATIO = 200
#: Below this inflated size the ratio is not checked (tiny datasets of zeros).
_MIN_INFLATE_BOUND = 64 * 1024 * 1024


def _check_deflated(
    path: Path, mm: mmap.mmap, start: int, keep: frozenset[int], max_inflated: int
) -> Dataset:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    fd, name = tempfile.mkstemp(prefix=temp_prefix("inf"), suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            total = 0
            pos = start
            end = len(mm)
            pending = b""
            while True:
                if pending:
                    chunk = pending
                elif pos < end:
                    chunk = mm[pos : pos + _INFLATE_CHUNK]
                    pos += len(chunk)
                else:
                    break
                try:
                    data = inflater.decompress(chunk, _INFLATE_CHUNK)
                except zlib.error as exc:
                    raise MalformedDataset("deflated dataset cannot be inflated") from exc
                pending = inflater.unconsumed_tail
                total += len(data)
                if total > max_inflated:
                    raise DatasetTooLarge(
                        f"deflated dataset inflates to more than {max_inflated} bytes "
                        "(instance size limit or a deflate bomb)"
                    )
                out.write(data)
                if inflater.eof:
                    break
            if not inflater.eof:
                raise MalformedDataset("deflated dataset is truncated")
        if total == 0:
            raise MalformedDataset("dataset is empty")
        with open(name, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as imm:
            walker = _Walker(imm, False, True, keep)
            walker.walk(0, total)
            kept = walker.kept
            # the kept values are copies (bytes), safe after the map is closed
            return kept
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
#: ``rx-HOST.PID-random.part``: a transfer in progress by process PID on HOST
_TEMP_NAME = re.compile(r"^(?:rx|w|inf)-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)-")


def temp_prefix(kind: str = "rx") -> str:
    """Prefix of this process's temp files in the incoming folder."""
    return f"{kind}-{_HOST}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_incoming(incoming: Path, legacy_age: float = 0.0) -> int:
    """Remove temp files that killed or stopped processes on this host left in
    the incoming folder; returns how many. Files of live processes, and of
    other hosts sharing the storage, are left alone. Files in older naming
    schemes (pynetdicom's ``tmp*.dcm``) are removed when older than
    ``legacy_age`` seconds."""
    removed = 0
    now = time.time()
    try:
        entries = list(incoming.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if not entry.is_file() or entry.is_symlink():
                continue
            m = _TEMP_NAME.match(entry.name)
            if m is not None:
                if m["host"] != _HOST:
                    continue
                pid = int(m["pid"])
                if pid != os.getpid() and _pid_alive(pid):
                    continue
                if pid == os.getpid() and now - entry.stat().st_mtime < 3600:
                    continue  # ours, maybe still being written
            elif now - entry.stat().st_mtime < legacy_age:
                continue
            entry.unlink(missing_ok=True)
            removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d temp files left in the incoming folder", removed)
    return removed


def incoming_dir(storage_root: Path) -> Path:
    return storage_root / INCOMING_DIRNAME


def prepare_storage(storage_root: Path) -> Path:
    """Create the storage root and its incoming directory; return the latter."""
    inc = incoming_dir(storage_root)
    inc.mkdir(parents=True, exist_ok=True)
    return inc


def free_mb(path: Path) -> float:
    """Free space, in MiB, available to this process on the file system of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp_path: Path, storage_root: Path, rel_path: str) -> Path:
    """fsync ``tmp_path`` and atomically move it to ``storage_root/rel_path``.

    ``rel_path`` must come from :func:`dicomnode.uids.relative_instance_path`.
    Raises :class:`OSError` when the file cannot be stored (disk full ...).
    """
    final = storage_root / rel_path
    fsync_path(tmp_path)
    parent = final.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, exist_ok=True)
        fsync_path(parent.parent)
    os.replace(tmp_path, final)
    fsync_path(parent)
    return final


def write_durably(data: bytes, storage_root: Path, rel_path: str) -> Path:
    """Write ``data`` to a temp file in the incoming dir and commit it."""
    inc = prepare_storage(storage_root)
    tmp = inc / f"{temp_prefix('w')}{os.urandom(8).hex()}.part"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        return commit_file(tmp, storage_root, rel_path)
    finally:
        tmp.unlink(missing_ok=True)


def dataset_offset(buf: bytes | mmap.mmap) -> int:
    """Offset of the dataset after the preamble and File Meta Information."""
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise MalformedDataset("no DICOM file meta information")
    group, elem, vr = struct.unpack_from("<HH2s", buf, 132)
    if (group, elem) != (0x0002, 0x0000) or vr != b"UL":
        raise MalformedDataset("file meta information has no group length")
    (group_len,) = struct.unpack_from("<I", buf, 140)
    start = 144 + group_len
    if start > len(buf):
        raise MalformedDataset("file meta information is truncated")
    return start


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What a Part 10 file's meta information says; raw values, not validated."""

    transfer_syntax: str | None
    sop_class_uid: str | None
    sop_instance_uid: str | None


_MEDIA_SOP_CLASS = 0x00020002
_MEDIA_SOP_INSTANCE = 0x00020003
_TRANSFER_SYNTAX = 0x00020010
_META_KEEP = frozenset({_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE, _TRANSFER_SYNTAX})
_META_START = 132


def read_file_meta(path: Path) -> FileMeta:
    """Read the transfer syntax, SOP class and SOP instance UIDs of the file meta
    information of the Part 10 file at ``path`` (a file a client sent, e.g. over
    STOW-RS) without decoding anything else; :class:`MalformedDataset` if it has
    no complete meta group."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise MalformedDataset("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = dataset_offset(mm)
            walker = _Walker(mm, False, True, _META_KEEP)
            walker.walk(_META_START, start)
            kept = walker.kept

    def value(tag: int) -> str | None:
        elem = kept.get_item(BaseTag(tag))
        if elem is None or not isinstance(elem.value, bytes):
            return None
        return elem.value.decode("latin-1").strip(" \x00")

    return FileMeta(value(_TRANSFER_SYNTAX), value(_MEDIA_SOP_CLASS), value(_MEDIA_SOP_INSTANCE))


def check_structure(
    path: Path,
    transfer_syntax: str,
    keep: Collection[int] = (),
    max_inflated: int = 4 * 1024**3,
) -> Dataset:
    """Walk every element of the dataset in ``path`` and raise
    :class:`MalformedDataset` if one runs past the end of the data (a truncated
    or garbage dataset). Values are skipped, not decoded, so this is fast.

    The top-level elements whose tags are in ``keep`` (and the Specific Character
    Set) are returned as a dataset that pydicom decodes lazily, so the listener
    never parses a received file twice. Values longer than 1 KiB are not kept.

    A deflated dataset is inflated in chunks into a temp file beside ``path``
    (never whole into memory) and refused with :class:`DatasetTooLarge` once it
    inflates past ``max_inflated`` bytes, or past 200 times its deflated size
    when that is more than 64 MiB (a deflate bomb).
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise MalformedDataset("empty dataset")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = dataset_offset(mm)
            keep = frozenset(keep) | {_SPECIFIC_CHARACTER_SET} if keep else frozenset()
            if transfer_syntax == DEFLATED:
                compressed = size - start
                bound = min(max_inflated, max(_MIN_INFLATE_BOUND, _MAX_DEFLATE_RATIO * compressed))
                return _check_deflated(path, mm, start, keep, bound)
            if start == size:
                raise MalformedDataset("dataset is empty")
            walker = _Walker(
                mm, transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE, keep
            )
            walker.walk(start, size)
            return walker.kept


class _Walker:
    def __init__(
        self, buf: bytes | mmap.mmap, implicit: bool, little: bool, keep: frozenset[int]
    ) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self.e = "<" if little else ">"
        self.keep = keep
        self.kept = Dataset()

    def _tag(self, pos: int, end: int) -> int:
        if pos + 8 > end:
            raise MalformedDataset(f"dataset truncated at byte {pos}")
        group, elem = struct.unpack_from(self.e + "HH", self.buf, pos)
        return int((group << 16) | elem)

    def walk(
        self, pos: int, end: int, until_delim: bool = False, implicit: bool | None = None
    ) -> int:
        imp = self.implicit if implicit is None else implicit
        while pos < end:
            tag = self._tag(pos, end)
            if tag in (_ITEM_DELIM, _SEQ_DELIM):
                if not until_delim:
                    raise MalformedDataset(f"unexpected delimiter at byte {pos}")
                return pos + 8
            if imp or (tag >> 16) == 0xFFFE:
                (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 4)
                vr = b"UN" if imp else b""
                pos += 8
            else:
                vr = bytes(self.buf[pos + 4 : pos + 6])
                if not vr.isalpha() or not vr.isupper():
                    raise MalformedDataset(f"invalid VR at byte {pos}")
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise MalformedDataset(f"dataset truncated at byte {pos}")
                    (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.e + "H", self.buf, pos + 6)
                    pos += 8
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    pos = self._fragments(pos, end)
                else:
                    # SQ, or UN of undefined length (implicit little endian inside).
                    pos = self._items(pos, end, True if vr == b"UN" and not imp else imp)
            else:
                if pos + length > end:
                    raise MalformedDataset(
                        f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) truncated"
                    )
                if tag in self.keep and not until_delim and length <= _MAX_KEPT_VALUE:
                    self._keep(tag, None if imp else vr.decode(), pos, length)
                pos += length
        if until_delim:
            raise MalformedDataset("dataset truncated before a delimiter")
        return pos

    def _keep(self, tag: int, vr: str | None, pos: int, length: int) -> None:
        value = bytes(self.buf[pos : pos + length])
        self.kept[tag] = RawDataElement(
            BaseTag(tag), vr, length, value, pos, self.implicit, self.little
        )

    def _items(self, pos: int, end: int, implicit: bool) -> int:
        while True:
            tag = self._tag(pos, end)
            (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 4)
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise MalformedDataset(f"expected a sequence item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.walk(pos, end, until_delim=True, implicit=implicit)
            else:
                if pos + length > end:
                    raise MalformedDataset("sequence item truncated")
                pos += length

    def _fragments(self, pos: int, end: int) -> int:
        while True:
            tag = self._tag(pos, end)
            (length,) = struct.unpack_from(self.e + "I", self.buf, pos + 4)
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM or length == _UNDEFINED or pos + length > end:
                raise MalformedDataset("encapsulated pixel data truncated or malformed")
            pos += length
