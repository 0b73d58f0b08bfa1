"""A per-process circuit breaker for the state Redis.

closed --(``failure_threshold`` consecutive connection failures)--> open
open   --(``reset_after_s`` elapsed)--> half-open: exactly one caller probes
half-open --(probe succeeds)--> closed; --(probe fails)--> open again

While open, :meth:`allow` is ``False`` at once, so an outage costs each entry nothing instead of a
socket timeout (the entry fails open to the WAL). Thread-safe. Times are ``time.monotonic`` s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one dependency and short-circuits calls while it is down."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_after_s: float,
        name: str = "state-redis",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a call go through now? In half-open state only the single probe may."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock() - self._opened_at < self._reset_after_s:
                    return False
                self._set(BreakerState.HALF_OPEN)
            if self._probing:
                return False
            self._probing = True
            return True

    def record_success(self) -> None:
        """The dependency answered (any answer, including an error reply)."""
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """The dependency did not answer (refused, reset, timed out)."""
        with self._lock:
            self._failures += 1
            self._probing = False
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self._threshold
            ):
                self._opened_at = self._clock()
                self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        log.warning("circuit breaker %s: %s -> %s", self.name, self._state, state)
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
