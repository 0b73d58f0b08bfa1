"""billing.process_entry through a real in-process Celery worker, real Redis, real WAL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.samples import entry, wallet_address

pytestmark = pytest.mark.usefixtures("celery_worker_inproc")

W1 = wallet_address(1)
W2 = wallet_address(2)


def send(payload: Any, task: str = "billing.process_entry") -> dict[str, Any]:
    from worker.app import app

    result: dict[str, Any] = app.send_task(task, args=[payload]).get(timeout=30)
    return result


def runtime() -> Any:
    from worker.runtime import get_runtime

    return get_runtime()


def test_credited_then_duplicate_returns_the_original_outcome() -> None:
    first = send(entry("e-1", W1, 1_500_000, 1_200_000))
    assert first["status"] == "credited"
    assert (first["amount"], first["balance"], first["credit_note_id"]) == ("300000", "300000", "cn_e-1")
    assert first["fencing_token"] >= 1 and first["lsn"] >= 1
    assert 0 <= first["partition"] < 4
    again = send(entry("e-1", W1, 1_500_000, 1_200_000))
    assert again["status"] == "duplicate"
    for field in ("amount", "balance", "credit_note_id", "lsn", "fencing_token", "partition"):
        assert again[field] == first[field], field
    assert runtime().ledger.balance(W1) == 300_000


def test_no_credit_when_actual_at_least_quoted() -> None:
    result = send(entry("e-2", W1, 1_000, 1_000))
    assert result["status"] == "no_credit"
    assert "amount" not in result and "credit_note_id" not in result
    assert runtime().ledger.balance(W1) == 0


def test_cap_exceeded_is_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    cap = runtime().settings.max_credit_balance
    assert send(entry("big-1", W2, cap, 0))["status"] == "credited"
    over = send(entry("big-2", W2, 5, 0))
    assert over["status"] == "cap_exceeded"
    assert over["balance"] == str(cap) and over["amount"] == "5"
    assert send(entry("big-2", W2, 5, 0))["status"] == "duplicate"
    assert runtime().ledger.balance(W2) == cap


def test_same_entry_id_with_other_content_is_rejected_and_recorded() -> None:
    assert send(entry("e-3", W1, 100, 10))["status"] == "credited"
    conflict = send(entry("e-3", W1, 100, 11))
    assert conflict["status"] == "rejected"
    assert conflict["reason"].startswith("entry_id:")
    assert runtime().ledger.balance(W1) == 90
    partition = runtime().store.partition(conflict["partition"])
    with partition.locked():
        rejected = list(partition.rejected())
    assert [r.entry_id for r in rejected] == ["e-3"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quoted_amount": 1.5}, "quoted_amount"),
        ({"actual_amount": "1e3"}, "actual_amount"),
        ({"actual_amount": "-1"}, "actual_amount"),
        ({"quoted_amount": True}, "quoted_amount"),
        ({"quoted_amount": "9007199254740992"}, "quoted_amount"),
        ({"wallet": "0x1234"}, "wallet"),
        ({"entry_id": "has space"}, "entry_id"),
        ({"quote_id": ""}, "quote_id"),
        ({"occurred_at": "soon"}, "occurred_at"),
        ({"tip": "1"}, "tip"),
    ],
)
def test_each_bad_field_is_rejected_with_a_reason_and_recorded(change: dict[str, Any], field: str) -> None:
    payload = {**entry("bad", W1, 10, 1), **change}
    result = send(payload)
    assert result["status"] == "rejected"
    assert result["reason"].startswith(f"{field}: ")
    assert result["fencing_token"] == 0
    records = [r for n in range(4) for r in runtime().store.partition(n).rejected()]
    assert len(records) == 1
    assert records[0].body["field"] == field
    assert json.loads(records[0].body["raw"]) == payload
    assert runtime().ledger.balance(W1) == 0


def test_non_object_payload_is_rejected() -> None:
    result = send(["not", "an", "object"])
    assert result["status"] == "rejected"
    assert result["reason"].startswith("payload: ")


def test_apply_credit_consumes_once() -> None:
    send(entry("fund", W1, 1_000, 0))
    payload = {"request_id": "pay-1", "wallet": W1, "required_amount": "300"}
    first = send(payload, "billing.apply_credit")
    assert (first["credit_used"], first["reduced_amount"], first["remaining_credit"]) == ("300", "0", "700")
    again = send(payload, "billing.apply_credit")
    assert again["status"] == "duplicate"
    assert (again["credit_used"], again["remaining_credit"]) == ("300", "700")
    assert runtime().ledger.balance(W1) == 700
    bad = send({"request_id": "pay-2", "wallet": W1, "required_amount": 1.0}, "billing.apply_credit")
    assert bad["status"] == "rejected" and bad["credit_used"] == "0"


def test_pending_entry_is_completed_by_the_redelivered_attempt() -> None:
    """A first attempt that died after its WAL append left the entry pending: the redelivery
    completes it under the lease (it does not wait for replay) and credits exactly once."""
    from worker.models import parse_entry
    from worker.wal import RecordType

    payload = entry("crashed", W1, 900, 100)
    rt = runtime()
    n = rt.store.partition_for_wallet(W1)
    partition = rt.store.partition(n)
    with rt.fencing.lease(n, floor=partition.highest_token) as lease:  # what the dead attempt did
        assert rt.fencing.validate_and_advance(lease).value == "OK"
        partition.append(RecordType.ENTRY, lease.token, "crashed", parse_entry(payload).canonical())
    assert partition.pending_count == 1
    result = send(payload)
    assert result["status"] == "credited" and result["amount"] == "800"
    assert send(payload)["status"] == "duplicate"
    assert rt.ledger.balance(W1) == 800
    assert partition.pending_count == 0


def test_onboarding_task_on_its_queue() -> None:
    from worker.app import app

    result = app.send_task(
        "onboarding.configure_personality", args=["apes", "9", {"voice": "calm"}], queue="onboarding"
    ).get(timeout=30)
    assert result["status"] == "created"
    assert result["personality"]["voice"] == "calm"


def test_maintenance_tasks_report_backlog_and_checkpoint() -> None:
    from worker.app import app, celery_config

    send(entry("m-1", W1, 100, 1))
    backlog = app.send_task("billing.report_backlog").get(timeout=30)
    assert backlog == {"0": 0, "1": 0, "2": 0, "3": 0}
    checkpoint = app.send_task("billing.checkpoint").get(timeout=30)
    assert set(checkpoint) == {"0", "1", "2", "3"}
    replay = app.send_task("billing.replay_pending").get(timeout=30)
    assert [r["partition"] for r in replay] == [0, 1, 2, 3]
    schedule = celery_config(runtime().settings)["beat_schedule"]
    assert {s["task"] for s in schedule.values()} == {
        "billing.replay_pending",
        "billing.checkpoint",
        "billing.report_backlog",
    }


def test_reliability_settings_of_the_app() -> None:
    from worker.app import app

    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == runtime().settings.batch_size  # 1, or a whole batch
    assert conf.accept_content == ["json"]
    assert runtime().settings.retry_max_s < conf.broker_transport_options["visibility_timeout"]


def test_messages_held_for_their_eta_do_not_starve_the_others() -> None:
    """More retries waiting for their countdown than the prefetch window (1 single, 50 batch)
    must not stop the worker fetching other messages: as Celery does for ETA tasks, a held
    message widens the window while it waits."""
    from worker.app import app

    held = [
        app.send_task("billing.process_entry", args=[entry(f"later-{i}", W1, 100, 1)], countdown=600)
        for i in range(60)
    ]
    now = [app.send_task("billing.process_entry", args=[entry(f"now-{i}", W2, 100, 1)]) for i in range(5)]
    assert [r.get(timeout=30)["status"] for r in now] == ["credited"] * 5
    assert not any(r.ready() for r in held)
    assert runtime().ledger.balance(W2) == 5 * 99 and runtime().ledger.balance(W1) == 0
