"""Every ensembling method against values worked out by hand."""

from __future__ import annotations

import doctest
import math
import warnings
from typing import get_args

import numpy as np
import pytest

from ctrpipe.errors import ConfigError
from ctrpipe.infer import ensemble
from ctrpipe.infer.config import EnsembleMethod
from ctrpipe.infer.ensemble import combine, rank_normalise, weights_from_scores

P = np.array([[0.1, 0.5, 0.9],
              [0.3, 0.5, 0.6],
              [0.2, 0.8, 0.7]])


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _lg(p: float) -> float:
    return math.log(p / (1 - p))


def test_docstring_example_runs() -> None:
    assert doctest.testmod(ensemble).failed == 0


def test_mean() -> None:
    np.testing.assert_allclose(combine(P, "mean"), [0.2, 0.6, 2.2 / 3])


def test_logit_mean() -> None:
    want = [_sig((_lg(0.1) + _lg(0.3) + _lg(0.2)) / 3), _sig((0 + 0 + _lg(0.8)) / 3),
            _sig((_lg(0.9) + _lg(0.6) + _lg(0.7)) / 3)]
    np.testing.assert_allclose(combine(P, "logit_mean"), want, rtol=1e-12)


def test_geom_mean() -> None:
    want = [(0.1 * 0.3 * 0.2) ** (1 / 3), (0.5 * 0.5 * 0.8) ** (1 / 3), (0.9 * 0.6 * 0.7) ** (1 / 3)]
    np.testing.assert_allclose(combine(P, "geom_mean"), want, rtol=1e-12)


def test_median_odd_and_even() -> None:
    np.testing.assert_allclose(combine(P, "median"), [0.2, 0.5, 0.7])
    np.testing.assert_allclose(combine(P[:2], "median"), [0.2, 0.5, 0.75])


def test_trim_mean_drops_extremes() -> None:
    p = np.array([[0.1], [0.2], [0.3], [0.4], [0.99]])     # M=5
    np.testing.assert_allclose(combine(p, "trim_mean", trim_ratio=0.2), [0.3])   # drop 0.1 and 0.99
    np.testing.assert_allclose(combine(p, "trim_mean", trim_ratio=0.1), [np.mean([0.1, .2, .3, .4, .99])])


def test_rank_avg_is_average_of_normalised_ranks() -> None:
    # model 0 ranks (0, 0.5, 1); model 1 ties rows 0,1 -> avg rank 0.25, row 2 -> 1 ... hand values:
    p = np.array([[0.1, 0.5, 0.9],
                  [0.5, 0.5, 0.6],
                  [0.9, 0.1, 0.2]])
    np.testing.assert_allclose(rank_normalise(p[1]), [0.25, 0.25, 1.0])
    want = [(0.0 + 0.25 + 1.0) / 3, (0.5 + 0.25 + 0.0) / 3, (1.0 + 1.0 + 0.5) / 3]
    np.testing.assert_allclose(combine(p, "rank_avg"), want)
    np.testing.assert_allclose(combine(p, "rank_avg", weights=[1, 0, 0]), [0.0, 0.5, 1.0])


def test_weighted_explicit_weights_are_normalised() -> None:
    want = [_sig((2 * _lg(0.1) + 1 * _lg(0.3) + 1 * _lg(0.2)) / 4)]
    np.testing.assert_allclose(combine(P[:, :1], "weighted", weights=[2, 1, 1]), want, rtol=1e-12)
    np.testing.assert_allclose(combine(P, "mean", weights=[0, 0, 5]), P[2])
    # finite weights whose sum overflows were all 0 (every row 0.5, or "bad weights [0.0, ...]"), and then
    # scaled with numpy's overflow warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(combine(P, "mean", weights=[1e308, 1e308, 0]), P[:2].mean(axis=0), rtol=1e-12)


def test_weighted_from_scores_softmax() -> None:
    w = weights_from_scores([0.80, 0.81, 0.79], temperature=0.01)
    e = np.exp([0.0, 1.0, -1.0])
    np.testing.assert_allclose(w, e / e.sum())
    got = combine(P, "weighted", scores=[0.80, 0.81, 0.79], temperature=0.01)
    want = [_sig(sum(w[m] * _lg(P[m, j]) for m in range(3))) for j in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_clipping_keeps_zero_and_one_finite() -> None:
    p = np.array([[0.0, 1.0], [0.0, 1.0]])
    out = combine(p, "logit_mean")
    np.testing.assert_allclose(out, [1e-7, 1 - 1e-7], rtol=1e-6)
    assert np.all(np.isfinite(combine(p, "geom_mean")))


def test_methods_literal_matches_config() -> None:
    assert ensemble.METHODS == get_args(EnsembleMethod)


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as exc:
        combine(P, "avg")
    msg = str(exc.value)
    assert "'avg'" in msg and "logit_mean" in msg and "rank_avg" in msg


def test_weight_count_mismatch_and_unweightable() -> None:
    with pytest.raises(ConfigError, match="2 weights for 3 predictions"):
        combine(P, "weighted", weights=[1, 2])
    with pytest.raises(ConfigError, match="does not take weights"):
        combine(P, "median", weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="needs one weight or one validation score"):
        combine(P, "weighted")
    with pytest.raises(ConfigError, match="bad weights"):
        combine(P, "mean", weights=[1, -1, 1])


@pytest.mark.parametrize("method", get_args(EnsembleMethod))
def test_single_model_identity(method: str) -> None:
    p = np.array([[0.2, 0.7, 0.4]])
    out = combine(p, method, weights=[1.0] if method == "weighted" else None)
    if method == "rank_avg":
        np.testing.assert_allclose(out, [0.0, 1.0, 0.5])
    else:
        np.testing.assert_allclose(out, p[0], rtol=1e-9)
