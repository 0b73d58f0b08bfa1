"""Segment files: naming, the 24-byte file header, creation, and scanning records out of them.

A segment is ``<first_lsn:020d>.wal``: a header, then records (see :mod:`worker.wal.record`)
with dense LSNs starting at ``first_lsn``. Header (little-endian)::

    offset size field
    0      8    magic      b"BWALSEG\\0"
    8      4    version    1
    12     8    first_lsn  equal to the number in the file name
    20     4    crc32c     of bytes [0, 20)

A segment is created complete (header written to a temp file, fsynced, renamed, directory
fsynced), so a reader never sees a half-written header.

Scanning stops at the first record that is not acceptable and reports why (:class:`ScanStop`).
Whether that spot is a *torn tail* (a write cut short by a crash: safe to truncate) or
*corruption* (fail closed) is the caller's decision, helped by :func:`find_valid_record`: a torn
tail is only ever at the end of the newest segment with no valid record after it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from crc32c import crc32c

from worker.errors import WalCorruption
from worker.limits import MAX_SAFE_INTEGER
from worker.wal.record import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    MIN_PAYLOAD_BYTES,
    MIN_RECORD_BYTES,
    TYPE_BY_CODE,
    Record,
)

SEGMENT_SUFFIX = ".wal"
SEGMENT_MAGIC = b"BWALSEG\0"
SEGMENT_VERSION = 1
_SEG_HEADER = struct.Struct("<8sIQI")
SEGMENT_HEADER_SIZE = _SEG_HEADER.size  # 24
_SEGMENT_NAME = re.compile(r"(\d{20})\.wal")

#: Bytes read per ``pread`` while scanning (records straddling a chunk are re-read whole).
SCAN_CHUNK_BYTES = 4 * 1024 * 1024

#: ``sink(record, file_offset)`` receives each good record.
Sink = Callable[[Record, int], object]


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has ``first_lsn``: 20 digits + ``.wal``."""
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The first LSN encoded in a segment file name, or None for any other file."""
    match = _SEGMENT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """``(first_lsn, path)`` of every segment file in ``directory``, oldest first."""
    found: list[tuple[int, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            first = parse_segment_name(entry.name)
            if first is not None:
                found.append((first, Path(entry.path)))
    found.sort()
    return found


def pack_file_header(magic: bytes, version: int, number: int) -> bytes:
    """A 24-byte file header: magic, version, one u64 (first LSN / through LSN) and its CRC."""
    head = _SEG_HEADER.pack(magic, version, number, 0)[:20]
    return head + struct.pack("<I", crc32c(head))


def check_file_header(data: bytes, magic: bytes, version: int, path: str) -> int:
    """Validate a 24-byte header; return its u64. Raises :class:`WalCorruption` at offset 0."""
    if len(data) < SEGMENT_HEADER_SIZE:
        raise WalCorruption(path, 0, f"file header is {len(data)} bytes, expected 24")
    got_magic, got_version, number, crc = _SEG_HEADER.unpack_from(data)
    if crc32c(data[:20]) != crc:
        raise WalCorruption(path, 0, "file header CRC mismatch")
    if got_magic != magic:
        raise WalCorruption(path, 0, f"bad magic {got_magic!r}")
    if got_version != version:
        raise WalCorruption(path, 0, f"unsupported format version {got_version}")
    return int(number)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that creations, renames and deletions in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file, fsync it, rename it to ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def create_segment(directory: Path, first_lsn: int) -> Path:
    """Create the empty segment ``first_lsn`` durably (file and directory fsynced); return it.

    Raises FileExistsError if it exists already (the caller holds the partition lock, so that
    means its view of the log is stale: a bug, never silently overwritten).
    """
    path = directory / segment_name(first_lsn)
    if path.exists():
        raise FileExistsError(path)
    write_file_atomically(path, pack_file_header(SEGMENT_MAGIC, SEGMENT_VERSION, first_lsn))
    return path


@dataclass(frozen=True, slots=True)
class ScanStop:
    """Where and why a scan stopped.

    ``offset`` is the file offset just past the last good record (where a problem starts), and
    ``next_lsn`` the LSN the next record there should have had. ``detail`` is None when the scan
    reached its end cleanly. ``torn_candidate`` is True when the problem could be a write cut
    short (short header or body, insane length, CRC mismatch); False when the bytes there form a
    record with a valid CRC that is nevertheless wrong (LSN out of order, unknown type, token out
    of range, bad UTF-8): that is never a torn write.
    """

    offset: int
    next_lsn: int
    detail: str | None = None
    torn_candidate: bool = False


def parse_records(
    buf: bytes, base: int, expected_lsn: int, sink: Sink | list[Record] | None, *, final: bool
) -> tuple[int, int, str | None, bool, int]:
    """Parse ``buf`` (file bytes starting at file offset ``base``) from its start.

    Good records go to ``sink``: called as ``sink(record, file_offset)``, or appended when it is
    a list (the fastest), or not even built when it is None (a pure check).

    Returns ``(pos, next_lsn, detail, torn_candidate, need)``: ``pos`` is the buffer offset
    after the last good record; ``detail`` is None when parsing stopped without a problem
    (either at the end, or because the record at ``pos`` needs ``need`` bytes that are not in
    the buffer yet and ``final`` is false). With ``final`` the buffer's end is the end of file.
    """
    unpack = HEADER.unpack_from
    new = tuple.__new__  # Record(...) without the NamedTuple's Python-level __new__
    emit = sink.append if isinstance(sink, list) else None
    call = None if isinstance(sink, list) else sink
    types = TYPE_BY_CODE
    view = memoryview(buf)
    size = len(buf)
    pos = 0
    lsn_expected = expected_lsn
    while True:
        left = size - pos
        if left < HEADER_SIZE:
            if left == 0:
                return pos, lsn_expected, None, False, 0
            if not final:
                return pos, lsn_expected, None, False, HEADER_SIZE
            return pos, lsn_expected, f"short record header ({left} bytes before EOF)", True, 0
        crc, length, lsn, token, code, eid_len = unpack(buf, pos)
        if length < MIN_PAYLOAD_BYTES or length > MAX_PAYLOAD_BYTES or eid_len > length - MIN_PAYLOAD_BYTES:
            return pos, lsn_expected, f"bad record header (payload length {length})", True, 0
        end = pos + HEADER_SIZE + length
        if end > size:
            if not final:
                return pos, lsn_expected, None, False, HEADER_SIZE + length
            return (
                pos,
                lsn_expected,
                f"record of {HEADER_SIZE + length} bytes runs past EOF ({left} bytes left)",
                True,
                0,
            )
        if crc32c(view[pos + 4 : end]) != crc:
            return pos, lsn_expected, "CRC mismatch", True, 0
        rtype = types.get(code)
        if rtype is None:
            return pos, lsn_expected, f"unknown record type {code}", False, 0
        if lsn != lsn_expected:
            return pos, lsn_expected, f"LSN {lsn} where {lsn_expected} was expected", False, 0
        if token > MAX_SAFE_INTEGER:
            return pos, lsn_expected, f"fencing token {token} above 2**53-1", False, 0
        start = pos + HEADER_SIZE
        try:
            entry_id = buf[start : start + eid_len].decode("utf-8")
        except UnicodeDecodeError:
            return pos, lsn_expected, "entry_id is not UTF-8", False, 0
        if emit is not None:
            emit(new(Record, (lsn, rtype, token, entry_id, buf[start + eid_len : end])))
        elif call is not None:
            call(new(Record, (lsn, rtype, token, entry_id, buf[start + eid_len : end])), base + pos)
        lsn_expected += 1
        pos = end


def scan_fd(
    fd: int,
    start: int,
    end: int,
    expected_lsn: int,
    sink: Sink | None,
    *,
    many: Callable[[list[Record]], object] | None = None,
    chunk_bytes: int = SCAN_CHUNK_BYTES,
) -> ScanStop:
    """Scan records in file bytes ``[start, end)`` of ``fd`` with ``pread`` in large chunks.

    Good records go, in order, to ``sink(record, offset)`` one by one, or to ``many(records)``
    once per chunk (faster); the scan stops at ``end`` or at the first problem. ``end`` is
    treated as end of file (a record crossing it is reported, not waited for).
    """
    pos = start
    lsn = expected_lsn
    want = chunk_bytes
    while pos < end:
        size = min(max(want, chunk_bytes), end - pos)
        buf = os.pread(fd, size, pos)
        if not buf:
            return ScanStop(pos, lsn, f"file ends at offset {pos}, before {end}", True)
        final = pos + len(buf) >= end or len(buf) < size
        out: list[Record] | None = [] if many is not None else None
        used, lsn, detail, torn, need = parse_records(buf, pos, lsn, out if many is not None else sink, final=final)
        if many is not None and out:
            many(out)
        if detail is not None:
            return ScanStop(pos + used, lsn, detail, torn)
        pos += used
        want = need
    return ScanStop(pos, lsn)


@lru_cache(maxsize=64)
def _lsn_pattern(high: int) -> re.Pattern[bytes]:
    """Candidates for a record header whose LSN's upper 48 bits equal ``high``.

    The LSN field sits at header offset 8 (little-endian): two low bytes, then six high ones.
    The match (a zero-width lookahead, so overlapping candidates are all found) starts at the
    LSN field. For ``high == 0`` the low bytes must not both be zero (LSN 0 is never valid),
    which keeps long runs of zeros from producing a candidate at every byte.
    """
    low = rb"(?:[^\x00].|\x00[^\x00])" if high == 0 else b".."
    return re.compile(b"(?=" + low + re.escape(high.to_bytes(6, "little")) + b")", re.DOTALL)


def _valid_at(buf: bytes, pos: int, low: int, high: int) -> bool:
    if len(buf) - pos < MIN_RECORD_BYTES:
        return False
    crc, length, lsn, token, code, eid_len = HEADER.unpack_from(buf, pos)
    if not low <= lsn <= high or code not in TYPE_BY_CODE or token > MAX_SAFE_INTEGER:
        return False
    if length < MIN_PAYLOAD_BYTES or length > MAX_PAYLOAD_BYTES:
        return False
    if eid_len > length - MIN_PAYLOAD_BYTES:
        return False
    end = pos + HEADER_SIZE + length
    return end <= len(buf) and bool(crc32c(memoryview(buf)[pos + 4 : end]) == crc)


def find_valid_record(buf: bytes, start: int, min_lsn: int) -> tuple[int, int] | None:
    """Find the first well-formed record at buffer offset >= ``start``: ``(offset, lsn)`` or None.

    Well-formed: sane header, known type, CRC good, and an LSN from ``min_lsn`` up to what could
    fit in the buffer (records after a bad spot in a dense log can only have LSNs >= the one the
    bad record should have had). Candidates are found with a byte search on the LSN field, so
    this is fast even over megabytes of data or zeros. Used to tell a torn tail (nothing valid
    follows) from corruption (valid records follow the bad spot), and by ``verify`` to resync.
    """
    size = len(buf)
    if size - start < MIN_RECORD_BYTES:
        return None
    max_lsn = min_lsn + (size - start) // MIN_RECORD_BYTES + 1
    best: tuple[int, int] | None = None
    for high in range(min_lsn >> 16, (max_lsn >> 16) + 1):
        for match in _lsn_pattern(high).finditer(buf, start + 8):
            pos = match.start() - 8
            if best is not None and pos >= best[0]:
                break
            if _valid_at(buf, pos, min_lsn, max_lsn):
                best = (pos, int.from_bytes(buf[pos + 8 : pos + 16], "little"))
                break
    return best


def iter_fd(
    fd: int,
    path: str,
    start: int,
    end: int,
    first_lsn: int,
    *,
    chunk_bytes: int = SCAN_CHUNK_BYTES,
) -> Iterator[Record]:
    """Yield the records in file bytes ``[start, end)`` lazily, one chunk decoded at a time.

    The range must be known-good: any problem raises :class:`WalCorruption` (after yielding the
    good records before it).
    """
    pos = start
    lsn = first_lsn
    want = chunk_bytes
    while pos < end:
        size = min(max(want, chunk_bytes), end - pos)
        buf = os.pread(fd, size, pos)
        if not buf:
            raise WalCorruption(path, pos, f"file ends at offset {pos}, before {end}")
        out: list[Record] = []
        final = pos + len(buf) >= end or len(buf) < size
        used, lsn, detail, _torn, need = parse_records(buf, pos, lsn, out, final=final)
        yield from out
        if detail is not None:
            raise WalCorruption(path, pos + used, detail)
        pos += used
        want = need
