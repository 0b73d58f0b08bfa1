"""The flow of DESIGN.md §1, written once; tasks, replay and the CLI all call it.

For one entry: validate → partition = stable hash of the wallet → writer lease + fencing token
(above the WAL's highest token) → validate-and-advance → only on ``OK`` append the entry to the
WAL (fsynced) → capped credit issue → append the outcome → release the lease.

* Redis unreachable before the append: **fail open** — the entry is appended under the partition's
  file lock with token 0 and answered ``deferred``; replay completes it.
* Redis unreachable after the append: ``deferred`` (the entry is pending in the WAL).
* ``STALE`` / lease busy: nothing is appended; :class:`RetryLater` asks the task to retry.
* ``CORRUPT``: **fail closed** — nothing is appended; :class:`RetryLater` keeps the message.
* Idempotency is decided by the WAL, under the partition lock, after catching up: the same
  ``entry_id`` with the same content is a ``duplicate`` (original outcome returned; a pending one is
  completed by this attempt under the lease), with other content ``rejected``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from worker import keys, metrics
from worker.credit import CreditLedger, CreditOutcome, CreditResult, IssueInFlight
from worker.errors import (
    InvalidEntry,
    LeaseBusy,
    LeaseNotOwnedError,
    RedisUnavailable,
    RetryLater,
    StaleTokenError,
    TokenOverflow,
)
from worker.fencing import FenceResult, Fencing, Lease
from worker.gc_pause import gc_paused
from worker.models import BillingEntry, parse_apply_credit, parse_entry
from worker.wal import Classification, Partition, Record, RecordType, WalStore

log = logging.getLogger(__name__)

#: How long an entry waits in-process for a busy partition lease before it is retried, seconds.
LEASE_WAIT_S = 0.5
#: Largest single pause of that wait, seconds.
LEASE_WAIT_STEP_S = 0.02

#: Record types that close an ENTRY.
OUTCOME_TYPES = {RecordType.APPLIED, RecordType.NO_CREDIT, RecordType.CAP_EXCEEDED}


class Status(StrEnum):
    """``status`` of a ``billing.process_entry`` result (DESIGN.md §3, contract)."""

    CREDITED = "credited"
    NO_CREDIT = "no_credit"
    DUPLICATE = "duplicate"
    DEFERRED = "deferred"
    CAP_EXCEEDED = "cap_exceeded"
    REJECTED = "rejected"


_STATUS_OF_RECORD = {
    RecordType.APPLIED: Status.CREDITED,
    RecordType.NO_CREDIT: Status.NO_CREDIT,
    RecordType.CAP_EXCEEDED: Status.CAP_EXCEEDED,
}


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry. Amounts are ``int`` base units (strings in :meth:`to_result`)."""

    entry_id: str | None
    status: Status
    partition: int
    lsn: int | None
    fencing_token: int
    credit_note_id: str | None = None
    amount: int | None = None
    balance: int | None = None
    reason: str | None = None

    def to_result(self) -> dict[str, Any]:
        """The task's JSON result: money as decimal strings, absent fields left out."""
        result: dict[str, Any] = {
            "entry_id": self.entry_id,
            "status": self.status.value,
            "partition": self.partition,
            "lsn": self.lsn,
            "fencing_token": self.fencing_token,
        }
        if self.credit_note_id is not None:
            result["credit_note_id"] = self.credit_note_id
        if self.amount is not None:
            result["amount"] = str(self.amount)
        if self.balance is not None:
            result["balance"] = str(self.balance)
        if self.reason is not None:
            result["reason"] = self.reason
        return result


@dataclass(frozen=True)
class ConsumeOutcome:
    """Result of ``billing.apply_credit`` (amounts in base units)."""

    request_id: str | None
    status: str  #: applied | duplicate | unavailable | rejected
    required_amount: int
    reduced_amount: int
    credit_used: int
    remaining_credit: int | None
    reason: str | None = None

    def to_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "request_id": self.request_id,
            "status": self.status,
            "required_amount": str(self.required_amount),
            "reduced_amount": str(self.reduced_amount),
            "credit_used": str(self.credit_used),
            "remaining_credit": None if self.remaining_credit is None else str(self.remaining_credit),
        }
        if self.reason is not None:
            result["reason"] = self.reason
        return result


@dataclass(frozen=True)
class ReplayReport:
    """What one replay pass of one partition did."""

    partition: int
    applied: int
    remaining: int
    skipped_reason: str | None = None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


def _raw_text(raw: object) -> str:
    """The raw payload as text, exactly as received (floats included), for the REJECTED record."""
    try:
        return json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):
        return repr(raw)


@dataclass
class _Item:
    """One payload of a batch on its way through the pipeline."""

    raw: object
    entry: BillingEntry | None = None
    body: dict[str, Any] | None = None
    pending: Record | None = None  #: its ENTRY record once one exists
    result: Outcome | RetryLater | None = None


def _entry_id(item: _Item) -> str:
    assert item.entry is not None
    return item.entry.entry_id


def _body(item: _Item) -> dict[str, Any]:
    assert item.body is not None
    return item.body


def _retry_all(items: list[_Item], error: RetryLater) -> None:
    for item in items:
        if item.result is None:
            item.result = error


_decode_json = json.JSONDecoder().raw_decode


def _credit_entries(records: Sequence[Record]) -> list[tuple[str, str, str, int, int]]:
    """The credit requests ``(entry_id, wallet, quote_id, quoted, actual)`` of recorded entries
    (a body is the canonical entry; each is decoded once, straight from its stored bytes)."""
    requests = []
    decode = _decode_json
    for record in records:
        body = decode(record.raw_body.decode())[0]
        requests.append(
            (record.entry_id, body["wallet"], body["quote_id"], int(body["quoted_amount"]), int(body["actual_amount"]))
        )
    return requests


#: How :meth:`Pipeline._settle` left a record (the first field of its verdict).
_DEFERRED = 0  #: Redis went away: still pending, answered ``deferred``
_RETRY = 1  #: not settled now (corrupt balance, stale token): the verdict holds the RetryLater
_RECORDED = 2  #: its outcome was appended: the verdict holds the record type and the body
_COMPLETED = 3  #: completed meanwhile by another attempt: the verdict holds its EntryState

#: A settled record: (kind, detail, body) with detail/body as the kind says.
_Verdict = tuple[int, Any, Any]


class Pipeline:
    """One process's pipeline over the WAL store, fencing and credit ledger."""

    def __init__(self, *, store: WalStore, fencing: Fencing, ledger: CreditLedger) -> None:
        self.store = store
        self.fencing = fencing
        self.ledger = ledger

    # --- billing.process_entry ---------------------------------------------------------------

    def process_entry(self, raw: object) -> Outcome:
        """Process one upstream payload. Never raises for a bad entry (``rejected``); raises
        :class:`RetryLater` when the entry must be retried, with nothing appended for it."""
        (result,) = self.process_batch([raw])
        if isinstance(result, RetryLater):
            raise result
        return result

    def process_batch(self, raws: Sequence[object]) -> list[Outcome | RetryLater]:
        """Process many payloads with one lease, one fsync per record kind and one pipelined
        credit round trip per partition; every guarantee of a single entry holds for each.

        Returns, in input order, each payload's :class:`Outcome` or the :class:`RetryLater` that
        says it must be retried (nothing was appended for it).
        """
        started = time.perf_counter()
        items = [_Item(raw) for raw in raws]
        groups: dict[int, list[_Item]] = {}
        for item in items:
            try:
                item.entry = parse_entry(item.raw)
            except InvalidEntry as error:
                item.result = self._reject_invalid(item.raw, error)
                continue
            item.body = item.entry.canonical()
            groups.setdefault(self.store.partition_for_wallet(item.entry.wallet), []).append(item)
        for partition_no, group in groups.items():
            self._process_group(partition_no, group)
        elapsed = time.perf_counter() - started
        results: list[Outcome | RetryLater] = []
        for item in items:
            assert item.result is not None
            if isinstance(item.result, RetryLater):
                metrics.RETRIES.labels(item.result.kind).inc()
            else:
                metrics.ENTRIES.labels(item.result.status.value).inc()
                metrics.ENTRY_SECONDS.observe(elapsed)
            results.append(item.result)
        return results

    def _process_group(self, partition_no: int, group: list[_Item]) -> None:
        """One partition's share of a batch. Repeats of an ``entry_id`` within the batch are
        decided after their first occurrence, against the WAL (so: duplicate or conflict)."""
        firsts: dict[str, _Item] = {}
        repeats: list[_Item] = []
        for item in group:
            assert item.entry is not None
            if item.entry.entry_id in firsts:
                repeats.append(item)
            else:
                firsts[item.entry.entry_id] = item
        self._process_unique(partition_no, list(firsts.values()))
        if repeats:
            self._process_group(partition_no, repeats)

    def _process_unique(self, partition_no: int, group: list[_Item]) -> None:
        partition = self.store.partition(partition_no)
        with partition.locked():  # a cheap pre-check without Redis: finished duplicates, conflicts
            todo = self._undecided(partition, partition_no, group)
        if not todo:
            return
        try:
            lease = self._acquire(partition_no, partition)
        except RedisUnavailable:
            self._fail_open(partition, partition_no, todo)
            return
        except LeaseBusy as busy:
            _retry_all(todo, RetryLater("busy", str(busy)))
            return
        except TokenOverflow as overflow:
            metrics.CORRUPT.labels("token_overflow").inc()
            log.critical("partition %d: %s", partition_no, overflow)
            _retry_all(todo, RetryLater("corrupt", str(overflow)))
            return
        try:
            self._process_fenced(partition, partition_no, todo, lease)
        except LeaseNotOwnedError as lost:
            _retry_all(todo, RetryLater("stale", str(lost)))
        finally:
            self.fencing.release(lease)

    def _acquire(self, partition_no: int, partition: Partition) -> Lease:
        """Take the partition's lease, waiting briefly (jittered, bounded) while another writer
        holds it; then :class:`LeaseBusy` propagates and the caller retries later."""
        for attempt in Retrying(
            retry=retry_if_exception_type(LeaseBusy),
            wait=wait_random_exponential(multiplier=0.002, max=LEASE_WAIT_STEP_S),
            stop=stop_after_delay(LEASE_WAIT_S),
            reraise=True,
        ):
            with attempt:
                return self.fencing.acquire(partition_no, floor=partition.highest_token)
        raise AssertionError("unreachable")  # pragma: no cover

    def _undecided(self, partition: Partition, partition_no: int, group: list[_Item]) -> list[_Item]:
        """Under the partition lock: answer conflicts (recorded) and finished duplicates; return
        the items still to process, each with ``pending`` set when a dead attempt left it so."""
        todo: list[_Item] = []
        for item in group:
            assert item.entry is not None and item.body is not None
            if item.result is not None:
                continue
            verdict = partition.classify(item.entry.entry_id, item.body)
            if verdict is Classification.CONFLICT:
                item.result = self._reject_conflict(partition, partition_no, item.entry)
                continue
            item.pending = None
            if verdict is Classification.DUPLICATE:
                state = partition.lookup(item.entry.entry_id)
                assert state is not None
                if state.outcome is not None:
                    item.result = self._duplicate(partition_no, state.entry, state.outcome)
                    continue
                item.pending = state.entry  # a dead attempt appended it: this one completes it
            todo.append(item)
        return todo

    def _process_fenced(self, partition: Partition, partition_no: int, todo: list[_Item], lease: Lease) -> None:
        fence = self.fencing.validate_and_advance(lease)
        metrics.FENCE_RESULTS.labels(fence.value).inc()
        if fence is FenceResult.UNAVAILABLE:
            self._fail_open(partition, partition_no, todo)
            return
        if fence is FenceResult.STALE:
            _retry_all(todo, RetryLater("stale", f"partition {partition_no}: token {lease.token} is stale"))
            return
        if fence is FenceResult.CORRUPT:
            metrics.CORRUPT.labels("fence").inc()
            log.critical(
                "partition %d: fencing watermark is CORRUPT (key %s); failing closed, "
                "repair with `billing-worker fence repair --partition %d`",
                partition_no,
                keys.fence_watermark(self.fencing.env, partition_no),
                partition_no,
            )
            _retry_all(todo, RetryLater("corrupt", f"partition {partition_no}: fencing watermark is corrupt"))
            return
        with partition.locked():
            todo = self._undecided(partition, partition_no, todo)
            lease.ensure_held()
            new = [item for item in todo if item.pending is None]
            try:
                records = self._append_batch(
                    partition, [(RecordType.ENTRY, lease.token, _entry_id(i), _body(i)) for i in new]
                )
            except StaleTokenError as stale:  # a newer writer appended: the WAL refuses us
                metrics.FENCE_RESULTS.labels("STALE_AT_WAL").inc()
                _retry_all(todo, RetryLater("stale", str(stale)))
                return
            for item, record in zip(new, records, strict=True):
                item.pending = record
        self._complete(partition, partition_no, todo, lease)

    def _complete(self, partition: Partition, partition_no: int, items: list[_Item], lease: Lease) -> None:
        """Complete recorded (pending) entries: :meth:`_settle`, then each item's result."""
        records = [item.pending for item in items if item.pending is not None]
        assert len(records) == len(items)
        credits = self.ledger.issue_entries(_credit_entries(records))
        verdicts = self._settle(partition, partition_no, records, credits, lease)
        for item, record, (kind, detail, body) in zip(items, records, verdicts, strict=True):
            if kind == _RECORDED:
                item.result = self._outcome_from(partition_no, record, detail, body)
            elif kind == _DEFERRED:
                item.result = Outcome(
                    record.entry_id,
                    Status.DEFERRED,
                    partition_no,
                    record.lsn,
                    record.fencing_token,
                    reason="state redis unavailable after the WAL append; replay will apply it",
                )
            elif kind == _COMPLETED:
                item.result = self._duplicate(partition_no, detail.entry, detail.outcome)
            else:
                item.result = detail

    def _settle(
        self, partition: Partition, partition_no: int, records: list[Record], credits: list[CreditResult], lease: Lease
    ) -> list[_Verdict]:
        """Append the outcomes of recorded (pending) entries whose credits were issued (one
        pipelined round trip, ``credits`` in record order) in one batch; return a verdict per
        record (``_DEFERRED`` … ``_COMPLETED``). Redis gone → ``_DEFERRED`` (they stay pending).
        The hot loop of replay: no per-record objects beyond the outcome bodies, metrics counted
        once per call, the common enum members held in locals (looking one up on its class
        costs about as much as building a body), the chunk's index entries read in one call."""
        verdicts: list[_Verdict] = [(_DEFERRED, None, None)] * len(records)
        to_append: list[tuple[int, RecordType, dict[str, Any]]] = []
        at = _now_ms()
        issued = cap_exceeded = corrupt = 0
        applied_type, no_credit_type = RecordType.APPLIED, RecordType.NO_CREDIT
        applied, duplicate, no_credit = CreditOutcome.APPLIED, CreditOutcome.DUPLICATE, CreditOutcome.NO_CREDIT
        for index, (outcome, note_id, amount, balance, raw) in enumerate(credits):
            if outcome is applied or outcome is duplicate:
                # DUPLICATE: the note was applied by an earlier attempt of this entry.
                body = {"at": at, "credit_note_id": note_id, "amount": str(amount), "balance": _text(balance)}
                to_append.append((index, applied_type, body))
                if outcome is applied:
                    issued += amount
            elif outcome is no_credit:
                to_append.append((index, no_credit_type, {"at": at}))
            elif outcome is CreditOutcome.CAP_EXCEEDED:
                body = {"at": at, "credit_note_id": note_id, "amount": str(amount), "balance": _text(balance)}
                to_append.append((index, RecordType.CAP_EXCEEDED, body))
                cap_exceeded += 1
            elif outcome is CreditOutcome.CORRUPT:
                entry_id = records[index].entry_id
                corrupt += 1
                log.critical("entry %s: stored credit balance is CORRUPT (%r)", entry_id, raw)
                error = RetryLater("corrupt", f"entry {entry_id}: stored credit balance is corrupt")
                verdicts[index] = (_RETRY, error, None)
            # UNAVAILABLE: _DEFERRED already
        if issued:
            metrics.CREDIT_ISSUED.inc(issued)
        if cap_exceeded:
            metrics.CAP_EXCEEDED.inc(cap_exceeded)
        if corrupt:
            metrics.CORRUPT.labels("balance").inc(corrupt)
        if not to_append:
            return verdicts
        with partition.locked():
            lease.ensure_held()
            token = lease.token
            fresh = []
            items = []
            entry_ids = [records[index].entry_id for index, _, _ in to_append]
            states = partition.lookup_many(entry_ids)
            for (index, record_type, body), entry_id, state in zip(to_append, entry_ids, states, strict=True):
                if state is not None and state.outcome is not None:  # completed meanwhile
                    verdicts[index] = (_COMPLETED, state, None)
                else:
                    fresh.append((index, record_type, body))
                    items.append((record_type, token, entry_id, body))
            try:
                self._append_batch(partition, items)
            except StaleTokenError as stale:
                retry = (_RETRY, RetryLater("stale", str(stale)), None)
                for index, _, _ in fresh:
                    verdicts[index] = retry
                return verdicts
        for index, record_type, body in fresh:
            verdicts[index] = (_RECORDED, record_type, body)
        return verdicts

    @staticmethod
    def _outcome_from(
        partition_no: int, entry_record: Record, record_type: RecordType, body: Mapping[str, Any]
    ) -> Outcome:
        status = _STATUS_OF_RECORD[record_type]
        amount = body.get("amount")
        balance = body.get("balance")
        reason = "balance + amount would exceed the cap" if status is Status.CAP_EXCEEDED else None
        return Outcome(
            entry_record.entry_id,
            status,
            partition_no,
            entry_record.lsn,
            entry_record.fencing_token,
            credit_note_id=body.get("credit_note_id") if status is not Status.NO_CREDIT else None,
            amount=int(amount) if amount is not None else None,
            balance=int(balance) if balance is not None else None,
            reason=reason,
        )

    def _duplicate(self, partition_no: int, entry_record: Record, outcome_record: Record) -> Outcome:
        original = self._outcome_from(partition_no, entry_record, outcome_record.type, outcome_record.body)
        return Outcome(
            original.entry_id,
            Status.DUPLICATE,
            partition_no,
            original.lsn,
            original.fencing_token,
            credit_note_id=original.credit_note_id,
            amount=original.amount,
            balance=original.balance,
            reason=f"already recorded as {original.status.value}",
        )

    def _fail_open(self, partition: Partition, partition_no: int, todo: list[_Item]) -> None:
        """Redis is unreachable: record the entries with token 0 under the file lock (DESIGN §1)."""
        with partition.locked():
            todo = self._undecided(partition, partition_no, todo)
            new = [item for item in todo if item.pending is None]
            records = self._append_batch(partition, [(RecordType.ENTRY, 0, _entry_id(i), _body(i)) for i in new])
            metrics.FAIL_OPEN.inc(len(records))
            for item, record in zip(new, records, strict=True):
                item.pending = record
        for item in todo:
            entry_record = item.pending
            assert entry_record is not None
            item.result = Outcome(
                entry_record.entry_id,
                Status.DEFERRED,
                partition_no,
                entry_record.lsn,
                entry_record.fencing_token,
                reason="state redis unavailable; recorded in the WAL, replay will apply it",
            )

    def _reject_conflict(self, partition: Partition, partition_no: int, entry: BillingEntry) -> Outcome:
        reason = "entry_id: already recorded with different content"
        body = {"raw": json.dumps(entry.canonical(), sort_keys=True), "reason": reason, "field": "entry_id"}
        record = self._append_batch(partition, [(RecordType.REJECTED, 0, entry.entry_id, {**body, "at": _now_ms()})])[0]
        return Outcome(entry.entry_id, Status.REJECTED, partition_no, record.lsn, 0, reason=reason)

    def _reject_invalid(self, raw: object, error: InvalidEntry) -> Outcome:
        entry_id = raw.get("entry_id") if isinstance(raw, dict) else None
        wallet = raw.get("wallet") if isinstance(raw, dict) else None
        partition_no = 0
        if isinstance(wallet, str) and len(wallet) == 42:
            partition_no = self.store.partition_for_wallet(wallet.lower())
        recorded_id = entry_id if isinstance(entry_id, str) and len(entry_id) <= 128 else ""
        body = {"raw": _raw_text(raw), "reason": str(error), "field": error.field, "at": _now_ms()}
        partition = self.store.partition(partition_no)
        record = self._append_batch(partition, [(RecordType.REJECTED, 0, recorded_id, body)])[0]
        return Outcome(
            entry_id if isinstance(entry_id, str) else None,
            Status.REJECTED,
            partition_no,
            record.lsn,
            0,
            reason=str(error),
        )

    @staticmethod
    def _append_batch(partition: Partition, items: list[tuple[RecordType, int, str, dict[str, Any]]]) -> list[Record]:
        """Append with one write and one fsync; observed in ``billing_wal_append_seconds``."""
        if not items:
            return []
        started = time.perf_counter()
        records = partition.append_batch(items)
        metrics.WAL_APPEND_SECONDS.observe(time.perf_counter() - started)
        return records

    # --- billing.apply_credit ----------------------------------------------------------------

    def apply_credit(self, raw: object) -> ConsumeOutcome:
        """Consume up to ``required_amount`` of the wallet's credit, once per ``request_id``, under
        the partition's lease, logged to the WAL. Redis unreachable → nothing used."""
        try:
            request = parse_apply_credit(raw)
        except InvalidEntry as error:
            request_id = raw.get("request_id") if isinstance(raw, dict) else None
            return ConsumeOutcome(
                request_id if isinstance(request_id, str) else None, "rejected", 0, 0, 0, None, str(error)
            )
        partition_no = self.store.partition_for_wallet(request.wallet)
        partition = self.store.partition(partition_no)
        unavailable = ConsumeOutcome(
            request.request_id,
            "unavailable",
            request.required_amount,
            request.required_amount,
            0,
            None,
            "credit service unavailable: no credit applied",
        )
        with partition.locked():
            logged = partition.credit_use(request.request_id)
        if logged is not None:
            return self._consume_from_record(request.request_id, logged, "duplicate")
        try:
            lease = self._acquire(partition_no, partition)
        except RedisUnavailable:
            return unavailable
        except LeaseBusy as busy:
            raise RetryLater("busy", str(busy)) from None
        try:
            fence = self.fencing.validate_and_advance(lease)
            metrics.FENCE_RESULTS.labels(fence.value).inc()
            if fence is FenceResult.UNAVAILABLE:
                return unavailable
            if fence is not FenceResult.OK:
                raise RetryLater(fence.value.lower(), f"partition {partition_no}: fence {fence.value}")
            result = self.ledger.apply(
                request_id=request.request_id, wallet=request.wallet, required=request.required_amount
            )
            if result.outcome is CreditOutcome.UNAVAILABLE:
                return unavailable
            if result.outcome is CreditOutcome.CORRUPT:
                metrics.CORRUPT.labels("balance").inc()
                raise RetryLater("corrupt", f"wallet {request.wallet}: stored credit balance is corrupt")
            body = {
                "wallet": request.wallet,
                "required_amount": str(request.required_amount),
                "credit_used": str(result.credit_used),
                "remaining_credit": str(result.remaining_credit),
                "at": _now_ms(),
            }
            with partition.locked():
                lease.ensure_held()
                logged = partition.credit_use(request.request_id)
                if logged is None:
                    item = (RecordType.CREDIT_USED, lease.token, request.request_id, body)
                    logged = self._append_batch(partition, [item])[0]
                    metrics.CREDIT_USED.inc(result.credit_used)
        except LeaseNotOwnedError as lost:
            raise RetryLater("stale", str(lost)) from None
        finally:
            self.fencing.release(lease)
        return self._consume_from_record(request.request_id, logged, result.outcome.value.lower())

    @staticmethod
    def _consume_from_record(request_id: str, record: Record, status: str) -> ConsumeOutcome:
        body = record.body
        required = int(body["required_amount"])
        used = int(body["credit_used"])
        return ConsumeOutcome(
            request_id, status, required, required - used, used, int(body["remaining_credit"])
        )

    # --- replay --------------------------------------------------------------------------------

    def replay_partition(self, partition_no: int, *, batch: int = 1000) -> ReplayReport:
        """Apply the partition's pending entries in LSN order under its lease: per chunk one
        pipelined credit round trip and one batched outcome append. Stops early, leaving the rest
        pending, when Redis goes away; an entry whose balance is corrupt stays pending.

        The next chunk's credit calls are sent, and the one after packed, before this chunk's
        outcomes are appended, so Redis runs them meanwhile (replay would otherwise wait for Redis
        and Redis for it). The lease is renewed after each chunk, and checked before each send and
        each outcome append. When replay stops early, the chunk in
        flight may have been credited without its outcomes: those entries stay pending and the
        next replay records them (``DUPLICATE``, never a second credit), as after a crash.
        """
        partition = self.store.partition(partition_no)
        with partition.locked():
            if partition.pending_count == 0:
                metrics.PENDING.labels(str(partition_no)).set(0)
                return ReplayReport(partition_no, 0, 0)
        try:
            lease = self._acquire(partition_no, partition)
        except (RedisUnavailable, LeaseBusy, TokenOverflow) as error:
            return ReplayReport(partition_no, 0, partition.pending_count, type(error).__name__)
        applied = 0
        in_flight: IssueInFlight | None = None
        try:
            fence = self.fencing.validate_and_advance(lease)
            metrics.FENCE_RESULTS.labels(fence.value).inc()
            if fence is not FenceResult.OK:
                if fence is FenceResult.CORRUPT:
                    metrics.CORRUPT.labels("fence").inc()
                return ReplayReport(partition_no, 0, partition.pending_count, f"fence {fence.value}")
            with partition.locked():
                pending = partition.pending()
            chunks = [pending[start : start + batch] for start in range(0, len(pending), batch)]
            prepare = self.ledger.prepare_issue
            unavailable = CreditOutcome.UNAVAILABLE  # a local: looked up once, not once per record
            with gc_paused():
                # Three chunks in three stages: n's answers are read and its outcomes appended
                # while Redis runs n+1 and this process packs n+2 (Redis never waits for Python).
                in_flight = prepare(_credit_entries(chunks[0])).send() if chunks else None
                ahead = prepare(_credit_entries(chunks[1])) if len(chunks) > 1 else None
                for number, chunk in enumerate(chunks):
                    assert in_flight is not None
                    credits, in_flight = in_flight.results(), None
                    if ahead is not None and not any(c.outcome is unavailable for c in credits):
                        lease.ensure_held()  # credits are issued only under a lease we still hold
                        in_flight, ahead = ahead.send(), None
                    kinds = [kind for kind, _, _ in self._settle(partition, partition_no, chunk, credits, lease)]
                    applied += kinds.count(_RECORDED) + kinds.count(_COMPLETED)
                    if _DEFERRED in kinds or in_flight is None:
                        break  # done, or Redis went away: the rest waits for the next replay
                    if number + 2 < len(chunks):
                        ahead = prepare(_credit_entries(chunks[number + 2]))
                    self.fencing.renew(lease)  # queued behind chunk n+1: Redis is busy anyway
        except (RedisUnavailable, LeaseNotOwnedError) as stopped:
            log.warning("replay of partition %d stopped early: %s", partition_no, stopped)
        finally:
            if in_flight is not None:  # stopped with a chunk sent: read its answers, never leave them
                with contextlib.suppress(Exception):
                    in_flight.results()
            self.fencing.release(lease)
        metrics.REPLAYED.inc(applied)
        with partition.locked():
            remaining = partition.pending_count
        metrics.PENDING.labels(str(partition_no)).set(remaining)
        return ReplayReport(partition_no, applied, remaining)

    def replay_all(self) -> list[ReplayReport]:
        """Replay every partition of the environment."""
        return [self.replay_partition(n) for n in range(self.store.partition_count)]

    # --- backlog, checkpoint ---------------------------------------------------------------------

    def report_backlog(self) -> dict[int, int]:
        """Set the ``billing_pending`` gauge per partition; return the counts."""
        counts: dict[int, int] = {}
        for n in range(self.store.partition_count):
            partition = self.store.partition(n)
            with partition.locked():
                counts[n] = partition.pending_count
            metrics.PENDING.labels(str(n)).set(counts[n])
        return counts

    def checkpoint(self) -> dict[int, int]:
        """Persist each partition's cursor and retire fully applied segments; return how many
        segments each partition retired."""
        retired: dict[int, int] = {}
        for n in range(self.store.partition_count):
            partition = self.store.partition(n)
            with partition.locked():
                partition.checkpoint()
                retired[n] = len(partition.retire_segments())
        return retired
