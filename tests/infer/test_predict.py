"""`ctrpipe infer` on real tiny runs: synth -> shard -> train (CLI, a few steps) -> infer.

Checks that pointing infer at the val rows reproduces metrics.json, that K fold checkpoints are ensembled
exactly as `combine` says, and that every refusal names the folder / file and a fix.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from cli_helpers import run_cli as _cli
from cli_helpers import sets as _sets
from cli_helpers import stop_right_after_renaming_onto
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.errors import CheckpointError, ConfigError, ManifestMismatchError
from ctrpipe.infer.ensemble import combine
from ctrpipe.infer.predict import run_infer
from ctrpipe.train.metrics import sigmoid

REPO = Path(__file__).resolve().parents[2]
CFG = REPO / "cfgs" / "criteo.yaml"
DATA = ["data.hash_bins=200", "data.shard_rows=500", "data.folds.n_splits=2"]
TRAIN = ["loader.batch_size=128", "loader.eval_batch_size=256", "train.log_every=5", "train.device=cpu",
         "model.name=dnn"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Criteo data, a train cache, a test cache, a single run and a 2-fold run (built once)."""
    root = tmp_path_factory.mktemp("infer_world")
    data, tr, te = root / "data", root / "shards_tr", root / "shards_te"
    _cli("synth", "--format", "criteo", "--rows", "1500", "--test-rows", "300", "--out", str(data), "-q")
    _cli("shard", "--cfg", str(CFG), "--input", str(data / "train.tsv"), "--out", str(tr), "-q", *_sets(DATA))
    _cli("shard", "--cfg", str(CFG), "--input", str(data / "test.tsv"), "--test", "--stats-from", str(tr),
         "--out", str(te), "-q", *_sets(DATA + ["data.id_offset=60000000"]))
    runs = root / "runs"
    _cli("train", "--cfg", str(CFG), "--shards", str(tr), "--runs", str(runs), "-q",
         *_sets(TRAIN + ["exp_name=single"]))
    _cli("train", "--cfg", str(CFG), "--shards", str(tr), "--runs", str(runs), "--kfold", "2", "-q",
         *_sets(TRAIN + ["exp_name=kfold"]))
    return {"root": root, "data": data, "tr": tr, "te": te, "single": runs / "single",
            "kfold": runs / "kfold"}


def test_val_view_reproduces_metrics_json(world: dict[str, Path], tmp_path: Path) -> None:
    run = world["single"]
    want = json.loads((run / "metrics.json").read_text())["val"]
    rep = run_infer(run, world["tr"], tmp_path / "val.csv",
                    ["infer.view=val", "infer.calibration.method=none"], quiet=True)
    assert rep.metrics is not None
    for key in ("auc", "logloss", "ap", "wll"):
        assert rep.metrics[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    # with the calibration fitted at the end of training: same ranking, logloss no worse on the rows it saw
    assert (run / "calibration.json").is_file()
    cal = run_infer(run, world["tr"], tmp_path / "val_cal.csv", ["infer.view=val"], quiet=True)
    assert cal.metrics is not None
    assert cal.metrics["auc"] == pytest.approx(want["auc"], abs=1e-9)
    assert cal.metrics["logloss"] <= want["logloss"] + 1e-9
    assert any("fitted on these validation rows" in n for n in cal.notes)        # said: slightly optimistic


def test_metrics_on_rows_the_models_trained_on_are_withheld(world: dict[str, Path], tmp_path: Path) -> None:
    """Every fold covers the train and val rows, so a K-fold ensemble scored on them reports in-sample numbers
    (with 2 folds, one of the two models trained on each row); a single run trained on its train rows."""
    for run, view, held_out in ((world["kfold"], "val", "cv.oof"), (world["kfold"], "train", "cv.oof"),
                                (world["single"], "train", "val in metrics.json")):
        rep = run_infer(run, world["tr"], tmp_path / f"{run.name}_{view}.csv", [f"infer.view={view}"], quiet=True)
        assert rep.metrics is None and any("metrics withheld" in n and held_out in n for n in rep.notes)
        sidecar = json.loads((tmp_path / f"{run.name}_{view}.csv.json").read_text())
        assert sidecar["metrics"] is None and sidecar["notes"] == list(rep.notes)
        assert pl.read_csv(tmp_path / f"{run.name}_{view}.csv").height == rep.rows > 0    # still written
    val = run_infer(world["single"], world["tr"], tmp_path / "val.csv",
                    ["infer.view=val", "infer.calibration.method=none"], quiet=True)
    assert val.metrics is not None and not val.notes                              # held out from the model


def test_rank_avg_reports_only_rank_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    """Rank scores order the rows but are no probabilities: logloss, WLL and Score of them mean nothing (and
    ranks averaging 0.5 can beat the real probabilities' Score). One model gets ranks too: said."""
    rep = run_infer(world["single"], world["tr"], tmp_path / "r.csv",
                    ["infer.view=val", "infer.method=rank_avg", "infer.calibration.method=none"], quiet=True)
    assert rep.metrics is not None and set(rep.metrics) == {"auc", "ap"}
    assert any("rank scores" in n for n in rep.notes)


def test_trim_mean_that_trims_nothing_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trims nothing from 2 models(?s:.*)too few to cut one from each end"):
        run_infer(world["kfold"], world["te"], tmp_path / "t.csv", ["infer.method=trim_mean"], quiet=True)
    assert not (tmp_path / "t.csv").exists()


def test_submission_on_test_cache(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "submission.csv"
    out.parent.mkdir()
    for stale in ("submission.csv.json", "submission.csv.folds.npz"):    # an older submission's companions
        (out.parent / stale).write_text("old")
    res = CliRunner().invoke(app, ["infer", "--run", str(world["single"]), "--shards", str(world["te"]),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    sub = pl.read_csv(out)
    assert sub.columns == ["ID", "clicked"]
    assert sub.height == 300
    assert sub["ID"].to_list() == list(range(60_000_000, 60_000_300))       # Criteo: id_offset + position
    p = sub["clicked"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    side = json.loads((out.parent / "submission.csv.json").read_text())
    assert side["rows"] == 300 and side["run"] == str(world["single"].resolve())
    assert len(side["checkpoints"]) == 1 and len(side["checkpoints"][0]["sha256"]) == 64
    assert side["shards_fingerprint"] and side["config"]["infer"]["view"] == "auto"
    assert side["calibration"]["method"] == "temperature"
    assert not list(out.parent.glob("*.incomplete")) and not (out.parent / "submission.csv.folds.npz").exists()


def test_a_stop_as_the_submission_lands_still_writes_its_record(world: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between the submission's rename and its record (fold predictions, then the .json) left the
    new submission beside no record, or none of its fold predictions, while the note said nothing partial."""
    out = tmp_path / "submission.csv"
    stop_right_after_renaming_onto(monkeypatch, out)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)        # as in a terminal
    try:
        res = CliRunner().invoke(app, ["infer", "--run", str(world["single"]), "--shards", str(world["te"]),
                                       "--out", str(out), "--set", "infer.save_fold_preds=true"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert res.exit_code == 130 and "interrupted" in res.output, res.output
    assert pl.read_csv(out).height == 300
    assert json.loads((tmp_path / "submission.csv.json").read_text())["rows"] == 300
    assert np.load(tmp_path / "submission.csv.folds.npz")["logits"].shape == (1, 300)


def test_a_failed_fold_predictions_write_replaces_nothing(world: dict[str, Path], tmp_path: Path) -> None:
    """The fold predictions were written after the new submission had replaced the old one and the old record
    was gone: when they failed (a full disk), the new submission stood with no record. They are written before
    it lands now; here their file cannot be created (a folder holds each name it would take)."""
    out = tmp_path / "submission.csv"
    args = ["infer", "--run", str(world["single"]), "--shards", str(world["te"]), "--out", str(out), "-q"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for name in ("submission.csv.folds.npz.incomplete", "submission.csv.folds.npz.staged.incomplete"):
        (tmp_path / name).mkdir()
    res = CliRunner().invoke(app, [*args, "--set", "infer.save_fold_preds=true", "--set", "infer.method=mean"])
    assert res.exit_code == 1 and "folds.npz" in res.output, res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_run_whose_wll_calibration_is_refused_now_is_served_with_the_fix(world: dict[str, Path]) -> None:
    """The refusal of a WLL temperature calibration on a sampling run sat in every config's construction, so a
    run trained so before it could not be served even with the fix it names (the checkpoint's own config is
    rebuilt to read its sampling shift)."""
    import dataclasses

    from ctrpipe.infer.predict import checkpoint_logit_shift, checkpoint_tasks, resolve_config
    from ctrpipe.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(world["single"] / "ckpt_best.pt")
    config = json.loads(json.dumps(ckpt.config))
    config["loader"]["neg_keep_prob"] = 0.5
    config["infer"]["calibration"].update(target="wll", method="temperature")
    old = dataclasses.replace(ckpt, config=config)
    with pytest.raises(ConfigError, match="cannot undo the logit shift") as err:
        resolve_config(old, [])
    cfg = resolve_config(old, [err.value.fix.split("set ")[1].split(" ")[0]])
    assert cfg.infer.calibration.method == "temperature_bias"
    shift = checkpoint_logit_shift(old, checkpoint_tasks(old, cfg.train))
    assert shift == pytest.approx((math.log(0.5),))


def test_method_none_still_applies_the_keep_rate_shift(world: dict[str, Path], tmp_path: Path) -> None:
    """infer.calibration.method=none dropped infer.calibration.keep_rate: a run trained on downsampled
    negatives was submitted at its sampled rates (infer, predict and export alike)."""
    from ctrpipe.serve.predictor import Predictor

    subs = {}
    for keep in (1.0, 0.5):
        out = tmp_path / f"k{keep}.csv"
        run_infer(world["single"], world["te"], out, ["infer.calibration.method=none",
                                                      f"infer.calibration.keep_rate={keep}"], quiet=True)
        subs[keep] = pl.read_csv(out)["clicked"].to_numpy().astype(np.float64)
    logit = np.log(subs[1.0] / (1 - subs[1.0]))
    np.testing.assert_allclose(subs[0.5], 1 / (1 + np.exp(-(logit + np.log(0.5)))), rtol=0, atol=1e-6)
    p = Predictor.load(world["single"], overrides=["infer.calibration.method=none",
                                                    "infer.calibration.keep_rate=0.5"])
    assert p.calibrations[0].keep_rate == 0.5


def _fold_logits(run: Path, shards: Path) -> np.ndarray:
    """Each fold checkpoint's logits over the test cache, through train's own predict()."""
    import torch

    from ctrpipe.loader.loader import ShardLoader
    from ctrpipe.loader.view import RowView
    from ctrpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
    from ctrpipe.train.evaluate import predict

    out = []
    for k in range(2):
        model = model_from_checkpoint(load_checkpoint(run / f"ckpt_fold{k}.pt"), "cpu")
        loader = ShardLoader(shards, RowView.test(), 64, shuffle=False, seed=0, with_labels=False)
        out.append(predict(model, loader, loader.num_rows, 1, torch.device("cpu")).logits[:, 0])
    return np.stack(out)


def test_kfold_run_ensembles_every_fold(world: dict[str, Path], tmp_path: Path) -> None:
    run = world["kfold"]
    rep = run_infer(run, world["te"], tmp_path / "kf.csv",
                    ["infer.calibration.method=none", "infer.save_fold_preds=true"], quiet=True)
    assert [p.name for p in rep.checkpoints] == ["ckpt_fold0.pt", "ckpt_fold1.pt"]
    logits = _fold_logits(run, world["te"])
    want = combine(sigmoid(logits), "logit_mean")
    got = pl.read_csv(tmp_path / "kf.csv")["clicked"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    with np.load(tmp_path / "kf.csv.folds.npz") as z:
        assert z["logits"].shape == (2, 300)
        np.testing.assert_allclose(z["logits"], logits, rtol=1e-5, atol=1e-6)
    # weighted: weights come from the folds' validation AUCs through a softmax
    rep = run_infer(run, world["te"], tmp_path / "kfw.csv", ["infer.method=weighted"], quiet=True)
    assert rep.weights is not None and len(rep.weights) == 2 and sum(rep.weights) == pytest.approx(1.0)
    # a metric that describes predictions was maximised (calibration 1.02 outweighed 0.998); logloss weighs the
    # better (lower) fold more
    with pytest.raises(ConfigError, match="describes the predictions"):
        run_infer(run, world["te"], tmp_path / "kfc.csv", ["infer.method=weighted", "infer.weight_metric=calibration"],
                  quiet=True)
    from ctrpipe.train.checkpoint import load_checkpoint

    ckpts = [load_checkpoint(run / f"ckpt_fold{k}.pt") for k in range(2)]
    by_loss = run_infer(run, world["te"], tmp_path / "kfl.csv", ["infer.method=weighted",
                                                                 "infer.weight_metric=logloss"], quiet=True).weights
    better = int(np.argmin([c.val_metrics["logloss"] for c in ckpts]))
    assert by_loss is not None and by_loss[better] > by_loss[1 - better]


def test_no_checkpoint_error_names_run_and_fix(world: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "runs" / "criteo_dnn"
    empty.mkdir(parents=True)
    with pytest.raises(CheckpointError) as exc:
        run_infer(empty, world["te"], None, [], quiet=True)
    msg = str(exc.value)
    assert str(empty) in msg and "'criteo_dnn'" in msg and "ctrpipe train" in msg and "fix:" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        run_infer(tmp_path / "runs" / "nope", world["te"], None, [], quiet=True)


def test_incomplete_kfold_run_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "kfold"
    shutil.copytree(world["kfold"], run)
    (run / "ckpt_fold1.pt").unlink()
    with pytest.raises(CheckpointError) as exc:
        run_infer(run, world["te"], None, [], quiet=True)
    # the run had finished: --resume would only say so (a helper's sweep); an unfinished one resumes
    assert "ckpt_fold1.pt is missing" in str(exc.value) and "--resume" not in str(exc.value)
    assert "put it back" in exc.value.fix and "exp_name=NEW" in exc.value.fix
    (run / "metrics.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        run_infer(run, world["te"], None, [], quiet=True)
    assert "ckpt_fold1.pt is missing" in str(exc.value) and "--resume" in exc.value.fix


def test_a_checkpoint_of_another_fold_or_run_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """A helper's sweep: fold 0's checkpoint copied over fold 1's, or a single run's over a fold, joined the
    ensemble (fold 0 twice; AUC lower) and took the run's calibration; infer and serving now refuse it."""
    from ctrpipe.serve.predictor import Predictor

    cases = {"fold0": (world["kfold"] / "ckpt_fold0.pt", "holds the model of fold 0, not of fold 1"),
             "single": (world["single"] / "ckpt_best.pt", "holds the model of no fold")}
    for name, (source, message) in cases.items():
        run = tmp_path / name
        shutil.copytree(world["kfold"], run)
        shutil.copy(source, run / "ckpt_fold1.pt")
        with pytest.raises(CheckpointError, match=message) as exc:
            run_infer(run, world["te"], tmp_path / "s.csv", [], quiet=True)
        assert exc.value.where == str(run / "ckpt_fold1.pt")
        with pytest.raises(CheckpointError, match=message):
            Predictor.load(run)
    other = tmp_path / "other"                      # the same fold of a run trained with another seed
    _cli("train", "--cfg", str(CFG), "--shards", str(world["tr"]), "--runs", str(other), "--kfold", "2", "-q",
         *_sets(TRAIN + ["exp_name=kfold", "seed=7"]))
    run = tmp_path / "mixed"
    shutil.copytree(world["kfold"], run)
    shutil.copy(other / "kfold" / "ckpt_fold1.pt", run / "ckpt_fold1.pt")
    with pytest.raises(CheckpointError, match="is another run's checkpoint: its seed differs"):
        run_infer(run, world["te"], tmp_path / "s.csv", [], quiet=True)


def test_stray_fold_checkpoints_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """A backup copy of a fold, or a fold beyond K, would join the ensemble and weigh a fold twice."""
    for extra in ("ckpt_fold0_backup.pt", "ckpt_fold2.pt"):
        run = tmp_path / extra
        shutil.copytree(world["kfold"], run)
        shutil.copy(run / "ckpt_fold0.pt", run / extra)
        with pytest.raises(CheckpointError) as exc:
            run_infer(run, world["te"], None, [], quiet=True)
        assert f"holds {extra}" in str(exc.value) and f"move {extra} out" in str(exc.value)


def test_out_naming_a_folder_is_refused_before_any_work(world: dict[str, Path], tmp_path: Path) -> None:
    from ctrpipe.errors import SubmissionError

    with pytest.raises(SubmissionError, match="names a folder"):
        run_infer(world["single"], world["te"], tmp_path, [], quiet=True)


def test_out_naming_a_file_the_command_reads_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """(helper's infer sweep) --out runs/X/ckpt_fold0.pt replaced a checkpoint with the CSV (exit 0, and the run
    was then unreadable); --out inside the test cache replaced its manifest.json. An earlier submission in the
    run folder (its .json record beside it) is still replaced, and a new name there written."""
    from ctrpipe.errors import SubmissionError
    from ctrpipe.infer.submission import check_out_outside
    from ctrpipe.serve.predict_file import predict_file

    run, cache = tmp_path / "run", tmp_path / "te"
    shutil.copytree(world["kfold"], run)
    shutil.copytree(world["te"], cache)
    before = {p: p.read_bytes() for p in [*run.rglob("*"), *cache.rglob("*")] if p.is_file()}
    for out, words in ((run / "ckpt_fold0.pt", "the run's own ckpt_fold0.pt"),
                       (run / "calibration.json", "the run's own calibration.json"),
                       (run / "oof.npz", "the run's own oof.npz"),
                       (cache / "manifest.json", "inside the shard cache"),
                       (cache / "shard_00000" / "sub.csv", "inside the shard cache")):
        with pytest.raises(SubmissionError, match=words):
            run_infer(run, cache, out, [], quiet=True)
        if "run's own" in words:
            with pytest.raises(SubmissionError, match=words):
                predict_file(run, world["data"] / "test.tsv", out)
    assert {p: p.read_bytes() for p in [*run.rglob("*"), *cache.rglob("*")] if p.is_file()} == before
    run_infer(run, cache, None, [], quiet=True)                     # run/submission.csv, then again over it
    (run / "submission.csv.json").unlink()                          # (even without its record: infer's default)
    run_infer(run, cache, None, [], quiet=True)
    run_infer(run, cache, run / "second.csv", [], quiet=True)
    check_out_outside(tmp_path / "elsewhere.csv", run, (cache,))


@pytest.mark.parametrize("run_name", ["single", "kfold"])
def test_unfinished_run_is_refused(world: dict[str, Path], tmp_path: Path, run_name: str) -> None:
    """Checkpoints exist from a run's first evaluation: only metrics.json says that training ended."""
    run = tmp_path / run_name
    shutil.copytree(world[run_name], run)
    (run / "metrics.json").unlink()
    with pytest.raises(CheckpointError) as exc:
        run_infer(run, world["te"], None, [], quiet=True)
    assert "has not finished training" in str(exc.value) and "--resume" in str(exc.value)


def test_schema_mismatch_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    _cli("shard", "--cfg", str(CFG), "--input", str(world["data"] / "test.tsv"), "--out", str(other), "-q",
         *_sets(["data.hash_bins=300", "data.shard_rows=500", "data.folds.n_splits=2"]))
    with pytest.raises(ManifestMismatchError) as exc:
        run_infer(world["single"], other, tmp_path / "x.csv", [], quiet=True)
    msg = str(exc.value)
    assert "schema" in msg and "ckpt_best.pt" in msg and "--stats-from" in msg
    assert not (tmp_path / "x.csv").exists()


def test_missing_ids_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "noids"
    shutil.copytree(world["te"], cache)
    doc = json.loads((cache / "manifest.json").read_text())
    for shard in doc["shards"]:
        (cache / shard["files"].pop("ids")["file"]).unlink()
    doc["columns"] = [c for c in doc["columns"] if c["kind"] != "id"]
    (cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestMismatchError, match="no ids.npy") as exc:
        run_infer(world["single"], cache, tmp_path / "x.csv", [], quiet=True)
    assert str(cache) in str(exc.value)


def test_duplicate_ids_are_refused_before_any_model_runs(world: dict[str, Path], tmp_path: Path) -> None:
    """A test file with repeated rows gave a submission with repeated IDs, which blending then refused."""
    cache = tmp_path / "dup"
    shutil.copytree(world["te"], cache)
    ids = np.load(cache / "shard_00000" / "ids.npy", mmap_mode="r+")
    ids[7] = ids[3]
    ids[9] = ids[3]                                         # three rows: the first two are named
    ids.flush()
    del ids
    with pytest.raises(ManifestMismatchError, match="is on two rows") as exc:
        run_infer(world["single"], cache, tmp_path / "x.csv", [], quiet=True)
    assert "rows 3 and 7" in str(exc.value) and not (tmp_path / "x.csv").exists()
    assert "np." not in str(exc.value)                      # the ID as it is, not numpy's repr of it


def test_bad_overrides_are_refused(world: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot change at inference"):
        run_infer(world["single"], world["te"], tmp_path / "x.csv", ["model.hidden=[8]"], quiet=True)
    with pytest.raises(ConfigError, match="unknown task"):
        run_infer(world["single"], world["te"], tmp_path / "x.csv", ["infer.task=nope"], quiet=True)
    res = CliRunner().invoke(app, ["infer", "--run", str(world["single"]), "--shards", str(world["te"]),
                                   "--set", "infer.view=gold", "--out", str(tmp_path / "y.csv")])
    assert res.exit_code == 1 and "Traceback" not in res.output



def test_the_in_sample_note_names_the_calibrations_target(world: dict[str, Path], tmp_path: Path) -> None:
    """A WLL calibration flatters WLL and Score on the rows it was fitted on (logloss may get worse): the note
    said logloss (helper's infer sweep)."""
    rep = run_infer(world["single"], world["tr"], tmp_path / "v.csv",
                    ["infer.view=val", "infer.calibration.target=wll",
                     "infer.calibration.method=temperature_bias"], quiet=True)
    note = next(n for n in rep.notes if "fitted on these validation rows" in n)
    assert "target wll" in note and "WLL and Score" in note and "logloss" not in note


def test_a_calibration_file_with_impossible_values_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """A NaN, zero or negative temperature in calibration.json wrote NaN or reversed predictions, exit 0."""
    run = tmp_path / "run"
    shutil.copytree(world["single"], run)
    path = run / "calibration.json"
    doc = json.loads(path.read_text())
    for t in (float("nan"), 0.0, -1.0):
        doc["tasks"][0]["temperature"] = t
        path.write_text(json.dumps(doc))
        with pytest.raises(CheckpointError) as exc:
            run_infer(run, world["te"], tmp_path / "s.csv", [], quiet=True)
        assert str(path) in str(exc.value) and "delete it" in exc.value.fix
        assert not (tmp_path / "s.csv").exists()
    path.unlink()                   # what the fix says: infer refits from the run's validation predictions
    run_infer(run, world["te"], tmp_path / "s.csv", [], quiet=True)
    assert np.isfinite(pl.read_csv(tmp_path / "s.csv")["clicked"].to_numpy()).all()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="an unwritable path: /proc (Linux)")
def test_an_unwritable_out_is_named_as_given(world: dict[str, Path]) -> None:
    """A helper's sweep: `--out /sys/x.csv` was told "cannot use /sys/x.csv.incomplete ... if it is no path you
    gave, report it as a bug": the temp name the output is first written under, which the user never gave."""
    res = CliRunner().invoke(app, ["infer", "--run", str(world["single"]), "--shards", str(world["te"]),
                                   "--out", "/proc/x.csv", "-q"])
    assert res.exit_code == 1 and "cannot use /proc/x.csv:" in res.output and ".incomplete" not in res.output, \
        res.output


def test_what_keeps_the_calibration_from_the_asked_one_is_said_under_quiet(world: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """(helper's infer sweep) infer said nothing of a stored temperature at the end of its range (training had
    warned once), of a stored fit that is none where temperature was asked, or, under -q, of a run without
    validation predictions written uncalibrated."""
    from ctrpipe.infer.calibrate import T_BOUNDS

    run = tmp_path / "run"
    shutil.copytree(world["single"], run)
    path = run / "calibration.json"
    doc = json.loads(path.read_text())

    def infer() -> str:
        res = CliRunner().invoke(app, ["infer", "--run", str(run), "--shards", str(world["te"]), "--out",
                                       str(tmp_path / "s.csv"), "-q"])
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    assert "warning" not in infer()
    doc["tasks"][0]["temperature"] = T_BOUNDS[0]
    path.write_text(json.dumps(doc))
    assert f"stopped at the end of its temperature range (T={T_BOUNDS[0]:g})" in infer()
    doc["tasks"][0].update(method="none", temperature=1.0)
    path.write_text(json.dumps(doc))
    said = infer()
    assert "calibration.json holds no fit for head" in said and "writing uncalibrated predictions" in said, said
    path.unlink()
    (run / "val_predictions.npz").unlink()
    said = infer()
    assert "has no validation predictions" in said and "writing uncalibrated predictions" in said, said


def test_out_naming_another_runs_or_caches_file_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    """(helper's infer sweep) the guard above covered only the run and cache the command reads: infer's --out
    naming another run's ckpt_best.pt, predict's another cache's manifest.json and blend's another run's fold
    checkpoint each replaced it with CSV text, exit 0, and that run or cache failed later."""
    from ctrpipe.errors import SubmissionError
    from ctrpipe.infer.blend import run_blend
    from ctrpipe.serve.predict_file import predict_file

    other_run, other_cache = tmp_path / "other_run", tmp_path / "other_cache"
    shutil.copytree(world["kfold"], other_run)
    shutil.copytree(world["tr"], other_cache)
    before = {p: p.read_bytes() for p in [*other_run.rglob("*"), *other_cache.rglob("*")] if p.is_file()}
    with pytest.raises(SubmissionError, match="the run's own ckpt_fold0.pt"):
        run_infer(world["single"], world["te"], other_run / "ckpt_fold0.pt", [], quiet=True)
    with pytest.raises(SubmissionError, match="inside the shard cache"):
        predict_file(world["single"], world["data"] / "test.tsv", other_cache / "manifest.json")
    run_infer(world["single"], world["te"], tmp_path / "a.csv", [], quiet=True)
    run_infer(world["kfold"], world["te"], tmp_path / "b.csv", [], quiet=True)
    with pytest.raises(SubmissionError, match="the run's own ckpt_fold1.pt"):
        run_blend([tmp_path / "a.csv", tmp_path / "b.csv"], "mean", None, other_run / "ckpt_fold1.pt", quiet=True)
    # (a review) a K-fold run's fold folders hold its own files too: fold0/train_log.csv, fold0/ckpt_last.pt
    fold_file = next(p for p in sorted((other_run / "fold0").iterdir()) if p.is_file())
    with pytest.raises(SubmissionError, match=f"the run's own {fold_file.name}"):
        run_infer(world["single"], world["te"], fold_file, [], quiet=True)
    with pytest.raises(SubmissionError, match=f"the run's own {fold_file.name}"):
        predict_file(world["single"], world["data"] / "test.tsv", fold_file)
    assert {p: p.read_bytes() for p in [*other_run.rglob("*"), *other_cache.rglob("*")] if p.is_file()} == before
    # (a second review) a run named like a fold folder, and a run's tb/ events, are a run's own files too
    named_fold = tmp_path / "runs2" / "fold1"
    shutil.copytree(world["single"], named_fold)
    events = named_fold / "tb" / "events.out.tfevents.1"
    events.parent.mkdir(exist_ok=True)
    events.write_bytes(b"events")
    for out in (named_fold / "ckpt_best.pt", events):
        with pytest.raises(SubmissionError, match=f"the run's own {out.name}"):
            run_infer(world["single"], world["te"], out, [], quiet=True)
    # report and train write into no shard cache's folder either (a rebuild of the cache then refused it)
    res = CliRunner().invoke(app, ["report", str(world["single"]), "--out", str(other_cache / "rep")])
    assert res.exit_code == 1 and "is inside the shard cache" in " ".join(res.output.split()), res.output
    res = CliRunner().invoke(app, ["train", "--cfg", str(CFG), "--shards", str(world["tr"]), "--runs",
                                   str(other_cache / "runs"), "-q", *_sets(TRAIN)])
    assert res.exit_code == 1 and "--runs" in res.output and "inside the shard cache" in " ".join(
        res.output.split()), res.output
    from ctrpipe.serve.export import export_model

    with pytest.raises(ConfigError, match="is inside the shard cache"):
        export_model(world["single"], other_cache / "export", "torchscript")
    assert {p: p.read_bytes() for p in [*other_run.rglob("*"), *other_cache.rglob("*")] if p.is_file()} == before
    run_infer(world["single"], world["te"], other_run / "submission.csv", [], quiet=True)   # as before
    run_blend([tmp_path / "a.csv", tmp_path / "b.csv"], "mean", None, other_run / "blend.csv", quiet=True)
