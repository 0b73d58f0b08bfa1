"""The capped, idempotent credit increment and consumption against a real redis-server."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import make_state
from tests.support.redis_server import RedisServer
from worker import keys
from worker.credit import CreditLedger, CreditOutcome, note_id_for
from worker.errors import InvalidAmount
from worker.limits import MAX_SAFE_INTEGER
from worker.state_redis import StateRedis

WALLET = "0x" + "12" * 20
OTHER = "0x" + "34" * 20


def issue(ledger: CreditLedger, entry_id: str, quoted: int, actual: int, wallet: str = WALLET):
    return ledger.issue_for_entry(
        entry_id=entry_id, wallet=wallet, quote_id="q-" + entry_id, quoted=quoted, actual=actual
    )


# --- the original's 14 cases (credit half) -----------------------------------------------------


def test_issues_credit_note_with_normal_delta(ledger: CreditLedger, state: StateRedis, env_name: str) -> None:
    result = issue(ledger, "e1", quoted=1_500_000, actual=1_200_000)
    assert result.outcome is CreditOutcome.APPLIED
    assert result.amount == 300_000
    assert result.balance == 300_000
    assert result.note_id == note_id_for("e1")
    assert state.client.get(keys.credit_balance(env_name, WALLET)) == "300000"
    note = state.client.get(keys.credit_note(env_name, WALLET, "cn_e1"))
    assert note is not None and '"amount": "300000"' in note
    ttl = state.client.ttl(keys.credit_balance(env_name, WALLET))
    assert 604_000 < ttl <= 604_800
    assert 604_000 < state.client.ttl(keys.credit_note(env_name, WALLET, "cn_e1")) <= 604_800


def test_sequential_issuances_accumulate(ledger: CreditLedger) -> None:
    balances = [issue(ledger, f"s{i}", quoted=100, actual=100 - i).balance for i in range(1, 6)]
    assert balances == [1, 3, 6, 10, 15]
    assert ledger.balance(WALLET) == 15


def test_rejects_delta_beyond_max_safe(ledger: CreditLedger, redis_server: RedisServer) -> None:
    with pytest.raises(InvalidAmount):
        ledger.issue(wallet=WALLET, note_id="cn_big", delta=MAX_SAFE_INTEGER + 1, note={})
    with pytest.raises(InvalidAmount):
        ledger.issue(wallet=WALLET, note_id="cn_zero", delta=0, note={})
    with pytest.raises(InvalidAmount):
        issue(ledger, "big", quoted=MAX_SAFE_INTEGER + 5, actual=0)
    assert ledger.balance(WALLET) == 0


def test_rejects_balance_beyond_cap(state: StateRedis, env_name: str) -> None:
    ledger = CreditLedger(state, env=env_name, cap=1_000, ttl_s=60)
    assert issue(ledger, "a", quoted=700, actual=100).balance == 600
    over = issue(ledger, "b", quoted=401, actual=0)
    assert over.outcome is CreditOutcome.CAP_EXCEEDED
    assert over.balance == 600
    assert state.client.exists(keys.credit_note(env_name, WALLET, "cn_b")) == 0
    # terminal: retrying the same entry never flips it
    assert issue(ledger, "b", quoted=401, actual=0).outcome is CreditOutcome.CAP_EXCEEDED
    assert ledger.balance(WALLET) == 600


def test_no_credit_note_when_actual_at_least_quoted(
    ledger: CreditLedger, state: StateRedis, env_name: str
) -> None:
    assert issue(ledger, "eq", quoted=500, actual=500).outcome is CreditOutcome.NO_CREDIT
    assert issue(ledger, "gt", quoted=500, actual=900).outcome is CreditOutcome.NO_CREDIT
    assert state.client.keys(f"x402:credit:{{{env_name}:*") == []


# --- beyond the original -----------------------------------------------------------------------


def test_reaching_the_cap_exactly_is_allowed(state: StateRedis, env_name: str) -> None:
    ledger = CreditLedger(state, env=env_name, cap=1_000, ttl_s=60)
    assert issue(ledger, "a", quoted=600, actual=0).balance == 600
    exact = issue(ledger, "b", quoted=400, actual=0)
    assert exact.outcome is CreditOutcome.APPLIED and exact.balance == 1_000
    assert issue(ledger, "c", quoted=1, actual=0).outcome is CreditOutcome.CAP_EXCEEDED


def test_default_cap_is_one_million_usdc(ledger: CreditLedger) -> None:
    assert issue(ledger, "a", quoted=1_000_000_000_000, actual=0).balance == 1_000_000_000_000
    assert issue(ledger, "b", quoted=1, actual=0).outcome is CreditOutcome.CAP_EXCEEDED


def test_retrying_the_same_entry_never_credits_twice(ledger: CreditLedger, state: StateRedis) -> None:
    first = issue(ledger, "retry", quoted=900, actual=400)
    assert first.outcome is CreditOutcome.APPLIED
    state.client.script_flush()  # and across a script cache loss
    for _ in range(5):
        again = issue(ledger, "retry", quoted=900, actual=400)
        assert again.outcome is CreditOutcome.DUPLICATE
        assert again.balance == 500
    assert ledger.balance(WALLET) == 500


@pytest.mark.parametrize("stored", ["nan", "1.5", "-1", "", "1e3", " 5", "9007199254740992"])
def test_corrupt_balance_fails_closed(
    ledger: CreditLedger, state: StateRedis, env_name: str, stored: str
) -> None:
    state.client.set(keys.credit_balance(env_name, WALLET), stored)
    result = issue(ledger, "c", quoted=10, actual=1)
    assert result.outcome is CreditOutcome.CORRUPT
    assert result.raw == stored
    assert state.client.get(keys.credit_balance(env_name, WALLET)) == stored
    assert state.client.exists(keys.credit_note(env_name, WALLET, "cn_c")) == 0
    consumed = ledger.apply(request_id="r", wallet=WALLET, required=5)
    assert consumed.outcome is CreditOutcome.CORRUPT and consumed.credit_used == 0


def test_concurrent_issuance_sums_exactly_and_never_passes_cap(state: StateRedis, env_name: str) -> None:
    cap = 8 * 200 * 7 // 2  # half of what 8 threads x 200 notes of 7 would reach
    ledger = CreditLedger(state, env=env_name, cap=cap, ttl_s=60)
    outcomes: list[CreditOutcome] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        mine = [issue(ledger, f"t{n}-{i}", quoted=7, actual=0).outcome for i in range(200)]
        with lock:
            outcomes.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    applied = outcomes.count(CreditOutcome.APPLIED)
    assert applied + outcomes.count(CreditOutcome.CAP_EXCEEDED) == 1600
    assert applied == cap // 7
    assert ledger.balance(WALLET) == applied * 7 <= cap
    notes = [k for k in state.client.keys(f"x402:credit:{{{env_name}:{WALLET}}}:cn_*")]
    assert len(notes) == applied


def test_concurrent_issuance_uncapped_sums_exactly(ledger: CreditLedger) -> None:
    def worker(n: int) -> None:
        for i in range(200):
            issue(ledger, f"u{n}-{i}", quoted=1_000 + i, actual=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.balance(WALLET) == 8 * 200 * 1_000


def test_apply_credit_is_idempotent_and_never_negative(ledger: CreditLedger) -> None:
    issue(ledger, "fund", quoted=1_000, actual=0)
    first = ledger.apply(request_id="pay-1", wallet=WALLET, required=300)
    assert (first.outcome, first.credit_used, first.reduced_amount, first.remaining_credit) == (
        CreditOutcome.APPLIED,
        300,
        0,
        700,
    )
    again = ledger.apply(request_id="pay-1", wallet=WALLET, required=300)
    assert (again.outcome, again.credit_used, again.remaining_credit) == (CreditOutcome.DUPLICATE, 300, 700)
    big = ledger.apply(request_id="pay-2", wallet=WALLET, required=5_000)
    assert (big.credit_used, big.reduced_amount, big.remaining_credit) == (700, 4_300, 0)
    empty = ledger.apply(request_id="pay-3", wallet=WALLET, required=10)
    assert (empty.credit_used, empty.reduced_amount, empty.remaining_credit) == (0, 10, 0)
    assert ledger.balance(WALLET) == 0
    none = ledger.apply(request_id="pay-4", wallet=OTHER, required=10)
    assert (none.credit_used, none.remaining_credit) == (0, 0)


def test_apply_credit_concurrent_never_negative(ledger: CreditLedger) -> None:
    issue(ledger, "fund", quoted=1_000, actual=0)
    used: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            result = ledger.apply(request_id=f"c{n}-{i}", wallet=WALLET, required=9)
            with lock:
                used.append(result.credit_used)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(used) == 1_000
    assert ledger.balance(WALLET) == 0


def test_redis_killed_is_unavailable(private_redis: RedisServer) -> None:
    state = make_state(private_redis, timeout_ms=300)
    ledger = CreditLedger(state, env="k", cap=1_000, ttl_s=60)
    assert issue(ledger, "a", quoted=10, actual=0).outcome is CreditOutcome.APPLIED
    private_redis.kill()
    down = issue(ledger, "b", quoted=10, actual=0)
    assert down.outcome is CreditOutcome.UNAVAILABLE
    consumed = ledger.apply(request_id="r", wallet=WALLET, required=10)
    assert consumed.outcome is CreditOutcome.UNAVAILABLE
    assert (consumed.credit_used, consumed.reduced_amount) == (0, 10)
