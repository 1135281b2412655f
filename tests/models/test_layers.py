"""Shared layers against hand computations: offsets into the shared table, bag pooling with padding and
weights, FM identity, cross/attention shapes, parameter split convention."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.layers.attention import AutoIntLayer, TransformerBlock
from ctrpipe.models.layers.cross import CrossAndDeep, CrossNetV1, CrossNetV2
from ctrpipe.models.layers.embedding import FieldEmbedding, split_parameters
from ctrpipe.models.layers.fm import LinearTerm, fm_interaction
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.numeric import NumericTokenizer


def id_batch(cat: list[list[int]], mh: list[list[int]] | None = None, w: list[list[float]] | None = None,
             seq: list[list[int]] | None = None) -> Batch:
    rows = len(cat)
    mh_t = (torch.tensor(mh, dtype=torch.int32),) if mh is not None else ()
    seq_t = (torch.tensor(seq, dtype=torch.int32),) if seq is not None else ()
    return Batch(numeric=None, categorical=torch.tensor(cat, dtype=torch.int32), labels=None,
                 row_index=torch.arange(rows), multihot=mh_t,
                 multihot_len=tuple((t > 0).sum(1).int() for t in mh_t),
                 multihot_weights=(torch.tensor(w),) if w is not None else (None,) * len(mh_t),
                 sequence=seq_t, sequence_len=tuple((t > 0).sum(1).int() for t in seq_t))


SPEC = FeatureSpec(categorical=(FieldSpec("C1", "categorical", 10), FieldSpec("C2", "categorical", 5)),
                   multihot=(FieldSpec("tags", "multihot", 6, width=3, weighted=True),),
                   sequence=(FieldSpec("hist", "sequence", 4, width=3),))


def test_shared_table_uses_field_offsets() -> None:
    emb = FieldEmbedding(FeatureSpec(categorical=SPEC.categorical), 4)
    table = emb.groups[0].cat_table.weight
    assert table.shape == (15, 4)
    out = emb(id_batch([[3, 3], [0, 4]]))                                  # (B, F, D)
    torch.testing.assert_close(out[0, 0], table[3])
    torch.testing.assert_close(out[0, 1], table[10 + 3])                  # C2 starts after C1's 10 rows
    torch.testing.assert_close(out[1, 1], table[14])
    assert emb.groups[0].cat_offsets.dtype == torch.int64                  # no int32 overflow on big tables


def test_bags_weighted_mean_excluding_padding_and_sequence_mean() -> None:
    emb = FieldEmbedding(SPEC, 2)
    batch = id_batch([[1, 1], [2, 2]], mh=[[2, 5, 0], [0, 0, 0]], w=[[0.5, 2.0, 0.0], [0.0, 0.0, 0.0]],
                     seq=[[1, 3, 0], [2, 0, 0]])      # right-padded, most recent last (Batch docstring)
    out = emb(batch)                                                       # (2, 4, 2): C1, C2, tags, hist
    assert emb.field_names == ("C1", "C2", "tags", "hist")
    bag = emb.groups[0].bag_table.weight   # row 0 = padding, tags 1..5 -> rows 1..5, hist 1..3 -> 6..8
    torch.testing.assert_close(out[0, 2], (0.5 * bag[2] + 2.0 * bag[5]) / 2)
    torch.testing.assert_close(out[1, 2], torch.zeros(2))                  # empty bag -> zero vector
    torch.testing.assert_close(out[0, 3], (bag[5 + 1] + bag[5 + 3]) / 2)
    torch.testing.assert_close(out[1, 3], bag[5 + 2])
    summed = FieldEmbedding(SPEC, 2, pooling="sum")            # sums multihot bags; sequences stay means
    summed.load_state_dict(emb.state_dict())
    torch.testing.assert_close(summed(batch)[0, 2], 0.5 * bag[2] + 2.0 * bag[5])
    torch.testing.assert_close(summed(batch)[0, 3], out[0, 3])
    tokens = emb.token_vectors(batch, "sequence", 0)                 # (B, L, D), unpooled
    assert tokens.shape == (2, 3, 2)
    torch.testing.assert_close(tokens[0], torch.stack([bag[6], bag[8], torch.zeros(2)]))


SHARED = FeatureSpec(categorical=(FieldSpec("C1", "categorical", 10),
                                  FieldSpec("item", "categorical", 6, id_space="item")),
                     multihot=(FieldSpec("tags", "multihot", 6, width=3),),
                     sequence=(FieldSpec("hist", "sequence", 6, width=4, id_space="item"),))


@pytest.mark.parametrize("mode", ["shared", "per_field"])
def test_shared_id_space_reads_the_candidates_rows(mode: str) -> None:
    emb = FieldEmbedding(SHARED, 3, mode=mode)
    group = next(g for g in emb.groups if "item" in g.cat_names)
    table = group.cat_table.weight
    start = int(group.cat_offsets[group.cat_names.index("item")])
    assert table.shape[0] == (16 if mode == "shared" else 6) + 1           # + the zero padding row
    torch.testing.assert_close(table[group.cat_pad], torch.zeros(3))
    batch = id_batch([[1, 4], [2, 0]], mh=[[1, 0, 0], [0, 0, 0]], seq=[[4, 2, 4, 0], [0, 0, 0, 0]])
    out = emb(batch)
    hist = emb.field_names.index("hist")
    torch.testing.assert_close(out[0, hist], (2 * table[start + 4] + table[start + 2]) / 3)
    torch.testing.assert_close(out[1, hist], torch.zeros(3))                # empty history -> 0, not NaN
    torch.testing.assert_close(emb.lookup(batch, "item")[0], table[start + 4])   # candidate id 4 = token 4
    tokens = emb.token_vectors(batch, "sequence", 0)
    torch.testing.assert_close(tokens[0, 0], emb.lookup(batch, "item")[0])
    torch.testing.assert_close(tokens[0, 3], torch.zeros(3))
    out.sum().backward()                                                    # padding row gets no gradient
    grad = table.grad.to_dense() if table.grad.is_sparse else table.grad
    torch.testing.assert_close(grad[group.cat_pad], torch.zeros(3))


@pytest.mark.parametrize("mode", ["shared", "per_field"])
@pytest.mark.parametrize("sparse", [False, True])
def test_history_and_candidate_from_one_lookup_equal_two(mode: str, sparse: bool) -> None:
    """DIN reads its history and candidate with one lookup of their shared table (one sparse gradient
    instead of two to add up): the same vectors and the same table gradient as token_vectors + lookup."""
    batch = id_batch([[1, 4], [2, 0], [3, 5]], mh=[[1, 0, 0], [0, 0, 0], [2, 2, 0]],
                     seq=[[4, 2, 4, 0], [0, 0, 0, 0], [5, 1, 0, 0]])
    tokens = batch.sequence[0][:, 1:].long()                                 # a truncated history, too
    grads = []
    for one in (True, False):
        torch.manual_seed(0)
        emb = FieldEmbedding(SHARED, 3, mode=mode, sparse=sparse)
        # the history reads the candidate's table in both modes: the one-lookup path runs, not its fallback
        assert any(b.shared and b.name == "hist" for g in emb.groups if "item" in g.cat_names for b in g.bags)
        if one:
            keys, query = emb.history_with_candidate(batch, "sequence", 0, tokens, "item")
        else:
            keys, query = emb.token_vectors(batch, "sequence", 0, tokens), emb.lookup(batch, "item")
        assert keys.shape == (3, 3, 3) and query.shape == (3, 3) and keys.is_contiguous()
        ((keys * torch.arange(9.0).view(1, 3, 3)).sum() + (query ** 2).sum()).backward()
        table = next(g for g in emb.groups if "item" in g.cat_names).cat_table.weight
        grads.append((keys.detach(), query.detach(), table.grad.to_dense() if sparse else table.grad))
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b)


def test_a_shared_bag_before_an_own_bag_keeps_the_field_order() -> None:
    """Pooled bags are computed per table (own rows first) and put back in field order: here the shared
    multi-hot comes first, so the output is reordered (by a device buffer, not a list copied every step)."""
    spec = FeatureSpec(categorical=(FieldSpec("item", "categorical", 6, id_space="item"),),
                       multihot=(FieldSpec("tags", "multihot", 6, width=3, id_space="item"),),
                       sequence=(FieldSpec("hist", "sequence", 5, width=4),))
    emb = FieldEmbedding(spec, 3)
    (group,) = emb.groups
    assert group.reorder is not None and "reorder" in dict(group.named_buffers())
    batch = id_batch([[1], [2]], mh=[[1, 3, 0], [2, 0, 0]], seq=[[4, 2, 0, 0], [1, 0, 0, 0]])
    out = emb(batch)
    assert emb.field_names == ("item", "tags", "hist")
    tags, hist = emb.token_vectors(batch, "multihot", 0), emb.token_vectors(batch, "sequence", 0)
    torch.testing.assert_close(out[:, 1], tags.sum(1) / torch.tensor([[2.0], [1.0]]))
    torch.testing.assert_close(out[:, 2], hist.sum(1) / torch.tensor([[2.0], [1.0]]))
    torch.testing.assert_close(tags[:, 0], emb.lookup(batch, "item"))   # tags 1 and 2 are items 1 and 2


def test_unpooled_history_leaves_the_pooled_fields() -> None:
    emb = FieldEmbedding(SHARED, 3, unpooled=["hist"])
    assert emb.field_names == ("C1", "item", "tags") and emb.flat_dim == 9
    batch = id_batch([[1, 4]], mh=[[1, 0, 0]], seq=[[4, 0, 0, 0]])
    assert emb(batch).shape == (1, 3, 3)
    assert emb.token_vectors(batch, "sequence", 0).shape == (1, 4, 3)
    with pytest.raises(ConfigError, match="not multihot or sequence"):
        FieldEmbedding(SHARED, 3, unpooled=["C1"])
    with pytest.raises(ConfigError, match="share the id space"):
        FieldEmbedding(SHARED, {"hist": 5}, default_dim=3)


def test_per_field_tables_match_shared_lookup() -> None:
    shared = FieldEmbedding(SPEC, 3)
    per_field = FieldEmbedding(SPEC, 3, mode="per_field")
    assert len(per_field.groups) == 4 and per_field.field_names == shared.field_names
    with torch.no_grad():   # copy the shared rows into the per-field tables
        cat_rows = shared.groups[0].cat_table.weight
        per_field.groups[0].cat_table.weight.copy_(cat_rows[:10])
        per_field.groups[1].cat_table.weight.copy_(cat_rows[10:])
        bag_rows = shared.groups[0].bag_table.weight
        per_field.groups[2].bag_table.weight.copy_(bag_rows[:6])
        per_field.groups[3].bag_table.weight[1:].copy_(bag_rows[6:])
    batch = id_batch([[9, 4], [0, 1]], mh=[[1, 2, 0], [5, 0, 0]], w=[[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
                     seq=[[3, 0, 0], [1, 2, 3]])      # right-padded, most recent last (Batch docstring)
    out = per_field(batch)
    torch.testing.assert_close(out, shared(batch))
    hist = per_field.field_names.index("hist")                    # both histories reach the per-field table
    torch.testing.assert_close(out[0, hist], per_field.groups[3].bag_table.weight[3])
    torch.testing.assert_close(out[1, hist], per_field.groups[3].bag_table.weight[1:4].mean(0))


def test_unequal_dims_give_flat_only() -> None:
    emb = FieldEmbedding(SPEC, {"C2": 5, "hist": 5}, default_dim=3)
    assert emb.dim is None and emb.flat_dim == 3 + 5 + 3 + 5 and len(emb.groups) == 2
    batch = id_batch([[1, 2]], mh=[[1, 0, 0]], w=[[1.0, 0.0, 0.0]], seq=[[1, 0, 0]])
    assert emb.flat(batch).shape == (1, 16)
    with pytest.raises(RuntimeError):
        emb(batch)
    with pytest.raises(ConfigError, match="model.field_dims") as err:
        FieldEmbedding(SPEC, {"C9": 4})
    assert "C1" in str(err.value)   # the fix lists the valid names


def test_split_parameters_convention() -> None:
    model = torch.nn.Sequential(FieldEmbedding(SPEC, 4), LinearTerm(SPEC, 1), MLP(16, (8,)))
    groups = split_parameters(model)
    tables = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    assert len(groups.embedding) == len(tables) == 4
    assert {id(p) for p in groups.embedding} == {id(p) for p in tables}
    assert len(groups.embedding) + len(groups.dense) == len(list(model.parameters()))


def test_fm_interaction_equals_pairwise_sum() -> None:
    fields = torch.randn(5, 4, 3)
    pairs = sum((fields[:, i] * fields[:, j]).sum(1) for i, j in itertools.combinations(range(4), 2))
    torch.testing.assert_close(fm_interaction(fields).squeeze(1), pairs)


def test_fm_interaction_gradient_is_exact() -> None:
    # the hand-written backward against finite differences, and against autograd through the pairwise sum
    fields = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fm_interaction, (fields,))
    g = torch.randn(3, 1, dtype=torch.float64)
    (fm_interaction(fields) * g).sum().backward()
    ours, fields.grad = fields.grad.clone(), None
    pairs = sum((fields[:, i] * fields[:, j]).sum(1) for i, j in itertools.combinations(range(5), 2))
    (pairs * g[:, 0]).sum().backward()
    torch.testing.assert_close(ours, fields.grad)


def test_numeric_tokenizer_scales_a_vector_per_column() -> None:
    tok = NumericTokenizer(2, 3)
    x = torch.tensor([[2.0, 0.0]])
    out = tok(x)
    torch.testing.assert_close(out[0, 0], 2.0 * tok.weight[0] + tok.bias[0])
    torch.testing.assert_close(out[0, 1], tok.bias[1])


@pytest.mark.parametrize("kind", ["full", "lowrank", "mixture"])
@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_cross_towers(kind: str, structure: str) -> None:
    x0 = torch.randn(6, 10)
    cross = CrossNetV2(10, 2, kind, rank=3, n_experts=2)
    tower = CrossAndDeep(cross, MLP(10, (7,)), structure)
    out = torch.cat(tower(x0), dim=1)
    assert out.shape == (6, tower.out_dim) and tower.out_dim == (7 if structure == "stacked" else 17)
    assert CrossNetV1(10, 2)(x0).shape == (6, 10)


def test_cross_layer_with_zero_weights_is_identity() -> None:
    cross = CrossNetV2(4, 2, "full")
    for layer in cross.layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x0 = torch.randn(3, 4)
    torch.testing.assert_close(cross(x0), x0)


def test_attention_blocks_shapes() -> None:
    x = torch.randn(4, 6, 8)
    assert AutoIntLayer(8, 5, 2)(x).shape == (4, 6, 10)
    assert TransformerBlock(8, 2)(x).shape == (4, 6, 8)


def test_mlp_activation_and_identity() -> None:
    assert MLP(5, ())(torch.ones(2, 5)).shape == (2, 5)
    mlp = MLP(5, (4, 3), dropout=0.5, batch_norm=True, activation="silu")
    assert mlp.out_dim == 3 and mlp(torch.randn(8, 5)).shape == (8, 3)
