"""Stage 4 shared layer: id-valued fields (categorical, multihot, sequence) -> one vector per field.

Fields that share a dimension share one table: local ids + per-field row offsets (int64), so all categorical
fields cost one `nn.Embedding` call and all bag fields (multihot + sequence) one `nn.EmbeddingBag` call.

Convention for trainers: every `nn.Embedding` / `nn.EmbeddingBag` submodule of a model holds *embedding
parameters* (built with `sparse=` as the model was); everything else is dense. `split_parameters(model)`
applies the convention.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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


def masks_padding(weight: Tensor, sparse: bool, force: bool | None = None) -> bool:
    """Whether a lookup keeps the padding row out of training by zero weights or a mask rather than
    `padding_idx`: on CUDA, torch's sparse backward drops `padding_idx` entries with a boolean mask, a host
    sync in every step. The padding row then gets an all-zero gradient, which leaves it zero under every
    optimiser here (its moments stay zero). On CPU `padding_idx` costs no sync and keeps the sparse gradient
    smaller, so it stays. `force` (a module's `mask_padding`) picks a path on any device: tests run the CUDA
    path on CPU with it."""
    return (sparse and weight.is_cuda) if force is None else force


def padded_lookup(ids: Tensor, weight: Tensor, pad: int, sparse: bool, force: bool | None = None) -> Tensor:
    """(..., D) rows of `weight` at `ids`; positions holding `pad` are zero vectors and send no gradient to
    any row but zeros to the padding row. `force`: see `masks_padding`."""
    if not masks_padding(weight, sparse, force):
        return nn.functional.embedding(ids, weight, padding_idx=pad, sparse=sparse)
    out = nn.functional.embedding(ids, weight, sparse=sparse)
    return out * (ids != pad).unsqueeze(-1).to(out.dtype)


@dataclass(frozen=True)
class _BagField:
    source: str      # "multihot" or "sequence"
    index: int       # position in batch.multihot / batch.sequence
    # local token t in [1, bins) -> table row offset + t. Own rows live in the bag table, whose row 0 is the
    # shared padding row; a field sharing a categorical field's id space reads that field's rows of the
    # categorical table (offset = its start) and pads with the categorical table's padding row
    offset: int
    weighted: bool
    mean: bool       # divide by the number of non-padding tokens (sequences always; multihot per `pooling`)
    shared: bool = False   # True: rows of the categorical table (data.sequence[].share_ids_with)
    pooled: bool = True    # False: kept out of the pooled output (a model attends over it instead)
    name: str = ""


class _TableGroup(nn.Module):
    """Fields of one dimension: an nn.Embedding for categorical fields, an nn.EmbeddingBag for bag fields.

    A bag field in the id space of a categorical field of this group (`FieldSpec.id_space`) has no rows of
    its own: its tokens index that field's rows of the categorical table, so a history of items and the
    candidate item train one set of vectors. The categorical table then gets one extra, all-zero padding row
    (its last) that padding tokens point at and that never receives a gradient.
    """

    def __init__(self, spec: FeatureSpec, cat_cols: list[int], bag_fields: list[tuple[str, int]], dim: int,
                 sparse: bool, pooling: PoolingMode, init_std: float,
                 unpooled: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.mask_padding: bool | None = None      # see masks_padding
        self.cat_table: nn.Embedding | None = None
        self.bag_table: nn.EmbeddingBag | None = None
        self.cat_pad: int | None = None
        self.all_cat = cat_cols == list(range(len(spec.categorical)))
        self.cat_col_list = list(cat_cols)
        self.cat_names = [spec.categorical[c].name for c in cat_cols]
        cat_start: dict[str, int] = {}     # id space -> first row of the categorical field that anchors it
        bag_specs: list[tuple[str, int, FieldSpec]] = [(src, i, getattr(spec, src)[i]) for src, i in bag_fields]
        if cat_cols:
            bins = [spec.categorical[c].bins for c in cat_cols]
            starts = [0]
            for b in bins[:-1]:
                starts.append(starts[-1] + b)
            for c, start in zip(cat_cols, starts, strict=True):
                space = spec.categorical[c].id_space
                if space and space not in cat_start:
                    cat_start[space] = start
            borrowed = any(fs.id_space in cat_start for _, _, fs in bag_specs)
            rows = sum(bins) + (1 if borrowed else 0)
            weight = _initial(rows, dim, init_std)
            if borrowed:
                self.cat_pad = sum(bins)
                weight[self.cat_pad].zero_()
            self.cat_table = nn.Embedding(rows, dim, sparse=sparse, padding_idx=self.cat_pad, _weight=weight)
            self.register_buffer("cat_offsets", torch.tensor(starts, dtype=torch.int64), persistent=False)
            self.register_buffer("cat_cols", torch.tensor(cat_cols, dtype=torch.int64), persistent=False)
        self.bags: list[_BagField] = []
        own_rows = 1
        for source, i, fs in bag_specs:
            is_mh = source == "multihot"
            mean = pooling == "mean" or not is_mh
            weighted = is_mh and fs.weighted
            pooled = fs.name not in unpooled
            if fs.id_space in cat_start:
                anchor = next(spec.categorical[c] for c in cat_cols if spec.categorical[c].id_space == fs.id_space)
                if anchor.bins != fs.bins:
                    raise ConfigError(f"{source} field {fs.name!r} shares the id space of {anchor.name!r} but has "
                                      f"{fs.bins} ids, not {anchor.bins}", where="manifest (id_space)",
                                      fix="rebuild the shards: fields of one id space get equal bins")
                self.bags.append(_BagField(source, i, cat_start[fs.id_space], weighted, mean, True, pooled,
                                           fs.name))
            else:
                self.bags.append(_BagField(source, i, own_rows - 1, weighted, mean, False, pooled, fs.name))
                own_rows += fs.bins - 1
        if any(not b.shared for b in self.bags):
            # mode="sum" + per-sample weights covers weighted, unweighted and padded tokens in one call
            weight = _initial(own_rows, dim, init_std)
            weight[0].zero_()
            self.bag_table = nn.EmbeddingBag(own_rows, dim, mode="sum", sparse=sparse, padding_idx=0,
                                             _weight=weight)
        self.pooled_bags = [b for b in self.bags if b.pooled]
        # pooled bag outputs are computed per table (own rows, then borrowed rows) and put back in field order
        order = [b for b in self.pooled_bags if not b.shared] + [b for b in self.pooled_bags if b.shared]
        perm = [order.index(b) for b in self.pooled_bags]
        # a buffer, not a list: indexing with a list copies it to the device from pageable memory in every
        # forward, which waits for the stream
        self.register_buffer("reorder", torch.tensor(perm, dtype=torch.int64)
                             if perm != list(range(len(perm))) else None, persistent=False)
        self.n_outputs = len(cat_cols) + len(self.pooled_bags)

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
            # categorical ids never point at the padding row: no padding_idx, whose sparse backward syncs
            parts.append(nn.functional.embedding(cat.long() + self.cat_offsets, self.cat_table.weight,
                                                 sparse=self.cat_table.sparse))      # (B, Fc, D)
        if self.pooled_bags:
            parts.append(self._pool_bags(batch))                             # (B, Fb, D)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _pool_bags(self, batch: Batch) -> Tensor:
        outs = []
        own = [f for f in self.pooled_bags if not f.shared]
        shared = [f for f in self.pooled_bags if f.shared]
        if own:
            outs.append(self._pool(batch, own, self.bag_table.weight, 0, self.bag_table.sparse))
        if shared:
            assert self.cat_table is not None and self.cat_pad is not None
            outs.append(self._pool(batch, shared, self.cat_table.weight, self.cat_pad, self.cat_table.sparse))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out if self.reorder is None else out.index_select(1, self.reorder)

    def _pool(self, batch: Batch, fields: list[_BagField], weight: Tensor, pad: int, sparse: bool) -> Tensor:
        """(B, len(fields), D): (weighted) sums or means of each field's token vectors, padding excluded."""
        idx, weights, starts, counts = [], [], [], []
        pos = 0
        dtype = weight.dtype
        for f in fields:   # loop over (few) bag fields; rows are handled as whole tensors
            tok = (batch.multihot if f.source == "multihot" else batch.sequence)[f.index].long()   # (B, L)
            n_rows, width = tok.shape
            valid = tok > 0
            idx.append(torch.where(valid, tok + f.offset, pad).reshape(-1))
            w = batch.multihot_weights[f.index] if f.weighted else None
            w = valid.to(dtype) if w is None else w.to(dtype) * valid
            weights.append(w.reshape(-1))
            starts.append(torch.arange(n_rows, device=tok.device) * width + pos)
            counts.append(valid.sum(dim=1) if f.mean else torch.ones_like(tok[:, 0]))
            pos += n_rows * width
        if torch.compiler.is_exporting():
            # ONNX has no embedding bag (onnxscript lowers one to a loop with one step per bag, i.e. per row and
            # field): a gather and a weighted sum over each field's padded width give the same sums
            out = torch.stack([(nn.functional.embedding(i.view(n_rows, -1), weight) * w.view(n_rows, -1, 1)).sum(1)
                               for i, w in zip(idx, weights, strict=True)], dim=1)      # (B, Fb, D)
        else:
            # padding tokens weigh 0: where padding_idx would sync (masks_padding) they need no more
            out = nn.functional.embedding_bag(torch.cat(idx), weight, torch.cat(starts), mode="sum",
                                              sparse=sparse, per_sample_weights=torch.cat(weights),
                                              padding_idx=None if masks_padding(weight, sparse, self.mask_padding)
                                              else pad)
            out = out.view(len(fields), -1, out.shape[-1]).transpose(0, 1)   # (B, Fb, D)
        if any(f.mean for f in fields):   # mean of (weight *) vector over non-padding tokens; empty bag -> 0
            out = out / torch.stack(counts, dim=1).clamp(min=1).unsqueeze(-1).to(dtype)
        return out

    def _bag_rows(self, batch: Batch, source: str, index: int, tokens: Tensor | None) -> tuple[_BagField, Tensor]:
        """A bag field and the table rows of its tokens (or of `tokens`), padding at the table's padding row."""
        f = next(b for b in self.bags if b.source == source and b.index == index)
        tok = (getattr(batch, source)[index] if tokens is None else tokens).long()   # (B, L)
        pad = self.cat_pad if f.shared else 0
        return f, torch.where(tok > 0, tok + f.offset, pad)

    def cat_rows(self, batch: Batch, name: str) -> Tensor:
        """(B,) rows of categorical field `name` of this group in its table."""
        j = self.cat_names.index(name)
        return batch.categorical[:, self.cat_col_list[j]].long() + self.cat_offsets[j]

    @torch.compiler.disable   # sparse gradients: see forward
    def token_vectors(self, batch: Batch, source: str, index: int, tokens: Tensor | None = None) -> Tensor:
        """Unpooled (B, L, D) vectors of one bag field's tokens (or of `tokens` of that field, e.g. a
        truncated history); padding positions are zero vectors."""
        f, rows = self._bag_rows(batch, source, index, tokens)
        table, pad = (self.cat_table, self.cat_pad) if f.shared else (self.bag_table, 0)
        return padded_lookup(rows, table.weight, pad, table.sparse, self.mask_padding)

    def history_with_candidate(self, batch: Batch, source: str, index: int, tokens: Tensor | None,
                               name: str) -> tuple[Tensor, Tensor]:
        """`token_vectors` of a bag field that reads the categorical table, and (B, D) vectors of categorical
        field `name` of this group, from one lookup (see FieldEmbedding.history_with_candidate)."""
        f, rows = self._bag_rows(batch, source, index, tokens)
        assert f.shared and self.cat_table is not None and self.cat_pad is not None
        both = torch.cat([rows.reshape(-1), self.cat_rows(batch, name)])
        out = padded_lookup(both, self.cat_table.weight, self.cat_pad, self.cat_table.sparse, self.mask_padding)
        n = rows.numel()
        return out[:n].view(*rows.shape, out.shape[-1]), out[n:]                # both contiguous


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

    Fields that share an id space (`FieldSpec.id_space`, e.g. a history of items beside the candidate item)
    read the same rows: the history's tokens index the candidate field's rows of the categorical table.

    Args:
        dims: one dim for all fields, a mapping field name -> dim (others get `default_dim`), or one dim per
            field in `spec.id_fields` order. Fields of one id space need one dim.
        mode: "shared" = one table per distinct dim (fast: one lookup); "per_field" = one table per field
            (per id space for fields that share one).
        unpooled: multihot/sequence fields left out of `forward` / `flat` (a model that attends over a
            history reads it through `token_vectors` instead); their rows still exist.
    """

    def __init__(self, spec: FeatureSpec, dims: int | Mapping[str, int] | Sequence[int] = 16,
                 mode: EmbeddingMode = "shared", sparse: bool = False, pooling: PoolingMode = "mean",
                 init_std: float = 1e-2, default_dim: int = 16, unpooled: Collection[str] = ()) -> None:
        super().__init__()
        kinds = [("categorical", i) for i in range(len(spec.categorical))]
        kinds += [("multihot", i) for i in range(len(spec.multihot))]
        kinds += [("sequence", i) for i in range(len(spec.sequence))]
        fields = spec.id_fields
        per_field = _resolve_dims(fields, dims, default_dim)
        unpooled = frozenset(unpooled)
        bag_names = {f.name for f in spec.multihot + spec.sequence}
        unknown = sorted(unpooled - bag_names)
        if unknown:
            raise ConfigError(f"fields {unknown} cannot be left unpooled: they are not multihot or sequence "
                              "fields", where="model", fix=f"use one of {sorted(bag_names)}")
        _check_spaces(fields, per_field)
        # shared: fields of one dim share a table; per_field: every field (or id space) is its own group
        keys = [("dim", d) if mode == "shared" else ("space", f.id_space) if f.id_space else ("field", f.name)
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
            self.groups.append(_TableGroup(spec, cat_cols, bags, dim, sparse, pooling, init_std, unpooled))
            # output order inside a group: categorical first, then bag fields
            for p in [q for q in positions if kinds[q][0] == "categorical"] + \
                     [q for q in positions if kinds[q][0] != "categorical"]:
                if fields[p].name in unpooled:
                    continue
                names.append(fields[p].name)
                out_dims.append(per_field[p])
        self.field_names: tuple[str, ...] = tuple(names)       # order of the F axis of `forward`
        self.field_dims: tuple[int, ...] = tuple(out_dims)
        self.n_fields = len(names)
        self.dim: int | None = out_dims[0] if out_dims and len(set(out_dims)) == 1 else None  # None: unequal
        self.flat_dim = sum(out_dims)
        self._dims = dict(zip((f.name for f in fields), per_field, strict=True))

    def dim_of(self, name: str) -> int:
        """The embedding dim of any id field (pooled or not)."""
        return self._dims[name]

    def forward(self, batch: Batch) -> Tensor:
        """(B, F, D) field-stacked vectors; needs equal dims (self.dim is not None)."""
        if self.dim is None:
            raise RuntimeError("FieldEmbedding.forward needs equal field dims; use .flat() instead")
        outs = [g(batch) for g in self.groups if g.n_outputs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def flat(self, batch: Batch) -> Tensor:
        """(B, sum of field dims): works with unequal dims too."""
        outs = [g(batch).flatten(1) for g in self.groups if g.n_outputs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def token_vectors(self, batch: Batch, source: str, index: int, tokens: Tensor | None = None) -> Tensor:
        """(B, L, D) per-token vectors of multihot/sequence field `index` (for attention over a history);
        `tokens` replaces the batch's tokens of that field (e.g. only the most recent ones).

        They come from the same rows the pooled field uses, so pooled and per-token views train one table.
        """
        for group in self.groups:
            if any(b.source == source and b.index == index for b in group.bags):
                return group.token_vectors(batch, source, index, tokens)
        raise KeyError(f"no {source} field at index {index}")

    @torch.compiler.disable   # sparse gradients: see _TableGroup.forward
    def history_with_candidate(self, batch: Batch, source: str, index: int, tokens: Tensor | None,
                               name: str) -> tuple[Tensor, Tensor]:
        """(`token_vectors`, `lookup(name)`) of a history and its candidate. Where the history reads the
        candidate's rows (data.sequence[].share_ids_with), one lookup serves both: the table gets one sparse
        gradient from them instead of two that autograd must add."""
        for group in self.groups:
            if name in group.cat_names and any(b.source == source and b.index == index and b.shared
                                               for b in group.bags):
                return group.history_with_candidate(batch, source, index, tokens, name)
        return self.token_vectors(batch, source, index, tokens), self.lookup(batch, name)

    @torch.compiler.disable   # sparse gradients: see _TableGroup.forward
    def lookup(self, batch: Batch, name: str) -> Tensor:
        """(B, D) vectors of one categorical field (the candidate of a target attention), from its rows."""
        for group in self.groups:
            if name in group.cat_names:
                table = group.cat_table
                return nn.functional.embedding(group.cat_rows(batch, name), table.weight,
                                               sparse=table.sparse)                  # no padding: see forward
        raise KeyError(f"no categorical field {name!r}")

    def embedding_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, EMBEDDING_TYPES)]


def _check_spaces(fields: tuple[FieldSpec, ...], dims: list[int]) -> None:
    """Fields of one id space read the same rows, so they need one dim."""
    by_space: dict[str, set[int]] = {}
    for f, d in zip(fields, dims, strict=True):
        if f.id_space:
            by_space.setdefault(f.id_space, set()).add(d)
    for space, ds in by_space.items():
        if len(ds) > 1:
            names = [f.name for f in fields if f.id_space == space]
            raise ConfigError(f"fields {names} share the id space {space!r} but get dims {sorted(ds)}",
                              where="model.field_dims", fix=f"give {names} one dim in model.field_dims")


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
