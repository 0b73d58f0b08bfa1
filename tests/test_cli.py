"""``billing-worker`` through click's CliRunner against a private Redis and a tmp WAL.

(The ``wal`` subcommands are tested with the WAL; ``demo`` in tests/test_demo.py.)
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.support.procs import set_cli_env, wait_until
from tests.support.redis_server import RedisServer
from worker import keys
from worker.errors import RetryLater
from worker.samples import entry, wallet_address

W = [wallet_address(n) for n in range(1, 9)]
ENV = "cli"


def run(*args: str, input: str | None = None) -> Result:
    from worker.cli import cli

    return CliRunner().invoke(cli, list(args), input=input)


def one_line(result: Result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def table_rows(output: str) -> list[list[str]]:
    """The body rows of a rich box table; a cell folded over several lines is joined back."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if rows and cells[0] == "":
            rows[-1] = [a + b for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


@pytest.fixture
def cli_env(tmp_path: Path, private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    return set_cli_env(monkeypatch, env_name=ENV, state_url=private_redis.url, wal_dir=tmp_path / "wal", partitions=4)


@pytest.fixture
def runtime(cli_env: dict[str, str]) -> Iterator[Any]:
    """This process's own pipeline on the same Redis and WAL (as a worker would be)."""
    from worker.runtime import build_runtime
    from worker.settings import load_settings

    built = build_runtime(load_settings())
    yield built
    built.close()


def credit_all(runtime: Any, payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        assert runtime.pipeline.process_entry(payload).status.value in {"credited", "no_credit"}


def invariants_hold(runtime: Any, entry_ids: set[str]) -> dict[str, int]:

    report = runtime.check_invariants(entry_ids)
    assert report.ok, report.problems
    return report.balances


# --- fence ----------------------------------------------------------------------------------------------


def test_fence_show_lists_holder_counter_watermark_and_wal_highest_token(
    runtime: Any, private_redis: RedisServer
) -> None:
    credit_all(runtime, [entry(f"f-{i}", W[i % len(W)], 1_000, 10 * i) for i in range(12)])
    holder = "f" * 32
    private_redis.client().set(keys.lease_lock(ENV, 1), holder, px=60_000)

    result = run("fence", "show")
    assert result.exit_code == 0, result.output
    for header in ("partition", "lease holder", "counter", "watermark", "WAL highest", "pending"):
        assert header in result.output
    rows = table_rows(result.output)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    for number, shown_holder, counter, watermark, highest, pending in rows:
        wal_highest = runtime.store.partition(int(number)).highest_token
        assert wal_highest >= 1  # twelve entries over eight wallets reached every partition
        assert (counter, watermark, highest, pending) == (f"'{wal_highest}'", f"'{wal_highest}'", str(wal_highest), "0")
        assert shown_holder == (holder if number == "1" else "-")  # the whole id, not cut short

    only = run("fence", "show", "--partition", "2")
    assert only.exit_code == 0 and [row[0] for row in table_rows(only.output)] == ["2"]


def test_fence_repair_lifts_a_nan_watermark_above_the_wal(runtime: Any, private_redis: RedisServer) -> None:
    n = runtime.store.partition_for_wallet(W[0])
    credit_all(runtime, [entry(f"r-{i}", W[0], 500, 100) for i in range(3)])
    highest = runtime.store.partition(n).highest_token
    assert highest >= 3
    redis_client = private_redis.client()
    redis_client.set(keys.fence_watermark(ENV, n), "nan")
    shown = table_rows(run("fence", "show", "--partition", str(n)).output)
    assert shown[0][3] == "'nan'"
    with pytest.raises(RetryLater) as corrupt:  # fails closed: nothing written
        runtime.pipeline.process_entry(entry("r-after", W[0], 500, 100))
    assert corrupt.value.kind == "corrupt"

    declined = run("fence", "repair", "--partition", str(n), input="n\n")
    assert declined.exit_code == 1 and redis_client.get(keys.fence_watermark(ENV, n)) == "nan"

    repaired = run("fence", "repair", "--partition", str(n), "--yes")
    assert repaired.exit_code == 0, repaired.output
    value = int(redis_client.get(keys.fence_watermark(ENV, n)) or "0")
    assert value > highest
    assert redis_client.get(keys.fence_counter(ENV, n)) == str(value)
    assert f"partition {n}: watermark and counter set to {value} (WAL highest token {highest})" in repaired.output
    assert table_rows(run("fence", "show", "--partition", str(n)).output)[0][2:5] == [
        f"'{value}'",
        f"'{value}'",
        str(highest),
    ]
    after = runtime.pipeline.process_entry(entry("r-after", W[0], 500, 100))
    assert after.status.value == "credited" and after.fencing_token > value
    invariants_hold(runtime, {"r-0", "r-1", "r-2", "r-after"})


# --- balance, replay, rebuild ----------------------------------------------------------------------------


def test_balance_of_a_wallet(runtime: Any) -> None:
    credit_all(runtime, [entry("b-1", W[2], 1_000, 250), entry("b-2", W[2], 100, 0)])
    result = run("balance", "0x" + W[2][2:].upper())  # any case, shown normalised
    assert (result.exit_code, result.output.split()) == (0, [W[2], "850"])
    assert run("balance", W[3]).output.split() == [W[3], "0"]


@pytest.mark.parametrize("wallet", ["0x1234", "not-a-wallet", "0X" + "a" * 40, "0x" + "g" * 40])
def test_bad_wallet_is_one_line_exit_2(cli_env: dict[str, str], wallet: str) -> None:
    result = run("balance", wallet)
    assert result.exit_code == 2
    assert one_line(result) == "Error: WALLET: must be 0x followed by 40 hex digits"


def test_replay_applies_entries_deferred_while_redis_was_down(runtime: Any, private_redis: RedisServer) -> None:
    payloads = [entry(f"d-{i}", W[i], 2_000, 700 * i) for i in range(4)]  # the last one: no credit
    private_redis.kill()
    for payload in payloads:
        outcome = runtime.pipeline.process_entry(payload)
        assert (outcome.status.value, outcome.fencing_token) == ("deferred", 0)
    assert sum(p.pending_count for p in runtime.store) == 4
    private_redis.start()

    result = run("replay")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.output)
    assert sum(int(row[1]) for row in rows) == 4 and all(row[2] == "0" for row in rows)
    assert sum(p.pending_count for p in runtime.store) == 0
    balances = invariants_hold(runtime, {p["entry_id"] for p in payloads})
    assert balances == {W[0]: 2_000, W[1]: 1_300, W[2]: 600}
    assert run("balance", W[1]).output.split() == [W[1], "1300"]
    again = run("replay")
    assert sum(int(row[1]) for row in table_rows(again.output)) == 0


def test_rebuild_restores_balances_after_flushall(runtime: Any, private_redis: RedisServer) -> None:
    payloads = [entry(f"rb-{i}", W[i % 5], 10_000, 37 * i) for i in range(15)]
    credit_all(runtime, payloads)
    spent = runtime.pipeline.apply_credit({"request_id": "use-1", "wallet": W[0], "required_amount": "1234"})
    assert spent.credit_used == 1_234
    before = {w: runtime.ledger.balance(w) for w in W[:5]}
    assert all(before.values())
    private_redis.client().flushall()
    assert run("balance", W[0]).output.split() == [W[0], "0"]

    result = run("rebuild")
    assert result.exit_code == 0, result.output
    assert sum(int(row[2]) for row in table_rows(result.output)) == 15  # notes
    assert {w: runtime.ledger.balance(w) for w in W[:5]} == before
    invariants_hold(runtime, {p["entry_id"] for p in payloads})
    # The restored notes keep idempotency: re-sending an entry does not credit again.
    assert runtime.pipeline.process_entry(payloads[3]).status.value == "duplicate"
    assert run("rebuild").exit_code == 0  # idempotent
    assert {w: runtime.ledger.balance(w) for w in W[:5]} == before


def test_rebuild_goes_on_past_a_busy_partition_and_names_it(runtime: Any, private_redis: RedisServer) -> None:
    payloads = [entry(f"rbb-{i}", W[i % 8], 1_000, i) for i in range(24)]
    credit_all(runtime, payloads)
    before = {w: runtime.ledger.balance(w) for w in W}
    busy = runtime.store.partition_for_wallet(W[0])
    private_redis.client().flushall()
    private_redis.client().set(keys.lease_lock(ENV, busy), "another-writer", px=60_000)
    result = run("rebuild")
    assert result.exit_code == 1, result.output
    rows = {int(row[0]): row for row in table_rows(result.output)}
    assert set(rows) == set(range(4)) and rows[busy][5].startswith("skipped (busy")
    assert f"partitions {busy} not rebuilt" in result.output
    for wallet in W:  # every other partition was rebuilt, the busy one left alone
        expected = 0 if runtime.store.partition_for_wallet(wallet) == busy else before[wallet]
        assert runtime.ledger.balance(wallet) == expected
    private_redis.client().delete(keys.lease_lock(ENV, busy))
    assert run("rebuild", "--partition", str(busy)).exit_code == 0
    assert {w: runtime.ledger.balance(w) for w in W} == before


# --- operator errors: one line, exit code 2 ------------------------------------------------------------

PARTITION_COMMANDS = [
    ["fence", "show"],
    ["fence", "repair", "--yes"],
    ["replay"],
    ["rebuild"],
]


@pytest.mark.parametrize("command", PARTITION_COMMANDS)
@pytest.mark.parametrize("partition", ["99", "4", "-1", "x"])
def test_partition_out_of_range_is_exit_2(runtime: Any, command: list[str], partition: str) -> None:
    result = run(*command, "--partition", partition)
    assert result.exit_code == 2, result.output
    assert "--partition" in result.output


@pytest.mark.parametrize("command", [*PARTITION_COMMANDS])
def test_missing_wal_dir_is_one_line_exit_2(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("BILLING_WAL_DIR", str(tmp_path / "no-such-wal"))
    result = run(*command)
    assert result.exit_code == 2
    assert one_line(result) == f"Error: no WAL for BILLING_ENV={ENV} under {tmp_path / 'no-such-wal'} (BILLING_WAL_DIR)"
    assert not (tmp_path / "no-such-wal").exists()  # looking does not create it


@pytest.mark.parametrize("command", [*PARTITION_COMMANDS, ["balance", W[0]]])
def test_redis_unreachable_is_one_line_exit_2(runtime: Any, private_redis: RedisServer, command: list[str]) -> None:
    private_redis.kill()
    result = run(*command)
    assert result.exit_code == 2, result.output
    line = one_line(result)
    assert line.startswith(f"Error: state Redis unreachable (redis://127.0.0.1:{private_redis.port}/0: ")
    assert line.endswith("check BILLING_REDIS_URL")


def test_partition_count_mismatch_is_one_line_exit_2(runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PARTITIONS", "8")
    result = run("fence", "show")
    assert result.exit_code == 2
    assert "BILLING_PARTITIONS" in one_line(result)


def test_bad_setting_is_one_line_exit_2(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_LEASE_TTL_MS", "soon")
    result = run("fence", "show")
    assert result.exit_code == 2
    assert one_line(result).startswith("Error: BILLING_LEASE_TTL_MS: ")


# --- enqueue (a real in-process worker) ------------------------------------------------------------------


@pytest.fixture
def worker_results_collected(celery_worker_inproc: object) -> Iterator[None]:
    """``enqueue`` leaves AsyncResult objects in reference cycles; collected after the session's
    broker stopped, each one's ``__del__`` retries the result store for seconds. Collect them
    while it still runs."""
    yield
    gc.collect()


def status_counts(output: str) -> dict[str, int]:
    return {row[0]: int(row[1]) for row in table_rows(output)}


@pytest.mark.usefixtures("worker_results_collected")
def test_enqueue_sample_then_again_as_duplicates() -> None:
    from worker.samples import sample_entries

    result = run("enqueue", "--sample", "20")
    assert result.exit_code == 0, result.output
    assert "sent 20 entries" in result.output
    expected_credited = sum(1 for p in sample_entries(20) if int(p["quoted_amount"]) > int(p["actual_amount"]))
    assert status_counts(result.output) == {"credited": expected_credited, "no_credit": 20 - expected_credited}
    again = run("enqueue", "--sample", "20")
    assert status_counts(again.output) == {"duplicate": 20}


@pytest.mark.usefixtures("worker_results_collected")
@pytest.mark.parametrize("form", ["jsonl", "array"])
def test_enqueue_file(tmp_path: Path, form: str) -> None:
    payloads = [
        entry("file-1", W[0], 1_000, 1),
        entry("file-2", W[1], 5, 5),
        {**entry("file-3", W[2], 10, 1), "quoted_amount": 1.5},
        entry("file-1", W[0], 1_000, 1),  # solo pool, in order: the re-delivery is a duplicate
    ]
    path = tmp_path / f"entries.{form}"
    if form == "jsonl":
        path.write_text("\n".join(json.dumps(p) for p in payloads) + "\n\n")
    else:
        path.write_text(json.dumps(payloads, indent=2))
    result = run("enqueue", str(path))
    assert result.exit_code == 0, result.output
    assert status_counts(result.output) == {"credited": 1, "no_credit": 1, "rejected": 1, "duplicate": 1}
    assert run("balance", W[0]).output.split() == [W[0], "999"]


def test_enqueue_bad_input_is_exit_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(entry("ok", W[0], 2, 1)) + "\n{not json\n")
    broken = run("enqueue", str(path))
    assert broken.exit_code == 2
    assert one_line(broken).startswith(f"Error: {path}:2: not JSON (")
    both = run("enqueue", str(path), "--sample", "3")
    assert both.exit_code == 2 and "give either FILE or --sample N" in both.output
    neither = run("enqueue")
    assert neither.exit_code == 2 and "give either FILE or --sample N" in neither.output
    assert run("enqueue", "--sample", "0").exit_code == 2
    assert run("enqueue", str(tmp_path / "missing.jsonl")).exit_code == 2


def test_enqueue_resends_the_entries_a_broker_dropped(billing_env: dict[str, str], broker_redis: RedisServer) -> None:
    """No worker yet, so the messages wait in the broker; there they are dropped (as kombu's Redis
    transport can drop one on a whole-worker SIGKILL). Then a worker starts: enqueue's next round
    sends the entries again, and each is applied exactly once."""
    from celery.contrib.testing.worker import start_worker

    from worker.app import app
    from worker.runtime import get_runtime
    from worker.samples import sample_entries

    outcome: dict[str, Result] = {}
    upstream = threading.Thread(
        target=lambda: outcome.update(result=run("enqueue", "--sample", "6", "--timeout", "5", "--resend", "3"))
    )
    upstream.start()
    broker = broker_redis.client(0)
    wait_until(lambda: broker.llen("billing") == 6, timeout_s=30, what="6 messages in the broker")
    assert broker.delete("billing") == 1  # the broker lost them
    with start_worker(app, pool="solo", queues=["billing"], perform_ping_check=False, loglevel="WARNING"):
        upstream.join(timeout=90)
    assert not upstream.is_alive()
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    assert "re-sent 6 entries" in result.output or "re-sent 12 entries" in result.output
    counts = status_counts(result.output)
    assert sum(counts.values()) == 6 and set(counts) <= {"credited", "no_credit", "duplicate"}
    rt = get_runtime()
    expected = {p["entry_id"] for p in sample_entries(6)}
    report = rt.check_invariants(expected)
    assert report.problems == [] and report.entries == 6 and report.pending == 0
    gc.collect()
