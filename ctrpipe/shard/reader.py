"""Stage 2 -> 3: the one reader of shard files. Every .npy a cache lists is opened here and nowhere else.

Each array's header is checked against the manifest (shape, dtype, C order, file size) before any data is
read, so a truncated or foreign file fails naming the file, not hours into training. Arrays are then
memory-mapped from that same header (no copies), lazily and with a bounded number of open maps. Only caches
with a manifest are opened, so a half-written cache can never be read by accident.

Example::

    cache = open_cache(Path("shards/criteo"))   # headers of every array checked, nothing mapped yet
    x = cache.shard(0)["numeric"]               # (N0, Fn) float32, mapped on first use
    split = cache.concat("split")               # (total_rows,) int8, in memory
    shard, local = cache.locate(np.array([0, 12_345]))   # global rows -> (shard index, row in shard)
"""

from __future__ import annotations

import errno
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError
from ctrpipe.hostmem import open_file_limit
from ctrpipe.shard.manifest import MANIFEST_NAME, ArrayInfo, Manifest, ShardInfo, read_manifest


@dataclass(frozen=True)
class NpyHeader:
    """What an .npy header says: enough to check the file against the manifest and to map it."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int            # bytes before the first element

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_npy_header(path: Path) -> NpyHeader:
    """Read only the header of an .npy file (ValueError / OSError when it is not one)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not one the shard writer produces")
        return NpyHeader(Path(path), tuple(shape), dtype, fortran, fh.tell())


def check_array(cache_dir: Path, shard: ShardInfo, group: str) -> NpyHeader:
    """The header of `group` of `shard`, checked against the manifest without reading data.

    Raises ManifestMismatchError (where = the file, fix = rebuild the cache) for the first problem found:
    not listed, missing, unreadable header, other shape or dtype, Fortran order, or truncated. Callers that
    report every problem instead of stopping (`inspect`) catch it per array.
    """
    info: ArrayInfo | None = shard.files.get(group)
    if info is None:
        raise ManifestMismatchError(f"shard {shard.index} lists no '{group}' array in the manifest",
                                    where=str(Path(cache_dir) / MANIFEST_NAME), fix=REBUILD_CACHE_FIX)
    path = Path(cache_dir) / info.file
    if not path.is_file():
        raise ManifestMismatchError(f"shard file is missing (the manifest lists it for shard {shard.index})",
                                    where=str(path), fix=REBUILD_CACHE_FIX)
    try:
        header = read_npy_header(path)
    except OSError as exc:
        raise _unreadable(exc, "not a readable .npy file", path) from None
    except (ValueError, SyntaxError) as exc:
        raise ManifestMismatchError(f"not a readable .npy file ({exc})", where=str(path),
                                    fix=REBUILD_CACHE_FIX) from None
    expected = (tuple(info.shape), np.dtype(info.dtype))
    if (header.shape, header.dtype) != expected or header.shape[:1] != (shard.rows,):
        raise ManifestMismatchError(
            f"array is {header.dtype}{list(header.shape)}, the manifest says {expected[1]}{list(expected[0])} "
            f"with {shard.rows} rows", where=str(path), fix=REBUILD_CACHE_FIX)
    if header.fortran_order:
        raise ManifestMismatchError("array is stored in Fortran order; rows must be contiguous (C order)",
                                    where=str(path), fix=REBUILD_CACHE_FIX)
    need, have = header.data_offset + header.data_bytes, path.stat().st_size
    if have < need:
        raise ManifestMismatchError(f"file is truncated: {have} bytes, its header needs {need}",
                                    where=str(path), fix=REBUILD_CACHE_FIX)
    if have > need:                       # np.save writes exactly the header and the data: something appended
        raise ManifestMismatchError(f"file has {have - need} bytes after its data ({have} bytes, its header "
                                    f"needs {need})", where=str(path), fix=REBUILD_CACHE_FIX)
    return header


def _unreadable(exc: OSError, what: str, path: Path) -> ManifestMismatchError:
    """An OSError reading a shard file: the cache is fine when the process ran out of file descriptors."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ManifestMismatchError(f"{what}: too many open files ({exc.strerror})", where=str(path),
                                     fix="raise the open-file limit (e.g. `ulimit -n 65536`), or build fewer, "
                                         "larger shards (data.shard_rows)")
    return ManifestMismatchError(f"{what} ({exc})", where=str(path), fix=REBUILD_CACHE_FIX)


def map_array(cache_dir: Path, shard: ShardInfo, group: str) -> np.ndarray:
    """Check `group` of `shard` (see `check_array`), then memory-map it read-only, as a plain ndarray.

    The map is built from the checked header, so what is mapped is exactly what was checked; the plain
    ndarray view skips np.memmap's per-slice overhead.
    """
    header = check_array(cache_dir, shard, group)
    try:
        mapped = np.memmap(header.path, dtype=header.dtype, mode="r", offset=header.data_offset,
                           shape=header.shape)
    except OSError as exc:
        raise _unreadable(exc, "cannot memory-map shard file", header.path) from None
    except ValueError as exc:
        raise ManifestMismatchError(f"cannot memory-map shard file ({exc})", where=str(header.path),
                                    fix=REBUILD_CACHE_FIX) from None
    return mapped.view(np.ndarray)


_FD_SHARE = 4       # one cache's maps take at most a quarter of the open-file limit (training opens two caches)


def open_file_budget() -> int:
    """File descriptors one ShardArrays may hold in maps. Each map holds one, and a cache of many shards
    would need arrays x shards of them (a 200-shard Parquet cache: 2,000, past the common limit of 1,024)."""
    return open_file_limit(raise_soft=True) // _FD_SHARE


def read_small(cache_dir: Path, shard: ShardInfo, group: str) -> np.ndarray:
    """A whole (small, 1-D) per-row array such as split.npy or fold.npy, checked and copied into memory."""
    return np.array(map_array(cache_dir, shard, group))


class ShardArrays:
    """The arrays `groups` of every shard of a cache: checked up front, memory-mapped on demand.

    `shard(i)` -> {group: read-only ndarray}. At most `max_open` shards stay mapped (least recently used are
    dropped), and fewer where their maps would pass `open_file_budget()`: each map holds a file descriptor.
    Thread-safe: the loader's prefetch thread maps while the main thread may build a new iterator.
    `groups=None` means every array the first shard lists.
    """

    def __init__(self, cache_dir: Path, manifest: Manifest, groups: tuple[str, ...] | None = None,
                 max_open: int = 256) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        first = manifest.shards[0].files if manifest.shards else {}
        self.groups: tuple[str, ...] = tuple(first) if groups is None else tuple(groups)
        self.max_open = max(1, min(max_open, open_file_budget() // max(len(self.groups), 1)))
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self) -> None:
        """Check every needed file of every shard (headers and sizes only; no data is read)."""
        for shard in self.manifest.shards:
            for group in self.groups:
                check_array(self.cache_dir, shard, group)

    def shard(self, index: int) -> dict[str, np.ndarray]:
        """All needed arrays of one shard, group -> read-only ndarray (re-checked whenever it is mapped)."""
        with self._lock:
            arrays = self._open.get(index)
            if arrays is not None:
                self._open.move_to_end(index)
                return arrays
        info = self.manifest.shards[index]
        arrays = {group: map_array(self.cache_dir, info, group) for group in self.groups}
        with self._lock:
            self._open[index] = arrays
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return arrays

    # ------------------------------------------------------------------ whole-cache helpers (small groups)
    @property
    def total_rows(self) -> int:
        return self.manifest.total_rows

    @property
    def row_starts(self) -> np.ndarray:
        """(S + 1,) int64 global index of each shard's first row, plus the total."""
        return np.array([s.row_start for s in self.manifest.shards] + [self.total_rows], dtype=np.int64)

    def has(self, group: str) -> bool:
        return group in self.groups and bool(self.manifest.shards)

    def concat(self, group: str) -> np.ndarray:
        """One group over all shards as an in-memory array (for small groups: split, fold, labels, ids)."""
        if not self.has(group):
            raise KeyError(group)
        return np.concatenate([read_small(self.cache_dir, info, group) for info in self.manifest.shards])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices -> (shard index, row within shard), both (N,) int64."""
        starts = self.row_starts
        shard = np.searchsorted(starts, rows, side="right") - 1
        return shard, rows - starts[shard]

    def take(self, group: str, rows: np.ndarray) -> np.ndarray:
        """`group`'s values at ascending global `rows`, gathered shard by shard from the memory maps (only
        those rows are read; shards of a text group may differ in width, which concatenation reconciles)."""
        shard, local = self.locate(rows)
        parts = [self.shard(int(s))[group][local[shard == s]] for s in np.unique(shard)]
        if not parts:
            return self.shard(0)[group][:0]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def open_cache(cache_dir: Path, groups: tuple[str, ...] | None = None, max_open: int = 256) -> ShardArrays:
    """Read a finished cache's manifest and check the headers of `groups` (None: all) of every shard."""
    cache_dir = Path(cache_dir)
    cache = ShardArrays(cache_dir, read_manifest(cache_dir), groups, max_open)
    cache.check()
    return cache
