"""Multi-task training end to end through the CLI: synthetic Parquet logs (clicked, converted), the shipped
parquet_{mmoe,esmm}.yaml configs, per-head metrics, gate diagnostics, exact resume, and infer of one head."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_train import assert_equal_weights, weights
from train_setup import REPO
from typer.testing import CliRunner

from ctrpipe.cli import app

runner = CliRunner()
SMALL = ["loader.batch_size=128", "loader.eval_batch_size=512", "train.log_every=5",
         "infer.calibration.method=none", "data.folds.n_splits=0"]


def cli(*args: str) -> str:
    res = runner.invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def parquet_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mt")
    cli("synth", "--format", "parquet", "--rows", "3000", "--test-rows", "1000", "--seed", "1", "--out",
        str(root / "data"), "-q")
    cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input", str(root / "data" / "train.parquet"),
        "--gold", str(root / "data" / "test.parquet"), "--out", str(root / "shards"), "-q",
        "--set", "data.hash_bins=1000", "--set", "data.folds.n_splits=0")
    return root / "shards"


def train(cache: Path, runs: Path, model: str, *extra: str) -> dict:
    sets = [x for s in (*SMALL, *extra) for x in ("--set", s)]
    cli("train", "--cfg", str(REPO / "cfgs" / f"parquet_{model}.yaml"), "--shards", str(cache), "--runs",
        str(runs), "-q", *sets)
    return json.loads((runs / f"parquet_{model}" / "metrics.json").read_text())


def test_mmoe_reports_per_head_metrics_and_gate_usage(parquet_cache: Path, tmp_path: Path) -> None:
    m = train(parquet_cache, tmp_path, "mmoe", "train.epochs=2")
    assert m["heads"] == ["clicked", "converted"]
    for split in ("val", "gold"):
        assert 0.5 < m[split]["auc.clicked"] <= 1.0, (split, m[split])
    # converted counts clicked rows only: ~45 positives among ~250 gold rows, where its AUC is noise (0.48-0.57
    # over seeds); validation picks the best evaluation, so it must rank there
    assert 0.5 < m["val"]["auc.converted"] <= 1.0 and 0.0 < m["gold"]["auc.converted"] < 1.0
    # converted is masked by clicked (the config): its metrics count clicked rows only
    with np.load(tmp_path / "parquet_mmoe" / "val_predictions.npz") as z:
        labels = z["labels"]
    assert np.isnan(labels[:, 1]).any() and not np.isnan(labels[:, 0]).any()
    assert np.array_equal(np.isnan(labels[:, 1]), labels[:, 0] == 0)
    rows = list(csv.DictReader((tmp_path / "parquet_mmoe" / "diagnostics.csv").open()))
    names = {r["name"] for r in rows}
    assert {"train/gate.clicked.e0", "train/gate_entropy.converted", "val/auc.converted"} <= names
    usage = [float(r["value"]) for r in rows if r["name"].startswith("train/gate.clicked.e")
             and r["step"] == rows[0]["step"]]
    assert len(usage) == 4 and abs(sum(usage) - 1) < 1e-4


def test_esmm_heads_metrics_and_infer_of_one_head(parquet_cache: Path, tmp_path: Path) -> None:
    m = train(parquet_cache, tmp_path, "esmm")
    assert m["heads"] == ["ctr", "ctcvr", "cvr"]
    gold = m["gold"]
    for head in ("ctr", "ctcvr", "cvr"):
        assert np.isfinite(gold[f"auc.{head}"]) and np.isfinite(gold[f"logloss.{head}"])
    primary = (1.0 * gold["auc.ctcvr"] + 0.2 * gold["auc.ctr"] + 0.2 * gold["auc.cvr"]) / 1.4
    assert gold["auc"] == pytest.approx(primary)
    run = tmp_path / "parquet_esmm"
    out = cli("infer", "--run", str(run), "--shards", str(parquet_cache), "--set", "infer.task=ctcvr",
              "--set", "infer.view=gold", "--out", str(tmp_path / "sub.csv"))
    assert "ctcvr" in out
    # its column keeps infer.pred_header's name, said so (a conversion submission headed 'clicked' read as clicks)
    assert "head 'ctcvr' is written as column 'clicked'" in " ".join(out.split())
    assert (tmp_path / "sub.csv").read_text().splitlines()[0] == "ID,clicked"
    sidecar = json.loads((tmp_path / "sub.csv.json").read_text())
    assert sidecar["task"] == "ctcvr"
    assert sidecar["metrics"]["auc"] == pytest.approx(gold["auc.ctcvr"], abs=1e-6)
    res = runner.invoke(app, ["infer", "--run", str(run), "--shards", str(parquet_cache), "--set",
                              "infer.task=clicked", "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 1 and "ctr, ctcvr, cvr" in res.output


def test_mmoe_resume_equals_uninterrupted(parquet_cache: Path, tmp_path: Path) -> None:
    # gate noise draws from the RNG every step: resume must restore it
    args = ("train.epochs=2", "train.eval_every=7")
    train(parquet_cache, tmp_path / "a", "mmoe", *args)
    sets = [x for s in (*SMALL, *args) for x in ("--set", s)]
    cfg = str(REPO / "cfgs" / "parquet_mmoe.yaml")
    cli("train", "--cfg", cfg, "--shards", str(parquet_cache), "--runs", str(tmp_path / "b"), "-q", *sets,
        "--set", "train.stop_after_steps=10")
    cli("train", "--cfg", cfg, "--shards", str(parquet_cache), "--runs", str(tmp_path / "b"), "-q", *sets,
        "--resume")
    a, b = (tmp_path / r / "parquet_mmoe" / "ckpt_last.pt" for r in "ab")
    assert_equal_weights(weights(a), weights(b))
    # gate usage is logged as an uninterrupted run logs it: no extra block at the stop, the same means after
    diag_a, diag_b = ((tmp_path / r / "parquet_mmoe" / "diagnostics.csv").read_text() for r in "ab")
    assert diag_a == diag_b and "gate" in diag_a


def test_gradient_diagnostics_compare_heads(parquet_cache: Path, tmp_path: Path) -> None:
    train(parquet_cache, tmp_path, "shared_bottom", "train.grad_diagnostics_every=3", "train.max_steps=12")
    rows = list(csv.DictReader((tmp_path / "parquet_shared_bottom" / "diagnostics.csv").open()))
    got = {r["name"]: float(r["value"]) for r in rows}
    assert got["train/grad_norm.clicked"] > 0 and got["train/grad_norm.converted"] > 0
    assert -1.0 <= got["train/grad_cos.clicked.converted"] <= 1.0


def test_a_head_with_one_class_in_validation_is_named(parquet_cache: Path, tmp_path: Path) -> None:
    """clicked given converted is always 1 (a conversion follows a click): its AUC is undefined. The run says
    which head, how many rows and the fix, and records it, instead of a bare NaN in the metrics."""
    m = train(parquet_cache, tmp_path, "mmoe", "train.epochs=1", "train.tasks.clicked.mask=converted",
              "train.early_stopping.metric=logloss")
    note = next(n for n in m["notes"] if "one class" in n)
    assert "head 'clicked'" in note and "all positive" in note and "under its mask" in note
    assert "metric_weight=0" in note and m["val"]["auc.clicked"] is None          # NaN in JSON
    # (a helper's sweep) no number of validation rows gives it both: the mask is what to look at
    assert "more validation rows" not in note and "check train.tasks.clicked.mask" in note
    assert not any("head 'converted'" in n for n in m["notes"])


def test_a_masked_head_starts_at_the_rate_of_its_rows(parquet_cache: Path) -> None:
    """A conversion head trained on clicked rows started at the conversion rate over every row (0.04 where its
    rows hold 0.19), so short runs predicted far too low on the rows it is scored on."""
    from ctrpipe.models.layers.experts import TaskTowers
    from ctrpipe.shard.manifest import read_manifest
    from ctrpipe.train.checkpoint import build_initial_model
    from ctrpipe.train.fit import masked_spec
    from ctrpipe.train.objective import Task

    spec = read_manifest(parquet_cache).feature_spec()
    assert spec.labels == ("clicked", "converted")
    click, conv = spec.label_rates
    tasks = (Task("clicked", (0,), None, 1.0, 1.0, 1.0), Task("converted", (1,), 0, 1.0, 1.0, 1.0))
    got = masked_spec(spec, tasks)
    assert got.label_rates == (click, conv / click)
    assert masked_spec(spec, (tasks[0], Task("converted", (1,), None, 1.0, 1.0, 1.0))) is spec
    model = build_initial_model({"model": {"name": "mmoe", "embedding_dim": 4, "hidden_units": [8],
                                           "tower_units": [4]}}, got, seed=0)
    towers = next(m for m in model.modules() if isinstance(m, TaskTowers))
    assert float(towers.outputs[1].bias) == pytest.approx(np.log(conv / click / (1 - conv / click)), abs=1e-6)
    assert float(towers.outputs[0].bias) == pytest.approx(np.log(click / (1 - click)), abs=1e-6)
    # heads that shadow them (DARE's <label>_full) follow: the label heads still set the masked rates
    shadows = (Task("clicked_full", (0,), None, 0.3, 1.0, 0.0), Task("converted_full", (1,), 0, 0.3, 1.0, 0.0))
    assert masked_spec(spec, (*tasks, *shadows)).label_rates == (click, conv / click)


def test_resume_refuses_a_change_to_what_a_head_is_scored_on(parquet_cache: Path, tmp_path: Path) -> None:
    """The best value so far mixes the heads' metrics by their weights, over the rows their masks keep: a
    resume with another weight or mask compared against a number of another metric (diff review)."""
    sets = [x for s in (*SMALL, "train.stop_after_steps=3") for x in ("--set", s)]
    cfg = str(REPO / "cfgs" / "parquet_mmoe.yaml")
    base = ["train", "--cfg", cfg, "--shards", str(parquet_cache), "--runs", str(tmp_path), "-q", *sets]
    cli(*base)
    for change in ("train.tasks.clicked.metric_weight=3", "train.tasks.converted.mask="):
        res = runner.invoke(app, [*base, "--resume", "--set", change])
        assert res.exit_code == 1 and f"cannot resume with changed {change.split('=')[0]}" in res.output, res.output


def test_resume_refuses_a_changed_head_setting_with_derived_labels(tmp_path: Path) -> None:
    """Labels derived from a column are labels too: a run with two of them resumed with another metric weight
    (its count looked at data.labels alone, empty there)."""
    from ctrpipe.config import load_config, to_dict
    from ctrpipe.errors import CheckpointError
    from ctrpipe.train.fit import refuse_resume_changes

    derived = "data.derived_labels=[{name: a, column: y, positive: [1]}, {name: b, column: z, positive: [1]}]"
    was = load_config(None, ["model.name=mmoe", "data.format=csv", "data.labels=[]", derived])
    now = load_config(None, ["model.name=mmoe", "data.format=csv", "data.labels=[]", derived,
                             "train.tasks.a.metric_weight=3"])
    with pytest.raises(CheckpointError, match="cannot resume with changed train.tasks.a.metric_weight"):
        refuse_resume_changes(to_dict(was), now, tmp_path / "config.json")


def test_esmm_is_not_told_to_train_a_head_per_cache_label(parquet_cache: Path, tmp_path: Path) -> None:
    """(a helper's sweep) a cache with a label ESMM does not read got the warning that the model trains a head
    for each of the cache's labels, whose fix (train.tasks.<label>.weight=0) ESMM then refused: its heads are
    ctr, ctcvr and cvr. A model with a head per label is still warned."""
    for model, warned in (("esmm", False), ("mmoe", True)):
        res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / f"parquet_{model}.yaml"), "--shards",
                                  str(parquet_cache), "--runs", str(tmp_path / model), "-q",
                                  *[x for s in (*SMALL, "train.max_steps=1", "data.labels=[clicked]")
                                    for x in ("--set", s)]])
        said = " ".join(res.output.split())
        assert res.exit_code == 0 and ("trains a head for each of the cache's labels" in said) is warned, said


@pytest.fixture(scope="module")
def post_view_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic log with conversions that follow no click (post-view): converted set on a tenth of the
    unclicked rows, so the labels do not nest."""
    import polars as pl

    root = tmp_path_factory.mktemp("postview")
    cli("synth", "--format", "parquet", "--rows", "3000", "--seed", "2", "--out", str(root / "data"), "-q")
    df = pl.read_parquet(root / "data" / "train.parquet")
    view = (pl.col("clicked") == 0) & (pl.int_range(pl.len()) % 10 == 0)
    df.with_columns(pl.when(view).then(1).otherwise(pl.col("converted")).cast(df["converted"].dtype)
                    .alias("converted")).write_parquet(root / "train.parquet")
    cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input", str(root / "train.parquet"),
        "--out", str(root / "shards"), "-q", "--set", "data.hash_bins=1000", "--set", "data.folds.n_splits=0")
    return root / "shards"


def test_masked_heads_start_at_their_rows_rate_when_the_labels_do_not_nest(post_view_cache: Path) -> None:
    """rate(conversion | click) was rate(conversion) / rate(click), exact only when every conversion follows a
    click: with post-view conversions ESMM's cvr head and a masked conversion head started far off (above 1
    for a conversion rate above the click rate). The manifest records each pair's rate of both positive, and
    the heads start from it."""
    from ctrpipe.data.splits import SPLIT_CODES
    from ctrpipe.models.heads import Head, head_rate, joint_rate, positives_outside_mask
    from ctrpipe.shard.manifest import read_manifest

    m = read_manifest(post_view_cache)
    labels = np.concatenate([np.load(post_view_cache / s.files["labels"].file) for s in m.shards])
    split = np.concatenate([np.load(post_view_cache / s.files["split"].file) for s in m.shards])
    y = labels[split == SPLIT_CODES["train"]].astype(np.float64)
    click, conv, both = y[:, 0].mean(), y[:, 1].mean(), (y[:, 0] * y[:, 1]).mean()
    assert both < 0.8 * conv                  # the labels do not nest
    recorded = m.label_pair_rates["clicked"]["converted"]
    assert recorded["train"] == pytest.approx(both, rel=1e-6) and set(recorded) == {"train", "val"}
    spec = m.feature_spec()
    assert head_rate(spec, Head("cvr", ("converted",), mask="clicked")) == pytest.approx(both / click, rel=1e-5)
    assert joint_rate(spec, ("clicked", "converted")) == pytest.approx(both, rel=1e-6)
    assert positives_outside_mask(spec, "converted", "clicked") == pytest.approx((conv - both) / conv, rel=1e-5)
    assert positives_outside_mask(spec, "clicked", "clicked") == 0.0


@pytest.mark.parametrize("model,sets,said", [
    ("esmm", (), ["head 'cvr' learns 'converted' on the rows where 'clicked' is 1", "nor does head 'ctcvr' (their AND)",
                  "train a head per label instead (e.g. model mmoe)"]),
    ("mmoe", (), ["head 'converted' learns 'converted' on the rows where 'clicked' is 1",
                  "drop the mask (train.tasks.converted.mask)"]),
    # (a reread) DARE's converted_full shadows converted, with its mask: said once, not per head
    ("dare", ("data.labels=[clicked, converted]", "model.aux_loss_weight=0.5", "train.tasks.converted.mask=clicked",
              "train.early_stopping.metric=auc.clicked"),
     ["head 'converted' learns 'converted' on the rows where 'clicked' is 1", "drop the mask"]),
])
def test_positives_outside_a_heads_mask_are_warned_of(post_view_cache: Path, tmp_path: Path, model: str,
                                                      sets: tuple[str, ...], said: list[str]) -> None:
    """A masked head never sees its label's positives outside the mask, which were dropped without a word."""
    res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / f"parquet_{model}.yaml"), "--shards",
                              str(post_view_cache), "--runs", str(tmp_path), "-q",
                              *[x for s in (*SMALL, "train.max_steps=1", *sets) for x in ("--set", s)]])
    out = " ".join(res.output.split())
    assert res.exit_code == 0, out
    assert "of the train split's 'converted' positives are on rows where 'clicked' is 0: it never sees them" in out
    assert all(s in out for s in said), out
    assert "swapped" not in out and out.count("it never sees them") == 1, out


def test_swapped_esmm_labels_are_warned_of_and_nested_ones_are_not(parquet_cache: Path, tmp_path: Path) -> None:
    """ESMM told its click label is `converted`: its cvr head learns clicks on converted rows, and most clicks
    are outside them. The labels as they are nest (no word)."""
    for swapped in (False, True):
        sets = ("model.click_label=converted", "model.conversion_label=clicked") if swapped else ()
        res = runner.invoke(app, ["train", "--cfg", str(REPO / "cfgs" / "parquet_esmm.yaml"), "--shards",
                                  str(parquet_cache), "--runs", str(tmp_path / str(swapped)), "-q",
                                  *[x for s in (*SMALL, "train.max_steps=1", *sets) for x in ("--set", s)]])
        out = " ".join(res.output.split())
        assert res.exit_code == 0, out
        assert ("it never sees them" in out) is swapped, out
        assert ("'clicked' is more frequent than 'converted': check that the labels are not swapped "
                "(the model's label settings, e.g. model.click_label / model.conversion_label)" in out) is swapped, out
