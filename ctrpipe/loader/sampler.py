"""Stage 3: the order of one epoch as runs of rows per batch ("pieces"), decided once from (seed, epoch).

Two shuffles, both vectorised and both reading memmaps a batch at a time:

* ``block`` (default): the view's rows are cut into blocks of `block_rows` consecutive rows per shard;
  the epoch permutes shards, then blocks within windows of `window_shards` shards (0 = all shards: one
  global block permutation). A batch is filled from consecutive blocks and may straddle shards. Each block
  is one memcpy-like slice, so a batch costs ~B/block_rows slices per array. Rows inside a block stay
  together, which is harmless for SGD when blocks are small next to the batch (a 4096-row batch mixes 16
  random 256-row blocks); the global window keeps consecutive batches from coming out of one shard (one
  stretch of time when the input was in time order).
* ``gather``: one global row permutation; each batch's rows are sorted and gathered per shard (`np.take` into
  the host buffer). Fully i.i.d. batches, but every row is a random access.

Why block is the default: on a Criteo-shaped cache with the page cache warm, block-256 runs well ahead of
gather, each timed against a plain np.copyto of the same bytes (benchmarks/bench_loader.py; figures in
benchmarks/RESULTS.md). Random row reads should suffer more once a cache exceeds RAM (each one a page fault;
not measured).
Smaller blocks (64) fall to gather's speed: per-slice overhead then dominates.

Unshuffled, both give the view's global order (shard by shard, ascending rows), in maximal contiguous slices.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import numpy as np

from ctrpipe.loader.view import ViewIndex

ShuffleStrategy = Literal["block", "gather"]


class Piece(NamedTuple):
    """A run of rows of one shard: local rows [start, stop) when `rows` is None, else the sorted `rows`."""

    shard: int
    start: int
    stop: int
    rows: np.ndarray | None = None

    def __len__(self) -> int:  # type: ignore[override]  # NamedTuple's len is its field count; we mean rows
        return self.stop - self.start if self.rows is None else len(self.rows)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Independent, reproducible stream per (seed, epoch); negative seeds are folded into uint64."""
    return np.random.default_rng([int(seed) & (2**64 - 1), int(epoch) & (2**64 - 1)])


def _runs(shard: int, local: np.ndarray) -> Piece:
    """One piece for sorted local rows: a slice when they are consecutive, else a gather."""
    if len(local) and int(local[-1]) - int(local[0]) == len(local) - 1:
        return Piece(shard, int(local[0]), int(local[-1]) + 1)
    return Piece(shard, 0, 0, local)


class EpochPlan:
    """Which pieces make batch k of one epoch. Built in O(rows / block_rows) (block) or O(rows) (gather)."""

    def __init__(self, index: ViewIndex, batch_size: int, *, shuffle: bool, strategy: ShuffleStrategy,
                 block_rows: int, window_shards: int, drop_last: bool, rng: np.random.Generator) -> None:
        self.index = index
        self.batch_size = batch_size
        n = index.num_rows
        self.num_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.total = min(n, self.num_batches * batch_size)  # rows served this epoch
        self.gather = shuffle and strategy == "gather"
        if self.gather:
            self.perm = rng.permutation(n)
        else:
            self._plan_blocks(block_rows, shuffle, window_shards, rng)

    def _plan_blocks(self, block_rows: int, shuffle: bool, window_shards: int,
                     rng: np.random.Generator) -> None:
        counts = np.diff(self.index.offsets)                              # (S,) view rows per shard
        if not shuffle:  # one block per shard: batches are then one or two big slices (or sorted gathers)
            block_rows = max(int(counts.max(initial=0)), 1)
        n_blocks = -(-counts // block_rows)                              # (S,)
        block_ids = np.concatenate([[0], np.cumsum(n_blocks)])           # shard s: blocks [ids[s], ids[s+1])
        shard = np.repeat(np.arange(len(counts)), n_blocks)              # (NB,) block -> shard
        pos = (np.arange(len(shard)) - block_ids[shard]) * block_rows    # (NB,) start in shard's view rows
        length = np.minimum(block_rows, counts[shard] - pos)
        # a block whose local rows are consecutive is read as a slice; so is any part of it
        row0 = np.zeros(len(shard), dtype=np.int64)                       # (NB,) local row at block start
        contiguous = np.zeros(len(shard), dtype=bool)
        for s, rows in enumerate(self.index.rows):
            mine = slice(block_ids[s], block_ids[s + 1])
            a, n = pos[mine], length[mine]
            row0[mine] = rows[a]
            contiguous[mine] = rows[a + n - 1].astype(np.int64) - rows[a] == n - 1
        if shuffle:
            shard_rank = np.empty(len(counts), dtype=np.int64)
            shard_rank[rng.permutation(len(counts))] = np.arange(len(counts))
            window = shard_rank // window_shards if window_shards > 0 else np.zeros(len(counts), np.int64)
            # sort by (window of the block's shard, random key): blocks shuffle inside each window
            order = np.lexsort((rng.random(len(shard)), window[shard]))
            shard, pos, length, row0, contiguous = (a[order] for a in (shard, pos, length, row0, contiguous))
        self.block_shard, self.block_pos = shard, pos
        self.block_row0, self.block_contiguous = row0, contiguous
        self.block_end = np.cumsum(length)                               # (NB,) block ends in the stream

    def pieces(self, k: int) -> list[Piece]:
        """Pieces of batch k, in batch order; neighbouring slices of one shard are merged."""
        lo = k * self.batch_size
        hi = min(lo + self.batch_size, self.total)
        if self.gather:
            return self._gather_pieces(np.sort(self.perm[lo:hi]))
        j0, j1 = np.searchsorted(self.block_end, [lo, hi - 1], side="right").tolist()
        blocks = slice(j0, j1 + 1)                                         # the blocks batch k touches
        begin = int(self.block_end[j0 - 1]) if j0 else 0
        out: list[Piece] = []
        for shard, pos, row0, contiguous, end in zip(
                self.block_shard[blocks].tolist(), self.block_pos[blocks].tolist(),
                self.block_row0[blocks].tolist(), self.block_contiguous[blocks].tolist(),
                self.block_end[blocks].tolist(), strict=True):
            a, b = max(lo, begin) - begin, min(hi, end) - begin           # part of this block in the batch
            if contiguous:
                piece = Piece(shard, row0 + a, row0 + b)
            else:
                piece = _runs(shard, self.index.rows[shard][pos + a:pos + b])
            prev = out[-1] if out else None
            if (prev is not None and prev.rows is None and piece.rows is None and prev.shard == shard
                    and prev.stop == piece.start):
                out[-1] = Piece(shard, prev.start, piece.stop)
            else:
                out.append(piece)
            begin = end
        return out

    def _gather_pieces(self, pos: np.ndarray) -> list[Piece]:
        return gather_pieces(self.index, pos)


class BatchPlan(Protocol):
    """What the loader reads from a plan: `EpochPlan`, or `sampling.BalancedPlan` for balanced batches."""

    num_batches: int

    def pieces(self, k: int) -> list[Piece]: ...


def rank_bounds(n: int, world_size: int) -> list[int]:
    """Where a batch of `n` rows is cut for `world_size` ranks: rank r reads rows [b[r], b[r + 1]).

    Contiguous, in rank order, sizes differing by at most one row: the ranks' slices put back together in
    rank order are the batch a single process reads.
    """
    return [n * r // world_size for r in range(world_size + 1)]


def slice_pieces(pieces: list[Piece], lo: int, hi: int) -> list[Piece]:
    """The pieces of rows [lo, hi) of the batch `pieces` make (in batch order): a rank's share of a batch."""
    out: list[Piece] = []
    begin = 0
    for piece in pieces:
        end = begin + len(piece)
        a, b = max(lo, begin) - begin, min(hi, end) - begin      # part of this piece in [lo, hi)
        if a < b:
            if piece.rows is None:
                out.append(Piece(piece.shard, piece.start + a, piece.start + b))
            else:
                out.append(_runs(piece.shard, piece.rows[a:b]))
        begin = end
    return out


def gather_pieces(index: ViewIndex, pos: np.ndarray) -> list[Piece]:
    """Sorted view positions -> one piece per shard they fall in."""
    offsets = index.offsets
    shard_of = np.searchsorted(offsets, pos, side="right") - 1          # (B,) ascending
    bounds = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(pos)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        s = int(shard_of[a])
        out.append(_runs(s, index.rows[s][pos[a:b] - offsets[s]]))
    return out
