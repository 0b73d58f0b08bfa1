"""The environment's set of partitions: ``<wal_dir>/<env>/p<NN>/`` and the ``PARTITIONS`` file.

The partition count is fixed once used (wallets hash onto partitions): the env directory
records it in ``PARTITIONS`` (one decimal line, created atomically and exclusively), and opening
the store with a different ``BILLING_PARTITIONS`` raises :class:`PartitionCountMismatch`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from worker.errors import PartitionCountMismatch, WalCorruption, WalError
from worker.settings import Settings
from worker.wal.partition import Partition
from worker.wal.segment import fsync_dir

PARTITIONS_FILE = "PARTITIONS"
_PARTITION_DIR = re.compile(r"p(\d{2,})")


def partition_dir_name(number: int) -> str:
    """``p00`` .. ``p99``, then ``p100`` ..: the directory name of partition ``number``."""
    return f"p{number:02d}"


def partition_for_wallet(wallet: str, partitions: int) -> int:
    """Stable partition of a wallet: blake2b-64 of the lowercased address, modulo ``partitions``.

    Identical in every process and Python version (unlike ``hash()``), so a wallet always maps
    to the same partition, lease and fencing key.
    """
    digest = hashlib.blake2b(wallet.lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def _mismatch(recorded: object, given: int, env_dir: Path) -> PartitionCountMismatch:
    return PartitionCountMismatch(
        f"BILLING_PARTITIONS: the WAL at {env_dir} records {recorded} partitions but {given} "
        "were given; the partition count is fixed once used"
    )


def read_partition_count(env_dir: Path) -> int | None:
    """The count recorded in ``<env_dir>/PARTITIONS``; None if the file does not exist."""
    path = env_dir / PARTITIONS_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise WalCorruption(str(path), 0, f"unreadable partition count: {error}") from None
    if not re.fullmatch(r"[1-9]\d{0,5}\n", text):
        raise WalCorruption(str(path), 0, f"bad partition count file content {text[:40]!r}")
    return int(text)


def check_partition_count(env_dir: Path, partitions: int, *, create: bool) -> None:
    """Make sure ``env_dir`` records ``partitions``; record it first when ``create`` and new.

    Raises :class:`PartitionCountMismatch` (one line naming BILLING_PARTITIONS, the recorded
    and the given count) on a difference, also when no count is recorded yet but partition
    directories beyond ``partitions`` exist.
    """
    recorded = read_partition_count(env_dir)
    if recorded is None:
        existing = _existing_partition_dirs(env_dir)
        if existing and max(existing) >= partitions:
            raise _mismatch(f"at least {max(existing) + 1}", partitions, env_dir)
        if not create:
            return
        recorded = _record_partition_count(env_dir, partitions)
    if recorded != partitions:
        raise _mismatch(recorded, partitions, env_dir)


def _existing_partition_dirs(env_dir: Path) -> list[int]:
    if not env_dir.is_dir():
        return []
    return [
        int(match.group(1))
        for entry in os.scandir(env_dir)
        if entry.is_dir() and (match := _PARTITION_DIR.fullmatch(entry.name))
    ]


def _record_partition_count(env_dir: Path, partitions: int) -> int:
    """Create ``PARTITIONS`` exclusively (link of a fsynced temp file); return what is recorded."""
    env_dir.mkdir(parents=True, exist_ok=True)
    fsync_dir(env_dir.parent)
    tmp = env_dir / f".{PARTITIONS_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{partitions}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, env_dir / PARTITIONS_FILE)  # fails if another process won the race
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    fsync_dir(env_dir)
    recorded = read_partition_count(env_dir)
    assert recorded is not None
    return recorded


class WalStore:
    """Every partition of one environment, opened (and created) from :class:`Settings`.

    ``settings.wal_dir / settings.env`` holds ``PARTITIONS`` and ``p00`` .. ``p<N-1>``; each
    partition is opened with ``settings.wal_segment_bytes`` and fsync per
    ``settings.wal_fsync``. Raises :class:`PartitionCountMismatch` when ``settings.partitions``
    differs from the recorded count, :class:`WalCorruption` when a partition is damaged.
    """

    def __init__(self, settings: Settings, *, read_only: bool = False) -> None:
        self.settings = settings
        self.env_dir = settings.env_wal_dir
        self.partition_count = settings.partitions
        self.read_only = read_only
        if read_only and not self.env_dir.is_dir():
            raise WalError(f"no WAL directory {self.env_dir}")
        check_partition_count(self.env_dir, self.partition_count, create=not read_only)
        self._partitions: list[Partition] = []
        try:
            for number in range(self.partition_count):
                self._partitions.append(
                    Partition.open(
                        self.partition_path(number),
                        segment_bytes=settings.wal_segment_bytes,
                        fsync=settings.wal_fsync == "always",
                        read_only=read_only,
                        number=number,
                    )
                )
        except BaseException:
            self.close()
            raise

    def partition_path(self, number: int) -> Path:
        """Directory of partition ``number``."""
        return self.env_dir / partition_dir_name(number)

    def partition(self, number: int) -> Partition:
        """The open handle of partition ``number`` (IndexError when out of range)."""
        if not 0 <= number < self.partition_count:
            raise IndexError(f"partition {number} not in 0..{self.partition_count - 1}")
        return self._partitions[number]

    def partition_for_wallet(self, wallet: str) -> int:
        """Stable partition number of ``wallet`` (see :func:`partition_for_wallet`)."""
        return partition_for_wallet(wallet, self.partition_count)

    def __iter__(self) -> Iterator[Partition]:
        return iter(list(self._partitions))

    def __len__(self) -> int:
        return self.partition_count

    def close(self) -> None:
        """Close every partition handle. Idempotent."""
        for partition in self._partitions:
            partition.close()

    def __enter__(self) -> WalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(settings: Settings, *, read_only: bool = False) -> WalStore:
    """Open every partition of ``settings.env`` (see :class:`WalStore`)."""
    return WalStore(settings, read_only=read_only)
