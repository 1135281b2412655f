"""Stage 3: `ShardLoader`, memory-mapped shards -> `Batch`es on the training device, one batch ahead.

No per-sample `__getitem__`, no collate, no torch DataLoader: each batch is a handful of slices (or sorted
gathers) per array, copied straight from the page cache into the batch's host buffers on a background thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ctrpipe.errors import ConfigError, ManifestMismatchError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.buffers import HostBuffers, HostPool, layout_of
from ctrpipe.loader.check import bad_id_error, check_labels
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.loader.sampler import BatchPlan, EpochPlan, Piece, ShuffleStrategy, epoch_rng, rank_bounds, slice_pieces
from ctrpipe.loader.sampling import BalancedRows, Sampling, apply_sampling, training_sampling
from ctrpipe.loader.view import RowView, resolve_view
from ctrpipe.prefetch import prefetch
from ctrpipe.shard.manifest import Manifest, read_manifest
from ctrpipe.shard.reader import ShardArrays


def drops_ragged_batch(rows: int, batch_size: int, shuffle: bool) -> bool:
    """Whether a training loader drops its ragged last batch (`from_config`; `ctrpipe plan` counts steps by it).
    Shuffled, the tail is other rows each epoch, and a 1-row batch breaks batch norm; unshuffled it would be
    the same rows every epoch, never trained, so it stays unless it is one row. A torchrun job keeps the
    batches one process keeps (its ranks' shares of a ragged batch differ: Objective.rows_share)."""
    return rows >= batch_size and (shuffle or rows % batch_size == 1)


class ShardLoader:
    """Batches of a `RowView` of a shard cache, already on `device`.

    Every row of the view appears exactly once per epoch (at most once where `drop_last` drops a ragged last
    batch: `drops_ragged_batch` says when training does); the order depends only on (seed, epoch), and is the
    view's global row order when `shuffle=False`. Batches may straddle shards. With `sampling` (training
    loaders only, see loader/sampling.py) the view is first downsampled -- the guarantee then holds for the kept
    rows -- or each batch holds a fixed number of positives, no row twice in an epoch.

    Tensors: numeric float32 (B, Fn); categorical int32 (B, Fc), kept int32 to halve host->device bytes
    (models cast, or use int32-capable lookups such as F.embedding); labels float32 (B, T) or None; row_index
    int64 (B,); multihot/sequence int32 tokens (B, L) + int32 lengths (B,) (+ float32 weights (B, L) for
    weighted multihot), in FeatureSpec order (= manifest column order of each kind).

    With `world_size` > 1 (data-parallel training, train/distributed.py) the loader plans every batch exactly as
    one process would and serves rank `rank`'s contiguous share of it (`rank_bounds`): the ranks read disjoint
    rows, each row once per epoch across them, and `len()` stays the number of global batches. A share with no
    rows (an evaluation batch smaller than the number of ranks) is skipped.

    A batch handed out never changes afterwards, even if the consumer keeps it (`list(loader)` is safe).
    On CPU, host buffer sets are recycled only once no tensor of theirs is alive (buffers.HostPool). On CUDA,
    a ring of prefetch + 2 sets (pinned when `pin_memory`) is copied to the device on a side stream; a set is
    refilled only after its copy's event completed, and the consumer's stream waits for that event.

    Example::

        loader = ShardLoader(Path("shards/criteo"), RowView.fold_train(0), 4096, shuffle=True, seed=1)
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:      # Batch on `device`, len(loader) per epoch
                ...
    """

    def __init__(self, cache_dir: Path, view: RowView, batch_size: int, *, shuffle: bool, seed: int,
                 device: torch.device | str = "cpu", block_rows: int = 256, prefetch: int = 2,
                 pin_memory: bool = True, drop_last: bool = False, with_labels: bool = True,
                 strategy: ShuffleStrategy = "block", window_shards: int = 0,
                 sampling: Sampling | None = None, rank: int = 0, world_size: int = 1) -> None:
        for key, value in (("batch_size", batch_size), ("block_rows", block_rows), ("prefetch", prefetch)):
            if value < 1:
                raise ConfigError(f"bad value {value} for '{key}' of the loader", fix=f"use a positive {key}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        if strategy not in ("block", "gather"):
            raise ConfigError(f"unknown shuffle strategy {strategy!r}", fix="use 'block' or 'gather'")
        self.cache_dir = Path(cache_dir)
        self.manifest: Manifest = read_manifest(self.cache_dir)
        self.spec: FeatureSpec = self.manifest.feature_spec()
        self.view = view
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.block_rows, self.prefetch, self.drop_last = block_rows, prefetch, drop_last
        self.strategy, self.window_shards = strategy, window_shards
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin = pin_memory and self.device.type == "cuda"
        self._layout = layout_of(self.cache_dir, self.manifest, with_labels)
        self._arrays = ShardArrays(self.cache_dir, self.manifest, self._layout.groups)
        self._arrays.check()
        self._index = resolve_view(self.cache_dir, self.manifest, view)
        self.num_rows: int = self._index.num_rows
        if self.num_rows == 0:
            raise ConfigError(f"{view.describe()} selects no rows of the cache (rows per split: "
                              f"{self.manifest.rows})", where=str(self.cache_dir),
                              fix="pick a split or fold that has rows (see manifest.json 'rows' and 'folds')")
        self.sampling = sampling
        self._balanced: BalancedRows | None = None
        if sampling is not None:
            self._index, self._balanced = apply_sampling(self.cache_dir, self.manifest, self._index, sampling,
                                                         batch_size, seed)
            self.num_rows = self._balanced.num_rows if self._balanced is not None else self._index.num_rows
        self._epoch = 0
        self._start = 0
        self._row_starts = [s.row_start for s in self.manifest.shards]
        # no batch holds more than the view's rows: a large eval batch over a small view (a val split, a few
        # rows to predict) sizes its host buffers, pinned ones on CUDA, by the rows there are
        most = min(batch_size, self.num_rows)
        self._arange = np.arange(most, dtype=np.int64)        # (B,) for row_index of slices, no allocation
        self._capacity = -(-most // world_size)                # rows of one rank's share of a batch

    @classmethod
    def from_config(cls, cache_dir: Path, view: RowView, cfg: LoaderConfig, *, seed: int,
                    device: torch.device | str = "cpu", train: bool = True,
                    with_labels: bool = True, rank: int = 0, world_size: int = 1) -> ShardLoader:
        """The loader `train` and `infer` both use: training shuffles with `batch_size` and drops a ragged
        last batch (a 1-row batch breaks batch norm; other rows fall in it each epoch) when the view holds at
        least one full batch; evaluation and prediction keep the view's order with `eval_batch_size` and serve
        every row (never sampled)."""
        sampling = training_sampling(cfg, read_manifest(Path(cache_dir)).feature_spec()) if train else None
        loader = cls(cache_dir, view, cfg.batch_size if train else cfg.eval_batch_size,
                     shuffle=cfg.shuffle and train, seed=seed, device=device, block_rows=cfg.block_rows,
                     prefetch=cfg.prefetch, pin_memory=cfg.pin_memory, with_labels=with_labels,
                     strategy=cfg.shuffle_strategy, window_shards=cfg.window_shards, sampling=sampling,
                     rank=rank, world_size=world_size)
        loader.drop_last = train and drops_ragged_batch(loader.num_rows, loader.batch_size, loader.shuffle)
        return loader

    # ------------------------------------------------------------------ epoch control
    def __len__(self) -> int:
        if self._balanced is not None:
            return self._balanced.num_batches
        n, b = self.num_rows, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (order = f(seed, epoch))."""
        self._epoch = int(epoch)

    def start_at(self, batch_idx: int) -> None:
        """Make the next iteration skip the first `batch_idx` batches of the current epoch (exact resume)."""
        if not 0 <= batch_idx <= len(self):
            raise ConfigError(f"cannot resume at batch {batch_idx}: an epoch has {len(self)} batches",
                              fix="resume from a checkpoint written by the same config and cache")
        self._start = int(batch_idx)

    def batch_rows(self) -> np.ndarray:
        """(len(self),) rows of each global batch of an epoch (all `batch_size` but a ragged last one)."""
        if self._balanced is not None:
            return np.full(len(self), self.batch_size, dtype=np.int64)
        k = np.arange(len(self), dtype=np.int64)
        return np.minimum(self.batch_size, self.num_rows - k * self.batch_size)

    def rank_rows(self) -> np.ndarray:
        """(len(self), world_size) rows rank r reads of global batch k (its `rank_bounds` share)."""
        n = self.batch_rows()[:, None]
        r = np.arange(self.world_size + 1, dtype=np.int64)[None, :]
        bounds = n * r // self.world_size                                   # (K, W + 1), as rank_bounds
        return np.diff(bounds, axis=1)

    def row_indices(self) -> np.ndarray:
        """(num_rows,) int64 global row indices of the view, unshuffled order (e.g. to lay out OOF arrays).
        Downsampled: the kept rows. Balanced: every row the epochs draw from (an epoch serves num_rows of them)."""
        return self._index.global_rows()

    def plan(self, epoch: int | None = None) -> BatchPlan:
        """The order of one epoch (the current one by default); cheap next to reading the rows."""
        epoch = self._epoch if epoch is None else epoch
        if self._balanced is not None:
            return self._balanced.plan(epoch_rng(self.seed, epoch))
        return EpochPlan(self._index, self.batch_size, shuffle=self.shuffle, strategy=self.strategy,
                         block_rows=self.block_rows, window_shards=self.window_shards,
                         drop_last=self.drop_last, rng=epoch_rng(self.seed, epoch))

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        start, self._start = self._start, 0
        if self.device.type == "cuda":
            return self._iter_cuda(plan, start)
        return self._iter_host(plan, start)

    # ------------------------------------------------------------------ batch formation
    def _pieces(self, plan: BatchPlan, k: int) -> list[Piece]:
        """Pieces of batch k this loader serves: the whole batch, or this rank's share of it."""
        pieces = plan.pieces(k)
        if self.world_size == 1:
            return pieces
        bounds = rank_bounds(sum(len(p) for p in pieces), self.world_size)
        return slice_pieces(pieces, bounds[self.rank], bounds[self.rank + 1])

    def _batches(self, plan: BatchPlan, start: int) -> list[int]:
        """Indices of the batches from `start` on that hold rows for this rank."""
        if self.world_size == 1:
            return list(range(start, plan.num_batches))
        rows = self.rank_rows()[:, self.rank]
        return [k for k in range(start, plan.num_batches) if rows[k] > 0]

    def _fill(self, buf: HostBuffers, pieces: list[Piece]) -> int:
        """Copy the pieces' rows into `buf` (slices: np.copyto; gathers: np.take with out=). Returns rows."""
        groups = [group for group, _ in buf.targets]
        outs = [out for _, out in buf.targets]
        sources: dict[int, list[np.ndarray]] = {}    # shard -> its arrays in `outs` order
        o = 0
        for shard, lo, hi, rows in pieces:
            srcs = sources.get(shard)
            if srcs is None:
                arrays = self._arrays.shard(shard)
                srcs = sources[shard] = [arrays[g] for g in groups]
            start = self._row_starts[shard]
            if rows is None:
                end = o + hi - lo
                for src, out in zip(srcs, outs, strict=True):
                    np.copyto(out[o:end], src[lo:hi])
                np.add(self._arange[:hi - lo], start + lo, out=buf.row_index[o:end])
            else:
                end = o + len(rows)
                for src, out in zip(srcs, outs, strict=True):
                    # mode="clip" skips numpy's bounds-check buffering; rows come from the shard's own index
                    np.take(src, rows, axis=0, out=out[o:end], mode="clip")
                np.add(rows, np.int64(start), out=buf.row_index[o:end], dtype=np.int64)
            o = end
        labels = buf.fields["labels"]
        if isinstance(labels, np.ndarray):
            check_labels(labels[:o], buf.row_index[:o], self.manifest, str(self.cache_dir))
        return o

    def bad_id_error(self, batch: Batch) -> ManifestMismatchError | None:
        """Why an embedding lookup of `batch` (one of this loader's) failed, when an id of the cache lies beyond
        its table: the error naming the shard file, row and column (`check.bad_id_error`); else None."""
        return bad_id_error(batch, self.manifest, str(self.cache_dir))

    def _iter_host(self, plan: BatchPlan, start: int) -> Iterator[Batch]:
        # recycled only when the consumer holds no tensor of a set: batches it keeps never change under it
        pool = HostPool(lambda: HostBuffers(self._layout, self._capacity, pinned=False),
                        keep=self.prefetch + 4)

        def produce(k: int) -> Batch:
            buf = pool.take()
            batch = buf.batch(self._fill(buf, self._pieces(plan, k)))
            return batch if self.device.type == "cpu" else batch.to(self.device)

        return prefetch(lambda: map(produce, self._batches(plan, start)), self.prefetch, "ctrpipe-loader")

    def _iter_cuda(self, plan: BatchPlan, start: int) -> Iterator[Batch]:
        ring = [HostBuffers(self._layout, self._capacity, self.pin) for _ in range(self.prefetch + 2)]
        side = torch.cuda.Stream(self.device)

        def produce(k: int) -> tuple[Batch, torch.cuda.Event]:
            buf = ring[k % len(ring)]
            if buf.event is not None:
                buf.event.synchronize()          # its previous copy has left the host buffer: safe to refill
            n = self._fill(buf, self._pieces(plan, k))
            with torch.cuda.stream(side):
                batch = buf.batch(n).to(self.device, non_blocking=True)
                buf.event = torch.cuda.Event()
                buf.event.record(side)
            return batch, buf.event

        batches = prefetch(lambda: map(produce, self._batches(plan, start)), self.prefetch, "ctrpipe-loader")
        try:
            for batch, ready in batches:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)        # kernels on the consumer's stream see the finished copy
                yield batch.record_stream(current)
        finally:
            batches.close()
