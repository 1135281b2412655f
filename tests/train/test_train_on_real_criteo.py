"""Training on the real Criteo rows in ../shared/data/criteo (skipped when absent): the run completes and its
validation predictions beat the constant predictor that outputs the train positive rate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_setup import CRITEO_CFG, REPO
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.shard.manifest import read_manifest

TRAIN_SAMPLE = REPO.parent / "shared" / "data" / "criteo" / "train_sample.tsv"


@pytest.mark.skipif(not TRAIN_SAMPLE.is_file(), reason="../shared/data/criteo is not present")
def test_dnn_on_real_criteo_beats_the_positive_rate(tmp_path: Path) -> None:
    runner = CliRunner()
    cache = tmp_path / "shards"
    res = runner.invoke(app, ["shard", "--cfg", str(CRITEO_CFG), "--input", str(TRAIN_SAMPLE), "--out", str(cache),
                              "--set", "data.hash_bins=20000", "--set", "data.split.val_ratio=0.2", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path),
                              "--set", "exp_name=real", "--set", "model.name=dnn", "--set", "model.hidden_units=[64]",
                              "--set", "train.epochs=3", "--set", "loader.batch_size=256",
                              "--set", "train.warmup_steps=0", "--set", "train.lr=0.003",
                              "--set", "infer.calibration.method=none", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())["val"]
    manifest = read_manifest(cache)
    rate = manifest.label_rates["label"]["train"]
    preds = np.load(tmp_path / "real" / "val_predictions.npz")
    y = preds["labels"][:, 0].astype(np.float64)
    constant_logloss = float(-np.mean(y * np.log(rate) + (1 - y) * np.log(1 - rate)))
    assert metrics["auc"] > 0.65
    assert metrics["logloss"] < constant_logloss
