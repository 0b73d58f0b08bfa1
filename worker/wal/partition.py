"""One WAL partition: a directory of segments, a lock file, a checkpoint and its snapshot.

Directory ``<wal_dir>/<env>/p<NN>/``::

    LOCK                                   flock(2) target; never holds data
    00000000000000000001.wal               segments, named by their first LSN
    00000000000000004711.wal               ... the newest one is the active segment
    CHECKPOINT                             cursors (see worker.wal.checkpoint), optional
    snapshot-00000000000000004710.snap     retired records 1..4710, optional

A :class:`Partition` handle keeps an in-memory view of the whole log (LSN counter, highest
fencing token, idempotency index, pending set, credit-use index) and a file descriptor on the
active segment. Several handles, in one process or many, may share a directory: every change
happens under an exclusive ``flock`` on ``LOCK``, and a handle *catches up* (reads what others
appended since it last looked) each time it takes the lock, so decisions are made on the full
log. Catching up costs an ``fstat`` of the active segment and a ``stat`` of the would-be next
segment when nothing changed.

A handle is safe to share between threads (an internal RLock) but not across ``fork``: open
handles in the child (using an inherited one raises :class:`WalError`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import starmap
from pathlib import Path
from typing import Any

from worker.errors import StaleTokenError, WalCorruption, WalError, WalInvariantError
from worker.gc_pause import gc_paused
from worker.wal.checkpoint import (
    CHECKPOINT_NAME,
    SNAPSHOT_MAGIC,
    SNAPSHOT_PREFIX,
    SNAPSHOT_SUFFIX,
    SNAPSHOT_VERSION,
    Checkpoint,
    read_checkpoint,
    snapshot_name,
    write_checkpoint,
)
from worker.wal.record import (
    OUTCOME_TYPES,
    Classification,
    EntryState,
    Prepared,
    Record,
    RecordType,
    canonical_body,
    frame_batch,
    prepare,
)
from worker.wal.segment import (
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    ScanStop,
    check_file_header,
    create_segment,
    find_valid_record,
    fsync_dir,
    iter_fd,
    list_segments,
    pack_file_header,
    scan_fd,
)

log = logging.getLogger("worker.wal")

LOCK_NAME = "LOCK"
#: Default rotation size, bytes (Settings.wal_segment_bytes overrides it).
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_COPY_CHUNK = 8 * 1024 * 1024
_datasync = getattr(os, "fdatasync", os.fsync)

#: Bumped in a child process after fork: handles opened before it refuse to work there.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_forked)

#: One record to append: (type, fencing_token, entry_id, body).
AppendItem = tuple[RecordType, int, str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class _Sealed:
    """A segment that is no longer written: LSNs first..last (a checkpoint candidate)."""

    first: int
    last: int
    path: Path


class Partition:
    """A handle on one partition directory. Create it with :meth:`open`; see the package docs."""

    #: The partition directory.
    path: Path
    #: Partition number given at open (None when opened by path alone).
    number: int | None
    #: Rotation threshold, bytes.
    segment_bytes: int
    #: fdatasync every append/batch before returning.
    fsync: bool
    #: Shared locks only; appends and maintenance refused.
    read_only: bool
    _dir: str

    def __init__(self) -> None:  # use Partition.open
        self._fd = -1
        self._lock_fd: int | None = None
        self._depth = 0
        self._mutex = threading.RLock()
        self._generation = _fork_generation
        self._closed = False
        self._broken: str | None = None
        self._loaded = False
        self._torn_seen: tuple[str, int] | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._active_path: Path | None = None
        self._active_first = 0
        self._size = 0
        self._next_lsn = 1
        self._highest = 0
        self._entries: dict[str, EntryState] = {}
        self._pending: dict[str, Record] = {}
        self._credit: dict[str, Record] = {}
        self._checkpoint: Checkpoint | None = None

    # --- opening and closing -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
        read_only: bool = False,
        create: bool = True,
        number: int | None = None,
    ) -> Partition:
        """Open (and with ``create``, make) the partition at ``path`` and load it.

        Loading reads the checkpoint and its snapshot, then scans the remaining segments,
        truncating a torn tail of the newest one (logged on ``worker.wal``). ``segment_bytes``:
        a segment is rotated once it holds at least this many bytes. ``fsync``: fdatasync every
        append/batch before returning (rotation and checkpoints always fsync). ``read_only``:
        take only shared locks, never modify anything (a torn tail is skipped, not truncated),
        refuse appends. ``number``: the partition number, for messages and callers.

        Raises :class:`WalCorruption` when the log is damaged anywhere but a torn tail (fail
        closed), :class:`WalError` when the directory is missing (``create=False`` or read-only)
        or unusable.
        """
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be positive")
        self = cls()
        self.path = Path(path)
        self._dir = os.fspath(self.path)
        self.number = number
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.read_only = read_only
        try:
            if not self.path.is_dir():
                if read_only or not create:
                    raise WalError(f"{self.path}: no WAL partition directory")
                self.path.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.path.parent)
            lock = self.path / LOCK_NAME
            if read_only:
                try:
                    self._lock_fd = os.open(lock, os.O_RDONLY)
                except FileNotFoundError:
                    self._lock_fd = None  # no writer ever ran here
            else:
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            self.close()
            raise WalError(f"{self.path}: cannot open partition: {error}") from error
        try:
            with self.locked():
                pass
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the file descriptors. Idempotent; the handle is unusable afterwards."""
        with self._mutex:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # also drops a held flock
                self._lock_fd = None
            self._depth = 0

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Partition {self.path} next_lsn={self._next_lsn} pending={len(self._pending)}>"

    # --- locking -------------------------------------------------------------------------------

    def _enter(self) -> None:
        """Take the mutex and (outermost) the flock, then catch up. Pair with :meth:`_leave`."""
        self._mutex.acquire()
        if self._depth:
            self._depth += 1
            return
        try:
            if self._closed:
                raise WalError(f"{self.path}: partition handle is closed")
            if self._generation != _fork_generation:
                raise WalError(f"{self.path}: handle inherited across fork; open a new one")
            if self._broken is not None:
                raise WalError(f"{self.path}: handle unusable after {self._broken}; reopen")
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX)
            self._depth = 1
            self._catch_up()
        except BaseException:
            if self._depth:
                self._depth = 0
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._mutex.release()
            raise

    def _leave(self) -> None:
        self._depth -= 1
        if not self._depth and self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._mutex.release()

    @contextmanager
    def locked(self) -> Iterator[Partition]:
        """Hold the partition lock (exclusive; shared for read-only handles) for a block.

        Re-entrant within the handle. On entry the handle catches up with records appended by
        other handles/processes, so a classify/lookup → append sequence inside the block
        decides on the full log and nobody else can append in between.
        """
        self._enter()
        try:
            yield self
        finally:
            self._leave()

    def _fresh(self) -> None:
        """Catch up before answering a query (no-op inside :meth:`locked`)."""
        if not self._depth:
            self._enter()
            self._leave()

    # --- loading and catching up ---------------------------------------------------------------

    def _catch_up(self) -> None:
        """Read what was appended since we last looked (lock held)."""
        if not self._loaded:
            self._load()
            return
        while True:
            if self._fd >= 0:
                stat = os.fstat(self._fd)
                if stat.st_nlink == 0:  # our segment was retired: we are far behind
                    self._reload()
                    return
                if stat.st_size != self._size:
                    self._scan_active(stat.st_size)
            if self._fd >= 0 and self._next_lsn == self._active_first:
                return  # an empty active segment is never rotated away from
            following = f"{self._dir}/{self._next_lsn:020d}.wal"  # segment_name(next_lsn)
            if not os.access(following, os.F_OK):
                return
            self._switch_to(Path(following))

    def _reload(self) -> None:
        log.info("%s: segment retired under this handle; reloading", self.path)
        self._loaded = False
        self._load()

    def _load(self) -> None:
        """Build the in-memory view from the checkpoint, its snapshot and the segments."""
        with gc_paused():
            self._load_paused()

    def _load_paused(self) -> None:
        self._reset_state()
        if not self.read_only:
            self._remove_temp_files()
        checkpoint = read_checkpoint(self.path)
        self._checkpoint = checkpoint
        through = 0
        if checkpoint is not None and checkpoint.snapshot is not None:
            through = checkpoint.snapshot_through_lsn
            self._load_snapshot(checkpoint)
        segments = list_segments(self.path)
        live = [(first, path) for first, path in segments if first > through]
        if not live:
            if segments:
                first, path = segments[-1]
                raise WalCorruption(str(path), 0, f"newest segment starts at LSN {first}, inside the snapshot")
            if through:
                raise WalCorruption(str(self.path / CHECKPOINT_NAME), 0, f"no segment after snapshot LSN {through}")
            if self.read_only:
                self._loaded = True
                return
            live = [(1, create_segment(self.path, 1))]
        for index, (first, path) in enumerate(live):
            newest = index == len(live) - 1
            if first != self._next_lsn:
                raise WalCorruption(
                    str(path),
                    0,
                    f"segment starts at LSN {first}, expected {self._next_lsn} (missing segment?)",
                )
            self._open_active(path, first)
            size = os.fstat(self._fd).st_size
            stop = scan_fd(self._fd, SEGMENT_HEADER_SIZE, size, first, None, many=self._apply_many)
            self._size = stop.offset
            if stop.detail is not None:
                if not newest:
                    raise WalCorruption(str(path), stop.offset, stop.detail)
                self._tail_problem(stop, size)
            if not newest:
                os.close(self._fd)
                self._fd = -1
        if checkpoint is not None:
            if self._next_lsn < checkpoint.next_lsn:
                raise WalCorruption(
                    str(self._active_path),
                    self._size,
                    f"log ends at LSN {self._next_lsn - 1} but the checkpoint recorded LSNs up to "
                    f"{checkpoint.next_lsn - 1}",
                )
            self._highest = max(self._highest, checkpoint.highest_token)
        self._loaded = True

    def _load_snapshot(self, checkpoint: Checkpoint) -> None:
        assert checkpoint.snapshot is not None
        path = self.path / checkpoint.snapshot
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise WalCorruption(str(path), 0, "snapshot named by CHECKPOINT is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size != checkpoint.snapshot_bytes:
                raise WalCorruption(
                    str(path), 0, f"snapshot is {size} bytes, CHECKPOINT says {checkpoint.snapshot_bytes}"
                )
            header = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
            through = check_file_header(header, SNAPSHOT_MAGIC, SNAPSHOT_VERSION, str(path))
            if through != checkpoint.snapshot_through_lsn:
                raise WalCorruption(str(path), 0, f"snapshot header says LSN {through}")
            stop = scan_fd(fd, SEGMENT_HEADER_SIZE, size, 1, None, many=self._apply_many)
            if stop.detail is not None:
                raise WalCorruption(str(path), stop.offset, stop.detail)
            if stop.next_lsn != through + 1:
                raise WalCorruption(str(path), size, f"snapshot ends at LSN {stop.next_lsn - 1}")
        finally:
            os.close(fd)

    def _open_active(self, path: Path, first: int) -> None:
        flags = os.O_RDONLY if self.read_only else os.O_RDWR | os.O_APPEND
        fd = os.open(path, flags)
        try:
            header = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
            got = check_file_header(header, SEGMENT_MAGIC, SEGMENT_VERSION, str(path))
            if got != first:
                raise WalCorruption(str(path), 0, f"header says first LSN {got}, name says {first}")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._active_path = path
        self._active_first = first
        self._size = SEGMENT_HEADER_SIZE

    def _switch_to(self, path: Path) -> None:
        """Another handle rotated: seal our active segment and follow to ``path``."""
        old_fd = self._fd
        self._open_active(path, self._next_lsn)
        if old_fd >= 0:
            os.close(old_fd)

    def _scan_active(self, file_size: int) -> None:
        path = str(self._active_path)
        if file_size < self._size:
            raise WalCorruption(path, file_size, f"segment shrank below its good end {self._size}")
        with gc_paused():
            stop = scan_fd(self._fd, self._size, file_size, self._next_lsn, None, many=self._apply_many)
        self._size = stop.offset
        if stop.detail is not None:
            self._tail_problem(stop, file_size)

    def _tail_problem(self, stop: ScanStop, file_size: int) -> None:
        """A bad spot in the active segment: truncate it if it is a torn tail, else fail closed."""
        path = str(self._active_path)
        detail = stop.detail or "bad record"
        newer = [p for first, p in list_segments(self.path) if first > self._active_first]
        if newer:
            raise WalCorruption(path, stop.offset, f"{detail} (newer segment {newer[0].name})")
        if not stop.torn_candidate:
            raise WalCorruption(path, stop.offset, detail)
        tail = os.pread(self._fd, file_size - stop.offset, stop.offset)
        found = find_valid_record(tail, 1, stop.next_lsn)
        if found is not None:
            offset, lsn = found
            raise WalCorruption(
                path,
                stop.offset,
                f"{detail}, followed by a valid record (LSN {lsn}) at offset {stop.offset + offset}",
            )
        checkpoint = read_checkpoint(self.path)
        if checkpoint is not None and stop.next_lsn < checkpoint.next_lsn:
            raise WalCorruption(
                path,
                stop.offset,
                f"{detail}, but the checkpoint recorded LSNs up to {checkpoint.next_lsn - 1}",
            )
        what = "zero-filled tail" if tail.count(0) == len(tail) else detail
        if self.read_only:
            if self._torn_seen == (path, stop.offset):
                return
            self._torn_seen = (path, stop.offset)
            log.warning(
                "%s: torn tail at offset %d (%d bytes, %s) ignored; a writer will truncate it",
                path,
                stop.offset,
                len(tail),
                what,
            )
            return
        log.warning(
            "%s: truncating torn tail at offset %d (%d bytes, %s); log ends at LSN %d",
            path,
            stop.offset,
            len(tail),
            what,
            stop.next_lsn - 1,
        )
        os.ftruncate(self._fd, stop.offset)
        os.fsync(self._fd)

    def _apply_many(self, records: Iterable[Record]) -> None:
        """Fold records, in LSN order, into the in-memory view (the log obeys the rules).

        Hot (every scanned and appended record): locals hoisted, about 1 µs per record.
        """
        entries, pending, credit = self._entries, self._pending, self._credit
        new, entry_type, credit_type, outcomes = tuple.__new__, RecordType.ENTRY, RecordType.CREDIT_USED, OUTCOME_TYPES
        highest = self._highest
        record = None
        for record in records:
            kind = record.type
            if kind is entry_type:
                key = record.entry_id
                if key not in entries:
                    entries[key] = new(EntryState, (record, None))
                    pending[key] = record
            elif kind in outcomes:
                key = record.entry_id
                state = entries.get(key)
                if state is not None and state.outcome is None:
                    entries[key] = new(EntryState, (state.entry, record))
                    del pending[key]
            elif kind is credit_type and record.entry_id not in credit:
                credit[record.entry_id] = record
            if record.fencing_token > highest:
                highest = record.fencing_token
        if record is not None:
            self._highest = highest
            self._next_lsn = record.lsn + 1

    def _remove_temp_files(self) -> None:
        """Leftovers of a crash during an atomic write (only ever created under the lock)."""
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)

    # --- appending -----------------------------------------------------------------------------

    def append(
        self,
        record_type: RecordType,
        fencing_token: int,
        entry_id: str,
        body: Mapping[str, Any],
    ) -> Record:
        """Append one record; return it with its LSN. Durable (fdatasync) when ``fsync``.

        Takes the lock and catches up first unless inside :meth:`locked`. Exactly one
        ``write`` and (with fsync) one ``fdatasync``. Raises :class:`InvalidRecord` (malformed
        input), :class:`StaleTokenError` (non-zero token below :attr:`highest_token`),
        :class:`WalInvariantError` (second ENTRY, outcome for a non-pending entry, second
        CREDIT_USED), :class:`WalError` (I/O failure: nothing acknowledged, handle unusable).
        """
        return self._append([prepare(record_type, fencing_token, entry_id, body)])[0]

    def append_batch(self, items: Iterable[AppendItem]) -> list[Record]:
        """Group commit: append ``(type, token, entry_id, body)`` items with one write + one fsync.

        All items are checked first (fencing runs through the batch: each token is compared to
        the highest before it, batch included; rules as for :meth:`append`); if any fails,
        nothing is written. After a crash, a prefix of an unacknowledged batch may survive.
        """
        with gc_paused():
            prepared = list(starmap(prepare, items))
            return self._append(prepared) if prepared else []

    def _append(self, prepared: list[Prepared]) -> list[Record]:
        self._enter()
        try:
            if self.read_only:
                raise WalError(f"{self.path}: read-only handle")
            self._check_rules(prepared)
            if self._size >= self.segment_bytes and self._size > SEGMENT_HEADER_SIZE:
                self._rotate()
            data, records = frame_batch(self._next_lsn, prepared)
            self._write(data)
            self._size += len(data)
            self._apply_many(records)
            return records
        finally:
            self._leave()

    def _check_rules(self, prepared: list[Prepared]) -> None:
        if len(prepared) == 1:  # the common single append, without the batch bookkeeping
            item = prepared[0]
            if item.fencing_token and item.fencing_token < self._highest:
                raise StaleTokenError(item.fencing_token, self._highest)
            kind, key = item.type, item.entry_id
            if kind is RecordType.ENTRY:
                if key in self._entries:
                    raise WalInvariantError(f"entry {key!r} is already recorded")
            elif kind in OUTCOME_TYPES:
                if key not in self._pending:
                    raise WalInvariantError(f"{kind.name} for entry {key!r}, which is not pending")
            elif kind is RecordType.CREDIT_USED and key in self._credit:
                raise WalInvariantError(f"credit use {key!r} is already recorded")
            return
        self._check_batch(prepared)

    def _check_batch(self, prepared: list[Prepared]) -> None:
        """:meth:`_check_rules` for several records: each is checked against the log and the
        records before it in the batch (fencing runs through the batch too).

        Hot (every record of a group commit): items unpacked once, the index dicts and enum
        members held in locals (looking up ``RecordType.ENTRY`` on the class each time cost
        about a third of an item's checks).
        """
        highest = self._highest
        entries, pending, credit = self._entries, self._pending, self._credit
        entry_type, credit_type, outcomes = RecordType.ENTRY, RecordType.CREDIT_USED, OUTCOME_TYPES
        opened: set[str] = set()
        closed: set[str] = set()
        used: set[str] = set()
        for kind, token, key, _eid, _raw in prepared:
            if token:
                if token < highest:
                    raise StaleTokenError(token, highest)
                highest = token
            if kind is entry_type:
                if key in entries or key in opened:
                    raise WalInvariantError(f"entry {key!r} is already recorded")
                opened.add(key)
            elif kind in outcomes:
                if key in closed or not (key in pending or key in opened):
                    raise WalInvariantError(f"{kind.name} for entry {key!r}, which is not pending")
                closed.add(key)
            elif kind is credit_type:
                if key in credit or key in used:
                    raise WalInvariantError(f"credit use {key!r} is already recorded")
                used.add(key)

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # only on ENOSPC-like conditions
                written += os.write(self._fd, memoryview(data)[written:])
            if self.fsync:
                _datasync(self._fd)
        except OSError as error:
            self._broken = f"{type(error).__name__}: {error}"
            with contextlib.suppress(OSError):  # else the next opener truncates the torn tail
                os.ftruncate(self._fd, self._size)
            raise WalError(f"{self._active_path}: append failed, nothing recorded: {error}") from error

    def _rotate(self) -> None:
        """Seal the active segment (always fsynced, so an older segment never tears) and start
        the next one, named by the next LSN (file and directory fsynced)."""
        try:
            os.fsync(self._fd)
            path = create_segment(self.path, self._next_lsn)
        except OSError as error:
            raise WalError(f"{self.path}: cannot rotate segment: {error}") from error
        self._switch_to(path)

    # --- queries -------------------------------------------------------------------------------

    def classify(self, entry_id: str, body: Mapping[str, Any]) -> Classification:
        """NEW, DUPLICATE (an ENTRY with this id and the same canonical body) or CONFLICT."""
        raw = canonical_body(body)
        self._fresh()
        state = self._entries.get(entry_id)
        if state is None:
            return Classification.NEW
        return Classification.DUPLICATE if state.entry.raw_body == raw else Classification.CONFLICT

    def lookup(self, entry_id: str) -> EntryState | None:
        """The ENTRY for ``entry_id`` and its outcome (None while pending), or None if unknown."""
        self._fresh()
        return self._entries.get(entry_id)

    def lookup_many(self, entry_ids: Iterable[str]) -> list[EntryState | None]:
        """:meth:`lookup` of each id, in order, after one catch-up (replay settles a chunk of a
        thousand entries at a time: one call instead of a method call and catch-up check each)."""
        self._fresh()
        return list(map(self._entries.get, entry_ids))

    def credit_use(self, request_id: str) -> Record | None:
        """The CREDIT_USED record for ``request_id``, or None."""
        self._fresh()
        return self._credit.get(request_id)

    def pending(self) -> list[Record]:
        """ENTRY records without an outcome, in LSN order."""
        self._fresh()
        return list(self._pending.values())

    @property
    def pending_count(self) -> int:
        """Number of pending ENTRY records (the ``billing_pending`` gauge)."""
        self._fresh()
        return len(self._pending)

    @property
    def highest_token(self) -> int:
        """Highest fencing token ever written here (the lease script's ``floor``); 0 if none."""
        self._fresh()
        return self._highest

    @property
    def next_lsn(self) -> int:
        """LSN the next appended record will get."""
        self._fresh()
        return self._next_lsn

    @property
    def last_lsn(self) -> int:
        """LSN of the newest record; 0 when the partition is empty."""
        return self.next_lsn - 1

    @property
    def applied_lsn(self) -> int:
        """The applied cursor: every ENTRY with LSN <= this has its outcome recorded."""
        self._fresh()
        return self._applied_lsn()

    def _applied_lsn(self) -> int:
        if self._pending:
            return next(iter(self._pending.values())).lsn - 1
        return self._next_lsn - 1

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        """The checkpoint read at load or written by this handle last (None if none)."""
        return self._checkpoint

    def segments(self) -> list[Path]:
        """Segment files on disk, oldest first (the last one is active)."""
        with self.locked():
            return [path for _first, path in list_segments(self.path)]

    def records(self, from_lsn: int = 1) -> RecordIterator:
        """Every readable record with LSN >= ``from_lsn``, in LSN order, snapshot included.

        The set of files is fixed when called (under the lock, after catching up); records are
        then read lazily in large chunks without holding the lock, so appends made meanwhile
        are not included. The :class:`RecordIterator` holds a descriptor per file until it is
        exhausted or closed (``with part.records() as it:``).
        """
        sources: list[tuple[int, str, int, int, int]] = []  # fd, path, start, end, first LSN
        with self.locked():
            try:
                checkpoint = read_checkpoint(self.path)
                through = 0
                if checkpoint is not None and checkpoint.snapshot is not None:
                    through = checkpoint.snapshot_through_lsn
                    if from_lsn <= through:
                        path = self.path / checkpoint.snapshot
                        fd = os.open(path, os.O_RDONLY)
                        sources.append((fd, str(path), SEGMENT_HEADER_SIZE, checkpoint.snapshot_bytes, 1))
                live = [(first, p) for first, p in list_segments(self.path) if first > through]
                for index, (first, path) in enumerate(live):
                    newest = index == len(live) - 1
                    if newest:
                        if first >= self._next_lsn or path != self._active_path:
                            continue
                    elif live[index + 1][0] <= from_lsn:
                        continue
                    fd = os.open(path, os.O_RDONLY)
                    end = self._size if newest else os.fstat(fd).st_size
                    sources.append((fd, str(path), SEGMENT_HEADER_SIZE, end, first))
            except BaseException:
                for source in sources:
                    os.close(source[0])
                raise
        return RecordIterator(sources, from_lsn)

    def rejected(self) -> Iterator[Record]:
        """Every REJECTED record, in LSN order (retired ones come from the snapshot)."""
        return (record for record in self.records() if record.type is RecordType.REJECTED)

    # --- checkpoint and retirement -------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """Persist the cursors; fold fully applied sealed segments into a new snapshot.

        Under the lock: fsync the active segment, compute the applied cursor; the sealed
        segments after the current snapshot whose last LSN is at or below it (contiguous,
        never the active segment) are verified and appended to a copy of the current snapshot,
        written as ``snapshot-<through>.snap`` (temp, fsync, rename, fsync dir); then
        ``CHECKPOINT`` is replaced atomically. :meth:`retire_segments` deletes the segments it
        covers. Returns the checkpoint written.
        """
        self._enter()
        try:
            if self.read_only:
                raise WalError(f"{self.path}: read-only handle")
            os.fsync(self._fd)
            disk = read_checkpoint(self.path)
            snapshot = disk.snapshot if disk is not None else None
            through = disk.snapshot_through_lsn if disk is not None else 0
            size = disk.snapshot_bytes if disk is not None else 0
            applied = self._applied_lsn()
            live = [(first, p) for first, p in list_segments(self.path) if first > through]
            folds: list[_Sealed] = []
            for index in range(len(live) - 1):
                first, path = live[index]
                last = live[index + 1][0] - 1
                if last > applied:
                    break
                folds.append(_Sealed(first, last, path))
            if folds:
                if folds[0].first != through + 1:
                    raise WalCorruption(str(folds[0].path), 0, f"expected LSN {through + 1} first")
                size = self._write_snapshot(snapshot, size, folds)
                through = folds[-1].last
                snapshot = snapshot_name(through)
            checkpoint = Checkpoint(applied, self._highest, self._next_lsn, snapshot, through, size)
            write_checkpoint(self.path, checkpoint)
            self._checkpoint = checkpoint
            self._remove_stale_snapshots(snapshot)
            return checkpoint
        finally:
            self._leave()

    def _write_snapshot(self, old: str | None, old_size: int, folds: list[_Sealed]) -> int:
        through = folds[-1].last
        final = self.path / snapshot_name(through)
        tmp = self.path / f".{final.name}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(out, pack_file_header(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, through))
            if old is not None:
                src = os.open(self.path / old, os.O_RDONLY)
                try:
                    if os.fstat(src).st_size != old_size:
                        raise WalCorruption(str(self.path / old), 0, f"snapshot is not {old_size} bytes")
                    _copy(src, out, SEGMENT_HEADER_SIZE, old_size)
                finally:
                    os.close(src)
            for sealed in folds:
                src = os.open(sealed.path, os.O_RDONLY)
                try:
                    size = os.fstat(src).st_size
                    header = os.pread(src, SEGMENT_HEADER_SIZE, 0)
                    check_file_header(header, SEGMENT_MAGIC, SEGMENT_VERSION, str(sealed.path))
                    stop = scan_fd(src, SEGMENT_HEADER_SIZE, size, sealed.first, None)
                    if stop.detail is not None or stop.next_lsn != sealed.last + 1:
                        raise WalCorruption(str(sealed.path), stop.offset, stop.detail or "segment ends early")
                    _copy(src, out, SEGMENT_HEADER_SIZE, size)
                finally:
                    os.close(src)
            os.fsync(out)
            written = os.fstat(out).st_size
        finally:
            os.close(out)
        os.rename(tmp, final)
        fsync_dir(self.path)
        return written

    def _remove_stale_snapshots(self, keep: str | None) -> None:
        with os.scandir(self.path) as entries:
            stale = [
                entry.path
                for entry in entries
                if entry.name.startswith(SNAPSHOT_PREFIX)
                and entry.name.endswith(SNAPSHOT_SUFFIX)
                and entry.name != keep
            ]
        for path in stale:
            os.unlink(path)
        if stale:
            fsync_dir(self.path)

    def retire_segments(self) -> list[Path]:
        """Delete the sealed segments the durable checkpoint's snapshot covers; return them.

        Only whole segments whose every LSN is at or below the snapshot (itself at or below the
        applied cursor) go, never the active segment. Call :meth:`checkpoint` first.
        """
        self._enter()
        try:
            if self.read_only:
                raise WalError(f"{self.path}: read-only handle")
            disk = read_checkpoint(self.path)
            through = disk.snapshot_through_lsn if disk is not None else 0
            segments = list_segments(self.path)
            removed: list[Path] = []
            for index in range(len(segments) - 1):
                path = segments[index][1]
                if segments[index + 1][0] - 1 > through or path == self._active_path:
                    break
                os.unlink(path)
                removed.append(path)
            if removed:
                fsync_dir(self.path)
            return removed
        finally:
            self._leave()


class RecordIterator(Iterator[Record]):
    """What :meth:`Partition.records` returns: records read lazily from files opened up front.

    Holds one descriptor per file until exhausted, closed, garbage-collected or used as a
    context manager. Raises :class:`WalCorruption` if a file changed under it.
    """

    def __init__(self, sources: list[tuple[int, str, int, int, int]], from_lsn: int) -> None:
        self._sources = sources  # fd, path, start, end, first LSN; emptied when closed
        self._records = _generate(sources, from_lsn)  # holds the list, not self: no cycle

    def __next__(self) -> Record:
        return next(self._records)

    def close(self) -> None:
        """Release the file descriptors (idempotent)."""
        self._records.close()
        _close_sources(self._sources)

    def __enter__(self) -> RecordIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        _close_sources(self._sources)


def _generate(sources: list[tuple[int, str, int, int, int]], from_lsn: int) -> Generator[Record, None, None]:
    try:
        for fd, path, start, end, first in list(sources):
            for record in iter_fd(fd, path, start, end, first):
                if record.lsn >= from_lsn:
                    yield record
    finally:
        _close_sources(sources)


def _close_sources(sources: list[tuple[int, str, int, int, int]]) -> None:
    while sources:
        os.close(sources.pop()[0])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        chunk = os.pread(src, min(_COPY_CHUNK, end - pos), pos)
        if not chunk:
            raise WalError(f"short read while copying at offset {pos}")
        _write_all(dst, chunk)
        pos += len(chunk)
