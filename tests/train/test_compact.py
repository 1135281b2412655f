"""Checkpoints hold what training changed: the rows of each table a gradient reached, never whole tables.

The model is rebuilt from its seed and those rows are written back, so predictions and --resume stay exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import train
from train_setup import build_cache

from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.models.layers.embedding import named_tables
from ctrpipe.shard.reader import open_cache
from ctrpipe.train.checkpoint import build_initial_model, load_checkpoint, model_from_checkpoint
from ctrpipe.train.evaluate import predict

BINS = 20_000


@pytest.fixture(scope="module")
def wide_cache(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training rows hashed into 20k bins per field: far more table rows than the data can touch."""
    return build_cache(tmp_path_factory.mktemp("shards") / "wide", synth_dir, [f"data.hash_bins={BINS}"], gold=False)


@pytest.mark.parametrize("optimizer", ["lazy_adam", "adam", "adagrad"])
def test_checkpoints_store_touched_rows_and_load_back_exactly(wide_cache: Path, tmp_path: Path, optimizer: str):
    code, out = train(wide_cache, tmp_path, "--set", "train.epochs=2", "--set", "model.embedding_dim=8",
                      "--set", f"train.embedding_optimizer={optimizer}")
    assert code == 0, out
    run = tmp_path / "criteo"
    best, last = load_checkpoint(run / "ckpt_best.pt"), load_checkpoint(run / "ckpt_last.pt")
    init = build_initial_model(best.config, best.feature_spec, best.init_seed)
    trained = model_from_checkpoint(last)                 # rebuilt from the seed + the stored rows
    table_bytes = sum(p.numel() * 4 for p in named_tables(init).values())

    # checkpoints scale with the rows training touched, not with hash_bins (Adam: weights + 2 moments)
    assert (run / "ckpt_best.pt").stat().st_size < 0.1 * table_bytes
    assert (run / "ckpt_last.pt").stat().st_size < 0.3 * table_bytes

    # the stored rows are ids the training rows looked up (plus each field's table offset; the rows of the
    # ragged batch each epoch drops may never be seen) ...
    cache = open_cache(wide_cache)
    train_rows = np.flatnonzero(cache.concat("split") == 0)
    ids = cache.concat("categorical")[train_rows].astype(np.int64)             # (N, 26) local ids
    offsets = np.arange(ids.shape[1], dtype=np.int64) * BINS
    looked_up = np.unique(ids + offsets)
    stored = last.train_state.changed_rows["inputs.embedding.groups.0.cat_table.weight"].numpy()
    assert np.isin(stored, looked_up).all() and len(stored) > 0.9 * len(looked_up)
    assert np.all(np.diff(stored) > 0)
    # ... and every row whose weight moved is among them; the others are the seed's initial rows
    w0 = named_tables(init)["inputs.embedding.groups.0.cat_table.weight"].detach()
    w1 = named_tables(trained)["inputs.embedding.groups.0.cat_table.weight"].detach()
    moved = torch.nonzero((w0 != w1).any(dim=1)).squeeze(1).numpy()
    assert len(moved) > 0 and np.isin(moved, stored).all()

    # the best checkpoint, rebuilt, reproduces the saved validation predictions bit for bit
    val = ShardLoader(wide_cache, RowView.val(), 128, shuffle=False, seed=0)
    again = predict(model_from_checkpoint(best), val, val.num_rows, 1, torch.device("cpu"))
    with np.load(run / "val_predictions.npz") as z:
        assert np.array_equal(again.logits, z["logits"])
