"""Stage 3: host memory that batches are assembled in, laid out after the manifest, and reused safely.

Fresh memory for every batch costs page faults comparable to the copy itself, so buffer sets are recycled:
on CUDA as a ring guarded by copy events, on CPU as a pool whose sets are reused only when no tensor handed
to the consumer (nor any view of one) is still alive.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError
from ctrpipe.loader.batch import Batch
from ctrpipe.shard.manifest import MANIFEST_NAME, Manifest


@dataclass(frozen=True)
class ArraySpec:
    """One stored array group feeding one Batch tensor: file stem, per-row shape, dtype."""

    group: str
    row_shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Layout:
    """Which group fills which Batch field; tuples follow the FeatureSpec (manifest column) order."""

    numeric: ArraySpec | None
    categorical: ArraySpec | None
    labels: ArraySpec | None
    multihot: tuple[ArraySpec, ...]
    multihot_len: tuple[ArraySpec, ...]
    multihot_weights: tuple[ArraySpec | None, ...]
    sequence: tuple[ArraySpec, ...]
    sequence_len: tuple[ArraySpec, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        arrays = [self.numeric, self.categorical, self.labels, *self.multihot, *self.multihot_len,
                  *self.multihot_weights, *self.sequence, *self.sequence_len]
        return tuple(a.group for a in arrays if a is not None)


def layout_of(cache_dir: Path, manifest: Manifest, with_labels: bool) -> Layout:
    """Derive the Batch layout from the manifest; every shard must agree on row shape and dtype."""

    def array(group: str) -> ArraySpec:
        kinds = {(tuple(s.files[group].shape[1:]), s.files[group].dtype) for s in manifest.shards
                 if group in s.files}
        if len(kinds) != 1 or any(group not in s.files for s in manifest.shards):
            raise ManifestMismatchError(f"shards disagree on array '{group}' (shapes/dtypes {sorted(kinds)})",
                                        where=str(cache_dir / MANIFEST_NAME), fix=REBUILD_CACHE_FIX)
        shape, dtype = kinds.pop()
        return ArraySpec(group, shape, np.dtype(dtype))

    def token_arrays(kind: str) -> tuple[tuple[ArraySpec, ...], tuple[ArraySpec, ...],
                                         tuple[ArraySpec | None, ...]]:
        cols = manifest.columns_of(kind)
        stems = [c.group.removesuffix(".tokens") for c in cols]
        weights = tuple(array(f"{s}.weights") if c.weighted else None
                        for c, s in zip(cols, stems, strict=True))
        return tuple(array(c.group) for c in cols), tuple(array(f"{s}.len") for s in stems), weights

    has = {c.group for c in manifest.columns}
    mh, mh_len, mh_w = token_arrays("multihot")
    seq, seq_len, _ = token_arrays("sequence")
    return Layout(
        numeric=array("numeric") if manifest.columns_of("numeric", "missing_indicator", "covisit") else None,
        categorical=array("categorical") if manifest.columns_of("categorical") else None,
        labels=array("labels") if with_labels and "labels" in has and manifest.columns_of("label") else None,
        multihot=mh, multihot_len=mh_len, multihot_weights=mh_w, sequence=seq, sequence_len=seq_len)


_FIELDS = ("numeric", "categorical", "labels", "multihot", "multihot_len", "multihot_weights", "sequence",
           "sequence_len")


class HostBuffers:
    """Full-size host arrays for one batch of `rows` rows; `batch(n)` wraps the first n rows as tensors.

    targets:   (group, (rows, ...) array) pairs to fill from the shards, row_index: (rows,) int64.
    """

    def __init__(self, layout: Layout, rows: int, pinned: bool) -> None:
        self.targets: list[tuple[str, np.ndarray]] = []
        self._pinned: dict[int, torch.Tensor] = {}  # id(array) -> the page-locked tensor it views

        def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            if not pinned:
                return np.empty(shape, dtype=dtype)
            # page-locked, so device copies run asynchronously; CUDA wraps the original tensor, not a view
            t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=True)
            arr = t.numpy()
            self._pinned[id(arr)] = t
            return arr

        def alloc(a: ArraySpec | None) -> np.ndarray | None:
            if a is None:
                return None
            arr = empty((rows, *a.row_shape), a.dtype)
            self.targets.append((a.group, arr))
            return arr

        self.fields: dict[str, np.ndarray | None | tuple[np.ndarray | None, ...]] = {}
        for name in _FIELDS:
            spec = getattr(layout, name)
            self.fields[name] = tuple(alloc(a) for a in spec) if isinstance(spec, tuple) else alloc(spec)
        self.row_index = empty((rows,), np.dtype(np.int64))
        self.event: torch.cuda.Event | None = None  # CUDA: recorded after this set's device copy was queued
        self._idle_counts = self._refcounts()

    def batch(self, n: int) -> Batch:
        """Tensors over the first n rows (no copy): they keep these arrays alive while they live."""

        def wrap(a: np.ndarray | None) -> torch.Tensor | None:
            if a is None:
                return None
            pinned = self._pinned.get(id(a))
            return pinned[:n] if pinned is not None else torch.from_numpy(a[:n])

        out = {k: tuple(wrap(a) for a in v) if isinstance(v, tuple) else wrap(v)
               for k, v in self.fields.items()}
        return Batch(row_index=wrap(self.row_index), **out)

    def _refcounts(self) -> tuple[int, ...]:
        return tuple(sys.getrefcount(a) for a in (self.row_index, *(arr for _, arr in self.targets)))

    def idle(self) -> bool:
        """True when no tensor made by `batch()` (nor a view of one) is alive: torch.from_numpy holds a
        reference to the array as long as the tensor's storage lives, so counts are back to their start."""
        return self._refcounts() == self._idle_counts


class HostPool:
    """CPU buffer sets recycled once the consumer has let go of every tensor made from them.

    A consumer that keeps batches (`list(loader)`) simply gets new sets; at most `keep` sets are tracked and
    checked per batch, so that case costs no more than allocating fresh memory each time.
    """

    def __init__(self, make: Callable[[], HostBuffers], keep: int) -> None:
        self._make = make
        self._keep = keep
        self._sets: deque[HostBuffers] = deque()

    def take(self) -> HostBuffers:
        for _ in range(len(self._sets)):
            candidate = self._sets[0]
            self._sets.rotate(-1)  # oldest first; the one returned ends up newest
            if candidate.idle():
                return candidate
        fresh = self._make()
        self._sets.append(fresh)
        if len(self._sets) > self._keep:
            self._sets.popleft()  # forget the oldest busy set: its tensors now belong to the consumer alone
        return fresh
