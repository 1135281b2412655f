"""Report statistics: reliability bins (binned mean prediction vs observed rate) and prediction histograms.

Bins hold equal numbers of rows (quantiles of the prediction), not equal widths: click rates crowd most
predictions into a narrow range, where equal-width bins over [0, 1] would leave nearly every bin empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RELIABILITY_BINS = 10
MIN_ROWS_PER_BIN = 30     # fewer bins on small validation sets, so each observed rate means something


@dataclass(frozen=True)
class ReliabilityBins:
    """Per bin b (arrays of shape (nb,)): prediction range [lo[b], hi[b]], rows, mean prediction, positive rate.

    Example: predictions (0.1, 0.2, 0.6, 0.8), labels (0, 1, 1, 1), n_bins=2, min_rows_per_bin=1 ->
    lo (0.1, 0.6), hi (0.2, 0.8), count (2, 2), mean_pred (0.15, 0.7), pos_rate (0.5, 1.0).
    """

    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray        # int64
    mean_pred: np.ndarray
    pos_rate: np.ndarray

    @property
    def std_err(self) -> np.ndarray:
        """Binomial standard error of each bin's observed rate."""
        return np.sqrt(self.pos_rate * (1.0 - self.pos_rate) / np.maximum(self.count, 1))

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |mean prediction - observed rate|."""
        n = self.count.sum()
        return float(np.sum(self.count * np.abs(self.mean_pred - self.pos_rate)) / n) if n else float("nan")


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS,
                     min_rows_per_bin: int = MIN_ROWS_PER_BIN) -> ReliabilityBins:
    """Equal-count bins of `probs` (n,) with the observed rate of `labels` (n,) 0/1 in each.

    Rows with equal predictions stay in one bin, so bins can hold unequal counts (and fewer bins come back
    when many predictions tie); the counts always sum to n.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n_bins = max(1, min(n_bins, p.size // max(min_rows_per_bin, 1)))
    if p.size == 0:
        empty = np.zeros(0)
        return ReliabilityBins(empty, empty, np.zeros(0, np.int64), empty, empty)
    inner = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))     # (<= nb - 1,) cut points
    idx = np.searchsorted(inner, p, side="right")                                   # (n,) bin of each row
    nb = inner.size + 1
    count = np.bincount(idx, minlength=nb)
    keep = count > 0                  # a cut point at the maximum leaves the last bin empty
    sum_p = np.bincount(idx, weights=p, minlength=nb)
    sum_y = np.bincount(idx, weights=y, minlength=nb)
    lo = np.full(nb, np.inf)
    hi = np.full(nb, -np.inf)
    np.minimum.at(lo, idx, p)
    np.maximum.at(hi, idx, p)
    c = count[keep]
    return ReliabilityBins(lo[keep], hi[keep], c.astype(np.int64), sum_p[keep] / c, sum_y[keep] / c)


def class_histograms(probs: np.ndarray, labels: np.ndarray, bins: int = 40) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """(edges (bins+1,), counts of negatives (bins,), counts of positives (bins,)) over the prediction range."""
    p = np.asarray(probs, dtype=np.float64)
    pos = np.asarray(labels) > 0.5
    lo, hi = (float(p.min()), float(p.max())) if p.size else (0.0, 1.0)
    edges = np.linspace(lo, hi + max(hi - lo, 1e-6) * 1e-4, bins + 1)      # the top edge above the maximum
    neg_counts, _ = np.histogram(p[~pos], bins=edges)
    pos_counts, _ = np.histogram(p[pos], bins=edges)
    return edges, neg_counts, pos_counts
