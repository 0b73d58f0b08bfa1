"""Partition behaviour: rotation, LSNs, fencing, idempotency, catch-up, checkpoint, retire."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import worker.wal.partition as partition_module
from tests.wal.helpers import SMALL_SEGMENT, as_tuples, entry_body, fill, flip_bit, segment_paths
from worker.errors import StaleTokenError, WalCorruption, WalError, WalInvariantError
from worker.wal import Classification, Partition, RecordType
from worker.wal.checkpoint import CHECKPOINT_NAME, read_checkpoint
from worker.wal.segment import SEGMENT_HEADER_SIZE, segment_name


def reopen(path: Path, **kwargs: object) -> Partition:
    return Partition.open(path, segment_bytes=SMALL_SEGMENT, fsync=False, **kwargs)  # type: ignore[arg-type]


# --- round trip, rotation, LSNs ------------------------------------------------------------------


def test_round_trip_across_rotation_and_reopen(part: Partition, part_dir: Path) -> None:
    written = fill(part, 0, 60, token=3)
    assert [r.lsn for r in written] == list(range(1, 61))
    segments = segment_paths(part_dir)
    assert len(segments) >= 4, "small segments must have rotated"
    assert segments[0].name == segment_name(1) == "00000000000000000001.wal"
    for path in segments[:-1]:
        assert path.stat().st_size >= SMALL_SEGMENT
    # Each segment is named by the LSN of its first record.
    firsts = [int(p.name.split(".")[0]) for p in segments]
    assert firsts == sorted(firsts) and firsts[0] == 1
    part.close()

    with reopen(part_dir) as again:
        assert as_tuples(list(again.records())) == as_tuples(written)
        assert again.next_lsn == 61
        more = fill(again, 60, 5)
        assert [r.lsn for r in more] == [61, 62, 63, 64, 65]
    with reopen(part_dir) as third:
        assert [r.lsn for r in third.records()] == list(range(1, 66))
        assert [r.lsn for r in third.records(from_lsn=63)] == [63, 64, 65]
        assert third.last_lsn == 65


def test_records_iterator_releases_its_descriptors(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 40)
    fds_before = len(os.listdir("/proc/self/fd"))
    iterator = part.records()
    assert len(os.listdir("/proc/self/fd")) > fds_before
    del iterator  # never started
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with part.records(from_lsn=39) as tail:
        assert [r.lsn for r in tail] == [39, 40]
    half = part.records()
    assert next(half).lsn == 1
    half.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    fill(part, 40, 1)
    snapshot = part.records()
    fill(part, 41, 1)
    assert [r.lsn for r in snapshot][-1] == 41, "fixed when called"


def test_new_segment_starts_after_header(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 1)
    (only,) = segment_paths(part_dir)
    assert only.read_bytes()[:8] == b"BWALSEG\0"
    assert only.stat().st_size > SEGMENT_HEADER_SIZE


def test_batch_is_one_group_with_dense_lsns(part: Partition) -> None:
    records = part.append_batch(
        [
            (RecordType.ENTRY, 2, "a", entry_body(1)),
            (RecordType.ENTRY, 2, "b", entry_body(2)),
            (RecordType.APPLIED, 3, "a", {"amount": "5"}),
        ]
    )
    assert [r.lsn for r in records] == [1, 2, 3]
    assert part.append_batch([]) == []
    assert [r.entry_id for r in part.pending()] == ["b"]
    assert part.highest_token == 3


def test_fsync_on_does_exactly_one_sync_per_append_and_batch(part_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(partition_module, "_datasync", calls.append)
    with Partition.open(part_dir, segment_bytes=1 << 20, fsync=True) as handle:
        handle.append(RecordType.ENTRY, 0, "a", {})
        assert len(calls) == 1
        handle.append_batch([(RecordType.ENTRY, 0, f"b{i}", {}) for i in range(50)])
        assert len(calls) == 2


# --- storage-side fencing ----------------------------------------------------------------------


def test_lower_token_refused_equal_higher_and_zero_accepted(part: Partition, part_dir: Path) -> None:
    part.append(RecordType.ENTRY, 5, "a", {})
    with pytest.raises(StaleTokenError) as caught:
        part.append(RecordType.ENTRY, 4, "b", {})
    assert (caught.value.token, caught.value.highest) == (4, 5)
    part.append(RecordType.ENTRY, 5, "c", {})
    part.append(RecordType.ENTRY, 0, "d", {})  # fail-open writes always pass
    part.append(RecordType.ENTRY, 9, "e", {})
    assert part.highest_token == 9
    assert part.lookup("b") is None
    part.close()
    with reopen(part_dir) as again:
        assert again.highest_token == 9
        with pytest.raises(StaleTokenError):
            again.append(RecordType.ENTRY, 8, "f", {})
        assert again.last_lsn == 4


def test_batch_fencing_is_checked_for_every_item_before_writing(part: Partition) -> None:
    part.append(RecordType.ENTRY, 5, "a", {})
    with pytest.raises(StaleTokenError):
        part.append_batch([(RecordType.ENTRY, 7, "b", {}), (RecordType.ENTRY, 6, "c", {})])
    assert part.last_lsn == 1 and part.highest_token == 5
    assert part.lookup("b") is None


# --- idempotency and the log's rules -----------------------------------------------------------


def test_classify_new_duplicate_conflict(part: Partition) -> None:
    assert part.classify("e1", entry_body(1)) is Classification.NEW
    part.append(RecordType.ENTRY, 1, "e1", entry_body(1))
    assert part.classify("e1", dict(reversed(list(entry_body(1).items())))) is Classification.DUPLICATE
    assert part.classify("e1", entry_body(1, amount=7)) is Classification.CONFLICT
    state = part.lookup("e1")
    assert state is not None and state.pending and state.outcome is None
    outcome = part.append(RecordType.CAP_EXCEEDED, 1, "e1", {"balance": "10"})
    state = part.lookup("e1")
    assert state is not None and state.outcome == outcome and state.entry.lsn == 1
    assert part.classify("e1", entry_body(1)) is Classification.DUPLICATE


def test_rules_are_enforced(part: Partition) -> None:
    part.append(RecordType.ENTRY, 0, "e1", {})
    with pytest.raises(WalInvariantError):
        part.append(RecordType.ENTRY, 0, "e1", {})
    with pytest.raises(WalInvariantError):
        part.append(RecordType.APPLIED, 0, "nope", {})
    part.append(RecordType.NO_CREDIT, 0, "e1", {})
    with pytest.raises(WalInvariantError):
        part.append(RecordType.APPLIED, 0, "e1", {})
    part.append(RecordType.CREDIT_USED, 0, "req-1", {"credit_used": "5"})
    with pytest.raises(WalInvariantError):
        part.append(RecordType.CREDIT_USED, 0, "req-1", {"credit_used": "5"})
    with pytest.raises(WalInvariantError):
        part.append_batch([(RecordType.ENTRY, 0, "x", {}), (RecordType.ENTRY, 0, "x", {})])
    part.append(RecordType.REJECTED, 0, "e1", {"reason": "conflict"})
    part.append(RecordType.REJECTED, 0, "e1", {"reason": "conflict again"})
    assert part.last_lsn == 5


def test_rejected_and_credit_used_stand_alone(part: Partition, part_dir: Path) -> None:
    part.append(RecordType.REJECTED, 0, "bad", {"raw": {"entry_id": "bad"}, "reason": "wallet: invalid"})
    used = part.append(RecordType.CREDIT_USED, 4, "req-9", {"credit_used": "12", "wallet": "0xab"})
    assert part.pending() == [] and part.pending_count == 0
    assert part.lookup("bad") is None and part.classify("bad", {}) is Classification.NEW
    assert part.credit_use("req-9") == used and part.credit_use("req-8") is None
    part.close()
    with reopen(part_dir) as again:
        assert [r.entry_id for r in again.rejected()] == ["bad"]
        assert again.credit_use("req-9") == used


def test_pending_in_lsn_order_and_survives_reopen(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 30)
    for i in range(0, 30, 3):
        part.append(RecordType.APPLIED, 0, f"e{i}", {"n": str(i)})
    expected = [f"e{i}" for i in range(30) if i % 3]
    assert [r.entry_id for r in part.pending()] == expected
    assert part.applied_lsn == 1  # e0 closed, e1 (LSN 2) pending
    part.close()
    with reopen(part_dir) as again:
        assert [r.entry_id for r in again.pending()] == expected
        assert again.pending_count == 20
        lsns = [r.lsn for r in again.pending()]
        assert lsns == sorted(lsns)


# --- several handles -------------------------------------------------------------------------


def test_catch_up_between_handles(part: Partition, part_dir: Path) -> None:
    other = reopen(part_dir)
    try:
        part.append(RecordType.ENTRY, 2, "e1", entry_body(1))
        assert other.classify("e1", entry_body(1)) is Classification.DUPLICATE
        with other.locked():
            state = other.lookup("e1")
            assert state is not None and state.pending
            other.append(RecordType.APPLIED, 3, "e1", {"amount": "1"})
        state = part.lookup("e1")
        assert state is not None and state.outcome is not None and state.outcome.lsn == 2
        assert part.highest_token == 3
        with pytest.raises(StaleTokenError):
            part.append(RecordType.ENTRY, 2, "e2", {})
        # Rotations made by one handle are followed by the other.
        fill(part, 10, 40)
        assert other.next_lsn == 43
        fill(other, 100, 3)
        assert part.last_lsn == 45
        assert [r.lsn for r in part.records()] == list(range(1, 46))
    finally:
        other.close()


def test_handles_with_different_segment_sizes_keep_lsns_dense(part_dir: Path) -> None:
    big = Partition.open(part_dir, segment_bytes=1 << 20, fsync=False)
    small = Partition.open(part_dir, segment_bytes=256, fsync=False)
    try:
        for i in range(40):
            (big if i % 2 else small).append(RecordType.ENTRY, 0, f"e{i}", entry_body(i))
        assert len(segment_paths(part_dir)) > 5
        assert [r.lsn for r in big.records()] == list(range(1, 41))
        assert [r.entry_id for r in small.records()] == [f"e{i}" for i in range(40)]
    finally:
        big.close()
        small.close()
    with reopen(part_dir) as again:
        assert again.last_lsn == 40


def test_locked_is_reentrant(part: Partition) -> None:
    with part.locked(), part.locked():
        part.append(RecordType.ENTRY, 0, "a", {})
        with part.locked():
            assert part.classify("a", {}) is Classification.DUPLICATE
    part.append(RecordType.ENTRY, 0, "b", {})
    assert part.last_lsn == 2


def test_read_only_handle_refuses_writes_and_sees_appends(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 3)
    reader = Partition.open(part_dir, read_only=True)
    try:
        with pytest.raises(WalError, match="read-only"):
            reader.append(RecordType.ENTRY, 0, "x", {})
        with pytest.raises(WalError, match="read-only"):
            reader.checkpoint()
        fill(part, 3, 20)
        assert reader.last_lsn == 23
        assert reader.pending_count == 23
    finally:
        reader.close()


def test_read_only_open_of_missing_dir_fails(tmp_path: Path) -> None:
    with pytest.raises(WalError, match="no WAL partition"):
        Partition.open(tmp_path / "nope", read_only=True)
    with pytest.raises(WalError):
        Partition.open(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


def test_closed_handle_refuses(part: Partition) -> None:
    part.close()
    part.close()
    with pytest.raises(WalError, match="closed"):
        part.append(RecordType.ENTRY, 0, "a", {})


def test_handle_unusable_after_fsync_failure(part_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = Partition.open(part_dir, segment_bytes=1 << 20, fsync=True)
    handle.append(RecordType.ENTRY, 0, "a", {})
    size = segment_paths(part_dir)[-1].stat().st_size

    def failing(_fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(partition_module, "_datasync", failing)
    with pytest.raises(WalError, match="nothing recorded"):
        handle.append(RecordType.ENTRY, 0, "b", {})
    assert segment_paths(part_dir)[-1].stat().st_size == size  # the unacknowledged bytes are gone
    monkeypatch.undo()
    with pytest.raises(WalError, match="unusable"):
        handle.append(RecordType.ENTRY, 0, "c", {})
    handle.close()
    with reopen(part_dir) as again:
        assert [r.entry_id for r in again.records()] == ["a"]


# --- checkpoint and retirement -----------------------------------------------------------------


def _apply_all(part: Partition, first: int, count: int) -> None:
    for i in range(first, first + count):
        part.append(RecordType.APPLIED, 0, f"e{i}", {"amount": str(i)})


def test_checkpoint_retire_and_idempotency_after_reopen(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 40, token=1)
    part.append(RecordType.REJECTED, 1, "junk", {"reason": "wallet: invalid"})
    part.append(RecordType.CREDIT_USED, 1, "req-1", {"credit_used": "3"})
    _apply_all(part, 0, 40)
    fill(part, 40, 5, token=2)  # e40..e44 stay pending, in the newest segments
    before = as_tuples(list(part.records()))
    checkpoint = part.checkpoint()
    assert checkpoint.applied_lsn == 82 and checkpoint.next_lsn == 88 and checkpoint.highest_token == 2
    assert checkpoint.snapshot is not None and 0 < checkpoint.snapshot_through_lsn <= 82
    segments_before = segment_paths(part_dir)
    removed = part.retire_segments()
    assert removed and all(not path.exists() for path in removed)
    assert segment_paths(part_dir) == [p for p in segments_before if p not in removed]
    assert int(segment_paths(part_dir)[0].name[:20]) == checkpoint.snapshot_through_lsn + 1
    assert part.retire_segments() == []
    part.close()

    with reopen(part_dir) as again:
        assert again.classify("e0", entry_body(0)) is Classification.DUPLICATE
        assert again.classify("e0", entry_body(0, amount=1)) is Classification.CONFLICT
        state = again.lookup("e3")
        assert state is not None and state.outcome is not None and state.outcome.body == {"amount": "3"}
        assert state.entry.lsn == 4
        assert [r.entry_id for r in again.pending()] == [f"e{i}" for i in range(40, 45)]
        assert again.credit_use("req-1") is not None
        assert [r.entry_id for r in again.rejected()] == ["junk"]
        assert as_tuples(list(again.records())) == before
        assert again.highest_token == 2 and again.next_lsn == 88
        with pytest.raises(WalInvariantError):
            again.append(RecordType.ENTRY, 2, "e1", entry_body(1))


def test_second_checkpoint_extends_the_snapshot(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 30)
    _apply_all(part, 0, 30)
    first = part.checkpoint()
    part.retire_segments()
    fill(part, 30, 30)
    _apply_all(part, 30, 30)
    fill(part, 60, 1)
    second = part.checkpoint()
    assert first.snapshot and second.snapshot and second.snapshot_through_lsn > first.snapshot_through_lsn
    assert not (part_dir / first.snapshot).exists()
    part.retire_segments()
    part.close()
    with reopen(part_dir) as again:
        assert [r.lsn for r in again.records()] == list(range(1, 122))
        assert again.classify("e5", entry_body(5)) is Classification.DUPLICATE
        assert again.classify("e45", entry_body(45)) is Classification.DUPLICATE
        assert [r.entry_id for r in again.pending()] == ["e60"]


def test_nothing_retired_while_entries_are_pending(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 40)
    _apply_all(part, 1, 39)  # e0 (LSN 1) stays pending: the applied cursor is 0
    checkpoint = part.checkpoint()
    assert checkpoint.applied_lsn == 0 and checkpoint.snapshot is None
    assert part.retire_segments() == []
    assert segment_paths(part_dir)[0].name == segment_name(1)


def test_crash_between_checkpoint_and_retire(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 30)
    _apply_all(part, 0, 30)
    part.checkpoint()
    part.close()
    with reopen(part_dir) as again:  # covered segments still on disk: skipped, not double-counted
        assert [r.lsn for r in again.records()] == list(range(1, 61))
        assert again.pending_count == 0
        assert again.retire_segments()


def test_other_handle_reloads_after_its_segment_was_retired(part: Partition, part_dir: Path) -> None:
    behind = reopen(part_dir)
    try:
        fill(part, 0, 40)
        _apply_all(part, 0, 40)
        part.checkpoint()
        assert segment_name(1) in [p.name for p in part.retire_segments()]
        assert behind.classify("e2", entry_body(2)) is Classification.DUPLICATE
        assert behind.pending_count == 0 and behind.next_lsn == 81
        behind.append(RecordType.ENTRY, 0, "late", {})
        assert part.last_lsn == 81
    finally:
        behind.close()


def test_corrupt_checkpoint_fails_closed(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 5)
    part.checkpoint()
    part.close()
    flip_bit(part_dir / CHECKPOINT_NAME, 30)
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert caught.value.path.endswith(CHECKPOINT_NAME)
    assert "CRC" in caught.value.detail


def test_corrupt_snapshot_fails_closed(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 30)
    _apply_all(part, 0, 30)
    checkpoint = part.checkpoint()
    part.retire_segments()
    part.close()
    assert checkpoint.snapshot is not None
    flip_bit(part_dir / checkpoint.snapshot, 100)
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert caught.value.path.endswith(checkpoint.snapshot)


def test_missing_snapshot_or_segment_fails_closed(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 40)
    part.close()
    os.unlink(segment_paths(part_dir)[1])
    with pytest.raises(WalCorruption, match="missing segment"):
        reopen(part_dir)


def test_log_shorter_than_checkpoint_fails_closed(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 12)
    part.checkpoint()
    part.close()
    newest = segment_paths(part_dir)[-1]
    os.truncate(newest, newest.stat().st_size - 1)  # a torn-looking tail, but checkpointed
    with pytest.raises(WalCorruption, match="checkpoint"):
        reopen(part_dir)
    checkpoint = read_checkpoint(part_dir)
    assert checkpoint is not None and checkpoint.next_lsn == 13


def test_stray_temp_files_are_removed_on_open(part: Partition, part_dir: Path) -> None:
    fill(part, 0, 2)
    part.close()
    (part_dir / ".00000000000000000003.wal.tmp").write_bytes(b"half")
    with reopen(part_dir) as again:
        assert again.last_lsn == 2
    assert not (part_dir / ".00000000000000000003.wal.tmp").exists()
