"""Offline check of a partition: every problem, with file and offset, instead of the first.

:func:`verify_partition` never writes and takes no lock (so it can run beside a live worker):
it reads the checkpoint, the snapshot and every segment, checks headers, CRCs, framing, LSN
continuity across files, the checkpoint's cursors, and the log's rules (one ENTRY per
entry_id, outcomes only for pending entries, one CREDIT_USED per request, storage fencing).
After a bad record it resynchronises on the next valid record and keeps going.

Severities: ``corrupt`` (the partition refuses to open), ``torn`` (a torn tail at the end of
the newest segment: opening truncates it; also what an append in flight looks like to a
lock-free reader), ``warning`` (the log breaks a rule that appends enforce; it still opens).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from worker.errors import WalCorruption
from worker.wal.checkpoint import CHECKPOINT_NAME, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, read_checkpoint
from worker.wal.record import OUTCOME_TYPES, Record, RecordType
from worker.wal.segment import (
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    check_file_header,
    find_valid_record,
    list_segments,
    scan_fd,
)

#: ``progress(n)``: ``n`` more bytes were checked.
Progress = Callable[[int], object]
_PROGRESS_EVERY = 16384  # records


class Severity(Enum):
    """How bad a :class:`Problem` is."""

    CORRUPT = "corrupt"
    TORN = "torn"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``path`` and byte ``offset`` of the first bad byte, and what is wrong."""

    path: str
    offset: int
    detail: str
    severity: Severity

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}: {self.severity.value}: {self.detail}"


@dataclass
class VerifyReport:
    """What :func:`verify_partition` found. ``ok`` unless something is corrupt or a warning."""

    path: Path
    files: int = 0
    records: int = 0
    last_lsn: int = 0
    highest_token: int = 0
    pending: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing but a torn tail (which open truncates) was found."""
        return all(problem.severity is Severity.TORN for problem in self.problems)


def partition_bytes(path: Path) -> int:
    """Bytes :func:`verify_partition` will read (for a progress bar's total)."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file() and not entry.name.startswith("."):
                    total += entry.stat().st_size
    except FileNotFoundError:
        return 0
    return total


class _Checker:
    """Feeds on records in LSN order, tracking the index and the rules."""

    def __init__(self, report: VerifyReport, progress: Progress | None) -> None:
        self.report = report
        self.progress = progress
        self.entries: set[str] = set()
        self.pending: set[str] = set()
        self.credit: set[str] = set()
        self.path = ""
        self.reported = 0  # file offset up to which progress was reported

    def warn(self, offset: int, detail: str) -> None:
        self.report.problems.append(Problem(self.path, offset, detail, Severity.WARNING))

    def __call__(self, record: Record, offset: int) -> None:
        report = self.report
        report.records += 1
        report.last_lsn = record.lsn
        token = record.fencing_token
        if token:
            if token < report.highest_token:
                self.warn(offset, f"LSN {record.lsn}: token {token} below {report.highest_token}")
            else:
                report.highest_token = token
        kind = record.type
        key = record.entry_id
        if kind is RecordType.ENTRY:
            if key in self.entries:
                self.warn(offset, f"LSN {record.lsn}: second ENTRY for {key!r}")
            else:
                self.entries.add(key)
                self.pending.add(key)
        elif kind in OUTCOME_TYPES:
            if key in self.pending:
                self.pending.discard(key)
            else:
                self.warn(offset, f"LSN {record.lsn}: {kind.name} for {key!r}, which is not pending")
        elif kind is RecordType.CREDIT_USED:
            if key in self.credit:
                self.warn(offset, f"LSN {record.lsn}: second CREDIT_USED for {key!r}")
            self.credit.add(key)
        try:
            record.body  # noqa: B018 - decoding is the check
        except ValueError as error:
            self.warn(offset, f"LSN {record.lsn}: body is not JSON: {error}")
        if self.progress is not None and report.records % _PROGRESS_EVERY == 0:
            self.progress(offset - self.reported)
            self.reported = offset

    def start_file(self, path: Path) -> None:
        self.path = str(path)
        self.reported = 0

    def end_file(self, size: int) -> None:
        if self.progress is not None:
            self.progress(max(0, size - self.reported))


def _scan(checker: _Checker, fd: int, size: int, first_lsn: int, *, newest: bool, min_torn_lsn: int) -> int:
    """Scan one file with resync; record problems; return the next expected LSN."""
    report = checker.report
    path = checker.path
    pos = SEGMENT_HEADER_SIZE
    lsn = first_lsn
    while True:
        stop = scan_fd(fd, pos, size, lsn, checker)
        lsn = stop.next_lsn
        if stop.detail is None:
            return lsn
        tail = os.pread(fd, size - stop.offset, stop.offset)
        found = find_valid_record(tail, 1, lsn)
        if found is None:
            if newest and stop.torn_candidate and lsn >= min_torn_lsn:
                what = "all zeros" if tail.count(0) == len(tail) else stop.detail
                detail = f"torn tail of {len(tail)} bytes ({what}); opening truncates it"
                report.problems.append(Problem(path, stop.offset, detail, Severity.TORN))
            else:
                detail = f"{stop.detail}; no valid record after it ({len(tail)} bytes)"
                report.problems.append(Problem(path, stop.offset, detail, Severity.CORRUPT))
            return lsn
        offset, found_lsn = found
        detail = (
            f"{stop.detail}; next valid record (LSN {found_lsn}) at offset "
            f"{stop.offset + offset}, {offset} bytes skipped"
        )
        report.problems.append(Problem(path, stop.offset, detail, Severity.CORRUPT))
        pos = stop.offset + offset
        lsn = found_lsn


def verify_partition(path: str | os.PathLike[str], *, progress: Progress | None = None) -> VerifyReport:
    """Check the partition directory ``path`` read-only; return every problem found."""
    directory = Path(path)
    report = VerifyReport(directory)
    checker = _Checker(report, progress)
    if not directory.is_dir():
        report.problems.append(Problem(str(directory), 0, "no such directory", Severity.CORRUPT))
        return report
    try:
        checkpoint = read_checkpoint(directory)
    except WalCorruption as error:
        report.problems.append(Problem(error.path, error.offset, error.detail, Severity.CORRUPT))
        checkpoint = None
    through = 0
    expected = 1
    if checkpoint is not None and checkpoint.snapshot is not None:
        through = checkpoint.snapshot_through_lsn
        expected = _verify_snapshot(checker, directory / checkpoint.snapshot, checkpoint.snapshot_bytes, through)
    min_torn_lsn = checkpoint.next_lsn if checkpoint is not None else 1
    live = [(first, seg) for first, seg in list_segments(directory) if first > through]
    if not live and (through or checkpoint is not None):
        report.problems.append(Problem(str(directory), 0, f"no segment after LSN {through}", Severity.CORRUPT))
    for index, (first, seg) in enumerate(live):
        checker.start_file(seg)
        report.files += 1
        if first != expected:
            report.problems.append(
                Problem(str(seg), 0, f"starts at LSN {first}, expected {expected}", Severity.CORRUPT)
            )
        try:
            fd = os.open(seg, os.O_RDONLY)
        except FileNotFoundError:
            continue  # retired meanwhile
        try:
            size = os.fstat(fd).st_size
            try:
                check_file_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0), SEGMENT_MAGIC, SEGMENT_VERSION, str(seg))
            except WalCorruption as error:
                report.problems.append(Problem(str(seg), 0, error.detail, Severity.CORRUPT))
                expected = first
                continue
            newest = index == len(live) - 1
            expected = _scan(checker, fd, size, first, newest=newest, min_torn_lsn=min_torn_lsn)
            checker.end_file(size)
        finally:
            os.close(fd)
    if checkpoint is not None and expected < checkpoint.next_lsn:
        report.problems.append(
            Problem(
                str(directory / CHECKPOINT_NAME),
                0,
                f"checkpoint recorded LSNs up to {checkpoint.next_lsn - 1}, the log ends at {expected - 1}",
                Severity.CORRUPT,
            )
        )
    report.pending = len(checker.pending)
    return report


def _verify_snapshot(checker: _Checker, path: Path, size_expected: int, through: int) -> int:
    report = checker.report
    checker.start_file(path)
    report.files += 1
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        report.problems.append(Problem(str(path), 0, "snapshot missing", Severity.CORRUPT))
        return through + 1
    try:
        size = os.fstat(fd).st_size
        if size != size_expected:
            report.problems.append(
                Problem(str(path), 0, f"{size} bytes, checkpoint says {size_expected}", Severity.CORRUPT)
            )
        try:
            got = check_file_header(os.pread(fd, SEGMENT_HEADER_SIZE, 0), SNAPSHOT_MAGIC, SNAPSHOT_VERSION, str(path))
            if got != through:
                report.problems.append(
                    Problem(str(path), 0, f"header says LSN {got}, checkpoint {through}", Severity.CORRUPT)
                )
        except WalCorruption as error:
            report.problems.append(Problem(str(path), 0, error.detail, Severity.CORRUPT))
            return through + 1
        end = _scan(checker, fd, size, 1, newest=False, min_torn_lsn=0)
        checker.end_file(size)
        if end != through + 1:
            report.problems.append(
                Problem(str(path), size, f"snapshot ends at LSN {end - 1}, expected {through}", Severity.CORRUPT)
            )
        return through + 1
    finally:
        os.close(fd)
