"""`ctrpipe train` end to end on tiny real shards: run directory, determinism, resume, K-fold, errors."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from train_setup import CRITEO_CFG, FAST, K_FOLDS
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.train.checkpoint import build_initial_model, check_compatible, load_checkpoint, model_from_checkpoint
from ctrpipe.train.evaluate import predict
from ctrpipe.train.rundir import LOG_FIELDS
from ctrpipe.train.tables import load_packed

runner = CliRunner()


def train(shards: Path, runs: Path, *args: str, fast: bool = True) -> tuple[int, str]:
    sets = [x for s in FAST for x in ("--set", s)] if fast else []
    result = runner.invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(shards),
                                 "--runs", str(runs), "-q", *sets, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def weights(path: Path, raw: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint's model (its evaluation weights, or with `raw` the training weights)."""
    ckpt = load_checkpoint(path)
    packed = ckpt.train_state.raw_weights if raw else ckpt.weights
    model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    load_packed(model, packed)
    return model.state_dict()


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_single_run_writes_the_run_directory(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--set", "train.epochs=2",
                      "--set", "infer.calibration.method=temperature")
    assert code == 0, out
    run = tmp_path / "criteo"
    for name in ("config.yaml", "config.json", "manifest_fingerprint.txt", "train_log.csv", "metrics.json",
                 "ckpt_best.pt", "ckpt_last.pt", "val_predictions.npz", "calibration.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.incomplete"))
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val", "gold", "best_step", "samples_per_s", "manifest_fingerprint", "schema_fingerprint",
                "config"):
        assert key in metrics, key
    assert metrics["wall_seconds"] > metrics["train_seconds"] > 0
    assert metrics["peak_host_memory_bytes"] > 50 * 2**20 and metrics["peak_device_memory_bytes"] is None
    assert 50 * 2**20 < metrics["peak_host_anon_bytes"] <= metrics["peak_host_memory_bytes"]
    assert metrics["parameters"] == sum(p.numel() for p in model_from_checkpoint(
        load_checkpoint(run / "ckpt_best.pt")).parameters())
    for split in ("val", "gold"):
        for m in ("auc", "logloss", "ap", "wll", "score", "calibration"):
            assert math.isfinite(metrics[split][m]), (split, m)
    assert metrics["samples_per_s"] > 0
    manifest = read_manifest(cache)
    assert metrics["manifest_fingerprint"] == manifest.fingerprint
    assert json.loads((run / "config.json").read_text())["sources"]["train.epochs"] == "--set"
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert any(r["loss"] for r in rows) and any(r["val_auc"] for r in rows)

    # val predictions: every val row once, and the best checkpoint reproduces them
    with np.load(run / "val_predictions.npz") as z:
        row_index, logits, labels = z["row_index"], z["logits"], z["labels"]
    val = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0)
    assert np.array_equal(row_index, val.row_indices())
    assert logits.shape == labels.shape == (manifest.rows["val"], 1) and logits.dtype == np.float32
    ckpt = load_checkpoint(run / "ckpt_best.pt")
    assert ckpt.fold == -1 and ckpt.step == metrics["best_step"] and ckpt.train_state is None
    check_compatible(ckpt, manifest)
    model = model_from_checkpoint(ckpt, "cpu")
    again = predict(model, val, val.num_rows, 1, torch.device("cpu"))
    np.testing.assert_allclose(again.logits, logits, rtol=1e-5, atol=1e-6)


def test_same_seed_gives_identical_weights(cache: Path, tmp_path: Path):
    args = ("--set", "train.max_steps=6", "--set", "model.dropout=0.2")
    assert train(cache, tmp_path / "a", *args)[0] == 0
    assert train(cache, tmp_path / "b", *args)[0] == 0
    assert train(cache, tmp_path / "c", *args, "--set", "seed=7")[0] == 0
    a, b, c = (weights(tmp_path / r / "criteo" / "ckpt_last.pt") for r in "abc")
    assert_equal_weights(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["lazy_adam", "adam", "adagrad"])
def test_resume_equals_uninterrupted(cache: Path, tmp_path: Path, optimizer: str):
    # dropout, EMA, warm-up + cosine, mid-epoch evaluations and a stop in the middle of epoch 2; the
    # checkpoint holds only the table rows (and optimiser state rows) with a gradient so far
    args = ("--set", "train.epochs=3", "--set", "model.dropout=0.3", "--set", "train.ema=0.9",
            "--set", "train.warmup_steps=3", "--set", "train.eval_every=4", "--set", "train.grad_clip=1.0",
            "--set", f"train.embedding_optimizer={optimizer}", "--set", "train.log_every=4")
    assert train(cache, tmp_path / "a", *args)[0] == 0
    code, out = train(cache, tmp_path / "b", *args, "--set", "train.stop_after_steps=9")
    assert code == 0 and "stopped at step 9" in out
    assert not (tmp_path / "b" / "criteo" / "metrics.json").exists()
    assert load_checkpoint(tmp_path / "b" / "criteo" / "ckpt_last.pt").step == 9
    with (tmp_path / "b" / "criteo" / "train_log.csv").open("a") as fh:   # as a process killed after it would
        fh.write("12,0,0.001,0.5,100.0" + "," * (len(LOG_FIELDS) - 5) + "\n13,0")
    code, out = train(cache, tmp_path / "b", *args, "--resume")
    assert code == 0, out
    last_a, last_b = tmp_path / "a" / "criteo" / "ckpt_last.pt", tmp_path / "b" / "criteo" / "ckpt_last.pt"
    a, b = load_checkpoint(last_a), load_checkpoint(last_b)
    assert a.step == b.step and b.train_state.finished
    assert_equal_weights(weights(last_a, raw=True), weights(last_b, raw=True))    # training weights
    assert_equal_weights(weights(last_a), weights(last_b))                        # EMA weights
    assert a.train_state.early_stopping == b.train_state.early_stopping
    for ra, rb in zip(a.train_state.changed_rows.values(), b.train_state.changed_rows.values(), strict=True):
        assert torch.equal(ra, rb)
    ma = json.loads((tmp_path / "a" / "criteo" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "criteo" / "metrics.json").read_text())
    assert ma["val"] == mb["val"] and ma["best_step"] == mb["best_step"]
    assert (ma["resumed"], mb["resumed"]) == (False, True)     # b's wall time and memory: its last process only
    # the logs too: no row of its own at the stop, the next row averages steps 9-12 as a's does, and the rows
    # a killed process wrote after the checkpoint are gone
    logs = [pl.read_csv(d / "criteo" / "train_log.csv").drop("samples_per_s") for d in (tmp_path / "a", tmp_path / "b")]
    assert logs[0].equals(logs[1]), (logs[0], logs[1])


def test_kfold_checkpoints_and_oof_cover_fold_rows(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--kfold", str(K_FOLDS), "--set", "train.max_steps=4")
    assert code == 0, out
    run = tmp_path / "criteo"
    manifest = read_manifest(cache)
    seen: list[np.ndarray] = []
    for k in range(K_FOLDS):
        ckpt = load_checkpoint(run / f"ckpt_fold{k}.pt")
        assert ckpt.fold == k
        assert (run / f"fold{k}" / "ckpt_last.pt").is_file()
        with np.load(run / f"fold{k}" / "val_predictions.npz") as z:
            seen.append(z["row_index"])
        fold_rows = ShardLoader(cache, RowView.fold_val(k), 128, shuffle=False, seed=0).row_indices()
        assert np.array_equal(np.sort(seen[-1]), fold_rows)
    every = np.concatenate(seen)
    assert len(np.unique(every)) == len(every)                       # validation folds are disjoint
    assigned = np.concatenate([np.load(cache / s.files["fold"].file) for s in manifest.shards])
    split = np.concatenate([np.load(cache / s.files["split"].file) for s in manifest.shards])
    fold_assigned = np.flatnonzero((assigned >= 0) & (split <= 1))
    with np.load(run / "oof.npz") as z:
        assert np.array_equal(z["row_index"], fold_assigned)          # ... and cover every fold-assigned row
        assert z["logits"].shape == (len(fold_assigned), 1)
        assert np.all(np.isfinite(z["logits"]))
    assert np.array_equal(np.sort(every), fold_assigned)
    metrics = json.loads((run / "metrics.json").read_text())
    cv = metrics["cv"]
    assert cv["n_splits"] == K_FOLDS and len(cv["folds"]) == K_FOLDS
    assert set(cv) >= {"folds", "mean", "std", "oof"}
    assert math.isfinite(cv["oof"]["auc"]) and math.isfinite(metrics["gold"]["auc"])
    assert cv["mean"]["auc"] == np.mean([f["val"]["auc"] for f in cv["folds"]])


# ----------------------------------------------------------------------------------------------- errors

def test_missing_shards_error(tmp_path: Path):
    code, out = train(tmp_path / "nowhere", tmp_path)
    assert code == 1
    assert "nowhere" in out and "the folder does not exist" in out
    assert "fix: build it with `ctrpipe shard" in out


def test_unknown_model_lists_valid_names(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--set", "model.name=dnnn")
    assert code == 1
    assert "unknown model 'dnnn'" in out and "did you mean 'dnn'" in out and "dcnv2" in out


def test_nan_loss_names_step_and_fix(cache: Path, tmp_path: Path):
    # lr 1e6 only kills the ReLUs of this tiny model (finite loss); 1e20 overflows to inf - inf = NaN.
    # log_every=50 > steps: the NaN is found at the end of the epoch and still reported with its own step
    code, out = train(cache, tmp_path, "--set", "train.lr=1e20", "--set", "train.epochs=2",
                      "--set", "train.log_every=50")
    assert code == 1
    assert re.search(r"loss became NaN/inf at step \d+ \(epoch 0\)", out), out
    assert "fix: lower train.lr (or train.weight_decay) or set train.grad_clip=1.0" in out
    assert "`ctrpipe inspect SHARDS`" in " ".join(out.split())     # NaN inputs are no learning rate's fault


def test_resume_on_another_schema_is_refused(cache: Path, cache_other: Path, tmp_path: Path):
    assert train(cache, tmp_path, "--set", "train.max_steps=2", "--set", "train.stop_after_steps=1")[0] == 0
    code, out = train(cache_other, tmp_path, "--set", "train.max_steps=2", "--resume")
    assert code == 1
    assert str(cache.resolve()) in out and str(cache_other) in out and "schema" in out
    assert "fix:" in out


def test_resume_on_a_cache_of_other_rows_is_refused(cache: Path, synth_dir: Path, tmp_path: Path):
    """Hashed caches of other rows (or another split) share a schema: --resume continued on them and recorded
    only the new cache, though the first steps trained on the old one."""
    from train_setup import K_FOLDS, build_cache

    other = build_cache(tmp_path / "resplit", synth_dir, ["data.hash_bins=64", f"data.folds.n_splits={K_FOLDS}",
                                                          "data.split.seed=7"], gold=True)
    runs = tmp_path / "runs"
    assert train(cache, runs, "--set", "train.max_steps=2", "--set", "train.stop_after_steps=1")[0] == 0
    code, out = train(other, runs, "--set", "train.max_steps=2", "--resume")
    assert code == 1 and "fix:" in out, out
    assert str(cache.resolve()) in out and str(other) in out and "other inputs or settings" in out
    assert train(cache, runs, "--set", "train.max_steps=2", "--resume")[0] == 0      # its own cache resumes


def test_kfold_needs_folds_in_the_cache(cache: Path, cache_other: Path, tmp_path: Path):
    code, out = train(cache_other, tmp_path, "--kfold", "3")
    assert code == 1
    assert "K=3" in out and "has no folds" in out and "data.folds.n_splits=3" in out
    code, out = train(cache, tmp_path, "--kfold", "5")
    assert code == 1 and "has 3 folds" in out and "--kfold 3" in out
    # --kfold is cv.n_splits: two values for it were one silently ignored (the run recorded --kfold's)
    code, out = train(cache, tmp_path, "--kfold", "3", "--set", "cv.n_splits=2")
    assert code == 1 and "--kfold 3 and --set cv.n_splits=2 name the same setting" in " ".join(out.split()), out
    assert not (tmp_path / "criteo").exists()


def test_run_directory_and_resume_guards(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--resume")
    assert code == 1 and "nothing to resume" in out and "drop --resume" in out
    assert train(cache, tmp_path, "--set", "train.max_steps=2")[0] == 0
    code, out = train(cache, tmp_path, "--set", "train.max_steps=2")
    assert code == 1 and "already holds a run" in out and "--resume" in out
    code, out = train(cache, tmp_path, "--resume", "--set", "model.hidden_units=[8]")
    assert code == 1 and "cannot resume with changed model.hidden_units" in out
    # the restored optimiser state holds these: a new value would be announced and ignored (or crash)
    for key, value in (("train.lr", "0.05"), ("train.weight_decay", "0.5"),
                       ("train.embedding_optimizer", "adagrad"), ("loader.batch_size", "32"),
                       # the rows' order: a resume mid-epoch served some rows twice and others never
                       ("loader.block_rows", "64"), ("loader.shuffle", "false"),
                       ("loader.shuffle_strategy", "gather"), ("loader.window_shards", "1"),
                       # the best value so far is one of the run's metric: a resume that changed it compared
                       # logloss with the best AUC, and kept the worst checkpoint (helper's training sweep)
                       ("train.early_stopping.metric", "logloss"), ("train.early_stopping.mode", "min")):
        code, out = train(cache, tmp_path, "--resume", "--set", f"{key}={value}")
        assert code == 1 and f"cannot resume with changed {key}" in out, out
    # the same comparison (auto is max for AUC), and the weight of a one-label run's only head: no change
    for key, value in (("train.early_stopping.mode", "max"), ("train.tasks.label.metric_weight", "2")):
        code, out = train(cache, tmp_path, "--resume", "--set", f"{key}={value}")
        assert "cannot resume" not in out, out
    # refused before the run's record is rewritten (the fix points at its config.yaml)
    assert "hidden_units:\n  - 16" in (tmp_path / "criteo" / "config.yaml").read_text()


def test_the_run_folder_stays_inside_runs(cache: Path, tmp_path: Path):
    """An empty exp_name wrote the run's files into --runs itself, '../x' outside it (helper's training sweep);
    a nested name (grid/a) is a folder of runs inside it, and a run's config still loads wherever it is used."""
    runs = tmp_path / "runs"
    for name in ("", "../x", "/abs"):
        code, out = train(cache, runs, "--set", f"exp_name={name}", "--set", "train.max_steps=2")
        assert code == 1 and "bad value" in out and "exp_name" in out, out
    assert not (tmp_path / "x").exists() and not (runs.exists() and any(runs.iterdir()))
    assert train(cache, runs, "--set", "exp_name=grid/a", "--set", "train.max_steps=2")[0] == 0
    assert (runs / "grid" / "a" / "metrics.json").is_file()
    assert load_checkpoint(runs / "grid" / "a" / "ckpt_best.pt").config["exp_name"] == "grid/a"


def test_resume_of_a_finished_run_changes_nothing(cache: Path, tmp_path: Path):
    """--resume of a finished run rewrote metrics.json (epochs 0, the no-op's wall time) and recorded changed
    settings such as more epochs in its config, having trained nothing."""
    assert train(cache, tmp_path, "--set", "train.max_steps=2")[0] == 0
    run = tmp_path / "criteo"
    record = {name: (run / name).read_bytes() for name in ("metrics.json", "config.yaml", "config.json")}
    code, _ = train(cache, tmp_path, "--resume", "--set", "train.max_steps=2")
    assert code == 0
    code, out = train(cache, tmp_path, "--resume", "--set", "train.max_steps=4")
    assert code == 1 and "has finished" in out and "train.max_steps 2 -> 4" in out and "exp_name=NEW" in out
    assert {name: (run / name).read_bytes() for name in record} == record


def test_a_run_is_finished_only_with_its_calibration(cache: Path, tmp_path: Path):
    """metrics.json (what marks a run finished) was written before calibration.json: a run stopped between the
    two was called finished by --resume and never got its calibration. A calibration that cannot be written
    (here: a folder in its place) now leaves no metrics.json, and --resume writes both."""
    sets = ("--set", "train.max_steps=2", "--set", "infer.calibration.method=temperature")
    assert train(cache, tmp_path, *sets)[0] == 0
    run = tmp_path / "criteo"
    want = {name: (run / name).read_bytes() for name in ("metrics.json", "calibration.json")}
    for name in want:
        (run / name).unlink()
    (run / "calibration.json").mkdir()
    code, out = train(cache, tmp_path, *sets, "--resume")
    assert code == 1 and "calibration.json: Is a directory" in " ".join(out.split()), out
    assert not (run / "metrics.json").exists()
    (run / "calibration.json").rmdir()
    assert train(cache, tmp_path, *sets, "--resume")[0] == 0
    assert (run / "calibration.json").read_bytes() == want["calibration.json"]
    got = json.loads((run / "metrics.json").read_text())
    assert got["val"] == json.loads(want["metrics.json"])["val"] and got["resumed"]


def test_a_finished_checkpoint_counts_the_last_epoch(cache: Path, tmp_path: Path):
    """The last step's evaluation saved ckpt_last.pt before the epoch was closed, so a K-fold run resumed
    after a kill reported its finished folds with 0 epochs (cv.folds[k].epochs)."""
    assert train(cache, tmp_path, "--set", "train.epochs=1")[0] == 0
    run = tmp_path / "criteo"
    m = json.loads((run / "metrics.json").read_text())
    ts = load_checkpoint(run / "ckpt_last.pt").train_state
    assert ts.finished and m["epochs"] == 1 and ts.position.epoch == 1 and ts.position.batch_in_epoch == 0


def test_resume_keeps_the_runs_kind(cache: Path, tmp_path: Path):
    """--resume without --kfold on an interrupted K-fold run trained a single model into its folder."""
    code, _ = train(cache, tmp_path, "--kfold", str(K_FOLDS), "--set", "train.stop_after_steps=2")
    assert code == 0 and not (tmp_path / "criteo" / "metrics.json").exists()
    code, out = train(cache, tmp_path, "--resume")
    assert code == 1 and f"a {K_FOLDS}-fold run" in out and f"--kfold {K_FOLDS}" in out, out
    assert not (tmp_path / "criteo" / "ckpt_best.pt").exists()


def test_config_errors_before_training(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--set", "train.amp=fp16", "--set", "train.device=cpu")
    assert code == 1 and "fp16 needs a CUDA device" in out and "train.amp=bf16" in out
    code, out = train(cache, tmp_path, "--set", "train.early_stopping.metric=acc")
    assert code == 1 and "unknown metric 'acc'" in out and "auc" in out
    for metric in ("calibration", "mean_pred", "pos_rate"):     # they were maximised: calibration 1.02 beat 0.998
        code, out = train(cache, tmp_path, "--set", f"train.early_stopping.metric={metric}")
        assert code == 1 and "describes the predictions" in out and "auc, " in out, out
    code, out = train(cache, tmp_path, "--set", "train.early_stopping.metric=auc.clicked")    # one head: no such name
    assert code == 1 and "unknown metric 'auc.clicked'" in out
    assert not (tmp_path / "criteo").exists()


@pytest.mark.parametrize("extra", [
    ("train.embedding_optimizer=adagrad", "train.grad_clip=0.5"),
    ("train.embedding_optimizer=lazy_adam", "train.ema=0.5"),
    ("train.embedding_optimizer=adam",),
    ("train.embedding_optimizer=sparse_adam", "train.ema=0.5", "train.amp=bf16"),
    ("train.embedding_optimizer=sgd", "train.schedule=step", "train.step_every=2", "train.pos_weight=2.0"),
])
def test_optimizer_variants_train_and_reload(cache: Path, tmp_path: Path, extra: tuple[str, ...]):
    args = [x for s in ("train.max_steps=4", *extra) for x in ("--set", s)]
    code, out = train(cache, tmp_path, *args)
    assert code == 0, out
    ckpt = load_checkpoint(tmp_path / "criteo" / "ckpt_best.pt")
    model = model_from_checkpoint(ckpt, "cpu")         # sparse-trained tables load into the dense build
    val = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0)
    preds = predict(model, val, val.num_rows, 1, torch.device("cpu"))
    assert np.all(np.isfinite(preds.logits))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compile_trains_with_sparse_embedding_gradients(cache: Path, tmp_path: Path):
    # inductor cannot trace sparse gradients: the lookups run eagerly, the dense layers compiled (was a
    # traceback: "Cannot access storage of SparseTensorImpl")
    code, out = train(cache, tmp_path, "--set", "train.max_steps=2", "--set", "train.compile=true",
                      "--set", "train.embedding_optimizer=lazy_adam", "--set", "model.name=dcnv2")
    assert code == 0, out
    assert json.loads((tmp_path / "criteo" / "metrics.json").read_text())["steps"] == 2


def test_early_stopping_stops_and_keeps_the_best(cache: Path, tmp_path: Path):
    # min_delta=1 makes every evaluation after the first "no improvement": stop after patience=2 more
    args = ("--set", "train.epochs=5", "--set", "train.eval_every=1", "--set", "train.early_stopping.patience=2",
            "--set", "train.early_stopping.min_delta=1")
    code, out = train(cache, tmp_path / "a", *args, "--set", "train.warmup_steps=0")
    assert code == 0, out
    metrics = json.loads((tmp_path / "a" / "criteo" / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["steps"] == 3 and metrics["best_step"] == 1
    assert load_checkpoint(tmp_path / "a" / "criteo" / "ckpt_best.pt").step == 1
    # evaluations during the warm-up (3 steps) may become the best but do not count towards the patience
    code, out = train(cache, tmp_path / "b", *args, "--set", "train.warmup_steps=3")
    assert code == 0, out
    metrics = json.loads((tmp_path / "b" / "criteo" / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["steps"] == 5 and metrics["best_step"] == 1


def test_a_damaged_checkpoint_is_named_with_a_fix_that_can_work(cache: Path, tmp_path: Path):
    """A cut ckpt_last.pt told the user to --resume from ckpt_last.pt, the damaged file itself."""
    from ctrpipe.errors import CheckpointError

    assert train(cache, tmp_path, "--set", "train.max_steps=2", "--set", "train.stop_after_steps=1")[0] == 0
    last = tmp_path / "criteo" / "ckpt_last.pt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(last)
    assert "cannot resume" in err.value.fix and "without --resume" in err.value.fix
    code, out = train(cache, tmp_path, "--set", "train.max_steps=2", "--resume")
    assert code == 1 and str(last) in out and "cannot resume" in out, out
    # a finished run's damaged best checkpoint: --resume (what the fix said) rewrites nothing; the fix now
    # given (train again under another exp_name) gives a readable one
    assert train(cache, tmp_path / "done", "--set", "train.max_steps=2")[0] == 0
    best = tmp_path / "done" / "criteo" / "ckpt_best.pt"
    best.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_checkpoint(best)
    assert "--resume" not in err.value.fix.replace("without --resume", "") and "exp_name=NEW" in err.value.fix
    assert "weights_only" not in err.value.what and "arbitrary code" not in err.value.what   # torch's unsafe advice
    assert train(cache, tmp_path / "done", "--set", "train.max_steps=2", "--resume")[0] == 0
    assert best.read_bytes() == b"not a checkpoint"
    assert train(cache, tmp_path / "done", "--set", "train.max_steps=2", "--set", "exp_name=again")[0] == 0
    load_checkpoint(tmp_path / "done" / "again" / "ckpt_best.pt")


def test_a_cache_without_training_rows_is_told_why(cache: Path, synth_dir: Path, tmp_path: Path):
    """Every cache without labelled training rows was told to rebuild 'without --test', also one built with
    no label columns at all (data.labels: [])."""
    from raw_inputs import write_parquet
    from train_setup import CRITEO_CFG as CFG

    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    test_cache = tmp_path / "test_cache"
    build_shards(load_config(CFG, ["data.shard_rows=256", "data.hash_bins=64"]), [synth_dir / "test.tsv"],
                 test_cache, stats_from=cache, role="test", progress=False)
    code, out = train(test_cache, tmp_path / "r1")
    assert code == 1 and "without --test" in out, out
    src = write_parquet(tmp_path / "p.parquet", 40)
    unlabelled = tmp_path / "unlabelled"
    pq_cfg = Path(__file__).resolve().parents[2] / "cfgs" / "parquet_example.yaml"
    build_shards(load_config(pq_cfg, ["data.labels=[]", "data.folds.n_splits=0", "data.covisit=[]"],
                             resolve_model=False), [src], unlabelled, progress=False)
    code, out = train(unlabelled, tmp_path / "r2")
    assert code == 1 and "data.labels is empty" in out and "--test" not in out, out


class _SumModel(torch.nn.Module):
    """A fixed function of each row: the stages' copies must return exactly what direct writes return."""

    def forward(self, batch):  # noqa: ANN001, ANN201
        x = batch.numeric.float().sum(dim=1, keepdim=True) + batch.categorical.float()[:, :1] * 1e-3
        return x


@pytest.mark.parametrize("stage_rows", [1, 50, 128, 200, 10_000])
def test_staged_predictions_equal_direct_ones(cache: Path, stage_rows: int):
    """On a GPU, predict keeps at most a stage of rows on the device and copies full stages to the host, one
    stage behind (it kept every row's outputs on the device until the end). The same staging runs on the CPU
    here: stages smaller than a batch (the stage grows), batches straddling stages, and one stage for all."""
    val = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0)
    args = (_SumModel(), val, val.num_rows, 1, torch.device("cpu"))
    direct = predict(*args, logit_shift=(0.5,))
    staged = predict(*args, logit_shift=(0.5,), stage_rows=stage_rows)
    assert direct.logits.shape == (val.num_rows, 1) and val.num_rows % 128    # a ragged last batch
    for name in ("row_index", "logits", "labels"):
        np.testing.assert_array_equal(getattr(staged, name), getattr(direct, name), err_msg=name)
    assert np.array_equal(direct.row_index, val.row_indices())
    unlabelled = predict(*args, with_labels=False, stage_rows=stage_rows)
    assert np.isnan(unlabelled.labels).all()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_says_how_to_continue(cache: Path, tmp_path: Path, stop: str) -> None:
    """Ctrl-C said "run the same command to resume" for every command, and the same train command is refused
    (the run folder holds a run): train's note names --resume, and --resume then finishes the run. SIGTERM (a
    scheduler's preemption) ended the process with no word: it stops the run as Ctrl-C does (exit 143)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from train_setup import REPO

    args = ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path), "-q",
            *[x for s in [*FAST, "train.min_steps=100000", "train.max_steps=100000", "exp_name=stopped"]
              for x in ("--set", s)]]
    # as in a terminal, whoever started the test: Ctrl-C raises KeyboardInterrupt
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from ctrpipe.cli import app\nsys.argv[0] = 'ctrpipe'\napp()")
    # faulthandler: a process that does not stop is made to print every thread's stack (SIGABRT, below)
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True)
    log = tmp_path / "stopped" / "train_log.csv"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, stop))
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{stop} did not stop training within 60 s; its threads:\n{out[-6000:]}") from None
    assert proc.returncode == 128 + getattr(signal, stop), out
    said = "interrupted" if stop == "SIGINT" else "stopped by SIGTERM"
    assert f"{said}: nothing partial was left behind; run the same command with --resume" in " ".join(out.split()), out
    assert "Traceback" not in out and not list((tmp_path / "stopped").rglob("*.incomplete")), out
    code_, out = train(cache, tmp_path, "--set", "train.max_steps=12", "--set", "train.min_steps=0",
                       "--set", "exp_name=stopped", "--resume")
    assert code_ == 0, out


def test_a_model_beyond_the_hosts_memory_is_refused_and_leaves_no_run(cache: Path, tmp_path: Path):
    """4 TB of weights: refused before allocating (not the allocator's traceback), with the largest tensor
    named, and no run folder left to block the fixed command."""
    code, out = train(cache, tmp_path, "--set", "model.hidden_units=[1000000,1000000]")
    assert code == 1, out
    out = " ".join(out.split())
    assert "error: model: training model 'dnn' needs at least 16.0 TB before any batch: 4.0 TB of weights" in out
    assert "memory available to this process" in out
    assert "mlp" in out and "1,000,000 x 1,000,000" in out and "lower the model section's sizes" in out
    assert not (tmp_path / "criteo").exists()
    assert train(cache, tmp_path, "--set", "train.max_steps=2")[0] == 0


def test_running_out_of_memory_says_what_to_change_and_leaves_no_run(cache: Path, tmp_path: Path) -> None:
    """Weights that fit the host but not the process's address-space limit (set here with RLIMIT_AS, as a
    container's limit would): the allocator fails in a real process, which says so with what to change (not a
    traceback) and leaves no run folder before its first checkpoint."""
    import resource
    import subprocess
    import sys

    from train_setup import REPO

    from ctrpipe.hostmem import available_bytes

    limit = 6 << 30
    if (available_bytes() or 0) < 16 << 30:
        pytest.skip("needs 16 GiB of available memory: the weights, their gradients and AdamW moments (4 x 3.6 "
                    "GB) must pass the training-memory check")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    args = ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path), "-q",
            *[x for s in [*FAST, "model.hidden_units=[30000,30000]", "train.max_steps=2"] for x in ("--set", s)]]
    proc = subprocess.run([sys.executable, "-m", "ctrpipe.cli", *args], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=cap, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "error: " in out and "out of memory on cpu" in out and "Traceback" not in out, out
    assert "ctrpipe plan --cfg CFG --shards" in out and "lower loader.batch_size" in out
    assert not (tmp_path / "criteo").exists()


def test_a_model_whose_training_state_outgrows_memory_is_refused_before_it_is_built(cache: Path, tmp_path: Path):
    """Weights that fit the host (0.4 of its available memory) but not with their gradients and AdamW moments
    (4 x): the model was built, initialised and ended by the OOM killer in its first step, without a word. In
    a real process whose address space is capped at 0.6 of the memory, so that without the check the
    allocator fails at once instead of the machine swapping."""
    import math
    import resource
    import subprocess
    import sys

    from train_setup import REPO

    from ctrpipe.hostmem import available_bytes

    available = available_bytes()
    if available is None or available < 2 << 30:
        pytest.skip("needs /proc/meminfo and 2 GiB of available memory")
    width = int(math.sqrt(0.4 * available / 4))         # the second layer's width x width weights dominate
    limit = int(0.6 * available) + (2 << 30)             # torch's own mappings on top

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    args = ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path), "-q",
            *[x for s in [*FAST, f"model.hidden_units=[{width},{width}]", "train.max_steps=2"] for x in ("--set", s)]]
    proc = subprocess.run([sys.executable, "-m", "ctrpipe.cli", *args], capture_output=True, text=True, cwd=REPO,
                          preexec_fn=cap, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, out
    assert "error: model: training model 'dnn' needs at least" in out and "before any batch" in out, out
    assert "of weights with their gradients and optimiser state (embedding_optimizer=lazy_adam)" in out, out
    assert "`ctrpipe plan` shows where the memory goes" in out and "Traceback" not in out, out
    assert not (tmp_path / "criteo").exists()


def test_a_run_another_process_is_writing_is_refused(cache: Path, tmp_path: Path) -> None:
    """Two `train --resume` of one run interleaved its train_log.csv (steps twice) and raced for the
    checkpoint's temp file; the run folder is locked while a command writes it (here another open file
    description holds the lock, as another process would), and free again after."""
    from ctrpipe.atomic import folder_lock

    assert train(cache, tmp_path, "--set", "train.max_steps=2")[0] == 0
    run = tmp_path / "criteo"
    with folder_lock(run, lambda: AssertionError("the finished command still holds the lock")):
        code, out = train(cache, tmp_path, "--set", "train.max_steps=4", "--resume")
    assert code == 1 and "another `ctrpipe train` is writing the run" in out and "exp_name=NEW" in out
    code, out = train(cache, tmp_path / "other", "--set", "train.max_steps=2")
    assert code == 0, out


def test_a_head_masked_by_its_own_label_is_told_why_it_has_one_class(cache: Path, tmp_path: Path):
    """mask=<its own label> keeps only the head's positives; the one-class warning advised more validation rows,
    which cannot help (helper's multi-task sweep)."""
    code, out = train(cache, tmp_path, "--set", "train.tasks.label.mask=label")
    assert code == 0, out
    text = " ".join(out.split())
    assert "its mask is its own label, so every row it keeps is positive" in text, text
    assert "more validation rows" not in text


def test_logged_rates_count_the_training_time_of_their_whole_interval(cache: Path, tmp_path: Path) -> None:
    """A helper's sweep: a log line's samples/s divided the interval's samples by the time since the last
    evaluation inside it (the clock was reset there, the sample count was not): 3-16x the run's rate. The
    time the logged rates imply must be the run's training time, give or take the tail after the last line."""
    import polars as pl

    code, out = train(cache, tmp_path, "--set", "train.min_steps=200", "--set", "train.log_every=20",
                      "--set", "train.eval_every=7")
    assert code == 0, out
    run = tmp_path / "criteo"
    log = pl.read_csv(run / "train_log.csv").filter(pl.col("samples_per_s").is_not_null())
    steps = log["step"].to_numpy()
    samples = np.diff(np.r_[0, steps]) * 64                       # loader.batch_size=64 (FAST)
    implied = float(np.sum(samples / log["samples_per_s"].to_numpy()))
    seconds = json.loads((run / "metrics.json").read_text())["train_seconds"]
    assert 0.6 * seconds < implied < 1.05 * seconds, (implied, seconds)


def test_a_resume_with_changed_settings_is_warned_of_and_recorded(cache: Path, tmp_path: Path) -> None:
    """A helper's sweep: a resume with another train.min_steps / train.amp printed its changes only without
    -q, and the run's config.yaml then recorded the new values as if the whole run had used them. It warns
    (with -q too) and metrics.json keeps which steps ran with the old values; a changed stop step says nothing."""
    args = ("--set", "train.epochs=2", "--set", "train.eval_every=4")
    code, out = train(cache, tmp_path, *args, "--set", "train.stop_after_steps=5")
    assert code == 0 and "stopped at step 5" in out, out
    code, out = train(cache, tmp_path, *args, "--set", "train.warmup_steps=2", "--resume")
    assert code == 0 and "warning: resumed at step 5 with changed settings: train.warmup_steps 200 -> 2" in \
        " ".join(out.split()), out
    assert "stop_after_steps" not in out
    notes = json.loads((tmp_path / "criteo" / "metrics.json").read_text())["notes"]
    assert any(n.startswith("resumed at step 5 with changed settings: train.warmup_steps 200 -> 2") for n in notes)


def test_the_summary_says_a_run_stopped_early(cache: Path, tmp_path: Path) -> None:
    """A helper's sweep: the progress bar froze short of its total and the summary said only "best step N";
    `stopped_early` was in metrics.json alone. Fold labels count from 0, as the files do (fold0/, ckpt_fold0.pt)."""
    sets = [x for s in FAST for x in ("--set", s)]
    res = runner.invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path),
                              *sets, "--set", "train.min_steps=200", "--set", "train.eval_every=2",
                              "--set", "train.early_stopping.patience=1", "--set", "model.dropout=0.5"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "criteo" / "metrics.json").read_text())
    assert m["stopped_early"] and m["steps"] < 200
    assert f"stopped early at step {m['steps']} (train.early_stopping.patience=1)" in " ".join(res.output.split())
    res = runner.invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path),
                              *sets, "--kfold", str(K_FOLDS), "--set", "exp_name=kf", "--set", "train.min_steps=200",
                              "--set", "train.eval_every=2", "--set", "train.early_stopping.patience=1"])
    assert res.exit_code == 0 and f"fold 0 (1 of {K_FOLDS})" in res.output, res.output
    assert "stopped early (train.early_stopping.patience=1)" in " ".join(res.output.split())


def test_a_kfold_resume_with_changed_settings_names_its_fold(cache: Path, tmp_path: Path) -> None:
    """A review: a K-fold run resumed with a changed setting named no fold in its warning, and metrics.json's
    notes kept only fold 0's (a later fold's resume note was lost)."""
    args = ("--kfold", str(K_FOLDS), "--set", "train.epochs=2", "--set", "train.eval_every=4")
    code, out = train(cache, tmp_path, *args, "--set", "train.stop_after_steps=5")
    assert code == 0 and "stopped at step 5" in out, out
    code, out = train(cache, tmp_path, *args, "--set", "train.warmup_steps=3", "--resume")
    text = " ".join(out.split())
    assert code == 0 and text.count("resumed at step") == 1 and "warning: fold 0: resumed at step 5" in text, out
    notes = json.loads((tmp_path / "criteo" / "metrics.json").read_text())["notes"]
    assert [n for n in notes if "resumed at step" in n] == [n for n in notes if n.startswith("fold 0: resumed")]
    assert any(n.startswith("fold 0: resumed at step 5") for n in notes)


def test_training_settings_that_could_not_work_are_said_before_a_step(cache: Path, synth_dir: Path,
                                                                       tmp_path: Path) -> None:
    """(a helper's sweep) batches of one row under batch norm ended in torch's 100-line traceback in the first
    step; a head-qualified metric on a one-head run was an unknown metric although the docs offered it; and
    early stopping with no validation rows to evaluate was silently never going to fire."""
    code, out = train(cache, tmp_path / "a", "--set", "loader.batch_size=1", "--set", "model.batch_norm=true")
    said = " ".join(out.split())
    assert code == 1 and "gives batches of one row" in said and "model.batch_norm=false" in said, out
    assert "Traceback" not in out
    code, out = train(cache, tmp_path / "b", "--set", "train.early_stopping.metric=auc.label")
    said = " ".join(out.split())
    assert code == 1 and "names the run's only head" in said and "train.early_stopping.metric=auc" in said, out
    from train_setup import build_cache

    noval = build_cache(tmp_path / "noval", synth_dir, ["data.hash_bins=64", "data.folds.n_splits=0",
                                                        "data.split.val_ratio=0"], gold=False)
    sets = [x for s in [*FAST, "train.max_steps=3", "train.early_stopping.patience=2"] for x in ("--set", s)]
    res = runner.invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(noval), "--runs",
                              str(tmp_path / "c"), *sets])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "patience=2 never fires: there are no validation rows" in said, res.output
    # a loss gone NaN stopped at the next log row only: evaluations and checkpoints of NaN weights came first
    code, out = train(cache, tmp_path / "d", "--set", "train.lr=1e30", "--set", "train.log_every=1000",
                      "--set", "train.eval_every=2", "--set", "train.max_steps=12")
    assert code == 1 and "loss became NaN/inf at step" in out and "train.weight_decay" in out, out
    rows = list(csv.DictReader((tmp_path / "d" / "criteo" / "train_log.csv").open()))
    assert not any(r["val_auc"] for r in rows), rows


def test_grad_clip_norm_is_the_dense_layers_whatever_the_tables_optimiser(cache: Path, tmp_path: Path) -> None:
    """(a helper's sweep) the docs say grad_clip bounds the dense parameters' norm, but with
    embedding_optimizer=adam (dense table gradients) the tables joined the norm, so switching the tables'
    optimiser changed how hard the dense layers were clipped. After one step, the dense layers' update
    depends on their own clipped gradient alone: equal for both."""
    got = {}
    for opt in ("lazy_adam", "adam"):
        code, out = train(cache, tmp_path / opt, "--set", f"train.embedding_optimizer={opt}", "--set",
                          "train.grad_clip=0.001", "--set", "train.max_steps=1", "--set", "train.warmup_steps=0")
        assert code == 0, out
        w = weights(tmp_path / opt / "criteo" / "ckpt_last.pt")
        got[opt] = {k: v for k, v in w.items() if "embedding" not in k and "tables" not in k}
    assert got["adam"].keys() == got["lazy_adam"].keys() and len(got["adam"]) > 2
    for k in got["adam"]:
        assert torch.equal(got["adam"][k], got["lazy_adam"][k]), k


def test_a_stop_at_the_runs_last_step_finishes_the_run(cache: Path, tmp_path: Path) -> None:
    """(a helper's sweep) train.stop_after_steps equal to the run's steps trained and evaluated every step, then
    said "stopped ... continue with --resume" and wrote no metrics.json until a resume that had nothing to do."""
    code, out = train(cache, tmp_path, "--set", "train.max_steps=4", "--set", "train.stop_after_steps=4")
    assert code == 0 and "continue with --resume" not in out, out
    assert json.loads((tmp_path / "criteo" / "metrics.json").read_text())["steps"] == 4
