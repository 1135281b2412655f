"""Stage 3: `ShardLoader`, memory-mapped shards -> `Batch`es on the training device, one batch ahead.

No per-sample `__getitem__`, no collate, no torch DataLoader: each batch is a handful of slices (or sorted
gathers) per array, copied straight from the page cache into the batch's host buffers on a background thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctrpipe.errors import ConfigError, ManifestMismatchError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.loader.prefetch import background
from ctrpipe.loader.sampler import EpochPlan, Piece, ShuffleStrategy, epoch_rng
from ctrpipe.loader.shards import REBUILD_FIX, ShardArrays
from ctrpipe.loader.view import RowView, resolve_view
from ctrpipe.shard.manifest import Manifest, read_manifest


@dataclass(frozen=True)
class _Array:
    """One stored array group feeding one Batch tensor: file stem, per-row shape, dtype."""

    group: str
    row_shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class _Layout:
    """Which group fills which Batch field; tuples follow the FeatureSpec (manifest column) order."""

    numeric: _Array | None
    categorical: _Array | None
    labels: _Array | None
    multihot: tuple[_Array, ...]
    multihot_len: tuple[_Array, ...]
    multihot_weights: tuple[_Array | None, ...]
    sequence: tuple[_Array, ...]
    sequence_len: tuple[_Array, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        arrays = [self.numeric, self.categorical, self.labels, *self.multihot, *self.multihot_len,
                  *self.multihot_weights, *self.sequence, *self.sequence_len]
        return tuple(a.group for a in arrays if a is not None)


def _layout(cache_dir: Path, manifest: Manifest, with_labels: bool) -> _Layout:
    """Derive the Batch layout from the manifest; every shard must agree on row shape and dtype."""

    def array(group: str) -> _Array:
        kinds = {(tuple(s.files[group].shape[1:]), s.files[group].dtype) for s in manifest.shards
                 if group in s.files}
        if len(kinds) != 1 or any(group not in s.files for s in manifest.shards):
            raise ManifestMismatchError(f"shards disagree on array '{group}' (shapes/dtypes {sorted(kinds)})",
                                        where=str(cache_dir / "manifest.json"), fix=REBUILD_FIX)
        shape, dtype = kinds.pop()
        return _Array(group, shape, np.dtype(dtype))

    def token_arrays(kind: str) -> tuple[tuple[_Array, ...], tuple[_Array, ...], tuple[_Array | None, ...]]:
        cols = manifest.columns_of(kind)
        stems = [c.group.removesuffix(".tokens") for c in cols]
        weights = tuple(array(f"{s}.weights") if c.weighted else None
                        for c, s in zip(cols, stems, strict=True))
        return tuple(array(c.group) for c in cols), tuple(array(f"{s}.len") for s in stems), weights

    has = {c.group for c in manifest.columns}
    mh, mh_len, mh_w = token_arrays("multihot")
    seq, seq_len, _ = token_arrays("sequence")
    return _Layout(
        numeric=array("numeric") if manifest.columns_of("numeric", "missing_indicator", "covisit") else None,
        categorical=array("categorical") if manifest.columns_of("categorical") else None,
        labels=array("labels") if with_labels and "labels" in has and manifest.columns_of("label") else None,
        multihot=mh, multihot_len=mh_len, multihot_weights=mh_w, sequence=seq, sequence_len=seq_len)


@dataclass
class _HostBuffers:
    """Host memory for one batch: the Batch of tensors plus numpy views of them to fill."""

    batch: Batch
    targets: list[tuple[str, np.ndarray]]      # (group, (rows, ...) array aliasing a batch tensor)
    row_index: np.ndarray                      # (rows,) int64, aliasing batch.row_index
    event: torch.cuda.Event | None = field(default=None)  # set after its device copy is queued (CUDA only)


class ShardLoader:
    """Batches of a `RowView` of a shard cache, already on `device`.

    Every row of the view appears exactly once per epoch; the order depends only on (seed, epoch), and is the
    view's global row order when `shuffle=False`. Batches may straddle shards.

    Tensors: numeric float32 (B, Fn); categorical int32 (B, Fc), kept int32 to halve host->device bytes
    (models cast, or use int32-capable lookups such as F.embedding); labels float32 (B, T) or None; row_index
    int64 (B,); multihot/sequence int32 tokens (B, L) + int32 lengths (B,) (+ float32 weights (B, L) for
    weighted multihot), in FeatureSpec order (= manifest column order of each kind).

    On CPU every batch owns fresh tensors, so holding on to batches (even `list(loader)`) is safe. On CUDA,
    host buffers are a reused ring of prefetch + 2 (pinned when `pin_memory`), copied on a side stream; a slot
    is refilled only after its copy's event has completed, and the consumer's stream waits for that event.
    """

    def __init__(self, cache_dir: Path, view: RowView, batch_size: int, *, shuffle: bool, seed: int,
                 device: torch.device | str = "cpu", block_rows: int = 256, prefetch: int = 2,
                 pin_memory: bool = True, drop_last: bool = False, with_labels: bool = True,
                 strategy: ShuffleStrategy = "block", window_shards: int = 0) -> None:
        for key, value in (("batch_size", batch_size), ("block_rows", block_rows), ("prefetch", prefetch)):
            if value < 1:
                raise ConfigError(f"bad value {value} for '{key}' of the loader", fix=f"use a positive {key}")
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
        self._layout = _layout(self.cache_dir, self.manifest, with_labels)
        self._arrays = ShardArrays(self.cache_dir, self.manifest, self._layout.groups)
        self._arrays.check()
        self._index = resolve_view(self.cache_dir, self.manifest, view)
        self.num_rows: int = self._index.num_rows
        if self.num_rows == 0:
            raise ConfigError(f"{view.describe()} selects no rows of the cache (rows per split: "
                              f"{self.manifest.rows})", where=str(self.cache_dir),
                              fix="pick a split or fold that has rows (see manifest.json 'rows' and 'folds')")
        self._epoch = 0
        self._start = 0

    @classmethod
    def from_config(cls, cache_dir: Path, view: RowView, cfg: LoaderConfig, *, seed: int,
                    device: torch.device | str = "cpu", train: bool = True,
                    with_labels: bool = True) -> ShardLoader:
        """Training loaders shuffle with `batch_size`; evaluation ones keep order with `eval_batch_size`."""
        return cls(cache_dir, view, cfg.batch_size if train else cfg.eval_batch_size,
                   shuffle=cfg.shuffle and train, seed=seed, device=device, block_rows=cfg.block_rows,
                   prefetch=cfg.prefetch, pin_memory=cfg.pin_memory, with_labels=with_labels,
                   strategy=cfg.shuffle_strategy, window_shards=cfg.window_shards)

    # ------------------------------------------------------------------ epoch control
    def __len__(self) -> int:
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

    def row_indices(self) -> np.ndarray:
        """(num_rows,) int64 global row indices of the view, unshuffled order (e.g. to lay out OOF arrays)."""
        return self._index.global_rows()

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The order of one epoch (the current one by default); cheap next to reading the rows."""
        epoch = self._epoch if epoch is None else epoch
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
    def _buffers(self, rows: int, pinned: bool) -> _HostBuffers:
        targets: list[tuple[str, np.ndarray]] = []

        def alloc(a: _Array | None) -> torch.Tensor | None:
            if a is None:
                return None
            dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
            t = torch.empty((rows, *a.row_shape), dtype=dtype, pin_memory=pinned)
            targets.append((a.group, t.numpy()))
            return t

        lay = self._layout
        row_index = torch.empty(rows, dtype=torch.int64, pin_memory=pinned)
        batch = Batch(numeric=alloc(lay.numeric), categorical=alloc(lay.categorical),
                      labels=alloc(lay.labels), row_index=row_index,
                      multihot=tuple(alloc(a) for a in lay.multihot),
                      multihot_len=tuple(alloc(a) for a in lay.multihot_len),
                      multihot_weights=tuple(alloc(a) for a in lay.multihot_weights),
                      sequence=tuple(alloc(a) for a in lay.sequence),
                      sequence_len=tuple(alloc(a) for a in lay.sequence_len))
        return _HostBuffers(batch, targets, row_index.numpy())

    def _fill(self, buf: _HostBuffers, pieces: list[Piece]) -> int:
        """Copy the pieces' rows into `buf` (slices: np.copyto; gathers: np.take with out=). Returns rows."""
        o = 0
        for p in pieces:
            arrays = self._arrays.shard(p.shard)
            start = np.int64(self._index.row_starts[p.shard])
            m = len(p)
            if p.rows is None:
                for group, out in buf.targets:
                    np.copyto(out[o:o + m], arrays[group][p.start:p.stop])
                np.add(np.arange(p.start, p.stop, dtype=np.int64), start, out=buf.row_index[o:o + m])
            else:
                for group, out in buf.targets:
                    # mode="clip" skips numpy's bounds-check buffering; rows come from the shard's own index
                    np.take(arrays[group], p.rows, axis=0, out=out[o:o + m], mode="clip")
                np.add(p.rows, start, out=buf.row_index[o:o + m], dtype=np.int64)
            o += m
        return o

    def _iter_host(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        def produce(k: int) -> Batch:
            pieces = plan.pieces(k)
            # fresh buffers per batch: a consumer may keep batches, so nothing handed out is ever rewritten
            buf = self._buffers(sum(len(p) for p in pieces), pinned=False)
            self._fill(buf, pieces)
            if self.device.type == "cpu":
                return buf.batch
            return buf.batch.to(self.device)

        return background(produce, range(start, plan.num_batches), self.prefetch)

    def _iter_cuda(self, plan: EpochPlan, start: int) -> Iterator[Batch]:
        ring = [self._buffers(self.batch_size, self.pin) for _ in range(self.prefetch + 2)]
        side = torch.cuda.Stream(self.device)

        def produce(k: int) -> tuple[Batch, torch.cuda.Event]:
            buf = ring[k % len(ring)]
            if buf.event is not None:
                buf.event.synchronize()          # its previous copy has left the host buffer: safe to refill
            n = self._fill(buf, plan.pieces(k))
            with torch.cuda.stream(side):
                batch = buf.batch.head(n).to(self.device, non_blocking=True)
                buf.event = torch.cuda.Event()
                buf.event.record(side)
            return batch, buf.event

        batches = background(produce, range(start, plan.num_batches), self.prefetch)
        try:
            for batch, ready in batches:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)        # kernels on the consumer's stream see the finished copy
                yield batch.record_stream(current)
        finally:
            batches.close()
