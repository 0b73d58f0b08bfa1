"""Replay throughput on its own: ``Pipeline.replay_partition`` over N pending WAL records.

Starts a private redis-server on a free port (never the shared 6379), appends N ENTRY records
(token 0, as failing open writes them; bodies from ``BillingEntry.canonical()``, 80% credited)
to partition 0, opens a fresh runtime and times ``replay_partition(0)``; every entry must end
applied. Prints records/s per round and the median::

    .venv/bin/python -m bench.replay_bench --records 100000 --rounds 3 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
from pathlib import Path

from bench.e2e_bench import replay_bench
from worker.devstack import RedisProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="pending records to replay")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--profile", action="store_true", help="one more cProfile'd round, top 25 by own time")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        workdir = Path(tmp)
        state = RedisProcess(workdir / "redis").start()
        try:
            url = state.url(0)
            rates = []
            for round_no in range(args.rounds):
                env_name = f"rb{os.getpid()}r{round_no + 1}"
                result = replay_bench(workdir / env_name, url, url, count=args.records, env_name=env_name)
                rates.append(result["replay_per_s"])
                print(f"round {round_no + 1}: {result['replay_per_s']:,.0f} records/s ({result['replay_s']:.2f} s)")
            if rates:
                print(f"median of {args.rounds}: {statistics.median(rates):,.0f} records/s")
            if args.profile:
                env_name = f"rb{os.getpid()}prof"
                result = replay_bench(
                    workdir / env_name, url, url, count=args.records, env_name=env_name, profile=True
                )
                profiler: cProfile.Profile = result["profile"]
                print(f"profiled: {result['replay_per_s']:,.0f} records/s")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(40)
                pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(30)
        finally:
            state.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
