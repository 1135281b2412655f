"""Whole-set metrics against cases worked out by hand (the arithmetic is in each test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctrpipe.train.metrics import (
    auc,
    average_precision,
    compute_metrics,
    logloss,
    metrics_from_logits,
    weighted_logloss,
)


def test_auc_counts_winning_pairs():
    # pairs (pos, neg): 0.35>0.1 win, 0.35<0.4 lose, 0.8>0.1 win, 0.8>0.4 win -> 3/4
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_ties_count_half():
    # pos 0.5 vs neg 0.5 tie = 0.5; pos 0.5 vs neg 0.2 = 1; pos 0.9 beats both = 2 -> 3.5 / 4
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(0.875)
    # every score tied -> 0.5
    assert auc(np.array([0, 1, 1, 0, 1]), np.full(5, 0.3)) == pytest.approx(0.5)


def test_auc_one_class_is_nan():
    assert math.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_a_nan_prediction_makes_the_ranking_metrics_nan():
    """A NaN prediction sorted above every score in AUC and below every score in AP: both came out finite
    (0.5 and 1.0 here) while logloss was NaN."""
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, np.nan, 0.7])
    assert math.isnan(auc(y, p)) and math.isnan(average_precision(y, p)) and math.isnan(logloss(y, p))


def test_average_precision_steps():
    # descending: 0.8(+) P=1 R=.5 | 0.4(-) P=.5 R=.5 | 0.35(+) P=2/3 R=1 | 0.1(-) R unchanged
    # AP = .5*1 + 0 + .5*2/3 = 0.8333
    ap = average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_average_precision_groups_ties():
    # {0.5: +,-} is one step: TP=1 of 2 seen, P=.5 R=.5 | 0.2(+): P=2/3 R=1 -> .25 + 1/3
    ap = average_precision(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.2]))
    assert ap == pytest.approx(0.25 + 1 / 3)


def test_logloss_and_clipping():
    # -(ln .8 + ln .6) / 2
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(expected)
    # p = 0 on a positive is clipped to 1e-7 -> -ln(1e-7) = 16.118
    assert logloss(np.array([1]), np.array([0.0])) == pytest.approx(-math.log(1e-7))


def test_weighted_logloss_balances_classes():
    # positives: (-ln .8 - ln .5) / 2 = 0.458145; negatives: -ln .6 = 0.510826; mean of the two = 0.484486
    y, p = np.array([1, 1, 0]), np.array([0.8, 0.5, 0.4])
    expected = 0.5 * (-(math.log(0.8) + math.log(0.5)) / 2) + 0.5 * (-math.log(0.6))
    assert weighted_logloss(y, p) == pytest.approx(expected)
    # one class absent: its term is dropped
    assert weighted_logloss(np.array([0, 0]), np.array([0.4, 0.4])) == pytest.approx(-math.log(0.6))


def test_compute_metrics_score_and_calibration():
    y, p = np.array([1, 1, 0]), np.array([0.8, 0.5, 0.4])
    m = compute_metrics(y, p)
    # AP: 0.8(+) P=1 R=.5, 0.5(+) P=1 R=1 -> 1.0; score = .5 * 1 + .5 / (1 + 0.484486) = 0.836817
    wll = 0.5 * (-(math.log(0.8) + math.log(0.5)) / 2) + 0.5 * (-math.log(0.6))
    assert m["ap"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx(0.5 + 0.5 / (1 + wll))
    # mean prediction 1.7/3 = 0.5667, positive rate 2/3, ratio 0.85
    assert m["mean_pred"] == pytest.approx(1.7 / 3)
    assert m["pos_rate"] == pytest.approx(2 / 3)
    assert m["calibration"] == pytest.approx(0.85)
    assert m["auc"] == pytest.approx(1.0)


def test_multi_task_means_and_per_task_keys():
    y = np.array([[0, 1], [0, 0], [1, 1], [1, 0]], dtype=np.float32)
    p = np.array([[0.1, 0.9], [0.4, 0.2], [0.35, 0.7], [0.8, 0.6]])
    m = compute_metrics(y, p, ["click", "buy"])
    # task click: AUC 0.75 (as above); task buy: positives {0.9, 0.7} beat negatives {0.2, 0.6} -> 1.0
    assert m["auc.click"] == pytest.approx(0.75)
    assert m["auc.buy"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx(0.875)


def test_logit_input_matches_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000) * 3
    y = (rng.random(1000) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    a = metrics_from_logits(y, logits)
    b = compute_metrics(y, 1 / (1 + np.exp(-logits)))
    assert a["auc"] == pytest.approx(b["auc"])
    assert a["logloss"] == pytest.approx(b["logloss"])


def test_auc_matches_pair_count_on_random_ties():
    # brute force over all pairs on data with many ties
    rng = np.random.default_rng(1)
    p = rng.integers(0, 5, size=200) / 4
    y = rng.integers(0, 2, size=200)
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert auc(y, p) == pytest.approx(brute)


def test_a_head_weighted_zero_stays_out_of_the_main_metrics():
    """A head out of the primary metric made it NaN when its own metric was NaN (one class in these rows):
    early stopping then never saw an improvement."""
    y = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    p = np.array([[0.1, 0.2], [0.9, 0.3], [0.2, 0.1], [0.8, 0.4]])
    m = compute_metrics(y, p, ["a", "b"], [1.0, 0.0])
    assert np.isnan(m["auc.b"]) and m["auc"] == m["auc.a"] == 1.0 and not np.isnan(m["score"])


def test_all_metric_weights_zero_is_a_config_error():
    """It failed with a bare ValueError at the first evaluation, after training steps had run."""
    from ctrpipe.errors import ConfigError
    from ctrpipe.features import FeatureSpec
    from ctrpipe.models.heads import Head
    from ctrpipe.train.config import TaskConfig, TrainConfig
    from ctrpipe.train.objective import build_tasks

    heads = (Head("a", ("a",)), Head("b", ("b",)))
    cfg = TrainConfig(tasks={"a": TaskConfig(metric_weight=0.0), "b": TaskConfig(metric_weight=0.0)})
    with pytest.raises(ConfigError, match="metric weight 0") as e:
        build_tasks(heads, FeatureSpec(labels=("a", "b")), cfg)
    assert e.value.where == "train.tasks.a.metric_weight"
