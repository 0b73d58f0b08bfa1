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


# --- the pipeline and Celery ---------------------------------------------------------------------

pytest_plugins = ("celery.contrib.pytest",)

#: Result-backend reconnect policy for test clients: give up at once on a server a test stopped.
FAST_GIVE_UP = {"retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}}


@pytest.fixture(scope="session")
def broker_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The Celery broker (db 0) and result backend (db 1), apart from any state Redis, so a test
    can kill the state Redis without stopping delivery."""
    server = RedisServer(tmp_path_factory.mktemp("redis-broker")).start()
    yield server
    import gc

    from worker.app import app

    # Let pending AsyncResults unsubscribe and stop the result consumer's pub/sub while the server
    # still answers; otherwise each one retries the vanished server for ~20 s at exit.
    gc.collect()
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
    app.close()
    server.stop()


@pytest.fixture
def billing_env(
    tmp_path: Path,
    redis_server: RedisServer,
    broker_redis: RedisServer,
    env_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """BILLING_* for one test: its own env name, WAL dir and a clean broker; runtime rebuilt."""
    from worker.app import app
    from worker.runtime import reset_runtime

    values = {
        "BILLING_ENV": env_name,
        "BILLING_REDIS_URL": redis_server.url,
        "BILLING_BROKER_URL": broker_redis.url.replace("/0", "/0"),
        "BILLING_RESULT_BACKEND": broker_redis.url.replace("/0", "/1"),
        "BILLING_WAL_DIR": str(tmp_path / "wal"),
        "BILLING_PARTITIONS": "4",
        "BILLING_REDIS_TIMEOUT_MS": "300",
        "BILLING_BREAKER_RESET_MS": "200",
        "BILLING_RETRY_MAX_S": "1",
        "BILLING_LEASE_TTL_MS": "2000",
        "BILLING_METRICS_PORT": "0",
        "BILLING_WAL_SEGMENT_BYTES": "65536",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    broker_redis.client(0).flushdb()
    broker_redis.client(1).flushdb()
    app.conf.update(
        broker_url=values["BILLING_BROKER_URL"],
        result_backend=values["BILLING_RESULT_BACKEND"],
        broker_transport_options={
            "visibility_timeout": 300,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "polling_interval": 0.1,
        },
        # an AsyncResult collected after its backend server was stopped must not retry for 20 s
        result_backend_transport_options=FAST_GIVE_UP,
    )
    reset_runtime()
    yield values
    reset_runtime()


#: The two forms of billing.process_entry every in-process worker test runs against.
CONSUMER_MODES = {"single": 1, "batch": 50}


@pytest.fixture(params=list(CONSUMER_MODES))
def celery_worker_inproc(
    request: pytest.FixtureRequest, billing_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[object]:
    """A real Celery worker consuming `billing` and `onboarding` in this process (solo pool), once
    with billing.process_entry in its single form and once as the batch consumer."""
    from celery.contrib.testing.worker import start_worker

    from tasks.billing import register_process_entry
    from worker.app import app

    batch_size = CONSUMER_MODES[request.param]
    monkeypatch.setenv("BILLING_BATCH_SIZE", str(batch_size))
    register_process_entry(batch_size, 20)
    prefetch = app.conf.worker_prefetch_multiplier
    app.conf.worker_prefetch_multiplier = batch_size
    try:
        with start_worker(
            app,
            pool="solo",
            concurrency=1,
            queues=["billing", "onboarding"],
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=10,
        ) as worker:
            yield worker
    finally:
        app.conf.worker_prefetch_multiplier = prefetch
        register_process_entry(1, 20)
