"""Stage 2 -> 3: open a finished shard cache as memory-mapped arrays (np.load(mmap_mode='r'), no copies).

Used by `inspect`, the loader and `infer`. Only caches with a manifest are opened, so a half-written cache
can never be read by accident.

Example::

    cache = open_cache(Path("shards/criteo"))
    x = cache.shards[0]["numeric"]             # (N0, Fn) float32 memmap
    split = cache.concat("split")              # (total_rows,) int8, in memory
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.manifest import Manifest, read_manifest

_REBUILD = "rebuild the cache with `ctrpipe shard ... --force`"


@dataclass(frozen=True)
class CacheArrays:
    """A cache's manifest plus one {group: memmap} dict per shard, in shard order."""

    root: Path
    manifest: Manifest
    shards: tuple[dict[str, np.ndarray], ...]

    @property
    def total_rows(self) -> int:
        return self.manifest.total_rows

    @property
    def row_starts(self) -> np.ndarray:
        """(S + 1,) int64 global index of each shard's first row, plus the total."""
        return np.array([s.row_start for s in self.manifest.shards] + [self.total_rows], dtype=np.int64)

    def has(self, group: str) -> bool:
        return all(group in s for s in self.shards) and bool(self.shards)

    def concat(self, group: str) -> np.ndarray:
        """One group over all shards as an in-memory array (for small groups: split, fold, labels, ids)."""
        if not self.has(group):
            raise KeyError(group)
        return np.concatenate([np.asarray(s[group]) for s in self.shards])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices -> (shard index, row within shard)."""
        starts = self.row_starts
        shard = np.searchsorted(starts, rows, side="right") - 1
        return shard, rows - starts[shard]


def open_cache(cache_dir: Path, check: bool = True) -> CacheArrays:
    """Read the manifest and memory-map every array it lists; a missing file (or, with `check`, one whose
    shape or dtype differs from the manifest) is an error."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    shards: list[dict[str, np.ndarray]] = []
    for info in manifest.shards:
        arrays: dict[str, np.ndarray] = {}
        for group, a in info.files.items():
            path = cache_dir / a.file
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ManifestMismatchError(f"cannot read shard array ({exc})", where=str(path),
                                            fix=_REBUILD) from None
            if check and (tuple(arr.shape) != a.shape or str(arr.dtype) != a.dtype):
                raise ManifestMismatchError(
                    f"shard array is {tuple(arr.shape)} {arr.dtype}, the manifest says {a.shape} {a.dtype}",
                    where=str(path), fix=_REBUILD)
            arrays[group] = arr
        shards.append(arrays)
    return CacheArrays(root=cache_dir, manifest=manifest, shards=tuple(shards))
