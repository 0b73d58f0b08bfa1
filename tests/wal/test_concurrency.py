"""Several processes on one partition, and a writer killed with SIGKILL mid-stream."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.wal.helpers import append_many, segment_paths
from worker.wal import Partition, RecordType, verify_partition

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_appending_concurrently(part_dir: Path) -> None:
    count = 400
    Partition.open(part_dir, segment_bytes=4096, fsync=False).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)  # both children have their handle open before either appends
    workers = [
        context.Process(target=append_many, args=(str(part_dir), prefix, count, 4096, start)) for prefix in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    report = verify_partition(part_dir)
    assert report.ok and report.problems == []
    with Partition.open(part_dir, segment_bytes=4096, fsync=False) as part:
        records = list(part.records())
        assert [r.lsn for r in records] == list(range(1, 2 * count + 1))
        assert part.pending_count == 2 * count
        assert len(segment_paths(part_dir)) > 2
        for prefix in ("a", "b"):
            mine = [r for r in records if r.entry_id.startswith(prefix)]
            assert [r.entry_id for r in mine] == [f"{prefix}{i}" for i in range(count)]
            assert [r.body for r in mine] == [{"n": i, "p": prefix} for i in range(count)]


def test_sigkill_mid_stream_recovers_every_acknowledged_lsn(part_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.wal.appender", str(part_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    reported: list[int] = []
    try:
        assert child.stdout is not None
        while len(reported) < 200:
            line = child.stdout.readline()
            assert line, f"child exited early with {child.poll()}"
            reported.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert reported == list(range(1, len(reported) + 1))

    with Partition.open(part_dir, segment_bytes=2048, fsync=True) as part:
        records = list(part.records())
        lsns = [r.lsn for r in records]
        assert lsns == list(range(1, len(records) + 1)), "a dense prefix"
        assert set(reported) <= set(lsns)
        for record in records:
            assert record.entry_id == f"k{record.lsn - 1}"
            assert record.body["i"] == record.lsn - 1
        # The partition keeps working where the child stopped.
        after = part.append(RecordType.ENTRY, part.highest_token, "after-kill", {})
        assert after.lsn == len(records) + 1
    assert verify_partition(part_dir).ok
