"""The checkpoint file and the snapshot of retired records it points to.

``CHECKPOINT`` (replaced atomically: temp file, fsync, rename, fsync directory)::

    offset size field
    0      8    magic    b"BWALCKP\\0"
    8      4    crc32c   of bytes [12, end)
    12     4    version  1
    16     4    n        payload length
    20     n    payload  canonical JSON: applied_lsn, highest_token, next_lsn,
                         snapshot (file name or null), snapshot_through_lsn, snapshot_bytes

``snapshot-<through_lsn:020d>.snap`` holds every record with LSN 1..through_lsn, in order, in the
record framing, after a 24-byte header (magic ``b"BWALSNP\\0"``, version 1, through_lsn, CRC).
It is what the idempotency index, the pending set, the credit-use index and the rejected list
are rebuilt from for the part of the log whose segments were retired, so that those segments
can be deleted and never scanned again. It is written once (new name per retirement) and
never modified; every record in it keeps its own CRC, and the checkpoint records its size.

A checkpoint or snapshot that fails any check raises :class:`WalCorruption`: the partition
refuses to open rather than forget what it had recorded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from crc32c import crc32c

from worker.errors import WalCorruption
from worker.wal.segment import write_file_atomically

CHECKPOINT_NAME = "CHECKPOINT"
CHECKPOINT_MAGIC = b"BWALCKP\0"
CHECKPOINT_VERSION = 1
_CKPT_HEAD = struct.Struct("<8sIII")

SNAPSHOT_MAGIC = b"BWALSNP\0"
SNAPSHOT_VERSION = 1
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".snap"


def snapshot_name(through_lsn: int) -> str:
    """File name of the snapshot covering LSNs 1..``through_lsn``."""
    return f"{SNAPSHOT_PREFIX}{through_lsn:020d}{SNAPSHOT_SUFFIX}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A durable cursor of one partition.

    * ``applied_lsn``: every ENTRY with an LSN <= this had its outcome recorded (the applied
      cursor); ``0`` when the first ENTRY is still pending or nothing was written.
    * ``highest_token``: highest fencing token in the partition when written.
    * ``next_lsn``: LSN of the next record when written; the log may never end before it.
    * ``snapshot``: file name of the snapshot of retired records, or None.
    * ``snapshot_through_lsn``: last LSN in that snapshot (0 when none); segments wholly at or
      below it may be deleted.
    * ``snapshot_bytes``: exact size of the snapshot file.
    """

    applied_lsn: int
    highest_token: int
    next_lsn: int
    snapshot: str | None = None
    snapshot_through_lsn: int = 0
    snapshot_bytes: int = 0


_INT_FIELDS = ("applied_lsn", "highest_token", "next_lsn", "snapshot_through_lsn", "snapshot_bytes")


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The bytes of a ``CHECKPOINT`` file."""
    payload = json.dumps(asdict(checkpoint), sort_keys=True, separators=(",", ":")).encode()
    rest = struct.pack("<II", CHECKPOINT_VERSION, len(payload)) + payload
    return CHECKPOINT_MAGIC + struct.pack("<I", crc32c(rest)) + rest


def decode_checkpoint(data: bytes, path: str) -> Checkpoint:
    """Parse and check a ``CHECKPOINT`` file; raise :class:`WalCorruption` on any defect."""
    if len(data) < _CKPT_HEAD.size:
        raise WalCorruption(path, 0, f"checkpoint is {len(data)} bytes, too short")
    magic, crc, version, length = _CKPT_HEAD.unpack_from(data)
    if magic != CHECKPOINT_MAGIC:
        raise WalCorruption(path, 0, f"checkpoint has bad magic {magic!r}")
    if crc32c(data[12:]) != crc:
        raise WalCorruption(path, 8, "checkpoint CRC mismatch")
    if version != CHECKPOINT_VERSION:
        raise WalCorruption(path, 12, f"unsupported checkpoint version {version}")
    if _CKPT_HEAD.size + length != len(data):
        raise WalCorruption(path, 16, f"checkpoint length {length} does not match the file")
    try:
        fields = json.loads(data[_CKPT_HEAD.size :])
    except ValueError as error:
        raise WalCorruption(path, _CKPT_HEAD.size, f"checkpoint payload: {error}") from None
    if not isinstance(fields, dict) or set(fields) != set(_INT_FIELDS) | {"snapshot"}:
        raise WalCorruption(path, _CKPT_HEAD.size, "checkpoint payload has unexpected fields")
    for name in _INT_FIELDS:
        value = fields[name]
        if type(value) is not int or value < 0:
            raise WalCorruption(path, _CKPT_HEAD.size, f"checkpoint {name}={value!r} is invalid")
    snapshot = fields["snapshot"]
    through = fields["snapshot_through_lsn"]
    if snapshot is None:
        if through or fields["snapshot_bytes"]:
            raise WalCorruption(path, _CKPT_HEAD.size, "checkpoint has snapshot sizes but no file")
    elif snapshot != snapshot_name(through):
        raise WalCorruption(path, _CKPT_HEAD.size, f"checkpoint names snapshot {snapshot!r}")
    if fields["next_lsn"] < 1 or through >= fields["next_lsn"]:
        raise WalCorruption(path, _CKPT_HEAD.size, "checkpoint cursors are inconsistent")
    if fields["applied_lsn"] >= fields["next_lsn"]:
        raise WalCorruption(path, _CKPT_HEAD.size, "checkpoint applied_lsn beyond next_lsn")
    return Checkpoint(**fields)


def read_checkpoint(directory: Path) -> Checkpoint | None:
    """The partition's checkpoint, None if it never wrote one; WalCorruption if it is bad."""
    path = directory / CHECKPOINT_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_checkpoint(data, str(path))


def write_checkpoint(directory: Path, checkpoint: Checkpoint) -> None:
    """Replace the partition's checkpoint atomically and durably."""
    write_file_atomically(directory / CHECKPOINT_NAME, encode_checkpoint(checkpoint))
