"""Stage 1: co-visitation features. On TRAIN rows only, count how often a target categorical value t appears
with each context token c (n(t, c)) and how often c appears at all (n(c)); then give every row the max and
mean over its context tokens of n(t, c) / (n(c) + smoothing).

Counts live in sorted (uint64 key, int64 count) tables merged per chunk, so memory grows with the number of
distinct pairs, never with rows; the write pass looks them up through a hash index (`CountTable.index`).
Train rows that were counted are scored leave-one-out (their own occurrences are subtracted: a token a
history holds twice counted twice), so train and val/test rows see the same feature distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctrpipe.data.fitted import CountTable, KeyCounter
from ctrpipe.data.splits import mix64
from ctrpipe.native import native

_PAIR_SALT = np.uint64(0xC0F1_5175_0000_0001)


def pair_keys(target: np.ndarray, context: np.ndarray) -> np.ndarray:
    """One uint64 key per (target hash, context hash); order matters (t, c) != (c, t)."""
    return mix64(target ^ mix64(context ^ _PAIR_SALT))


def row_pair_keys(target: np.ndarray, ctx: ContextTokens) -> np.ndarray:
    """(M,) pair_keys(target[row of token j], ctx.hashes[j]): in one compiled pass where the kernel is built
    (no (M,) row index, gather or temporaries), else numpy."""
    kernel = native()
    if kernel is None:
        return pair_keys(target[ctx.row_of_token], ctx.hashes)
    out = np.empty(len(ctx.hashes), dtype=np.uint64)
    kernel.pair_keys(np.ascontiguousarray(target, dtype=np.uint64), np.ascontiguousarray(ctx.lengths, np.int64),
                     np.ascontiguousarray(ctx.hashes, dtype=np.uint64), int(_PAIR_SALT), out)
    return out


@dataclass(frozen=True)
class ContextTokens:
    """Context tokens of N rows, flattened: `hashes[offsets[i]:offsets[i+1]]` belong to row i."""

    hashes: np.ndarray        # (M,) uint64
    lengths: np.ndarray       # (N,) int64

    @property
    def row_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths), dtype=np.int64), self.lengths)


class CovisitCounter:
    """Pass 1: accumulate n(t, c) and n(c) over train rows whose target is present."""

    def __init__(self) -> None:
        self.pairs = KeyCounter()
        self.ctx = KeyCounter()

    def update(self, target: np.ndarray, target_missing: np.ndarray, ctx: ContextTokens,
               counted: np.ndarray) -> None:
        """target: (N,) uint64 hashes; counted: (N,) bool rows to count (train split)."""
        use_row = counted & ~target_missing
        if use_row.all():
            self.ctx.add(ctx.hashes)
            self.pairs.add(row_pair_keys(target, ctx))
            return
        keep = use_row[ctx.row_of_token]
        tokens = ctx.hashes[keep]
        self.ctx.add(tokens)
        self.pairs.add(row_pair_keys(target[use_row], ContextTokens(tokens, ctx.lengths[use_row])))

    def tables(self) -> tuple[CountTable, CountTable]:
        return CountTable(self.pairs.keys, self.pairs.counts), CountTable(self.ctx.keys, self.ctx.counts)


def covisit_features(pairs: CountTable, ctx_table: CountTable, target: np.ndarray, target_missing: np.ndarray,
                     ctx: ContextTokens, smoothing: float, leave_one_out: np.ndarray) -> np.ndarray:
    """(N, 2) float32 [max, mean] of n(t, c) / (n(c) + smoothing) over each row's context tokens.

    Rows with a missing target or no context tokens get 0. `leave_one_out` (N,) bool marks rows that were
    themselves counted in pass 1; their own occurrence is removed from both counts.
    """
    n = len(target)
    loo_row = leave_one_out & ~target_missing
    kernel = native()
    if kernel is not None:
        out = np.empty((n, 2), dtype=np.float32)
        if n:
            p, c = pairs.index, ctx_table.index
            kernel.covisit_rows(p.table, p.zero_value or 0, c.table, c.zero_value or 0,
                                np.ascontiguousarray(target, dtype=np.uint64),
                                np.ascontiguousarray(ctx.lengths, dtype=np.int64),
                                np.ascontiguousarray(ctx.hashes, dtype=np.uint64), int(_PAIR_SALT),
                                loo_row.astype(np.uint8), float(smoothing), out)
        out[target_missing] = 0.0
        return out
    out = np.zeros((n, 2), dtype=np.float32)
    if len(ctx.hashes) == 0:
        return out
    score = _scores(pairs, ctx_table, target, ctx, loo_row, smoothing)      # (M,)
    has = ctx.lengths > 0
    starts = np.concatenate([[0], np.cumsum(ctx.lengths)[:-1]])[has]
    mx = np.maximum.reduceat(score, starts)
    mean = np.add.reduceat(score, starts) / ctx.lengths[has]
    out[has, 0] = mx
    out[has, 1] = mean
    out[target_missing] = 0.0
    return out


def _occurrences_in_row(ctx: ContextTokens) -> np.ndarray:
    """(M,) how often each context token's hash occurs in its own row."""
    row = ctx.row_of_token
    order = np.lexsort((ctx.hashes, row))
    r, h = row[order], ctx.hashes[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (r[1:] != r[:-1]) | (h[1:] != h[:-1])
    group = np.cumsum(first) - 1
    out = np.empty(len(order), dtype=np.float64)
    out[order] = np.bincount(group)[group]
    return out


def _scores(pairs: CountTable, ctx_table: CountTable, target: np.ndarray, ctx: ContextTokens, loo_row: np.ndarray,
            smoothing: float) -> np.ndarray:
    """(M,) float64 max(n(t, c) - loo, 0) / (max(n(c) - loo, 0) + smoothing) per context token, loo the row's
    own occurrences of c (the numpy path; the compiled `covisit_rows` computes the same arithmetic and each
    row's max and mean in one pass)."""
    n_tc = pairs.index.lookup(row_pair_keys(target, ctx)).astype(np.float64)
    n_c = ctx_table.index.lookup(ctx.hashes).astype(np.float64)
    if loo_row.any():
        loo = loo_row[ctx.row_of_token] * _occurrences_in_row(ctx)
        n_tc -= loo
        n_c -= loo
    return np.maximum(n_tc, 0.0) / (np.maximum(n_c, 0.0) + smoothing)
