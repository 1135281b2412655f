"""Training-time sampling on tiny real caches: negative downsampling and balanced batches (which rows, how
many positives, determinism, resume), never on evaluation loaders, the logit shift, and the errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_cache import expected_fields, write_cache
from test_loader import STRATEGIES, check_values, rows_of

from ctrpipe.errors import ConfigError
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.sampler import ShuffleStrategy
from ctrpipe.loader.sampling import Sampling, row_uniforms, training_sampling
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import read_manifest

Q = 0.25
DOWN = Sampling(0, "label", neg_keep_prob=Q, shift=math.log(Q))


def label_of(rows: np.ndarray) -> np.ndarray:
    return expected_fields(rows)["labels"][:, 0]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~6000 train rows (a third positive) over four shards, one empty: enough rows to measure rates."""
    return write_cache(tmp_path_factory.mktemp("sampling") / "cache", (3001, 0, 5003, 1999))


def balanced(f: float, batch_size: int) -> Sampling:
    p = round(f * batch_size) / batch_size
    return Sampling(0, "label", pos_fraction=f, shift=math.log(0.33 / 0.67) - math.log(p / (1 - p)))


# ----------------------------------------------------------------------------------------------- downsampling

@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("strategy", "window"), STRATEGIES)
def test_downsampling_keeps_positives_and_a_q_share_of_negatives(big: Path, shuffle: bool, strategy: str,
                                                                  window: int) -> None:
    full = ShardLoader(big, RowView.train(), 64, shuffle=False, seed=5).row_indices()
    loader = ShardLoader(big, RowView.train(), 64, shuffle=shuffle, seed=5, block_rows=8, strategy=strategy,
                         window_shards=window, sampling=DOWN)
    kept = loader.row_indices()
    assert np.isin(kept, full).all() and np.array_equal(kept, np.sort(kept))
    positives = full[label_of(full) == 1]
    negatives = full[label_of(full) == 0]
    assert np.isin(positives, kept).all()                                # every positive stays
    share = np.isin(negatives, kept).mean()
    assert abs(share - Q) < 0.03, share                                  # ~4000 negatives: sd ~0.007
    # the kept rows are the loader's view: each exactly once per epoch, in every epoch, with the right values
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        got = rows_of(batches)
        assert len(batches) == len(loader) == -(-loader.num_rows // 64) and loader.num_rows == len(kept)
        np.testing.assert_array_equal(np.sort(got), kept)
        for b in batches[:3]:
            check_values(b)
        if not shuffle:
            np.testing.assert_array_equal(got, kept)


def test_downsampling_is_decided_per_row_by_the_seed(big: Path) -> None:
    """Same seed: the same rows whatever the view, epoch or strategy; another seed: other rows."""
    def kept(view: RowView, seed: int, strategy: ShuffleStrategy = "block") -> np.ndarray:
        return ShardLoader(big, view, 32, shuffle=True, seed=seed, sampling=DOWN, strategy=strategy).row_indices()

    a = kept(RowView.train(), 1)
    np.testing.assert_array_equal(a, kept(RowView.train(), 1, strategy="gather"))
    assert not np.array_equal(a, kept(RowView.train(), 2))
    f0, f1 = kept(RowView.fold_train(0), 1), kept(RowView.fold_train(1), 1)
    v0 = ShardLoader(big, RowView.fold_train(0), 32, shuffle=False, seed=1).row_indices()
    v1 = ShardLoader(big, RowView.fold_train(1), 32, shuffle=False, seed=1).row_indices()
    both = np.intersect1d(v0, v1)
    np.testing.assert_array_equal(np.intersect1d(f0, both), np.intersect1d(f1, both))
    u = row_uniforms(np.arange(200_000), 1)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005


def test_shift_recovers_the_true_rate_of_the_downsampled_rows(big: Path) -> None:
    """The prior a model fits on the kept rows, shifted by log q, is the view's own positive rate."""
    full = ShardLoader(big, RowView.train(), 64, shuffle=False, seed=0).row_indices()
    for q in (0.05, 0.2, 0.5):
        sampling = training_sampling(LoaderConfig(neg_keep_prob=q), read_manifest(big).feature_spec())
        assert sampling is not None and sampling.shift == pytest.approx(math.log(q))
        kept = ShardLoader(big, RowView.train(), 64, shuffle=True, seed=3, sampling=sampling).row_indices()
        sampled = label_of(kept).mean()
        corrected = 1 / (1 + math.exp(-(math.log(sampled / (1 - sampled)) + sampling.shift)))
        true = label_of(full).mean()
        assert abs(sampled - true) > 0.1                              # the stream's prior is far off ...
        assert corrected == pytest.approx(true, abs=0.02)             # ... and the shift brings it back


def test_evaluation_loaders_are_never_sampled(big: Path) -> None:
    for cfg in (LoaderConfig(batch_size=50, neg_keep_prob=0.1),
                LoaderConfig(batch_size=50, balance_pos_fraction=0.5)):
        train = ShardLoader.from_config(big, RowView.train(), cfg, seed=1)
        every = ShardLoader(big, RowView.train(), 50, shuffle=False, seed=1).row_indices()
        assert train.sampling is not None and train.num_rows < len(every)
        evaluate = ShardLoader.from_config(big, RowView.train(), cfg, seed=1, train=False)
        assert evaluate.sampling is None
        np.testing.assert_array_equal(rows_of(list(evaluate)), every)


# ----------------------------------------------------------------------------------------------- balanced

@pytest.mark.parametrize(("f", "batch_size"), [(0.5, 64), (0.4, 50), (0.9, 10)])
def test_balanced_batches_hold_exactly_the_target_positives(big: Path, f: float, batch_size: int) -> None:
    loader = ShardLoader(big, RowView.train(), batch_size, shuffle=True, seed=7, sampling=balanced(f, batch_size))
    every = ShardLoader(big, RowView.train(), 64, shuffle=False, seed=7).row_indices()
    n_pos = int(label_of(every).sum())
    p = round(f * batch_size)
    assert len(loader) == n_pos // p and loader.num_rows == len(loader) * batch_size
    seen_neg = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert len(b) == batch_size and int(b.labels.sum()) == p        # exactly P positives per batch
            rows = b.row_index.numpy()
            assert np.array_equal(rows, np.sort(rows))
        for b in batches[:3]:
            check_values(b)
        got = rows_of(batches)
        assert len(np.unique(got)) == len(got) and np.isin(got, every).all()    # no row twice in an epoch
        pos = got[label_of(got) == 1]
        assert n_pos - len(pos) < p                                          # all positives but < P
        seen_neg.append(np.sort(got[label_of(got) == 0]))
    assert not np.array_equal(seen_neg[0], seen_neg[1])                       # fresh negatives each epoch


def test_balanced_is_deterministic_for_seed_and_epoch(big: Path) -> None:
    def epoch_rows(seed: int, epoch: int) -> list[np.ndarray]:
        loader = ShardLoader(big, RowView.train(), 40, shuffle=True, seed=seed, sampling=balanced(0.5, 40))
        loader.set_epoch(epoch)
        return [b.row_index.numpy() for b in loader]

    a = epoch_rows(3, 1)
    for x, y in zip(a, epoch_rows(3, 1), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], epoch_rows(3, 0)[0])
    assert not np.array_equal(a[0], epoch_rows(4, 1)[0])


@pytest.mark.parametrize("sampling", [DOWN, balanced(0.5, 32)], ids=["downsample", "balanced"])
def test_resume_mid_epoch_serves_the_rest_of_the_same_epoch(big: Path, sampling: Sampling) -> None:
    loader = ShardLoader(big, RowView.train(), 32, shuffle=True, seed=9, sampling=sampling)
    loader.set_epoch(2)
    whole = [b.row_index.numpy() for b in loader]
    again = ShardLoader(big, RowView.train(), 32, shuffle=True, seed=9, sampling=sampling)
    again.set_epoch(2)
    again.start_at(5)
    rest = [b.row_index.numpy() for b in again]
    assert len(rest) == len(whole) - 5
    for x, y in zip(whole[5:], rest, strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------- shift, errors

def test_balanced_shift_and_refusals(big: Path) -> None:
    spec = read_manifest(big).feature_spec()                      # label rate 0.33 in the manifest
    s = training_sampling(LoaderConfig(batch_size=64, balance_pos_fraction=0.5), spec)
    assert s is not None and s.pos_fraction == 0.5
    assert s.shift == pytest.approx(math.log(0.33 / 0.67) - math.log(32 / 32))
    assert training_sampling(LoaderConfig(), spec) is None
    with pytest.raises(ConfigError, match="train-split rate 0.3300") as err:
        training_sampling(LoaderConfig(batch_size=64, balance_pos_fraction=0.2), spec)
    assert err.value.where == "loader.balance_pos_fraction" and "above 0.3300" in err.value.fix
    with pytest.raises(ConfigError, match="'clicked'") as err:
        training_sampling(LoaderConfig(neg_keep_prob=0.5, sample_label="clicked"), spec)
    assert err.value.where == "loader.sample_label" and "label" in err.value.fix
    with pytest.raises(ConfigError, match="'clk'"):            # a typo is named with sampling off too
        training_sampling(LoaderConfig(sample_label="clk"), spec)
    # a view that cannot fill the batches the config asks for fails when the loader is built, with the fix
    with pytest.raises(ConfigError, match="negatives of label 'label'") as err:
        ShardLoader(big, RowView.train(), 50, shuffle=True, seed=1, sampling=balanced(0.2, 50))
    assert "above 0.33" in err.value.fix
    with pytest.raises(ConfigError, match="fewer than the 900 of one balanced batch"):
        ShardLoader(big, RowView.gold(), 1000, shuffle=True, seed=1, sampling=balanced(0.9, 1000))


@pytest.mark.parametrize(("kw", "key"), [
    ({"neg_keep_prob": 0.0}, "loader.neg_keep_prob"),
    ({"neg_keep_prob": 1.5}, "loader.neg_keep_prob"),
    ({"balance_pos_fraction": 1.0}, "loader.balance_pos_fraction"),
    ({"balance_pos_fraction": 0.5, "neg_keep_prob": 0.5}, "loader.balance_pos_fraction"),
    ({"balance_pos_fraction": 0.5, "shuffle": False}, "loader.balance_pos_fraction"),
    ({"balance_pos_fraction": 0.001, "batch_size": 64}, "loader.balance_pos_fraction"),
])
def test_loader_config_sampling_checks(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        LoaderConfig(**kw)  # type: ignore[arg-type]  # bad values on purpose
    assert key in err.value.render() and err.value.fix


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampling", [DOWN, balanced(0.5, 32)], ids=["downsample", "balanced"])
def test_cuda_sampled_batches_match_cpu(big: Path, sampling: Sampling) -> None:
    cpu = list(ShardLoader(big, RowView.train(), 32, shuffle=True, seed=4, sampling=sampling))
    gpu = list(ShardLoader(big, RowView.train(), 32, shuffle=True, seed=4, sampling=sampling, device="cuda"))
    torch.cuda.synchronize()
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a.row_index, b.row_index.cpu())
        torch.testing.assert_close(a.labels, b.labels.cpu())
