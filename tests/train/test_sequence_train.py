"""The history readers end to end on real Parquet shards (shared id space, sequences, co-visitation): train
with the shipped configs, the training loss falls, resume equals an uninterrupted run, and infer reproduces
the val metrics training reported; the co-visitation columns are numeric inputs of dare_qnn."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli, sets
from train_setup import FAST, REPO
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.config import load_config
from ctrpipe.errors import ManifestMismatchError
from ctrpipe.infer.predict import run_infer
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.models.heads import as_output
from ctrpipe.models.registry import build_model
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.train.checkpoint import build_initial_model, load_checkpoint
from ctrpipe.train.evaluate import predict
from ctrpipe.train.tables import load_packed

CONFIGS = {"din": "parquet_din.yaml", "dare": "parquet_dare.yaml", "dare_qnn": "dare_qnn.yaml"}
SMALL = [*FAST, "model.embedding_dim=8", "loader.batch_size=32", "data.folds.n_splits=0"]
MODEL_KEYS = {"din": ["model.hidden_units=[16]"],
              "dare": ["model.hidden_units=[16]", "model.attention_dim=4", "model.sequence.top_k=5",
                       "model.aux_loss_weight=0.2"],
              "dare_qnn": ["model.attention_dim=4", "model.sequence.top_k=5", "model.qnn_alpha.feature_embed_dim=8",
                           "model.qnn_alpha.mlp_hidden=[16]", "model.sequence.transformer_block=true",
                           "model.sequence.tfm.n_heads=2"]}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq")
    run_cli("synth", "--format", "parquet", "--rows", "800", "--out", str(root / "synth"), "-q")
    src = root / "synth" / "train.parquet"
    out = {}
    # one data config for all three (they extend parquet_example.yaml with the same data section)
    cache = root / "cache"
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_din.yaml"), "--input", str(src), "--out", str(cache),
            "-q", *sets(["data.folds.n_splits=0", "data.shard_rows=256", "data.categorical.min_count=1"]))
    for name in CONFIGS:
        out[name] = cache
    return out


def overrides(name: str, *extra: str) -> list[str]:
    """FAST settings, less the MLP width for dare_qnn (its MLP is model.qnn_alpha.mlp_hidden)."""
    small = [k for k in SMALL if not (name == "dare_qnn" and k.startswith("model.hidden_units"))]
    return [*small, *MODEL_KEYS[name], *extra]


def keys(name: str, *extra: str) -> list[str]:
    return sets(overrides(name, *extra))


def train(cache: Path, runs: Path, name: str, *extra: str) -> Path:
    run_cli("train", "--cfg", str(REPO / "cfgs" / CONFIGS[name]), "--shards", str(cache), "--runs", str(runs),
            "-q", *keys(name, *extra))
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def epoch_losses(run: Path) -> dict[int, float]:
    """Mean logged training loss per epoch (train.log_every=1: a row per step, tagged with its epoch)."""
    per: dict[int, list[float]] = {}
    for row in csv.DictReader((run / "train_log.csv").open()):
        if row["loss"]:
            per.setdefault(int(row["epoch"]), []).append(float(row["loss"]))
    return {e: sum(v) / len(v) for e, v in per.items()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    load_packed(model, ckpt.weights)
    return model.state_dict()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trains_resumes_and_infers(name: str, caches: dict[str, Path], tmp_path: Path) -> None:
    cache = caches[name]
    args = ("train.epochs=3", "train.eval_every=6", "train.lr=0.01", "train.log_every=1")
    a = train(cache, tmp_path / "a", name, *args)
    metrics = json.loads((a / "metrics.json").read_text())
    assert math.isfinite(metrics["val"]["logloss"])
    # every epoch's steps cover the training rows once: the last epoch's mean loss is well below the first's
    # (~0.56 -> 0.40 din, 0.67 -> 0.59 dare, 0.57 -> 0.29 dare_qnn; a model that does not learn keeps ~1.0x)
    by_epoch = epoch_losses(a)
    assert sorted(by_epoch) == [0, 1, 2] and all(math.isfinite(v) for v in by_epoch.values()), by_epoch
    assert by_epoch[2] < 0.95 * by_epoch[0], by_epoch
    run_cli("train", "--cfg", str(REPO / "cfgs" / CONFIGS[name]), "--shards", str(cache), "--runs",
            str(tmp_path / "b"), "-q", *keys(name, *args, "train.stop_after_steps=9"))
    run_cli("train", "--cfg", str(REPO / "cfgs" / CONFIGS[name]), "--shards", str(cache), "--runs",
            str(tmp_path / "b"), "-q", "--resume", *keys(name, *args))
    b = tmp_path / "b" / a.name
    wa, wb = weights(a / "ckpt_last.pt"), weights(b / "ckpt_last.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    rep = run_infer(a, cache, tmp_path / "val.csv", ["infer.view=val", "infer.calibration.method=none"], quiet=True)
    assert rep.metrics is not None
    for key in ("auc", "logloss"):
        assert rep.metrics[key] == pytest.approx(metrics["val"][key], rel=1e-5, abs=1e-6), key


def test_covisit_columns_are_numeric_inputs_of_dare_qnn(caches: dict[str, Path]) -> None:
    """data.covisit (parquet_example.yaml: inventory_id against the history seq) gives numeric columns;
    dare_qnn tokenizes every numeric column as a field, so its output moves with the co-visitation values."""
    cache = caches["dare_qnn"]
    manifest = read_manifest(cache)
    spec = manifest.feature_spec()
    covisit = [c.name for c in manifest.columns_of("covisit")]
    assert covisit and set(covisit) <= set(spec.numeric), (covisit, spec.numeric)
    cfg = load_config(REPO / "cfgs" / CONFIGS["dare_qnn"], overrides("dare_qnn"))
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.params, spec).eval()
    assert model.numeric is not None and model.numeric.n_columns == spec.n_numeric
    batch = next(iter(ShardLoader(cache, RowView.val(), 64, shuffle=False, seed=0)))
    cols = [spec.numeric.index(n) for n in covisit]
    values = batch.numeric[:, cols]
    assert (values.std(dim=0) > 0).all(), values                          # real, varying co-visitation values
    changed = batch.numeric.clone()
    changed[:, cols] = values + 1.0
    with torch.no_grad():
        base = as_output(model(batch)).logits
        again = as_output(model(batch)).logits
        moved = as_output(model(dataclasses.replace(batch, numeric=changed))).logits
    assert torch.equal(base, again)                                        # eval: one deterministic pass
    assert ((moved - base).abs() > 1e-6).all(), (moved - base).abs().min()   # every row's output moves


def _edited_copy(cache: Path, out: Path, group: str, split: int, edit: Callable[[np.ndarray, int], None]) -> int:
    """A copy of `cache` whose `group` array of shard 1 is changed by `edit(array, row)` at its first row of
    split `split` (as a hand edit would, after the build); returns that row within the shard."""
    shutil.copytree(cache, out)
    shard = out / read_manifest(out).shards[1].files[group].file
    row = int(np.flatnonzero(np.load(shard.parent / "split.npy") == split)[0])
    arr = np.load(shard, mmap_mode="r+")
    edit(arr, row)
    arr.flush()
    return row


def _train_error(cache: Path, runs: Path) -> str:
    res = CliRunner().invoke(app, ["train", "--cfg", str(REPO / "cfgs" / CONFIGS["din"]), "--shards", str(cache),
                                   "--runs", str(runs), "-q", *keys("din", "train.epochs=1")])
    assert res.exit_code == 1, res.output + repr(res.exception)
    assert "Traceback" not in res.output
    return " ".join(res.output.split())


@pytest.mark.parametrize("group", ["categorical", "seq.tokens"])
def test_an_id_beyond_its_table_is_named_not_a_bare_index_error(group: str, caches: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """A cache edited after its build (ids beyond a field's table): training stops with the shard file, row and
    column of the id, not torch's bare 'index out of range in self'."""
    def beyond(arr: np.ndarray, row: int) -> None:
        arr[row, 2 if group == "categorical" else 0] = 10_000_000

    cache = tmp_path / "cache"
    row = _edited_copy(caches["din"], cache, group, 0, beyond)
    out = _train_error(cache, tmp_path / "runs")
    column = read_manifest(cache).columns_of("categorical")[2].name if group == "categorical" else "seq"
    assert f"shard_00001/{group}.npy, row {row}, column {column}:" in out, out
    assert "holds id 10000000" in out and "ctrpipe inspect" in out, out


def test_an_id_beyond_its_table_in_evaluation_is_named(caches: dict[str, Path], tmp_path: Path) -> None:
    """The same in `predict` (evaluation and infer), on a val row."""
    cache = tmp_path / "cache"
    row = _edited_copy(caches["din"], cache, "seq.tokens", 1, lambda arr, r: arr.__setitem__((r, 0), 10_000_000))
    cfg = load_config(REPO / "cfgs" / CONFIGS["din"], overrides("din"))
    spec = read_manifest(cache).feature_spec()
    model = build_model(cfg.model.name, cfg.model.params, spec)
    loader = ShardLoader(cache, RowView.val(), 64, shuffle=False, seed=0)
    with pytest.raises(ManifestMismatchError, match=f"shard_00001/seq.tokens.npy, row {row}, column seq"):
        predict(model, loader, loader.num_rows, spec.n_tasks, torch.device("cpu"), "off")


@pytest.mark.parametrize("value", [2.0, float("nan")])
def test_a_label_that_is_not_0_or_1_stops_training(value: float, caches: dict[str, Path], tmp_path: Path) -> None:
    """Binary cross-entropy takes a label of 2 without complaint: a cache edited after its build would train
    silently on it. The loader checks every batch's labels."""
    cache = tmp_path / "cache"
    row = _edited_copy(caches["din"], cache, "labels", 0, lambda arr, r: arr.__setitem__((r, -1), value))
    out = _train_error(cache, tmp_path / "runs")
    name = read_manifest(cache).columns_of("label")[-1].name
    assert f"shard_00001/labels.npy, row {row}, column {name}: label '{name}' is {value}, not 0 or 1" in out, out


def test_predict_runs_without_autograd(caches: dict[str, Path]) -> None:
    """predict is @torch.no_grad: evaluation and infer keep no graph (a helper inserted above it once took the
    decorator away)."""
    cfg = load_config(REPO / "cfgs" / CONFIGS["din"], overrides("din"))
    spec = read_manifest(caches["din"]).feature_spec()
    model = build_model(cfg.model.name, cfg.model.params, spec)
    seen: list[bool] = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    loader = ShardLoader(caches["din"], RowView.val(), 64, shuffle=False, seed=0)
    predict(model, loader, loader.num_rows, spec.n_tasks, torch.device("cpu"), "off")
    assert seen and not any(seen), seen


def test_a_config_naming_fewer_labels_than_its_cache_is_warned_of(caches: dict[str, Path], tmp_path: Path) -> None:
    """A helper's sweep: parquet_din.yaml (labels [clicked]) trained on a cache sharded with parquet_example.yaml
    (clicked, converted) trained both heads and ranked by their mean metrics, with a note hidden by -q. A
    warning says so and how to train the config's labels only (which then gives clicked's own metrics)."""
    src = caches["din"].parent / "synth" / "train.parquet"
    both = tmp_path / "both"
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input", str(src), "--out", str(both),
            "-q", *sets(["data.folds.n_splits=0", "data.shard_rows=256", "data.categorical.min_count=1"]))
    args = ["train", "--cfg", str(REPO / "cfgs" / "parquet_din.yaml"), "--shards", str(both), "-q",
            *keys("din", "train.max_steps=3")]
    res = CliRunner().invoke(app, [*args, "--runs", str(tmp_path / "r1")])
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "warning: the cache holds the labels ['clicked', 'converted']" in text, text
    fix = text.split("or add ", 1)[1].split()
    res = CliRunner().invoke(app, [*args, "--runs", str(tmp_path / "r2"), *fix[:4]])
    assert res.exit_code == 0 and "cache holds the labels" not in res.output, res.output     # the fix silences it


def test_a_model_that_predicts_one_value_for_every_row_is_warned_of(caches: dict[str, Path], tmp_path: Path) -> None:
    """(helper's sequence sweep) six quadratic layers without residuals or normalisation underflow to one
    prediction for every row (val AUC 0.5), and the run trained, calibrated and reported as if it had worked.
    The summary warns, and metrics.json keeps the note; a model that ranks says nothing of it."""
    collapse = ["model.qnn_alpha.num_layers=6", "model.qnn_alpha.norm=none", "model.qnn_alpha.use_residual=false"]
    res = CliRunner().invoke(app, ["train", "--cfg", str(REPO / "cfgs" / "dare_qnn.yaml"), "--shards",
                                   str(caches["dare_qnn"]), "--runs", str(tmp_path / "dead"), "-q",
                                   *keys("dare_qnn", *collapse)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "head 'clicked' gives all" in said and "the same prediction" in said and "train.lr" in said, said
    (run,) = (tmp_path / "dead").iterdir()
    z = np.load(run / "val_predictions.npz")["logits"]
    assert np.unique(z).size == 1
    assert any("the same prediction" in n for n in json.loads((run / "metrics.json").read_text())["notes"])
    res = CliRunner().invoke(app, ["train", "--cfg", str(REPO / "cfgs" / "dare_qnn.yaml"), "--shards",
                                   str(caches["dare_qnn"]), "--runs", str(tmp_path / "live"), "-q",
                                   *keys("dare_qnn")])
    assert res.exit_code == 0 and "the same prediction" not in " ".join(res.output.split()), res.output


def test_a_history_empty_in_every_row_is_warned_of_at_train(caches: dict[str, Path], tmp_path: Path) -> None:
    """(helper's sequence sweep) shard and inspect warn of a history column that came out empty everywhere,
    but DIN trained on such a cache, built by someone else, without a word; so did ESMM over a DIN backbone
    (a review: the check looked at the top model only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(caches["din"].parent / "synth" / "train.parquet")
    src = tmp_path / "empty.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("seq"), "seq", pa.nulls(len(table), pa.string())),
                   src)
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_din.yaml"), "--input", str(src), "--out",
            str(tmp_path / "cache"), "-q", *sets(["data.folds.n_splits=0", "data.categorical.min_count=1",
                                                  "data.labels=[clicked, converted]"]))
    esmm = [*FAST, "train.max_steps=2", "model={}", "model.name=esmm", "model.backbone=din",
            "model.backbone_params={hidden_units: [16], embedding_dim: 8}", "data.labels=[clicked, converted]"]
    for name, cache, warned, extra in (("din", tmp_path / "cache", True, overrides("din", "train.max_steps=2")),
                                       ("fine", caches["din"], False, overrides("din", "train.max_steps=2")),
                                       ("esmm", tmp_path / "cache", True, esmm)):
        res = CliRunner().invoke(app, ["train", "--cfg", str(REPO / "cfgs" / "parquet_din.yaml"), "--shards",
                                       str(cache), "--runs", str(tmp_path / name), "-q", *sets(extra)])
        said = " ".join(res.output.split())
        assert res.exit_code == 0 and ("the history 'seq' is empty in every row" in said) is warned, (name, said)
