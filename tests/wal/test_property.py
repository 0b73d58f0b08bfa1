"""Property: random appends, reopens, checkpoints+retirements and torn-tail truncations keep the
partition equal to a plain in-memory model (a list of records)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wal.helpers import record_spans, segment_paths
from worker.errors import StaleTokenError, WalInvariantError
from worker.wal import OUTCOME_TYPES, Classification, Partition, RecordType, canonical_body, verify_partition
from worker.wal.segment import SEGMENT_HEADER_SIZE

Row = tuple[int, str, int, str, bytes]  # lsn, type name, token, entry_id, raw body
SEGMENT = 200  # bytes: a few records per segment, so rotation and retirement happen often


@dataclass(frozen=True)
class Op:
    kind: str
    key: int = 0
    variant: int = 0
    token: str = "zero"
    outcome: RecordType = RecordType.APPLIED
    cut: int = 0


tokens = st.sampled_from(["zero", "same", "up", "down"])
ops = st.one_of(
    st.builds(Op, kind=st.just("entry"), key=st.integers(0, 12), variant=st.integers(0, 1), token=tokens),
    st.builds(
        Op,
        kind=st.just("outcome"),
        key=st.integers(0, 50),
        token=tokens,
        outcome=st.sampled_from(sorted(OUTCOME_TYPES)),
    ),
    st.builds(Op, kind=st.just("rejected"), key=st.integers(0, 12), token=tokens),
    st.builds(Op, kind=st.just("credit"), key=st.integers(0, 4), token=tokens),
    st.builds(Op, kind=st.just("batch"), key=st.integers(100, 10_000), token=tokens),
    st.builds(Op, kind=st.just("settle"), token=tokens),
    st.builds(Op, kind=st.just("settle"), token=st.just("same")),
    st.just(Op("reopen")),
    st.just(Op("checkpoint")),
    st.just(Op("checkpoint")),
    st.builds(Op, kind=st.just("truncate"), cut=st.integers(0, 1 << 20)),
)


class Model:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.checkpointed_next = 1  # records below this LSN were checkpointed: never truncated

    @property
    def highest(self) -> int:
        return max((row[2] for row in self.rows), default=0)

    def entries(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for _lsn, kind, _token, key, body in self.rows:
            if kind == "ENTRY":
                found.setdefault(key, body)
        return found

    def pending(self) -> list[str]:
        open_: dict[str, None] = {}
        for _lsn, kind, _token, key, _body in self.rows:
            if kind == "ENTRY":
                open_[key] = None
            elif RecordType[kind] in OUTCOME_TYPES:
                open_.pop(key, None)
        return list(open_)

    def credit(self) -> set[str]:
        return {row[3] for row in self.rows if row[1] == "CREDIT_USED"}

    def token(self, choice: str) -> int:
        return {"zero": 0, "same": self.highest, "up": self.highest + 2, "down": max(0, self.highest - 1)}[choice]

    def add(self, kind: RecordType, token: int, key: str, body: bytes) -> None:
        self.rows.append((len(self.rows) + 1, kind.name, token, key, body))


def rows_of(part: Partition) -> list[Row]:
    return [(r.lsn, r.type.name, r.fencing_token, r.entry_id, r.raw_body) for r in part.records()]


def check(part: Partition, model: Model) -> None:
    assert rows_of(part) == model.rows
    assert [r.entry_id for r in part.pending()] == model.pending()
    assert part.highest_token == model.highest
    assert part.next_lsn == len(model.rows) + 1


def open_partition(path: Path) -> Partition:
    return Partition.open(path, segment_bytes=SEGMENT, fsync=False)


def apply(part: Partition, model: Model, op: Op, path: Path) -> Partition:
    token = model.token(op.token)
    stale = token != 0 and token < model.highest
    if op.kind == "entry":
        key, body = f"e{op.key}", {"id": op.key, "v": op.variant}
        raw = canonical_body(body)
        known = model.entries().get(key)
        verdict = part.classify(key, body)
        if known is None:
            assert verdict is Classification.NEW
        else:
            assert verdict is (Classification.DUPLICATE if known == raw else Classification.CONFLICT)
        _append(part, model, RecordType.ENTRY, token, key, body, stale or known is not None)
    elif op.kind == "outcome":
        pending = model.pending()
        key = pending[op.key % len(pending)] if pending else f"e{op.key}"
        _append(part, model, op.outcome, token, key, {"amount": str(op.key)}, stale or not pending)
    elif op.kind == "rejected":
        _append(part, model, RecordType.REJECTED, token, f"e{op.key}", {"reason": "bad"}, stale)
    elif op.kind == "credit":
        key = f"req{op.key}"
        _append(part, model, RecordType.CREDIT_USED, token, key, {"used": "1"}, stale or key in model.credit())
    elif op.kind == "batch":
        keys = [f"b{op.key}-{i}" for i in range(3) if f"b{op.key}-{i}" not in model.entries()]
        items = [(RecordType.ENTRY, token, key, {"batch": op.key}) for key in keys]
        if stale and items:
            try:
                part.append_batch(items)
            except StaleTokenError:
                pass
            else:
                raise AssertionError("stale batch accepted")
        else:
            records = part.append_batch(items)
            for record in records:
                model.add(record.type, token, record.entry_id, record.raw_body)
    elif op.kind == "settle":  # close every pending entry in one batch
        items = [(RecordType.NO_CREDIT, token, key, {}) for key in model.pending()]
        try:
            records = part.append_batch(items)
        except StaleTokenError:
            assert stale and items
        else:
            assert not (stale and items)
            for record in records:
                model.add(record.type, token, record.entry_id, record.raw_body)
        part.close()
        part = open_partition(path)
    elif op.kind == "checkpoint":
        checkpoint = part.checkpoint()
        assert checkpoint.next_lsn == len(model.rows) + 1
        assert checkpoint.applied_lsn <= checkpoint.next_lsn - 1
        part.retire_segments()
        model.checkpointed_next = checkpoint.next_lsn
    elif op.kind == "truncate":
        part.close()
        newest = segment_paths(path)[-1]
        spans = record_spans(newest)
        floor = max([end for lsn, _start, end in spans if lsn < model.checkpointed_next], default=SEGMENT_HEADER_SIZE)
        size = newest.stat().st_size
        cut = floor + op.cut % (size - floor + 1)
        os.truncate(newest, cut)
        survivors = [lsn for lsn, _start, end in spans if end <= cut]
        last = survivors[-1] if survivors else int(newest.name[:20]) - 1
        part = open_partition(path)
        assert rows_of(part) == model.rows[:last], "what survives is a prefix"
        model.rows = model.rows[:last]
    check(part, model)
    return part


def _append(
    part: Partition, model: Model, kind: RecordType, token: int, key: str, body: Mapping[str, object], refused: bool
) -> None:
    try:
        record = part.append(kind, token, key, body)
    except (StaleTokenError, WalInvariantError):
        assert refused, (kind, token, key)
        return
    assert not refused, (kind, token, key)
    assert record.lsn == len(model.rows) + 1
    model.add(kind, token, key, record.raw_body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=10, max_size=60))
def test_partition_matches_model(steps: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p00"
        model = Model()
        part = open_partition(path)
        try:
            for op in steps:
                part = apply(part, model, op, path)
            part.close()
            part = open_partition(path)
            check(part, model)
        finally:
            part.close()
        report = verify_partition(path)
        assert report.ok and report.records == len(model.rows)
