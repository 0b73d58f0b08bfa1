"""The money invariants, checked from the WAL and Redis (demo, tests, chaos runs).

1. every accepted ``entry_id`` is in the WAL exactly once, with exactly one outcome (none lost,
   none applied twice, none pending);
2. every wallet's Redis balance equals the sum of its APPLIED notes minus its consumption, and
   never exceeds the cap;
3. every APPLIED note exists in Redis exactly once (no note applied twice).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from worker import keys
from worker.state_redis import StateRedis
from worker.wal import RecordType, WalStore

_OUTCOMES = {RecordType.APPLIED, RecordType.NO_CREDIT, RecordType.CAP_EXCEEDED}


@dataclass
class InvariantReport:
    entries: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected_records: int = 0
    pending: int = 0
    lost: list[str] = field(default_factory=list)
    applied_twice: list[str] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_invariants(
    store: WalStore, state: StateRedis, *, env: str, cap: int, expected_entry_ids: Iterable[str] = ()
) -> InvariantReport:
    """Check the invariants over every partition of ``store``; problems are listed, not raised."""
    report = InvariantReport()
    entry_count: Counter[str] = Counter()
    outcome_count: Counter[str] = Counter()
    wallet_of: dict[str, str] = {}
    credited: dict[str, int] = defaultdict(int)
    notes: dict[str, int] = defaultdict(int)
    used: dict[str, int] = defaultdict(int)
    for n in range(store.partition_count):
        partition = store.partition(n)
        with partition.locked():
            records = list(partition.records())
        for record in records:
            if record.type is RecordType.ENTRY:
                entry_count[record.entry_id] += 1
                wallet_of[record.entry_id] = record.body["wallet"]
            elif record.type in _OUTCOMES:
                outcome_count[record.entry_id] += 1
                report.outcomes[record.type.name.lower()] += 1
                if record.type is RecordType.APPLIED:
                    wallet = wallet_of[record.entry_id]
                    credited[wallet] += int(record.body["amount"])
                    notes[wallet] += 1
            elif record.type is RecordType.REJECTED:
                report.rejected_records += 1
            elif record.type is RecordType.CREDIT_USED:
                used[record.body["wallet"]] += int(record.body["credit_used"])
    report.entries = len(entry_count)
    for entry_id, count in entry_count.items():
        if count > 1 or outcome_count[entry_id] > 1:
            report.applied_twice.append(entry_id)
        if outcome_count[entry_id] == 0:
            report.pending += 1
    report.lost = sorted(set(expected_entry_ids) - set(entry_count))
    if report.lost:
        report.problems.append(f"{len(report.lost)} accepted entries missing from the WAL: {report.lost[:5]}")
    if report.applied_twice:
        report.problems.append(
            f"{len(report.applied_twice)} entries recorded twice: {report.applied_twice[:5]}"
        )
    if report.pending:
        report.problems.append(f"{report.pending} entries still pending")
    for wallet in sorted(set(credited) | set(used)):
        raw = state.client.get(keys.credit_balance(env, wallet))
        balance = int(raw) if raw is not None else 0
        report.balances[wallet] = balance
        expected = credited[wallet] - used[wallet]
        if balance != expected:
            report.problems.append(f"{wallet}: Redis balance {balance} != WAL {expected}")
        if balance > cap:
            report.problems.append(f"{wallet}: balance {balance} exceeds the cap {cap}")
        in_redis = len(state.client.keys(keys.credit_note(env, wallet, "cn_*")))
        if in_redis != notes[wallet]:
            report.problems.append(
                f"{wallet}: {in_redis} notes in Redis != {notes[wallet]} APPLIED in the WAL"
            )
    return report
