"""Every registered model: output shape for one and two tasks, finite loss, learning on a tiny batch,
prior bias, sparse embedding gradients."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ctrpipe.config import build_model_section
from ctrpipe.features import FeatureSpec
from ctrpipe.models.heads import as_output
from ctrpipe.models.layers.embedding import split_parameters
from ctrpipe.models.registry import build_model, label_range, model_names, required_features

# single-task models (one logit per label on one trunk); the multi-task ones: tests/models/test_multitask.py
SINGLE = [name for name in model_names() if label_range(name)[0] == 1]

SMALL = {"embedding_dim": 8}
SMALL_MLP = {**SMALL, "hidden_units": [32, 16], "dropout": 0.0}

# (model name, model.* keys); every registered model appears at least once (checked below)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("dnn", SMALL_MLP),
    ("dnn", {**SMALL_MLP, "embedding_mode": "per_field"}),
    ("dnn", {**SMALL_MLP, "field_dims": {"C1": 4, "tags": 6}}),
    ("dnn", {**SMALL_MLP, "numeric": "token", "batch_norm": True, "activation": "gelu", "dropout": 0.1}),
    ("dnn", {**SMALL_MLP, "multihot_pooling": "sum", "activation": "silu"}),
    ("deepfm", SMALL_MLP),
    ("deepfm", {**SMALL_MLP, "embedding_mode": "per_field", "numeric": "concat"}),
    ("deepfm", {**SMALL, "hidden_units": []}),
    ("dcn", {**SMALL_MLP, "structure": "parallel"}),
    ("dcn", {**SMALL_MLP, "structure": "stacked", "field_dims": {"C2": 3}}),
    ("dcn", {**SMALL, "hidden_units": []}),
    *[("dcnv2", {**SMALL_MLP, "cross_kind": kind, "structure": structure, "low_rank": 4, "n_experts": 3})
      for kind in ("full", "lowrank", "mixture") for structure in ("stacked", "parallel")],
    ("dcnv2", {**SMALL, "hidden_units": [], "cross_kind": "mixture", "low_rank": 4}),
    ("autoint", {**SMALL, "attention_dim": 8}),
    ("autoint", {**SMALL_MLP, "attention_dim": 8, "attention_heads": 1, "residual": False,
                 "layer_norm": False}),
    ("autoint", {**SMALL_MLP, "attention_dim": 8, "embedding_mode": "per_field"}),
    ("ft_transformer", {"embedding_dim": 8, "n_heads": 2, "n_blocks": 2, "pooling": "cls"}),
    ("ft_transformer", {"embedding_dim": 8, "n_heads": 2, "n_blocks": 2, "pooling": "mean",
                        "ffn_dropout": 0.0}),
    ("qnn_alpha", {**SMALL, "num_layers": 2, "rank": 2}),
    ("qnn_alpha", {**SMALL, "heads": 2, "norm": "layer", "use_residual": False, "activation": "gelu"}),
    ("qnn_alpha", {**SMALL, "self_ensemble": False, "dropout": 0.0, "norm": "none",
                   "embedding_mode": "per_field"}),
]
VARIANTS += [
    ("din", SMALL_MLP),
    ("din", {**SMALL_MLP, "attention_softmax": True, "keep_pooled_history": True, "attention_units": [8, 4],
             "sequence": {"column": "hist", "query_key": "item", "max_len": 3}}),
    ("dare", {**SMALL_MLP, "attention_dim": 4, "sequence": {"top_k": 3}}),
    ("dare", {**SMALL_MLP, "attention_dim": 4, "sequence": {"top_k": 2, "search": "hard", "recency_tau": 2.0,
                                                            "query_mode": "concat", "transformer_block": True,
                                                            "tfm": {"n_heads": 2, "dropout": 0.0}}}),
    ("dare", {**SMALL_MLP, "attention_dim": 4, "sequence": {"top_k": 0, "query_mode": "S2", "max_len": 4}}),
    ("dare_qnn", {**SMALL, "attention_dim": 4, "sequence": {"top_k": 3}, "qnn_alpha": {"feature_embed_dim": 8}}),
    ("dare_qnn", {**SMALL, "attention_dim": 4, "field_dims": {"C1": 4},
                  "sequence": {"top_k": 2, "query_mode": "concat", "recency_tau": 3.0},
                  "qnn_alpha": {"feature_embed_dim": 4, "proj_dim": 8, "mlp_hidden": [16], "use_se": True,
                                "heads": 2, "pair_grouping": "fields", "norm": "layer", "rank": 2}}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(VARIANTS)]


def build(spec: FeatureSpec, name: str, keys: dict[str, Any], sparse: bool = False) -> torch.nn.Module:
    section = build_model_section({"name": name, **keys})
    return build_model(section.name, section.params, spec, sparse=sparse)


def logits(model: torch.nn.Module, batch) -> torch.Tensor:
    """(B, T) logits of a model returning a tensor or a ModelOutput (QNN-α returns aux losses)."""
    return as_output(model(batch)).logits


def bce(model: torch.nn.Module, batch) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits(model, batch), batch.labels)


def test_every_single_task_model_has_a_variant() -> None:
    assert {name for name, _ in VARIANTS} == set(SINGLE)
    assert {"dnn", "deepfm", "dcn", "dcnv2", "autoint", "ft_transformer"} <= set(SINGLE)


@pytest.mark.parametrize("name", SINGLE)
@pytest.mark.parametrize("n_tasks", [1, 2])
def test_defaults_forward_shape(name: str, n_tasks: int, spec_factory, batch_factory) -> None:
    spec = spec_factory(n_tasks)
    model = build(spec, name, {})
    batch = batch_factory(spec, rows=16)
    model.eval()
    out = logits(model, batch)
    assert out.shape == (16, n_tasks) and out.dtype == torch.float32
    assert torch.isfinite(bce(model, batch))


@pytest.mark.parametrize(("name", "keys"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("n_tasks", [1, 2])
def test_variant_shape_and_learning(name: str, keys: dict[str, Any], n_tasks: int, spec_factory,
                                    batch_factory) -> None:
    torch.manual_seed(0)
    spec = spec_factory(n_tasks)
    model = build(spec, name, keys)
    batch = batch_factory(spec, rows=64)
    assert logits(model, batch).shape == (64, n_tasks)
    model.eval()
    with torch.no_grad():
        before = bce(model, batch).item()
    assert math.isfinite(before)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        bce(model, batch).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = bce(model, batch).item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", SINGLE)
def test_output_bias_starts_at_label_prior(name: str, spec_factory) -> None:
    spec = spec_factory(2)
    model = build(spec, name, {})
    expected = torch.tensor([math.log(r / (1 - r)) for r in spec.label_rates])
    torch.testing.assert_close(model.head.linear.bias.detach(), expected)


@pytest.mark.parametrize("name", SINGLE)
def test_sparse_embeddings_get_sparse_grads(name: str, spec_factory, batch_factory) -> None:
    spec = spec_factory()
    model = build(spec, name, SMALL if name != "ft_transformer" else {"embedding_dim": 8, "n_heads": 2},
                  sparse=True)
    bce(model, batch_factory(spec, rows=8)).backward()
    groups = split_parameters(model)
    assert groups.embedding, "no embedding parameters found"
    for p in groups.embedding:
        assert p.grad is not None and p.grad.is_sparse
    for p in groups.dense:
        assert p.grad is None or not p.grad.is_sparse
    # the trainer's pairing works: SparseAdam for tables, Adam for the rest
    dense = [p for p in groups.dense if p.requires_grad]
    emb_before = [p.detach().clone() for p in groups.embedding]
    dense_before = [p.detach().clone() for p in dense]
    torch.optim.SparseAdam(groups.embedding, lr=1e-2).step()
    torch.optim.Adam(dense, lr=1e-2).step()
    for p, old in zip(groups.embedding, emb_before, strict=True):
        grad = p.grad.coalesce()
        touched = torch.zeros(p.shape[0], dtype=torch.bool)
        touched[grad.indices()[0][(grad.values() != 0).flatten(1).any(1)]] = True
        assert 0 < int(touched.sum()) < p.shape[0]          # an 8-row batch reaches a few rows of a table
        changed = (p.detach() != old).flatten(1).any(1)
        assert torch.equal(changed, touched)                # exactly the batch's rows moved, the rest kept
    for p, old in zip(dense, dense_before, strict=True):
        changed = p.detach() != old
        assert not changed[p.grad == 0].any()               # no gradient (e.g. a dead ReLU): no step
        assert changed[p.grad.abs() > 1e-6].all()           # Adam's first step is ~lr * sign(grad)


@pytest.mark.parametrize("name", SINGLE)
def test_without_numeric_or_bag_fields(name: str, spec_factory, batch_factory) -> None:
    # a history reader keeps its history (and candidate): what it refuses without is tested elsewhere
    spec = spec_factory(numeric=False, multihot=False, sequence="sequence" in required_features(name))
    batch = batch_factory(spec, rows=4)
    assert batch.numeric is None
    assert logits(build(spec, name, {}), batch).shape == (4, 1)


def test_prior_clamped_for_constant_labels(spec_factory) -> None:
    spec = dataclasses.replace(spec_factory(2), label_rates=(0.0, 1.0))
    bias = build(spec, "dnn", {}).head.linear.bias.detach()
    assert torch.isfinite(bias).all() and bias[0] < -9 and bias[1] > 9


def test_weight_decay_falls_on_weight_matrices_only(spec_factory) -> None:
    """(a helper's sweep) the docs say weight decay leaves biases, norms and embeddings alone, but every dense
    parameter of 2+ dimensions was decayed: the numeric tokenizer's per-column vectors and biases (numeric:
    token, most models' default), DCN's stacked cross biases, FT-Transformer's [CLS] token."""
    from ctrpipe.train.config import TrainConfig
    from ctrpipe.train.optim import build_optimizers

    cfg = TrainConfig(weight_decay=0.1)
    for name, keys in (("dcn", {"hidden_units": [8]}), ("ft_transformer", {"n_blocks": 1, "pooling": "cls"}),
                       ("dnn", {"hidden_units": [8]})):
        model = build(spec_factory(), name, {"embedding_dim": 8, **keys})
        names = {id(p): n for n, p in model.named_parameters()}
        dense = build_optimizers(model, cfg, torch.device("cpu"))[-1]
        decayed = [names[id(p)] for g in dense.param_groups if g["weight_decay"] for p in g["params"]]
        kept = [names[id(p)] for g in dense.param_groups if not g["weight_decay"] for p in g["params"]]
        assert decayed and all(n.endswith("weight") and "tokenizer" not in n for n in decayed), (name, decayed)
        assert not any(n.endswith(("bias", "cls")) for n in decayed), (name, decayed)
        if name != "dnn":
            assert any("tokenizer.weight" in n for n in kept), (name, kept)
        if name == "ft_transformer":
            assert "cls" in kept


def test_a_resume_whose_optimiser_groups_differ_is_a_clear_error(spec_factory) -> None:
    """Moving the tokenizer's vectors out of weight decay regrouped the dense optimiser: a run saved before
    resumed into torch's bare ValueError. It is a CheckpointError with the fix."""
    from ctrpipe.errors import CheckpointError
    from ctrpipe.train.config import TrainConfig
    from ctrpipe.train.optim import build_optimizers
    from ctrpipe.train.tables import load_optimizer, pack_optimizer

    model = build(spec_factory(), "dcn", {"embedding_dim": 8, "hidden_units": [8]})
    dense = build_optimizers(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))[-1]
    packed = pack_optimizer(dense, {}, {})
    load_optimizer(dense, packed)                       # the same grouping loads
    first, second = packed["param_groups"]
    regrouped = {**packed, "param_groups": [{**first, "params": first["params"][:-1]},
                                            {**second, "params": [*second["params"], first["params"][-1]]}]}
    with pytest.raises(CheckpointError, match="groups the parameters") as err:
        load_optimizer(dense, regrouped)
    assert "without --resume" in err.value.fix
