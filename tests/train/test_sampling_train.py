"""Training on sampled rows end to end: the logit shift recovers the true rate in evaluation, gold, metrics and
`ctrpipe infer`; --resume stays exact; models and heads that no shift can correct are refused up front."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import assert_equal_weights, train, weights
from train_setup import REPO, build_cache
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from ctrpipe.train.evaluate import predict

runner = CliRunner()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture(scope="module")
def rate_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5000 synthetic Criteo rows (~25% positive), 20% validation: enough rows for a rate to settle."""
    from ctrpipe.synth.run import run_synth

    synth = tmp_path_factory.mktemp("synth5k")
    run_synth(fmt="criteo", rows=5000, test_rows=0, seed=0, out=synth, quiet=True)
    return build_cache(tmp_path_factory.mktemp("shards5k") / "criteo", synth,
                       ["data.hash_bins=64", "data.folds.n_splits=0", "data.shard_rows=2048"], gold=False)


@pytest.mark.parametrize("sampling", ["loader.neg_keep_prob=0.2", "loader.balance_pos_fraction=0.5"])
def test_sampled_training_reports_and_predicts_the_true_rate(rate_cache: Path, tmp_path: Path, sampling: str):
    code, out = train(rate_cache, tmp_path, "--set", "train.epochs=3", "--set", sampling)
    assert code == 0, out
    run = tmp_path / "criteo"
    metrics = json.loads((run / "metrics.json").read_text())
    train_rate = read_manifest(rate_cache).feature_spec().label_rates[0]
    shift = math.log(0.2) if "neg_keep" in sampling else logit(train_rate) - logit(0.5)
    assert metrics["logit_shift"] == {"label": pytest.approx(shift)}
    with np.load(run / "val_predictions.npz") as z:
        logits, labels = z["logits"][:, 0], z["labels"][:, 0]
    true = labels.mean()
    # the model fits the sampled stream's prior (far above the true rate); the shifted logits recover the rate
    assert sigmoid(logits - shift).mean() > true + 0.2
    assert abs(sigmoid(logits).mean() - true) < 0.04, (sigmoid(logits).mean(), true)
    # reported metrics (early stopping's too) are those of the shifted logits
    assert metrics["val"]["mean_pred"] == pytest.approx(sigmoid(logits).mean(), rel=1e-5)
    # the checkpoint's raw logits + the shift are exactly what evaluation saved
    val = ShardLoader(rate_cache, RowView.val(), 512, shuffle=False, seed=0)
    raw = predict(model_from_checkpoint(load_checkpoint(run / "ckpt_best.pt")), val, val.num_rows, 1,
                  torch.device("cpu"))
    np.testing.assert_allclose(raw.logits[:, 0] + shift, logits, rtol=1e-5, atol=1e-5)
    # infer applies the shift the run was trained with, whatever loader.* it is given
    sub = tmp_path / "sub.csv"
    res = runner.invoke(app, ["infer", "--run", str(run), "--shards", str(rate_cache), "--out", str(sub), "-q",
                              "--set", "infer.view=val", "--set", "loader.neg_keep_prob=1.0",
                              "--set", "loader.balance_pos_fraction=0"])
    assert res.exit_code == 0, res.output
    with sub.open() as fh:
        preds = np.array([float(r[1]) for r in list(csv.reader(fh))[1:]])
    np.testing.assert_allclose(preds, sigmoid(logits), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampling", ["loader.neg_keep_prob=0.2", "loader.balance_pos_fraction=0.5"])
def test_sampled_training_starts_at_the_sampled_prior(rate_cache: Path, tmp_path: Path, sampling: str):
    """The output bias starts at logit(rate) - shift, the prior of the rows the head is trained on, not the
    cache's rate: a head started at the true prior spends its first steps only moving its bias."""
    code, out = train(rate_cache, tmp_path, "--set", "train.max_steps=1", "--set", "train.lr=1e-12",
                      "--set", "train.embedding_lr=1e-12", "--set", "train.warmup_steps=0", "--set", sampling)
    assert code == 0, out
    run = tmp_path / "criteo"
    shift = json.loads((run / "metrics.json").read_text())["logit_shift"]["label"]
    rate = read_manifest(rate_cache).feature_spec().label_rates[0]
    model = model_from_checkpoint(load_checkpoint(run / "ckpt_last.pt"))
    out_bias = [p for n, p in model.named_parameters() if n.endswith("bias") and p.shape == (1,)]
    assert len(out_bias) == 1, [n for n, _ in model.named_parameters()]
    assert abs(shift) > 0.5
    assert float(out_bias[0].detach()) == pytest.approx(logit(rate) - shift, abs=1e-4)


@pytest.mark.parametrize(("sampling", "changed"), [
    ("loader.neg_keep_prob=0.5", "loader.neg_keep_prob=0.3"),
    ("loader.balance_pos_fraction=0.5", "loader.balance_pos_fraction=0.6"),
])
def test_resume_with_sampling_equals_uninterrupted(cache: Path, tmp_path: Path, sampling: str, changed: str):
    args = ("--set", "train.epochs=3", "--set", "model.dropout=0.3", "--set", "train.eval_every=2",
            "--set", sampling)
    assert train(cache, tmp_path / "a", *args)[0] == 0
    a = load_checkpoint(tmp_path / "a" / "criteo" / "ckpt_last.pt")
    per_epoch = a.step // 3
    stop = per_epoch + per_epoch // 2 + 1                          # in the middle of the second epoch
    assert per_epoch >= 2 and stop % per_epoch
    code, out = train(cache, tmp_path / "b", *args, "--set", f"train.stop_after_steps={stop}")
    assert code == 0 and f"stopped at step {stop}" in out, out
    # the kept rows and the logit shift belong to the run: they cannot change on resume
    code, out = train(cache, tmp_path / "b", *args, "--resume", "--set", changed)
    assert code == 1 and f"cannot resume with changed {changed.split('=')[0]}" in out, out
    code, out = train(cache, tmp_path / "b", *args, "--resume")
    assert code == 0, out
    b = load_checkpoint(tmp_path / "b" / "criteo" / "ckpt_last.pt")
    assert a.step == b.step and b.train_state.finished
    last_a, last_b = tmp_path / "a" / "criteo" / "ckpt_last.pt", tmp_path / "b" / "criteo" / "ckpt_last.pt"
    assert_equal_weights(weights(last_a), weights(last_b))          # no EMA: the training weights
    ma = json.loads((tmp_path / "a" / "criteo" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "criteo" / "metrics.json").read_text())
    assert ma["val"] == mb["val"] and ma["logit_shift"] == mb["logit_shift"]


# ----------------------------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def two_label_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Parquet logs labelled (clicked, converted)."""
    root = tmp_path_factory.mktemp("two_labels")
    for args in (["synth", "--format", "parquet", "--rows", "800", "--test-rows", "0", "--seed", "1",
                  "--out", str(root / "data"), "-q"],
                 ["shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
                  str(root / "data" / "train.parquet"), "--out", str(root / "shards"), "-q",
                  "--set", "data.hash_bins=1000", "--set", "data.folds.n_splits=0"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    return root / "shards"


def train_parquet(cache: Path, runs: Path, cfg: str, *sets: str) -> tuple[int, str]:
    flat = [x for s in ("loader.batch_size=64", "train.max_steps=2", "infer.calibration.method=none", *sets)
            for x in ("--set", s)]
    res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / cfg), "--shards", str(cache), "--runs",
                              str(runs), "-q", *flat])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_esmm_refuses_sampling(two_label_cache: Path, tmp_path: Path):
    code, out = train_parquet(two_label_cache, tmp_path, "parquet_esmm.yaml", "loader.neg_keep_prob=0.5")
    assert code == 1
    assert "loader.neg_keep_prob" in out and "heads of its own (ctr, ctcvr, cvr)" in out
    assert "fix: turn sampling off for this model" in out
    assert not (tmp_path / "parquet_esmm").exists()                 # refused before the run directory
    # the plan refuses it as train does: it said "fits" for a run train refuses
    res = runner.invoke(app, ["plan", "--cfg", str(REPO / "cfgs" / "parquet_esmm.yaml"), "--shards",
                              str(two_label_cache), "--set", "loader.neg_keep_prob=0.5"])
    assert res.exit_code == 1, res.output
    assert "loader.neg_keep_prob" in res.output and "heads of its own (ctr, ctcvr, cvr)" in res.output


def test_other_label_heads_need_the_sampled_label_as_mask(two_label_cache: Path, tmp_path: Path):
    code, out = train_parquet(two_label_cache, tmp_path / "a", "parquet_example.yaml",
                              "loader.neg_keep_prob=0.5", "loader.sample_label=clicked")
    assert code == 1
    assert "head 'converted' is trained on those rows" in out and "train.tasks.converted.mask=clicked" in out
    code, out = train_parquet(two_label_cache, tmp_path / "b", "parquet_example.yaml",
                              "loader.neg_keep_prob=0.5", "loader.sample_label=clicked",
                              "train.tasks.converted.mask=clicked")
    assert code == 0, out
    metrics = json.loads((tmp_path / "b" / "parquet_example" / "metrics.json").read_text())
    assert metrics["logit_shift"] == {"clicked": pytest.approx(math.log(0.5)), "converted": 0.0}


def test_dare_aux_heads_train_on_sampled_rows(two_label_cache: Path, tmp_path: Path):
    """DARE's <label>_full heads predict their label on their own: sampling was refused as if they were tied
    like ESMM's (helper's training sweep); each now gets its label's shift."""
    code, out = train_parquet(two_label_cache, tmp_path, "parquet_dare.yaml", "model.aux_loss_weight=0.3",
                              "loader.neg_keep_prob=0.5", "loader.sample_label=clicked",
                              "train.tasks.converted.mask=clicked")
    assert code == 0, out
    metrics = json.loads((tmp_path / "parquet_dare" / "metrics.json").read_text())
    assert metrics["logit_shift"] == {"clicked": pytest.approx(math.log(0.5)), "converted": 0.0,
                                      "clicked_full": pytest.approx(math.log(0.5)), "converted_full": 0.0}


def test_balanced_fraction_below_the_label_rate_is_refused(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--set", "loader.balance_pos_fraction=0.05")
    assert code == 1
    assert "loader.balance_pos_fraction" in out and "train-split rate" in out and "fix: use a fraction above" in out


def test_balanced_kfold_shifts_each_fold_by_its_own_training_rate(tmp_path: Path) -> None:
    """Balanced batches shifted every fold model by the train split's rate, while fold k trains on the other
    folds: on time folds of a drifting click rate the fold models were off by up to ~0.7 in logits (helper's
    loader sweep). Each fold's shift now comes from its training view's rate, recorded in its checkpoint, and
    infer rebuilds that shift from the checkpoint."""
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(REPO / "tests" / "shard"))
    from helpers import parquet_cfg
    from raw_inputs import write_parquet

    from ctrpipe.config import config_from_dict
    from ctrpipe.infer.predict import checkpoint_logit_shift
    from ctrpipe.shard.build import build_shards
    from ctrpipe.train.checkpoint import checkpoint_tasks

    rng = np.random.default_rng(0)
    table = pq.read_table(write_parquet(tmp_path / "p.parquet", 3000, seed=5))
    clicked = (rng.random(3000) < np.linspace(0.05, 0.6, 3000)).astype(np.int8)     # the rate rises in "time"
    table = table.set_column(table.schema.get_field_index("clicked"), "clicked", pa.array(clicked))
    pq.write_table(table.append_column("ts", pa.array(np.arange(3000))), tmp_path / "drift.parquet")
    cache = tmp_path / "cache"
    build_shards(parquet_cfg("data.folds.mode=time", "data.folds.n_splits=3", "data.folds.time_key=ts",
                             "data.labels=[clicked]"),
                 [tmp_path / "drift.parquet"], cache, progress=False)
    res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--shards", str(cache),
                              "--runs", str(tmp_path / "runs"), "--kfold", "3", "-q", "--set", "model.name=dnn",
                              "--set", "model.hidden_units=[8]", "--set", "train.device=cpu",
                              "--set", "train.max_steps=3", "--set", "loader.batch_size=200",
                              "--set", "train.lr=1e-12", "--set", "train.embedding_lr=1e-12",
                              "--set", "train.warmup_steps=0",
                              "--set", "loader.balance_pos_fraction=0.7", "--set", "exp_name=bal"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "bal"
    folds = json.loads((run / "metrics.json").read_text())["cv"]["folds"]
    manifest = read_manifest(cache)
    labels = np.concatenate([np.load(cache / s.files["labels"].file)[:, 0] for s in manifest.shards])
    fold = np.concatenate([np.load(cache / s.files["fold"].file) for s in manifest.shards])
    target = logit(round(0.7 * 200) / 200)
    rates = [float(np.count_nonzero(labels[(fold >= 0) & (fold != k)] > 0.5) / np.count_nonzero((fold >= 0) &
                                                                                         (fold != k)))
             for k in range(3)]
    assert max(rates) - min(rates) > 0.15             # the folds' training rates differ: the case at hand
    for k in range(3):
        ckpt = load_checkpoint(run / f"ckpt_fold{k}.pt")
        assert ckpt.sampling_rate == pytest.approx(rates[k], abs=1e-12)
        tasks = checkpoint_tasks(ckpt, config_from_dict(ckpt.config, sources={}, origin="checkpoint").train)
        shift = checkpoint_logit_shift(ckpt, tasks)
        assert shift[0] == pytest.approx(logit(rates[k]) - target, abs=1e-9)
        assert folds[k]["sampling_rate"] == ckpt.sampling_rate
        assert folds[k]["logit_shift"]["clicked"] == pytest.approx(shift[0], abs=1e-9)
        # the head starts at the batches' positive fraction (lr ~0 keeps it there), not the split's rate shifted
        model = model_from_checkpoint(ckpt)
        out_bias = [p for n, p in model.named_parameters() if n.endswith("bias") and p.shape == (1,)]
        assert len(out_bias) == 1 and float(out_bias[0].detach()) == pytest.approx(target, abs=1e-4)
