"""``billing-worker demo``: the whole story end to end on an embedded default.

Starts a private state Redis and broker Redis (unless ``BILLING_REDIS_URL`` /
``BILLING_BROKER_URL`` are set), a real Celery worker and beat as subprocesses, sends a sample
stream as an upstream service would, pauses the state Redis mid-stream to show fail-open and
replay, prints what happened and the balances, checks the invariants, stops everything it
started, and exits 0 only when the invariants hold.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from worker.devstack import CeleryProcess, RedisProcess, Stack, worker_args
from worker.redaction import redact_url

console = Console()

#: Small cap so the demo shows CAP_EXCEEDED: 10 USDC in 6-decimal base units.
DEMO_CAP = 10_000_000
#: How long the state Redis is paused, seconds.
OUTAGE_S = 3.0


def _wait(what: str, predicate: Any, timeout_s: float, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"timed out waiting for {what}")
        time.sleep(every_s)


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory (WAL, logs) for inspection.")
def demo(keep: bool) -> None:
    """Run the end-to-end walk-through on private processes and check the invariants."""
    workdir = Path(tempfile.mkdtemp(prefix="billing-demo-"))
    try:
        ok = _run(workdir)
    finally:
        if keep:
            console.print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        raise SystemExit(1)


def _run(workdir: Path) -> bool:
    with Stack() as stack:
        own_state = "BILLING_REDIS_URL" not in os.environ
        state_redis = stack.add_redis(RedisProcess(workdir / "state-redis")) if own_state else None
        broker = None
        if "BILLING_BROKER_URL" not in os.environ:
            broker = stack.add_redis(RedisProcess(workdir / "broker-redis"))
        env = {
            "BILLING_ENV": os.environ.get("BILLING_ENV", "demo"),
            "BILLING_WAL_DIR": str(workdir / "wal"),
            "BILLING_PARTITIONS": "4",
            "BILLING_MAX_CREDIT_BALANCE": str(DEMO_CAP),
            "BILLING_REDIS_TIMEOUT_MS": "300",
            "BILLING_BREAKER_RESET_MS": "1000",
            "BILLING_METRICS_PORT": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
        }
        if state_redis is not None:
            env["BILLING_REDIS_URL"] = state_redis.url(0)
        if broker is not None:
            env["BILLING_BROKER_URL"] = broker.url(0)
            env["BILLING_RESULT_BACKEND"] = broker.url(1)
        (workdir / "metrics").mkdir()
        os.environ.update(env)
        child_env = dict(os.environ)

        from worker.settings import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        console.rule("billing-worker demo")
        console.print(f"state Redis  {redact_url(settings.redis_url)}{'  (private)' if own_state else ''}")
        console.print(f"broker       {redact_url(settings.broker_url)}")
        console.print(f"WAL          {settings.env_wal_dir}  ({settings.partitions} partitions)")

        from worker.app import app

        app.conf.update(broker_url=settings.broker_url, result_backend=settings.result_backend)
        stack.add_celery(
            CeleryProcess(worker_args(name="demo"), env=child_env, log_path=workdir / "worker.log")
        )
        stack.add_celery(
            CeleryProcess(
                ["beat", "-s", str(workdir / "beat-schedule"), "--loglevel", "WARNING"],
                env=child_env,
                log_path=workdir / "beat.log",
            )
        )
        _wait("the worker", lambda: bool(app.control.ping(timeout=0.5)), 60)
        console.print("worker and beat are up\n")

        from worker.samples import demo_stream

        first, second = demo_stream(cap=DEMO_CAP)
        results: list[dict[str, Any]] = []
        console.print(
            f"[bold]1.[/] sending {len(first)} entries (credits, no-credit, duplicates, a conflict, invalid, over-cap)"
        )
        results += _send_and_wait(app, first)
        if state_redis is not None:
            console.print(f"[bold]2.[/] pausing the state Redis (SIGSTOP) and sending {len(second)} more")
            state_redis.pause()
            try:
                during = _send_and_wait(app, second)
            finally:
                time.sleep(OUTAGE_S)
                state_redis.resume()
            deferred = sum(1 for r in during if r["status"] == "deferred")
            console.print(
                f"   {deferred} of {len(during)} answered [yellow]deferred[/]: recorded in the WAL with token 0"
            )
            results += during
            console.print(
                "[bold]3.[/] Redis is back; waiting for beat's billing.replay_pending to apply the backlog"
            )
        else:
            results += _send_and_wait(app, second)

        from worker.runtime import build_runtime

        runtime = build_runtime(settings)
        try:

            def drained() -> bool:
                return sum(runtime.pipeline.report_backlog().values()) == 0

            _wait("replay of the backlog", drained, 90, every_s=0.5)
            again = _send_and_wait(app, [dict(first[2]), dict(second[1])])
            console.print(f"[bold]4.[/] re-sent two entries after replay: {[r['status'] for r in again]}")
            results += again
            accepted = {r["entry_id"] for r in results if r["status"] != "rejected"}
            report = runtime.check_invariants(accepted)
        finally:
            runtime.close()

        _print_summary(results, report)
        return report.ok


def _send_and_wait(app: Any, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pending = [app.send_task("billing.process_entry", args=[p], queue="billing") for p in payloads]
    return [result.get(timeout=120) for result in pending]


def _print_summary(results: list[dict[str, Any]], report: Any) -> None:
    statuses = Counter(r["status"] for r in results)
    table = Table("status", "answers", title="what happened")
    for status in ("credited", "no_credit", "duplicate", "deferred", "cap_exceeded", "rejected"):
        table.add_row(status, str(statuses.get(status, 0)))
    console.print(table)
    outcomes = Table("WAL outcome", "entries", title="after replay")
    for name, count in sorted(report.outcomes.items()):
        outcomes.add_row(name, str(count))
    outcomes.add_row("pending", str(report.pending))
    console.print(outcomes)
    balances = Table("wallet", "balance (base units)", "USDC", title=f"balances (cap {DEMO_CAP})")
    for wallet, value in sorted(report.balances.items()):
        balances.add_row(wallet, str(value), f"{value // 1_000_000}.{value % 1_000_000:06d}")
    console.print(balances)
    console.print(
        f"entries recorded {report.entries}, lost {len(report.lost)}, applied twice {len(report.applied_twice)}, "
        f"rejected records {report.rejected_records}"
    )
    if report.ok:
        console.print(
            "[bold green]invariants hold[/]: nothing lost, nothing applied twice, balances match the WAL"
        )
    else:
        for problem in report.problems:
            console.print(f"[bold red]INVARIANT BROKEN[/] {problem}")
