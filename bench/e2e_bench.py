"""End-to-end benchmark of the billing worker against its baselines (a script, not a test).

    python bench/e2e_bench.py [--entries 5000] [--wallets 500] [--rounds 3]

Starts everything it needs (and stops it at the end, on error and on Ctrl-C too): a redis-server
for the broker (db 0) and the result backend (db 1), a redis-server for the state, a temporary WAL
directory, a PostgreSQL database ``billing_bench_<pid>`` on the local server (dropped at the end),
and ONE real worker subprocess per round: ``celery -A worker.app worker`` (prefork, concurrency 2,
:func:`worker.devstack.worker_args`) with ``-I bench.baseline_tasks``, a fresh ``BILLING_ENV``,
``BILLING_PARTITIONS=8``, ``BILLING_WAL_FSYNC=always``, ``BILLING_METRICS_PORT=0``.

Variants, each sending ``--entries`` entries over ``--wallets`` wallets with ``app.send_task`` as an
upstream service would, then waiting for every result:

* ``process_entry`` — ``billing.process_entry``: validated, fenced, WAL-logged (fsync), credited;
* ``bare``          — ``bench.bare_incrby``: one INCRBY on the state Redis;
* ``pg``            — ``bench.pg_entry``: the same entry in one PostgreSQL transaction.

Rounds are interleaved (A B C, B C A, C A B, ...). Per variant: throughput (entries/s from the
first send to the last result) and send→result latency p50/p99 of the burst, plus the latency of
a paced stream (``--paced`` entries at ``--paced-rate``/s, below every variant's capacity, so it
measures service time, not queueing). A result's arrival time is taken by a collector thread
that PSUBSCRIBEs to ``celery-task-meta-*`` on the result backend: the Redis result backend
PUBLISHes every stored result on the channel named by its key, so each result is timestamped when
it reaches the client, without polling (details in bench/RESULTS.md).

Then micro benchmarks: ``credit_issue`` EVALSHA vs plain INCRBY (sequential round trips and
pipelined), and replay of ``--replay`` pending WAL entries by ``Pipeline.replay_partition``
against the pipelined EVALSHA ceiling, with a cProfile breakdown. Last (``--no-profile`` skips
it) a py-spy profile of the worker's processes during a ``process_entry`` and a ``bare`` run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from worker.devstack import CeleryProcess, RedisProcess, Stack, worker_args  # noqa: E402
from worker.samples import sample_entries, wallet_address  # noqa: E402

console = Console()

#: variant name -> Celery task name.
VARIANTS: dict[str, str] = {
    "process_entry": "billing.process_entry",
    "bare": "bench.bare_incrby",
    "pg": "bench.pg_entry",
}
ORDER = list(VARIANTS)
#: Targets stated by the project.
TARGET_THROUGHPUT_RATIO = 0.8
TARGET_P99_RATIO = 3.0
TARGET_REPLAY_PER_S = 50_000
CONCURRENCY = 2
PARTITIONS = 8
PG_DSN_CANDIDATES = (
    "host=/var/run/postgresql user=postgres",
    "host=127.0.0.1 port=5432 user=postgres",
    "host=/var/run/postgresql",
    "host=127.0.0.1 port=5432",
)


# --- statistics ------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def med_range(values: list[float], fmt: str = "{:,.0f}") -> str:
    """``median (min-max)``."""
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


# --- CPU accounting --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of one process (0 when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_s() -> tuple[float, float]:
    """(busy CPU seconds, total CPU seconds) of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


@dataclass
class CpuProbe:
    """Snapshots of CPU seconds per component of the benchmark."""

    groups: dict[str, Callable[[], list[int]]]

    def snapshot(self) -> dict[str, float]:
        out = {name: sum(proc_cpu_s(pid) for pid in pids()) for name, pids in self.groups.items()}
        times = os.times()
        out["client (send, collect)"] = times.user + times.system
        out["machine busy"], out["machine total"] = machine_busy_s()
        return out

    @staticmethod
    def per_entry_ms(before: dict[str, float], after: dict[str, float], entries: int) -> dict[str, float]:
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        out = {k: 1000 * v / entries for k, v in delta.items() if k not in ("machine busy", "machine total")}
        out["other processes"] = 1000 * delta["machine busy"] / entries - sum(out.values())
        out["machine busy %"] = 100 * delta["machine busy"] / delta["machine total"] if delta["machine total"] else 0
        return out


# --- result collection -----------------------------------------------------------------------


class Collector:
    """Timestamps every result as it reaches the client.

    One thread PSUBSCRIBEs to ``celery-task-meta-*`` on the result backend (the Redis backend
    PUBLISHes each stored state on the channel named by its key) and records, per task id, the
    ``time.perf_counter()`` of the first terminal state (SUCCESS or FAILURE) and the meta. RETRY
    states are counted. Subscribed before any send, so nothing can be missed.
    """

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe("celery-task-meta-*")
        deadline = time.monotonic() + 10
        while True:  # the psubscribe confirmation: from here on every publish reaches us
            message = self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "psubscribe":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no psubscribe confirmation from the result backend")
        self._lock = threading.Lock()
        self._expected: set[str] = set()
        self._missing = 0
        self._done = threading.Event()
        self.arrivals: dict[str, tuple[float, dict[str, Any]]] = {}
        self.retries = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="result-collector", daemon=True)
        self._thread.start()

    def arm(self, task_ids: list[str]) -> None:
        with self._lock:
            self._expected = set(task_ids)
            self.arrivals = {}
            self.retries = 0
            self._missing = len(self._expected)
            self._done.clear()

    def _run(self) -> None:
        while not self._stop:
            try:
                message = self._pubsub.get_message(timeout=0.2)
            except (redis.exceptions.ConnectionError, ValueError):
                if self._stop:
                    return
                raise
            if message is None or message["type"] != "pmessage":
                continue
            now = time.perf_counter()
            meta = json.loads(message["data"])
            status = meta.get("status")
            task_id = meta.get("task_id")
            with self._lock:
                if status == "RETRY":
                    self.retries += 1
                    continue
                if status not in ("SUCCESS", "FAILURE") or task_id not in self._expected:
                    continue
                if task_id in self.arrivals:
                    continue
                self.arrivals[task_id] = (now, meta)
                self._missing -= 1
                if self._missing == 0:
                    self._done.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    @property
    def missing(self) -> int:
        with self._lock:
            return self._missing

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._pubsub.close()
        self._client.close()


@dataclass
class RunResult:
    variant: str
    entries: int
    throughput: float  #: entries/s, first send → last result
    p50_ms: float
    p99_ms: float
    max_ms: float
    send_s: float  #: time spent sending
    retries: int
    statuses: dict[str, int]
    delivery_lag_ms: float  #: median (client arrival - worker's date_done)
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_variant(
    app: Any,
    collector: Collector,
    variant: str,
    payloads: list[dict[str, Any]],
    *,
    rate: float | None = None,
    timeout_s: float = 600.0,
    cpu: CpuProbe | None = None,
) -> RunResult:
    """Send ``payloads`` to the variant's task (a burst, or paced at ``rate``/s), wait for every
    result, and measure. Raises RuntimeError when results are missing or tasks failed."""
    from celery.result import ResultSet

    name = VARIANTS[variant]
    ids = [str(uuid.uuid4()) for _ in payloads]
    collector.arm(ids)
    sent_at: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    results = []
    cpu_before = cpu.snapshot() if cpu is not None else None
    start = time.perf_counter()
    for index, (task_id, payload) in enumerate(zip(ids, payloads, strict=True)):
        if rate is not None:
            due = start + index / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        sent_wall[task_id] = time.time()
        sent_at[task_id] = time.perf_counter()
        results.append(app.send_task(name, args=[payload], queue="billing", task_id=task_id))
    send_done = time.perf_counter()
    if not collector.wait(timeout_s):
        raise RuntimeError(f"{variant}: {collector.missing} of {len(ids)} results missing after {timeout_s:.0f}s")
    cpu_after = cpu.snapshot() if cpu is not None else None
    arrivals = dict(collector.arrivals)
    retries = collector.retries
    # Drain Celery's own result consumer (it subscribed at each send) and check every answer
    # through the public API; not part of the measurement.
    values = ResultSet(results).join_native(timeout=120, propagate=False)
    del results
    gc.collect()  # AsyncResults sit in reference cycles: free them now, not during a later timed run
    statuses: Counter[str] = Counter()
    failures = 0
    for value in values:
        if isinstance(value, dict) and "status" in value:
            statuses[str(value["status"])] += 1
        else:
            failures += 1
            statuses[f"error:{type(value).__name__}"] += 1
    latencies = sorted((arrivals[t][0] - sent_at[t]) * 1000 for t in ids)
    lags = []
    for task_id in ids:
        done = arrivals[task_id][1].get("date_done")
        if done:
            stored = datetime.fromisoformat(done).timestamp()
            lags.append((arrivals[task_id][0] - sent_at[task_id]) * 1000 - (stored - sent_wall[task_id]) * 1000)
    last = max(arrivals[t][0] for t in ids)
    return RunResult(
        variant=variant,
        entries=len(ids),
        throughput=len(ids) / (last - start),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=latencies[-1],
        send_s=send_done - start,
        retries=retries,
        statuses=dict(statuses),
        delivery_lag_ms=statistics.median(lags) if lags else math.nan,
        failures=failures,
        extra={"cpu_ms_per_entry": CpuProbe.per_entry_ms(cpu_before, cpu_after, len(ids))}
        if cpu_before is not None and cpu_after is not None
        else {},
    )


# --- PostgreSQL --------------------------------------------------------------------------------


class PgDatabase:
    """A private database on the local PostgreSQL server, dropped by :meth:`drop`."""

    def __init__(self, base_dsn: str | None) -> None:
        import psycopg

        self.psycopg = psycopg
        candidates = (base_dsn,) if base_dsn else PG_DSN_CANDIDATES
        errors = []
        for candidate in candidates:
            try:
                admin = psycopg.connect(f"{candidate} dbname=postgres", autocommit=True, connect_timeout=5)
            except psycopg.Error as error:
                errors.append(f"{candidate}: {error}".strip())
                continue
            self.base_dsn = candidate
            break
        else:
            raise RuntimeError("cannot reach PostgreSQL: " + "; ".join(errors))
        self.name = f"billing_bench_{os.getpid()}"
        admin.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
        admin.execute(f'CREATE DATABASE "{self.name}"')
        self.settings = {
            row[0]: row[1]
            for row in admin.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'wal_sync_method', 'shared_buffers', 'server_version')"
            ).fetchall()
        }
        admin.close()
        self.dsn = f"{self.base_dsn} dbname={self.name}"
        from bench.baseline_tasks import SCHEMA

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)

    def truncate(self) -> None:
        with self.psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE entries, wallets")
            conn.execute("VACUUM ANALYZE entries")
            conn.execute("VACUUM ANALYZE wallets")

    def drop(self) -> None:
        with self.psycopg.connect(f"{self.base_dsn} dbname=postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --- the e2e rounds ----------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    stack: Stack
    broker: RedisProcess
    state: RedisProcess
    pg: PgDatabase
    app: Any = None
    collector: Collector | None = None
    worker_pid: int = 0

    def cpu_probe(self) -> CpuProbe:
        broker_pid = self.broker.process.pid if self.broker.process else 0
        state_pid = self.state.process.pid if self.state.process else 0
        return CpuProbe(
            {
                "worker parent (consumer)": lambda: [self.worker_pid],
                "pool children (tasks)": lambda: pool_children(self.worker_pid),
                "broker + result Redis": lambda: [broker_pid],
                "state Redis": lambda: [state_pid],
                "PostgreSQL": postgres_pids,
            }
        )

    def worker_env(self, env_name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        metrics_dir = self.workdir / f"metrics-{env_name}"
        metrics_dir.mkdir(exist_ok=True)
        env.update(
            BILLING_ENV=env_name,
            BILLING_REDIS_URL=self.state.url(0),
            BILLING_BROKER_URL=self.broker.url(0),
            BILLING_RESULT_BACKEND=self.broker.url(1),
            BILLING_WAL_DIR=str(self.workdir / "wal"),
            BILLING_PARTITIONS=str(PARTITIONS),
            BILLING_WAL_FSYNC="always",
            BILLING_METRICS_PORT="0",
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            BENCH_PG_DSN=self.pg.dsn,
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        return env

    def start_worker(self, env_name: str) -> CeleryProcess:
        args = [*worker_args(concurrency=CONCURRENCY, name=env_name), "-I", "bench.baseline_tasks"]
        worker = self.stack.add_celery(
            CeleryProcess(args, env=self.worker_env(env_name), log_path=self.workdir / f"worker-{env_name}.log")
        )
        assert worker.process is not None
        self.worker_pid = worker.process.pid
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if worker.process is None or worker.process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"worker-{env_name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the worker did not come up:\n{log}")
        # Warm up every variant: each pool child builds its runtime / clients on first use.
        for variant in ORDER:
            warm = sample_entries(
                8 * CONCURRENCY, wallets=self.args.wallets, seed=99, prefix=f"{env_name}-w{variant[0]}"
            )
            run_variant(self.app, self.collector_, variant, warm, timeout_s=60)
        return worker

    @property
    def collector_(self) -> Collector:
        assert self.collector is not None
        return self.collector

    def rounds(self) -> dict[str, list[RunResult]]:
        out: dict[str, list[RunResult]] = {v: [] for v in ORDER}
        out.update({f"{v}:paced": [] for v in ORDER})
        for round_no in range(self.args.rounds):
            env_name = f"bench{os.getpid()}r{round_no + 1}"
            order = ORDER[round_no % len(ORDER) :] + ORDER[: round_no % len(ORDER)]
            console.rule(f"round {round_no + 1}: {' → '.join(order)}  (BILLING_ENV={env_name})")
            worker = self.start_worker(env_name)
            try:
                for variant in order:
                    if variant == "pg":
                        self.pg.truncate()
                    payloads = sample_entries(
                        self.args.entries,
                        wallets=self.args.wallets,
                        seed=1000 + round_no,
                        prefix=f"r{round_no + 1}{variant[0]}-",
                    )
                    time.sleep(0.5)
                    result = run_variant(self.app, self.collector_, variant, payloads, cpu=self.cpu_probe())
                    out[variant].append(result)
                    console.print(
                        f"  {variant:<14} {result.throughput:8,.0f} entries/s   p50 {result.p50_ms:8.1f} ms   "
                        f"p99 {result.p99_ms:8.1f} ms   send {result.send_s:5.2f}s   retries {result.retries}   "
                        f"{result.statuses}"
                    )
                    if result.failures:
                        raise RuntimeError(f"{variant}: {result.failures} tasks failed: {result.statuses}")
                    if self.args.paced:
                        paced_payloads = sample_entries(
                            self.args.paced,
                            wallets=self.args.wallets,
                            seed=2000 + round_no,
                            prefix=f"r{round_no + 1}{variant[0]}p-",
                        )
                        time.sleep(0.5)
                        paced = run_variant(
                            self.app, self.collector_, variant, paced_payloads, rate=self.args.paced_rate
                        )
                        out[f"{variant}:paced"].append(paced)
                        console.print(
                            f"  {variant + ' paced':<14} {paced.throughput:8,.0f} entries/s   "
                            f"p50 {paced.p50_ms:8.1f} ms   p99 {paced.p99_ms:8.1f} ms   retries {paced.retries}"
                        )
            finally:
                worker.stop()
        return out


# --- micro benchmarks --------------------------------------------------------------------------


def micro_redis(state_url: str, *, seq_n: int, pipe_n: int, rounds: int, batch: int = 500) -> dict[str, list[float]]:
    """credit_issue EVALSHA vs INCRBY calls/s on one client: sequential round trips and pipelined
    (batches of ``batch``: packed by ``worker.redis_pipe`` like ``CreditLedger.issue_many``, and
    through redis-py's ``Pipeline`` as before). Arguments are built before timing."""
    from worker import keys
    from worker.redis_pipe import evalsha_many
    from worker.scripts import Scripts
    from worker.state_redis import connect

    client = connect(state_url, timeout_ms=5000)
    script = Scripts.register(client).credit_issue
    rng = random.Random(5)
    wallets = [wallet_address(i + 1) for i in range(500)]
    counter = [0]

    def calls(n: int) -> list[tuple[list[str], list[str]]]:
        out = []
        for _ in range(n):
            counter[0] += 1
            wallet = wallets[rng.randrange(len(wallets))]
            note_id = f"cn_micro{counter[0]:09d}"
            delta = str(rng.randrange(1, 1_000_000))
            note = json.dumps(
                {"amount": delta, "entry_id": note_id[3:], "id": note_id, "quote_id": "q", "wallet": wallet},
                sort_keys=True,
            )
            out.append(
                (
                    [keys.credit_balance("micro", wallet), keys.credit_note("micro", wallet, note_id)],
                    [delta, "1000000000000", "604800", note],
                )
            )
        return out

    def evalsha_seq(n: int) -> float:
        work = calls(n)
        start = time.perf_counter()
        for call_keys, call_args in work:
            script(keys=call_keys, args=call_args)
        return n / (time.perf_counter() - start)

    def incrby_seq(n: int) -> float:
        work = calls(n)
        start = time.perf_counter()
        for call_keys, call_args in work:
            client.incrby(call_keys[0], call_args[0])
        return n / (time.perf_counter() - start)

    def evalsha_pipe(n: int) -> float:
        work = calls(n)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for call_keys, call_args in work[lo : lo + batch]:
                script(keys=call_keys, args=call_args, client=pipe)
            pipe.execute()
        return n / (time.perf_counter() - start)

    def evalsha_packed(n: int) -> float:
        work = [(*call_keys, *call_args) for call_keys, call_args in calls(n)]
        start = time.perf_counter()
        for lo in range(0, n, batch):
            evalsha_many(client, script, 2, work[lo : lo + batch])
        return n / (time.perf_counter() - start)

    def incrby_pipe(n: int) -> float:
        work = calls(n)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            pipe = client.pipeline(transaction=False)
            for call_keys, call_args in work[lo : lo + batch]:
                pipe.incrby(call_keys[0], call_args[0])
            pipe.execute()
        return n / (time.perf_counter() - start)

    benches: dict[str, tuple[Callable[[int], float], int]] = {
        "credit_issue EVALSHA, sequential": (evalsha_seq, seq_n),
        "INCRBY, sequential": (incrby_seq, seq_n),
        # the first "credit_issue EVALSHA, pipe…" is the replay ceiling: the path replay uses
        f"credit_issue EVALSHA, pipelined x{batch} (worker.redis_pipe)": (evalsha_packed, pipe_n),
        f"credit_issue EVALSHA via redis-py Pipeline x{batch}": (evalsha_pipe, pipe_n),
        f"INCRBY, pipelined x{batch}": (incrby_pipe, pipe_n),
    }
    script(keys=["micro:warm", "micro:warm:n"], args=["1", "10", "10", "{}"])  # load the script
    out: dict[str, list[float]] = {name: [] for name in benches}
    names = list(benches)
    for round_no in range(rounds):
        for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
            fn, n = benches[name]
            out[name].append(fn(n))
    client.close()
    return out


_REPLAY_BODIES: dict[tuple[int, int], list[dict[str, Any]]] = {}


def _replay_entries(store: Any, partition_no: int, count: int) -> list[dict[str, Any]]:
    """``count`` canonical entry bodies (BillingEntry.canonical()) over wallets of the partition
    (built once per size, reused by every round)."""
    from worker.models import parse_entry

    cached = _REPLAY_BODIES.get((partition_no, count))
    if cached is not None:
        return cached

    wallets = []
    n = 1
    while len(wallets) < 64:
        wallet = wallet_address(n)
        if store.partition_for_wallet(wallet) == partition_no:
            wallets.append(wallet)
        n += 1
    rng = random.Random(11)
    bodies = []
    for i in range(count):
        quoted = rng.randrange(100_000, 5_000_000)
        actual = rng.randrange(0, quoted) if rng.random() < 0.8 else quoted + rng.randrange(0, 50_000)
        raw = {
            "entry_id": f"replay{i:07d}",
            "wallet": wallets[rng.randrange(len(wallets))],
            "quote_id": f"q-replay{i:07d}",
            "quoted_amount": str(quoted),
            "actual_amount": actual,
        }
        bodies.append(parse_entry(raw).canonical())
    _REPLAY_BODIES[(partition_no, count)] = bodies
    return bodies


def _settings(workdir: Path, env_name: str, state_url: str, broker_url: str) -> Any:
    from worker.settings import Settings

    return Settings(
        env=env_name,
        redis_url=state_url,
        broker_url=broker_url,
        result_backend=broker_url,
        wal_dir=workdir / "wal",
        partitions=PARTITIONS,
        wal_fsync="always",
        metrics_port=0,
    )


def replay_bench(
    workdir: Path, state_url: str, broker_url: str, *, count: int, env_name: str, profile: bool = False
) -> dict[str, Any]:
    """Write ``count`` pending ENTRY records (token 0, as failing open writes them) to partition 0,
    open a fresh runtime and time ``pipeline.replay_partition(0)``."""
    from worker.runtime import build_runtime
    from worker.wal import RecordType, WalStore

    settings = _settings(workdir, env_name, state_url, broker_url)
    store = WalStore(settings)
    try:
        bodies = _replay_entries(store, 0, count)
        partition = store.partition(0)
        start = time.perf_counter()
        for lo in range(0, count, 1000):
            partition.append_batch([(RecordType.ENTRY, 0, body["entry_id"], body) for body in bodies[lo : lo + 1000]])
        write_s = time.perf_counter() - start
    finally:
        store.close()
    start = time.perf_counter()
    runtime = build_runtime(settings)
    load_s = time.perf_counter() - start
    profiler = cProfile.Profile() if profile else None
    try:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        report = runtime.pipeline.replay_partition(0)
        if profiler is not None:
            profiler.disable()
        replay_s = time.perf_counter() - start
        with runtime.store.partition(0).locked() as part:
            pending = part.pending_count
    finally:
        runtime.close()
    if report.applied != count or pending != 0:
        raise RuntimeError(f"replay applied {report.applied} of {count}, {pending} still pending ({report})")
    out: dict[str, Any] = {
        "records": count,
        "write_per_s": count / write_s,
        "load_s": load_s,
        "replay_s": replay_s,
        "replay_per_s": count / replay_s,
    }
    if profiler is not None:
        out["profile"] = profiler
    return out


def summarize_cprofile(profiler: cProfile.Profile, top: int = 14) -> tuple[str, list[tuple[str, float, int]]]:
    """The top functions by own time, and a few buckets (seconds, calls)."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    buckets: dict[str, list[float]] = {}

    def add(name: str, seconds: float, calls: int) -> None:
        entry = buckets.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += calls

    for (filename, _line, func), (_cc, calls, tottime, _ct, _callers) in raw.items():
        where = f"{filename}:{func}"
        if func in ("<built-in method posix.fdatasync>", "<built-in method posix.fsync>"):
            add("fdatasync (outcome batches)", tottime, calls)
        elif "socket" in where and ("recv" in func or "send" in func):
            add("socket send/recv (Redis pipeline round trips, server time included)", tottime, calls)
        elif "worker/redis_pipe" in filename or "pack_command" in func:
            add("worker.redis_pipe: packing (hiredis.pack_command), reading replies", tottime, calls)
        elif "redis" in filename or "hiredis" in func:
            add("redis-py client: connection, reply parsing", tottime, calls)
        elif func in ("<built-in method _json.scanstring>", "<method 'decode' of 'json.decoder.JSONDecoder'>") or (
            "json" in filename and "decoder" in filename
        ):
            add("json decode (Record.body)", tottime, calls)
        elif "json" in filename or "json" in func:
            add("json encode (notes, outcome bodies)", tottime, calls)
        elif "worker/wal" in filename or "crc32c" in func:
            add("WAL: pending/lookup/prepare/encode/append", tottime, calls)
        elif "prometheus_client" in filename:
            add("metrics", tottime, calls)
        elif "worker/credit" in filename or "worker/pipeline" in filename or "worker/keys" in filename:
            add("pipeline/credit Python (requests, notes, keys)", tottime, calls)
        else:
            add("other", tottime, calls)
    rows = sorted(((k, v[0], int(v[1])) for k, v in buckets.items()), key=lambda r: -r[1])
    rows.append(("total (profiled)", total, 0))
    return stream.getvalue(), rows


# --- py-spy profile of the worker --------------------------------------------------------------

PYSPY_RATE = 250


def _has(frames: list[str], *needles: str) -> bool:
    return any(all(n in f for n in needles) for f in frames)


def categorize(frames: list[str]) -> str:
    """Bucket one py-spy stack (root first) of a pool child."""
    leaf = frames[-1] if frames else ""
    in_task = _has(frames, "tasks/billing.py") or _has(frames, "bench/baseline_tasks.py")
    if in_task:
        if _has(frames, "_write (", "worker/wal/partition.py"):
            return "WAL write + fdatasync"
        if leaf.startswith("_enter (") and "worker/wal/partition.py" in leaf:
            return "WAL flock wait"
        if _has(frames, "_catch_up (", "worker/wal"):
            return "WAL catch-up (others' appends)"
        if _has(frames, "tenacity") and ("sleep" in leaf or _has(frames, "time.sleep")):
            return "waiting for a busy partition lease"
        if _has(frames, "acquire (", "worker/fencing.py"):
            return "Redis: lease_acquire"
        if _has(frames, "validate_and_advance (", "worker/fencing.py"):
            return "Redis: fence_validate_advance"
        if _has(frames, "worker/credit.py"):
            return "Redis: credit_issue (pipelined, notes built)"
        if _has(frames, "release (", "worker/fencing.py"):
            return "Redis: lease_release"
        if (_has(frames, "incrby (") or _has(frames, "bare_incrby")) and _has(frames, "redis/"):
            return "Redis: INCRBY (bare)"
        if _has(frames, "pg_entry") and _has(frames, "psycopg"):
            return "PostgreSQL"
        if _has(frames, "parse_entry (") or _has(frames, "pydantic"):
            return "validation (pydantic)"
        if _has(frames, "prometheus_client"):
            return "metrics (prometheus multiprocess)"
        if _has(frames, "worker/wal/"):
            return "WAL Python (classify, lookup, prepare, encode)"
        return "task body: other Python"
    if _has(frames, "store_result") or _has(frames, "mark_as_done") or _has(frames, "backends/redis.py"):
        return "Celery: result backend store (SETEX+PUBLISH)"
    waiting = any(k in leaf for k in ("wait (", "poll (", "_poll (", "select (", "recv (", "_recv (", "read ("))
    if waiting and _has(frames, "billiard/pool.py", "workloop") and not _has(frames, "trace_task"):
        return "pool child idle (waiting for a task)"
    if "eventio.py" in leaf:
        return "event loop idle (poll)"
    return "Celery/billiard/kombu per-task overhead"


def parse_pyspy_raw(path: Path) -> dict[int, Counter[str]]:
    """py-spy ``--format raw`` (collapsed stacks, ``--subprocesses``): samples per category per pid."""
    per_pid: dict[int, Counter[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        pid = 0
        if frames and frames[0].startswith("process "):
            match = re.match(r"process (\d+)", frames[0])
            pid = int(match.group(1)) if match else -1
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        per_pid.setdefault(pid, Counter())[categorize(frames)] += int(count_s)
    return per_pid


def pool_children(parent: int) -> list[int]:
    try:
        text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def profile_worker(bench: Bench, entries: int) -> dict[str, Any]:
    """py-spy record of the worker's parent and each pool child during process_entry and bare runs:
    once with ``--idle`` (wall time: where a child's time goes, waits included) and once without
    (on-CPU samples only)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    out: dict[str, Any] = {}
    env_name = f"bench{os.getpid()}prof"
    worker = bench.start_worker(env_name)
    try:
        parent = bench.worker_pid
        children = pool_children(parent)
        for variant in ("process_entry", "bare"):
            for mode in ("wall", "cpu"):
                spies: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
                for pid in [parent, *children]:
                    raw = bench.workdir / f"pyspy-{variant}-{mode}-{pid}.txt"
                    argv = [pyspy, "record", "--pid", str(pid), "--nonblocking", "--rate", str(PYSPY_RATE),
                            "--format", "raw", "--output", str(raw)]  # fmt: skip
                    if mode == "wall":
                        argv.append("--idle")
                    spies[pid] = (
                        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                        raw,
                    )
                errors = []
                try:
                    time.sleep(1.5)  # let py-spy attach
                    payloads = sample_entries(
                        entries, wallets=bench.args.wallets, seed=3000, prefix=f"prof{variant[0]}{mode}-"
                    )
                    result = run_variant(bench.app, bench.collector_, variant, payloads)
                finally:
                    for spy, _ in spies.values():
                        spy.send_signal(signal.SIGINT)
                    for spy, _ in spies.values():
                        try:
                            _, err = spy.communicate(timeout=30)
                        except subprocess.TimeoutExpired:
                            spy.kill()
                            _, err = spy.communicate()
                        errors.append(err.decode(errors="replace")[-300:])
                per_pid = {
                    pid: parse_pyspy_raw(raw).get(0, Counter()) for pid, (_, raw) in spies.items() if raw.exists()
                }
                if not per_pid:
                    out.setdefault(variant, {})[mode] = {"error": "py-spy wrote nothing: " + " | ".join(errors)}
                    continue
                child_counts: Counter[str] = Counter()
                for pid in children:
                    child_counts.update(per_pid.get(pid, Counter()))
                out.setdefault(variant, {})[mode] = {
                    "throughput": result.throughput,
                    "entries": result.entries,
                    "children": child_counts,
                    "parent": per_pid.get(parent, Counter()),
                }
    finally:
        worker.stop()
    return out


# --- reporting ---------------------------------------------------------------------------------


def print_e2e(results: dict[str, list[RunResult]], args: argparse.Namespace) -> dict[str, Any]:
    table = Table(
        title=f"end to end: {args.entries} entries x {args.rounds} rounds, {args.wallets} wallets, "
        f"1 worker (prefork x{CONCURRENCY}); median (min-max)"
    )
    for column in ("variant", "entries/s", "p50 ms", "p99 ms", "retries/run"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for variant in ORDER:
        runs = results[variant]
        table.add_row(
            variant,
            med_range([r.throughput for r in runs]),
            med_range([r.p50_ms for r in runs], "{:,.1f}"),
            med_range([r.p99_ms for r in runs], "{:,.1f}"),
            med_range([float(r.retries) for r in runs], "{:.0f}"),
        )
    console.print(table)
    if args.paced:
        paced = Table(title=f"paced stream: {args.paced} entries at {args.paced_rate:.0f}/s; median (min-max)")
        for column in ("variant", "p50 ms", "p99 ms", "max ms"):
            paced.add_column(column, justify="right" if column != "variant" else "left")
        for variant in ORDER:
            runs = results[f"{variant}:paced"]
            paced.add_row(
                variant,
                med_range([r.p50_ms for r in runs], "{:,.1f}"),
                med_range([r.p99_ms for r in runs], "{:,.1f}"),
                med_range([r.max_ms for r in runs], "{:,.1f}"),
            )
        console.print(paced)

    cpu_rows: dict[str, dict[str, list[float]]] = {}
    for variant in ORDER:
        for run in results[variant]:
            for name, value in run.extra.get("cpu_ms_per_entry", {}).items():
                cpu_rows.setdefault(name, {}).setdefault(variant, []).append(value)
    if cpu_rows:
        cpu_table = Table(title="CPU per entry in the burst runs (ms of CPU per entry, median over rounds)")
        cpu_table.add_column("process")
        for variant in ORDER:
            cpu_table.add_column(variant, justify="right")
        total: dict[str, float] = dict.fromkeys(ORDER, 0.0)
        for name, per_variant in cpu_rows.items():
            if name == "machine busy %":
                continue
            cells = []
            for variant in ORDER:
                value = statistics.median(per_variant.get(variant, [0.0]))
                total[variant] += value
                cells.append(f"{value:.3f}")
            cpu_table.add_row(name, *cells)
        cpu_table.add_row("total", *(f"{total[v]:.3f}" for v in ORDER))
        cpu_table.add_row(
            "machine busy % (2 cores = 100%)",
            *(f"{statistics.median(cpu_rows['machine busy %'].get(v, [0.0])):.0f}%" for v in ORDER),
        )
        console.print(cpu_table)

    def ratio(num: str, den: str, attr: str) -> tuple[float, list[float]]:
        a, b = results[num], results[den]
        whole = statistics.median(getattr(r, attr) for r in a) / statistics.median(getattr(r, attr) for r in b)
        per_round = [getattr(x, attr) / getattr(y, attr) for x, y in zip(a, b, strict=True)]
        return whole, per_round

    ratios = Table(title="ratios (of the medians; per-round min-max in brackets)")
    for column in ("ratio", "measured", "target", "met"):
        ratios.add_column(column)
    summary: dict[str, Any] = {}
    rows: list[tuple[str, str, str, str | None, float | None]] = [
        ("throughput process_entry / bare", "process_entry", "bare", "throughput", TARGET_THROUGHPUT_RATIO),
        ("throughput pg / bare", "pg", "bare", "throughput", None),
        ("p99 process_entry / bare (burst)", "process_entry", "bare", "p99_ms", TARGET_P99_RATIO),
    ]
    if args.paced:
        rows.append(
            ("p99 process_entry / bare (paced)", "process_entry:paced", "bare:paced", "p99_ms", TARGET_P99_RATIO)
        )
    for label, num, den, attr, target in rows:
        whole, per_round = ratio(num, den, attr)
        summary[label] = {"median_ratio": whole, "per_round": per_round}
        if target is None:
            target_s, met = "-", "-"
        elif attr == "throughput":
            target_s, met = f"≥ {target}", "yes" if whole >= target else "NO"
        else:
            target_s, met = f"≤ {target}", "yes" if whole <= target else "NO"
        ratios.add_row(label, f"{whole:.2f} [{min(per_round):.2f}-{max(per_round):.2f}]", target_s, met)
    console.print(ratios)
    return summary


def print_micro(micro: dict[str, list[float]]) -> None:
    table = Table(title="state Redis, one client: calls/s, median (min-max)")
    table.add_column("call")
    table.add_column("calls/s", justify="right")
    table.add_column("µs/call", justify="right")
    for name, values in micro.items():
        table.add_row(name, med_range(values), f"{1e6 / statistics.median(values):.1f}")
    console.print(table)


def print_profile(prof: dict[str, Any]) -> None:
    if "error" in prof:
        console.print(f"[yellow]py-spy: {prof['error']}[/]")
        return
    for variant, modes in prof.items():
        wall, cpu = modes.get("wall", {}), modes.get("cpu", {})
        if "error" in wall or "error" in cpu or not wall or not cpu:
            console.print(f"[yellow]py-spy ({variant}): {wall.get('error') or cpu.get('error')}[/]")
            continue
        table = Table(
            title=f"py-spy, pool children, {variant} ({wall['entries']} entries at {wall['throughput']:,.0f}/s "
            f"with py-spy attached): µs per entry, both children summed"
        )
        for column in ("where the children's time goes", "wall µs/entry", "wall share", "active µs/entry"):
            table.add_column(column, justify="left" if column.startswith("where") else "right")
        w_counts, c_counts = wall["children"], cpu["children"]
        w_total = sum(w_counts.values()) or 1
        names = [n for n, _ in (w_counts + c_counts).most_common()]
        for name in names:
            table.add_row(
                name,
                f"{1e6 * w_counts.get(name, 0) / PYSPY_RATE / wall['entries']:.0f}",
                f"{100 * w_counts.get(name, 0) / w_total:.1f}%",
                f"{1e6 * c_counts.get(name, 0) / PYSPY_RATE / cpu['entries']:.0f}",
            )
        table.add_row(
            "total",
            f"{1e6 * w_total / PYSPY_RATE / wall['entries']:.0f}",
            "100%",
            f"{1e6 * sum(c_counts.values()) / PYSPY_RATE / cpu['entries']:.0f}",
        )
        console.print(table)
        parent: Counter[str] = cpu["parent"]
        per_entry = 1e6 * sum(parent.values()) / PYSPY_RATE / cpu["entries"]
        console.print(f"  worker parent (consumer) active: {per_entry:.0f} µs/entry")


def run_replay(
    args: argparse.Namespace, workdir: Path, state: RedisProcess, broker: RedisProcess, ceiling: float
) -> dict[str, Any]:
    """The replay benchmark (``args.rounds`` times) and one cProfile'd pass; prints the tables."""
    replays = []
    for round_no in range(args.rounds):
        env_name = f"replay{os.getpid()}r{round_no + 1}"
        r = replay_bench(workdir, state.url(0), broker.url(0), count=args.replay, env_name=env_name)
        replays.append(r)
        console.print(
            f"  replay round {round_no + 1}: {r['replay_per_s']:,.0f} records/s "
            f"({r['replay_s']:.2f}s; WAL write {r['write_per_s']:,.0f}/s, open/load {r['load_s']:.2f}s)"
        )
    rates = [r["replay_per_s"] for r in replays]
    table = Table(title=f"replay of {args.replay:,} pending records, one partition; median (min-max)")
    for column in ("measure", "value", "target"):
        table.add_column(column)
    table.add_row("replay_partition records/s", med_range(rates), f">= {TARGET_REPLAY_PER_S:,}")
    table.add_row("pipelined EVALSHA ceiling calls/s", f"{ceiling:,.0f}", "")
    table.add_row("replay / ceiling", f"{statistics.median(rates) / ceiling:.2f}", "")
    table.add_row(
        f"runtime open (load {args.replay:,} records) s", med_range([r["load_s"] for r in replays], "{:.2f}"), ""
    )
    table.add_row("WAL append_batch x1000 records/s", med_range([r["write_per_s"] for r in replays]), "")
    console.print(table)
    env_name = f"replay{os.getpid()}prof"
    prof = replay_bench(workdir, state.url(0), broker.url(0), count=args.replay, env_name=env_name, profile=True)
    text, buckets = summarize_cprofile(prof.pop("profile"))
    table = Table(title=f"cProfile of replay_partition ({prof['replay_per_s']:,.0f} records/s under the profiler)")
    for column in ("bucket", "own time s", "calls", "share"):
        table.add_column(column, justify="left" if column == "bucket" else "right")
    total = buckets[-1][1]
    for name, seconds, calls in buckets:
        table.add_row(name, f"{seconds:.3f}", f"{calls:,}" if calls else "", f"{100 * seconds / total:.0f}%")
    console.print(table)
    console.print(text.split("\n", 6)[-1][:4000])
    return {"replay": replays, "replay_profile": {"buckets": buckets, "top": text, **prof}}


def release_client(app: Any) -> None:
    """Free the client's AsyncResults and Celery's result consumer while the backend still runs
    (otherwise their finalizers retry against a stopped Redis at exit)."""
    gc.collect()
    with contextlib.suppress(Exception):
        app.backend.result_consumer.stop()
    with contextlib.suppress(Exception):
        app.pool.force_close_all()


def machine_info(pg: PgDatabase | None) -> dict[str, str]:
    def cmd(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    import celery
    import redis as redis_py

    info = {
        "cores (nproc)": cmd("nproc"),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
        "python": sys.version.split()[0],
        "redis-server": cmd("redis-server", "--version"),
        "psql": cmd("psql", "--version"),
        "celery": celery.__version__,
        "redis-py": redis_py.__version__,
        "BILLING_BATCH_SIZE (worker)": os.environ.get("BILLING_BATCH_SIZE", "unset: the default, 50"),
    }
    with contextlib.suppress(Exception):
        import psycopg

        info["psycopg"] = psycopg.__version__
    if pg is not None:
        info["postgres settings"] = ", ".join(f"{k}={v}" for k, v in sorted(pg.settings.items()))
    return info


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=5000, help="entries per variant per round (default 5000)")
    parser.add_argument("--wallets", type=int, default=500, help="distinct wallets (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--paced", type=int, default=300, help="entries of the paced latency stream (0: skip)")
    parser.add_argument("--paced-rate", type=float, default=100.0, help="send rate of the paced stream, /s")
    parser.add_argument("--replay", type=int, default=100_000, help="pending WAL records to replay (0: skip)")
    parser.add_argument("--micro-seq", type=int, default=5_000, help="sequential calls per micro round")
    parser.add_argument("--micro-pipe", type=int, default=50_000, help="pipelined calls per micro round")
    parser.add_argument("--profile-entries", type=int, default=1000, help="entries per py-spy profile run")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the worker")
    parser.add_argument("--pg-dsn", default=None, help="libpq base DSN without dbname (default: local, trust)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, WAL, py-spy output)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwind: every process started is stopped

    signal.signal(signal.SIGTERM, _terminate)
    os.chdir(ROOT)  # the worker subprocesses import `bench` and `worker` from here
    sys.setswitchinterval(0.0005)  # the collector thread must not wait ~5 ms for the GIL
    workdir = Path(tempfile.mkdtemp(prefix="billing-e2e-bench-"))
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    pg: PgDatabase | None = None
    try:
        with contextlib.ExitStack() as cleanup:
            stack = cleanup.enter_context(Stack())  # closed last: after every callback below
            broker = stack.add_redis(RedisProcess(workdir / "broker-redis"))
            state = stack.add_redis(RedisProcess(workdir / "state-redis"))
            # The client side (this process) uses the same app and configuration as upstreams.
            os.environ.update(
                BILLING_ENV="benchclient",
                BILLING_REDIS_URL=state.url(0),
                BILLING_BROKER_URL=broker.url(0),
                BILLING_RESULT_BACKEND=broker.url(1),
                BILLING_WAL_DIR=str(workdir / "wal"),
                BILLING_PARTITIONS=str(PARTITIONS),
                BILLING_METRICS_PORT="0",
            )
            from worker.settings import get_settings

            get_settings.cache_clear()
            from worker.app import app

            pg = PgDatabase(args.pg_dsn)
            cleanup.callback(pg.drop)

            info = machine_info(pg)
            report["machine"] = info
            for key, value in info.items():
                console.print(f"[dim]{key}:[/] {value}")
            bench = Bench(args, workdir, stack, broker, state, pg, app=app, collector=Collector(broker.url(1)))
            cleanup.callback(bench.collector_.close)
            cleanup.callback(release_client, app)
            started = time.perf_counter()

            results = bench.rounds()
            report["e2e"] = {k: [r.__dict__ for r in v] for k, v in results.items()}
            report["ratios"] = print_e2e(results, args)

            console.rule("micro benchmarks (worker stopped)")
            micro = micro_redis(state.url(0), seq_n=args.micro_seq, pipe_n=args.micro_pipe, rounds=args.rounds)
            report["micro"] = micro
            print_micro(micro)
            ceiling = statistics.median(next(v for k, v in micro.items() if k.startswith("credit_issue EVALSHA, pipe")))

            if args.replay:
                report.update(run_replay(args, workdir, state, broker, ceiling))

            if not args.no_profile:
                console.rule("py-spy profile of the worker (not part of the numbers above)")
                prof_worker = profile_worker(bench, args.profile_entries)
                print_profile(prof_worker)
                report["worker_profile"] = json.loads(json.dumps(prof_worker, default=dict))
            console.print(f"[dim]total {time.perf_counter() - started:.0f}s[/]")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything[/]")
        return 130
    finally:
        if args.keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
