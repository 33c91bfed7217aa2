"""Durable instance storage and a structural check of received datasets.

An instance is written to a temporary file in the storage file system, fsynced,
atomically renamed to its final hashed path and the directory fsynced, before
the database row is committed and success is returned to the peer.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Collection
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

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


def incoming_dir(storage_root: Path) -> Path:
    return storage_root / INCOMING_DIRNAME


def prepare_storage(storage_root: Path) -> Path:
    """Create the storage root and its incoming directory; return the latter."""
    inc = incoming_dir(storage_root)
    inc.mkdir(parents=True, exist_ok=True)
    return inc


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
    tmp = inc / f"w-{os.getpid()}-{os.urandom(8).hex()}.part"
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


def check_structure(path: Path, transfer_syntax: str, keep: Collection[int] = ()) -> Dataset:
    """Walk every element of the dataset in ``path`` and raise
    :class:`MalformedDataset` if one runs past the end of the data (a truncated
    or garbage dataset). Values are skipped, not decoded, so this is fast.

    The top-level elements whose tags are in ``keep`` (and the Specific Character
    Set) are returned as a dataset that pydicom decodes lazily, so the listener
    never parses a received file twice. Values longer than 1 KiB are not kept.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise MalformedDataset("empty dataset")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = dataset_offset(mm)
            keep = frozenset(keep) | {_SPECIFIC_CHARACTER_SET} if keep else frozenset()
            if transfer_syntax == DEFLATED:
                try:
                    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                    data = inflater.decompress(mm[start:])
                except zlib.error as exc:
                    raise MalformedDataset("deflated dataset cannot be inflated") from exc
                if not inflater.eof:
                    raise MalformedDataset("deflated dataset is truncated")
                walker = _Walker(data, False, True, keep)
                walker.walk(0, len(data))
                return walker.kept
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
