"""``billing-worker wal verify | inspect | pending | rejected`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.wal.helpers import flip_bit, record_spans, segment_paths
from worker.cli_wal import wal
from worker.settings import Settings
from worker.wal import RecordType, WalStore


def _env(tmp_path: Path, partitions: int = 2) -> dict[str, str]:
    return {
        "BILLING_WAL_DIR": str(tmp_path / "wal"),
        "BILLING_ENV": "clitest",
        "BILLING_PARTITIONS": str(partitions),
        "BILLING_WAL_SEGMENT_BYTES": "4096",
        "BILLING_WAL_FSYNC": "off",
    }


def run(tmp_path: Path, *args: str, partitions: int = 2) -> Result:
    return CliRunner().invoke(wal, list(args), env=_env(tmp_path, partitions), catch_exceptions=False)


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """Partition 0: 60 entries (e0..e59), outcomes for the even ones, two rejected; p01 empty."""
    settings = Settings(wal_dir=tmp_path / "wal", env="clitest", partitions=2, wal_segment_bytes=4096, wal_fsync="off")
    with WalStore(settings) as store:
        part = store.partition(0)
        for i in range(60):
            part.append(RecordType.ENTRY, 1, f"e{i}", {"i": i, "pad": "p" * 40})
        for i in range(0, 60, 2):
            part.append(RecordType.APPLIED, 2, f"e{i}", {"amount": str(i)})
        part.append(RecordType.REJECTED, 0, "bad-1", {"reason": "wallet: invalid"})
        part.append(RecordType.REJECTED, 0, "", {"reason": "entry_id: missing"})
    return tmp_path / "wal" / "clitest"


def test_verify_clean(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "verify")
    assert result.exit_code == 0, result.output
    assert "p00: ok: 92 records, last LSN 92" in result.stdout
    assert "p01: ok: 0 records" in result.stdout


def test_verify_with_progress_bar(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "verify", "--progress", "--partition", "0")
    assert result.exit_code == 0, result.output
    assert "p01" not in result.stdout


def test_verify_names_file_and_offset_and_exits_1(populated: Path, tmp_path: Path) -> None:
    older = segment_paths(populated / "p00")[0]
    _lsn, start, _end = record_spans(older)[3]
    flip_bit(older, start + 40)
    result = run(tmp_path, "verify")
    assert result.exit_code == 1
    assert f"{older}@{start}: corrupt: CRC mismatch" in result.stdout
    assert "p00: FAILED" in result.stdout and "p01: ok" in result.stdout
    # inspect refuses a corrupt partition (exit 1, one line, pointing at verify)
    inspected = run(tmp_path, "inspect", "--partition", "0")
    assert inspected.exit_code == 1
    assert f"{older}@{start}" in inspected.stderr and "wal verify" in inspected.stderr


def test_verify_torn_tail_is_reported_but_ok(populated: Path, tmp_path: Path) -> None:
    newest = segment_paths(populated / "p00")[-1]
    with newest.open("ab") as handle:
        handle.write(b"\x00" * 100)
    result = run(tmp_path, "verify", "--partition", "0")
    assert result.exit_code == 0
    assert f"{newest}@" in result.stdout and "torn tail" in result.stdout


def test_inspect_lists_records(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "inspect", "--partition", "0", "--from-lsn", "60", "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[:5] for line in lines] == [
        ["p00", "60", "ENTRY", "1", "e59"],
        ["p00", "61", "APPLIED", "2", "e0"],
        ["p00", "62", "APPLIED", "2", "e2"],
    ]
    assert lines[1].split("\t")[5] == '{"amount":"0"}'
    everything = run(tmp_path, "inspect")
    assert len(everything.stdout.splitlines()) == 92


def test_inspect_json(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "inspect", "--partition", "0", "--json", "--limit", "1")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "partition": 0,
        "lsn": 1,
        "type": "ENTRY",
        "fencing_token": 1,
        "entry_id": "e0",
        "body": {"i": 0, "pad": "p" * 40},
    }


def test_pending(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "pending")
    assert result.exit_code == 0
    assert [line.split("\t")[4] for line in result.stdout.splitlines()] == [f"e{i}" for i in range(1, 60, 2)]
    assert "30 pending" in result.stderr


def test_rejected(populated: Path, tmp_path: Path) -> None:
    result = run(tmp_path, "rejected", "--json")
    assert result.exit_code == 0
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["entry_id"], r["body"]["reason"]) for r in rows] == [
        ("bad-1", "wallet: invalid"),
        ("", "entry_id: missing"),
    ]
    assert "2 rejected" in result.stderr


@pytest.mark.parametrize("command", ["verify", "inspect", "pending", "rejected"])
def test_missing_wal_dir_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    result = run(tmp_path, command)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no WAL directory" in result.stderr and str(tmp_path / "wal" / "clitest") in result.stderr


def test_bad_arguments_exit_2(populated: Path, tmp_path: Path) -> None:
    out_of_range = run(tmp_path, "pending", "--partition", "5")
    assert out_of_range.exit_code == 2 and "--partition 5: not in 0..1" in out_of_range.stderr
    not_a_number = run(tmp_path, "verify", "--partition", "x")
    assert not_a_number.exit_code == 2
    mismatch = run(tmp_path, "verify", partitions=3)
    assert mismatch.exit_code == 2 and "BILLING_PARTITIONS" in mismatch.stderr
    bad_env = CliRunner().invoke(wal, ["verify"], env={**_env(tmp_path), "BILLING_PARTITIONS": "0"})
    assert bad_env.exit_code == 2 and "BILLING_PARTITIONS" in bad_env.stderr
