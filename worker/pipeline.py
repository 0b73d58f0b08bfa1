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

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from worker import metrics
from worker.credit import CreditLedger, CreditOutcome, CreditResult
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


def _raw_text(raw: object) -> str:
    """The raw payload as text, exactly as received (floats included), for the REJECTED record."""
    try:
        return json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):
        return repr(raw)


class Pipeline:
    """One process's pipeline over the WAL store, fencing and credit ledger."""

    def __init__(self, *, store: WalStore, fencing: Fencing, ledger: CreditLedger) -> None:
        self.store = store
        self.fencing = fencing
        self.ledger = ledger

    # --- billing.process_entry ---------------------------------------------------------------

    def process_entry(self, raw: object) -> Outcome:
        """Process one upstream payload. Never raises for a bad entry (``rejected``); raises
        :class:`RetryLater` when the entry must be retried, with nothing appended."""
        started = time.perf_counter()
        try:
            entry = parse_entry(raw)
        except InvalidEntry as error:
            outcome = self._reject_invalid(raw, error)
        else:
            outcome = self._process_valid(entry)
        metrics.ENTRIES.labels(outcome.status.value).inc()
        metrics.ENTRY_SECONDS.observe(time.perf_counter() - started)
        return outcome

    def _process_valid(self, entry: BillingEntry) -> Outcome:
        partition_no = self.store.partition_for_wallet(entry.wallet)
        partition = self.store.partition(partition_no)
        body = entry.canonical()
        known = self._known(partition, partition_no, entry, body)
        if known is not None:
            return known
        try:
            lease = self._acquire(partition_no, partition)
        except RedisUnavailable:
            return self._fail_open(partition, partition_no, entry, body)
        except LeaseBusy as busy:
            raise RetryLater("busy", str(busy)) from None
        except TokenOverflow as overflow:
            metrics.CORRUPT.labels("token_overflow").inc()
            log.critical("partition %d: %s", partition_no, overflow)
            raise RetryLater("corrupt", str(overflow)) from None
        try:
            return self._process_fenced(partition, partition_no, entry, body, lease)
        except LeaseNotOwnedError as lost:
            raise RetryLater("stale", str(lost)) from None
        finally:
            self.fencing.release(lease)

    def _acquire(self, partition_no: int, partition: Partition) -> Lease:
        """Take the partition's lease, waiting briefly (jittered, bounded) while another writer
        holds it; then :class:`LeaseBusy` propagates and the task is retried later."""
        for attempt in Retrying(
            retry=retry_if_exception_type(LeaseBusy),
            wait=wait_random_exponential(multiplier=0.002, max=LEASE_WAIT_STEP_S),
            stop=stop_after_delay(LEASE_WAIT_S),
            reraise=True,
        ):
            with attempt:
                return self.fencing.acquire(partition_no, floor=partition.highest_token)
        raise AssertionError("unreachable")  # pragma: no cover

    def _known(
        self, partition: Partition, partition_no: int, entry: BillingEntry, body: dict[str, Any]
    ) -> Outcome | None:
        """A cheap pre-check (no Redis): a finished duplicate or a conflict is answered at once."""
        with partition.locked():
            verdict = partition.classify(entry.entry_id, body)
            if verdict is Classification.CONFLICT:
                return self._reject_conflict(partition, partition_no, entry)
            if verdict is Classification.DUPLICATE:
                state = partition.lookup(entry.entry_id)
                if state is not None and state.outcome is not None:
                    return self._duplicate(partition_no, state.entry, state.outcome)
        return None

    def _process_fenced(
        self,
        partition: Partition,
        partition_no: int,
        entry: BillingEntry,
        body: dict[str, Any],
        lease: Lease,
    ) -> Outcome:
        fence = self.fencing.validate_and_advance(lease)
        metrics.FENCE_RESULTS.labels(fence.value).inc()
        if fence is FenceResult.UNAVAILABLE:
            return self._fail_open(partition, partition_no, entry, body)
        if fence is FenceResult.STALE:
            raise RetryLater("stale", f"partition {partition_no}: token {lease.token} is stale")
        if fence is FenceResult.CORRUPT:
            metrics.CORRUPT.labels("fence").inc()
            log.critical(
                "partition %d: fencing watermark is CORRUPT (key %s); failing closed, "
                "repair with `billing-worker fence repair --partition %d`",
                partition_no,
                f"wal:writer:last_accepted:{{{self.fencing.env}:{partition_no}}}",
                partition_no,
            )
            raise RetryLater("corrupt", f"partition {partition_no}: fencing watermark is corrupt")
        with partition.locked():
            verdict = partition.classify(entry.entry_id, body)
            if verdict is Classification.CONFLICT:
                return self._reject_conflict(partition, partition_no, entry)
            state = partition.lookup(entry.entry_id)
            if state is not None and state.outcome is not None:
                return self._duplicate(partition_no, state.entry, state.outcome)
            lease.ensure_held()
            if state is None:
                try:
                    record = self._append(partition, RecordType.ENTRY, lease.token, entry.entry_id, body)
                except StaleTokenError as stale:  # a newer writer appended: the WAL refuses us
                    metrics.FENCE_RESULTS.labels("STALE_AT_WAL").inc()
                    raise RetryLater("stale", str(stale)) from None
            else:
                record = state.entry  # pending from an attempt that died after its append
        credit = self.ledger.issue_for_entry(
            entry_id=entry.entry_id,
            wallet=entry.wallet,
            quote_id=entry.quote_id,
            quoted=entry.quoted_amount,
            actual=entry.actual_amount,
        )
        return self._complete(partition, partition_no, record, credit, lease.token)

    def _complete(
        self, partition: Partition, partition_no: int, entry_record: Record, credit: CreditResult, token: int
    ) -> Outcome:
        """Append the outcome of a credit attempt for a recorded entry and answer it."""
        if credit.outcome is CreditOutcome.UNAVAILABLE:
            return Outcome(
                entry_record.entry_id,
                Status.DEFERRED,
                partition_no,
                entry_record.lsn,
                entry_record.fencing_token,
                reason="state redis unavailable after the WAL append; replay will apply it",
            )
        if credit.outcome is CreditOutcome.CORRUPT:
            metrics.CORRUPT.labels("balance").inc()
            log.critical("entry %s: stored credit balance is CORRUPT (%r)", entry_record.entry_id, credit.raw)
            raise RetryLater("corrupt", f"entry {entry_record.entry_id}: stored credit balance is corrupt")
        record_type, body = self._outcome_body(credit)
        try:
            self._append(partition, record_type, token, entry_record.entry_id, body)
        except StaleTokenError as stale:
            raise RetryLater("stale", str(stale)) from None
        if record_type is RecordType.APPLIED and credit.outcome is CreditOutcome.APPLIED:
            metrics.CREDIT_ISSUED.inc(credit.amount)
        if record_type is RecordType.CAP_EXCEEDED:
            metrics.CAP_EXCEEDED.inc()
        return self._outcome_from(partition_no, entry_record, record_type, body)

    @staticmethod
    def _outcome_body(credit: CreditResult) -> tuple[RecordType, dict[str, Any]]:
        body: dict[str, Any] = {"at": _now_ms()}
        if credit.outcome is CreditOutcome.NO_CREDIT:
            return RecordType.NO_CREDIT, body
        body["credit_note_id"] = credit.note_id
        body["amount"] = str(credit.amount)
        body["balance"] = None if credit.balance is None else str(credit.balance)
        if credit.outcome is CreditOutcome.CAP_EXCEEDED:
            return RecordType.CAP_EXCEEDED, body
        # APPLIED now, or DUPLICATE: the note was applied by an earlier attempt of this entry.
        return RecordType.APPLIED, body

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

    def _fail_open(
        self, partition: Partition, partition_no: int, entry: BillingEntry, body: dict[str, Any]
    ) -> Outcome:
        """Redis is unreachable: record the entry with token 0 under the file lock (DESIGN §1)."""
        with partition.locked():
            verdict = partition.classify(entry.entry_id, body)
            if verdict is Classification.CONFLICT:
                return self._reject_conflict(partition, partition_no, entry)
            state = partition.lookup(entry.entry_id)
            if state is not None and state.outcome is not None:
                return self._duplicate(partition_no, state.entry, state.outcome)
            if state is None:
                record = self._append(partition, RecordType.ENTRY, 0, entry.entry_id, body)
                metrics.FAIL_OPEN.inc()
            else:
                record = state.entry
        return Outcome(
            entry.entry_id,
            Status.DEFERRED,
            partition_no,
            record.lsn,
            record.fencing_token,
            reason="state redis unavailable; recorded in the WAL, replay will apply it",
        )

    def _reject_conflict(self, partition: Partition, partition_no: int, entry: BillingEntry) -> Outcome:
        reason = "entry_id: already recorded with different content"
        record = self._append(
            partition,
            RecordType.REJECTED,
            0,
            entry.entry_id,
            {
                "raw": json.dumps(entry.canonical(), sort_keys=True),
                "reason": reason,
                "field": "entry_id",
                "at": _now_ms(),
            },
        )
        return Outcome(entry.entry_id, Status.REJECTED, partition_no, record.lsn, 0, reason=reason)

    def _reject_invalid(self, raw: object, error: InvalidEntry) -> Outcome:
        entry_id = raw.get("entry_id") if isinstance(raw, dict) else None
        wallet = raw.get("wallet") if isinstance(raw, dict) else None
        partition_no = 0
        if isinstance(wallet, str) and len(wallet) == 42:
            partition_no = self.store.partition_for_wallet(wallet.lower())
        recorded_id = entry_id if isinstance(entry_id, str) and len(entry_id) <= 128 else ""
        record = self._append(
            self.store.partition(partition_no),
            RecordType.REJECTED,
            0,
            recorded_id,
            {"raw": _raw_text(raw), "reason": str(error), "field": error.field, "at": _now_ms()},
        )
        return Outcome(
            entry_id if isinstance(entry_id, str) else None,
            Status.REJECTED,
            partition_no,
            record.lsn,
            0,
            reason=str(error),
        )

    @staticmethod
    def _append(
        partition: Partition, record_type: RecordType, token: int, entry_id: str, body: dict[str, Any]
    ) -> Record:
        started = time.perf_counter()
        record = partition.append(record_type, token, entry_id, body)
        metrics.WAL_APPEND_SECONDS.observe(time.perf_counter() - started)
        return record

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
                    logged = self._append(
                        partition, RecordType.CREDIT_USED, lease.token, request.request_id, body
                    )
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

    def replay_partition(self, partition_no: int, *, batch: int = 500) -> ReplayReport:
        """Apply the partition's pending entries in LSN order under its lease (pipelined credit
        issues, one batched outcome append per chunk). Stops early, leaving the rest pending, when
        Redis goes away; an entry whose balance is corrupt stays pending (critical log)."""
        partition = self.store.partition(partition_no)
        with partition.locked():
            if partition.pending_count == 0:
                return ReplayReport(partition_no, 0, 0)
        try:
            lease = self._acquire(partition_no, partition)
        except (RedisUnavailable, LeaseBusy, TokenOverflow) as error:
            return ReplayReport(partition_no, 0, partition.pending_count, type(error).__name__)
        applied = 0
        try:
            fence = self.fencing.validate_and_advance(lease)
            metrics.FENCE_RESULTS.labels(fence.value).inc()
            if fence is not FenceResult.OK:
                if fence is FenceResult.CORRUPT:
                    metrics.CORRUPT.labels("fence").inc()
                return ReplayReport(partition_no, 0, partition.pending_count, f"fence {fence.value}")
            with partition.locked():
                pending = partition.pending()
            for start in range(0, len(pending), batch):
                chunk = pending[start : start + batch]
                self.fencing.renew(lease)
                done = self._replay_chunk(partition, chunk, lease)
                applied += done
                if done < len(chunk):
                    break
        except (RedisUnavailable, LeaseNotOwnedError) as stopped:
            log.warning("replay of partition %d stopped early: %s", partition_no, stopped)
        finally:
            self.fencing.release(lease)
        metrics.REPLAYED.inc(applied)
        with partition.locked():
            remaining = partition.pending_count
        metrics.PENDING.labels(str(partition_no)).set(remaining)
        return ReplayReport(partition_no, applied, remaining)

    def _replay_chunk(self, partition: Partition, chunk: list[Record], lease: Lease) -> int:
        requests = []
        for record in chunk:
            body = record.body
            requests.append(
                {
                    "entry_id": record.entry_id,
                    "wallet": body["wallet"],
                    "quote_id": body["quote_id"],
                    "quoted": int(body["quoted_amount"]),
                    "actual": int(body["actual_amount"]),
                }
            )
        credits = self.ledger.issue_many(requests)
        outcomes: list[tuple[RecordType, int, str, dict[str, Any]]] = []
        for record, credit in zip(chunk, credits, strict=True):
            if credit.outcome is CreditOutcome.UNAVAILABLE:
                break
            if credit.outcome is CreditOutcome.CORRUPT:
                metrics.CORRUPT.labels("balance").inc()
                log.critical(
                    "replay: entry %s has a CORRUPT balance (%r); left pending", record.entry_id, credit.raw
                )
                continue
            record_type, body = self._outcome_body(credit)
            outcomes.append((record_type, lease.token, record.entry_id, body))
            if credit.outcome is CreditOutcome.APPLIED:
                metrics.CREDIT_ISSUED.inc(credit.amount)
            if record_type is RecordType.CAP_EXCEEDED:
                metrics.CAP_EXCEEDED.inc()
        if outcomes:
            with partition.locked():
                lease.ensure_held()
                fresh = [o for o in outcomes if self._still_pending(partition, o[2])]
                if fresh:
                    partition.append_batch(fresh)
        return len(outcomes)

    @staticmethod
    def _still_pending(partition: Partition, entry_id: str) -> bool:
        state = partition.lookup(entry_id)
        return state is not None and state.outcome is None

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
