"""Writer leases and validate-and-advance against a real redis-server and the real Lua."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import make_state
from tests.support.redis_server import RedisServer
from worker import keys
from worker.errors import LeaseBusy, LeaseNotOwnedError, TokenOverflow
from worker.fencing import FenceResult, Fencing, Lease
from worker.limits import MAX_SAFE_INTEGER
from worker.state_redis import StateRedis, connect

CORRUPT_SPELLINGS = ["nan", "1.5", "-1", "", "1e3", " 5", "9007199254740992", "inf", "0x10", "007", "\uff15"]


def watermark(state: StateRedis, env: str, partition: int = 0) -> str | None:
    value: str | None = state.client.get(keys.fence_watermark(env, partition))
    return value


# --- the original's 14 cases (fencing half) ---------------------------------------------------


def test_fresh_token_accepted_ok(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    lease = fencing.acquire(0)
    assert lease.token == 1
    assert fencing.validate_and_advance(lease) is FenceResult.OK
    assert watermark(state, env_name) == "1"


def test_stale_token_rejected(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), "10")
    assert fencing.validate_token(0, 7) is FenceResult.STALE
    assert watermark(state, env_name) == "10"


def test_equal_token_rejected_strictly_greater(fencing: Fencing) -> None:
    assert fencing.validate_token(0, 5) is FenceResult.OK
    assert fencing.validate_token(0, 5) is FenceResult.STALE
    assert fencing.validate_token(0, 6) is FenceResult.OK


def test_corrupt_stored_token_non_numeric(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), "nan")
    assert fencing.validate_token(0, 5) is FenceResult.CORRUPT
    assert watermark(state, env_name) == "nan"


def test_corrupt_stored_token_exceeds_max_safe(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), str(MAX_SAFE_INTEGER + 1))
    assert fencing.validate_token(0, 5) is FenceResult.CORRUPT


def test_token_exceeding_max_safe_rejected_at_issuance(
    fencing: Fencing, state: StateRedis, env_name: str
) -> None:
    state.client.set(keys.fence_counter(env_name, 0), str(MAX_SAFE_INTEGER))
    with pytest.raises(TokenOverflow):
        fencing.acquire(0)
    assert state.client.get(keys.lease_lock(env_name, 0)) is None, "overflow must release the lease"
    assert state.client.get(keys.fence_counter(env_name, 0)) == str(MAX_SAFE_INTEGER)


def test_non_holder_gets_stale_without_calling_redis(
    redis_server: RedisServer, fencing: Fencing, state: StateRedis, env_name: str
) -> None:
    lease = fencing.acquire(0)
    fencing.release(lease)
    calls_before = _evalsha_calls(redis_server)
    assert fencing.validate_and_advance(lease) is FenceResult.STALE
    assert _evalsha_calls(redis_server) == calls_before
    expired = Lease(partition=0, holder="someone", token=99, ttl_ms=1, deadline=0.0)
    assert fencing.validate_and_advance(expired) is FenceResult.STALE
    assert _evalsha_calls(redis_server) == calls_before
    assert watermark(state, env_name) is None


def test_negative_token_rejected_as_corrupt_at_input_validation(
    redis_server: RedisServer, fencing: Fencing
) -> None:
    calls_before = _evalsha_calls(redis_server)
    for bad in (-1, 0, MAX_SAFE_INTEGER + 1, True):
        assert fencing.validate_token(0, bad) is FenceResult.CORRUPT
    assert fencing.validate_token(0, 1.0) is FenceResult.CORRUPT  # type: ignore[arg-type]
    assert _evalsha_calls(redis_server) == calls_before


def test_per_environment_key_namespace_isolation(state: StateRedis) -> None:
    prod = Fencing(state, env="iso-prod", lease_ttl_ms=10_000)
    stage = Fencing(state, env="iso-stage", lease_ttl_ms=10_000)
    prod_lease = prod.acquire(0)
    stage_lease = stage.acquire(0)  # not LeaseBusy: a different environment's lease
    assert prod_lease.token == stage_lease.token == 1
    assert prod.validate_and_advance(prod_lease) is FenceResult.OK
    assert stage.validate_and_advance(stage_lease) is FenceResult.OK
    assert state.client.get("wal:writer:last_accepted:{iso-prod:0}") == "1"
    assert state.client.get("wal:writer:last_accepted:{iso-stage:0}") == "1"


# --- beyond the original -----------------------------------------------------------------------


@pytest.mark.parametrize("stored", CORRUPT_SPELLINGS)
def test_every_corrupt_spelling_fails_closed(
    fencing: Fencing, state: StateRedis, env_name: str, stored: str
) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), stored)
    assert fencing.validate_token(0, 5) is FenceResult.CORRUPT
    assert watermark(state, env_name) == stored


@pytest.mark.parametrize("token", ["nan", "1.5", "-1", "", "1e3", " 5", "9007199254740992", "007"])
def test_corrupt_incoming_token_in_lua(state: StateRedis, env_name: str, token: str) -> None:
    key = keys.fence_watermark(env_name, 0)
    state.client.set(key, "3")
    assert state.scripts.fence_validate_advance(keys=[key], args=[token]) == "CORRUPT"
    assert state.client.get(key) == "3"


def test_missing_watermark_accepts_and_stores(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    assert watermark(state, env_name) is None
    assert fencing.validate_token(3, 42) is FenceResult.OK
    assert state.client.get(keys.fence_watermark(env_name, 3)) == "42"


def test_max_safe_token_accepted_once(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), str(MAX_SAFE_INTEGER - 1))
    assert fencing.validate_token(0, MAX_SAFE_INTEGER) is FenceResult.OK
    assert fencing.validate_token(0, MAX_SAFE_INTEGER) is FenceResult.STALE


def test_isolation_of_all_keys_between_two_environments(state: StateRedis) -> None:
    from worker.credit import CreditLedger

    wallet = "0x" + "ab" * 20
    envs = ("all-a", "all-b")
    for env in envs:
        fencing = Fencing(state, env=env, lease_ttl_ms=10_000)
        lease = fencing.acquire(1)
        assert fencing.validate_and_advance(lease) is FenceResult.OK
        ledger = CreditLedger(state, env=env, cap=1000, ttl_s=60)
        first = ledger.issue(wallet=wallet, note_id="cn_x", delta=600, note={"id": "cn_x"})
        assert first.outcome.value == "APPLIED" and first.balance == 600, env
    for env in envs:
        assert state.client.get(keys.lease_lock(env, 1)) is not None
        assert state.client.get(keys.fence_counter(env, 1)) == "1"
        assert state.client.get(keys.fence_watermark(env, 1)) == "1"
        assert state.client.get(keys.credit_balance(env, wallet)) == "600"
        assert state.client.exists(keys.credit_note(env, wallet, "cn_x")) == 1
    assert sorted(state.client.keys("*{all-a:*")) == sorted(
        k.replace("all-b", "all-a") for k in state.client.keys("*{all-b:*")
    )


def test_deleted_counter_with_surviving_watermark_is_never_stuck_stale(
    fencing: Fencing, state: StateRedis, env_name: str
) -> None:
    for _ in range(3):
        with fencing.lease(0) as lease:
            assert fencing.validate_and_advance(lease) is FenceResult.OK
    state.client.delete(keys.fence_counter(env_name, 0))
    with fencing.lease(0) as lease:
        assert lease.token == 4
        assert fencing.validate_and_advance(lease) is FenceResult.OK


def test_counter_and_watermark_deleted_with_wal_floor(
    fencing: Fencing, state: StateRedis, env_name: str
) -> None:
    state.client.delete(keys.fence_counter(env_name, 0), keys.fence_watermark(env_name, 0))
    with fencing.lease(0, floor=777) as lease:
        assert lease.token == 778
        assert fencing.validate_and_advance(lease) is FenceResult.OK
    with fencing.lease(0, floor=10) as lease:
        assert lease.token == 779


def test_lease_is_exclusive_and_released(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    lease = fencing.acquire(2)
    with pytest.raises(LeaseBusy) as busy:
        fencing.acquire(2)
    assert busy.value.holder == lease.holder
    assert fencing.release(lease) is True
    assert fencing.release(lease) is False
    assert state.client.get(keys.lease_lock(env_name, 2)) is None
    second = fencing.acquire(2)
    assert second.token == lease.token + 1


def test_renew_reports_a_lost_lease_to_the_holder(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    lease = fencing.acquire(0)
    fencing.renew(lease)
    assert state.client.pttl(keys.lease_lock(env_name, 0)) > 9_000
    state.client.set(keys.lease_lock(env_name, 0), "usurper")
    with pytest.raises(LeaseNotOwnedError):
        fencing.renew(lease)
    assert not lease.is_held()
    assert fencing.validate_and_advance(lease) is FenceResult.STALE
    with pytest.raises(LeaseNotOwnedError):
        lease.ensure_held()


def test_context_manager_releases_on_error(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    with pytest.raises(RuntimeError), fencing.lease(5):
        assert state.client.get(keys.lease_lock(env_name, 5)) is not None
        raise RuntimeError("boom")
    assert state.client.get(keys.lease_lock(env_name, 5)) is None


def test_script_flush_is_transparent(fencing: Fencing, state: StateRedis) -> None:
    assert fencing.validate_token(0, 1) is FenceResult.OK
    state.client.script_flush()
    assert fencing.validate_token(0, 2) is FenceResult.OK
    with fencing.lease(0) as lease:
        assert lease.token >= 1


def test_repair_sets_fence_above_wal_floor(fencing: Fencing, state: StateRedis, env_name: str) -> None:
    state.client.set(keys.fence_watermark(env_name, 0), "nan")
    state.client.set(keys.fence_counter(env_name, 0), "12")
    assert fencing.validate_token(0, 13) is FenceResult.CORRUPT
    assert fencing.repair(0, floor=50) == 51
    assert watermark(state, env_name) == "51"
    with fencing.lease(0, floor=50) as lease:
        assert lease.token == 52
        assert fencing.validate_and_advance(lease) is FenceResult.OK


def test_redis_killed_is_unavailable_not_ok(private_redis: RedisServer) -> None:
    state = make_state(private_redis, timeout_ms=300)
    fencing = Fencing(state, env="kill", lease_ttl_ms=10_000)
    lease = fencing.acquire(0)
    private_redis.kill()
    assert fencing.validate_and_advance(lease) is FenceResult.UNAVAILABLE
    from worker.errors import RedisUnavailable

    with pytest.raises(RedisUnavailable):
        fencing.acquire(1)
    assert fencing.release(lease) is False


def test_redis_paused_is_unavailable_within_timeout(private_redis: RedisServer) -> None:
    state = make_state(private_redis, timeout_ms=200)
    fencing = Fencing(state, env="pause", lease_ttl_ms=10_000)
    assert fencing.validate_token(0, 1) is FenceResult.OK
    private_redis.pause()
    try:
        assert fencing.validate_token(0, 2) is FenceResult.UNAVAILABLE
    finally:
        private_redis.resume()
    assert fencing.validate_token(0, 3) is FenceResult.OK


def test_restarted_redis_reconnects(private_redis: RedisServer) -> None:
    state = make_state(private_redis, timeout_ms=500)
    fencing = Fencing(state, env="restart", lease_ttl_ms=10_000)
    assert fencing.validate_token(0, 1) is FenceResult.OK
    private_redis.restart(empty=True)
    # the pooled connection is dead; the bounded retry reconnects, and the script is reloaded
    assert fencing.validate_token(0, 2) is FenceResult.OK


def _evalsha_calls(server: RedisServer) -> int:
    stats = server.client().info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_wrong_password_fails_open_but_is_logged_as_a_configuration_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "auth", password="right-secret").start()
    try:
        state = StateRedis(
            connect(f"redis://:wrong-secret@127.0.0.1:{server.port}/0", timeout_ms=300), label="state redis"
        )
        fencing = Fencing(state, env="auth", lease_ttl_ms=10_000)
        with caplog.at_level(logging.CRITICAL, logger="worker.state_redis"):
            assert fencing.validate_token(0, 1) is FenceResult.UNAVAILABLE
        assert "authentication failed" in caplog.text
        assert "secret" not in caplog.text
    finally:
        server.stop()
