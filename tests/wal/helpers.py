"""Helpers for the WAL tests (also imported by child processes, so no pytest imports here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.wal import Partition, Record, RecordType
from worker.wal.segment import SEGMENT_HEADER_SIZE, list_segments, scan_fd

#: Small segments, so that a few dozen records rotate several times.
SMALL_SEGMENT = 1024


def entry_body(i: int, *, amount: int | None = None) -> dict[str, Any]:
    """A small ENTRY body; ``amount`` changes the content (for conflicts)."""
    return {
        "entry_id": f"e{i}",
        "wallet": f"0x{i:040x}",
        "quoted_amount": str(1000 + i if amount is None else amount),
        "actual_amount": "900",
    }


def fill(part: Partition, first: int, count: int, *, token: int = 0) -> list[Record]:
    """Append ENTRY records e<first> .. e<first+count-1>."""
    return [part.append(RecordType.ENTRY, token, f"e{i}", entry_body(i)) for i in range(first, first + count)]


def segment_paths(directory: Path) -> list[Path]:
    return [path for _first, path in list_segments(directory)]


def record_spans(path: Path, first_lsn: int | None = None) -> list[tuple[int, int, int]]:
    """``(lsn, start, end)`` byte spans of the good records of a segment file."""
    if first_lsn is None:
        first_lsn = int(path.name.split(".")[0])
    found: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        stop = scan_fd(fd, SEGMENT_HEADER_SIZE, size, first_lsn, lambda r, off: found.append((r.lsn, off)))
    finally:
        os.close(fd)
    ends = [offset for _lsn, offset in found[1:]] + ([stop.offset] if found else [])
    return [(lsn, start, end) for (lsn, start), end in zip(found, ends, strict=True)]


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def as_tuples(records: list[Record]) -> list[tuple[int, str, int, str, bytes]]:
    return [(r.lsn, r.type.name, r.fencing_token, r.entry_id, r.raw_body) for r in records]


def append_many(path: str, prefix: str, count: int, segment_bytes: int, start: Any) -> None:
    """Child process body: open the partition, wait at ``start`` (a multiprocessing Barrier),
    then append ``count`` ENTRY records ``<prefix><i>`` mixing single appends and small batches."""
    with Partition.open(path, segment_bytes=segment_bytes, fsync=False) as part:
        start.wait()
        i = 0
        while i < count:
            if i % 3 == 2 and i + 4 <= count:
                part.append_batch(
                    [(RecordType.ENTRY, 0, f"{prefix}{j}", {"n": j, "p": prefix}) for j in range(i, i + 4)]
                )
                i += 4
            else:
                part.append(RecordType.ENTRY, 0, f"{prefix}{i}", {"n": i, "p": prefix})
                i += 1
