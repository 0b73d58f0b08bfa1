"""Failure modes caused for real: Redis paused, killed, restarted empty; stale writers; CORRUPT.

Each scenario ends by checking the invariants (worker/invariants.py): every accepted entry is in
the WAL exactly once with one outcome, nothing pending, balances equal the WAL, no note twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from worker import keys
from worker.errors import RetryLater, StaleTokenError
from worker.fencing import FenceResult
from worker.models import parse_entry
from worker.runtime import Runtime, build_runtime, get_runtime, reset_runtime
from worker.samples import entry, sample_entries, wallet_address
from worker.settings import load_settings
from worker.wal import RecordType


def send_all(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from worker.app import app

    pending = [app.send_task("billing.process_entry", args=[p]) for p in payloads]
    return [r.get(timeout=60) for r in pending]


def due_by_wallet(payloads: list[dict[str, Any]]) -> Counter[str]:
    due: Counter[str] = Counter()
    for p in payloads:
        e = parse_entry(p)
        due[e.wallet] += e.credit_due
    return due


def assert_invariants(rt: Runtime, accepted: set[str]) -> Any:
    report = rt.check_invariants(accepted)
    assert report.problems == []
    assert report.lost == [] and report.applied_twice == [] and report.pending == 0
    return report


@pytest.fixture
def aof_redis(tmp_path: Path, billing_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A private state Redis with AOF (appendfsync always), wired in as BILLING_REDIS_URL."""
    server = RedisServer(tmp_path / "state-redis", appendonly=True).start()
    monkeypatch.setenv("BILLING_REDIS_URL", server.url)
    reset_runtime()
    yield server
    reset_runtime()
    server.stop()


@pytest.mark.usefixtures("celery_worker_inproc")
def test_redis_paused_then_killed_then_restarted_replays_exactly_once(aof_redis: RedisServer) -> None:
    before = sample_entries(20, wallets=6, prefix="before-")
    during_pause = sample_entries(15, wallets=6, seed=2, prefix="paused-")
    during_kill = sample_entries(15, wallets=6, seed=3, prefix="killed-")
    statuses = Counter(r["status"] for r in send_all(before))
    assert statuses["deferred"] == 0

    aof_redis.pause()
    paused = send_all(during_pause)
    aof_redis.resume()
    aof_redis.kill()
    killed = send_all(during_kill)
    assert {r["status"] for r in paused + killed} == {"deferred"}
    assert all(r["fencing_token"] == 0 for r in paused + killed)

    aof_redis.start()  # same data dir: the AOF brings back balances, notes and fences
    rt = get_runtime()
    assert sum(rt.pipeline.report_backlog().values()) == 30
    from worker.app import app

    # Leases taken by commands that reached the paused Redis survived in the AOF: replay waits
    # them out (beat would simply run again), so replay until the backlog is empty.
    applied: list[int] = []

    def replay_drained() -> bool:
        reports = app.send_task("billing.replay_pending").get(timeout=60)
        applied.append(sum(r["applied"] for r in reports))
        return sum(r["remaining"] for r in reports) == 0

    wait_until(replay_drained, timeout_s=30, what="replay to drain the backlog")
    assert sum(applied) == 30
    # a further replay finds nothing: exactly once
    assert sum(r["applied"] for r in app.send_task("billing.replay_pending").get(timeout=60)) == 0

    everything = before + during_pause + during_kill
    report = assert_invariants(rt, {p["entry_id"] for p in everything})
    assert report.balances == {w: v for w, v in due_by_wallet(everything).items() if v}
    again = send_all(during_kill[:3])
    assert {r["status"] for r in again} == {"duplicate"}


@pytest.mark.usefixtures("celery_worker_inproc")
def test_redis_restarted_empty_fences_recover_and_rebuild_restores_balances(aof_redis: RedisServer) -> None:
    from worker.rebuild import rebuild_partition

    first = sample_entries(30, wallets=5, prefix="old-")
    results = send_all(first)
    highest = max(r["fencing_token"] for r in results)
    aof_redis.restart(empty=True)

    later = sample_entries(10, wallets=5, seed=9, prefix="new-")
    after = send_all(later)
    assert {r["status"] for r in after} <= {"credited", "no_credit"}
    assert min(r["fencing_token"] for r in after) > 0
    rt = get_runtime()
    for r in after:  # each partition's next token is above what that partition's WAL holds
        partition = rt.store.partition(r["partition"])
        tokens = [rec.fencing_token for rec in partition.records() if rec.lsn < r["lsn"]]
        assert r["fencing_token"] > max(tokens, default=0)
    assert max(r["fencing_token"] for r in after) <= highest + 40
    assert send_all(first[:5]) and {r["status"] for r in send_all(first[:5])} == {"duplicate"}

    expected = {w: v for w, v in due_by_wallet(first + later).items() if v}
    assert {w: rt.ledger.balance(w) for w in expected} != expected  # Redis lost the old credit
    for n in range(rt.store.partition_count):
        rebuild_partition(
            n, rt.store.partition(n), state=rt.state, fencing=rt.fencing, ttl_s=rt.settings.credit_ttl_seconds
        )
    assert {w: rt.ledger.balance(w) for w in expected} == expected
    for n in range(rt.store.partition_count):  # idempotent
        rebuild_partition(
            n, rt.store.partition(n), state=rt.state, fencing=rt.fencing, ttl_s=rt.settings.credit_ttl_seconds
        )
    report = assert_invariants(rt, {p["entry_id"] for p in first + later})
    assert report.balances == expected
    assert 0 < aof_redis.client().ttl(keys.credit_balance(rt.settings.env, wallet_address(1))) <= 604_800


@pytest.mark.usefixtures("celery_worker_inproc")
def test_corrupt_watermark_fails_closed_keeps_the_message_and_repair_lets_it_through() -> None:
    from celery.result import AsyncResult

    from worker.app import app

    rt = get_runtime()
    payload = entry("kept-1", wallet_address(3), 500, 100)
    n = rt.store.partition_for_wallet(wallet_address(3))
    rt.state.client.set(keys.fence_watermark(rt.settings.env, n), "nan")
    async_result: AsyncResult[Any] = app.send_task("billing.process_entry", args=[payload])
    wait_until(lambda: async_result.state == "RETRY", timeout_s=30, what="the task to be retried")
    partition = rt.store.partition(n)
    with partition.locked():
        assert partition.lookup("kept-1") is None, "nothing may be appended while CORRUPT"
        assert list(partition.records()) == []
    assert rt.state.client.get(keys.fence_watermark(rt.settings.env, n)) == "nan"
    assert rt.ledger.balance(wallet_address(3)) == 0

    with partition.locked():
        floor = partition.highest_token
    rt.fencing.repair(n, floor=floor)
    result = async_result.get(timeout=30)
    assert result["status"] == "credited" and result["amount"] == "400"
    assert_invariants(rt, {"kept-1"})


def test_stale_writer_is_refused_by_the_cas_and_by_the_wal(billing_env: dict[str, str]) -> None:
    """Writer 1 validates, then stalls (a GC pause) past its lease; writer 2 takes over and writes.
    Writer 1 resumes: the CAS answers STALE, and its append is refused by the WAL's own check."""
    writer1, writer2 = build_runtime(load_settings()), build_runtime(load_settings())
    try:
        wallet = wallet_address(8)
        n = writer1.store.partition_for_wallet(wallet)
        part1, part2 = writer1.store.partition(n), writer2.store.partition(n)
        lease1 = writer1.fencing.acquire(n, floor=part1.highest_token)
        assert writer1.fencing.validate_and_advance(lease1) is FenceResult.OK
        # the lease expires while writer 1 is stalled (its local clock still thinks it holds it)
        writer1.state.client.delete(keys.lease_lock(writer1.settings.env, n))
        outcome = writer2.pipeline.process_entry(entry("x-1", wallet, 300, 100))
        assert outcome.status.value == "credited" and outcome.fencing_token > lease1.token

        assert writer1.fencing.validate_and_advance(lease1) is FenceResult.STALE
        body = parse_entry(entry("y-1", wallet, 300, 100)).canonical()
        with pytest.raises(StaleTokenError):
            part1.append(RecordType.ENTRY, lease1.token, "y-1", body)
        with part2.locked():
            assert part2.lookup("y-1") is None
        writer1.fencing.release(lease1)
        assert writer1.pipeline.process_entry(entry("x-1", wallet, 300, 100)).status.value == "duplicate"
        assert writer1.ledger.balance(wallet) == 200
    finally:
        writer1.close()
        writer2.close()


def test_stale_writer_inside_the_pipeline_is_retried_and_applied_once(billing_env: dict[str, str]) -> None:
    """The same race through Pipeline.process_entry: writer 1 is paused right after its OK."""
    writer1, writer2 = build_runtime(load_settings()), build_runtime(load_settings())
    wallet = wallet_address(9)
    resume, validated = threading.Event(), threading.Event()
    real_validate = writer1.fencing.validate_and_advance

    def validate_then_stall(lease: Any) -> FenceResult:
        answer = real_validate(lease)
        validated.set()
        assert resume.wait(30)
        return answer

    writer1.fencing.validate_and_advance = validate_then_stall  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run_writer1() -> None:
        try:
            writer1.pipeline.process_entry(entry("w1-entry", wallet, 1_000, 100))
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run_writer1)
    try:
        thread.start()
        assert validated.wait(30)
        n = writer2.store.partition_for_wallet(wallet)
        writer2.state.client.delete(keys.lease_lock(writer2.settings.env, n))  # lease expired
        assert writer2.pipeline.process_entry(entry("w2-entry", wallet, 1_000, 400)).status.value == "credited"
        resume.set()
        thread.join(30)
        assert len(errors) == 1 and isinstance(errors[0], RetryLater) and errors[0].kind == "stale"
        with writer2.store.partition(n).locked():
            assert writer2.store.partition(n).lookup("w1-entry") is None
        writer1.fencing.validate_and_advance = real_validate  # type: ignore[method-assign]
        retried = writer1.pipeline.process_entry(entry("w1-entry", wallet, 1_000, 100))
        assert retried.status.value == "credited"
        assert writer1.ledger.balance(wallet) == 900 + 600
        assert_invariants(writer1, {"w1-entry", "w2-entry"})
    finally:
        resume.set()
        thread.join(5)
        writer1.close()
        writer2.close()


def test_breaker_makes_an_outage_cheap_and_closes_by_itself(
    tmp_path: Path, billing_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "brk").start()
    monkeypatch.setenv("BILLING_REDIS_URL", server.url)
    monkeypatch.setenv("BILLING_REDIS_TIMEOUT_MS", "200")
    monkeypatch.setenv("BILLING_BREAKER_RESET_MS", "5000")
    now = [0.0]
    rt = build_runtime(load_settings(), clock=lambda: now[0])
    sent: list[object] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counting_send(self: redis.connection.AbstractConnection, command: Any, check_health: bool = True) -> None:
        # every write to this state Redis's socket: single calls, pipelines and connection
        # handshakes alike (other clients in this process, e.g. a result backend, not counted)
        if getattr(self, "port", None) == server.port:
            sent.append(command)
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting_send)
    try:
        payloads = sample_entries(200, wallets=20, prefix="brk-")
        server.pause()
        try:
            outcomes = [rt.pipeline.process_entry(p) for p in payloads]
        finally:
            server.resume()
        assert {o.status.value for o in outcomes} == {"deferred"}
        # only the calls before the breaker opened reached the socket: not one per entry
        assert 0 < len(sent) <= 2 * rt.settings.breaker_failures
        assert rt.breaker.state.value == "open"
        still_open = rt.pipeline.process_entry(entry("brk-early", wallet_address(1), 10, 1))
        assert still_open.status.value == "deferred" and len(sent) <= 2 * rt.settings.breaker_failures
        # it closes by itself: once the reset time has passed, the next entry probes and succeeds
        now[0] += 5.0
        assert rt.pipeline.process_entry(entry("brk-probe", wallet_address(1), 10, 1)).status.value == "credited"
        assert rt.breaker.state.value == "closed"
        assert sum(r.applied for r in rt.pipeline.replay_all()) == 201
        assert_invariants(rt, {p["entry_id"] for p in payloads} | {"brk-probe", "brk-early"})
    finally:
        rt.close()
        server.stop()


def test_apply_credit_concurrent_with_issuance_never_negative(billing_env: dict[str, str]) -> None:
    runtimes = [build_runtime(load_settings()) for _ in range(3)]
    wallet = wallet_address(4)
    issued = [entry(f"iss-{i}", wallet, 1_000, 1_000 - 10 * (i % 7 + 1)) for i in range(60)]
    requests = [{"request_id": f"use-{i}", "wallet": wallet, "required_amount": str(25 + i % 5)} for i in range(60)]

    def retrying(call: Callable[[], Any]) -> Any:
        while True:
            try:
                return call()
            except RetryLater:
                continue

    answers: dict[str, Any] = {}
    lock = threading.Lock()

    def issuer() -> None:
        for p in issued:
            retrying(lambda p=p: runtimes[0].pipeline.process_entry(p))

    def consumer(rt: Runtime, mine: list[dict[str, str]]) -> None:
        for r in mine:
            answer = retrying(lambda r=r: rt.pipeline.apply_credit(r))
            with lock:
                answers[r["request_id"]] = answer

    threads = [
        threading.Thread(target=issuer),
        threading.Thread(target=consumer, args=(runtimes[1], requests[0::2])),
        threading.Thread(target=consumer, args=(runtimes[2], requests[1::2])),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        used = sum(a.credit_used for a in answers.values())
        credited = sum(1_000 - int(p["actual_amount"]) for p in issued)
        balance = runtimes[0].ledger.balance(wallet)
        assert balance >= 0 and balance == credited - used
        assert all(
            a.remaining_credit >= 0 and a.credit_used + a.reduced_amount == a.required_amount for a in answers.values()
        )
        again = runtimes[1].pipeline.apply_credit(requests[0])
        assert again.status == "duplicate" and again.credit_used == answers["use-0"].credit_used
        assert runtimes[0].ledger.balance(wallet) == balance
        report = assert_invariants(runtimes[0], {p["entry_id"] for p in issued})
        assert report.balances[wallet] == balance
    finally:
        for rt in runtimes:
            rt.close()
