"""Per-process wiring: settings → WAL store, state Redis (with breaker), fencing, ledger, pipeline.

Built lazily on first use, so a prefork parent never opens connections or WAL handles that its
children would inherit; :func:`reset_runtime` drops them (after fork, in tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker import metrics
from worker.breaker import BreakerState, CircuitBreaker
from worker.credit import CreditLedger
from worker.fencing import Fencing
from worker.invariants import InvariantReport, check_invariants
from worker.pipeline import Pipeline
from worker.settings import Settings, get_settings
from worker.state_redis import StateRedis
from worker.wal import WalStore


@dataclass
class Runtime:
    settings: Settings
    store: WalStore
    state: StateRedis
    breaker: CircuitBreaker
    fencing: Fencing
    ledger: CreditLedger
    pipeline: Pipeline

    def check_invariants(self, expected_entry_ids: Iterable[str] = ()) -> InvariantReport:
        """:func:`worker.invariants.check_invariants` over this runtime's WAL and state Redis,
        with its own environment and credit cap."""
        return check_invariants(
            self.store,
            self.state,
            env=self.settings.env,
            cap=self.settings.max_credit_balance,
            expected_entry_ids=expected_entry_ids,
        )

    def close(self) -> None:
        self.store.close()
        self.state.close()


def build_runtime(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> Runtime:
    """Open everything one process needs (``clock`` drives the circuit breaker). Raises
    ConfigError (e.g. partition count mismatch), WalCorruption for a damaged partition."""
    breaker = CircuitBreaker(
        failure_threshold=settings.breaker_failures,
        reset_after_s=settings.breaker_reset_ms / 1000,
        clock=clock,
        on_change=lambda state: metrics.BREAKER_OPEN.set(1 if state is BreakerState.OPEN else 0),
    )
    store = WalStore(settings)
    state = StateRedis.from_settings(settings, breaker=breaker)
    fencing = Fencing(state, env=settings.env, lease_ttl_ms=settings.lease_ttl_ms)
    ledger = CreditLedger(
        state, env=settings.env, cap=settings.max_credit_balance, ttl_s=settings.credit_ttl_seconds
    )
    pipeline = Pipeline(store=store, fencing=fencing, ledger=ledger)
    return Runtime(settings, store, state, breaker, fencing, ledger, pipeline)


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime, built from the environment on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(get_settings())
        return _runtime


def reset_runtime(*, close: bool = True) -> None:
    """Forget (and by default close) this process's runtime; the next use rebuilds it."""
    global _runtime
    with _lock:
        if _runtime is not None and close:
            _runtime.close()
        _runtime = None
        get_settings.cache_clear()
