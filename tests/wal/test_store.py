"""The env's set of partitions: layout, recorded partition count, stable wallet hash."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from worker.errors import ConfigError, PartitionCountMismatch, WalCorruption, WalError
from worker.settings import Settings
from worker.wal import RecordType, WalStore, open_store, partition_dir_name, partition_for_wallet


def settings(tmp_path: Path, partitions: int = 4, env: str = "t1") -> Settings:
    return Settings(
        wal_dir=tmp_path / "wal",
        env=env,
        partitions=partitions,
        wal_segment_bytes=4096,
        wal_fsync="off",
    )


def test_layout_and_partition_access(tmp_path: Path) -> None:
    with open_store(settings(tmp_path)) as store:
        env_dir = tmp_path / "wal" / "t1"
        assert sorted(p.name for p in env_dir.iterdir()) == ["PARTITIONS", "p00", "p01", "p02", "p03"]
        assert (env_dir / "PARTITIONS").read_text() == "4\n"
        assert len(store) == store.partition_count == 4
        assert [p.number for p in store] == [0, 1, 2, 3]
        part = store.partition(2)
        assert part.path == env_dir / "p02"
        record = part.append(RecordType.ENTRY, 1, "e1", {"a": "1"})
        assert record.lsn == 1
        assert (env_dir / "p02" / "00000000000000000001.wal").exists()
        with pytest.raises(IndexError):
            store.partition(4)
    assert partition_dir_name(7) == "p07" and partition_dir_name(123) == "p123"


def test_partition_count_mismatch_is_refused(tmp_path: Path) -> None:
    WalStore(settings(tmp_path, partitions=4)).close()
    with pytest.raises(PartitionCountMismatch) as caught:
        WalStore(settings(tmp_path, partitions=8))
    message = str(caught.value)
    assert "\n" not in message
    assert "BILLING_PARTITIONS" in message and "4" in message and "8" in message
    assert isinstance(caught.value, ConfigError)
    # Same count again is fine; another env is independent.
    WalStore(settings(tmp_path, partitions=4)).close()
    WalStore(settings(tmp_path, partitions=8, env="other")).close()


def test_existing_partition_dirs_without_count_file_are_checked(tmp_path: Path) -> None:
    WalStore(settings(tmp_path, partitions=4)).close()
    (tmp_path / "wal" / "t1" / "PARTITIONS").unlink()
    with pytest.raises(PartitionCountMismatch, match="BILLING_PARTITIONS"):
        WalStore(settings(tmp_path, partitions=2))


def test_corrupt_count_file_fails_closed(tmp_path: Path) -> None:
    WalStore(settings(tmp_path, partitions=4)).close()
    (tmp_path / "wal" / "t1" / "PARTITIONS").write_text("four\n")
    with pytest.raises(WalCorruption, match="partition count"):
        WalStore(settings(tmp_path, partitions=4))


def test_read_only_store_needs_an_existing_wal(tmp_path: Path) -> None:
    with pytest.raises(WalError, match="no WAL directory"):
        WalStore(settings(tmp_path), read_only=True)
    assert not (tmp_path / "wal").exists()


@pytest.mark.parametrize(
    ("wallet", "expected"),
    [
        ("0x0000000000000000000000000000000000000000", [0, 0, 0, 464]),
        ("0x52908400098527886E0F7030069857D2E4169EE7", [0, 5, 13, 509]),
        ("0xde0b295669a9fd93d5f28d9ec85e40f4cb697bae", [0, 2, 10, 554]),
    ],
)
def test_partition_hash_is_stable(wallet: str, expected: list[int]) -> None:
    assert [partition_for_wallet(wallet, n) for n in (1, 8, 16, 1024)] == expected
    assert partition_for_wallet(wallet.lower(), 16) == partition_for_wallet(wallet.upper().replace("0X", "0x"), 16)


def test_partition_hash_is_the_same_in_another_process() -> None:
    wallet = "0x52908400098527886e0f7030069857d2e4169ee7"
    code = f"from worker.wal import partition_for_wallet; print(partition_for_wallet({wallet!r}, 16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"}
    )
    assert int(out.stdout) == partition_for_wallet(wallet, 16) == 13


def test_partition_hash_spreads_wallets(tmp_path: Path) -> None:
    with open_store(settings(tmp_path, partitions=8)) as store:
        counts = Counter(store.partition_for_wallet(f"0x{i:040x}") for i in range(4000))
    assert set(counts) == set(range(8))
    assert max(counts.values()) < 2 * min(counts.values())
