"""Stage 6: the one way M prediction vectors become one, shared by fold ensembling (infer) and blending.

Every method works on a (M, N) float matrix of probabilities, vectorised over rows, in float64, with
probabilities clipped to [1e-7, 1 - 1e-7] before any logit or log is taken.

Example::

    >>> import numpy as np
    >>> p = np.array([[0.2, 0.9], [0.8, 0.9]])
    >>> combine(p, "mean").round(3).tolist()
    [0.5, 0.9]
    >>> combine(p, "logit_mean").round(3).tolist()   # logit(0.2) = -logit(0.8), so row 0 averages to 0.5
    [0.5, 0.9]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np

from ctrpipe.errors import ConfigError
from ctrpipe.infer.config import EnsembleMethod
from ctrpipe.train.metrics import sigmoid

EPS = 1e-7
METHODS: tuple[str, ...] = get_args(EnsembleMethod)
# methods that can take per-model weights (a weighted average of something); median/trim_mean cannot
WEIGHTABLE: frozenset[str] = frozenset({"logit_mean", "mean", "geom_mean", "rank_avg", "weighted"})


def check_method(method: str, where: str = "infer.method") -> EnsembleMethod:
    """Refuse unknown method names, listing the valid ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown ensembling method {method!r}", where=where,
                          fix=f"use one of: {', '.join(METHODS)}")
    return method  # type: ignore[return-value]  # checked against the Literal's members just above


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) of probabilities clipped to [EPS, 1 - EPS], float64."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def weights_from_scores(scores: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """softmax(scores / temperature): higher validation score -> larger weight; T -> 0 picks the best."""
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    if not np.all(np.isfinite(s)):
        raise ConfigError(f"validation scores {list(scores)} are not all finite", where="infer.weight_metric",
                          fix="pick a metric every model reports, e.g. infer.weight_metric=auc, or give "
                              "explicit infer.weights")
    e = np.exp(s - s.max())
    return e / e.sum()


def normalise_weights(weights: Sequence[float], m: int, where: str = "weights") -> np.ndarray:
    """Check one non-negative weight per model with a positive sum, and scale them to sum to 1."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != m:
        raise ConfigError(f"{w.size} weights for {m} predictions", where=where,
                          fix=f"give exactly {m} comma-separated weights, one per input, e.g. "
                              f"{','.join(['1'] * m)}")
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.max() <= 0:     # non-negative: sum > 0
        raise ConfigError(f"bad weights {w.tolist()}", where=where,
                          fix="use finite non-negative weights with a positive sum")
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(w.sum())
    if overflows:                       # finite weights whose sum overflows (1e308,1e308): scale them first
        w = w / w.max()
    return w / w.sum()


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks of a 1-D array scaled to [0, 1]: smallest -> 0, largest -> 1, ties share their average rank."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    if n <= 1:
        return np.full(n, 0.5)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new_group)                    # 0-based first position of each tie group
    ends = np.r_[starts[1:], n] - 1                       # 0-based last position
    group = np.cumsum(new_group) - 1
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ((starts + ends) / 2.0)[group]
    return ranks / (n - 1)


def resolve_weights(method: str, m: int, weights: Sequence[float] | None, scores: Sequence[float] | None,
                    temperature: float, where: str = "weights") -> np.ndarray | None:
    """Per-model weights (summing to 1) or None for an unweighted method; explicit weights win over scores.
    `where` names the weights as the caller's user gives them (`--weights`, `infer.weights`)."""
    if weights is not None and len(weights) > 0:
        if method not in WEIGHTABLE:
            raise ConfigError(f"method {method!r} does not take weights", where=where,
                              fix=f"drop the weights, or use one of: {', '.join(sorted(WEIGHTABLE))}")
        return normalise_weights(weights, m, where)
    if method != "weighted":
        return None
    if scores is None or len(scores) != m:
        raise ConfigError("method 'weighted' needs one weight or one validation score per model",
                          where=where, fix=f"pass {m} weights (e.g. --weights {','.join(['1'] * m)}), "
                                                "or use method logit_mean")
    return weights_from_scores(scores, temperature)


def combine(preds: np.ndarray, method: str, weights: Sequence[float] | None = None, trim_ratio: float = 0.1,
            temperature: float = 1.0, scores: Sequence[float] | None = None) -> np.ndarray:
    """Combine M probability vectors into one (N,) float64 vector.

    Methods (w = weights normalised to sum 1, uniform when absent):
      logit_mean  sigmoid(sum_m w_m logit(p_m)); the geometric mean of odds, the default
      mean        sum_m w_m p_m
      geom_mean   exp(sum_m w_m log p_m); the geometric mean of probabilities (not renormalised)
      median      per-row median of p (mean of the two middle values for even M)
      trim_mean   per-row mean after dropping floor(M * trim_ratio) lowest and highest values
      rank_avg    sum_m w_m rank_m, rank_m = each model's rank of the row among all N rows, in [0, 1].
                  The output is a RANK SCORE (good for AUC), not a calibrated probability: do not use it
                  where logloss is scored.
      weighted    sigmoid(sum_m w_m logit(p_m)), w from `weights`, else softmax(scores / temperature)
    """
    check_method(method)
    p = np.asarray(preds, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"combine expects (M, N) predictions, got shape {p.shape}")
    m = p.shape[0]
    w = resolve_weights(method, m, weights, scores, temperature)
    uniform = np.full(m, 1.0 / m)
    wv = (w if w is not None else uniform)[:, None]       # (M, 1)
    if method in ("logit_mean", "weighted"):
        return sigmoid(np.sum(wv * logit(p), axis=0))
    if method == "mean":
        return np.sum(wv * p, axis=0)
    if method == "geom_mean":
        return np.exp(np.sum(wv * np.log(np.clip(p, EPS, 1.0 - EPS)), axis=0))
    if method == "median":
        return np.median(p, axis=0)
    if method == "trim_mean":
        k = int(np.floor(m * trim_ratio + 1e-9))
        return np.sort(p, axis=0)[k:m - k].mean(axis=0)
    if method == "rank_avg":
        ranks = np.stack([rank_normalise(row) for row in p])   # (M, N); a loop over models, not rows
        return np.sum(wv * ranks, axis=0)
    raise AssertionError(f"unhandled method {method}")
