"""``billing-worker``: the operator's command line (DESIGN.md §8).

Configured by the same ``BILLING_*`` environment as the worker. Commands that act on partitions
act on every partition of ``BILLING_ENV`` unless given ``--partition N``. Errors an operator can
fix (bad setting, Redis unreachable, missing WAL) end with one line and exit code 2.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from worker.cli_support import OperatorError, settings_or_exit
from worker.cli_wal import wal
from worker.demo import demo
from worker.errors import BillingError, RedisUnavailable, RetryLater
from worker.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
err_console = Console(stderr=True)


def operator_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's errors into one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except RedisUnavailable as error:
            raise OperatorError(f"state Redis unreachable ({error}); check BILLING_REDIS_URL") from None
        except BillingError as error:
            raise OperatorError(str(error)) from None

    return wrapper


def partitions_of(settings: Settings, partition: int | None) -> list[int]:
    if partition is None:
        return list(range(settings.partitions))
    if not 0 <= partition < settings.partitions:
        raise click.BadParameter(
            f"must be in [0, {settings.partitions - 1}] (BILLING_PARTITIONS={settings.partitions})",
            param_hint="--partition",
        )
    return [partition]


partition_option = click.option(
    "--partition", "-p", type=int, default=None, help="Only this partition (default: all of BILLING_ENV)."
)


def runtime_or_exit(settings: Settings, *, create: bool = False) -> Any:
    """The runtime of the current command, closed (Redis connections, WAL files) when it ends."""
    from worker.runtime import build_runtime

    if not create and not settings.env_wal_dir.is_dir():
        raise OperatorError(
            f"no WAL for BILLING_ENV={settings.env} under {settings.wal_dir} (BILLING_WAL_DIR)"
        )
    runtime = build_runtime(settings)
    click.get_current_context().call_on_close(runtime.close)
    return runtime


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="billing-worker")
def cli() -> None:
    """Fenced, write-ahead-logged billing worker: operate and inspect it."""


# --- fence -------------------------------------------------------------------------------------


@cli.group()
def fence() -> None:
    """Writer leases and fencing watermarks in Redis."""


@fence.command("show")
@partition_option
@operator_errors
def fence_show(partition: int | None) -> None:
    """Lease holder, token counter, watermark and WAL highest token per partition."""
    settings = settings_or_exit()
    runtime = runtime_or_exit(settings)
    table = Table("partition", "lease holder", "counter", "watermark", "WAL highest token", "pending")
    table.columns[1].overflow = "fold"  # a holder id is 32 hex digits: never cut it short
    for n in partitions_of(settings, partition):
        raw = runtime.fencing.show(n)
        wal = runtime.store.partition(n)
        with wal.locked():
            highest, pending = wal.highest_token, wal.pending_count
        table.add_row(
            str(n),
            raw["holder"] or "-",
            repr(raw["counter"]),
            repr(raw["watermark"]),
            str(highest),
            str(pending),
        )
    console.print(table)


@fence.command("repair")
@partition_option
@click.confirmation_option(prompt="Set counter and watermark above the WAL's highest token?")
@operator_errors
def fence_repair(partition: int | None) -> None:
    """Set counter and watermark to a canonical value above the WAL's highest token (CORRUPT fix)."""
    settings = settings_or_exit()
    runtime = runtime_or_exit(settings)
    for n in partitions_of(settings, partition):
        wal = runtime.store.partition(n)
        with wal.locked():
            floor = wal.highest_token
        value = runtime.fencing.repair(n, floor=floor)
        console.print(f"partition {n}: watermark and counter set to {value} (WAL highest token {floor})")


# --- credit ------------------------------------------------------------------------------------


@cli.command()
@click.argument("wallet")
@operator_errors
def balance(wallet: str) -> None:
    """A wallet's credit balance in base units."""
    from worker.models import normalise_wallet

    settings = settings_or_exit()
    try:
        normalised = normalise_wallet(wallet)
    except ValueError as error:
        raise OperatorError(f"WALLET: {error}") from None
    from worker.credit import CreditLedger
    from worker.state_redis import StateRedis

    state = StateRedis.from_settings(settings)
    click.get_current_context().call_on_close(state.close)
    ledger = CreditLedger(
        state, env=settings.env, cap=settings.max_credit_balance, ttl_s=settings.credit_ttl_seconds
    )
    console.print(f"{normalised} {ledger.balance(normalised)}")


@cli.command()
@partition_option
@operator_errors
def replay(partition: int | None) -> None:
    """Apply pending (deferred) WAL entries now, as beat's billing.replay_pending does."""
    settings = settings_or_exit()
    runtime = runtime_or_exit(settings)
    parts = partitions_of(settings, partition)
    # Replay swallows an outage per partition (it is a beat task); an operator must hear of it.
    runtime.state.call(runtime.state.client.ping)
    table = Table("partition", "applied", "still pending", "note")
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("replaying", total=len(parts))
        for n in parts:
            report = runtime.pipeline.replay_partition(n)
            table.add_row(str(n), str(report.applied), str(report.remaining), report.skipped_reason or "")
            progress.advance(task)
    console.print(table)


@cli.command()
@partition_option
@operator_errors
def rebuild(partition: int | None) -> None:
    """Re-derive Redis credit balances, notes and markers from the WAL (after Redis lost data)."""
    from worker.rebuild import rebuild_partition

    settings = settings_or_exit()
    runtime = runtime_or_exit(settings)
    parts = partitions_of(settings, partition)
    table = Table("partition", "wallets", "notes", "consumptions", "credit total", "note")
    skipped: list[int] = []
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("rebuilding", total=len(parts))
        for n in parts:
            try:
                report = rebuild_partition(
                    n,
                    runtime.store.partition(n),
                    state=runtime.state,
                    fencing=runtime.fencing,
                    ttl_s=settings.credit_ttl_seconds,
                )
            except RetryLater as later:  # a writer holds it, or its fence is not OK: go on, say so
                skipped.append(n)
                table.add_row(str(n), "-", "-", "-", "-", f"skipped ({later})")
            else:
                table.add_row(
                    str(n), str(report.wallets), str(report.notes), str(report.uses), str(report.balance_total), ""
                )
            progress.advance(task)
    console.print(table)
    if skipped:
        listed = ", ".join(map(str, skipped))
        err_console.print(f"[red]partitions {listed} not rebuilt[/red]: run `billing-worker rebuild` again for them")
        raise SystemExit(1)


# --- enqueue -----------------------------------------------------------------------------------


def _read_payloads(path: Path) -> Iterator[Any]:
    """JSON Lines, or one JSON array."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from json.loads(stripped)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise OperatorError(f"{path}:{number}: not JSON ({error.msg})") from None


@cli.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Send N generated sample entries.")
@click.option("--wait/--no-wait", default=True, help="Wait for and summarise the results.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=120.0,
    show_default=True,
    help="Seconds to wait for the results of one sending round.",
)
@click.option(
    "--resend",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Rounds of re-sending entries that got no result (same entry: safe, at most a duplicate).",
)
@operator_errors
def enqueue(file: Path | None, sample: int | None, wait: bool, timeout: float, resend: int) -> None:
    """Act as an upstream service: send billing.process_entry tasks from FILE or --sample N.

    An entry whose result does not come within --timeout is sent again, as upstream should: a
    broker can drop a message (README: "Broker choice"), and the same entry_id is never applied
    twice. Exit code 1 when some entries still have no result after the last round.
    """
    from collections import Counter

    from worker.app import app
    from worker.samples import sample_entries

    if (file is None) == (sample is None):
        raise click.UsageError("give either FILE or --sample N")
    payloads = list(_read_payloads(file)) if file is not None else sample_entries(sample or 0)

    def send(indexes: list[int]) -> dict[int, Any]:
        return {i: app.send_task("billing.process_entry", args=[payloads[i]], queue="billing") for i in indexes}

    waiting = send(list(range(len(payloads))))
    err_console.print(f"sent {len(payloads)} entries")
    if not wait:
        return
    counts: Counter[str] = Counter()
    resent = 0
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("waiting for results", total=len(payloads))
        for round_no in range(resend + 1):
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                ready = [i for i, result in waiting.items() if result.ready()]
                for i in ready:
                    counts[waiting.pop(i).get(timeout=10)["status"]] += 1
                progress.update(task, completed=len(payloads) - len(waiting))
                if waiting and not ready:
                    time.sleep(0.05)
            if not waiting or round_no == resend:
                break
            resent += len(waiting)
            err_console.print(f"no result within {timeout:g} s for {len(waiting)} entries: sending them again")
            waiting = send(sorted(waiting))
    table = Table("status", "entries")
    for status, count in sorted(counts.items()):
        table.add_row(status, str(count))
    console.print(table)
    if resent:
        err_console.print(f"re-sent {resent} entries")
    if waiting:
        missing = ", ".join(str(payloads[i].get("entry_id", i)) for i in sorted(waiting)[:20])
        err_console.print(f"[red]{len(waiting)} entries have no result[/red] after {resend + 1} rounds: {missing}")
        raise SystemExit(1)


cli.add_command(wal)
cli.add_command(demo)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="billing-worker")


if __name__ == "__main__":  # pragma: no cover
    main()
