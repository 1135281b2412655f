"""Stage 3: which rows of a cache a loader reads (a split, a fold's train or val part), without copying data.

A `RowView` is turned into one sorted array of local row numbers per shard, read once from the small
`split.npy` / `fold.npy` arrays; batches are then formed from those arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrpipe.data.splits import NO_FOLD, SPLIT_CODES
from ctrpipe.errors import REBUILD_CACHE_FIX, ConfigError, ManifestMismatchError
from ctrpipe.shard.manifest import Manifest
from ctrpipe.shard.reader import read_small


@dataclass(frozen=True)
class RowView:
    """A selection of rows: rows whose split is in `splits`, then filtered by fold id.

    folds_in:  keep only rows whose fold id is in this set (None: ignore folds)
    folds_out: drop rows whose fold id is in this set (None: drop nothing)

    Example: fold 2 of a 5-fold CV over train+val rows is `RowView.fold_train(2)` (train on folds 0, 1, 3, 4)
    and `RowView.fold_val(2)` (score fold 2); the two are disjoint and together cover every row with a fold.
    """

    splits: tuple[str, ...] = ("train",)
    folds_in: tuple[int, ...] | None = None
    folds_out: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.splits:
            raise ConfigError("a row view needs at least one split",
                              fix=f"use names from {sorted(SPLIT_CODES)}, e.g. RowView(splits=('train',))")
        for name in self.splits:
            if name not in SPLIT_CODES:
                raise ConfigError(f"unknown split {name!r} in a row view",
                                  fix=f"use split names from {sorted(SPLIT_CODES)}")
        for key in ("folds_in", "folds_out"):
            folds = getattr(self, key)
            if folds is not None and any(int(f) < NO_FOLD for f in folds):
                raise ConfigError(f"bad fold ids {folds} for {key}",
                                  fix="fold ids are -1 (no fold) or in [0, K)")

    # ------------------------------------------------------------------ common views
    @classmethod
    def train(cls) -> RowView:
        return cls(("train",))

    @classmethod
    def val(cls) -> RowView:
        return cls(("val",))

    @classmethod
    def gold(cls) -> RowView:
        return cls(("gold",))

    @classmethod
    def test(cls) -> RowView:
        return cls(("test",))

    @classmethod
    def fold_train(cls, k: int, splits: tuple[str, ...] = ("train", "val")) -> RowView:
        """Rows of `splits` in any fold but `k`. Rows in no fold (id -1) are left out of both CV views."""
        return cls(tuple(splits), folds_out=(int(k), NO_FOLD))

    @classmethod
    def fold_val(cls, k: int, splits: tuple[str, ...] = ("train", "val")) -> RowView:
        """Rows of `splits` in fold `k`: the out-of-fold rows scored by the model of `fold_train(k)`."""
        return cls(tuple(splits), folds_in=(int(k),))

    # ------------------------------------------------------------------ selection
    @property
    def uses_folds(self) -> bool:
        return self.folds_in is not None or self.folds_out is not None

    def mask(self, split: np.ndarray, fold: np.ndarray | None) -> np.ndarray:
        """Boolean mask over one shard's rows, from its `split.npy` (N,) int8 and `fold.npy` (N,) int8."""
        keep = np.isin(split, np.array([SPLIT_CODES[s] for s in self.splits], dtype=split.dtype))
        if self.uses_folds:
            assert fold is not None, "caller must pass fold ids for a fold view"
            if self.folds_in is not None:
                keep &= np.isin(fold, np.asarray(self.folds_in, dtype=np.int64))
            if self.folds_out is not None:
                keep &= ~np.isin(fold, np.asarray(self.folds_out, dtype=np.int64))
        return keep

    def describe(self) -> str:
        """In words, for messages and records: 'the test split', 'fold 2 of the train and val splits'."""
        *rest, last = self.splits
        text = f"the {', '.join(rest)} and {last} splits" if rest else f"the {last} split"

        def folds(ids: tuple[int, ...]) -> str:
            real = [int(f) for f in ids if int(f) != NO_FOLD]
            parts = [("fold " if len(real) == 1 else "folds ") + ", ".join(map(str, real))] if real else []
            return " and ".join(parts + (["rows without a fold"] if NO_FOLD in ids else [])) or "no fold"
        if self.folds_in is not None:
            text = f"{folds(self.folds_in)} of {text}"
        if self.folds_out is not None:
            text = f"{text} except {folds(self.folds_out)}"
        return text


@dataclass(frozen=True)
class ViewIndex:
    """A view resolved against one cache: per shard, the sorted local row numbers it selects.

    rows[s]:    (n_s,) int32 sorted local rows of shard s (shards hold < 2**31 rows)
    offsets:    (S + 1,) int64, view position where shard s starts; offsets[-1] = rows in the view
    row_starts: (S,) int64, global index of each shard's first row (from the manifest)
    """

    rows: tuple[np.ndarray, ...]
    offsets: np.ndarray
    row_starts: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def global_rows(self) -> np.ndarray:
        """(num_rows,) int64 global row indices in view order (shard by shard, ascending)."""
        if not self.rows:
            return np.zeros(0, dtype=np.int64)
        parts = [r.astype(np.int64) + start for r, start in zip(self.rows, self.row_starts, strict=True)]
        return np.concatenate(parts)

    def subset(self, keep: np.ndarray) -> ViewIndex:
        """The rows where `keep` (num_rows,) bool, in view order, is set (still sorted within each shard)."""
        rows = tuple(r[keep[a:b]] for r, a, b in zip(self.rows, self.offsets[:-1], self.offsets[1:], strict=True))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        return ViewIndex(rows, offsets, self.row_starts)


def resolve_view(cache_dir: Path, manifest: Manifest, view: RowView) -> ViewIndex:
    """Read each shard's split.npy (and fold.npy for fold views) once and keep the selected local rows."""
    cache_dir = Path(cache_dir)
    rows: list[np.ndarray] = []
    for shard in manifest.shards:
        split = read_small(cache_dir, shard, "split")
        bad = (split < 0) | (split >= len(SPLIT_CODES))
        if bad.any():
            raise ManifestMismatchError(
                f"split code {int(split[bad][0])} at row {int(np.flatnonzero(bad)[0])}, expected codes "
                f"{SPLIT_CODES}", where=str(cache_dir / shard.files["split"].file), fix=REBUILD_CACHE_FIX)
        fold = read_small(cache_dir, shard, "fold") if view.uses_folds else None
        rows.append(np.flatnonzero(view.mask(split, fold)).astype(np.int32))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    starts = np.array([s.row_start for s in manifest.shards], dtype=np.int64)
    return ViewIndex(tuple(rows), offsets, starts)
