"""Stage 5: exact whole-set metrics (logloss, AUC, AP, WLL, score, calibration), vectorised in numpy.

Computed once over all predictions of a view, never averaged per batch: a mean of batch AUCs is a
different (and noisier) number than the AUC of the set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctrpipe.errors import ConfigError

EPS = 1e-7
# main metric names, in the order tables and logs show them
METRIC_NAMES: tuple[str, ...] = ("logloss", "auc", "ap", "wll", "score", "mean_pred", "pos_rate",
                                 "calibration")
# metrics that rank a model's quality, so early stopping can keep the best evaluation by one of them; the others
# describe the predictions (mean_pred, pos_rate: the view's label rate, calibration: best near 1, not at a max)
QUALITY_METRICS: tuple[str, ...] = ("logloss", "auc", "ap", "wll", "score")


def refuse_descriptive_metric(metric: str, key: str, valid: list[str]) -> None:
    """ConfigError for a metric (or `metric.head`) that describes predictions where a choice needs one that
    ranks models: calibration (best near 1), mean_pred and pos_rate would be maximised."""
    base = metric.split(".", 1)[0]
    if base in METRIC_NAMES and base not in QUALITY_METRICS:
        raise ConfigError(f"metric {metric!r} describes the predictions, not how good they are, so it cannot rank "
                          "evaluations or models (calibration is best near 1, mean_pred and pos_rate at no "
                          "particular value)", where=key, fix=f"use one of {', '.join(valid)}")


# metrics where a smaller value is better (early stopping `mode: auto`)
LOWER_IS_BETTER: frozenset[str] = frozenset({"logloss", "wll"})


def logloss(y: np.ndarray, p: np.ndarray, eps: float = EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney statistic with tied scores given their average rank; NaN with one class or
    with a NaN prediction (which a sort would rank above every score, and AP below)."""
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(p).any():
        return float("nan")
    # rank of each distinct score = mean of the 1-based positions its ties occupy
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)                     # last 1-based position of each tie group
    avg_rank = ends - (counts - 1) / 2.0         # (first + last) / 2
    rank_sum_pos = float(avg_rank[inverse][y].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Step-wise AP: sum over distinct thresholds, high to low, of (R_k - R_{k-1}) * P_k; ties: one step.
    NaN without positives or with a NaN prediction."""
    y = np.asarray(y) > 0.5
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0 or np.isnan(p).any():
        return float("nan")
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # index of the last row of each tie group when scanning from the highest score down
    last = np.flatnonzero(np.r_[p_sorted[1:] != p_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[last].astype(np.float64)
    seen = (last + 1).astype(np.float64)
    precision = tp / seen
    recall = tp / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(d_recall * precision))


def weighted_logloss(y: np.ndarray, p: np.ndarray, eps: float = EPS) -> float:
    """Class-balanced logloss: 0.5 * mean loss over positives + 0.5 * mean over negatives.

    With one class absent its term is dropped and the other class's mean is returned.
    """
    y = np.asarray(y) > 0.5
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    terms = []
    if y.any():
        terms.append(float(-np.mean(np.log(p[y]))))
    if (~y).any():
        terms.append(float(-np.mean(np.log1p(-p[~y]))))
    return float(np.mean(terms)) if terms else float("nan")


def _one_task(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    ap = average_precision(y, p)
    wll = weighted_logloss(y, p)
    mean_pred = float(np.mean(p, dtype=np.float64)) if p.size else float("nan")
    pos_rate = float(np.mean(y > 0.5)) if y.size else float("nan")
    return {
        "logloss": logloss(y, p),
        "auc": auc(y, p),
        "ap": ap,
        "wll": wll,
        "score": 0.5 * ap + 0.5 / (1.0 + wll),
        "mean_pred": mean_pred,
        "pos_rate": pos_rate,
        "calibration": mean_pred / pos_rate if pos_rate > 0 else float("nan"),
    }


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray, label_names: Sequence[str] | None = None,
                    weights: Sequence[float] | None = None) -> dict[str, float]:
    """All metrics over the whole set. y_true / y_prob: (N,) or (N, T); a NaN label drops its row from that
    task's metrics (a masked head: conversion given click).

    With T > 1 tasks the main keys (`auc`, `logloss`, ...) are means over tasks, weighted by `weights` (the
    heads' metric weights; equal by default) -- the primary metric early stopping reads -- and each task also
    gets `<metric>.<name>` keys, e.g. `auc.click`.
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} differ in shape")
    if y.ndim == 1:
        y, p = y[:, None], p[:, None]
    n_tasks = y.shape[1]
    names = list(label_names) if label_names is not None else [f"task{t}" for t in range(n_tasks)]
    per_task = []
    for t in range(n_tasks):
        keep = ~np.isnan(y[:, t]) if np.issubdtype(y.dtype, np.floating) else slice(None)
        per_task.append(_one_task(y[keep, t], p[keep, t]))
    if n_tasks == 1:
        return per_task[0]
    w = np.asarray(weights if weights is not None else np.ones(n_tasks), dtype=np.float64)
    if w.shape != (n_tasks,) or not w.sum() > 0:
        raise ValueError(f"metric weights {w.tolist()} for {n_tasks} tasks")
    on = w > 0      # a head weighted 0 is out of the mean: its NaN (one class in these rows) must not leak in
    out = {k: float(np.dot(w[on], [m[k] for m, keep in zip(per_task, on, strict=True) if keep]) / w[on].sum())
           for k in METRIC_NAMES}
    for name, m in zip(names, per_task, strict=True):
        out.update({f"{k}.{name}": v for k, v in m.items()})
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64."""
    x = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def metrics_from_logits(labels: np.ndarray, logits: np.ndarray, label_names: Sequence[str] | None = None,
                        weights: Sequence[float] | None = None) -> dict[str, float]:
    """`compute_metrics` on sigmoid(logits)."""
    return compute_metrics(labels, sigmoid(logits), label_names, weights)
