"""`ctrpipe export --format torchscript`: the traced module (dynamic batch size) gives ctrpipe's calibrated,
fold-combined probabilities to 1e-5 on real shard rows, for every model family; model.json lists the inputs.

Two shared caches: synthetic Criteo text (single-label families) and synthetic Parquet with two labels,
sequences, multi-hot and co-visitation (multi-task families). Tiny models, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli as _cli
from cli_helpers import sets as _sets

REPO = Path(__file__).resolve().parents[2]
FAST = ["loader.batch_size=64", "loader.eval_batch_size=128", "train.log_every=5",
        "train.min_steps=0", "train.evals_per_epoch=1", "train.early_stopping.patience=0", "train.epochs=1",
        "train.max_steps=4", "train.device=cpu", "infer.calibration.method=temperature"]
CRITEO_DATA = ["data.hash_bins=200", "data.shard_rows=500", "data.split.val_ratio=0.2"]
PARQUET_DATA = ["data.hash_bins=1000", "data.shard_rows=500", "data.folds.n_splits=0"]
MLP = ["model.embedding_dim=4", "model.hidden_units=[16]"]
# family -> (cache, config, extra --set values)
FAMILIES: dict[str, tuple[str, str, list[str]]] = {
    "dnn": ("criteo", "criteo_dnn", MLP),
    "deepfm": ("criteo", "criteo_deepfm", MLP),
    "dcn": ("criteo", "criteo_dcn", MLP),
    "dcnv2_full": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=full"]),
    "dcnv2_lowrank": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=lowrank", "model.low_rank=4",
                                                 "model.structure=stacked"]),
    "dcnv2_mixture": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=mixture", "model.low_rank=4"]),
    "autoint": ("criteo", "criteo_autoint", [*MLP, "model.attention_layers=1", "model.attention_dim=8"]),
    "ft_transformer": ("criteo", "criteo_ft_transformer", ["model.n_blocks=1", "model.n_heads=2",
                                                           "model.embedding_dim=8"]),
    "shared_bottom": ("parquet", "parquet_shared_bottom", [*MLP, "model.tower_units=[8]"]),
    "mmoe": ("parquet", "parquet_mmoe", [*MLP, "model.tower_units=[8]", "model.n_experts=2"]),
    "ple": ("parquet", "parquet_ple", [*MLP, "model.tower_units=[8]"]),
    "esmm": ("parquet", "parquet_esmm", ["model.backbone_params.embedding_dim=4",
                                         "model.backbone_params.hidden_units=[16]",
                                         "model.backbone_params.tower_units=[8]"]),
    "deepfm_mmoe": ("parquet", "parquet_deepfm_mmoe", [*MLP, "model.composer_width=8", "model.adapter_units=[8]",
                                                       "model.n_experts=2", "model.expert_units=[8]",
                                                       "model.tower_units=[8]"]),
    "qnn_alpha": ("criteo", "criteo_qnn_alpha", ["model.embedding_dim=4", "model.num_layers=1"]),
    "din": ("parquet", "parquet_din", [*MLP, "data.labels=[clicked,converted]"]),
    "dare": ("parquet", "parquet_dare", [*MLP, "data.labels=[clicked,converted]", "model.attention_dim=4",
                                         "model.sequence.search=soft", "model.aux_loss_weight=0.2"]),
    "dare_qnn": ("parquet", "dare_qnn", ["model.embedding_dim=4", "data.labels=[clicked,converted]",
                                        "model.attention_dim=4", "model.qnn_alpha.feature_embed_dim=4",
                                        "model.qnn_alpha.mlp_hidden=[8]", "model.sequence.transformer_block=true"]),
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("serve_export")
    _cli("synth", "--format", "criteo", "--rows", "1000", "--out", str(root / "d"), "-q")
    _cli("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(root / "d" / "train.tsv"),
         "--out", str(root / "criteo"), "-q", *_sets(CRITEO_DATA + ["data.folds.n_splits=2"]))
    _cli("synth", "--format", "parquet", "--rows", "1000", "--seed", "1", "--out", str(root / "p"), "-q")
    _cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
         str(root / "p" / "train.parquet"), "--out", str(root / "parquet"), "-q", *_sets(PARQUET_DATA))
    return {"criteo": (root / "criteo", CRITEO_DATA), "parquet": (root / "parquet", PARQUET_DATA)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchscript_parity(caches: dict[str, tuple[Path, list[str]]], family: str, tmp_path: Path) -> None:
    from ctrpipe.serve.export import cache_batch, example_inputs
    from ctrpipe.serve.predictor import Predictor

    kind, cfg, extra = FAMILIES[family]
    cache, data = caches[kind]
    runs = tmp_path / "runs"
    kfold = ["--kfold", "2"] if family == "dnn" else []      # fold ensembling once
    _cli("train", "--cfg", str(REPO / "cfgs" / f"{cfg}.yaml"), "--shards", str(cache), "--runs", str(runs),
         "-q", *kfold, *_sets(data + FAST + extra + [f"exp_name={family}"]))
    out = tmp_path / "export"
    _cli("export", "--run", str(runs / family), "--format", "torchscript", "--out", str(out))
    doc = json.loads((out / "model.json").read_text())
    groups = [i["group"] for i in doc["inputs"]]
    if kind == "criteo":
        assert groups == ["numeric", "categorical"]
    else:
        assert groups[:2] == ["numeric", "categorical"] and len(groups) > 2     # multi-hot, sequence inputs
    assert all(i["shape"][0] == "B" for i in doc["inputs"])
    tables = doc["embedding_tables"]
    assert tables["tables"] and tables["total_bytes"] == sum(t["bytes"] for t in tables["tables"])
    assert all(0 < t["rows_touched_by_training"] <= t["rows"] and t["bytes"] == t["rows"] * t["dim"] * 4
               for t in tables["tables"])
    model = torch.jit.load(str(out / "model.pt"))
    p = Predictor.load(runs / family)
    assert doc["outputs"]["heads"] == list(p.heads)
    for n in (1, 37, 300):           # traced on 8 rows: the batch dimension is dynamic
        batch = cache_batch(p, n)
        want = p.probabilities(p.batch_logits(batch), p.heads)
        with torch.no_grad():
            got = model(example_inputs(p, batch)).numpy()
        assert got.shape == (n, len(p.heads))
        for j, head in enumerate(p.heads):
            np.testing.assert_allclose(got[:, j], want[head], rtol=0, atol=1e-5, err_msg=f"{family} {head}")
