"""Stage 3: check a cache's shard files against its manifest, then memory-map them on demand.

Checking every header up front makes a truncated or foreign file fail when the loader is built (naming the
file), not hours into training; mapping lazily keeps open file descriptors bounded on caches with many shards.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.manifest import ArrayInfo, Manifest, ShardInfo

REBUILD_FIX = "rebuild the cache with `ctrpipe shard --cfg CFG --input FILE --out DIR --force`"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an .npy file, reading only its header."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        return tuple(shape), dtype, fortran, fh.tell()


def check_array(cache_dir: Path, shard: ShardInfo, group: str) -> Path:
    """Raise ManifestMismatchError unless `group` of `shard` exists with the manifest's shape, dtype, size."""
    info: ArrayInfo | None = shard.files.get(group)
    if info is None:
        raise ManifestMismatchError(f"shard {shard.index} lists no '{group}' array in the manifest",
                                    where=str(cache_dir / "manifest.json"), fix=REBUILD_FIX)
    path = cache_dir / info.file
    if not path.is_file():
        raise ManifestMismatchError(f"shard file is missing (the manifest lists it for shard {shard.index})",
                                    where=str(path), fix=REBUILD_FIX)
    try:
        shape, dtype, fortran, offset = read_npy_header(path)
    except (ValueError, OSError, SyntaxError) as exc:
        raise ManifestMismatchError(f"not a readable .npy file ({exc})", where=str(path),
                                    fix=REBUILD_FIX) from None
    expected = (tuple(info.shape), np.dtype(info.dtype))
    if (shape, dtype) != expected or shape[:1] != (shard.rows,):
        raise ManifestMismatchError(
            f"array is {dtype}{list(shape)}, the manifest says {expected[1]}{list(expected[0])} "
            f"with {shard.rows} rows", where=str(path), fix=REBUILD_FIX)
    if fortran:
        raise ManifestMismatchError("array is stored in Fortran order; rows must be contiguous (C order)",
                                    where=str(path), fix=REBUILD_FIX)
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise ManifestMismatchError(f"file is truncated: {have} bytes, its header needs {need}",
                                    where=str(path), fix=REBUILD_FIX)
    return path


def read_small(cache_dir: Path, shard: ShardInfo, group: str) -> np.ndarray:
    """Read a whole (small, 1-D) per-row array such as split.npy or fold.npy into memory."""
    path = check_array(cache_dir, shard, group)
    return np.load(path, allow_pickle=False)


class ShardArrays:
    """Lazily memory-mapped arrays of a cache, `get(shard, group)` -> read-only ndarray.

    Maps at most `max_open` shards at a time (least recently used are dropped): each map holds a file
    descriptor. Thread-safe, because the prefetch thread maps while the main thread may build a new iterator.
    """

    def __init__(self, cache_dir: Path, manifest: Manifest, groups: tuple[str, ...],
                 max_open: int = 256) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.groups = groups
        self.max_open = max_open
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Check every needed file of every shard (headers and sizes only; no data is read)."""
        for shard in self.manifest.shards:
            for group in self.groups:
                check_array(self.cache_dir, shard, group)

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """All needed arrays of one shard, group -> plain ndarray view of the memmap."""
        with self._lock:
            arrays = self._open.get(index)
            if arrays is not None:
                self._open.move_to_end(index)
                return arrays
        info = self.manifest.shards[index]
        arrays = {}
        for group in self.groups:
            path = self.cache_dir / info.files[group].file
            try:
                # np.load maps without reading; a plain ndarray view skips np.memmap's per-slice overhead
                arrays[group] = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
            except (OSError, ValueError) as exc:
                raise ManifestMismatchError(f"cannot memory-map shard file ({exc})", where=str(path),
                                            fix=REBUILD_FIX) from None
        with self._lock:
            self._open[index] = arrays
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return arrays
