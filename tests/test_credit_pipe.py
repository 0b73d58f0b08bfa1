"""The packed credit pipeline (worker/redis_pipe.py, CreditLedger.issue_many/start_issue) and the
overlapped replay, against real redis-servers: same answers as the per-call EVALSHA path, NOSCRIPT
recovery, a connection always back in step, and a Redis killed mid-pipeline never credits twice."""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import make_state
from tests.support.redis_server import RedisServer
from worker import keys
from worker.credit import CreditLedger, CreditOutcome, CreditResult
from worker.errors import ScriptError
from worker.models import parse_entry
from worker.redis_pipe import evalsha_many
from worker.runtime import Runtime, build_runtime
from worker.samples import entry, sample_entries, wallet_address
from worker.settings import Settings
from worker.state_redis import StateRedis
from worker.wal import RecordType

W_OK, W_CAP, W_BAD = wallet_address(1), wallet_address(2), wallet_address(3)


def request(entry_id: str, wallet: str, quoted: int, actual: int) -> dict[str, Any]:
    return {"entry_id": entry_id, "wallet": wallet, "quote_id": "q-" + entry_id, "quoted": quoted, "actual": actual}


#: One of every outcome: APPLIED, NO_CREDIT, DUPLICATE (same entry again, same batch),
#: APPLIED up to the cap exactly, CAP_EXCEEDED, CORRUPT (balance "nan").
MIXED = [
    request("a1", W_OK, 900, 400),
    request("a2", W_OK, 100, 100),
    request("a3", W_OK, 100, 250),
    request("a1", W_OK, 900, 400),
    request("c1", W_CAP, 700, 0),
    request("c2", W_CAP, 400, 0),
    request("c3", W_CAP, 300, 0),
    request("c4", W_CAP, 1, 0),
    request("n1", W_BAD, 10, 1),
    request("a4", W_OK, 5, 0),
]


def per_call(ledger: CreditLedger, requests: list[dict[str, Any]]) -> list[CreditResult]:
    """The per-call path: one redis-py ``Script`` EVALSHA per request."""
    return [
        ledger.issue_for_entry(
            entry_id=r["entry_id"], wallet=r["wallet"], quote_id=r["quote_id"], quoted=r["quoted"], actual=r["actual"]
        )
        for r in requests
    ]


def stored(state: StateRedis, env: str) -> dict[str, Any]:
    """Every credit key of ``env``: its value and whether it expires within the ledger's TTL, the
    env name taken out (to compare envs)."""
    out = {}
    for key in state.client.scan_iter(f"x402:credit:{{{env}:*"):
        out[key.replace(f"{{{env}:", "{ENV:")] = (state.client.get(key), 0 < state.client.ttl(key) <= 1_000)
    return out


def test_packed_results_equal_the_per_call_path(state: StateRedis) -> None:
    envs = ("pipe-old", "pipe-new")
    for env in envs:
        state.client.set(keys.credit_balance(env, W_BAD), "nan")
    old = CreditLedger(state, env=envs[0], cap=1_000, ttl_s=1_000)
    new = CreditLedger(state, env=envs[1], cap=1_000, ttl_s=1_000)

    expected = per_call(old, MIXED)
    got = new.issue_many(MIXED)
    assert got == expected
    assert [r.outcome for r in got] == [
        CreditOutcome.APPLIED,
        CreditOutcome.NO_CREDIT,
        CreditOutcome.NO_CREDIT,
        CreditOutcome.DUPLICATE,
        CreditOutcome.APPLIED,
        CreditOutcome.CAP_EXCEEDED,
        CreditOutcome.APPLIED,
        CreditOutcome.CAP_EXCEEDED,
        CreditOutcome.CORRUPT,
        CreditOutcome.APPLIED,
    ]
    assert (got[6].balance, got[7].balance, got[8].raw, got[9].balance) == (1_000, 1_000, "nan", 505)
    # a retry of the whole batch: DUPLICATE where applied, CAP_EXCEEDED stays terminal
    assert new.issue_many(MIXED) == per_call(old, MIXED)
    # the same keys, byte-identical notes (json.dumps(note, sort_keys=True)) and balances
    assert stored(state, envs[1]) == stored(state, envs[0])
    assert len(stored(state, envs[1])) == 2 + 4 + 1  # 2 balances and 4 notes with TTL, the "nan"


def test_note_json_is_json_dumps_for_any_text(ledger: CreditLedger, state: StateRedis, env_name: str) -> None:
    odd = 'e"\\\u00e9\u2603\n\x01/'
    ledger.issue_many([request(odd, W_OK, 10, 3)])
    note = {"id": "cn_" + odd, "entry_id": odd, "wallet": W_OK, "quote_id": "q-" + odd, "amount": "7"}
    assert state.client.get(keys.credit_note(env_name, W_OK, "cn_" + odd)) == json.dumps(note, sort_keys=True)


def test_noscript_after_script_flush_recovers(ledger: CreditLedger, state: StateRedis) -> None:
    first = ledger.issue_many([request(f"f{i}", W_OK, 10, 9) for i in range(5)])
    assert {r.outcome for r in first} == {CreditOutcome.APPLIED}
    state.client.script_flush()
    again = ledger.issue_many([request(f"f{i}", W_OK, 10, 9) for i in range(8)])
    assert [r.outcome for r in again] == [CreditOutcome.DUPLICATE] * 5 + [CreditOutcome.APPLIED] * 3
    assert [r.balance for r in again] == [5] * 5 + [6, 7, 8]
    assert state.client.script_exists(state.scripts.credit_issue.sha) == [True]


def test_raw_pipeline_returns_error_replies_in_place(state: StateRedis, env_name: str) -> None:
    script = state.scripts.credit_issue
    good = [keys.credit_balance(env_name, W_OK), keys.credit_note(env_name, W_OK, "x"), "5", "100", "60", "{}"]
    bad = [*good[:2], "5", "-1", "60", "{}"]  # the script refuses a negative cap
    state.client.script_flush()
    replies = evalsha_many(state.client, script, 2, [good, bad, good])
    assert replies[0] == ["APPLIED", "5"] and replies[2] == ["DUPLICATE", "5"]
    assert isinstance(replies[1], redis.exceptions.ResponseError) and "bad cap" in str(replies[1])


def test_error_reply_is_script_error_and_leaves_the_connection_in_step(state: StateRedis, env_name: str) -> None:
    broken = CreditLedger(state, env=env_name, cap=-1, ttl_s=60)  # every call answers an error
    with pytest.raises(ScriptError, match="bad cap"):
        broken.issue_many([request(f"b{i}", W_OK, 10, 1) for i in range(500)])
    ledger = CreditLedger(state, env=env_name, cap=1_000, ttl_s=60)
    for round_no in range(3):  # a dirty pooled connection would answer with the old replies
        results = ledger.issue_many([request(f"g{round_no}-{i}", W_OK, 3, 1) for i in range(50)])
        assert [r.balance for r in results] == [100 * round_no + 2 * (i + 1) for i in range(50)]
        assert state.client.get(keys.credit_balance(env_name, W_OK)) == str(100 * (round_no + 1))


def test_redis_down_before_the_pipeline_is_unavailable(private_redis: RedisServer) -> None:
    state = make_state(private_redis, timeout_ms=300)
    ledger = CreditLedger(state, env="down", cap=1_000, ttl_s=60)
    private_redis.kill()
    results = ledger.issue_many([request("d1", W_OK, 10, 1), request("d2", W_OK, 5, 5)])
    assert [r.outcome for r in results] == [CreditOutcome.UNAVAILABLE, CreditOutcome.NO_CREDIT]
    assert results[0] == CreditResult(CreditOutcome.UNAVAILABLE, "cn_d1", 9)


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with AOF (appendfsync always): what it answered survives SIGKILL."""
    server = RedisServer(tmp_path / "aof", appendonly=True).start()
    yield server
    server.stop()


def kill_when(server: RedisServer, keys_at_least: int) -> threading.Thread:
    """Start a thread that SIGKILLs ``server`` once it holds ``keys_at_least`` keys."""

    def watch() -> None:
        probe = server.client()
        while True:
            try:
                if probe.dbsize() >= keys_at_least:
                    break
            except redis.RedisError:
                pass
        server.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_redis_killed_mid_pipeline_is_unavailable_and_a_retry_never_credits_twice(aof_server: RedisServer) -> None:
    n = 30_000
    requests = [request(f"k{i:05d}", wallet_address(i % 40 + 1), 1_000 + i % 7, i % 5) for i in range(n)]
    due: Counter[str] = Counter()
    for r in requests:
        due[r["wallet"]] += r["quoted"] - r["actual"]
    state = make_state(aof_server, timeout_ms=2_000)
    ledger = CreditLedger(state, env="kill", cap=10**12, ttl_s=600)
    killer = kill_when(aof_server, 1)
    results = ledger.issue_many(requests)
    killer.join(timeout=10)
    assert {r.outcome for r in results} == {CreditOutcome.UNAVAILABLE}
    assert [r.note_id for r in results] == [f"cn_k{i:05d}" for i in range(n)]

    aof_server.start()  # same port and data dir: the notes applied before the kill are back
    client = aof_server.client()
    before = sum(1 for _ in client.scan_iter("x402:credit:{kill:*:cn_*", count=1_000))
    assert 0 < before < n, "the kill was meant to land mid-pipeline"
    retried = ledger.issue_many(requests)
    outcomes = Counter(r.outcome for r in retried)
    # the notes applied before the kill answer DUPLICATE (and more, if a slow fsync made this
    # call time out and try again): never a second credit
    assert set(outcomes) <= {CreditOutcome.DUPLICATE, CreditOutcome.APPLIED}
    assert outcomes[CreditOutcome.DUPLICATE] >= before
    for wallet, total in due.items():
        assert client.get(keys.credit_balance("kill", wallet)) == str(total)
    assert sum(1 for _ in client.scan_iter("x402:credit:{kill:*:cn_*", count=1_000)) == n
    state.close()


# --- replay (the overlapped chunks) --------------------------------------------------------------


def runtime_for(server: RedisServer, tmp_path: Path, env: str, *, cap: int = 10**12) -> Runtime:
    settings = Settings(
        env=env,
        redis_url=server.url,
        broker_url=server.url,
        result_backend=server.url,
        wal_dir=tmp_path / "wal",
        partitions=1,
        wal_fsync="off",
        metrics_port=0,
        max_credit_balance=cap,
        redis_timeout_ms=2_000,
        lease_ttl_ms=1_000,  # a lease left behind by the killed replay expires soon
        breaker_reset_ms=100,
    )
    return build_runtime(settings)


def write_pending(runtime: Runtime, payloads: list[dict[str, Any]]) -> None:
    """Append the entries as failing open does: ENTRY records with token 0, no outcome."""
    bodies = [parse_entry(p).canonical() for p in payloads]
    partition = runtime.store.partition(0)
    for lo in range(0, len(bodies), 1_000):
        partition.append_batch([(RecordType.ENTRY, 0, b["entry_id"], b) for b in bodies[lo : lo + 1_000]])


def outcome_records(runtime: Runtime) -> dict[str, tuple[str, dict[str, Any]]]:
    out = {}
    with runtime.store.partition(0).records() as records:
        for record in records:
            if record.type is not RecordType.ENTRY:
                body = record.body
                body.pop("at")
                out[record.entry_id] = (record.type.name, body)
    return out


def test_replay_in_overlapped_chunks_records_what_the_per_call_path_answers(
    redis_server: RedisServer, tmp_path: Path, env_name: str
) -> None:
    cap = 100_000_000
    payloads = sample_entries(40, wallets=3, prefix="r")
    payloads += [entry(f"cap{i}", wallet_address(9), 40_000_000, 0) for i in range(4)]  # the 3rd, 4th: over
    payloads += [entry(f"bad{i}", wallet_address(8), 10, 1) for i in range(3)]  # corrupt balance
    runtime = runtime_for(redis_server, tmp_path, env_name, cap=cap)
    try:
        write_pending(runtime, payloads)
        client = runtime.state.client
        client.set(keys.credit_balance(env_name, wallet_address(8)), "nan")
        report = runtime.pipeline.replay_partition(0, batch=4)
        assert (report.applied, report.remaining, report.skipped_reason) == (44, 3, None)
        recorded = outcome_records(runtime)
        assert not any(entry_id.startswith("bad") for entry_id in recorded)  # CORRUPT: still pending

        # what one EVALSHA per entry, in LSN order, answers in a fresh namespace
        reference = CreditLedger(runtime.state, env=env_name + "ref", cap=cap, ttl_s=604_800)
        kinds = {
            CreditOutcome.APPLIED: "APPLIED",
            CreditOutcome.NO_CREDIT: "NO_CREDIT",
            CreditOutcome.CAP_EXCEEDED: "CAP_EXCEEDED",
        }
        for p in payloads[:44]:
            e = parse_entry(p)
            credit = reference.issue_for_entry(
                entry_id=e.entry_id,
                wallet=e.wallet,
                quote_id=e.quote_id,
                quoted=e.quoted_amount,
                actual=e.actual_amount,
            )
            body: dict[str, Any] = {}
            if credit.outcome is not CreditOutcome.NO_CREDIT:
                body = {"credit_note_id": credit.note_id, "amount": str(credit.amount), "balance": str(credit.balance)}
            assert recorded[e.entry_id] == (kinds[credit.outcome], body), e.entry_id
        assert Counter(kind for kind, _ in recorded.values())["CAP_EXCEEDED"] == 2

        client.delete(keys.credit_balance(env_name, wallet_address(8)))  # repaired: the rest goes through
        assert runtime.pipeline.replay_partition(0, batch=4).applied == 3
        report_ok = runtime.check_invariants({p["entry_id"] for p in payloads})
        assert report_ok.problems == []
    finally:
        runtime.close()


def test_replay_with_redis_killed_midway_stops_and_a_later_replay_credits_once(
    aof_server: RedisServer, tmp_path: Path
) -> None:
    n = 12_000
    payloads = sample_entries(n, wallets=50, prefix="m")
    runtime = runtime_for(aof_server, tmp_path, "mid")
    try:
        write_pending(runtime, payloads)
        killer = kill_when(aof_server, 2_500)  # a few chunks in: one is in flight when it dies
        report = runtime.pipeline.replay_partition(0, batch=1_000)
        killer.join(timeout=10)
        assert report.remaining > 0 and report.applied > 0
        assert report.applied + report.remaining == n

        aof_server.start()
        deadline = 0
        while runtime.pipeline.replay_partition(0, batch=1_000).remaining:  # the breaker may be open a while
            deadline += 1
            assert deadline < 200, "replay did not drain the backlog"
            threading.Event().wait(0.05)
        recorded = outcome_records(runtime)
        assert len(recorded) == n
        credited: defaultdict[str, int] = defaultdict(int)
        for p in payloads:
            e = parse_entry(p)
            credited[e.wallet] += e.credit_due
        client = aof_server.client()
        for wallet, total in credited.items():
            assert int(client.get(keys.credit_balance("mid", wallet)) or 0) == total
        report_ok = runtime.check_invariants({p["entry_id"] for p in payloads})
        assert report_ok.problems == []
    finally:
        runtime.close()


def test_replay_that_loses_its_lease_midway_stops_cleanly_and_a_later_replay_credits_once(
    redis_server: RedisServer, tmp_path: Path, env_name: str
) -> None:
    n = 6_000
    payloads = sample_entries(n, wallets=20, prefix="l")
    runtime = runtime_for(redis_server, tmp_path, env_name)
    try:
        write_pending(runtime, payloads)
        probe = redis_server.client()
        lock = keys.lease_lock(env_name, 0)
        balances = [keys.credit_balance(env_name, wallet_address(w)) for w in range(1, 21)]

        def steal() -> None:  # once some credits are in, another writer takes the lease over
            while sum(int(v or 0) for v in probe.mget(balances)) == 0:
                pass
            probe.set(lock, "someone-else", px=60_000)

        thief = threading.Thread(target=steal, daemon=True)
        thief.start()
        report = runtime.pipeline.replay_partition(0, batch=500)
        thief.join(timeout=10)
        assert 0 < report.applied < n and report.applied + report.remaining == n
        probe.delete(lock)
        assert runtime.pipeline.replay_partition(0, batch=500).applied == report.remaining
        assert len(outcome_records(runtime)) == n
        report_ok = runtime.check_invariants({p["entry_id"] for p in payloads})
        assert report_ok.problems == [] and report_ok.pending == 0
    finally:
        runtime.close()
