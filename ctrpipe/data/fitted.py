"""Stage 1: statistics fitted on the TRAIN split only (imputation values, standardisation, vocabularies) that
turn raw columns into model inputs, plus their on-disk form under `DIR/fitted/` so test caches reuse them.

Everything here is accumulated per chunk in bounded memory and is independent of chunk size: counts are
integers, and float statistics are rounded to float32 (the dtype they are applied in) before use.

Median: a 65,536-bin histogram of sign(x)*log1p(|x|) over [-45, 45] per column, plus the smallest raw value
seen in each bin. The fill value is the smallest value in the bin holding the lower median, so it is always a
real data value and is exact whenever that bin holds one distinct value (all integers below ~700).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctrpipe.atomic import atomic_open
from ctrpipe.data.hashindex import HashCounter, HashIndex
from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError
from ctrpipe.native import native

FITTED_DIR = "fitted"
_HIST_BINS = 65_536
_HIST_LIMIT = 45.0          # log1p(3.5e19): anything larger is clamped into the edge bins


def round32(x: float) -> float:
    """Round a float64 statistic to float32 so ulp-level summation-order noise never reaches the shards."""
    return float(np.float32(x))


# --------------------------------------------------------------------------------------- numeric statistics

@dataclass(frozen=True)
class NumericStats:
    """Per numeric column: `fill` replaces missing raw values; `mean`/`std` standardise after log1p."""

    fill: float = 0.0
    mean: float = 0.0
    std: float = 1.0


class NumericAccumulator:
    """Sums, counts and (optionally) a median histogram of raw numeric values of train rows, per column."""

    def __init__(self, names: tuple[str, ...], need_median: bool) -> None:
        f = len(names)
        self.names = names
        self.n = 0
        self.n_valid = np.zeros(f, dtype=np.int64)
        self.sum_raw = np.zeros(f, dtype=np.float64)
        self.need_median = need_median
        if need_median:
            self.hist = np.zeros((f, _HIST_BINS), dtype=np.int64)
            self.bin_min = np.full((f, _HIST_BINS), np.inf, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """x: (N, F) float64 raw values of train rows, NaN where missing (non-finite counts as missing)."""
        valid = np.isfinite(x)
        self.n += x.shape[0]
        self.n_valid += valid.sum(axis=0)
        self.sum_raw += np.where(valid, x, 0.0).sum(axis=0)
        if self.need_median:
            for j in range(x.shape[1]):
                v = x[valid[:, j], j]
                b = _hist_bin(v)
                self.hist[j] += np.bincount(b, minlength=_HIST_BINS)
                np.minimum.at(self.bin_min[j], b, v)

    def fills(self, impute: Literal["zero", "mean", "median"]) -> np.ndarray:
        """(F,) raw fill value per column; columns never observed fill with 0."""
        if impute == "zero":
            return np.zeros(len(self.names))
        if impute == "mean":
            mean = np.divide(self.sum_raw, self.n_valid, out=np.zeros_like(self.sum_raw),
                             where=self.n_valid > 0)
            return np.array([round32(m) for m in mean])
        out = np.zeros(len(self.names))
        for j in range(len(self.names)):
            if self.n_valid[j] == 0:
                continue
            target = (self.n_valid[j] + 1) // 2                     # rank of the lower median (1-based)
            b = int(np.searchsorted(np.cumsum(self.hist[j]), target))
            out[j] = self.bin_min[j, b]
        return out


def _hist_bin(v: np.ndarray) -> np.ndarray:
    t = np.sign(v) * np.log1p(np.abs(v))
    b = ((t + _HIST_LIMIT) * (_HIST_BINS / (2 * _HIST_LIMIT))).astype(np.int64)
    return np.clip(b, 0, _HIST_BINS - 1)


class MomentAccumulator:
    """Mean/std of transformed (log1p) numeric values of train rows, for standardisation.

    Missing values are counted apart, because their transformed value (of the fill) is known only after
    the pass; `result` adds them analytically. Sums are taken about a reference value per column (the first
    valid value seen), each chunk's about its own first value and then moved to the reference: a column far
    from zero with a small spread (a Unix time, a year, its log) lost its variance to cancellation in
    E[x^2] - E[x]^2, enough to change the std with the chunk size. `partials`, when a list, also collects each
    chunk's (count, shift, sum, sum of squares), which a parallel build merges with `add` in input order.
    """

    def __init__(self, f: int) -> None:
        self.n_missing = np.zeros(f, dtype=np.int64)
        self.n_valid = np.zeros(f, dtype=np.int64)
        self.ref = np.full(f, np.nan)
        self.s1 = np.zeros(f, dtype=np.float64)             # sums of (t - ref) and (t - ref)^2
        self.s2 = np.zeros(f, dtype=np.float64)
        self.partials: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None

    def update(self, t: np.ndarray, valid: np.ndarray) -> None:
        """t: (N, F) float32 transformed values (anything where not valid); valid: (N, F) bool."""
        if not len(valid):
            return
        n = valid.sum(axis=0)
        self.n_valid += n
        self.n_missing += len(valid) - n
        first = np.argmax(valid, axis=0)                    # each column's first valid row (0 if none)
        shift = np.where(n > 0, t[first, np.arange(t.shape[1])].astype(np.float64), 0.0)
        d = np.where(valid, t.astype(np.float64) - shift, 0.0)
        part = (n.astype(np.int64), shift, d.sum(axis=0), np.square(d).sum(axis=0))
        if self.partials is not None:
            self.partials.append(part)
        self.add(*part)

    def add(self, n: np.ndarray, shift: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
        """One chunk's sums about `shift`, moved to the reference (set by the first chunk holding values)."""
        unset = np.isnan(self.ref) & (n > 0)
        self.ref[unset] = shift[unset]
        delta = np.where(n > 0, shift - np.nan_to_num(self.ref), 0.0)
        self.s1 += s1 + n * delta
        self.s2 += s2 + 2.0 * delta * s1 + n * delta * delta

    def result(self, fill_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per column, each rounded to float32; fill_t: (F,) transformed fill values."""
        ref = np.nan_to_num(self.ref)
        fill_d = np.asarray(fill_t, dtype=np.float64) - ref
        n = self.n_valid + self.n_missing
        if not n.any():
            return np.zeros_like(self.s1), np.ones_like(self.s1)
        n = np.maximum(n, 1)
        mean_d = (self.s1 + self.n_missing * fill_d) / n
        var = np.maximum((self.s2 + self.n_missing * fill_d**2) / n - mean_d**2, 0.0)
        std = np.sqrt(var)
        std[std < 1e-6] = 1.0                                       # constant column: centre only
        return np.array([round32(m) for m in ref + mean_d]), np.array([round32(s) for s in std])


# --------------------------------------------------------------------------------------------- counting

def merge_counts(keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray,
                 counts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (sorted unique uint64 keys, int64 counts) tables into one, summing counts of equal keys.

    A stable sort of two concatenated sorted runs is a linear merge (timsort finds the runs).
    """
    if len(keys_b) == 0:
        return keys_a, counts_a
    if len(keys_a) == 0:
        return keys_b, counts_b
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b])
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    start = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[start], np.add.reduceat(counts, start)


def count_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys of one chunk with int64 counts."""
    u, c = np.unique(keys, return_counts=True)
    return u, c.astype(np.int64)


def lookup_counts(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Count of each query key in a sorted table (0 when absent); vectorised binary search."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[pos] == query, counts[pos], 0)


class KeyCounter:
    """Running (sorted keys, counts) table; memory is the number of distinct keys, not of rows.

    With the compiled kernels the keys are counted in a hash table (`HashCounter`: one pass per chunk, no
    sort) and sorted once when `keys` / `counts` are read; without them each chunk's sorted counts are
    merged in. Both give the same table."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.uint64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._hash = HashCounter() if native() is not None else None
        self._stale = False          # the hash table holds counts the sorted arrays do not show yet

    def add(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        if self._hash is not None:
            self._hash.add(keys)
            self._stale = True
        else:
            self._keys, self._counts = merge_counts(self._keys, self._counts, *count_keys(keys))

    def merge(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add another counter's (sorted keys, counts) table (a partition of a map/reduce fit pass).

        Later `add`s go to the sorted arrays too: the hash table would otherwise hide the merged counts."""
        self._sorted()
        self._hash = None
        self._keys, self._counts = merge_counts(self._keys, self._counts, keys, counts)

    def _sorted(self) -> None:
        if self._stale and self._hash is not None:
            self._keys, self._counts = self._hash.sorted()
            self._stale = False

    @property
    def distinct(self) -> int:
        """How many distinct keys were counted, without sorting them."""
        if self._stale and self._hash is not None:
            return self._hash.used + int(self._hash.zeros > 0)
        return len(self._keys)

    @property
    def keys(self) -> np.ndarray:
        """(K,) sorted distinct uint64 keys."""
        self._sorted()
        return self._keys

    @property
    def counts(self) -> np.ndarray:
        """(K,) int64 count of each key."""
        self._sorted()
        return self._counts


# ------------------------------------------------------------------------------------------ vocabularies

@dataclass(frozen=True)
class VocabTable:
    """A categorical field's vocabulary: value hash -> id. Ids 2.. by descending train frequency (ties by
    hash value), 1 = OOV (seen fewer than min_count times, or never), 0 = missing."""

    hashes: np.ndarray          # (V,) uint64, sorted
    ids: np.ndarray             # (V,) int32, id of hashes[i]
    bins: int                   # V + 2

    @classmethod
    def from_counts(cls, counter: KeyCounter, min_count: int, max_bins: int = 0) -> VocabTable:
        keep = counter.counts >= min_count
        keys, counts = counter.keys[keep], counter.counts[keep]
        order = np.lexsort((keys, -counts))                         # most frequent first, ties by hash
        if max_bins:
            order = order[: max(max_bins - 2, 0)]
        ids = np.empty(len(order), dtype=np.int32)
        ids[:] = 2 + np.arange(len(order), dtype=np.int32)
        by_hash = np.argsort(keys[order], kind="stable")
        return cls(hashes=keys[order][by_hash], ids=ids[by_hash], bins=len(order) + 2)

    @cached_property
    def index(self) -> HashIndex:
        """Built on first use: the write pass looks up every row (and shared-vocabulary token) in it."""
        return HashIndex(self.hashes, self.ids)

    def lookup(self, h: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """(N,) int32 ids for value hashes `h`; rows flagged `missing` get 0."""
        ids = self.index.lookup(h, default=1).astype(np.int32)
        ids[missing] = 0
        return ids


# ---------------------------------------------------------------------------------------- the fitted set

@dataclass(frozen=True)
class CountTable:
    """Generic sorted-key count table saved as two npy files (used by co-visitation)."""

    keys: np.ndarray
    counts: np.ndarray

    @cached_property
    def index(self) -> HashIndex:
        """Built on first use: counts of each query key (0 when absent), as `lookup_counts` gives them."""
        return HashIndex(self.keys, self.counts)


@dataclass(frozen=True)
class Fitted:
    """All train-split statistics a cache was built with; `identity` hashes them (schema fingerprint)."""

    numeric: dict[str, NumericStats] = field(default_factory=dict)
    vocab: dict[str, VocabTable] = field(default_factory=dict)
    covisit: dict[str, tuple[CountTable, CountTable]] = field(default_factory=dict)  # name -> (pairs, ctx)
    train_rows: int = 0

    def identity(self) -> str:
        return self._identity

    @cached_property
    def _identity(self) -> str:
        """Hashed once per instance (a build asks for it more than once): a Fitted's tables are never changed
        after it is made, and must not be."""
        h = hashlib.sha256()
        h.update(json.dumps({k: [v.fill, v.mean, v.std] for k, v in sorted(self.numeric.items())}).encode())
        for name, table in sorted(self.vocab.items()):
            h.update(name.encode())
            h.update(table.hashes.tobytes())
            h.update(table.ids.tobytes())
        for name, (pairs, ctx) in sorted(self.covisit.items()):
            h.update(name.encode())
            for arr in (pairs.keys, pairs.counts, ctx.keys, ctx.counts):
                h.update(arr.tobytes())
        return h.hexdigest()

    def files(self) -> dict[str, np.ndarray]:
        """Relative file name (under DIR/fitted/) -> array."""
        out: dict[str, np.ndarray] = {}
        for name, table in self.vocab.items():
            stem = safe_name(name)
            out[f"vocab.{stem}.hashes.npy"] = table.hashes
            out[f"vocab.{stem}.ids.npy"] = table.ids
        for name, (pairs, ctx) in self.covisit.items():
            stem = safe_name(name)
            out[f"covisit.{stem}.pairs.npy"] = pairs.keys
            out[f"covisit.{stem}.pair_counts.npy"] = pairs.counts
            out[f"covisit.{stem}.ctx.npy"] = ctx.keys
            out[f"covisit.{stem}.ctx_counts.npy"] = ctx.counts
        return out

    def to_manifest(self) -> dict[str, Any]:
        """What `Manifest.fitted` stores: the small statistics inline, tables by file name."""
        return {
            "identity": self.identity(),
            "train_rows": self.train_rows,
            "numeric": {k: {"fill": v.fill, "mean": v.mean, "std": v.std} for k, v in self.numeric.items()},
            "vocab": {k: {"bins": t.bins, "size": len(t.hashes),
                          "hashes": f"{FITTED_DIR}/vocab.{safe_name(k)}.hashes.npy",
                          "ids": f"{FITTED_DIR}/vocab.{safe_name(k)}.ids.npy"}
                      for k, t in self.vocab.items()},
            "covisit": {k: {p: f"{FITTED_DIR}/covisit.{safe_name(k)}.{p}.npy"
                            for p in ("pairs", "pair_counts", "ctx", "ctx_counts")} for k in self.covisit},
        }

    def save(self, cache_dir: Path) -> None:
        """Write tables under cache_dir/fitted/ (temp name + rename each) and fitted.json last."""
        d = Path(cache_dir) / FITTED_DIR
        d.mkdir(parents=True, exist_ok=True)
        for rel, arr in self.files().items():
            save_npy(d / rel, arr)
        tmp = d / "fitted.json.incomplete"
        tmp.write_text(json.dumps(self.to_manifest(), indent=1))
        tmp.replace(d / "fitted.json")

    @classmethod
    def load(cls, cache_dir: Path, meta: dict[str, Any] | None = None) -> Fitted:
        """Read the statistics of a cache (meta = its manifest's `fitted`, or fitted/fitted.json)."""
        cache_dir = Path(cache_dir)
        if meta is None:
            path = cache_dir / FITTED_DIR / "fitted.json"
            meta = json.loads(path.read_text())
        try:
            numeric = {k: NumericStats(**v) for k, v in meta.get("numeric", {}).items()}
            vocab = {k: VocabTable(np.load(cache_dir / v["hashes"]), np.load(cache_dir / v["ids"]),
                                   int(v["bins"])) for k, v in meta.get("vocab", {}).items()}
            covisit = {k: (CountTable(np.load(cache_dir / v["pairs"]), np.load(cache_dir / v["pair_counts"])),
                           CountTable(np.load(cache_dir / v["ctx"]), np.load(cache_dir / v["ctx_counts"])))
                       for k, v in meta.get("covisit", {}).items()}
        except (OSError, KeyError, ValueError) as exc:
            raise ManifestMismatchError(f"fitted statistics are missing or unreadable ({exc})",
                                        where=str(cache_dir / FITTED_DIR), fix=REBUILD_CACHE_FIX) from None
        fitted = cls(numeric=numeric, vocab=vocab, covisit=covisit, train_rows=int(meta.get("train_rows", 0)))
        if "identity" in meta and fitted.identity() != meta["identity"]:
            raise ManifestMismatchError("fitted statistics differ from their recorded identity",
                                        where=str(cache_dir / FITTED_DIR), fix=REBUILD_CACHE_FIX)
        return fitted


def safe_name(name: str) -> str:
    """A column name made safe for a file name (Parquet names may hold '/', spaces, ...)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save to '<name>.incomplete', then rename: a crash never leaves a truncated array under the name."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
