"""``billing-worker wal verify | inspect | pending | rejected``: read-only WAL tools for operators.

Configured by the ``BILLING_*`` environment like the worker; each command acts on every
partition of ``BILLING_ENV`` unless given ``--partition N``. Nothing here writes to the WAL
(partitions are opened read-only, under shared locks; ``verify`` takes no lock at all).

Exit codes: 0 fine; 1 the WAL is damaged (``verify`` found a problem, or a partition refused
to open); 2 bad arguments or configuration, or no WAL directory (one line on stderr).
Register with ``cli.add_command(wal)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from worker.cli_support import OperatorError, settings_or_exit
from worker.errors import WalCorruption, WalError
from worker.settings import Settings
from worker.wal import (
    Partition,
    Record,
    partition_bytes,
    partition_dir_name,
    read_partition_count,
    verify_partition,
)

#: ``verify`` shows a progress bar on stderr when the WAL is at least this big (bytes).
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


def _partitions(settings: Settings, partition: int | None) -> list[int]:
    """The partition numbers to act on; exit 2 when the WAL or the partition does not exist."""
    env_dir = settings.env_wal_dir
    if not env_dir.is_dir():
        raise OperatorError(
            f"no WAL directory {env_dir} (BILLING_WAL_DIR={settings.wal_dir}, BILLING_ENV={settings.env})"
        )
    try:
        recorded = read_partition_count(env_dir)
    except WalCorruption as error:
        raise OperatorError(str(error)) from None
    count = settings.partitions
    if recorded is not None and recorded != count:
        raise OperatorError(
            f"BILLING_PARTITIONS: the WAL at {env_dir} records {recorded} partitions but "
            f"{count} were given; the partition count is fixed once used"
        )
    if partition is None:
        return list(range(count))
    if not 0 <= partition < count:
        raise OperatorError(f"--partition {partition}: not in 0..{count - 1}")
    return [partition]


def _label(number: int) -> str:
    return partition_dir_name(number)


partition_option = click.option(
    "--partition",
    "partition",
    type=int,
    default=None,
    metavar="N",
    help="Only partition N (default: every partition of BILLING_ENV).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


@click.group(name="wal")
def wal() -> None:
    """Check and read the write-ahead log of BILLING_ENV (read-only)."""


@wal.command()
@partition_option
@click.option(
    "--progress/--no-progress",
    default=None,
    help=f"Progress bar on stderr (default: when the WAL is >= {PROGRESS_MIN_BYTES >> 20} MiB).",
)
def verify(partition: int | None, progress: bool | None) -> None:
    """Check CRCs, framing, LSNs, checkpoints and rules; exit 1 naming file and offset if bad.

    A torn tail at the end of a newest segment is reported but not a failure (opening the
    partition truncates it; it is also what an append in flight looks like).
    """
    settings = settings_or_exit()
    numbers = _partitions(settings, partition)
    paths = {n: settings.env_wal_dir / _label(n) for n in numbers}
    total = sum(partition_bytes(path) for path in paths.values())
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    failed = False
    console = Console(stderr=True)
    with Progress(
        TextColumn("verify {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not show,
    ) as bar:
        task = bar.add_task("", total=total)
        for number, path in paths.items():
            bar.update(task, description=_label(number))
            report = verify_partition(path, progress=lambda n: bar.advance(task, n))
            for problem in report.problems:
                click.echo(f"{_label(number)}: {problem}")
            verdict = "ok" if report.ok else "FAILED"
            click.echo(
                f"{_label(number)}: {verdict}: {report.records} records, last LSN {report.last_lsn}, "
                f"{report.files} files, highest token {report.highest_token}, "
                f"{report.pending} pending, {len(report.problems)} problems"
            )
            failed = failed or not report.ok
    if failed:
        sys.exit(1)


@contextmanager
def _open(settings: Settings, number: int) -> Iterator[Partition]:
    path = settings.env_wal_dir / _label(number)
    if not path.is_dir():
        raise OperatorError(f"{_label(number)}: no partition directory {path}")
    try:
        handle = Partition.open(path, read_only=True, number=number)
    except WalCorruption as error:
        raise click.ClickException(
            f"{_label(number)}: {error} (run `billing-worker wal verify` for every problem)"
        ) from None
    except WalError as error:
        raise click.ClickException(f"{_label(number)}: {error}") from None
    with handle:
        yield handle


def _emit(number: int, records: Iterable[Record], as_json: bool, limit: int | None) -> int:
    shown = 0
    for record in records:
        if limit is not None and shown >= limit:
            break
        if as_json:
            click.echo(json.dumps({"partition": number, **record.as_dict()}, sort_keys=True))
        else:
            body = record.raw_body.decode("utf-8", "replace")
            click.echo(
                f"{_label(number)}\t{record.lsn}\t{record.type.name}\t{record.fencing_token}\t{record.entry_id}\t{body}"
            )
        shown += 1
    return shown


@wal.command()
@partition_option
@click.option("--from-lsn", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most this many records.")
@json_option
def inspect(partition: int | None, from_lsn: int, limit: int | None, as_json: bool) -> None:
    """Print records (partition, LSN, type, token, entry_id, body), tab-separated."""
    settings = settings_or_exit()
    for number in _partitions(settings, partition):
        with _open(settings, number) as handle:
            try:
                _emit(number, handle.records(from_lsn), as_json, limit)
            except WalCorruption as error:
                raise click.ClickException(f"{_label(number)}: {error}") from None


@wal.command()
@partition_option
@json_option
def pending(partition: int | None, as_json: bool) -> None:
    """Print ENTRY records that have no outcome yet (what replay will apply)."""
    settings = settings_or_exit()
    total = 0
    for number in _partitions(settings, partition):
        with _open(settings, number) as handle:
            total += _emit(number, handle.pending(), as_json, None)
    click.echo(f"{total} pending", err=True)


@wal.command()
@partition_option
@json_option
def rejected(partition: int | None, as_json: bool) -> None:
    """Print REJECTED records (raw payload and reason in the body)."""
    settings = settings_or_exit()
    total = 0
    for number in _partitions(settings, partition):
        with _open(settings, number) as handle:
            try:
                total += _emit(number, handle.rejected(), as_json, None)
            except WalCorruption as error:
                raise click.ClickException(f"{_label(number)}: {error}") from None
    click.echo(f"{total} rejected", err=True)
