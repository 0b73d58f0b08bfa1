"""Torn tails are truncated; corruption anywhere else fails closed and ``verify`` names it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.wal.helpers import SMALL_SEGMENT, as_tuples, entry_body, fill, flip_bit, record_spans, segment_paths
from worker.errors import WalCorruption
from worker.wal import Partition, Record, RecordType, Severity, verify_partition
from worker.wal.segment import SEGMENT_HEADER_SIZE


def reopen(path: Path) -> Partition:
    return Partition.open(path, segment_bytes=SMALL_SEGMENT, fsync=False)


@pytest.fixture
def written(part: Partition, part_dir: Path) -> list[Record]:
    """About 4 segments; the newest holds at least 4 records."""
    records = fill(part, 0, 25, token=1)
    while len(record_spans(segment_paths(part_dir)[-1])) < 4:
        records += fill(part, len(records), 1, token=1)
    part.close()
    return records


def test_truncation_at_every_byte_of_the_last_two_records(
    written: list[Record], part_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newest = segment_paths(part_dir)[-1]
    original = newest.read_bytes()
    spans = record_spans(newest)
    (lsn_a, start_a, _end_a), (lsn_b, start_b, end_b) = spans[-2], spans[-1]
    assert end_b == len(original) and lsn_b == written[-1].lsn
    caplog.set_level(logging.WARNING, logger="worker.wal")
    for cut in range(start_a, end_b):
        newest.write_bytes(original[:cut])
        survivors = lsn_a - 1 if cut < start_b else lsn_a
        keep = start_a if cut < start_b else start_b
        with reopen(part_dir) as again:
            assert as_tuples(list(again.records())) == as_tuples(written[:survivors]), cut
            assert again.next_lsn == survivors + 1
        assert newest.stat().st_size == keep, "the torn tail is truncated"
        if cut not in (start_a, start_b):
            assert "torn tail" in caplog.text
        caplog.clear()


def test_zeroed_tail_at_every_byte_of_the_last_two_records(written: list[Record], part_dir: Path) -> None:
    newest = segment_paths(part_dir)[-1]
    original = newest.read_bytes()
    spans = record_spans(newest)
    (lsn_a, start_a, _), (_lsn_b, start_b, end_b) = spans[-2], spans[-1]
    for cut in range(start_a, end_b):
        newest.write_bytes(original[:cut] + bytes(end_b - cut))
        survivors = lsn_a - 1 if cut < start_b else lsn_a
        with reopen(part_dir) as again:
            assert as_tuples(list(again.records())) == as_tuples(written[:survivors]), cut
            report = verify_partition(part_dir)
            assert report.ok and not report.problems
        newest.write_bytes(original)


@pytest.mark.parametrize("zeros", [1, 27, 28, 29, 500, 4096])
def test_appended_zeros_are_a_torn_tail(written: list[Record], part_dir: Path, zeros: int) -> None:
    newest = segment_paths(part_dir)[-1]
    size = newest.stat().st_size
    with newest.open("ab") as handle:
        handle.write(bytes(zeros))
    report = verify_partition(part_dir)
    assert report.ok and [p.severity for p in report.problems] == [Severity.TORN]
    assert report.problems[0].offset == size
    with reopen(part_dir) as again:
        assert as_tuples(list(again.records())) == as_tuples(written)
        again.append(RecordType.ENTRY, 1, "after", {})
    assert newest.stat().st_size > size
    with reopen(part_dir) as third:
        assert third.last_lsn == len(written) + 1


def test_bad_crc_on_the_last_record_is_a_torn_tail(written: list[Record], part_dir: Path) -> None:
    newest = segment_paths(part_dir)[-1]
    _lsn, start, end = record_spans(newest)[-1]
    flip_bit(newest, end - 1)
    with reopen(part_dir) as again:
        assert again.last_lsn == len(written) - 1
    assert newest.stat().st_size == start


def test_flipped_bit_in_any_byte_of_a_middle_record_fails_closed(written: list[Record], part_dir: Path) -> None:
    newest = segment_paths(part_dir)[-1]
    original = newest.read_bytes()
    _lsn, start, end = record_spans(newest)[-3]
    for offset in range(start, end):
        flip_bit(newest, offset, bit=offset % 8)
        with pytest.raises(WalCorruption) as caught:
            reopen(part_dir)
        assert caught.value.path == str(newest)
        assert caught.value.offset == start, offset
        assert (
            newest.read_bytes() == original[:offset] + newest.read_bytes()[offset : offset + 1] + original[offset + 1 :]
        )
        newest.write_bytes(original)
    with reopen(part_dir) as again:
        assert again.last_lsn == len(written)


def test_garbage_between_records_in_newest_segment_is_corruption(written: list[Record], part_dir: Path) -> None:
    """Zeros (a hole) followed by valid records: not a tail, even in the newest segment."""
    newest = segment_paths(part_dir)[-1]
    original = newest.read_bytes()
    _lsn, start, end = record_spans(newest)[-2]
    newest.write_bytes(original[:start] + bytes(end - start) + original[end:])
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert (caught.value.path, caught.value.offset) == (str(newest), start)
    assert "followed by a valid record" in caught.value.detail
    assert newest.read_bytes() == original[:start] + bytes(end - start) + original[end:], "nothing truncated"


def test_flipped_bit_in_an_older_segment_fails_closed_and_verify_names_it(
    written: list[Record], part_dir: Path
) -> None:
    older = segment_paths(part_dir)[1]
    lsn, start, _end = record_spans(older)[1]
    flip_bit(older, start + 30)
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert (caught.value.path, caught.value.offset) == (str(older), start)

    report = verify_partition(part_dir)
    assert not report.ok
    corrupt = [p for p in report.problems if p.severity is Severity.CORRUPT]
    assert len(corrupt) == 1
    assert (corrupt[0].path, corrupt[0].offset) == (str(older), start)
    assert f"{older}@{start}" in str(corrupt[0])
    # verify resynchronised: everything after the bad record was still checked.
    assert report.records == len(written) - 1
    assert report.last_lsn == len(written)
    assert lsn > 1


def test_last_record_of_an_older_segment_is_never_a_tail(written: list[Record], part_dir: Path) -> None:
    older = segment_paths(part_dir)[0]
    os.truncate(older, older.stat().st_size - 3)
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert caught.value.path == str(older)
    report = verify_partition(part_dir)
    assert [p.severity for p in report.problems] == [Severity.CORRUPT, Severity.CORRUPT]
    assert report.problems[0].path == str(older)
    assert "expected" in report.problems[1].detail  # the next segment no longer follows on


def test_verify_reports_every_problem(written: list[Record], part_dir: Path) -> None:
    segments = segment_paths(part_dir)
    bad = []
    for path in segments[:2]:
        _lsn, start, _end = record_spans(path)[0]
        flip_bit(path, start + 2)
        bad.append((str(path), start))
    newest = segments[-1]
    with newest.open("ab") as handle:
        handle.write(b"\x07" * 10)
    report = verify_partition(part_dir)
    assert [(p.path, p.offset) for p in report.problems if p.severity is Severity.CORRUPT] == bad
    assert [p.severity for p in report.problems][-1] is Severity.TORN
    assert not report.ok


def test_bad_segment_header_fails_closed(written: list[Record], part_dir: Path) -> None:
    first = segment_paths(part_dir)[0]
    flip_bit(first, 3)
    with pytest.raises(WalCorruption) as caught:
        reopen(part_dir)
    assert (caught.value.path, caught.value.offset) == (str(first), 0)
    assert verify_partition(part_dir).problems[0].offset == 0


def test_verify_on_clean_partition(written: list[Record], part_dir: Path) -> None:
    seen: list[int] = []
    report = verify_partition(part_dir, progress=seen.append)
    assert report.ok and report.problems == []
    assert report.records == report.last_lsn == len(written)
    assert report.pending == len(written) and report.highest_token == 1
    assert sum(seen) == sum(p.stat().st_size for p in segment_paths(part_dir))
    assert report.files == len(segment_paths(part_dir))


def test_empty_newest_segment_after_rotation(part: Partition, part_dir: Path) -> None:
    """A crash right after rotation leaves an empty segment: that is a clean state."""
    fill(part, 0, 60)
    part.close()
    newest = segment_paths(part_dir)[-1]
    os.truncate(newest, SEGMENT_HEADER_SIZE)
    with reopen(part_dir) as again:
        lsn = again.last_lsn
        assert lsn == int(newest.name[:20]) - 1
        again.append(RecordType.ENTRY, 0, "next", entry_body(0))
        assert again.last_lsn == lsn + 1
