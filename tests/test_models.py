"""Strict validation of the task interface (DESIGN.md §3)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.errors import InvalidEntry
from worker.models import parse_apply_credit, parse_entry

VALID: dict[str, Any] = {
    "entry_id": "pay_2026-12-04:0001",
    "wallet": "0x" + "AbCdEf0123" * 4,
    "quote_id": "q.1",
    "quoted_amount": "1500000",
    "actual_amount": 1_200_000,
    "occurred_at": "2026-12-04T10:00:00+00:00",
}


def with_(**changes: Any) -> dict[str, Any]:
    payload = dict(VALID)
    payload.update(changes)
    return payload


def test_valid_entry_is_normalised() -> None:
    entry = parse_entry(VALID)
    assert entry.wallet == VALID["wallet"].lower()
    assert entry.quoted_amount == 1_500_000 and type(entry.quoted_amount) is int
    assert entry.credit_due == 300_000
    assert entry.canonical()["quoted_amount"] == "1500000"
    assert (
        entry.canonical()
        == parse_entry(
            with_(quoted_amount=1_500_000, wallet=VALID["wallet"].upper().replace("0X", "0x"))
        ).canonical()
    )


def test_occurred_at_is_optional() -> None:
    payload = dict(VALID)
    del payload["occurred_at"]
    assert parse_entry(payload).occurred_at is None


def test_bounds_are_inclusive() -> None:
    assert parse_entry(with_(quoted_amount=0, actual_amount="9007199254740991")).actual_amount == 2**53 - 1
    assert parse_entry(with_(entry_id="x" * 128)).entry_id == "x" * 128


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quoted_amount", 1.0),
        ("quoted_amount", 1.5),
        ("quoted_amount", "1e3"),
        ("quoted_amount", " 5"),
        ("quoted_amount", "5 "),
        ("quoted_amount", "-1"),
        ("quoted_amount", -1),
        ("quoted_amount", "+1"),
        ("quoted_amount", "0x10"),
        ("quoted_amount", "1_000"),
        ("quoted_amount", ""),
        ("quoted_amount", "\uff15"),
        ("quoted_amount", True),
        ("quoted_amount", None),
        ("quoted_amount", 2**53),
        ("quoted_amount", "9007199254740992"),
        ("actual_amount", 10**400),
        ("actual_amount", "9" * 5000),
        ("actual_amount", [1]),
        ("wallet", "0x" + "a" * 39),
        ("wallet", "0x" + "g" * 40),
        ("wallet", "a" * 42),
        ("wallet", "0x" + "a" * 40 + "\n"),
        ("entry_id", ""),
        ("entry_id", "x" * 129),
        ("entry_id", "has space"),
        ("entry_id", "trailing\n"),
        ("entry_id", "emoji\u2603"),
        ("entry_id", 12),
        ("quote_id", "a/b"),
        ("occurred_at", "yesterday"),
        ("occurred_at", 1700000000),
    ],
)
def test_bad_field_is_rejected_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidEntry) as error:
        parse_entry(with_(**{field: value}))
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(InvalidEntry) as error:
        parse_entry(with_(discount="5"))
    assert (error.value.field, error.value.reason) == ("discount", "unknown field")


@pytest.mark.parametrize("missing", ["entry_id", "wallet", "quote_id", "quoted_amount", "actual_amount"])
def test_missing_field_is_rejected(missing: str) -> None:
    payload = dict(VALID)
    del payload[missing]
    with pytest.raises(InvalidEntry) as error:
        parse_entry(payload)
    assert error.value.field == missing
    assert "missing" in error.value.reason


@pytest.mark.parametrize("payload", [None, [], "entry", 5, b"{}"])
def test_non_object_payload_is_rejected(payload: object) -> None:
    with pytest.raises(InvalidEntry) as error:
        parse_entry(payload)
    assert error.value.field == "payload"


def test_apply_credit_request() -> None:
    request = parse_apply_credit({"request_id": "r-1", "wallet": VALID["wallet"], "required_amount": "10"})
    assert request.required_amount == 10 and request.wallet == VALID["wallet"].lower()
    with pytest.raises(InvalidEntry) as error:
        parse_apply_credit({"request_id": "r-1", "wallet": VALID["wallet"], "required_amount": 1.0})
    assert error.value.field == "required_amount"
