"""Fixtures of the WAL tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.wal.helpers import SMALL_SEGMENT
from worker.wal import Partition


@pytest.fixture
def part_dir(tmp_path: Path) -> Path:
    return tmp_path / "wal" / "dev" / "p00"


@pytest.fixture
def part(part_dir: Path) -> Iterator[Partition]:
    """A fresh partition with small segments and fsync off (tests that need fsync say so)."""
    handle = Partition.open(part_dir, segment_bytes=SMALL_SEGMENT, fsync=False)
    yield handle
    handle.close()
