"""Pipeline.process_batch: one lease, one fsync per record kind and one pipelined credit round
trip per partition, with every guarantee of the single path (which is a batch of one)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import RedisServer
from worker import keys
from worker.errors import RetryLater
from worker.pipeline import Outcome
from worker.runtime import Runtime, build_runtime
from worker.samples import entry, sample_entries, wallet_address
from worker.settings import load_settings


@pytest.fixture
def rt(billing_env: dict[str, str]) -> Iterator[Runtime]:
    runtime = build_runtime(load_settings())
    yield runtime
    runtime.close()


def statuses(results: list[Outcome | RetryLater]) -> Counter[str]:
    return Counter(r.kind if isinstance(r, RetryLater) else r.status.value for r in results)


def test_mixed_batch_in_input_order_with_in_batch_repeats_and_conflicts(rt: Runtime) -> None:
    originals = sample_entries(200, wallets=20, prefix="b-")
    repeats = [dict(p) for p in originals[:20]]
    conflicts = [dict(p, actual_amount=int(p["actual_amount"]) + 1) for p in originals[20:25]]
    invalid: list[Any] = [{"entry_id": "bad"}, 7, {**originals[30], "quoted_amount": 1.5}]
    batch = originals + repeats + conflicts + invalid
    results = rt.pipeline.process_batch(batch)
    assert len(results) == len(batch)
    counts = statuses(results)
    assert counts["duplicate"] == 20 and counts["rejected"] == 5 + 3
    assert counts["credited"] + counts["no_credit"] == 200
    for payload, result in zip(batch[:200], results[:200], strict=True):
        assert isinstance(result, Outcome) and result.entry_id == payload["entry_id"]
    for original, repeat in zip(results[:20], results[200:220], strict=True):
        assert isinstance(original, Outcome) and isinstance(repeat, Outcome)
        assert (repeat.lsn, repeat.amount, repeat.credit_note_id) == (
            original.lsn,
            original.amount,
            original.credit_note_id,
        )
    report = rt.check_invariants({p["entry_id"] for p in originals})
    assert report.problems == [] and report.entries == 200 and report.rejected_records == 8


def test_one_token_and_one_write_per_record_kind_per_partition(rt: Runtime) -> None:
    wallet = wallet_address(5)
    results = rt.pipeline.process_batch([entry(f"one-{i}", wallet, 100, i) for i in range(50)])
    tokens = {r.fencing_token for r in results if isinstance(r, Outcome)}
    assert len(tokens) == 1, "one lease, one token for the whole partition group"
    n = rt.store.partition_for_wallet(wallet)
    records = list(rt.store.partition(n).records())
    assert [r.type.name for r in records] == ["ENTRY"] * 50 + ["APPLIED"] * 50
    assert rt.ledger.balance(wallet) == sum(100 - i for i in range(50))


def test_busy_partition_retries_only_its_own_entries(rt: Runtime) -> None:
    w_busy, w_free = wallet_address(1), wallet_address(2)
    n_busy, n_free = rt.store.partition_for_wallet(w_busy), rt.store.partition_for_wallet(w_free)
    assert n_busy != n_free
    rt.state.client.set(keys.lease_lock(rt.settings.env, n_busy), "another-writer", px=60_000)
    results = rt.pipeline.process_batch([entry("busy-1", w_busy, 10, 1), entry("free-1", w_free, 10, 1)])
    assert isinstance(results[0], RetryLater) and results[0].kind == "busy"
    assert isinstance(results[1], Outcome) and results[1].status.value == "credited"
    with rt.store.partition(n_busy).locked():
        assert rt.store.partition(n_busy).lookup("busy-1") is None


def test_batch_fails_open_when_redis_is_down_and_replay_completes_it(
    tmp_path: Path, billing_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "down").start()
    monkeypatch.setenv("BILLING_REDIS_URL", server.url)
    runtime = build_runtime(load_settings())
    try:
        payloads = sample_entries(60, wallets=10, prefix="down-")
        server.kill()
        results = runtime.pipeline.process_batch(payloads + payloads[:5])
        assert statuses(results) == Counter({"deferred": 65})
        assert {r.fencing_token for r in results if isinstance(r, Outcome)} == {0}
        server.start()
        applied: list[int] = []

        def drained() -> bool:  # the breaker may still be open for its reset time: replay again
            reports = runtime.pipeline.replay_all()
            applied.append(sum(r.applied for r in reports))
            return sum(r.remaining for r in reports) == 0

        deadline = time.monotonic() + 30
        while not drained():
            assert time.monotonic() < deadline, "replay did not drain the backlog"
            time.sleep(0.05)
        assert sum(applied) == 60
        again = runtime.pipeline.process_batch(payloads[:10])
        assert statuses(again) == Counter({"duplicate": 10})
        report = runtime.check_invariants({p["entry_id"] for p in payloads})
        assert report.problems == []
    finally:
        runtime.close()
        server.stop()
