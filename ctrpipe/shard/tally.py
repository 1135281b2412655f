"""Stage 2: running per-chunk tallies that end up in the manifest (column stats, rows per split, label rates,
fold sizes, skipped bad rows). All are sums/min/max, so they cost O(columns) memory whatever the input size.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ctrpipe.data.fitted import round32
from ctrpipe.data.splits import SPLIT_CODES

MAX_BAD_EXAMPLES = 10


class GroupStats:
    """min / max / sum / count / missing count per column of a 2-D (or 1-D) array group."""

    def __init__(self, names: tuple[str, ...]) -> None:
        f = len(names)
        self.names = names
        self.n = 0
        self.lo = np.full(f, np.inf)
        self.hi = np.full(f, -np.inf)
        self.total = np.zeros(f)
        self.missing = np.zeros(f, dtype=np.int64)

    def update(self, values: np.ndarray, missing: np.ndarray | None = None) -> None:
        """values: (N, F) or (N,) finite output values; missing: (F,) counts of rows missing in the input."""
        if len(values) == 0:        # a chunk whose rows were all skipped; reshape(0, -1) cannot infer F
            return
        v = values.reshape(len(values), -1)
        self.n += len(v)
        self.lo = np.minimum(self.lo, v.min(axis=0))
        self.hi = np.maximum(self.hi, v.max(axis=0))
        self.total += v.sum(axis=0, dtype=np.float64)
        if missing is not None:
            self.missing += missing

    def result(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for j, name in enumerate(self.names):
            if self.n == 0:
                out[name] = {"min": 0.0, "max": 0.0, "mean": 0.0, "missing_rate": 0.0}
                continue
            out[name] = {"min": round32(self.lo[j]) if np.isfinite(self.lo[j]) else 0.0,
                         "max": round32(self.hi[j]) if np.isfinite(self.hi[j]) else 0.0,
                         "mean": round32(self.total[j] / self.n),
                         "missing_rate": round32(self.missing[j] / self.n)}
        return out


class SplitTally:
    """Rows per split, label positive rates per split (of each label, and of each pair of labels both
    positive), fold sizes and per-fold positive rates.

    The pairs' rates are what a masked head (conversion on clicked rows) or an AND of labels (ESMM's ctcvr)
    starts from; marginal rates give them only when the labels nest (no conversion without a click)."""

    def __init__(self, labels: tuple[str, ...], n_folds: int, fold_label: int) -> None:
        self.labels = labels
        self.rows = np.zeros(len(SPLIT_CODES), dtype=np.int64)
        self.label_sum = np.zeros((len(labels), len(SPLIT_CODES)))
        self.label_n = np.zeros((len(labels), len(SPLIT_CODES)), dtype=np.int64)
        self.pairs = [(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels))]
        self.pair_sum = np.zeros((len(self.pairs), len(SPLIT_CODES)))
        self.pair_n = np.zeros((len(self.pairs), len(SPLIT_CODES)), dtype=np.int64)
        self.n_folds = n_folds
        self.fold_rows = np.zeros(max(n_folds, 1), dtype=np.int64)
        self.fold_pos = np.zeros(max(n_folds, 1))
        self.fold_label = fold_label

    def update(self, split: np.ndarray, fold: np.ndarray, labels: np.ndarray | None) -> None:
        self.rows += np.bincount(split, minlength=len(SPLIT_CODES))
        if labels is not None:
            for t in range(labels.shape[1]):
                ok = ~np.isnan(labels[:, t])
                self.label_sum[t] += np.bincount(split[ok], weights=labels[ok, t], minlength=len(SPLIT_CODES))
                self.label_n[t] += np.bincount(split[ok], minlength=len(SPLIT_CODES))
            for k, (a, b) in enumerate(self.pairs):
                ok = ~(np.isnan(labels[:, a]) | np.isnan(labels[:, b]))
                both = labels[ok, a] * labels[ok, b]
                self.pair_sum[k] += np.bincount(split[ok], weights=both, minlength=len(SPLIT_CODES))
                self.pair_n[k] += np.bincount(split[ok], minlength=len(SPLIT_CODES))
        if self.n_folds:
            in_fold = fold >= 0
            self.fold_rows += np.bincount(fold[in_fold], minlength=self.n_folds)
            if labels is not None and labels.shape[1]:
                y = np.nan_to_num(labels[in_fold, self.fold_label])
                self.fold_pos += np.bincount(fold[in_fold], weights=y, minlength=self.n_folds)

    def rows_dict(self) -> dict[str, int]:
        d = {"total": int(self.rows.sum())}
        d.update({name: int(self.rows[code]) for name, code in SPLIT_CODES.items()})
        return d

    def label_rates(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t, lab in enumerate(self.labels):
            out[lab] = {name: round32(self.label_sum[t, code] / self.label_n[t, code])
                        for name, code in SPLIT_CODES.items() if self.label_n[t, code]}
        return out

    def label_pair_rates(self) -> dict[str, dict[str, dict[str, float]]]:
        """first label -> second label (later in label order) -> split -> rate of both positive."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for k, (a, b) in enumerate(self.pairs):
            out.setdefault(self.labels[a], {})[self.labels[b]] = {
                name: round32(self.pair_sum[k, code] / self.pair_n[k, code])
                for name, code in SPLIT_CODES.items() if self.pair_n[k, code]}
        return out

    def folds_dict(self, mode: str, key: str, label: str, seed: int) -> dict[str, Any]:
        if not self.n_folds:
            return {"n_splits": 0, "mode": mode, "key": key, "label": label, "seed": seed, "sizes": []}
        rates = [round32(p / n) if n else 0.0 for p, n in zip(self.fold_pos, self.fold_rows, strict=True)]
        return {"n_splits": self.n_folds, "mode": mode, "key": key, "label": label, "seed": seed,
                "sizes": [int(x) for x in self.fold_rows], "label_rates": rates}


class BadRowTally:
    """Skipped malformed rows: count, count per reason, and the first few with file and line."""

    def __init__(self) -> None:
        self.skipped = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []

    def update(self, bad_rows: list[Any]) -> None:
        for b in bad_rows:                         # only skipped rows: a handful, not a hot path
            self.skipped += 1
            self.by_reason[str(b.reason)] += 1
            if len(self.examples) < MAX_BAD_EXAMPLES:
                self.examples.append({"file": str(b.source), "line": b.line, "row": b.row,
                                      "column": b.column, "reason": str(b.reason)})

    def to_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "by_reason": dict(sorted(self.by_reason.items())),
                "examples": self.examples}
