"""The write-ahead log: the authoritative, fsynced record of every billing decision.

In the style of LevelDB's ``log_writer``/``log_reader`` and etcd's ``wal``. One directory per
partition (``<BILLING_WAL_DIR>/<env>/p<NN>/``), segment files named by their first LSN and
rotated at ``BILLING_WAL_SEGMENT_BYTES``, CRC32C-framed records (format in
:mod:`worker.wal.record` and :mod:`worker.wal.segment`), a checkpoint and snapshot
(:mod:`worker.wal.checkpoint`). The WAL knows nothing of Redis.

API
---
``WalStore(settings, *, read_only=False)`` / ``open_store(settings)``
    Opens (creating) every partition of ``settings.env``; checks the recorded partition
    count (:class:`~worker.errors.PartitionCountMismatch`). ``partition(n) -> Partition``,
    ``partition_for_wallet(wallet) -> int`` (stable blake2b hash), ``partition_count``,
    ``partition_path(n)``, iteration, ``close()``, context manager.

``Partition.open(path, *, segment_bytes, fsync=True, read_only=False, create=True, number=None)``
    One partition. ``close()``; context manager. ``locked()`` holds the exclusive flock across a
    read-decide-append sequence (re-entrant; catches up with other writers first).
    Appending (each takes the lock and catches up unless already inside ``locked()``):

    * ``append(type, fencing_token, entry_id, body) -> Record``: one write + one fdatasync.
    * ``append_batch([(type, token, entry_id, body), ...]) -> list[Record]``: group commit.

    Both enforce storage-side fencing (:class:`~worker.errors.StaleTokenError` for a non-zero
    token below ``highest_token``; 0 always passes) and the log's rules
    (:class:`~worker.errors.WalInvariantError`): one ENTRY per entry_id, an outcome (APPLIED,
    NO_CREDIT, CAP_EXCEEDED) only for a pending ENTRY, one CREDIT_USED per request id.
    Queries (catch up first): ``classify(entry_id, body) -> Classification`` (NEW, DUPLICATE,
    CONFLICT), ``lookup(entry_id) -> EntryState | None`` (``.entry``, ``.outcome``),
    ``lookup_many(entry_ids) -> list[EntryState | None]``,
    ``credit_use(request_id) -> Record | None``, ``pending() -> list[Record]``,
    ``pending_count``, ``highest_token``, ``next_lsn``, ``last_lsn``, ``applied_lsn``,
    ``segments()``, ``records(from_lsn=1) -> RecordIterator`` and ``rejected()`` (iterators over
    everything, snapshot included). Maintenance: ``checkpoint() -> Checkpoint`` (cursors, and
    fully applied sealed segments folded into the snapshot), ``retire_segments() -> list[Path]``
    (deletes the segments the durable snapshot covers).

    Use one handle per partition per process (``WalStore`` does): two handles exclude each other
    like two processes, so appending through one inside the other's ``locked()`` deadlocks.

``verify_partition(path, *, progress=None) -> VerifyReport``
    Read-only, lock-free check listing every :class:`Problem` (file, offset, detail).

Failure modes: :class:`~worker.errors.WalCorruption` (``path``, ``offset``, ``detail``) when a
partition is damaged anywhere but a torn tail of its newest segment (that tail is truncated and
logged on the ``worker.wal`` logger); :class:`~worker.errors.InvalidRecord` for malformed input;
:class:`~worker.errors.WalError` for I/O failures (the handle then refuses further use: reopen).
"""

from worker.wal.checkpoint import Checkpoint
from worker.wal.partition import DEFAULT_SEGMENT_BYTES, AppendItem, Partition, RecordIterator
from worker.wal.record import (
    OUTCOME_TYPES,
    Classification,
    EntryState,
    Record,
    RecordType,
    canonical_body,
)
from worker.wal.store import (
    WalStore,
    check_partition_count,
    open_store,
    partition_dir_name,
    partition_for_wallet,
    read_partition_count,
)
from worker.wal.verify import Problem, Severity, VerifyReport, partition_bytes, verify_partition

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "OUTCOME_TYPES",
    "AppendItem",
    "Checkpoint",
    "Classification",
    "EntryState",
    "Partition",
    "Problem",
    "Record",
    "RecordIterator",
    "RecordType",
    "Severity",
    "VerifyReport",
    "WalStore",
    "canonical_body",
    "check_partition_count",
    "open_store",
    "partition_bytes",
    "partition_dir_name",
    "partition_for_wallet",
    "read_partition_count",
    "verify_partition",
]
