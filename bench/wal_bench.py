"""WAL throughput, in one run, in a temp dir (not a test): ``python bench/wal_bench.py``.

Measures, each three times interleaved (medians with min-max):

* single appends with fsync per record (``Partition.append``, fsync=True) vs a raw loop of
  ``os.write`` + ``os.fsync`` (and + ``os.fdatasync``, which the WAL uses) of the same bytes;
  target ratio >= 0.7;
* batched appends (``append_batch`` of 1000 records, one write + one fsync per batch);
  target >= 100k records/s;
* full scan: reopen (load, CRC-check and index every record) and iterate ``records()``;
  target >= 200k records/s.

Options: ``--dir PATH`` (default: a temp dir under ``$TMPDIR``; use the WAL's own filesystem
for meaningful fsync numbers), ``--single N``, ``--batched N``, ``--rounds N``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.wal import Partition, RecordType
from worker.wal.record import encode, prepare

SEGMENT_BYTES = 64 * 1024 * 1024
BATCH = 1000


def entry_body(i: int) -> dict[str, object]:
    """A realistic ENTRY body (about 200 bytes of canonical JSON)."""
    return {
        "actual_amount": str(1_000_000 + i % 977),
        "entry_id": f"bench-entry-{i:09d}",
        "occurred_at": "2024-05-01T12:00:00+00:00",
        "quote_id": f"quote-{i:09d}",
        "quoted_amount": str(1_250_000),
        "wallet": "0x" + f"{i:040x}",
    }


def raw_bytes(n: int) -> list[bytes]:
    """The exact bytes the WAL writes for ``n`` single appends (LSN 1..n)."""
    return [encode(i + 1, prepare(RecordType.ENTRY, 7, f"e{i}", entry_body(i))) for i in range(n)]


def bench_single_vs_raw(root: Path, n: int, block: int = 100) -> tuple[float, float, float]:
    """Appends/s of ``Partition.append`` (fsync=True) and of raw ``os.write``+``os.fsync`` and
    ``os.write``+``os.fdatasync`` loops over the same bytes, interleaved in blocks of ``block``
    operations so that all three see the same machine load."""
    wal_dir = root / "single"
    shutil.rmtree(wal_dir, ignore_errors=True)
    chunks = raw_bytes(n)
    bodies = [entry_body(i) for i in range(n)]
    raw_fsync_path = root / "raw-fsync.bin"
    raw_fdatasync_path = root / "raw-fdatasync.bin"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    fd_fsync = os.open(raw_fsync_path, flags, 0o644)
    fd_fdatasync = os.open(raw_fdatasync_path, flags, 0o644)
    spent = {"wal": 0.0, "fsync": 0.0, "fdatasync": 0.0}
    try:
        with Partition.open(wal_dir, segment_bytes=SEGMENT_BYTES, fsync=True) as part:
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                start = time.perf_counter()
                for i in range(lo, hi):
                    part.append(RecordType.ENTRY, 7, f"e{i}", bodies[i])
                spent["wal"] += time.perf_counter() - start
                for key, fd, sync in (
                    ("fsync", fd_fsync, os.fsync),
                    ("fdatasync", fd_fdatasync, os.fdatasync),
                ):
                    start = time.perf_counter()
                    for i in range(lo, hi):
                        os.write(fd, chunks[i])
                        sync(fd)
                    spent[key] += time.perf_counter() - start
        assert os.path.getsize(raw_fsync_path) == sum(map(len, chunks))
    finally:
        os.close(fd_fsync)
        os.close(fd_fdatasync)
        raw_fsync_path.unlink()
        raw_fdatasync_path.unlink()
    return n / spent["wal"], n / spent["fsync"], n / spent["fdatasync"]


def bench_batched(root: Path, n: int) -> float:
    path = root / "batched"
    shutil.rmtree(path, ignore_errors=True)
    items = [(RecordType.ENTRY, 7, f"e{i}", entry_body(i)) for i in range(n)]
    with Partition.open(path, segment_bytes=SEGMENT_BYTES, fsync=True) as part:
        start = time.perf_counter()
        for offset in range(0, n, BATCH):
            part.append_batch(items[offset : offset + BATCH])
        elapsed = time.perf_counter() - start
    return n / elapsed


def bench_reopen(root: Path, n: int) -> float:
    start = time.perf_counter()
    with Partition.open(root / "batched", segment_bytes=SEGMENT_BYTES) as part:
        assert part.last_lsn == n and part.pending_count == n
        elapsed = time.perf_counter() - start
    return n / elapsed


def bench_iterate(root: Path, n: int) -> float:
    with Partition.open(root / "batched", segment_bytes=SEGMENT_BYTES, read_only=True) as part:
        start = time.perf_counter()
        count = sum(1 for _ in part.records())
        elapsed = time.perf_counter() - start
    assert count == n
    return n / elapsed


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):>10,.0f}/s  (min {min(values):,.0f} - max {max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--single", type=int, default=2000)
    parser.add_argument("--batched", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wal-bench-", dir=args.dir))
    results: dict[str, list[float]] = {
        k: [] for k in ("single", "raw_fsync", "raw_fdatasync", "batched", "reopen", "iterate")
    }
    ratios_fsync: list[float] = []
    ratios_fdatasync: list[float] = []
    try:
        record_size = len(raw_bytes(1)[0])
        print(f"dir {root}; {args.single} single appends, {args.batched} batched, {args.rounds} rounds")
        print(f"record size {record_size} bytes (28-byte header + entry_id + ~200-byte JSON body)")
        for round_no in range(1, args.rounds + 1):
            single, raw_fsync, raw_fdatasync = bench_single_vs_raw(root, args.single)
            batched = bench_batched(root, args.batched)
            reopen = bench_reopen(root, args.batched)
            iterate = bench_iterate(root, args.batched)
            for key, value in (
                ("single", single),
                ("raw_fsync", raw_fsync),
                ("raw_fdatasync", raw_fdatasync),
                ("batched", batched),
                ("reopen", reopen),
                ("iterate", iterate),
            ):
                results[key].append(value)
            ratios_fsync.append(single / raw_fsync)
            ratios_fdatasync.append(single / raw_fdatasync)
            print(
                f"  round {round_no}: single {single:,.0f}/s raw-fsync {raw_fsync:,.0f}/s "
                f"raw-fdatasync {raw_fdatasync:,.0f}/s batched {batched:,.0f}/s "
                f"reopen {reopen:,.0f}/s iterate {iterate:,.0f}/s"
            )
        print()
        print(f"append, fsync per record     {fmt(results['single'])}")
        print(f"raw os.write+os.fsync        {fmt(results['raw_fsync'])}")
        print(f"raw os.write+os.fdatasync    {fmt(results['raw_fdatasync'])}")
        print(
            f"ratio vs raw fsync           {statistics.median(ratios_fsync):.2f}  "
            f"(min {min(ratios_fsync):.2f} - max {max(ratios_fsync):.2f}; target >= 0.70)"
        )
        print(
            f"ratio vs raw fdatasync       {statistics.median(ratios_fdatasync):.2f}  "
            f"(min {min(ratios_fdatasync):.2f} - max {max(ratios_fdatasync):.2f})"
        )
        print(f"batched appends ({BATCH}/batch) {fmt(results['batched'])}  (target >= 100,000/s)")
        print(f"reopen (load+index) scan     {fmt(results['reopen'])}  (target >= 200,000/s)")
        print(f"records() iteration          {fmt(results['iterate'])}  (target >= 200,000/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
