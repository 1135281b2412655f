"""Shared fixtures: tiny, deterministic raw inputs written into tmp_path by tests/raw_inputs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from raw_inputs import write_criteo_tsv, write_parquet

REPO = Path(__file__).resolve().parents[1]
SHARED_CRITEO = REPO.parent / "shared" / "data" / "criteo"


@pytest.fixture
def criteo_tsv(tmp_path: Path) -> Path:
    return write_criteo_tsv(tmp_path / "train.tsv", 64)


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "train.parquet", 64)
