"""The shipped configs, run as they are, on the real Criteo rows in ../shared/data/criteo (skipped when absent).

6.6k rows with batch 4096 are one optimiser step per epoch; the configs must still train a model that beats
the constant predictor of the train positive rate, and leave a small run directory (1M-bin tables).
"""

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
runner = CliRunner()


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not TRAIN_SAMPLE.is_file():
        pytest.skip("../shared/data/criteo is not present")
    cache = tmp_path_factory.mktemp("real") / "shards"
    res = runner.invoke(app, ["shard", "--cfg", str(CRITEO_CFG), "--input", str(TRAIN_SAMPLE), "--out", str(cache),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    return cache


@pytest.mark.parametrize("model", ["dnn", "dcnv2"])
def test_shipped_config_beats_the_positive_rate_on_real_criteo(sample_cache: Path, tmp_path: Path,
                                                               model: str) -> None:
    res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / f"criteo_{model}.yaml"),
                              "--shards", str(sample_cache), "--runs", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    run = tmp_path / f"criteo_{model}"
    summary = json.loads((run / "metrics.json").read_text())
    metrics = summary["val"]
    rate = read_manifest(sample_cache).label_rates["label"]["train"]
    with np.load(run / "val_predictions.npz") as preds:
        y = preds["labels"][:, 0].astype(np.float64)
    constant_logloss = float(-np.mean(y * np.log(rate) + (1 - y) * np.log(1 - rate)))
    assert metrics["auc"] > 0.65
    assert metrics["logloss"] < constant_logloss
    assert any("train.min_steps" in note for note in summary["notes"])      # the user is told what happened
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert size < 100 * 2**20, f"run directory is {size / 2**20:.0f} MB"
