"""Stage 2: turn a stream of transformed chunks into fixed-size row shards on disk.

Chunks of any size go in; exactly `shard_rows` rows come out per shard (the last one smaller), so the files
never depend on the parse chunk size. Each shard is written into `shard_XXXXX.incomplete/` and renamed to
`shard_XXXXX/` when all its arrays are on disk: a shard directory under its final name is always complete.
Files are written by one background thread (file I/O releases the GIL) while the next shard fills up; at most
one shard waits for the disk, so memory stays bounded by two shard buffers.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ctrpipe.shard.manifest import ArrayInfo, ShardInfo

Arrays = dict[str, np.ndarray]   # group stem -> (N, ...) array, every group with the same N


def shard_dirname(index: int) -> str:
    return f"shard_{index:05d}"


def _fit_unicode(arr: np.ndarray) -> np.ndarray:
    """Shrink a '<U' array to its longest value, so a shard's dtype depends on its own rows only."""
    if arr.dtype.kind != "U":
        return arr
    width = int(np.char.str_len(arr).max()) if len(arr) else 1
    return arr.astype(f"<U{max(width, 1)}")


class _BufferSet:
    """Preallocated (shard_rows, ...) arrays, one per group, filled front to back and reused for every other
    shard (allocated once, so no page faults and no concatenation copies per shard)."""

    def __init__(self, shard_rows: int) -> None:
        self.shard_rows = shard_rows
        self.arrays: Arrays = {}
        self.fill = 0

    def put(self, arrays: Arrays, start: int, stop: int) -> None:
        """Append rows [start, stop) of a chunk."""
        k = stop - start
        for g, a in arrays.items():
            buf = self.arrays.get(g)
            if buf is None or buf.shape[1:] != a.shape[1:] or not _fits(buf.dtype, a.dtype):
                self.arrays[g] = buf = self._grow(buf, a)
            buf[self.fill:self.fill + k] = a[start:stop]
        self.fill += k

    def _grow(self, buf: np.ndarray | None, a: np.ndarray) -> np.ndarray:
        dtype = a.dtype if buf is None else np.promote_types(buf.dtype, a.dtype)
        assert buf is None or (buf.shape[1:] == a.shape[1:] and dtype.kind == buf.dtype.kind), \
            "every chunk must carry the same groups with the same row shape"
        new = np.empty((self.shard_rows, *a.shape[1:]), dtype=dtype)
        if buf is not None:
            new[: self.fill] = buf[: self.fill]
        return new


def _fits(buf: np.dtype, new: np.dtype) -> bool:
    return buf == new or (buf.kind == "U" and new.kind == "U" and new.itemsize <= buf.itemsize)


class ShardWriter:
    """Buffers rows and flushes exactly `shard_rows` at a time into `root/shard_XXXXX/<group>.npy`.

    `done` holds shard indices that a previous, interrupted run already finished: their rows are still
    consumed (so later shards line up) but not rewritten when the files on disk have the expected layout.
    """

    def __init__(self, root: Path, shard_rows: int, done: set[int] | None = None,
                 on_shard: Callable[[ShardInfo], None] | None = None, background: bool = True) -> None:
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.done = set(done or ())
        self.on_shard = on_shard
        self._sets = (_BufferSet(shard_rows), _BufferSet(shard_rows))   # one filling, one being written
        self._cur = 0
        self.shards: list[ShardInfo] = []
        self.rows_written = 0
        self.bytes_written = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrpipe-shard-write") \
            if background else None
        self._pending_write: Future[None] | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Always wait for the write in flight (also on errors), so no thread touches files afterwards."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def add(self, arrays: Arrays) -> None:
        """Append a chunk (every group with the same number of rows); full shards are written out."""
        n = _rows(arrays)
        start = 0
        while start < n:
            buf = self._sets[self._cur]
            stop = min(n, start + self.shard_rows - buf.fill)
            buf.put(arrays, start, stop)
            start = stop
            if buf.fill == self.shard_rows:
                self._flush()

    def close(self) -> list[ShardInfo]:
        """Flush the last (smaller) shard and return every shard's info in order."""
        if self._sets[self._cur].fill:
            self._flush()
        self._wait()
        return self.shards

    def _wait(self) -> None:
        if self._pending_write is not None:
            fut, self._pending_write = self._pending_write, None
            fut.result()                                    # re-raises a write error here

    def _flush(self) -> None:
        buf = self._sets[self._cur]
        rows, index = buf.fill, len(self.shards)
        arrays = {g: _fit_unicode(a[:rows]) for g, a in buf.arrays.items()}
        name = shard_dirname(index)
        files = {g: ArrayInfo(f"{name}/{g}.npy", tuple(int(s) for s in a.shape), str(a.dtype))
                 for g, a in arrays.items()}
        info = ShardInfo(index=index, rows=rows, row_start=self.rows_written, files=files)
        self.rows_written += rows
        self.bytes_written += sum(a.nbytes for a in arrays.values())
        self.shards.append(info)
        skip = index in self.done and _matches(self.root, info)
        self._wait()                                # the other buffer set's write is done: it is free again
        if self._pool is None:
            self._write(name, arrays, info, skip)
        else:
            self._pending_write = self._pool.submit(self._write, name, arrays, info, skip)
        self._cur ^= 1
        self._sets[self._cur].fill = 0

    def _write(self, name: str, arrays: Arrays, info: ShardInfo, skip: bool) -> None:
        if not skip:
            self._write_files(name, arrays)
        if self.on_shard is not None:
            self.on_shard(info)

    def _write_files(self, name: str, arrays: Arrays) -> None:
        tmp = self.root / f"{name}.incomplete"
        final = self.root / name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for group, arr in arrays.items():
            with open(tmp / f"{group}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


def _rows(arrays: Arrays) -> int:
    return int(next(iter(arrays.values())).shape[0]) if arrays else 0


def _matches(root: Path, info: ShardInfo) -> bool:
    """True when a finished shard on disk has exactly the files, shapes and dtypes `info` expects."""
    shard_dir = root / shard_dirname(info.index)
    if not shard_dir.is_dir() or {p.name for p in shard_dir.iterdir()} != {f"{g}.npy" for g in info.files}:
        return False
    for a in info.files.values():
        try:
            arr = np.load(root / a.file, mmap_mode="r")
        except (OSError, ValueError):
            return False
        if tuple(arr.shape) != a.shape or str(arr.dtype) != a.dtype:
            return False
    return True
