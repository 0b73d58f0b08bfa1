"""Prometheus metrics of a real prefork worker (concurrency 2), scraped over HTTP.

The worker runs as a subprocess with ``PROMETHEUS_MULTIPROC_DIR`` and ``BILLING_METRICS_PORT``
set, as in production; the state Redis has a password so the label check has something to find.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import client_app, close_client, free_port, http_get, wait_for_port, worker_env
from tests.support.redis_server import RedisServer
from worker.devstack import CeleryProcess, worker_args
from worker.samples import entry, wallet_address

PASSWORD = "metrics-s3cret-pw"
WALLETS = [wallet_address(n) for n in range(1, 7)]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(params=["1", "4"], ids=["single", "batch4"])
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A prefork worker (2 children) taking one message at a time, or batches of up to 4."""
    state = RedisServer(tmp_path / "state", password=PASSWORD).start()
    broker = RedisServer(tmp_path / "broker").start()
    port = free_port()
    env = worker_env(
        tmp_path=tmp_path,
        state_url=state.url,
        broker_url=broker.url,
        result_backend=broker.url.replace("/0", "/1"),
        env_name="metrics",
        BILLING_BATCH_SIZE=request.param,
        metrics_port=port,
        # Not created beforehand: worker.metrics creates it (README's "Running it for real" does not).
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom-not-yet"),
    )
    assert not Path(env["PROMETHEUS_MULTIPROC_DIR"]).exists()
    log = tmp_path / "worker.log"
    worker = CeleryProcess(worker_args(concurrency=2, name="metrics"), env=env, log_path=log).start()
    app = client_app(env["BILLING_BROKER_URL"], env["BILLING_RESULT_BACKEND"])
    try:
        assert worker.process is not None
        wait_for_port(port, timeout_s=30, what="the worker's metrics server", process=worker.process, log=log)
        yield {"app": app, "port": port, "env": env, "log": log, "worker": worker}
    finally:
        worker.stop()
        close_client(app)
        broker.stop()
        state.stop()


def _send_all(app: Any, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pending = [app.send_task("billing.process_entry", args=[p], queue="billing") for p in payloads]
    return [r.get(timeout=30) for r in pending]


def test_prefork_metrics_are_aggregated_and_match_what_was_processed(stack: dict[str, Any]) -> None:
    app, port = stack["app"], stack["port"]
    credited = [entry(f"cr-{i}", WALLETS[i % len(WALLETS)], 1_000 + 10 * i, 400 + i) for i in range(30)]
    no_credit = [entry(f"nc-{i}", WALLETS[i % 3], 500, 500 + i) for i in range(6)]
    rejected = [
        {**entry("bad-float", WALLETS[0], 10, 1), "quoted_amount": 1.5},
        {**entry("bad-wallet", WALLETS[0], 10, 1), "wallet": "0x1234"},
        {**entry("bad-extra", WALLETS[1], 10, 1), "tip": "1"},
        {**credited[0], "actual_amount": 1},  # same entry_id, other content: a conflict
    ]
    first = _send_all(app, credited + no_credit)
    duplicates = [dict(credited[i]) for i in (0, 5, 9)] + [dict(no_credit[2])]
    second = _send_all(app, rejected + duplicates)
    results = first + second
    statuses = Counter(r["status"] for r in results)
    assert statuses == {"credited": 30, "no_credit": 6, "rejected": 4, "duplicate": 4}, statuses

    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = _samples(body)

    for name, count in statuses.items():
        assert _value(samples, "billing_entries_total", status=name) == count, name
    issued = sum(int(p["quoted_amount"]) - int(p["actual_amount"]) for p in credited)
    assert _value(samples, "billing_credit_issued_base_units_total") == issued
    assert sum(int(r["amount"]) for r in first if r["status"] == "credited") == issued
    assert _value(samples, "billing_entry_seconds_count") == len(results)
    assert _value(samples, "billing_fence_results_total", result="OK") > 0
    assert _value(samples, "billing_wal_append_seconds_count") > 0
    assert _value(samples, "billing_fail_open_total") == 0

    # Aggregated across both pool children: each child's own file holds part of the count.
    per_child = _entries_per_process(Path(stack["env"]["PROMETHEUS_MULTIPROC_DIR"]))
    assert sum(per_child.values()) == len(results)
    assert len([pid for pid, n in per_child.items() if n > 0]) == 2, per_child

    # No label value carries a wallet, an entry id or a credential; nor does the page at all.
    secrets = [PASSWORD, *WALLETS, *(w.upper()[2:] for w in WALLETS)]
    for (_name, labels), _ in samples.items():
        for label, value in labels:
            assert not re.search(r"0x[0-9a-fA-F]{6,}", value), (label, value)
            assert not value.startswith(("cr-", "nc-", "bad-")), (label, value)
            assert all(secret not in value for secret in secrets), (label, value)
    assert PASSWORD not in body
    assert all(wallet not in body.lower() for wallet in WALLETS)
    assert PASSWORD not in stack["log"].read_text(errors="replace")


def _entries_per_process(directory: Path) -> dict[str, float]:
    """``billing_entries_total`` summed per process file of the multiprocess directory."""
    per_pid: dict[str, float] = {}
    for path in sorted(directory.glob("counter_*.db")):
        pid = path.stem.removeprefix("counter_")
        total = 0.0
        for metric in MultiProcessCollector.merge([str(path)], accumulate=False):  # type: ignore[no-untyped-call]
            if metric.name == "billing_entries":
                total += sum(s.value for s in metric.samples if s.name == "billing_entries_total")
        per_pid[pid] = total
    return per_pid


def test_every_family_and_known_label_is_exported_before_any_traffic(stack: dict[str, Any]) -> None:
    """A scrape of an idle worker already holds every family and every known label value at 0:
    ``increase(billing_corrupt_total[5m]) > 0`` can then fire on the very first CORRUPT."""
    status, body = http_get(f"http://127.0.0.1:{stack['port']}/metrics")
    assert status == 200
    samples = _samples(body)
    names = {family.name for family in text_string_to_metric_families(body)}
    for expected in (
        "billing_entries",
        "billing_fence_results",
        "billing_fail_open",
        "billing_credit_issued_base_units",
        "billing_credit_used_base_units",
        "billing_cap_exceeded",
        "billing_corrupt",
        "billing_replayed",
        "billing_breaker_open",
        "billing_wal_append_seconds",
        "billing_entry_seconds",
    ):
        assert expected in names, (expected, sorted(names))
    for status_value in ("credited", "no_credit", "duplicate", "deferred", "cap_exceeded", "rejected"):
        assert ("billing_entries_total", (("status", status_value),)) in samples, status_value
    for result in ("OK", "STALE", "CORRUPT", "UNAVAILABLE"):
        assert ("billing_fence_results_total", (("result", result),)) in samples, result
    for what in ("fence", "balance", "token_overflow"):
        assert _value(samples, "billing_corrupt_total", what=what) == 0
        assert ("billing_corrupt_total", (("what", what),)) in samples, what
    assert _value(samples, "billing_entry_seconds_count") == 0
    assert _value(samples, "billing_breaker_open") == 0
    # deploy/README.md: billing_pending for every partition, 0 included, without a pid label.
    pending = {labels: value for (name, labels), value in samples.items() if name == "billing_pending"}
    assert pending == {(("partition", str(n)),): 0.0 for n in range(4)}, pending


def test_initialised_label_values_follow_the_enums() -> None:
    from worker import metrics
    from worker.fencing import FenceResult
    from worker.pipeline import Status

    assert set(metrics.ENTRY_STATUSES) == {s.value for s in Status}
    assert set(metrics.FENCE_RESULT_VALUES) == {r.value for r in FenceResult}
