"""Stage 4 shared layer: id-valued fields (categorical, multihot, sequence) -> one vector per field.

Fields that share a dimension share one table: local ids + per-field row offsets (int64), so all categorical
fields cost one `nn.Embedding` call and all bag fields (multihot + sequence) one `nn.EmbeddingBag` call.

Convention for trainers: every `nn.Embedding` / `nn.EmbeddingBag` submodule of a model holds *embedding
parameters* (built with `sparse=` as the model was); everything else is dense. `split_parameters(model)`
applies the convention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import EmbeddingMode, PoolingMode

EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class ParamGroups:
    embedding: list[nn.Parameter]   # tables: sparse grads when the model was built with sparse=True
    dense: list[nn.Parameter]


def named_tables(model: nn.Module) -> dict[str, nn.Parameter]:
    """state_dict name -> parameter of every embedding table (each once, even if shared by two modules)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, EMBEDDING_TYPES):
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out[f"{prefix}.{name}" if prefix else name] = p
    return out


def split_parameters(model: nn.Module) -> ParamGroups:
    """Split a model's parameters into embedding tables and the rest (separate / sparse optimiser groups)."""
    embedding = list(named_tables(model).values())
    emb_ids = {id(p) for p in embedding}
    dense = [p for p in model.parameters() if id(p) not in emb_ids]
    return ParamGroups(embedding, dense)


@dataclass(frozen=True)
class _BagField:
    source: str      # "multihot" or "sequence"
    index: int       # position in batch.multihot / batch.sequence
    offset: int      # local token t in [1, bins) -> table row offset + t; row 0 is the shared padding row
    weighted: bool
    mean: bool       # divide by the number of non-padding tokens (sequences always; multihot per `pooling`)


class _TableGroup(nn.Module):
    """Fields of one dimension: an nn.Embedding for categorical fields, an nn.EmbeddingBag for bag fields."""

    def __init__(self, spec: FeatureSpec, cat_cols: list[int], bag_fields: list[tuple[str, int]], dim: int,
                 sparse: bool, pooling: PoolingMode, init_std: float) -> None:
        super().__init__()
        self.cat_table: nn.Embedding | None = None
        self.bag_table: nn.EmbeddingBag | None = None
        self.all_cat = cat_cols == list(range(len(spec.categorical)))
        if cat_cols:
            bins = [spec.categorical[c].bins for c in cat_cols]
            starts = [0]
            for b in bins[:-1]:
                starts.append(starts[-1] + b)
            self.cat_table = nn.Embedding(sum(bins), dim, sparse=sparse, _weight=_initial(sum(bins), dim, init_std))
            self.register_buffer("cat_offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)
            self.register_buffer("cat_cols", torch.tensor(cat_cols, dtype=torch.int64), persistent=False)
        self.bags: list[_BagField] = []
        if bag_fields:
            rows = 1
            for source, i in bag_fields:
                fs: FieldSpec = getattr(spec, source)[i]
                is_mh = source == "multihot"
                mean = pooling == "mean" or not is_mh
                self.bags.append(_BagField(source, i, rows - 1, is_mh and fs.weighted, mean))
                rows += fs.bins - 1
            # mode="sum" + per-sample weights covers weighted, unweighted and padded tokens in one call
            weight = _initial(rows, dim, init_std)
            weight[0].zero_()
            self.bag_table = nn.EmbeddingBag(rows, dim, mode="sum", sparse=sparse, padding_idx=0, _weight=weight)
        self.any_mean = any(f.mean for f in self.bags)

    # torch.compile (train.compile) cannot trace sparse gradients ("Cannot access storage of SparseTensorImpl"):
    # lookups run eagerly, the dense layers around them are compiled
    @torch.compiler.disable
    def forward(self, batch: Batch) -> Tensor:
        parts: list[Tensor] = []
        if self.cat_table is not None:
            cat = batch.categorical
            assert cat is not None, "spec has categorical fields but the batch has none"
            if not self.all_cat:
                cat = cat.index_select(1, self.cat_cols)
            parts.append(self.cat_table(cat.long() + self.cat_offsets))     # (B, Fc, D)
        if self.bag_table is not None:
            parts.append(self._pool_bags(batch))                             # (B, Fb, D)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _pool_bags(self, batch: Batch) -> Tensor:
        idx, weights, starts, counts = [], [], [], []
        pos = 0
        dtype = self.bag_table.weight.dtype
        for f in self.bags:   # loop over (few) bag fields; rows are handled as whole tensors
            tok = (batch.multihot if f.source == "multihot" else batch.sequence)[f.index].long()   # (B, L)
            n_rows, width = tok.shape
            valid = tok > 0
            idx.append(torch.where(valid, tok + f.offset, 0).reshape(-1))
            w = batch.multihot_weights[f.index] if f.weighted else None
            w = valid.to(dtype) if w is None else w.to(dtype) * valid
            weights.append(w.reshape(-1))
            starts.append(torch.arange(n_rows, device=tok.device) * width + pos)
            counts.append(valid.sum(dim=1) if f.mean else torch.ones_like(tok[:, 0]))
            pos += n_rows * width
        out = self.bag_table(torch.cat(idx), torch.cat(starts), per_sample_weights=torch.cat(weights))
        out = out.view(len(self.bags), -1, out.shape[-1]).transpose(0, 1)   # (B, Fb, D)
        if self.any_mean:   # mean of (weight *) vector over non-padding tokens; an empty bag gives 0
            out = out / torch.stack(counts, dim=1).clamp(min=1).unsqueeze(-1).to(dtype)
        return out


    @torch.compiler.disable   # sparse gradients: see forward
    def token_vectors(self, batch: Batch, source: str, index: int) -> Tensor:
        """Unpooled (B, L, D) vectors of one bag field's tokens; padding positions are zero vectors."""
        f = next(b for b in self.bags if b.source == source and b.index == index)
        tok = getattr(batch, source)[index].long()                              # (B, L)
        rows = torch.where(tok > 0, tok + f.offset, 0)
        table = self.bag_table
        return nn.functional.embedding(rows, table.weight, padding_idx=0, sparse=table.sparse)


def _initial(rows: int, dim: int, std: float) -> Tensor:
    """A table's initial weights, drawn from torch's global generator.

    Drawn once (nn.Embedding's own reset would draw a second full table first), and a function of the seed
    alone: checkpoints store only the rows training changed and rebuild the rest by building the model again
    from the same seed (see train/tables.py). normal(0, std) rather than xavier: a table's "fan" is its
    hash-bucket count, which says nothing about the scale a row should have; small vectors keep
    FM/cross/attention terms near 0, so training starts from the prior the output head encodes.
    """
    weight = torch.empty(rows, dim)
    with torch.no_grad():
        if std > 0:
            nn.init.normal_(weight, 0.0, std)
        else:
            weight.zero_()
    return weight


class FieldEmbedding(nn.Module):
    """Every id field of `spec` -> one vector: categorical by lookup, multihot and sequence by pooling.

    Example: spec with categorical C1 (bins 10), C2 (bins 5) and dim 4, mode "shared": one table of 15 rows,
    C1 id 3 -> row 3, C2 id 3 -> row 13; `forward` gives (B, 2, 4), `flat` gives (B, 8).
    Multihot fields are pooled (mean or sum of weight * vector over non-padding tokens); sequences are
    mean-pooled into one more field. Padding is token 0 wherever it sits; the `*_len` tensors are not read.

    Args:
        dims: one dim for all fields, a mapping field name -> dim (others get `default_dim`), or one dim per
            field in `spec.id_fields` order.
        mode: "shared" = one table per distinct dim (fast: one lookup); "per_field" = one table per field.
    """

    def __init__(self, spec: FeatureSpec, dims: int | Mapping[str, int] | Sequence[int] = 16,
                 mode: EmbeddingMode = "shared", sparse: bool = False, pooling: PoolingMode = "mean",
                 init_std: float = 1e-2, default_dim: int = 16) -> None:
        super().__init__()
        kinds = [("categorical", i) for i in range(len(spec.categorical))]
        kinds += [("multihot", i) for i in range(len(spec.multihot))]
        kinds += [("sequence", i) for i in range(len(spec.sequence))]
        fields = spec.id_fields
        per_field = _resolve_dims(fields, dims, default_dim)
        # shared: fields of one dim share a table; per_field: every field is its own group
        keys = [("dim", d) if mode == "shared" else ("field", f.name)
                for d, f in zip(per_field, fields, strict=True)]
        order: dict[tuple[str, object], list[int]] = {}
        for pos, key in enumerate(keys):
            order.setdefault(key, []).append(pos)
        self.groups = nn.ModuleList()
        names: list[str] = []
        out_dims: list[int] = []
        for positions in order.values():
            cat_cols = [kinds[p][1] for p in positions if kinds[p][0] == "categorical"]
            bags = [kinds[p] for p in positions if kinds[p][0] != "categorical"]
            dim = per_field[positions[0]]
            self.groups.append(_TableGroup(spec, cat_cols, bags, dim, sparse, pooling, init_std))
            # output order inside a group: categorical first, then bag fields
            for p in [q for q in positions if kinds[q][0] == "categorical"] + \
                     [q for q in positions if kinds[q][0] != "categorical"]:
                names.append(fields[p].name)
                out_dims.append(per_field[p])
        self.field_names: tuple[str, ...] = tuple(names)       # order of the F axis of `forward`
        self.field_dims: tuple[int, ...] = tuple(out_dims)
        self.n_fields = len(names)
        self.dim: int | None = out_dims[0] if out_dims and len(set(out_dims)) == 1 else None  # None: unequal
        self.flat_dim = sum(out_dims)

    def forward(self, batch: Batch) -> Tensor:
        """(B, F, D) field-stacked vectors; needs equal dims (self.dim is not None)."""
        if self.dim is None:
            raise RuntimeError("FieldEmbedding.forward needs equal field dims; use .flat() instead")
        outs = [g(batch) for g in self.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def flat(self, batch: Batch) -> Tensor:
        """(B, sum of field dims): works with unequal dims too."""
        outs = [g(batch).flatten(1) for g in self.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def token_vectors(self, batch: Batch, source: str, index: int) -> Tensor:
        """(B, L, D) per-token vectors of multihot/sequence field `index` (for attention over a history).

        They come from the same rows the pooled field uses, so pooled and per-token views train one table.
        """
        for group in self.groups:
            if any(b.source == source and b.index == index for b in group.bags):
                return group.token_vectors(batch, source, index)
        raise KeyError(f"no {source} field at index {index}")

    def embedding_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, EMBEDDING_TYPES)]


def _resolve_dims(fields: tuple[FieldSpec, ...], dims: int | Mapping[str, int] | Sequence[int],
                  default_dim: int) -> list[int]:
    if isinstance(dims, int):
        return [dims] * len(fields)
    if isinstance(dims, Mapping):
        names = {f.name for f in fields}
        unknown = sorted(set(dims) - names)
        if unknown:
            raise ConfigError(f"field_dims names unknown fields {unknown}", where="model.field_dims",
                              fix=f"use id field names from the shards: {', '.join(sorted(names))}")
        return [int(dims.get(f.name, default_dim)) for f in fields]
    if len(dims) != len(fields):
        raise ConfigError(f"{len(dims)} field dims for {len(fields)} id fields", where="model.field_dims",
                          fix="give one dim per id field, or a mapping field name -> dim")
    return [int(d) for d in dims]
