"""Prometheus metrics of the worker (prometheus-client, multiprocess-safe).

With ``PROMETHEUS_MULTIPROC_DIR`` set (it must be, under the prefork pool) every process writes
its samples to that directory and :func:`serve` aggregates them on ``BILLING_METRICS_PORT``.
Labels never carry a credential or an unbounded value (no wallet, no entry id).
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

log = logging.getLogger(__name__)

#: prometheus_client writes one file per process into this directory from the first metric on
#: (at import): a missing directory would crash the import with a bare FileNotFoundError.
_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if _MULTIPROC_DIR is not None:
    os.makedirs(_MULTIPROC_DIR, exist_ok=True)

ENTRIES = Counter("billing_entries", "Billing entries processed, by final status.", ["status"])
FENCE_RESULTS = Counter("billing_fence_results", "Validate-and-advance answers.", ["result"])
FAIL_OPEN = Counter("billing_fail_open", "Entries recorded with token 0 while the state Redis was down.")
CREDIT_ISSUED = Counter("billing_credit_issued_base_units", "Credit issued, in base units.")
CREDIT_USED = Counter("billing_credit_used_base_units", "Credit consumed by apply_credit, base units.")
CAP_EXCEEDED = Counter("billing_cap_exceeded", "Credit notes refused by the per-wallet cap.")
CORRUPT = Counter("billing_corrupt", "Fail-closed events on corrupt state (critical).", ["what"])
RETRIES = Counter("billing_retries", "Entries sent back to the queue to retry, by reason.", ["kind"])
REPLAYED = Counter("billing_replayed", "Pending WAL entries completed by replay.")
PENDING = Gauge(
    "billing_pending",
    "WAL entries without an outcome record, per partition.",
    ["partition"],
    multiprocess_mode="livemostrecent",
)
BREAKER_OPEN = Gauge(
    "billing_breaker_open", "1 while the state-Redis circuit breaker is open.", multiprocess_mode="livemax"
)
WAL_APPEND_SECONDS = Histogram(
    "billing_wal_append_seconds",
    "WAL append latency including fsync, seconds.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)
ENTRY_SECONDS = Histogram(
    "billing_entry_seconds",
    "End-to-end processing time of one entry inside the worker, seconds.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

#: The known label values, exported as 0 from start-up. A labelled series that first appears at 1
#: has no earlier sample, so ``increase()``/``rate()`` miss that first event: the first CORRUPT
#: would never fire an alert. (Kept in step with ``Status`` and ``FenceResult`` by tests.)
ENTRY_STATUSES = ("credited", "no_credit", "duplicate", "deferred", "cap_exceeded", "rejected")
FENCE_RESULT_VALUES = ("OK", "STALE", "CORRUPT", "UNAVAILABLE")
CORRUPT_WHATS = ("fence", "balance", "token_overflow")
for _status in ENTRY_STATUSES:
    ENTRIES.labels(_status)
for _result in FENCE_RESULT_VALUES:
    FENCE_RESULTS.labels(_result)
for _what in CORRUPT_WHATS:
    CORRUPT.labels(_what)


def registry() -> CollectorRegistry:
    """The registry to expose: the multiprocess aggregate when enabled, else the default one."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregate = CollectorRegistry()
        multiprocess.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return aggregate
    from prometheus_client import REGISTRY

    return REGISTRY


def serve(port: int) -> None:
    """Expose ``/metrics`` on ``port`` (0: disabled)."""
    if port == 0:
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: :%d/metrics shows this process only, not the pool's", port
        )
    start_http_server(port, registry=registry())
    log.info("metrics on :%d/metrics", port)


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (multiprocess mode only)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
