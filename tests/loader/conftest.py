"""Loader test fixtures; the cache builder lives in loader_cache.py (a unique module name for imports)."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_cache import write_cache


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """Four shards of uneven size (one empty), so batches straddle shard boundaries."""
    return write_cache(tmp_path / "cache", (137, 0, 250, 61))
