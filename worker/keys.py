"""Redis key names (DESIGN.md §4, contract).

Braces are Redis Cluster hash tags: every key one script touches shares a slot. ``env`` is
``BILLING_ENV``, so two environments sharing one Redis never see each other's keys.
"""

from __future__ import annotations


def lease_lock(env: str, partition: int) -> str:
    """Holder id of the partition's writer lease (``PX`` ttl)."""
    return f"wal:writer:lock:{{{env}:{partition}}}"


def fence_counter(env: str, partition: int) -> str:
    """The partition's fencing-token counter."""
    return f"wal:writer:fence:{{{env}:{partition}}}"


def fence_watermark(env: str, partition: int) -> str:
    """The partition's validate-and-advance watermark (highest accepted token)."""
    return f"wal:writer:last_accepted:{{{env}:{partition}}}"


def credit_balance(env: str, wallet: str) -> str:
    """A wallet's credit balance: decimal integer string, base units, TTL 7 days."""
    return f"x402:credit:{{{env}:{wallet}}}:balance"


def credit_note(env: str, wallet: str, note_id: str) -> str:
    """A credit note's JSON record; its existence marks the note applied."""
    return f"x402:credit:{{{env}:{wallet}}}:{note_id}"


def credit_use(env: str, wallet: str, request_id: str) -> str:
    """Consumption marker of one ``apply_credit`` request (idempotency)."""
    return f"x402:credit:{{{env}:{wallet}}}:use:{request_id}"
