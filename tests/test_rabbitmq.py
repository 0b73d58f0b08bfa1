"""RabbitMQ as the broker (``BILLING_BROKER_URL=amqp://...``), Redis as result backend and state.

Each run creates its own vhost on the machine's RabbitMQ (127.0.0.1:5672, guest/guest) and
deletes it afterwards, so no other queue is touched. Workers run as subprocesses (prefork, 2).
If RabbitMQ is not reachable the tests fail with a message saying so: they never skip.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.support.procs import client_app, close_client, log_tail, rabbit_vhost, wait_until, worker_env
from tests.support.redis_server import RedisServer
from worker.devstack import CeleryProcess, worker_args
from worker.samples import entry, sample_entries, wallet_address

W1, W2 = wallet_address(1), wallet_address(2)


@dataclass
class Rabbit:
    vhost: str
    env: dict[str, str]
    app: Celery
    tmp_path: Path
    workers: list[CeleryProcess]

    def start_worker(self, name: str) -> CeleryProcess:
        log = self.tmp_path / f"{name}.log"
        args = worker_args(concurrency=2, name=name)
        args[args.index("--loglevel") + 1] = "INFO"  # one line per task: the log explains a failure
        worker = CeleryProcess(args, env=self.env, log_path=log)
        self.workers.append(worker)
        return worker.start()

    def runtime(self) -> Any:
        from worker.runtime import build_runtime
        from worker.settings import Settings

        settings = Settings(
            env=self.env["BILLING_ENV"],
            redis_url=self.env["BILLING_REDIS_URL"],
            wal_dir=Path(self.env["BILLING_WAL_DIR"]),
            partitions=int(self.env["BILLING_PARTITIONS"]),
        )
        return build_runtime(settings)

    def logs(self) -> str:
        return "\n".join(f"--- {w.log_path} ---\n{log_tail(w.log_path, 60)}" for w in self.workers)


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[Rabbit]:
    with rabbit_vhost() as vhost:
        state = RedisServer(tmp_path / "state").start()
        backend = RedisServer(tmp_path / "backend").start()
        env = worker_env(
            tmp_path=tmp_path,
            state_url=state.url,
            broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            result_backend=backend.url,
            env_name="rmq",
            BILLING_LEASE_TTL_MS="2000",
        )
        app = client_app(env["BILLING_BROKER_URL"], env["BILLING_RESULT_BACKEND"])
        fixture = Rabbit(vhost, env, app, tmp_path, [])
        try:
            yield fixture
        finally:
            for worker in fixture.workers:
                worker.stop()
            close_client(app)
            backend.stop()
            state.stop()


def _send(app: Celery, payloads: list[dict[str, Any]]) -> list[Any]:
    return [app.send_task("billing.process_entry", args=[p], queue="billing") for p in payloads]


def _queue_depth(vhost: str, queue: str) -> int | None:
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name", "messages"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return None


def test_happy_path_over_amqp(rabbit: Rabbit) -> None:
    rabbit.start_worker("rmq-a")
    first = [entry("r-1", W1, 1_000, 400), entry("r-2", W2, 500, 500), entry("r-3", W1, 2_000, 1_500)]
    bad = {**entry("r-bad", W1, 10, 1), "quoted_amount": 1.5}
    results = [r.get(timeout=60) for r in _send(rabbit.app, [*first, bad])]
    assert [r["status"] for r in results] == ["credited", "no_credit", "credited", "rejected"], rabbit.logs()
    assert results[0]["amount"] == "600" and results[2]["balance"] == "1100"
    assert results[3]["reason"].startswith("quoted_amount: ")
    again = _send(rabbit.app, [first[0]])[0].get(timeout=60)
    assert again["status"] == "duplicate" and again["credit_note_id"] == results[0]["credit_note_id"]


    runtime = rabbit.runtime()
    try:
        report = runtime.check_invariants({"r-1", "r-2", "r-3"})
        assert report.ok, report.problems
        assert report.balances == {W1: 1_100}
        assert report.rejected_records == 1
    finally:
        runtime.close()
    # The messages really went through this run's vhost, and none is left there.
    assert _queue_depth(rabbit.vhost, "billing") == 0


@pytest.mark.parametrize("batch_size", ["1", "50"], ids=["single", "batch50"])
def test_sigkilled_worker_redelivers_and_every_entry_has_exactly_one_outcome(rabbit: Rabbit, batch_size: str) -> None:
    """Unlike the Redis broker (see tests/test_chaos.py), AMQP loses no message to a SIGKILL:
    every entry gets its answer from the messages the broker itself kept, none re-sent."""
    rabbit.env["BILLING_BATCH_SIZE"] = batch_size
    payloads = sample_entries(300, wallets=8, prefix="k")
    first = rabbit.start_worker("rmq-first")
    pending = _send(rabbit.app, payloads)
    wait_until(
        lambda: any(r.ready() for r in pending[:20]),
        timeout_s=60,
        what="the first results from the first worker",
        every_s=0.01,
        log=first.log_path,
    )
    first.kill()  # SIGKILL to the whole process group: main process and both pool children
    assert first.process is not None
    first.process.wait(timeout=10)
    done_at_kill = sum(1 for r in pending if r.ready())
    assert 0 < done_at_kill < len(payloads), "the kill must land while entries were still queued"
    # The broker kept every unfinished message, the dead worker's unacked ones included.
    unfinished = len(payloads) - done_at_kill
    wait_until(
        lambda: (_queue_depth(rabbit.vhost, "billing") or 0) >= unfinished,
        timeout_s=30,
        what=f"RabbitMQ to hold the {unfinished} unfinished messages again",
        every_s=0.2,
    )

    rabbit.start_worker("rmq-second")

    def unfinished_report() -> str:
        waiting = [p["entry_id"] for p, r in zip(payloads, pending, strict=True) if not r.ready()]
        return f"{len(waiting)} entries without a result: {waiting[:20]}\n{rabbit.logs()}"

    wait_until(
        lambda: all(r.ready() for r in pending),
        timeout_s=90,
        what="every entry's result after the restart",
        every_s=0.1,
        detail=unfinished_report,
    )
    results = [r.get(timeout=10) for r in pending]
    statuses = Counter(r["status"] for r in results)
    # A redelivered entry whose first attempt finished answers `duplicate` with the original outcome.
    assert set(statuses) <= {"credited", "no_credit", "duplicate"}, (statuses, rabbit.logs())
    for payload, result in zip(payloads, results, strict=True):
        assert result["entry_id"] == payload["entry_id"]
        quoted, actual = int(payload["quoted_amount"]), int(payload["actual_amount"])
        if quoted > actual:
            assert result.get("amount") == str(quoted - actual), result


    runtime = rabbit.runtime()
    try:
        report = runtime.check_invariants({p["entry_id"] for p in payloads})
        assert report.ok, report.problems
        assert report.entries == len(payloads)
        assert sum(report.outcomes.values()) == len(payloads)
        expected: Counter[str] = Counter()
        for p in payloads:
            expected[p["wallet"]] += max(int(p["quoted_amount"]) - int(p["actual_amount"]), 0)
        assert report.balances == {w: v for w, v in expected.items() if v}
    finally:
        runtime.close()
    assert _queue_depth(rabbit.vhost, "billing") == 0


def _bindings(vhost: str) -> set[tuple[str, str, str]]:
    out = subprocess.run(
        [
            "rabbitmqctl", "list_bindings", "-p", vhost, "--quiet", "--no-table-headers",
            "source_name", "destination_name", "routing_key",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout  # fmt: skip
    rows = set()
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.add((parts[0], parts[1], parts[2]))
    return rows


def test_each_queue_has_its_own_exchange_and_key(rabbit: Rabbit) -> None:
    """No worker: a billing task, an onboarding task and a raw publish to exchange ``billing`` with
    key ``billing`` (as a non-Celery upstream might send) land once each, in their own queue."""
    from kombu import Exchange

    rabbit.app.send_task("billing.process_entry", args=[entry("q-1", W1, 2, 1)], ignore_result=True)
    rabbit.app.send_task("onboarding.configure_personality", args=["c", "1", {}], ignore_result=True)
    with rabbit.app.producer_or_acquire() as producer:
        producer.publish(
            {"raw": True}, exchange=Exchange("billing", type="direct"), routing_key="billing", serializer="json"
        )
    wait_until(
        lambda: (_queue_depth(rabbit.vhost, "billing"), _queue_depth(rabbit.vhost, "onboarding")) == (2, 1),
        timeout_s=30,
        what="billing to hold 2 messages and onboarding 1",
        every_s=0.2,
    )
    bindings = _bindings(rabbit.vhost)
    assert ("billing", "billing", "billing") in bindings
    assert ("onboarding", "onboarding", "onboarding") in bindings
    assert not [b for b in bindings if b[0] == "billing" and b[1] == "onboarding"], bindings
