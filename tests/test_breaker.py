"""The state-Redis circuit breaker: unit behaviour with an injected clock, and a real outage."""

from __future__ import annotations

from tests.conftest import make_state
from tests.support.redis_server import RedisServer
from worker.breaker import BreakerState, CircuitBreaker
from worker.fencing import FenceResult, Fencing


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_half_open_probe_closes() -> None:
    clock = Clock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=2.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now = 2.5
    assert breaker.allow(), "the half-open probe goes through"
    assert not breaker.allow(), "only one probe at a time"
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 5.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED


def test_open_breaker_short_circuits_a_paused_redis(private_redis: RedisServer) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, reset_after_s=1.0, clock=clock)
    state = make_state(private_redis, timeout_ms=100, breaker=breaker)
    fencing = Fencing(state, env="brk", lease_ttl_ms=10_000)
    sent: list[object] = []
    send = state.client.execute_command

    def counting_send(*args: object, **options: object) -> object:
        sent.append(args[0])
        return send(*args, **options)

    state.client.execute_command = counting_send  # type: ignore[method-assign]
    private_redis.pause()
    try:
        assert fencing.validate_token(0, 1) is FenceResult.UNAVAILABLE
        assert fencing.validate_token(0, 2) is FenceResult.UNAVAILABLE
        assert breaker.state is BreakerState.OPEN
        sent_while_closed = len(sent)
        assert sent_while_closed >= 2
        for token in range(3, 203):
            assert fencing.validate_token(0, token) is FenceResult.UNAVAILABLE
        assert len(sent) == sent_while_closed, "an open breaker must not touch the socket"
    finally:
        private_redis.resume()
    clock.now = 10.0
    assert fencing.validate_token(0, 500) is FenceResult.OK
    assert breaker.state is BreakerState.CLOSED
