"""Train-split statistics: counting merges, vocab ids, median histogram, co-visitation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrpipe.data.covisit import ContextTokens, CovisitCounter, covisit_features
from ctrpipe.data.fitted import (
    Fitted,
    KeyCounter,
    MomentAccumulator,
    NumericAccumulator,
    NumericStats,
    VocabTable,
    merge_counts,
)


def test_merge_counts_matches_unique() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 50, 1000).astype(np.uint64)
    kc = KeyCounter()
    for i in range(0, 1000, 37):
        kc.add(data[i:i + 37])
    u, c = np.unique(data, return_counts=True)
    assert np.array_equal(kc.keys, u) and np.array_equal(kc.counts, c)
    k, c2 = merge_counts(u, c, np.zeros(0, np.uint64), np.zeros(0, np.int64))
    assert np.array_equal(k, u)


def test_vocab_ids_by_frequency_and_oov() -> None:
    kc = KeyCounter()
    kc.add(np.array([5, 5, 5, 9, 9, 3, 7, 7], dtype=np.uint64))   # 5:3, 9:2, 7:2, 3:1
    v = VocabTable.from_counts(kc, min_count=2)
    ids = v.lookup(np.array([5, 7, 9, 3, 11, 5], np.uint64), np.array([0, 0, 0, 0, 0, 1], bool))
    assert ids.tolist() == [2, 3, 4, 1, 1, 0]                   # ties (7, 9 with 2) broken by hash value
    assert v.bins == 5 and ids.dtype == np.int32
    capped = VocabTable.from_counts(kc, min_count=1, max_bins=3)
    assert capped.bins == 3
    assert capped.lookup(np.array([5, 9], np.uint64), np.zeros(2, bool)).tolist() == [2, 1]


def test_median_fill_exact_for_integers_and_chunk_invariant() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(-20, 500, size=(1001, 2)).astype(np.float64)
    x[rng.random((1001, 2)) < 0.3] = np.nan
    acc1, acc2 = NumericAccumulator(("a", "b"), True), NumericAccumulator(("a", "b"), True)
    acc1.update(x)
    for i in range(0, 1001, 13):
        acc2.update(x[i:i + 13])
    f1, f2 = acc1.fills("median"), acc2.fills("median")
    assert np.array_equal(f1, f2)
    for j in range(2):
        v = np.sort(x[~np.isnan(x[:, j]), j])
        assert f1[j] == v[(len(v) + 1) // 2 - 1]
    assert np.allclose(acc1.fills("mean"), np.nanmean(x, axis=0), rtol=1e-6)


def test_covisit_counts_and_leave_one_out() -> None:
    # rows: target, context tokens
    target = np.array([1, 1, 2, 1], dtype=np.uint64)
    ctx = ContextTokens(hashes=np.array([10, 11, 10, 12, 10], np.uint64), lengths=np.array([2, 1, 1, 1]))
    counter = CovisitCounter()
    counted = np.array([True, True, True, False])
    counter.update(target, np.zeros(4, bool), ctx, counted)
    pairs, ctab = counter.tables()
    # counted rows 0-2: n(10)=2, n(11)=1, n(12)=1; n(1,10)=2, n(1,11)=1, n(2,12)=1
    feats = covisit_features(pairs, ctab, target, np.zeros(4, bool), ctx, 1.0, np.zeros(4, bool))
    assert np.allclose(feats[0], [2 / 3, (2 / 3 + 1 / 2) / 2])
    assert np.allclose(feats[3], [2 / 3, 2 / 3])                 # row 3 was not counted
    loo = covisit_features(pairs, ctab, target, np.zeros(4, bool), ctx, 1.0, counted)
    assert np.allclose(loo[1], [1 / 2, 1 / 2])                   # (2-1) / (2-1+1)
    assert np.allclose(loo[3], feats[3])
    empty = ContextTokens(np.zeros(0, np.uint64), np.zeros(4, np.int64))
    assert not covisit_features(pairs, ctab, target, np.zeros(4, bool), empty, 1.0, counted).any()


@pytest.mark.parametrize("native", ["1", "0"])
def test_leave_one_out_removes_every_occurrence_of_a_repeated_token(native: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A history holding a token twice counted twice in n(t, c) and n(c) but had one subtracted: the only row
    with (t3, zz) scored (2-1)/(2-1+1) = 0.5 on its own occurrences (helper's shard sweep). Both paths, on
    short and long rows of few distinct tokens (the kernel's per-row table probes past collisions: tokens
    1..11 share their low bits), equal a brute-force count."""
    monkeypatch.setenv("CTRPIPE_NATIVE", native)
    rng = np.random.default_rng(3)
    n = 400
    lengths = rng.choice([0, 1, 2, 5, 70, 150], size=n).astype(np.int64)
    hashes = rng.integers(1, 12, int(lengths.sum())).astype(np.uint64)
    target = rng.integers(1, 4, n).astype(np.uint64)
    counted = rng.random(n) < 0.7
    ctx = ContextTokens(hashes, lengths)
    counter = CovisitCounter()
    counter.update(target, np.zeros(n, bool), ctx, counted)
    pairs, ctab = counter.tables()
    got = covisit_features(pairs, ctab, target, np.zeros(n, bool), ctx, 1.0, counted)
    rows = np.split(hashes, np.cumsum(lengths)[:-1])
    n_tc: dict[tuple[int, int], int] = {}
    n_c: dict[int, int] = {}
    for i in np.flatnonzero(counted):
        for c in rows[i].tolist():
            n_tc[(int(target[i]), c)] = n_tc.get((int(target[i]), c), 0) + 1
            n_c[c] = n_c.get(c, 0) + 1
    for i, row in enumerate(rows):
        if not len(row):
            continue
        own = {c: int((row == c).sum()) if counted[i] else 0 for c in row.tolist()}
        scores = [max(n_tc.get((int(target[i]), c), 0) - own[c], 0) / (max(n_c.get(c, 0) - own[c], 0) + 1.0)
                  for c in row.tolist()]
        assert got[i, 0] == pytest.approx(max(scores), rel=1e-6) and got[i, 1] == pytest.approx(np.mean(scores),
                                                                                                    rel=1e-6), i
    one = ContextTokens(np.array([7, 7], np.uint64), np.array([2]))
    alone = CovisitCounter()
    alone.update(np.array([3], np.uint64), np.zeros(1, bool), one, np.ones(1, bool))
    assert not covisit_features(*alone.tables(), np.array([3], np.uint64), np.zeros(1, bool), one, 1.0,
                                np.ones(1, bool)).any()


def test_fitted_save_load_round_trip(tmp_path: Path) -> None:
    kc = KeyCounter()
    kc.add(np.array([1, 2, 2], np.uint64))
    counter = CovisitCounter()
    counter.update(np.array([1], np.uint64), np.zeros(1, bool),
                   ContextTokens(np.array([4], np.uint64), np.array([1])), np.ones(1, bool))
    fitted = Fitted(numeric={"I1": NumericStats(1.0, 0.5, 2.0)}, vocab={"C/1": VocabTable.from_counts(kc, 1)},
                    covisit={"cv": counter.tables()}, train_rows=3)
    fitted.save(tmp_path)
    back = Fitted.load(tmp_path)
    assert back.identity() == fitted.identity()
    assert back.numeric == fitted.numeric
    assert (tmp_path / "fitted" / "vocab.C_1.hashes.npy").is_file()


@pytest.mark.parametrize("log1p", ["none", "signed"])
def test_moments_of_a_far_from_zero_column_do_not_depend_on_the_chunks(log1p: str) -> None:
    """A Unix time standardised: E[x^2] - E[x]^2 lost the variance to cancellation (about 2^-22 of it after
    log1p), so `data.chunk_rows` 7777 and 10000 gave different stds, and so different shards. Sums about a
    reference value leave only rounding far below float32's: the same mean and std for these chunkings."""
    from ctrpipe.data.transforms import log1p_transform

    rng = np.random.default_rng(0)
    raw = np.stack([1.7e9 + rng.integers(0, 2_600_000, 40_000), 1990 + rng.integers(0, 30, 40_000)], 1)
    raw = raw.astype(np.float32).astype(np.float64)
    raw[rng.random(raw.shape) < 0.05] = np.nan
    valid = np.isfinite(raw)
    t = np.asarray(log1p_transform(np.where(valid, raw, 0.0), log1p), dtype=np.float32)
    fill = np.asarray(log1p_transform(np.nanmedian(raw, axis=0).reshape(1, -1), log1p)).reshape(-1)
    results = []
    for size in (40_000, 10_000, 7_777, 1_000, 333):
        mom = MomentAccumulator(2)
        for a in range(0, len(t), size):
            mom.update(t[a:a + size], valid[a:a + size])
        results.append(mom.result(fill))
    for mean, std in results[1:]:
        assert mean.tolist() == results[0][0].tolist() and std.tolist() == results[0][1].tolist()
    full = np.where(valid, t, fill.astype(np.float32)).astype(np.float64)
    np.testing.assert_allclose(results[0][0], full.mean(0), rtol=1e-7)
    np.testing.assert_allclose(results[0][1], full.std(0), rtol=1e-6)
