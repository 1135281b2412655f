"""Stage 4 shared layers: reading a behaviour history against a candidate (target attention).

Histories arrive as the shards store them (see `Batch`): tokens left-aligned, most recent last, 0 = padding
on the right. Every weight here is masked so that no padding position ever receives weight, and an empty
history pools to the zero vector (never NaN). Nothing larger than (B, L, D) is materialised per layer
besides what the math needs (the activation unit's (B, L, hidden) layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import SHARD_A_HISTORY, SearchConfig, divisor_near
from ctrpipe.models.layers.embedding import padded_lookup


@dataclass(frozen=True)
class History:
    """Which stored sequence a model reads (`index` in `Batch.sequence`) and its candidate column."""

    index: int
    name: str
    query: str        # categorical field in the same id space: the candidate the history is read against
    width: int        # stored max_len
    max_len: int      # tokens the model reads (the most recent ones), <= width
    bins: int         # size of the shared id space


def resolve_history(spec: FeatureSpec, model: str, column: str = "", query_key: str = "",
                    max_len: int = 0, need_query: bool = True) -> History:
    """Pick the history and its candidate, with errors that say which config key to set.

    `need_query=False` (a search keyed by the history's own last behaviour): no candidate is required, and
    `query` is "" when the history shares its ids with no categorical column."""
    if not spec.sequence:
        raise SchemaError(f"model {model!r} reads a behaviour sequence, and the shards have none",
                          where="model.name", fix=f"shard with {SHARD_A_HISTORY}, or pick a model such as dnn")
    names = [f.name for f in spec.sequence]
    if column and column not in names:
        raise ConfigError(f"model.sequence.column {column!r} is not a sequence field of the shards",
                          where="model.sequence.column", fix=f"use one of {names}")
    index = names.index(column) if column else 0
    seq = spec.sequence[index]
    cats = {f.name: f for f in spec.categorical}
    same = [f.name for f in spec.categorical if seq.id_space and f.id_space == seq.id_space]
    # the default column is the first history; another may be the one with a candidate
    other = "" if column else next((f"; or read the history {f.name!r}, which has a candidate "
                                    f"(model.sequence.column={f.name})" for f in spec.sequence[1:]
                                    if f.id_space and any(c.id_space == f.id_space for c in spec.categorical)), "")
    if query_key:
        if query_key not in cats:
            raise ConfigError(f"model.sequence.query_key {query_key!r} is not a categorical column of the shards",
                              where="model.sequence.query_key",
                              fix=f"use {same[0]!r}, the column {seq.name!r} shares its ids with" if same else
                              f"use one of {sorted(cats)[:12]}" + other)
        shared = bool(seq.id_space) and cats[query_key].id_space == seq.id_space
        if not shared and not need_query:      # S2 reads no candidate: the configs' query_key need not apply
            query_key = ""
        elif not shared:
            raise ConfigError(f"the history {seq.name!r} and the candidate {query_key!r} do not share an id space, "
                              "so their ids name different things", where="model.sequence.query_key",
                              fix=(f"use model.sequence.query_key={same[0]}, the column {seq.name!r} shares its "
                                   "ids with, or " if same else "")
                              + f"shard with data.sequence[].share_ids_with: {query_key} on {seq.name!r}" + (
                                  "" if model == "din" else ", or read the history against its most recent "
                                  "behaviour (model.sequence.query_mode=S2)") + other)
        query = query_key
    else:
        if not same and need_query:
            raise ConfigError(f"the history {seq.name!r} shares its id space with no categorical column, so there "
                              "is no candidate to read it against", where="model.sequence.query_key",
                              fix=f"shard with data.sequence[].share_ids_with: <candidate column> on {seq.name!r}"
                              + ("" if model == "din" else ", or read the history against its most recent "
                                 "behaviour (model.sequence.query_mode=S2)") + other)
        query = same[0] if same else ""
    if max_len < 0 or max_len > seq.width:
        raise ConfigError(f"model.sequence.max_len={max_len} but the shards store {seq.width} tokens of "
                          f"{seq.name!r}", where="model.sequence.max_len",
                          fix=f"use 0 (all stored tokens) or at most {seq.width}, or reshard with a longer "
                              "data.sequence[].max_len")
    return History(index, seq.name, query, seq.width, max_len or seq.width, seq.bins)


def most_recent(tokens: Tensor, keep: int) -> Tensor:
    """(B, L) left-aligned tokens -> (B, keep) holding each row's `keep` most recent, still left-aligned."""
    n_rows, width = tokens.shape
    if keep >= width:
        return tokens
    lengths = (tokens > 0).sum(dim=1, keepdim=True)
    start = (lengths - keep).clamp(min=0)
    pos = start + torch.arange(keep, device=tokens.device)                  # (B, keep), < width
    return tokens.gather(1, pos)


# Packing the valid behaviours pays while at most this share of the stored positions is valid: gathering
# them and scattering their gradients back costs more per position than the dense form's batched matmuls, so
# nearly full histories run faster dense (forward + backward at B 1024, L 50: DIN's unit crosses over near
# 0.65 valid, DARE's search near 0.55; benchmarks/RESULTS.md, bench_sequence and bench_movielens).
PACK_MAX_FILL = 0.5


def _exporting() -> bool:
    """True while a graph is traced or exported: such graphs keep the dense, static-shape forms."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _pack_on_cpu(mask: Tensor) -> bool:
    """Whether to compute on the valid positions only: on the CPU (counting them is free there; on a GPU it
    would be a host sync every step), outside exported graphs, and when they are few enough to pay."""
    if mask.device.type != "cpu" or _exporting():
        return False
    return int(mask.sum()) <= PACK_MAX_FILL * mask.numel()


def _size_bucket(m: int) -> int:
    """`m` rounded up to one of 16 sizes per power of two (at least 16): few distinct shapes, at most 1/16
    more rows."""
    step = 1 << max(0, m.bit_length() - 5)
    return max(16, -(-m // step) * step)


def _valid_positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) mask -> the row-major flat indices of its True positions (M,) and their rows (M,). Packed forms
    gather with index_select on these: its backward is an index_add, cheaper on the CPU than the
    accumulating index_put that advanced indexing's backward runs."""
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return flat, torch.div(flat, mask.shape[1], rounding_mode="floor")


def ages(mask: Tensor) -> Tensor:
    """(B, L) float: 0 for the most recent token, 1 for the one before, ...; padding positions get 0."""
    lengths = mask.sum(dim=1, keepdim=True)
    pos = torch.arange(mask.shape[1], device=mask.device)
    return ((lengths - 1 - pos) * mask).to(torch.float32)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over the True positions of each row; masked positions and all-padding rows get weight 0."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask


def pool(weights: Tensor, values: Tensor) -> Tensor:
    """(B, L) weights x (B, L, D) values -> (B, D) as one batched matmul."""
    return torch.bmm(weights.unsqueeze(1).to(values.dtype), values).squeeze(1)


class ActivationUnit(nn.Module):
    """DIN's attention score: an MLP over [q, k, q - k, q * k] for every behaviour k, one score each.

    The first layer is applied without building the (B, L, 4D) input: W[q, k, q-k, q*k] =
    (W1 + W3) q + (W2 - W3) k + W4 (q * k), so it holds three D -> H maps (the q - k term folds into the
    other two; the function class is the same). The q map runs once per row, not per behaviour, and so do
    the two k maps, merged: W2 k + W4 (q * k) = (W2 + W4 diag(q)) k, one (D, H) matrix per row and a single
    batched matmul over the history, with no (B, L, D) q * k product and one (B, L, H) output instead of
    three (the measured gain is in benchmarks/RESULTS.md, bench_sequence).
    """

    def __init__(self, dim: int, units: tuple[int, ...] = (36,), dropout: float = 0.0) -> None:
        super().__init__()
        first = units[0]
        self.query = nn.Linear(dim, first)
        self.key = nn.Linear(dim, first, bias=False)
        self.product = nn.Linear(dim, first, bias=False)
        layers: list[nn.Module] = [nn.PReLU(first), nn.Dropout(dropout)]
        for a, b in zip(units[:-1], units[1:], strict=True):
            layers += [nn.Linear(a, b), nn.PReLU(b), nn.Dropout(dropout)]
        layers.append(nn.Linear(units[-1], 1))
        self.rest = nn.Sequential(*layers)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor | None = None) -> Tensor:
        """query (B, D), keys (B, L, D) -> scores (B, L); with a (B, L) `mask`, scores are 0 where it is False.

        On the CPU, when at most PACK_MAX_FILL of the positions are valid, the unit scores only the valid
        behaviours, packed (M, D): histories are often mostly padding (the stored length is a cap), and the
        CPU pays for every position it computes. On a GPU the dense form runs: packing needs the number of
        valid positions on the host (a sync every step), while the GPU's cost barely depends on them.
        Exported graphs (TorchScript, ONNX) hold the dense form too: static shapes, and right wherever the
        graph is served. Both forms compute the same function."""
        if mask is not None and _pack_on_cpu(mask):
            return self._packed(query, keys, mask)
        scores = self._dense(query, keys)
        return scores if mask is None else scores * mask

    def _packed(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        flat, rows = _valid_positions(mask)                                         # (M,), (M,)
        m = flat.numel()
        if torch.is_autocast_enabled("cpu") and mask.numel():
            # bf16 matmuls run through oneDNN, which caches a compiled kernel (and its weights' copy) per
            # shape: a new M every step grew the process by ~0.7 GB over a few hundred steps. Padded to one of
            # 16 sizes per power of two (at most 1/16 more rows); the padding rows score row 0's first slot
            # and are dropped.
            pad = _size_bucket(m) - m
            flat, rows = F.pad(flat, (0, pad)), F.pad(rows, (0, pad))
        k = keys.reshape(-1, keys.shape[-1]).index_select(0, flat)                  # (M, D)
        q = query.index_select(0, rows)
        h = self.query(query).index_select(0, rows) + F.linear(k, self.key.weight) + \
            F.linear(q * k, self.product.weight)
        s = self.rest(h).squeeze(-1)[:m]                                            # (M,)
        return s.new_zeros(mask.numel()).index_put((flat[:m],), s).view(mask.shape)

    def _dense(self, query: Tensor, keys: Tensor) -> Tensor:
        per_row = self.key.weight.t() + query.unsqueeze(-1) * self.product.weight.t()   # (B, D, H)
        h = torch.baddbmm(self.query(query).unsqueeze(1), keys, per_row)   # (B, L, H)
        # PReLU's per-channel weight expects channels on dim 1: run the rest on (B*L, H)
        return self.rest(h.reshape(-1, h.shape[-1])).view(keys.shape[0], keys.shape[1])


class TargetAttention(nn.Module):
    """DIN: sum over behaviours of score(candidate, behaviour) * behaviour, padding excluded.

    `softmax=False` is the paper's form (scores used as they are, so the pooled vector keeps a sense of
    how much of the history is relevant); `softmax=True` normalises over the valid behaviours.
    """

    def __init__(self, dim: int, units: tuple[int, ...] = (36,), dropout: float = 0.0,
                 softmax: bool = False) -> None:
        super().__init__()
        self.unit = ActivationUnit(dim, units, dropout)
        self.softmax = softmax

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        scores = self.unit(query, keys, mask)                                  # (B, L), 0 where masked
        weights = masked_softmax(scores, mask) if self.softmax else scores
        return pool(weights, keys)


class DecoupledSearch(nn.Module):
    """DARE's search: scaled dot products of the candidate's and the behaviours' *attention* vectors pick
    and weight behaviours whose *representation* vectors are summed.

    search="soft": keep the `top_k` best scores and softmax over them; "hard": softmax over the `top_k`
    most recent behaviours; top_k=0: softmax over the whole history. `recency_tau` > 0 subtracts
    age / tau from each score (age 0 = the most recent), favouring recent behaviours before the search.
    """

    def __init__(self, attention_dim: int, top_k: int = 0, search: str = "soft", recency_tau: float = 0.0) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(attention_dim)
        self.top_k = top_k
        self.search = search
        self.recency_tau = recency_tau

    def scores(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """(B, Da) x (B, L, Da) -> (B, L) scaled dot products, recency-adjusted."""
        # float32 before the recency term: under bf16 autocast, age / tau (several units for old behaviours)
        # would be rounded in steps as large as the content scores' differences, reordering the top-k
        s = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1).float() * self.scale
        if self.recency_tau > 0:
            s = s - ages(mask) / self.recency_tau
        return s

    def weights(self, scores: Tensor, mask: Tensor, top_k: int | None = None) -> Tensor:
        """(B, L) float32 weights summing to 1 over the chosen behaviours (0 elsewhere, and for empty histories).

        In float32 whatever the scores' dtype: CUDA autocast runs softmax in float32 but topk and the scatter
        in the scores' bf16/fp16, which would put two dtypes into one scatter; `pool` casts back."""
        scores = scores.float()
        k = self.top_k if top_k is None else top_k
        if k <= 0 or k >= scores.shape[1]:
            return masked_softmax(scores, mask)
        if self.search == "hard":
            lengths = mask.sum(dim=1, keepdim=True)
            pos = torch.arange(mask.shape[1], device=mask.device)
            return masked_softmax(scores, mask & (pos >= lengths - k))
        filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        best, where = filled.topk(k, dim=1)                                    # (B, k)
        chosen = masked_softmax(best, mask.gather(1, where))                   # padding among the k -> 0
        return torch.zeros_like(scores).scatter(1, where, chosen)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (pooled (B, D) from the search, scores (B, L)) — the scores let a caller pool the full history."""
        s = self.scores(query, keys, mask)
        return pool(self.weights(s, mask), values), s


def history_tokens(batch: Batch, history: History) -> Tensor:
    """(B, max_len) int64 tokens the model reads (the most recent `max_len` of the stored ones)."""
    return most_recent(batch.sequence[history.index].long(), history.max_len)


class AttentionTable(nn.Module):
    """DARE's second item table (attention vectors), indexed by the shared id space's ids.

    It is an `nn.Embedding`, so trainers treat it as an embedding table (sparse/lazy optimiser, row-wise
    checkpoints). Row `bins` is an all-zero padding row that history padding points at.
    """

    def __init__(self, bins: int, dim: int, sparse: bool, init_std: float) -> None:
        super().__init__()
        weight = torch.empty(bins + 1, dim)
        with torch.no_grad():
            # never all zero (embedding_init_std 0): a score is a dot product of two attention vectors, so
            # at zero each one's gradient is the other's zero vector and the table would never train
            nn.init.normal_(weight, 0.0, init_std if init_std > 0 else 1e-2)
            weight[bins].zero_()
        self.pad = bins
        self.mask_padding: bool | None = None      # see embedding.masks_padding
        self.table = nn.Embedding(bins + 1, dim, padding_idx=bins, sparse=sparse, _weight=weight)

    @torch.compiler.disable   # sparse gradients (see embedding.py)
    def forward(self, ids: Tensor, padding: Tensor | None = None) -> Tensor:
        """ids (...) -> (..., Da); where `padding` is True the padding row is used instead."""
        if padding is not None:
            ids = torch.where(padding, self.pad, ids)
        return padded_lookup(ids, self.table.weight, self.pad, self.table.sparse, self.mask_padding)


class DareEncoder(nn.Module):
    """DARE's sequence part: the candidate (S1) and/or the most recent behaviour (S2) searches the history
    with attention vectors from its own table, and the found behaviours' representation vectors (the shared
    rows of `embedding`) are summed. Output per query: [query, pooled, query * pooled] as three (B, D)
    fields, and the same from a softmax over the whole history (for an auxiliary head) when asked.
    """

    def __init__(self, spec: FeatureSpec, history: History, cfg: SearchConfig, attention_dim: int,
                 representation_dim: int, sparse: bool, init_std: float) -> None:
        super().__init__()
        if attention_dim > representation_dim:   # decoupling keeps the ranking vectors the cheap ones
            raise ConfigError(f"model.attention_dim={attention_dim} is wider than the {representation_dim}-d "
                              f"representation vectors of {history.name!r}", where="model.attention_dim",
                              fix=f"use at most {representation_dim}, e.g. {max(1, representation_dim // 2)}: "
                                  "DARE's attention vectors only rank behaviours")
        if cfg.top_k > history.max_len:
            raise ConfigError(f"model.sequence.top_k={cfg.top_k} is larger than the {history.max_len} behaviours "
                              f"read from {history.name!r}", where="model.sequence.top_k",
                              fix=f"use at most {history.max_len} (or 0: attend over the whole history)")
        self.history = history
        names = [f.name for f in spec.categorical]
        self.query_col = names.index(history.query) if history.query else -1   # column in Batch.categorical
        self.queries = {"S1": ("candidate",), "S2": ("last",), "concat": ("candidate", "last")}[cfg.query_mode]
        if "candidate" in self.queries and not history.query:
            raise ConfigError(f"query_mode={cfg.query_mode} reads {history.name!r} against a candidate, and no "
                              "categorical column shares its ids", where="model.sequence.query_mode",
                              fix="use model.sequence.query_mode=S2 (the most recent behaviour is the query), or "
                                  f"shard with data.sequence[].share_ids_with: <candidate column> on {history.name!r}")
        self.table = AttentionTable(history.bins, attention_dim, sparse, init_std)
        self.search = DecoupledSearch(attention_dim, cfg.top_k, cfg.search, cfg.recency_tau)
        self.encoder: nn.Module | None = None
        if cfg.transformer_block:
            t = cfg.tfm
            if attention_dim % t.n_heads:
                raise ConfigError(f"model.sequence.tfm.n_heads={t.n_heads} does not divide attention_dim="
                                  f"{attention_dim}", where="model.sequence.tfm.n_heads",
                                  fix=f"use e.g. model.sequence.tfm.n_heads={divisor_near(t.n_heads, attention_dim)}"
                                      f" (n_heads must divide attention_dim {attention_dim})")
            layer = nn.TransformerEncoderLayer(attention_dim, t.n_heads, t.ffn_hidden or 4 * attention_dim,
                                               t.dropout, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, t.n_layers, enable_nested_tensor=False)
        self.n_fields = 3 * len(self.queries)

    def forward(self, batch: Batch, emb: nn.Module, full: bool = False) -> tuple[Tensor, Tensor | None]:
        """-> (B, n_fields, D) search features, and the full-attention ones (or None unless `full`).

        `emb` is the model's FieldEmbedding: its rows of the shared id space are the representation table.
        """
        tokens = history_tokens(batch, self.history)                          # (B, L)
        mask = tokens > 0
        if self.encoder is None and _pack_on_cpu(mask):
            return self._packed(batch, emb, tokens, mask, full)
        return self._dense(batch, emb, tokens, mask, full)

    def _values(self, batch: Batch, emb: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """Representation vectors of `tokens` (any shape) and, when a query is the candidate, its (B, D)
        vector: one lookup of their shared rows (FieldEmbedding.history_with_candidate)."""
        if "candidate" not in self.queries:
            return emb.token_vectors(batch, "sequence", self.history.index, tokens), None
        return emb.history_with_candidate(batch, "sequence", self.history.index, tokens, self.history.query)

    def _dense(self, batch: Batch, emb: nn.Module, tokens: Tensor, mask: Tensor,
               full: bool) -> tuple[Tensor, Tensor | None]:
        """`forward` on the (B, L) layout: GPUs (no host sync for the packed count), exported graphs (static
        shapes) and the transformer block."""
        values, candidate = self._values(batch, emb, tokens)                    # (B, L, D), (B, D) or None
        keys = self.table(tokens, padding=~mask)                                # (B, L, Da)
        if self.encoder is not None:
            # an all-padding row would give NaN in the encoder's softmax: it may see its first (zero) slot;
            # the search below masks every padding position again
            open_ = mask.clone()
            open_[:, 0] = True
            keys = self.encoder(keys, src_key_padding_mask=~open_) * mask.unsqueeze(-1)
        out, out_full = [], []
        for q in self.queries:
            if q == "candidate":
                ids = batch.categorical[:, self.query_col].long()
                q_att, q_rep = self.table(ids), candidate
            else:   # the most recent behaviour; an empty history gives zero vectors
                last = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)         # (B, 1)
                q_att = keys.gather(1, last.unsqueeze(-1).expand(-1, -1, keys.shape[-1])).squeeze(1)
                q_rep = values.gather(1, last.unsqueeze(-1).expand(-1, -1, values.shape[-1])).squeeze(1)
            pooled, scores = self.search(q_att, keys, values, mask)
            out += [q_rep, pooled, q_rep * pooled]
            if full:
                whole = pool(masked_softmax(scores, mask), values)
                out_full += [q_rep, whole, q_rep * whole]
        return torch.stack(out, dim=1), (torch.stack(out_full, dim=1) if full else None)

    def _packed(self, batch: Batch, emb: nn.Module, tokens: Tensor, mask: Tensor,
                full: bool) -> tuple[Tensor, Tensor | None]:
        """`forward` on the valid behaviours only, packed (M, ·), on the CPU when at most PACK_MAX_FILL of the
        positions are valid: as ActivationUnit's packed form, the CPU pays for every position it computes,
        and a stored history is mostly padding when its cap is far above the typical length. Both tables are
        read for M tokens instead of B * L (so their sparse gradients hold M rows), scores are M dot products,
        and pooling adds M weighted vectors into their rows. Only the (B, L) scores are laid out densely, for
        the search's top-k and softmax. In fp32, the dense form's values up to float summation order; under CPU
        bf16 autocast the dense form's bmm runs in bf16 while these elementwise products stay fp32 (the more
        exact of the two). Not used with the transformer block, which needs the dense layout."""
        n_rows = tokens.shape[0]
        flat, rows = _valid_positions(mask)                                     # (M,), (M,)
        tok = tokens.reshape(-1).index_select(0, flat)
        values, candidate = self._values(batch, emb, tok)                       # (M, D), (B, D) or None
        keys = self.table(tok)                                                  # (M, Da)
        lengths = mask.sum(dim=1)
        out, out_full = [], []
        for q in self.queries:
            if q == "candidate":
                ids = batch.categorical[:, self.query_col].long()
                q_att, q_rep = self.table(ids), candidate
            else:   # the most recent behaviour, the last packed one of its row; an empty row reads a zero row
                last = torch.where(lengths > 0, lengths.cumsum(0) - 1, keys.shape[0])
                q_att = torch.cat([keys, keys.new_zeros(1, keys.shape[1])])[last]
                q_rep = torch.cat([values, values.new_zeros(1, values.shape[1])])[last]
            s = (keys * q_att.index_select(0, rows)).sum(dim=-1).float() * self.search.scale   # (M,), as dense
            if self.search.recency_tau > 0:                                     # age = length - 1 - column
                age = lengths.index_select(0, rows) - 1 - (flat - rows * mask.shape[1])
                s = s - age.float() / self.search.recency_tau
            scores = s.new_zeros(mask.numel()).index_put((flat,), s).view(mask.shape)   # padding masked below
            pooled = _pool_packed(self.search.weights(scores, mask), flat, rows, values, n_rows)
            out += [q_rep, pooled, q_rep * pooled]
            if full:
                whole = _pool_packed(masked_softmax(scores, mask), flat, rows, values, n_rows)
                out_full += [q_rep, whole, q_rep * whole]
        return torch.stack(out, dim=1), (torch.stack(out_full, dim=1) if full else None)


def _pool_packed(weights: Tensor, flat: Tensor, rows: Tensor, values: Tensor, n_rows: int) -> Tensor:
    """(B, L) weights x packed (M, D) values at `flat` (`_valid_positions`) -> (B, D): `pool` without the
    padding positions."""
    w = weights.reshape(-1).index_select(0, flat).to(values.dtype).unsqueeze(-1)
    return values.new_zeros(n_rows, values.shape[1]).index_add(0, rows, w * values)
