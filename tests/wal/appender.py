"""Child for the SIGKILL test: ``python -m tests.wal.appender DIR``.

Appends ENTRY records ``k0, k1, ...`` with fsync on and small segments, printing each LSN
(flushed) after ``append`` returned, until killed.
"""

from __future__ import annotations

import sys

from worker.wal import Partition, RecordType


def main() -> None:
    with Partition.open(sys.argv[1], segment_bytes=2048, fsync=True) as part:
        i = 0
        while True:
            record = part.append(RecordType.ENTRY, 1 + i // 50, f"k{i}", {"i": i, "pad": "x" * (i % 40)})
            sys.stdout.write(f"{record.lsn}\n")
            sys.stdout.flush()
            i += 1


if __name__ == "__main__":
    main()
