"""The history readers end to end on real Parquet shards (shared id space, sequences, co-visitation): train
with the shipped configs, loss falls, resume equals an uninterrupted run, and infer reproduces the val
metrics training reported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli, sets
from train_setup import FAST, REPO

from ctrpipe.infer.predict import run_infer
from ctrpipe.train.checkpoint import build_initial_model, load_checkpoint
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


def keys(name: str, *extra: str) -> list[str]:
    """FAST settings, less the MLP width for dare_qnn (its MLP is model.qnn_alpha.mlp_hidden)."""
    small = [k for k in SMALL if not (name == "dare_qnn" and k.startswith("model.hidden_units"))]
    return sets([*small, *MODEL_KEYS[name], *extra])


def train(cache: Path, runs: Path, name: str, *extra: str) -> Path:
    run_cli("train", "--cfg", str(REPO / "cfgs" / CONFIGS[name]), "--shards", str(cache), "--runs", str(runs),
            "-q", *keys(name, *extra))
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    load_packed(model, ckpt.weights)
    return model.state_dict()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trains_resumes_and_infers(name: str, caches: dict[str, Path], tmp_path: Path) -> None:
    cache = caches[name]
    args = ("train.epochs=3", "train.eval_every=6")
    a = train(cache, tmp_path / "a", name, *args)
    metrics = json.loads((a / "metrics.json").read_text())
    assert math.isfinite(metrics["val"]["logloss"])
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
