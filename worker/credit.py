"""Credit notes: the capped, idempotent increment (issue) and idempotent consumption (apply).

Amounts are ``int`` base units in ``[0, 2**53 - 1]``; they cross into Lua as decimal strings.
A note's id is derived from the entry id (:func:`note_id_for`), so every retry of one entry is
the same note and the script answers ``DUPLICATE`` instead of crediting twice. Outcomes are
values, not exceptions: an unreachable Redis is ``UNAVAILABLE``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from worker import keys
from worker.errors import InvalidAmount, RedisUnavailable
from worker.limits import MAX_SAFE_INTEGER, is_safe_int, parse_canonical
from worker.state_redis import StateRedis


class CreditOutcome(StrEnum):
    APPLIED = "APPLIED"
    DUPLICATE = "DUPLICATE"
    CAP_EXCEEDED = "CAP_EXCEEDED"
    CORRUPT = "CORRUPT"
    NO_CREDIT = "NO_CREDIT"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class CreditResult:
    """Outcome of one issuance. ``balance`` is the balance after it (APPLIED) or as found
    (DUPLICATE, CAP_EXCEEDED); ``None`` when unknown. ``raw`` holds a CORRUPT stored value."""

    outcome: CreditOutcome
    note_id: str | None
    amount: int
    balance: int | None = None
    raw: str | None = None


@dataclass(frozen=True)
class ConsumeResult:
    """Outcome of one ``apply_credit``: ``credit_used`` + ``reduced_amount`` = required."""

    outcome: CreditOutcome
    required_amount: int
    credit_used: int
    remaining_credit: int | None

    @property
    def reduced_amount(self) -> int:
        """What is still to be paid after the credit, base units."""
        return self.required_amount - self.credit_used


def note_id_for(entry_id: str) -> str:
    """The credit note id of an entry: deterministic, so a retried entry is the same note."""
    return f"cn_{entry_id}"


def _amount(name: str, value: int, *, minimum: int = 0) -> str:
    if not is_safe_int(value) or value < minimum:
        raise InvalidAmount(f"{name} must be an int in [{minimum}, {MAX_SAFE_INTEGER}], got {value!r}")
    return str(value)


class CreditLedger:
    """Credit balances and notes of one environment on the state Redis."""

    def __init__(self, state: StateRedis, *, env: str, cap: int, ttl_s: int) -> None:
        self._state = state
        self._scripts = state.scripts
        self.env = env
        self.cap = cap
        self.ttl_s = ttl_s

    def issue_for_entry(
        self, *, entry_id: str, wallet: str, quote_id: str, quoted: int, actual: int
    ) -> CreditResult:
        """Issue ``quoted - actual`` as a note for this entry; ``NO_CREDIT`` when actual ≥ quoted."""
        _amount("quoted", quoted)
        _amount("actual", actual)
        if actual >= quoted:
            return CreditResult(CreditOutcome.NO_CREDIT, None, 0)
        note = {
            "id": note_id_for(entry_id),
            "entry_id": entry_id,
            "wallet": wallet,
            "quote_id": quote_id,
            "amount": str(quoted - actual),
        }
        return self.issue(wallet=wallet, note_id=note["id"], delta=quoted - actual, note=note)

    def issue(self, *, wallet: str, note_id: str, delta: int, note: dict[str, str]) -> CreditResult:
        """Credit ``delta`` (≥ 1) to ``wallet`` under the cap, once per ``note_id``.

        Raises :class:`InvalidAmount` for a delta outside ``[1, 2**53-1]`` (Redis is not called).
        """
        delta_s = _amount("delta", delta, minimum=1)
        try:
            reply = self._state.run(
                self._scripts.credit_issue,
                [keys.credit_balance(self.env, wallet), keys.credit_note(self.env, wallet, note_id)],
                [delta_s, str(self.cap), str(self.ttl_s), json.dumps(note, sort_keys=True)],
            )
        except RedisUnavailable:
            return CreditResult(CreditOutcome.UNAVAILABLE, note_id, delta)
        outcome = CreditOutcome(reply[0])
        if outcome is CreditOutcome.CORRUPT:
            return CreditResult(outcome, note_id, delta, None, raw=str(reply[1]))
        return CreditResult(outcome, note_id, delta, int(reply[1]))

    def issue_many(self, requests: Sequence[Mapping[str, Any]]) -> list[CreditResult]:
        """:meth:`issue_for_entry` for many entries in one pipelined round trip (replay, rebuild).

        Each request has ``entry_id``, ``wallet``, ``quote_id``, ``quoted``, ``actual``. Results are
        in request order; an outage makes every result ``UNAVAILABLE`` (some notes may have been
        applied: a later retry answers ``DUPLICATE`` for those, never a second credit).
        """
        results: list[CreditResult | None] = []
        calls: list[tuple[int, str, list[str], list[str]]] = []
        for index, request in enumerate(requests):
            quoted, actual = int(request["quoted"]), int(request["actual"])
            _amount("quoted", quoted)
            _amount("actual", actual)
            if actual >= quoted:
                results.append(CreditResult(CreditOutcome.NO_CREDIT, None, 0))
                continue
            wallet, entry_id = str(request["wallet"]), str(request["entry_id"])
            note_id = note_id_for(entry_id)
            note = {
                "id": note_id,
                "entry_id": entry_id,
                "wallet": wallet,
                "quote_id": str(request["quote_id"]),
                "amount": str(quoted - actual),
            }
            results.append(None)
            calls.append(
                (
                    index,
                    note_id,
                    [keys.credit_balance(self.env, wallet), keys.credit_note(self.env, wallet, note_id)],
                    [str(quoted - actual), str(self.cap), str(self.ttl_s), json.dumps(note, sort_keys=True)],
                )
            )

        def run_pipeline() -> list[Any]:
            pipe = self._state.client.pipeline(transaction=False)
            for _, _, call_keys, call_args in calls:
                self._scripts.credit_issue(keys=call_keys, args=call_args, client=pipe)
            return list(pipe.execute(raise_on_error=True))

        try:
            replies = self._state.call(run_pipeline) if calls else []
        except RedisUnavailable:
            replies = [None] * len(calls)
        for (index, note_id, _, call_args), reply in zip(calls, replies, strict=True):
            delta = int(call_args[0])
            if reply is None:
                results[index] = CreditResult(CreditOutcome.UNAVAILABLE, note_id, delta)
            elif reply[0] == CreditOutcome.CORRUPT:
                results[index] = CreditResult(CreditOutcome.CORRUPT, note_id, delta, None, raw=str(reply[1]))
            else:
                results[index] = CreditResult(CreditOutcome(reply[0]), note_id, delta, int(reply[1]))
        return [result for result in results if result is not None]

    def apply(self, *, request_id: str, wallet: str, required: int) -> ConsumeResult:
        """Consume up to ``required`` of the wallet's credit, once per ``request_id``.

        Unreachable Redis → ``UNAVAILABLE`` with ``credit_used == 0``: no payment ever gets a
        discount that cannot be verified.
        """
        required_s = _amount("required", required)
        try:
            reply = self._state.run(
                self._scripts.credit_apply,
                [keys.credit_balance(self.env, wallet), keys.credit_use(self.env, wallet, request_id)],
                [required_s, str(self.ttl_s), request_id],
            )
        except RedisUnavailable:
            return ConsumeResult(CreditOutcome.UNAVAILABLE, required, 0, None)
        outcome = CreditOutcome(reply[0])
        if outcome is CreditOutcome.CORRUPT:
            return ConsumeResult(outcome, required, 0, None)
        return ConsumeResult(outcome, required, int(reply[1]), int(reply[2]))

    def balance(self, wallet: str) -> int:
        """The wallet's balance in base units (0 when none). Raises :class:`RedisUnavailable`,
        and :class:`InvalidAmount` when the stored value is corrupt."""
        client = self._state.client
        raw = self._state.call(lambda: client.get(keys.credit_balance(self.env, wallet)))
        if raw is None:
            return 0
        value = parse_canonical(raw)
        if value is None:
            raise InvalidAmount(f"stored balance of {wallet} is corrupt: {raw!r}")
        return value
