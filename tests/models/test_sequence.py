"""History readers (DIN, DARE, DARE + QNN-α) against hand computations: masking, empty histories, soft and
hard top-k, the activation unit's split first layer, truncation to the most recent tokens, auxiliary heads,
and the errors a wrong sequence setting gets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from ctrpipe.config import build_model_section
from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.models.heads import as_output
from ctrpipe.models.layers.sequence import (
    PACK_MAX_FILL,
    ActivationUnit,
    DecoupledSearch,
    TargetAttention,
    _pack_on_cpu,
    ages,
    history_tokens,
    masked_softmax,
    most_recent,
    pool,
)
from ctrpipe.models.registry import build_model


def build(spec: FeatureSpec, name: str, keys: dict[str, Any]) -> torch.nn.Module:
    section = build_model_section({"name": name, **keys})
    return build_model(section.name, section.params, spec)


def test_masked_softmax_gives_padding_and_empty_rows_no_weight() -> None:
    scores = torch.tensor([[1.0, 2.0, 50.0], [3.0, 3.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    w = masked_softmax(scores, mask)
    e = torch.exp(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(w[0], torch.cat([e / e.sum(), torch.zeros(1)]))
    torch.testing.assert_close(w[1], torch.zeros(3))                     # empty history: 0, not NaN


def test_most_recent_and_ages_follow_the_padding_convention() -> None:
    tokens = torch.tensor([[5, 6, 7, 8, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]])   # most recent last, 0s right
    torch.testing.assert_close(most_recent(tokens, 2), torch.tensor([[7, 8], [9, 0], [0, 0]]))
    torch.testing.assert_close(ages(tokens > 0), torch.tensor([[3.0, 2, 1, 0, 0], [0, 0, 0, 0, 0], [0] * 5]))


def test_soft_and_hard_top_k_on_hand_made_scores() -> None:
    search = DecoupledSearch(attention_dim=4, top_k=2, search="soft")
    scores = torch.tensor([[0.5, 3.0, 1.0, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])               # position 4 is padding
    w = search.weights(scores, mask)
    e = torch.exp(torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(w, torch.tensor([[0.0, e[0] / e.sum(), 0.0, e[1] / e.sum(), 0.0]]))
    hard = DecoupledSearch(attention_dim=4, top_k=2, search="hard")       # the 2 most recent: positions 2, 3
    e = torch.exp(torch.tensor([1.0, 2.0]))
    want = torch.tensor([[0.0, 0.0, e[0] / e.sum(), e[1] / e.sum(), 0.0]])
    torch.testing.assert_close(hard.weights(scores, mask), want)
    short = torch.tensor([[True, False, False, False, False]])            # fewer behaviours than k
    torch.testing.assert_close(search.weights(scores, short), torch.tensor([[1.0, 0, 0, 0, 0]]))
    torch.testing.assert_close(search.weights(scores, torch.zeros_like(short)), torch.zeros(1, 5))


def test_recency_tau_lowers_older_scores() -> None:
    search = DecoupledSearch(attention_dim=1, recency_tau=2.0)
    q, keys = torch.ones(1, 1), torch.ones(1, 3, 1)                        # equal raw scores 1.0
    s = search.scores(q, keys, torch.tensor([[True, True, True]]))
    torch.testing.assert_close(s, torch.tensor([[1.0 - 1.0, 1.0 - 0.5, 1.0]]))


def test_activation_unit_equals_an_mlp_on_the_concatenation() -> None:
    torch.manual_seed(0)
    unit = ActivationUnit(dim=3, units=(5,))
    q, k = torch.randn(2, 3), torch.randn(2, 4, 3)
    # the equivalent first layer on [q, k, q - k, q * k]: W1 = Wq, W2 = Wk, W3 = 0, W4 = Wp
    w = torch.cat([unit.query.weight, unit.key.weight, torch.zeros(5, 3), unit.product.weight], dim=1)
    qq = q.unsqueeze(1).expand_as(k)
    h = torch.cat([qq, k, qq - k, qq * k], dim=-1) @ w.T + unit.query.bias
    torch.testing.assert_close(unit(q, k), unit.rest(h.reshape(-1, 5)).view(2, 4))


def test_target_attention_never_weights_padding() -> None:
    torch.manual_seed(0)
    att = TargetAttention(dim=3, units=(4,))
    q, keys = torch.randn(2, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = att(q, keys, mask)
    changed = keys.clone()
    changed[:, 2:] = 1e6                                                   # garbage under the padding
    torch.testing.assert_close(att(q, changed, mask), out)
    torch.testing.assert_close(out[1], torch.zeros(3))


@pytest.mark.parametrize(("name", "keys"), [
    ("din", {"hidden_units": [8]}),
    ("dare", {"hidden_units": [8], "attention_dim": 4, "sequence": {"top_k": 3}}),
    ("dare_qnn", {"attention_dim": 4, "sequence": {"top_k": 3, "transformer_block": True},
                  "qnn_alpha": {"feature_embed_dim": 8}}),
])
def test_padding_tokens_and_empty_histories(name: str, keys: dict[str, Any], spec_factory, batch_factory) -> None:
    spec = spec_factory()
    model = build(spec, name, {"embedding_dim": 8, **keys}).eval()
    batch = batch_factory(spec, rows=8)
    hist = batch.sequence[0]
    hist[0] = 0                                                            # an empty history
    model.train()
    out = as_output(model(batch)).logits
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad.to_dense() if p.grad.is_sparse else p.grad).all()
               for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        out = as_output(model(batch)).logits
        alone = batch_factory(spec, rows=8, seed=1)                        # other rows, other histories: the
        alone.sequence[0][0] = 0                                           # empty row's output depends on
        alone.sequence_len[0][0] = 0                                       # its own inputs only
        for f in ("numeric", "categorical"):
            getattr(alone, f)[0] = getattr(batch, f)[0]
        alone.multihot[0][0] = batch.multihot[0][0]
        alone.multihot_weights[0][0] = batch.multihot_weights[0][0]
        others = as_output(model(alone)).logits
        assert not torch.allclose(others[1:], out[1:])                     # the rest of the batch did change
        torch.testing.assert_close(others[0], out[0])
        # the history is read: one behaviour in the empty row, then another id there, each moves its output
        hist[0, 0], batch.sequence_len[0][0] = 1, 1
        one = as_output(model(batch)).logits
        hist[0, 0] = 2
        other = as_output(model(batch)).logits
    # (small embeddings at init move DIN's logit by ~1e-4; a history not read would leave it bit for bit)
    assert (one[0] - out[0]).abs().min() > 1e-6 and (other[0] - one[0]).abs().min() > 1e-6
    torch.testing.assert_close(other[1:], out[1:])


@pytest.mark.parametrize(("name", "keys"), [
    ("dare", {"hidden_units": [8], "attention_dim": 4, "aux_loss_weight": 0.3, "sequence": {"top_k": 2}}),
    ("dare_qnn", {"attention_dim": 4, "sequence": {"top_k": 2},
                  "qnn_alpha": {"feature_embed_dim": 8, "aux_head_weight": 0.3}}),
])
def test_aux_head_is_a_weighted_head_outside_the_primary_metric(name: str, keys: dict[str, Any], spec_factory,
                                                               batch_factory) -> None:
    spec = spec_factory(2)
    model = build(spec, name, {"embedding_dim": 8, **keys})
    assert [h.name for h in model.heads] == ["y0", "y1", "y0_full", "y1_full"]
    assert [h.loss_weight for h in model.heads] == [1.0, 1.0, 0.3, 0.3]
    assert [h.metric_weight for h in model.heads] == [1.0, 1.0, 0.0, 0.0]
    assert as_output(model(batch_factory(spec, rows=4))).logits.shape == (4, 4)


def test_sequence_errors(spec_factory) -> None:
    with pytest.raises(SchemaError, match="sequence"):
        build(spec_factory(sequence=False), "din", {})
    with pytest.raises(ConfigError, match="model.sequence.query_key") as err:
        build(spec_factory(), "din", {"sequence": {"query_key": "nope"}})
    # (a helper's sweep) the fix listed the first 12 columns by name, most without the history's id space
    assert err.value.fix == "use 'item', the column 'hist' shares its ids with"
    with pytest.raises(ConfigError, match="model.sequence.query_key") as err:
        build(dataclasses.replace(spec_factory(), categorical=(FieldSpec("C1", "categorical", 11),)), "din",
              {"sequence": {"query_key": "nope"}})
    assert err.value.fix == "use one of ['C1']"          # no column in the history's space: the columns there are
    # the default history is the first one: where it has no candidate and another has, the fix names that one
    spec = spec_factory()
    two = dataclasses.replace(spec, sequence=(FieldSpec("clicks", "sequence", 9, width=5), *spec.sequence))
    for name, keys in (("din", {}), ("dare", {}), ("din", {"sequence": {"query_key": "item"}})):
        with pytest.raises(ConfigError, match="'clicks'") as err:
            build(two, name, keys)
        assert "model.sequence.column=hist" in err.value.fix, (name, err.value.fix)
    assert build(two, "din", {"sequence": {"column": "hist"}}).history.query == "item"
    with pytest.raises(ConfigError, match="do not share an id space"):
        build(spec_factory(), "dare", {"sequence": {"query_key": "C1"}})
    for name in ("dare", "dare_qnn"):    # S2 reads no candidate: a query_key from the config does not apply
        model = build(spec_factory(), name, {"sequence": {"query_key": "C1", "query_mode": "S2"}})
        assert not model.history.query
    with pytest.raises(ConfigError, match="model.sequence.query_key"):
        build(spec_factory(), "dare", {"sequence": {"query_key": "nope", "query_mode": "S2"}})
    with pytest.raises(ConfigError, match="model.sequence.top_k"):
        build(spec_factory(), "dare", {"sequence": {"top_k": 6}})       # the history stores 5
    with pytest.raises(ConfigError, match="model.sequence.max_len"):
        build(spec_factory(), "dare", {"sequence": {"max_len": 9}})
    with pytest.raises(ConfigError, match="model.sequence.column"):
        build(spec_factory(), "dare_qnn", {"sequence": {"column": "tags"}})
    # a positive recency_tau that is 0 in float32 made every score 0/0 = NaN (a helper's sweep: 1e-50)
    for name in ("dare", "dare_qnn"):
        with pytest.raises(ConfigError, match=r"model.sequence.recency_tau.*0 \(off\) or at least 1e-30"):
            build(spec_factory(), name, {"sequence": {"recency_tau": 1e-50}})
    assert build(spec_factory(), "dare", {"sequence": {"recency_tau": 1e-30}})
    with pytest.raises(ConfigError, match=r"model.qnn_alpha.feature_embed_dim=16"):     # its default, not 2
        build(spec_factory(), "dare_qnn", {"qnn_alpha": {"feature_embed_dim": 0}})


def test_truncated_history_reads_only_the_most_recent_tokens(spec_factory, batch_factory) -> None:
    spec = spec_factory()
    torch.manual_seed(0)
    model = build(spec, "din", {"embedding_dim": 8, "hidden_units": [8], "sequence": {"max_len": 2}}).eval()
    batch = batch_factory(spec, rows=8)
    out = as_output(model(batch)).logits
    hist = batch.sequence[0]
    lengths = (hist > 0).sum(1)
    older = torch.arange(hist.shape[1]) < (lengths - 2).unsqueeze(1)       # beyond the 2 most recent
    hist[older] = 1 + (hist[older] % 3)                                    # change old behaviours only
    torch.testing.assert_close(as_output(model(batch)).logits, out)


@pytest.mark.parametrize("search,top_k", [("soft", 2), ("hard", 2), ("soft", 0)])
def test_search_weights_are_float32_from_low_precision_scores(search: str, top_k: int) -> None:
    """The search runs in float32 from bf16 scores (as bmm gives them under autocast): with CUDA autocast's
    float32 softmax, a bf16 top-k scatter would mix dtypes and fail."""
    s = DecoupledSearch(attention_dim=4, top_k=top_k, search=search)
    scores = torch.tensor([[0.5, 3.0, 1.0, 2.0, 9.0], [1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, True, True, True, False], [False] * 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = s.weights(scores, mask)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(dim=1), torch.tensor([1.0, 0.0]))
    assert (w[0, 4] == 0) and (w[1] == 0).all()


@pytest.mark.parametrize("softmax", [False, True])
def test_din_scores_only_valid_behaviours_on_the_cpu_as_the_dense_form_does(softmax: bool) -> None:
    """The CPU path packs the valid positions (M, D) before the activation unit; the dense (B, L) form, which
    GPUs run, must give the same attended vectors and the same gradients, empty histories included."""
    torch.manual_seed(0)
    att = TargetAttention(8, (12, 6), softmax=softmax)
    lengths = torch.tensor([0, 1, 5, 3, 7, 0])
    mask = torch.arange(7)[None] < lengths[:, None]
    query, keys = torch.randn(6, 8, requires_grad=True), torch.randn(6, 7, 8, requires_grad=True)
    packed = att(query, keys, mask)
    dense_scores = att.unit._dense(query, keys) * mask
    dense = pool(masked_softmax(dense_scores, mask) if softmax else dense_scores, keys)
    assert torch.allclose(packed, dense, atol=1e-6) and torch.isfinite(packed).all()
    assert torch.equal(packed[[0, 5]], torch.zeros(2, 8))                 # an empty history attends to nothing
    grads = torch.autograd.grad(packed.sum(), [query, keys, *att.parameters()])
    want = torch.autograd.grad(dense.sum(), [query, keys, *att.parameters()])
    for g, w in zip(grads, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.equal(grads[1][~mask], torch.zeros_like(grads[1][~mask]))   # padding gets no gradient


def test_din_under_bf16_autocast_runs_its_packed_matmuls_on_few_shapes() -> None:
    """oneDNN compiles (and keeps) a bf16 kernel per shape: a packed count of valid behaviours that changed
    every step grew a DIN training process by ~0.7 GB over a few hundred steps. The packed rows are padded to
    a few sizes, and the padding changes no score and no gradient."""
    torch.manual_seed(0)
    att = TargetAttention(8, (12,))
    rows_seen: list[int] = []           # the rows of each call of the unit's MLP
    att.unit.rest.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
    packed_rows: set[int] = set()
    for n_valid in range(300, 340):                                     # 40 different packed counts
        lengths = torch.full((16,), n_valid // 16)
        lengths[: n_valid % 16] += 1
        mask = torch.arange(50)[None] < lengths[:, None]                  # at most 0.43 valid: packed
        query, keys = torch.randn(16, 8, requires_grad=True), torch.randn(16, 50, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = pool(att.unit._dense(query, keys) * mask, keys)
            before = len(rows_seen)
            packed = att(query, keys, mask)
        packed_rows.update(rows_seen[before:])
        assert torch.allclose(packed.float(), dense.float(), rtol=0.05, atol=0.05)
        # the padding rows read slot (0, 0): were their scores kept, its gradient would differ from the dense
        grad, want = (torch.autograd.grad(x.float().sum(), keys)[0] for x in (packed, dense))
        assert torch.equal(grad[~mask], want[~mask])
        assert (grad[0, 0] - want[0, 0]).norm() < 0.5 * want[0, 0].norm()     # bf16 noise: up to ~0.15
    assert len(packed_rows) <= 4, sorted(packed_rows)                    # 304, 320, 336, 352
    with torch.autocast("cpu", dtype=torch.bfloat16):                   # an empty batch: nothing to pad
        assert att(torch.randn(0, 8), torch.randn(0, 50, 8), torch.zeros(0, 50, dtype=torch.bool)).shape == (0, 8)


@pytest.mark.parametrize(("sequence", "sparse", "empty"), [
    ({"top_k": 3, "query_mode": "S1"}, False, [0, 5]),
    ({"top_k": 2, "search": "hard", "query_mode": "S2", "recency_tau": 2.0}, True, [0, 5]),
    ({"top_k": 0, "query_mode": "concat", "recency_tau": 0.5}, False, [0, 5]),
    ({"top_k": 2, "query_mode": "S2", "max_len": 3}, True, [0, 5]),       # truncated to the 3 most recent
    ({"top_k": 5, "query_mode": "concat"}, True, list(range(8))),          # top_k = L; every history empty
])
def test_dare_search_on_packed_behaviours_matches_the_dense_form(sequence: dict[str, Any], sparse: bool,
                                                                  empty: list[int], spec_factory,
                                                                  batch_factory) -> None:
    """The CPU reads only the valid behaviours (packed); the dense (B, L) form, which GPUs and exported graphs
    run, must give the same search features (full attention too) and the same gradients of every weight,
    empty histories (and a batch of nothing else) included; `forward` on the CPU takes the packed form."""
    spec = spec_factory()
    torch.manual_seed(0)
    keys = {"embedding_dim": 8, "hidden_units": [8], "attention_dim": 4, "embedding_init_std": 0.5,
            "aux_loss_weight": 0.3, "sequence": sequence}
    section = build_model_section({"name": "dare", **keys})
    model = build_model(section.name, section.params, spec, sparse=sparse)
    batch = batch_factory(spec, rows=8)
    batch.sequence[0][empty] = 0
    batch.sequence_len[0][empty] = 0
    enc, emb = model.encoder, model.inputs.embedding
    tokens = history_tokens(batch, enc.history)
    assert (tokens > 0).sum() < tokens.numel() and ((tokens > 0).sum() == 0) == (len(empty) == 8)
    params = list(model.parameters())

    def run(form: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        found, whole = getattr(enc, form)(batch, emb, tokens, tokens > 0, True)
        (found.square().sum() + whole.square().sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else
                 (p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()) for p in params]
        return torch.cat([found, whole], dim=1).detach(), grads

    packed, packed_grads = run("_packed")
    dense, dense_grads = run("_dense")
    assert torch.isfinite(packed).all() and packed.abs().sum() > 0
    torch.testing.assert_close(packed, dense, atol=1e-6, rtol=1e-5)
    for p, g in zip(packed_grads, dense_grads, strict=True):
        torch.testing.assert_close(p, g, atol=1e-5, rtol=1e-4)
    with torch.no_grad():                       # forward runs the form _pack_on_cpu picks, bit for bit
        ran = enc(batch, emb, full=True)[0]
    assert torch.equal(ran, (packed if _pack_on_cpu(tokens > 0) else dense)[:, :enc.n_fields])


def test_packing_is_chosen_on_the_cpu_for_mostly_padded_histories_only() -> None:
    """Packed pays while few positions are valid; full histories take the dense form (as exported graphs and
    other devices do: tests/serve exports DIN)."""
    lengths = torch.tensor([1, 2, 0, 3])
    sparse = torch.arange(8)[None] < lengths[:, None]                     # 6 of 32 valid
    assert _pack_on_cpu(sparse) and not _pack_on_cpu(torch.ones(4, 8, dtype=torch.bool))
    assert int(PACK_MAX_FILL * 32) == 16 and _pack_on_cpu(torch.arange(8)[None] < torch.full((4, 1), 4))
    assert not _pack_on_cpu(torch.arange(8)[None] < torch.full((4, 1), 5))


def test_aux_heads_follow_their_heads_task_settings(spec_factory) -> None:
    """`<label>_full` trains on the rows its head trains on, with its pos_weight and focal settings, and a
    loss weight relative to its head's (0 turns both off); its own train.tasks entry still wins."""
    from ctrpipe.train.config import TaskConfig, TrainConfig
    from ctrpipe.train.objective import build_tasks

    spec = spec_factory(2)
    heads = build(spec, "dare", {"embedding_dim": 8, "hidden_units": [8], "attention_dim": 4,
                                 "aux_loss_weight": 0.3}).heads
    cfg = TrainConfig(tasks={"y1": TaskConfig(mask="y0", pos_weight=3.0, weight=0.5, focal_weight=0.1)})
    t = {x.name: x for x in build_tasks(heads, spec, cfg)}
    assert (t["y1_full"].mask, t["y1_full"].pos_weight, t["y1_full"].focal_weight) == (0, 3.0, 0.1)
    assert t["y1_full"].weight == pytest.approx(0.15) and t["y1_full"].metric_weight == 0.0
    assert (t["y0_full"].mask, t["y0_full"].weight, t["y0_full"].pos_weight) == (None, 0.3, 1.0)
    off = build_tasks(heads, spec, TrainConfig(tasks={"y1": TaskConfig(weight=0.0)}))
    assert [x.weight for x in off] == [1.0, 0.0, 0.3, 0.0]
    own = build_tasks(heads, spec, TrainConfig(tasks={"y1": TaskConfig(mask="y0"),
                                                      "y1_full": TaskConfig(weight=0.7)}))
    assert (own[3].mask, own[3].weight) == (None, 0.7)
    per_label = build_tasks(heads, spec, TrainConfig(pos_weight=(2.0, 5.0)))
    assert [x.pos_weight for x in per_label] == [2.0, 5.0, 2.0, 5.0]
    with pytest.raises(ConfigError, match="one per primary head"):
        build_tasks(heads, spec, TrainConfig(pos_weight=(2.0, 5.0, 1.0)))


@pytest.mark.parametrize(("backbone", "params"), [
    ("dare", {"aux_loss_weight": 0.3}),
    ("dare_qnn", {"qnn_alpha": {"feature_embed_dim": 8, "aux_head_weight": 0.3}}),
])
def test_esmm_refuses_a_backbone_with_extra_heads(backbone: str, params: dict[str, Any], spec_factory) -> None:
    with pytest.raises(ConfigError, match="besides ctr and cvr") as err:
        build(spec_factory(2), "esmm", {"backbone": backbone,
                                        "backbone_params": {"embedding_dim": 8, "attention_dim": 4, **params}})
    assert "aux_" in err.value.fix
    build(spec_factory(2), "esmm", {"backbone": "dare", "backbone_params": {"embedding_dim": 8, "attention_dim": 4}})


def test_esmm_names_its_backbones_checks_against_the_cache_as_backbone_params(spec_factory) -> None:
    """A backbone check made when the model is built (its heads against the cache's labels) was named
    model.wide_heads, an unknown key under ESMM (helper's training sweep)."""
    with pytest.raises(ConfigError) as err:
        build(spec_factory(2), "esmm", {"backbone": "deepfm_mmoe", "backbone_params": {"wide_heads": ["ctrx"]}})
    assert err.value.where.startswith("model.backbone_params.wide_heads"), err.value
    assert "model.backbone_params.wide_heads=" in err.value.fix and "model.wide_heads" not in str(err.value)


def test_recency_is_applied_in_float32_under_autocast() -> None:
    """bf16 steps near age / tau = 8 are 0.03-0.06: subtracting there would reorder close scores."""
    search = DecoupledSearch(attention_dim=1, top_k=1, recency_tau=1.0)
    q = torch.ones(1, 1)
    keys = torch.zeros(1, 10, 1)
    keys[0, 0, 0], keys[0, 1, 0] = 1.01, 1.0     # age 9 and age 8: scores -7.99 and -7.0
    mask = torch.ones(1, 10, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = search.scores(q, keys, mask)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s[0, :2], torch.tensor([1.01 - 9.0, 1.0 - 8.0]), atol=1e-2, rtol=0)


def test_dare_attention_table_trains_from_a_zero_embedding_init(spec_factory, batch_factory) -> None:
    """A dot-product score has zero gradient at all-zero vectors: the attention table is never all zero."""
    spec = spec_factory()
    torch.manual_seed(0)
    model = build(spec, "dare", {"embedding_dim": 8, "hidden_units": [8], "attention_dim": 4,
                                 "embedding_init_std": 0.0})
    table = model.encoder.table.table.weight
    assert table[:-1].abs().max() > 0 and (table[-1] == 0).all()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = table.detach().clone()
    batch = batch_factory(spec, rows=16)
    for _ in range(3):
        opt.zero_grad()
        as_output(model(batch)).logits.sum().backward()
        opt.step()
    assert (table.detach() - before).abs().max() > 0


@pytest.mark.parametrize(("name", "keys"), [
    ("din", {"hidden_units": [8]}),
    ("dare", {"hidden_units": [8], "attention_dim": 4, "aux_loss_weight": 0.3, "sequence": {"top_k": 3}}),
    ("dare_qnn", {"attention_dim": 4, "sequence": {"top_k": 3}, "qnn_alpha": {"feature_embed_dim": 8}}),
    ("dnn", {"hidden_units": [8]}),                                      # mean-pooled shared history, multi-hot
])
def test_padding_kept_out_by_masks_trains_as_padding_idx_does(name: str, keys: dict[str, Any], spec_factory,
                                                              batch_factory) -> None:
    """On CUDA a sparse table's `padding_idx` costs a host sync in every backward (torch drops those entries
    with a boolean mask), so there padding is kept out by zero weights and masks instead (`masks_padding`).
    Run here on the CPU: the same outputs, gradients and LazyAdam step as with padding_idx, and every padding
    row still zero after the step."""
    from ctrpipe.train.optim import LazyAdam

    spec = spec_factory()
    batch = batch_factory(spec, rows=16)
    batch.sequence[0][:3] = 0                                             # empty histories too
    batch.sequence_len[0][:3] = 0
    runs = []
    for mask in (False, True):
        torch.manual_seed(0)
        section = build_model_section({"name": name, "embedding_dim": 8, **keys})
        model = build_model(section.name, section.params, spec, sparse=True)
        for m in model.modules():
            if hasattr(m, "mask_padding"):
                m.mask_padding = mask
        tables = [p for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                  for p in m.parameters(recurse=False)]
        opt = LazyAdam(tables, lr=0.1)
        out = as_output(model(batch))
        (out.logits.sum() + sum(out.aux_losses.values(), torch.zeros(()))).backward()
        grads = [p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad.clone()
                 for p in model.parameters() if p.grad is not None]
        pad_rows = [row for weight, row in _padding_rows(model) if weight.grad is not None
                    and bool((weight.grad.coalesce().indices()[0] == row).any())]
        assert bool(pad_rows) == mask           # the masking path ran: its padding row gets (zero) gradients
        opt.step()
        runs.append((out.logits.detach(), grads, [p.detach().clone() for p in model.parameters()], model))
    (out0, grads0, params0, _), (out1, grads1, params1, model) = runs
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)
    assert len(grads0) == len(grads1)
    for a, b in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(params0, params1, strict=True):     # Adam's step is ~lr (0.1) wherever a row moved
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    pads = _padding_rows(model)
    assert pads
    for weight, row in pads:
        assert not weight[row].any()


def _padding_rows(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    """(table, padding row) of every table with one."""
    groups = [m for m in model.modules() if hasattr(m, "cat_pad")]
    pads = [(g.cat_table.weight, g.cat_pad) for g in groups if g.cat_pad is not None]
    pads += [(g.bag_table.weight, 0) for g in groups if g.bag_table is not None]
    return pads + [(m.table.weight, m.pad) for m in model.modules() if hasattr(m, "pad") and hasattr(m, "table")]
