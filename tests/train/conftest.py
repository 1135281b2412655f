"""Tiny real shard caches for the training tests: synthetic Criteo text -> build_shards, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_setup import K_FOLDS, build_cache


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 labelled train rows + 200 labelled test rows (used as gold)."""
    from ctrpipe.synth.run import run_synth

    out = tmp_path_factory.mktemp("synth")
    run_synth(fmt="criteo", rows=600, test_rows=200, seed=0, out=out, quiet=True)
    return out


@pytest.fixture(scope="session")
def cache(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards, train/val split, 3 stored folds, 200 gold rows, 64 hash bins per field."""
    return build_cache(tmp_path_factory.mktemp("shards") / "criteo", synth_dir,
                  ["data.hash_bins=64", f"data.folds.n_splits={K_FOLDS}"], gold=True)


@pytest.fixture(scope="session")
def cache_other(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same rows, another schema (32 hash bins), no folds and no gold rows."""
    return build_cache(tmp_path_factory.mktemp("shards") / "criteo32", synth_dir,
                  ["data.hash_bins=32", "data.folds.n_splits=0"], gold=False)
