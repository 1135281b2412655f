"""Tiny real shard caches for the training tests: synthetic Criteo text -> build_shards, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_setup import CRITEO_CFG, K_FOLDS

from ctrpipe.config import load_config


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 labelled train rows + 200 labelled test rows (used as gold)."""
    from ctrpipe.synth.run import run_synth

    out = tmp_path_factory.mktemp("synth")
    run_synth(fmt="criteo", rows=600, test_rows=200, seed=0, out=out, quiet=True)
    return out


def _build(out: Path, synth: Path, overrides: list[str], gold: bool) -> Path:
    from ctrpipe.shard.build import build_shards

    cfg = load_config(CRITEO_CFG, ["data.shard_rows=256", "data.split.val_ratio=0.2", *overrides])
    build_shards(cfg, [synth / "train.tsv"], out, gold=[synth / "test.tsv"] if gold else (), progress=False)
    return out


@pytest.fixture(scope="session")
def cache(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 shards, train/val split, 3 stored folds, 200 gold rows, 64 hash bins per field."""
    return _build(tmp_path_factory.mktemp("shards") / "criteo", synth_dir,
                  ["data.hash_bins=64", f"data.folds.n_splits={K_FOLDS}"], gold=True)


@pytest.fixture(scope="session")
def cache_other(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same rows, another schema (32 hash bins), no folds and no gold rows."""
    return _build(tmp_path_factory.mktemp("shards") / "criteo32", synth_dir,
                  ["data.hash_bins=32", "data.folds.n_splits=0"], gold=False)
