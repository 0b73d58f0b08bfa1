"""Credit notes: the capped, idempotent increment (issue) and idempotent consumption (apply).

Amounts are ``int`` base units in ``[0, 2**53 - 1]``; they cross into Lua as decimal strings.
A note's id is derived from the entry id (:func:`note_id_for`), so every retry of one entry is
the same note and the script answers ``DUPLICATE`` instead of crediting twice. Outcomes are
values, not exceptions: an unreachable Redis is ``UNAVAILABLE``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from redis.commands.core import Script
from redis.exceptions import ResponseError

from worker import keys
from worker.errors import InvalidAmount, RedisUnavailable
from worker.limits import MAX_SAFE_INTEGER, is_safe_int, parse_canonical
from worker.redis_pipe import SentCalls, evalsha_many, pack_evalsha
from worker.state_redis import StateRedis


class CreditOutcome(StrEnum):
    APPLIED = "APPLIED"
    DUPLICATE = "DUPLICATE"
    CAP_EXCEEDED = "CAP_EXCEEDED"
    CORRUPT = "CORRUPT"
    NO_CREDIT = "NO_CREDIT"
    UNAVAILABLE = "UNAVAILABLE"


class CreditResult(NamedTuple):
    """Outcome of one issuance. ``balance`` is the balance after it (APPLIED) or as found
    (DUPLICATE, CAP_EXCEEDED); ``None`` when unknown. ``raw`` holds a CORRUPT stored value.
    (A named tuple: replay builds one per record, and a frozen dataclass costs several times more.)"""

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


#: Script reply status -> outcome (a dict lookup is much cheaper than ``CreditOutcome(s)``).
_OUTCOME_OF_REPLY: dict[str, CreditOutcome] = {o.value: o for o in CreditOutcome}
#: A str as a JSON string literal, exactly as ``json.dumps`` writes it (ensure_ascii).
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _amount(name: str, value: int, *, minimum: int = 0) -> str:
    if not is_safe_int(value) or value < minimum:
        raise InvalidAmount(f"{name} must be an int in [{minimum}, {MAX_SAFE_INTEGER}], got {value!r}")
    return str(value)


class IssueInFlight:
    """Credit notes sent by :meth:`CreditLedger.start_issue`, answers not read yet."""

    def __init__(self, results: list[CreditResult], pending: list[int], finish: Callable[[], Any] | None) -> None:
        self._results = results
        self._pending = pending  #: index in ``results`` of each call sent
        self._finish = finish

    def results(self) -> list[CreditResult]:
        """One result per entry, in order; all sent ones ``UNAVAILABLE`` when Redis did not
        answer (some may have been applied: a retry answers ``DUPLICATE``, never credits twice).
        Raises :class:`~worker.errors.ScriptError` on an error reply. Reads once; later calls
        return the same list."""
        finish, self._finish = self._finish, None
        if finish is None:
            return self._results
        try:
            replies: list[Any] = finish()
        except RedisUnavailable:
            return self._results  # every sent call's result is UNAVAILABLE already
        results, new = self._results, tuple.__new__
        outcome_of, corrupt = _OUTCOME_OF_REPLY, CreditOutcome.CORRUPT
        for index, (status, value) in zip(self._pending, replies, strict=True):
            _, note_id, delta, _, _ = results[index]
            outcome = outcome_of[status]
            if outcome is corrupt:
                results[index] = new(CreditResult, (outcome, note_id, delta, None, str(value)))
            else:
                results[index] = new(CreditResult, (outcome, note_id, delta, int(value), None))
        return results


class PreparedIssue:
    """Credit calls built and packed by :meth:`CreditLedger.prepare_issue`, not sent yet."""

    def __init__(
        self,
        state: StateRedis,
        script: Script,
        results: list[CreditResult],
        pending: list[int],
        calls: list[tuple[str, str, str, str, str, str]],
        packed: list[bytes],
    ) -> None:
        self._state = state
        self._script = script
        self._results = results
        self._pending = pending
        self._calls = calls
        self._packed = packed

    def send(self) -> IssueInFlight:
        """Send the calls (one buffer, one connection) under the breaker and the bounded
        retry of :meth:`StateRedis.start_call`; breaker open: every result ``UNAVAILABLE``."""
        results, pending, calls = self._results, self._pending, self._calls
        if not calls:
            return IssueInFlight(results, pending, None)
        client, script, packed = self._state.client, self._script, self._packed

        def checked(replies: list[Any]) -> list[Any]:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply  # StateRedis: ScriptError
            return replies

        def send() -> Callable[[], list[Any]]:
            sent = SentCalls(client, script, 2, calls, packed)
            return lambda: checked(sent.replies())

        try:
            finish = self._state.start_call(send, lambda: checked(evalsha_many(client, script, 2, calls)))
        except RedisUnavailable:
            finish = None  # breaker open: every result stays UNAVAILABLE
        return IssueInFlight(results, pending, finish)


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
        return self.issue_entries(
            [
                (str(r["entry_id"]), str(r["wallet"]), str(r["quote_id"]), int(r["quoted"]), int(r["actual"]))
                for r in requests
            ]
        )

    def issue_entries(self, entries: Sequence[tuple[str, str, str, int, int]]) -> list[CreditResult]:
        """:meth:`issue_many` for ``(entry_id, wallet, quote_id, quoted, actual)`` tuples: the hot
        path of replay and of the batch consumer (no dicts, notes built without ``json.dumps``,
        the calls packed by :mod:`worker.redis_pipe`).

        Raises :class:`InvalidAmount` before any call when an amount is outside ``[0, 2**53-1]``,
        :class:`~worker.errors.ScriptError` when the script answers an error.
        """
        return self.start_issue(entries).results()

    def start_issue(self, entries: Sequence[tuple[str, str, str, int, int]]) -> IssueInFlight:
        """:meth:`issue_entries` in two halves: send the calls now, read the answers with
        :meth:`IssueInFlight.results` (always call it: the connection and, in a half-open
        breaker, the probe wait for it). Replay appends one chunk's outcomes meanwhile."""
        return self.prepare_issue(entries).send()

    def prepare_issue(self, entries: Sequence[tuple[str, str, str, int, int]]) -> PreparedIssue:
        """Build and pack the credit calls of ``entries`` without touching Redis, so replay can
        do it while Redis runs the previous chunk; :meth:`PreparedIssue.send` sends them.
        Raises :class:`InvalidAmount` when an amount is outside ``[0, 2**53-1]``."""
        results: list[CreditResult] = []
        calls: list[tuple[str, str, str, str, str, str]] = []
        pending: list[int] = []  #: index in ``results`` of each call
        no_credit = CreditResult(CreditOutcome.NO_CREDIT, None, 0)
        new, unavailable = tuple.__new__, CreditOutcome.UNAVAILABLE
        cap_s, ttl_s, env, quote = str(self.cap), str(self.ttl_s), self.env, _json_string
        balance_key, note_key = keys.credit_balance, keys.credit_note
        for entry_id, wallet, quote_id, quoted, actual in entries:
            if type(quoted) is not int or not 0 <= quoted <= MAX_SAFE_INTEGER:
                _amount("quoted", quoted)
            if type(actual) is not int or not 0 <= actual <= MAX_SAFE_INTEGER:
                _amount("actual", actual)
            if actual >= quoted:
                results.append(no_credit)
                continue
            note_id = "cn_" + entry_id  # note_id_for, inlined
            delta_s = str(quoted - actual)
            note = (  # json.dumps(note, sort_keys=True), byte for byte (test_credit checks it)
                f'{{"amount": "{delta_s}", "entry_id": {quote(entry_id)}, "id": {quote(note_id)}, '
                f'"quote_id": {quote(quote_id)}, "wallet": {quote(wallet)}}}'
            )
            pending.append(len(results))
            results.append(new(CreditResult, (unavailable, note_id, quoted - actual, None, None)))
            calls.append((balance_key(env, wallet), note_key(env, wallet, note_id), delta_s, cap_s, ttl_s, note))
        script = self._scripts.credit_issue
        packed = pack_evalsha(script.sha, 2, calls) if calls else []
        return PreparedIssue(self._state, script, results, pending, calls, packed)

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
