"""Shared fixtures: real redis-server processes owned by the tests (never the shared 6379)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer
from worker.breaker import CircuitBreaker
from worker.credit import CreditLedger
from worker.fencing import Fencing
from worker.state_redis import StateRedis, connect

_env_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests isolate by environment name."""
    server = RedisServer(tmp_path_factory.mktemp("redis-shared")).start()
    yield server
    server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test, free to be killed, paused and restarted."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def env_name() -> str:
    """A fresh BILLING_ENV per test: every key of the test lives in its own namespace."""
    return f"t{next(_env_numbers)}"


def make_state(
    server: RedisServer, *, timeout_ms: int = 500, breaker: CircuitBreaker | None = None
) -> StateRedis:
    return StateRedis(connect(server.url, timeout_ms=timeout_ms), breaker=breaker)


@pytest.fixture
def state(redis_server: RedisServer) -> Iterator[StateRedis]:
    state = make_state(redis_server)
    yield state
    state.close()


@pytest.fixture
def fencing(state: StateRedis, env_name: str) -> Fencing:
    return Fencing(state, env=env_name, lease_ttl_ms=10_000)


@pytest.fixture
def ledger(state: StateRedis, env_name: str) -> CreditLedger:
    return CreditLedger(state, env=env_name, cap=1_000_000_000_000, ttl_s=604_800)
