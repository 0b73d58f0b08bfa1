"""Re-derive the Redis credit state of a partition from its WAL (after Redis lost its data).

The WAL holds every applied note (APPLIED outcome with amount and time) and every consumption
(CREDIT_USED with amount and time). Replaying them per wallet in LSN order, with the Redis TTL
rules (each issuance refreshes the balance TTL; consumption keeps it; a balance whose TTL ran out
is gone), gives the balance, the notes and the consumption markers Redis should hold now, with
their remaining TTLs. Values are *set*, never added, so a rebuild is idempotent. It runs under
the partition's writer lease, so no fenced writer changes those wallets meanwhile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker import keys
from worker.credit import note_id_for
from worker.errors import RetryLater
from worker.fencing import FenceResult, Fencing
from worker.state_redis import StateRedis
from worker.wal import Partition, Record, RecordType


@dataclass
class WalletState:
    """What Redis should hold for one wallet. Times are Unix milliseconds."""

    balance: int = 0
    expires_at_ms: int | None = None
    notes: list[tuple[str, str, int]] = field(default_factory=list)  #: (note id, json, expires at)
    uses: list[tuple[str, str, int]] = field(default_factory=list)  #: (request id, marker, expires at)


@dataclass(frozen=True)
class RebuildReport:
    partition: int
    wallets: int
    notes: int
    uses: int
    balance_total: int


def derive(records: Iterable[Record], *, ttl_s: int) -> dict[str, WalletState]:
    """Fold a partition's records (LSN order) into the per-wallet state Redis should hold."""
    ttl_ms = ttl_s * 1000
    entries: dict[str, dict[str, Any]] = {}
    wallets: dict[str, WalletState] = {}
    for record in records:
        body = record.body
        if record.type is RecordType.ENTRY:
            entries[record.entry_id] = body
        elif record.type is RecordType.APPLIED and record.entry_id in entries:
            entry = entries[record.entry_id]
            state = wallets.setdefault(entry["wallet"], WalletState())
            at = int(body["at"])
            if state.expires_at_ms is not None and at > state.expires_at_ms:
                state.balance = 0
            state.balance += int(body["amount"])
            state.expires_at_ms = at + ttl_ms
            note = {
                "id": body.get("credit_note_id") or note_id_for(record.entry_id),
                "entry_id": record.entry_id,
                "wallet": entry["wallet"],
                "quote_id": entry["quote_id"],
                "amount": body["amount"],
            }
            state.notes.append((note["id"], json.dumps(note, sort_keys=True), at + ttl_ms))
        elif record.type is RecordType.CREDIT_USED:
            state = wallets.setdefault(body["wallet"], WalletState())
            at = int(body["at"])
            if state.expires_at_ms is not None and at > state.expires_at_ms:
                state.balance = 0
            used = int(body["credit_used"])
            state.balance = max(state.balance - used, 0)
            marker = f"{used}:{body['remaining_credit']}:{record.entry_id}"
            state.uses.append((record.entry_id, marker, at + ttl_ms))
    return wallets


def rebuild_partition(
    partition_no: int,
    partition: Partition,
    *,
    state: StateRedis,
    fencing: Fencing,
    ttl_s: int,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> RebuildReport:
    """Rebuild the Redis credit state of one partition under its lease. Raises RetryLater when
    the lease is busy or the fence is not OK; RedisUnavailable on an outage."""
    from worker.errors import LeaseBusy

    try:
        lease = fencing.acquire(partition_no, floor=partition.highest_token)
    except LeaseBusy as busy:
        raise RetryLater("busy", str(busy)) from None
    try:
        fence = fencing.validate_and_advance(lease)
        if fence is not FenceResult.OK:
            raise RetryLater(fence.value.lower(), f"partition {partition_no}: fence {fence.value}")
        with partition.locked():
            wallets = derive(partition.records(), ttl_s=ttl_s)
        now = now_ms()
        notes = uses = total = 0

        def write() -> None:
            pipe = state.client.pipeline(transaction=False)
            for wallet, wallet_state in wallets.items():
                balance_key = keys.credit_balance(fencing.env, wallet)
                if wallet_state.expires_at_ms is not None and wallet_state.expires_at_ms > now:
                    pipe.set(balance_key, str(wallet_state.balance), px=wallet_state.expires_at_ms - now)
                else:
                    pipe.delete(balance_key)
                for note_id, note_json, expires in wallet_state.notes:
                    if expires > now:
                        pipe.set(keys.credit_note(fencing.env, wallet, note_id), note_json, px=expires - now)
                for request_id, marker, expires in wallet_state.uses:
                    if expires > now:
                        pipe.set(keys.credit_use(fencing.env, wallet, request_id), marker, px=expires - now)
            lease.ensure_held()
            pipe.execute()

        state.call(write)
        for wallet_state in wallets.values():
            live = wallet_state.expires_at_ms is not None and wallet_state.expires_at_ms > now
            total += wallet_state.balance if live else 0
            notes += sum(1 for *_, expires in wallet_state.notes if expires > now)
            uses += sum(1 for *_, expires in wallet_state.uses if expires > now)
        return RebuildReport(partition_no, len(wallets), notes, uses, total)
    finally:
        fencing.release(lease)
