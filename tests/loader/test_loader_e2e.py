"""ShardLoader on caches made by the real pipeline: `ctrpipe synth` data -> build_shards -> loader.

Checks the loader against the stored arrays themselves (read back with shard.reader.open_cache), for the
Criteo text layout and for the Parquet layout with multi-hot, weighted multi-hot, a sequence and two labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrpipe.config import load_config
from ctrpipe.data.splits import SPLIT_CODES
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView

REPO = Path(__file__).resolve().parents[2]
ALL_SPLITS = RowView(tuple(SPLIT_CODES))


def _build(tmp: Path, fmt: str, cfg_name: str, rows: int, overrides: list[str]) -> Path:
    from ctrpipe.shard.build import build_shards
    from ctrpipe.synth.run import run_synth

    synth = run_synth(fmt=fmt, rows=rows, test_rows=60, seed=1, out=tmp / "synth", quiet=True)
    train, test = (s.data for s in synth.splits)
    cfg = load_config(REPO / "cfgs" / cfg_name, ["data.shard_rows=97", "data.folds.n_splits=3", *overrides])
    build_shards(cfg, [train], tmp / "cache", gold=[test], progress=False)
    return tmp / "cache"


@pytest.fixture(scope="module")
def criteo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("criteo"), "criteo", "criteo.yaml", 400, ["data.hash_bins=1000"])


@pytest.fixture(scope="module")
def parquet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("parquet"), "parquet", "parquet_example.yaml", 300,
                  ["data.categorical.min_count=1"])


def _stored(cache: Path) -> dict[str, np.ndarray]:
    from ctrpipe.shard.reader import open_cache

    c = open_cache(cache)
    return {g: c.concat(g) for g in c.groups if g != "ids"}


@pytest.mark.parametrize("strategy", ["block", "gather"])
def test_criteo_cache_every_row_once_with_stored_values(criteo_cache: Path, strategy: str) -> None:
    stored = _stored(criteo_cache)
    loader = ShardLoader(criteo_cache, ALL_SPLITS, 64, shuffle=True, seed=0, block_rows=16, strategy=strategy)
    assert len(loader.manifest.shards) >= 5 and loader.num_rows == loader.manifest.total_rows
    seen = []
    for batch in loader:
        rows = batch.row_index.numpy()
        seen.append(rows)
        np.testing.assert_array_equal(batch.numeric.numpy(), stored["numeric"][rows])
        np.testing.assert_array_equal(batch.categorical.numpy(), stored["categorical"][rows])
        np.testing.assert_array_equal(batch.labels.numpy(), stored["labels"][rows])
    got = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(got), np.arange(loader.manifest.total_rows))
    assert batch.categorical.shape[1] == len(loader.spec.categorical) == 26


def test_criteo_cache_views_follow_split_and_fold_arrays(criteo_cache: Path) -> None:
    stored = _stored(criteo_cache)
    split, fold = stored["split"], stored["fold"]
    for name, code in SPLIT_CODES.items():
        if (split == code).any():
            rows = ShardLoader(criteo_cache, RowView((name,)), 50, shuffle=False, seed=0).row_indices()
            np.testing.assert_array_equal(rows, np.flatnonzero(split == code))
    for k in range(3):
        val = ShardLoader(criteo_cache, RowView.fold_val(k), 50, shuffle=False, seed=0)
        fit = ShardLoader(criteo_cache, RowView.fold_train(k), 50, shuffle=True, seed=0)
        in_cv = (split <= 1) & (fold >= 0)
        np.testing.assert_array_equal(val.row_indices(), np.flatnonzero(in_cv & (fold == k)))
        np.testing.assert_array_equal(fit.row_indices(), np.flatnonzero(in_cv & (fold != k)))
        np.testing.assert_array_equal(np.concatenate([b.row_index.numpy() for b in val]), val.row_indices())


def test_parquet_cache_carries_token_fields_and_labels(parquet_cache: Path) -> None:
    stored = _stored(parquet_cache)
    loader = ShardLoader(parquet_cache, RowView.train(), 32, shuffle=True, seed=1)
    spec, manifest = loader.spec, loader.manifest
    assert len(spec.multihot) == 2 and len(spec.sequence) == 1 and spec.n_tasks == 2
    assert [f.weighted for f in spec.multihot] == [False, True]
    seen = []
    for batch in loader:
        rows = batch.row_index.numpy()
        seen.append(rows)
        np.testing.assert_array_equal(batch.labels.numpy(), stored["labels"][rows])
        for i, col in enumerate(manifest.columns_of("multihot")):
            stem = col.group.removesuffix(".tokens")
            np.testing.assert_array_equal(batch.multihot[i].numpy(), stored[col.group][rows])
            np.testing.assert_array_equal(batch.multihot_len[i].numpy(), stored[f"{stem}.len"][rows])
            if col.weighted:
                weights = stored[f"{stem}.weights"][rows]
                np.testing.assert_array_equal(batch.multihot_weights[i].numpy(), weights)
            else:
                assert batch.multihot_weights[i] is None
        seq = manifest.columns_of("sequence")[0]
        np.testing.assert_array_equal(batch.sequence[0].numpy(), stored[seq.group][rows])
        assert batch.sequence[0].shape[1] == spec.sequence[0].width
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), loader.row_indices())
