"""The billing entry and the apply-credit request (DESIGN.md §3, contract), strictly validated.

Use :func:`parse_entry` / :func:`parse_apply_credit` at the boundary: they raise
:class:`~worker.errors.InvalidEntry` naming the first bad field, never a pydantic error.
Amounts are Python ``int`` base units in ``[0, 2**53 - 1]``; on the wire they are JSON integers
or decimal-digit strings; floats, booleans, signs, exponents, blanks and hex are refused.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from worker.errors import InvalidEntry
from worker.limits import MAX_SAFE_INTEGER

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_WALLET = re.compile(r"0x[0-9a-fA-F]{40}")
_DIGITS = re.compile(r"[0-9]+")


def _identifier(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if not _ID.fullmatch(value):
        raise ValueError("must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def normalise_wallet(value: object) -> str:
    """``0x`` + 40 hex digits, lowercased; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__}")
    if not _WALLET.fullmatch(value):
        raise ValueError("must be 0x followed by 40 hex digits")
    return value.lower()


def _amount(value: object) -> int:
    if type(value) is int:
        number = value
    elif isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("must be a decimal-digit string (no sign, blank, dot or exponent)")
        number = int(value) if len(value) <= 32 else MAX_SAFE_INTEGER + 1
    else:
        raise ValueError(
            f"must be an integer or a decimal-digit string, got {type(value).__name__}"
        )
    if not 0 <= number <= MAX_SAFE_INTEGER:
        raise ValueError(f"must be between 0 and {MAX_SAFE_INTEGER}")
    return number


def _timestamp(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO-8601 string, got {type(value).__name__}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO-8601 timestamp") from None


Identifier = Annotated[str, BeforeValidator(_identifier)]
Wallet = Annotated[str, BeforeValidator(normalise_wallet)]
Amount = Annotated[int, BeforeValidator(_amount)]
Timestamp = Annotated[datetime | None, BeforeValidator(_timestamp)]


class BillingEntry(BaseModel):
    """One settled payment: quoted at ``quoted_amount``, actually cost ``actual_amount``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry_id: Identifier
    wallet: Wallet
    quote_id: Identifier
    quoted_amount: Amount
    actual_amount: Amount
    occurred_at: Timestamp = None

    @property
    def credit_due(self) -> int:
        """``quoted - actual`` in base units when positive, else 0."""
        return max(self.quoted_amount - self.actual_amount, 0)

    def canonical(self) -> dict[str, Any]:
        """The entry as the WAL stores it: amounts as strings, wallet lowercase; the idempotency
        content (two deliveries are the same entry exactly when their canonical forms are equal).
        """
        return {
            "entry_id": self.entry_id,
            "wallet": self.wallet,
            "quote_id": self.quote_id,
            "quoted_amount": str(self.quoted_amount),
            "actual_amount": str(self.actual_amount),
            "occurred_at": self.occurred_at.isoformat() if self.occurred_at else None,
        }


class ApplyCreditRequest(BaseModel):
    """Consume up to ``required_amount`` of ``wallet``'s credit, once per ``request_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: Identifier
    wallet: Wallet
    required_amount: Amount


def _invalid(error: ValidationError) -> InvalidEntry:
    first = error.errors()[0]
    loc = first.get("loc") or ()
    field = ".".join(str(part) for part in loc) or "payload"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return InvalidEntry(field, "unknown field")
    if kind == "missing":
        return InvalidEntry(field, "required field is missing")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return InvalidEntry(field, message)


def _require_object(raw: object) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidEntry("payload", f"must be a JSON object, got {type(raw).__name__}")
    return raw


def parse_entry(raw: object) -> BillingEntry:
    """Validate an upstream payload; raise :class:`InvalidEntry` naming the first bad field."""
    try:
        return BillingEntry.model_validate(_require_object(raw))
    except ValidationError as error:
        raise _invalid(error) from None


def parse_apply_credit(raw: object) -> ApplyCreditRequest:
    """Validate an ``apply_credit`` payload; raise :class:`InvalidEntry` naming the field."""
    try:
        return ApplyCreditRequest.model_validate(_require_object(raw))
    except ValidationError as error:
        raise _invalid(error) from None
