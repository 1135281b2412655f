"""Stage 1: train/val/gold/test split and CV-fold assignment, vectorised per chunk, independent of chunk size.

Every decision is a pure function of the row's *global* index (or its key value) plus running per-class
counts, so feeding the same rows in chunks of 7 or of 1,000,000 gives the same split and fold arrays.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

from ctrpipe.data.config import FoldConfig, SplitConfig

# the codes stored in every shard's split.npy (int8), and the fold id of rows in no fold (fold.npy)
SPLIT_TRAIN, SPLIT_VAL, SPLIT_GOLD, SPLIT_TEST = 0, 1, 2, 3
SPLIT_CODES: dict[str, int] = {"train": SPLIT_TRAIN, "val": SPLIT_VAL, "gold": SPLIT_GOLD, "test": SPLIT_TEST}
NO_FOLD = -1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wrapping arithmetic): a cheap, well-mixed vectorised integer hash."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def seeded(x: np.ndarray, *salt: int) -> np.ndarray:
    """mix64(x) keyed by one or more integer salts (seed, class, purpose), so different uses are unrelated."""
    key = np.uint64(0)
    for s in salt:
        key = mix64(np.uint64(key) ^ np.uint64(s & 0xFFFFFFFFFFFFFFFF))[()]
    return mix64(np.asarray(x).astype(np.uint64) ^ key)


def unit_interval(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform in [0, 1) from the top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_PURPOSE_SPLIT = 0x5350_4C49  # "SPLI"
_PURPOSE_FOLD = 0x464F_4C44   # "FOLD"


def combine_hashes(hashes: list[np.ndarray]) -> np.ndarray:
    """(N,) uint64 key of several columns' (N,) value hashes together: equal only where every column is equal
    (up to 64-bit collisions); order matters, so [a, b] and [b, a] key differently."""
    out = np.zeros(len(hashes[0]), dtype=np.uint64)
    for h in hashes:
        out = mix64(out ^ mix64(h))
    return out


def value_periods(ends: np.ndarray, counts: np.ndarray, total: int, k: int) -> np.ndarray:
    """The period (0..k-1) of each sorted distinct value with `counts` rows ending at rank `ends` (of `total`
    rows): the one holding the middle of its rows' ranks. The one rule for exact counts (`period_starts`) and
    for counts near a sampled bracket (`shard.folds._refined_starts`), so both cut alike."""
    mid = ends - counts / 2.0                                          # middle rank of each value's rows
    return np.minimum((mid * k / total).astype(np.int64), k - 1)


def period_starts(values: pl.Series, counts: np.ndarray, k: int) -> pl.Series:
    """The first time value of periods 1..k-1 when rows with the sorted distinct `values` (and `counts` rows
    each) are cut into k contiguous periods of near-equal rows: a value goes to the period holding the middle
    of its rows' ranks, so equal values never split. Raises ValueError when a period would be empty."""
    total = int(counts.sum())
    period = value_periods(np.cumsum(counts), counts, total, k)       # non-decreasing over values
    filled = len(np.unique(period))
    if filled < k <= len(values):   # a value holding many rows took a period's middle rank: cut by the rest
        period = _remaining_share_periods(counts, k)
    elif filled < k:
        one = len(values) == 1
        raise ValueError(f"{len(values)} distinct value{'' if one else 's'} fill{'s' if one else ''} {filled} of "
                         f"{k} periods")
    first = np.searchsorted(period, np.arange(1, k), side="left")      # first value of each later period
    return values.gather(first)


def _remaining_share_periods(counts: np.ndarray, k: int) -> np.ndarray:
    """Periods of sorted distinct values with `counts` rows each, every period non-empty (needs k values):
    each cut is the value boundary nearest an equal share of the rows not yet cut, leaving a value for every
    period after it. The fallback of `period_starts` where one value holds so many rows that the middle-rank
    rule left a period empty (3 days, the first holding 75% of the rows, refused 3 folds)."""
    ends = np.cumsum(counts)
    period = np.full(len(counts), k - 1, dtype=np.int64)
    first, done = 0, 0                  # first value of this period, rows in the periods before it
    for p in range(k - 1):
        target = done + (ends[-1] - done) / (k - p)
        lo, hi = first + 1, len(counts) - (k - 1 - p)          # this period's end: values [first, end)
        end = min(max(int(np.searchsorted(ends, target)) + 1, lo), hi)
        if end > lo and abs(ends[end - 2] - target) <= abs(ends[end - 1] - target):
            end -= 1                    # the boundary one value earlier is nearer the share
        period[first:end] = p
        first, done = end, int(ends[end - 1])
    return period


def tail_threshold(n_rows: int, val_ratio: float) -> int:
    """First global row index that goes to val in tail mode: the last round(val_ratio * n_rows) rows."""
    return n_rows - int(round(val_ratio * n_rows))


def assign_split(row_index: np.ndarray, cfg: SplitConfig, *, n_rows: int | None = None,
                 key_hash: np.ndarray | None = None) -> np.ndarray:
    """Split code per row (0 train, 1 val) for the main (non-gold) input.

    Args:
        row_index: (N,) int64 global row index of each row.
        n_rows: total main rows (tail mode only; counted in a cheap pre-pass).
        key_hash: (N,) uint64 xxh64 of the group key's value (group mode only).
    """
    n = len(row_index)
    if cfg.val_ratio <= 0.0:
        return np.zeros(n, dtype=np.int8)
    if cfg.mode == "random":
        u = unit_interval(seeded(row_index, cfg.seed, _PURPOSE_SPLIT))
    elif cfg.mode == "group":
        assert key_hash is not None, "group split needs key hashes"
        u = unit_interval(seeded(key_hash, cfg.seed, _PURPOSE_SPLIT))
    else:  # tail
        assert n_rows is not None, "tail split needs the total row count"
        return (row_index >= tail_threshold(n_rows, cfg.val_ratio)).astype(np.int8)
    return (u < cfg.val_ratio).astype(np.int8)


class FoldAssigner:
    """Assigns CV folds to train+val rows chunk by chunk; keeps the running per-class counts that make
    stratified folds chunk-size invariant.

    Stratified: within class c, the r-th row of that class (r counted over the whole input) belongs to block
    r // K; each block gets a seeded permutation of the K folds (one of all K! for K <= 7, else a seeded
    rotation) and the row takes entry r % K. So every K consecutive same-class rows cover all folds once,
    fold sizes differ by at most one per class, and positive rates are near-equal across folds.

    Group: a seeded hash of the key's value (or of the combined values of `composite_group`) picks the fold.
    Time: `period_starts` (set from a pre-pass, see `period_starts`) holds the first time value of periods
    1..K-1; a row's fold is the number of those starts at or before its time value.
    """

    def __init__(self, cfg: FoldConfig) -> None:
        self.cfg = cfg
        self.class_counts: dict[int, int] = {}
        k = cfg.n_splits
        # (P, K) table of fold permutations a block can draw from
        self.perms = (np.array(list(itertools.permutations(range(k))), dtype=np.int8) if 0 < k <= 7
                      else np.array([np.roll(np.arange(k), -i) for i in range(k)], dtype=np.int8))
        self.period_starts: pl.Series | None = None     # time mode: K-1 sorted time values
        self.period_labels: list[str] | None = None     # ... as the input writes them (a date, not its day count)

    @property
    def enabled(self) -> bool:
        return self.cfg.n_splits > 0

    def assign(self, row_index: np.ndarray, *, label: np.ndarray | None = None,
               key_hash: np.ndarray | None = None, time: pl.Series | None = None) -> np.ndarray:
        """(N,) int8 fold ids for rows that take part in CV (callers pass only train+val rows)."""
        k = self.cfg.n_splits
        n = len(row_index)
        if k == 0:
            return np.full(n, NO_FOLD, dtype=np.int8)
        if self.cfg.mode == "plain":
            return (seeded(row_index, self.cfg.seed, _PURPOSE_FOLD) % np.uint64(k)).astype(np.int8)
        if self.cfg.mode == "time":
            assert time is not None and self.period_starts is not None, "time folds need time values and periods"
            return self.period_starts.search_sorted(time, side="right").to_numpy().astype(np.int8)
        if self.cfg.mode == "group":
            assert key_hash is not None, "group folds need key hashes"
            return (seeded(key_hash, self.cfg.seed, _PURPOSE_FOLD) % np.uint64(k)).astype(np.int8)
        assert label is not None, "stratified folds need a label"
        return self._stratified(label)

    def describe(self) -> dict[str, object]:
        """What the manifest's `folds` adds for this mode: the grouping columns, or the time key and the first
        time value of each period (as text)."""
        if self.cfg.mode == "time" and self.period_starts is not None:
            return {"time_key": self.cfg.time_key,
                    "period_starts": self.period_labels or [str(v) for v in self.period_starts.to_list()]}
        if self.cfg.mode == "group" and self.cfg.composite_group:
            return {"composite_group": list(self.cfg.composite_group)}
        return {}

    @staticmethod
    def classes(label: np.ndarray) -> np.ndarray:
        """(N,) int64 class of each row that stratified folds rank rows within; -1 = missing label."""
        return np.rint(np.nan_to_num(label, nan=-1.0)).astype(np.int64)

    def _stratified(self, label: np.ndarray) -> np.ndarray:
        k = self.cfg.n_splits
        cls = self.classes(label)
        out = np.empty(len(cls), dtype=np.int8)
        for c in np.unique(cls).tolist():
            rows = np.flatnonzero(cls == c)
            start = self.class_counts.get(c, 0)
            r = start + np.arange(len(rows), dtype=np.int64)        # running rank of the row in its class
            block = r // k
            b0 = int(block[0])
            blocks = np.arange(b0, int(block[-1]) + 1, dtype=np.int64)
            pick = seeded(blocks, self.cfg.seed, _PURPOSE_FOLD, c + 2) % np.uint64(len(self.perms))
            out[rows] = self.perms[pick.astype(np.int64)[block - b0], r % k]
            self.class_counts[c] = start + len(rows)
        return out
