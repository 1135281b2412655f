"""Real runs for the report tests, built once per session through the CLI: three single-task models and a
2-fold K-fold run on one tiny Criteo cache, an MMoE run (gate usage) on a tiny Parquet cache, and the report
of all five."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import sets as _sets
from report_setup import Runs
from typer.testing import CliRunner

from ctrpipe.cli import app

REPO = Path(__file__).resolve().parents[2]
# small and fast; two evaluations per epoch so the validation curves have points
FAST = ["loader.batch_size=64", "loader.eval_batch_size=256", "model.hidden_units=[16]", "model.embedding_dim=4",
        "train.log_every=3", "infer.calibration.method=none", "train.min_steps=0", "train.evals_per_epoch=2",
        "train.early_stopping.patience=0", "train.epochs=2"]
CRITEO_MODELS = ("dnn", "deepfm", "dcnv2")


def cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("report")
    cli("synth", "--format", "criteo", "--rows", "600", "--test-rows", "200", "--seed", "0", "--out",
        str(root / "criteo"), "-q")
    cache = root / "shards" / "criteo"
    cli("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(root / "criteo" / "train.tsv"),
        "--gold", str(root / "criteo" / "test.tsv"), "--out", str(cache), "-q",
        *_sets(["data.shard_rows=256", "data.split.val_ratio=0.2", "data.hash_bins=64", "data.folds.n_splits=2"]))
    out = root / "runs"
    for m in CRITEO_MODELS:
        cli("train", "--cfg", str(REPO / "cfgs" / f"criteo_{m}.yaml"), "--shards", str(cache), "--runs", str(out),
            "-q", *_sets(FAST))
    cli("train", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(cache), "--runs", str(out),
        "-q", "--kfold", "2", *_sets([*FAST, "exp_name=criteo_dnn_cv"]))

    cli("synth", "--format", "parquet", "--rows", "1500", "--test-rows", "300", "--seed", "1", "--out",
        str(root / "parquet"), "-q")
    pcache = root / "shards" / "parquet"
    cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
        str(root / "parquet" / "train.parquet"), "--gold", str(root / "parquet" / "test.parquet"), "--out",
        str(pcache), "-q", *_sets(["data.hash_bins=1000", "data.folds.n_splits=0"]))
    cli("train", "--cfg", str(REPO / "cfgs" / "parquet_mmoe.yaml"), "--shards", str(pcache), "--runs", str(out),
        "-q", *_sets(["loader.batch_size=128", "loader.eval_batch_size=512", "train.log_every=2",
                      "infer.calibration.method=none", "train.epochs=2", "train.evals_per_epoch=2",
                      "model.hidden_units=[32]"]))
    return Runs(root, tuple(out / f"criteo_{m}" for m in CRITEO_MODELS), out / "criteo_dnn_cv", out / "parquet_mmoe")


@pytest.fixture(scope="session")
def full_report(runs: Runs) -> tuple[Path, str]:
    """(the report folder, the command's output) of `ctrpipe report` over every run; tests only read it."""
    out = runs.root / "report"
    text = cli("report", *map(str, runs.criteo), str(runs.kfold), str(runs.mmoe), "--out", str(out))
    return out, text
