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


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    if parts[0].dtype.kind == "U":
        width = max(p.dtype.itemsize // 4 for p in parts)
        parts = [p.astype(f"<U{width}") for p in parts]
    return np.concatenate(parts)


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
        self.pending: list[Arrays] = []
        self.pending_rows = 0
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
        n = _rows(arrays)
        if n == 0:
            return
        self.pending.append(arrays)
        self.pending_rows += n
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> list[ShardInfo]:
        """Flush the last (smaller) shard and return every shard's info in order."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        self._wait()
        return self.shards

    def _wait(self) -> None:
        if self._pending_write is not None:
            fut, self._pending_write = self._pending_write, None
            fut.result()                                    # re-raises a write error here

    def _take(self, rows: int) -> Arrays:
        """Remove the first `rows` buffered rows and return them as one array per group."""
        taken: list[Arrays] = []
        need = rows
        while need:
            head = self.pending[0]
            n = _rows(head)
            if n <= need:
                taken.append(self.pending.pop(0))
                need -= n
            else:
                taken.append({g: a[:need] for g, a in head.items()})
                self.pending[0] = {g: a[need:] for g, a in head.items()}
                need = 0
        self.pending_rows -= rows
        return {g: _fit_unicode(_concat([t[g] for t in taken])) for g in taken[0]}

    def _flush(self, rows: int) -> None:
        index = len(self.shards)
        arrays = self._take(rows)
        name = shard_dirname(index)
        files = {g: ArrayInfo(f"{name}/{g}.npy", tuple(int(s) for s in a.shape), str(a.dtype))
                 for g, a in arrays.items()}
        info = ShardInfo(index=index, rows=rows, row_start=self.rows_written, files=files)
        self.rows_written += rows
        self.bytes_written += sum(a.nbytes for a in arrays.values())
        self.shards.append(info)
        skip = index in self.done and _matches(self.root, info)
        self._wait()                                        # at most one shard in flight
        if self._pool is None:
            self._write(name, arrays, info, skip)
        else:
            self._pending_write = self._pool.submit(self._write, name, arrays, info, skip)

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
