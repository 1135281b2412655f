"""ShardLoader on tiny real caches: coverage, order, determinism, resume, fields, errors, thread hygiene."""

from __future__ import annotations

import dataclasses
import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_cache import expected_fields, split_of, write_cache

from ctrpipe.errors import ConfigError, ManifestMismatchError
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView

STRATEGIES = [("block", 0), ("block", 1), ("block", 2), ("gather", 0)]


def rows_of(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([b.row_index.numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def check_values(batch: Batch) -> None:
    """Every field of every row equals what the fixture stored for that row's global index."""
    want = expected_fields(batch.row_index.numpy())
    assert batch.numeric.dtype == torch.float32 and batch.categorical.dtype == torch.int32
    np.testing.assert_array_equal(batch.numeric.numpy(), want["numeric"])
    np.testing.assert_array_equal(batch.categorical.numpy(), want["categorical"])
    if batch.labels is not None:
        np.testing.assert_array_equal(batch.labels.numpy(), want["labels"])
    if batch.multihot:
        np.testing.assert_array_equal(batch.multihot[0].numpy(), want["tags.tokens"])
        np.testing.assert_array_equal(batch.multihot_len[0].numpy(), want["tags.len"])
        np.testing.assert_array_equal(batch.multihot_weights[0].numpy(), want["tags.weights"])
        np.testing.assert_array_equal(batch.sequence[0].numpy(), want["hist.tokens"])
        np.testing.assert_array_equal(batch.sequence_len[0].numpy(), want["hist.len"])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("strategy", "window"), STRATEGIES)
@pytest.mark.parametrize("batch_size", [1, 7, 64, 1000])
def test_every_row_exactly_once(cache: Path, shuffle: bool, strategy: str, window: int,
                                batch_size: int) -> None:
    loader = ShardLoader(cache, RowView.train(), batch_size, shuffle=shuffle, seed=3, block_rows=8,
                         strategy=strategy, window_shards=window)
    batches = list(loader)  # holding every batch at once must be safe: nothing handed out is rewritten
    got = rows_of(batches)
    assert len(batches) == len(loader) == -(-loader.num_rows // batch_size)
    assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    assert len(got) == loader.num_rows == len(np.unique(got))
    np.testing.assert_array_equal(np.sort(got), loader.row_indices())
    assert (split_of(got) == 0).all()
    for b in batches:
        check_values(b)
    if not shuffle:  # unshuffled = the view's global order
        np.testing.assert_array_equal(got, loader.row_indices())


def test_batches_straddle_shards(cache: Path) -> None:
    """With 137- and 250-row shards and batch 64, some batch must hold rows of two shards."""
    loader = ShardLoader(cache, RowView(("train", "val", "gold", "test")), 64, shuffle=False, seed=0)
    batches = list(loader)
    np.testing.assert_array_equal(rows_of(batches), np.arange(137 + 250 + 61))
    assert any((b.row_index.numpy() < 137).any() and (b.row_index.numpy() >= 137).any() for b in batches)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("strategy", ["block", "gather"])
def test_drop_last(cache: Path, shuffle: bool, strategy: str) -> None:
    loader = ShardLoader(cache, RowView.train(), 50, shuffle=shuffle, seed=1, drop_last=True,
                         strategy=strategy)
    batches = list(loader)
    got = rows_of(batches)
    assert len(batches) == len(loader) == loader.num_rows // 50
    assert all(len(b) == 50 for b in batches)
    assert len(np.unique(got)) == len(got) == len(loader) * 50
    assert np.isin(got, loader.row_indices()).all()


@pytest.mark.parametrize(("strategy", "window"), STRATEGIES)
def test_deterministic_per_seed_and_epoch(cache: Path, strategy: str, window: int) -> None:
    def order(seed: int, epoch: int) -> np.ndarray:
        loader = ShardLoader(cache, RowView.train(), 16, shuffle=True, seed=seed, block_rows=4,
                             strategy=strategy, window_shards=window)
        loader.set_epoch(epoch)
        return rows_of(list(loader))

    first = order(7, 0)
    np.testing.assert_array_equal(first, order(7, 0))
    assert not np.array_equal(first, order(7, 1))
    assert not np.array_equal(first, order(8, 0))
    assert not np.array_equal(first, np.sort(first))


def test_window_of_one_shard_reads_shards_one_at_a_time(cache: Path) -> None:
    loader = ShardLoader(cache, RowView.train(), 10, shuffle=True, seed=5, block_rows=4, window_shards=1)
    shard_of = np.searchsorted([0, 137, 137, 387], rows_of(list(loader)), side="right") - 1
    changes = np.count_nonzero(np.diff(shard_of))
    assert changes == 2  # three non-empty shards, each visited in one run


@pytest.mark.parametrize("strategy", ["block", "gather"])
@pytest.mark.parametrize("resume_at", [0, 1, 5, 17])
def test_start_at_resumes_the_tail(cache: Path, strategy: str, resume_at: int) -> None:
    loader = ShardLoader(cache, RowView.train(), 16, shuffle=True, seed=11, strategy=strategy)
    loader.set_epoch(3)
    full = list(loader)
    loader.start_at(resume_at)
    tail = list(loader)
    assert len(tail) == len(full) - resume_at
    for a, b in zip(full[resume_at:], tail, strict=True):
        torch.testing.assert_close(a.row_index, b.row_index)
        torch.testing.assert_close(a.numeric, b.numeric)
    assert len(list(loader)) == len(full)  # start_at applies to one iteration only


def test_start_at_out_of_range(cache: Path) -> None:
    loader = ShardLoader(cache, RowView.train(), 16, shuffle=True, seed=11)
    with pytest.raises(ConfigError, match="an epoch has"):
        loader.start_at(len(loader) + 1)


def test_views_are_disjoint_and_cover_the_folds(cache: Path) -> None:
    def rows(view: RowView) -> np.ndarray:
        return ShardLoader(cache, view, 32, shuffle=True, seed=0).row_indices()

    views = (RowView.train(), RowView.val(), RowView.gold(), RowView.test())
    train, val, gold, test = (rows(v) for v in views)
    everything = np.sort(np.concatenate([train, val, gold, test]))
    np.testing.assert_array_equal(everything, np.arange(137 + 250 + 61))
    train_val = np.union1d(train, val)
    fold_vals = []
    for k in range(4):
        fit, score = rows(RowView.fold_train(k)), rows(RowView.fold_val(k))
        assert len(np.intersect1d(fit, score)) == 0
        np.testing.assert_array_equal(np.union1d(fit, score), train_val)
        fold_vals.append(score)
    np.testing.assert_array_equal(np.sort(np.concatenate(fold_vals)), train_val)  # each row scored once
    only_train = rows(RowView.fold_val(1, splits=("train",)))
    assert np.isin(only_train, train).all() and len(only_train) < len(fold_vals[1])


def test_fields_follow_the_feature_spec(cache: Path) -> None:
    loader = ShardLoader(cache, RowView.train(), 32, shuffle=False, seed=0)
    assert [f.name for f in loader.spec.multihot] == ["tags"]
    assert [f.name for f in loader.spec.sequence] == ["hist"]
    batch = next(iter(loader))
    assert batch.numeric.shape == (32, loader.spec.n_numeric)
    assert batch.categorical.shape == (32, len(loader.spec.categorical))
    assert batch.labels.shape == (32, 1) and batch.labels.dtype == torch.float32
    assert batch.row_index.dtype == torch.int64
    assert batch.multihot[0].shape == (32, 4) and batch.multihot_len[0].dtype == torch.int32
    assert batch.multihot_weights[0].dtype == torch.float32 and batch.sequence[0].shape == (32, 5)
    check_values(batch)


def test_without_labels(cache: Path, tmp_path: Path) -> None:
    batch = next(iter(ShardLoader(cache, RowView.train(), 8, shuffle=True, seed=0, with_labels=False)))
    assert batch.labels is None and batch.numeric is not None
    unlabelled = write_cache(tmp_path / "test_cache", (20, 30), labels=False, tokens=False)
    every_split = RowView(("train", "val", "gold", "test"))
    batches = list(ShardLoader(unlabelled, every_split, 8, shuffle=False, seed=0))
    assert all(b.labels is None and b.multihot == () and b.sequence == () for b in batches)
    np.testing.assert_array_equal(rows_of(batches), np.arange(50))


def test_empty_view_is_an_error(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "c", (3,))  # rows 0..2 are all train or val under split_of
    assert (split_of(np.arange(3)) != 2).all()
    with pytest.raises(ConfigError, match="the gold split selects no rows") as err:
        ShardLoader(cache, RowView.gold(), 8, shuffle=False, seed=0)
    assert "fix:" in str(err.value) and str(cache) in str(err.value)


def test_views_describe_themselves_in_words() -> None:
    """Messages and infer's summary showed the view's repr: RowView(splits=['test'])."""
    assert RowView(("test",)).describe() == "the test split"
    assert RowView(("train", "val", "gold")).describe() == "the train, val and gold splits"
    assert RowView.fold_val(2).describe() == "fold 2 of the train and val splits"
    assert RowView.fold_train(2).describe() == "the train and val splits except fold 2 and rows without a fold"


def test_unknown_split_name() -> None:
    with pytest.raises(ConfigError, match="unknown split 'valid'") as err:
        RowView(("valid",))
    assert "gold" in err.value.fix


def test_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="the folder does not exist"):
        ShardLoader(tmp_path / "nowhere", RowView.train(), 8, shuffle=False, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestMismatchError, match="manifest.json is missing"):
        ShardLoader(tmp_path / "empty", RowView.train(), 8, shuffle=False, seed=0)


def test_truncated_file_fails_at_construction(cache: Path) -> None:
    path = cache / "shard_00002" / "categorical.npy"
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(ManifestMismatchError, match="truncated") as err:
        ShardLoader(cache, RowView.train(), 8, shuffle=False, seed=0)
    assert str(path) in str(err.value) and "ctrpipe shard" in err.value.fix


def test_wrong_shape_fails_at_construction(cache: Path) -> None:
    path = cache / "shard_00000" / "numeric.npy"
    np.save(path, np.zeros((137, 2), np.float32))
    with pytest.raises(ManifestMismatchError, match="the manifest says") as err:
        ShardLoader(cache, RowView.train(), 8, shuffle=False, seed=0)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_error_in_the_thread_surfaces_in_iteration(cache: Path, damage: str) -> None:
    """A shard damaged after the loader was built fails when the thread maps it: raised here, no hang."""
    before = threading.active_count()
    loader = ShardLoader(cache, RowView.train(), 16, shuffle=False, seed=0)
    path = cache / "shard_00003" / "numeric.npy"   # the last shard: mapped only late in the epoch
    if damage == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    elif damage == "delete":
        os.remove(path)
    else:
        path.write_bytes(b"not an npy file at all" * 10)
    seen = []
    with pytest.raises(ManifestMismatchError) as err:
        for batch in loader:
            seen.append(batch)
    assert str(path) in str(err.value) and "fix:" in str(err.value)
    assert seen  # the healthy shards were served first
    gc.collect()
    assert threading.active_count() == before


@pytest.mark.parametrize("device_kind", ["cpu"])
def test_early_stop_leaks_no_thread(cache: Path, device_kind: str) -> None:
    before = threading.active_count()
    loader = ShardLoader(cache, RowView.train(), 4, shuffle=True, seed=0, prefetch=2, device=device_kind)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert threading.active_count() == before
    it = iter(loader)
    next(it)
    assert threading.active_count() == before + 1
    it.close()
    assert threading.active_count() == before
    for _ in range(3):  # whole epochs leave nothing behind either
        list(loader)
    assert threading.active_count() == before


def test_held_batch_is_not_rewritten(cache: Path) -> None:
    """The consumer keeps batch 0 while the thread produces the rest; batch 0 must not change."""
    loader = ShardLoader(cache, RowView.train(), 4, shuffle=True, seed=2, prefetch=1)
    it = iter(loader)
    first = next(it)
    snapshot = first.numeric.clone()
    rest = list(it)
    assert rest
    torch.testing.assert_close(first.numeric, snapshot)
    check_values(first)


def test_a_kept_view_pins_its_buffer(cache: Path) -> None:
    """Keeping only a view of a batch tensor (not the batch) must also keep its values."""
    loader = ShardLoader(cache, RowView.train(), 4, shuffle=True, seed=2, prefetch=1)
    it = iter(loader)
    first = next(it)
    column, rows = first.numeric[:, 1], first.row_index.numpy().copy()
    del first
    assert sum(1 for _ in it) > 3
    np.testing.assert_array_equal(column.numpy(), expected_fields(rows)["numeric"][:, 1])


def test_dropped_batches_recycle_host_memory(cache: Path) -> None:
    """A consumer that lets go of each batch gets a few reused buffer sets, not fresh memory per batch."""
    loader = ShardLoader(cache, RowView.train(), 4, shuffle=True, seed=2, prefetch=2)
    pointers = set()
    for batch in loader:
        check_values(batch)
        pointers.add(batch.numeric.data_ptr())
    assert len(loader) > 30 and len(pointers) <= loader.prefetch + 4


def test_from_config(cache: Path) -> None:
    cfg = LoaderConfig(batch_size=8, eval_batch_size=100, block_rows=4, shuffle_strategy="gather")
    train = ShardLoader.from_config(cache, RowView.train(), cfg, seed=1)
    evaluate = ShardLoader.from_config(cache, RowView.val(), cfg, seed=1, train=False)
    assert train.batch_size == 8 and train.shuffle and train.strategy == "gather"
    assert evaluate.batch_size == 100 and not evaluate.shuffle
    np.testing.assert_array_equal(rows_of(list(evaluate)), evaluate.row_indices())
    # unshuffled training dropped the same ragged tail every epoch: those rows were never trained
    ordered = ShardLoader.from_config(cache, RowView.train(), dataclasses.replace(cfg, shuffle=False), seed=1)
    assert ordered.num_rows % 8 > 1 and not ordered.drop_last
    np.testing.assert_array_equal(rows_of(list(ordered)), ordered.row_indices())
    assert train.drop_last         # shuffled: other rows fall in the tail each epoch


def test_loader_config_checks() -> None:
    with pytest.raises(ConfigError, match="loader.shuffle_strategy"):
        LoaderConfig(shuffle_strategy="random")  # type: ignore[arg-type]  # a bad value on purpose
    with pytest.raises(ConfigError, match="loader.window_shards"):
        LoaderConfig(window_shards=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin", [True, False])
def test_cuda_batches_match_cpu(cache: Path, pin: bool) -> None:
    """Pinned ring buffers + side-stream copies give the same batches as the CPU path, even when the
    consumer is slow (copies of later batches in flight) and when it holds on to every batch."""
    cpu = list(ShardLoader(cache, RowView.train(), 16, shuffle=True, seed=4, prefetch=2))
    gpu_loader = ShardLoader(cache, RowView.train(), 16, shuffle=True, seed=4, prefetch=2, device="cuda",
                             pin_memory=pin)
    gpu = []
    for b in gpu_loader:
        assert b.numeric.is_cuda and b.row_index.is_cuda
        torch.cuda._sleep(1_000_000)  # keep the consumer's stream busy while the thread refills the ring
        gpu.append(b)
    torch.cuda.synchronize()
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(a.row_index, b.row_index.cpu())
        torch.testing.assert_close(a.numeric, b.numeric.cpu())
        torch.testing.assert_close(a.multihot_weights[0], b.multihot_weights[0].cpu())


def test_a_cache_of_many_shards_stays_under_the_open_file_limit(tmp_path: Path) -> None:
    """Each memory map holds a file descriptor, and up to 256 shards' maps stayed open: a 200-shard cache
    needed ~2,000 and failed with EMFILE under `ulimit -n 1024`, blaming the cache ("rebuild it")."""
    import subprocess
    import sys

    from raw_inputs import write_criteo_tsv

    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    src = write_criteo_tsv(tmp_path / "t.tsv", 3000)
    cfg = load_config(Path(__file__).resolve().parents[2] / "cfgs" / "criteo.yaml",
                      ["data.shard_rows=40", "data.hash_bins=100"])
    assert len(build_shards(cfg, [src], tmp_path / "c", progress=False).manifest.shards) == 75
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))\n"        # the hard limit too: no raising it
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from ctrpipe.loader.config import LoaderConfig\n"
        "from ctrpipe.loader.loader import ShardLoader\n"
        "from ctrpipe.loader.view import RowView\n"
        f"view = ShardLoader.from_config(Path({str(tmp_path / 'c')!r}), RowView.train(),\n"
        "    LoaderConfig(batch_size=64, block_rows=8), seed=1)\n"
        "rows = np.concatenate([b.row_index.numpy() for b in view])\n"
        "print(len(rows), len(set(rows.tolist())))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    served, distinct = map(int, out.stdout.split())
    assert served == distinct > 2500


def test_a_batch_larger_than_the_view_sizes_buffers_by_the_view(tmp_path: Path) -> None:
    """A large eval batch over a small view (20M rows asked, 50 there) allocated row buffers (pinned ones on
    CUDA) for the 20M rows it never serves: ~0.6 GB and a second here (helper's loader sweep)."""
    import tracemalloc

    cache = write_cache(tmp_path / "c", (20, 30))
    want = ShardLoader(cache, RowView(("train", "val", "gold", "test")), 64, shuffle=False, seed=0)
    tracemalloc.start()
    try:
        loader = ShardLoader(cache, RowView(("train", "val", "gold", "test")), 20_000_000, shuffle=False, seed=0)
        batches = list(loader)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak
    assert len(batches) == 1
    np.testing.assert_array_equal(batches[0].row_index.numpy(),
                                  np.concatenate([b.row_index.numpy() for b in want]))
