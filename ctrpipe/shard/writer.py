"""Stage 2: turn a stream of transformed chunks into fixed-size row shards on disk.

Chunks of any size go in; exactly `shard_rows` rows come out per shard (the last one smaller), so the files
never depend on the parse chunk size. Each shard is written into `shard_XXXXX.incomplete/` and renamed to
`shard_XXXXX/` when all its arrays are on disk: a shard directory under its final name is always complete.
Rows are streamed straight into the open .npy files by one background thread (file I/O releases the GIL):
no shard-sized buffers, at most `MAX_PENDING` chunks wait for the disk, and the bytes go to the device past
the page cache where the filesystem allows (`directio`).
The .npy header is written for a full shard and rewritten when the last shard turns out smaller, so every
file is byte-identical to `np.save` of the whole shard.
"""

from __future__ import annotations

import io
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.directio import ShardFile, Staging, direct_io_enabled
from ctrpipe.shard.manifest import ArrayInfo, ShardInfo
from ctrpipe.shard.reader import check_array

Arrays = dict[str, np.ndarray]   # group stem -> (N, ...) array, every group with the same N
SCRATCH_BYTES = 1 << 20          # per open shard: the slice through which column-major chunks are transposed
MAX_PENDING = 3                  # chunk writes queued for the writer thread; each holds one chunk's arrays


def shard_dirname(index: int) -> str:
    return f"shard_{index:05d}"


def fragment_dirname(index: int) -> str:
    return f"frag_{index:05d}"


def _fit_unicode(arr: np.ndarray) -> np.ndarray:
    """Shrink a '<U' array to its longest value, so a shard's dtype depends on its own rows only."""
    if arr.dtype.kind != "U":
        return arr
    if not len(arr):
        width = 1
    elif arr.dtype.itemsize:    # a value's length ends at its last non-NUL code point: the widest column used
        units = np.ascontiguousarray(arr).view(arr.dtype.byteorder.replace("=", "") + "u4")
        used = np.flatnonzero((units.reshape(len(arr), -1) != 0).any(axis=0))
        width = int(used[-1]) + 1 if len(used) else 1
    else:
        width = 1
    return arr.astype(f"<U{max(width, 1)}")


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The header `np.save` writes for a C-order array of this shape and dtype."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, d)
    return buf.getvalue()


class _OpenShard:
    """Main-thread bookkeeping of the shard being filled: rows so far and each group's dtype/row shape.

    Unicode groups are kept in memory (their width is the longest value of the whole shard); every other
    group is streamed to disk as it arrives.
    """

    def __init__(self, index: int, capacity: int, fragment: bool) -> None:
        self.index = index
        self.capacity = capacity        # rows until the shard's end (less than shard_rows for a fragment)
        self.fragment = fragment
        self.rows = 0
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.unicode: dict[str, list[np.ndarray]] = {}


class _Files:
    """Writer-thread side of one shard: open .npy files in `shard_XXXXX.incomplete/`."""

    def __init__(self, root: Path, name: str, staging: Staging | None) -> None:
        self.tmp = root / f"{name}.incomplete"
        self.final = root / name
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.handles: dict[str, tuple[ShardFile, bytes, np.dtype]] = {}   # group -> (file, header, dtype)
        self.scratch = bytearray(SCRATCH_BYTES)
        self.staging = staging

    def append(self, group: str, arr: np.ndarray, full_shape: tuple[int, ...]) -> None:
        entry = self.handles.get(group)
        if entry is None:
            fh = ShardFile(self.tmp / f"{group}.npy", self.staging)
            header = npy_header(full_shape, arr.dtype)
            fh.write(header)
            self.handles[group] = entry = (fh, header, arr.dtype)
        _write_rows(entry[0], arr, self.scratch)

    def finish(self, shapes: dict[str, tuple[int, ...]], whole: Arrays, dest: Path | None = None) -> None:
        """Fix headers of a short last shard, write the in-memory groups, then rename into place (`dest`,
        by default the shard's own name)."""
        if dest is not None:
            self.final = dest
        for group, (fh, header, dtype) in self.handles.items():
            fh.close()          # on an error the handles not yet closed stay listed, for abort()
            final = npy_header(shapes[group], dtype)
            if final != header:
                _rewrite_header(fh.path, header, final)
        self.handles.clear()
        for group, arr in whole.items():     # as np.save writes it (the same header, then the C-order bytes)
            arr = np.ascontiguousarray(arr)
            fh = ShardFile(self.tmp / f"{group}.npy", self.staging)
            try:
                fh.write(npy_header(arr.shape, arr.dtype))
                fh.write(memoryview(arr).cast("B"))
            except BaseException:
                fh.abort()
                raise
            fh.close()
        if self.final.exists():
            shutil.rmtree(self.final)
        self.tmp.rename(self.final)

    def discard(self) -> None:
        self.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        """Close the files of an abandoned shard; it stays `.incomplete`, so flush errors (a full disk
        cannot take the buffered tail) do not matter and must not hide the error that abandoned it."""
        for fh, *_ in self.handles.values():
            fh.abort()
        self.handles.clear()


def _write_rows(fh: ShardFile, arr: np.ndarray, scratch: bytearray) -> None:
    """Write arr's rows in C order. A column-major chunk (the transform's numeric / categorical views) is
    transposed a cache-sized slice at a time through `scratch`: no chunk-sized temporary to allocate
    (and page-fault in) for every chunk, and the transpose stays in cache."""
    if arr.flags.c_contiguous or arr.ndim < 2 or len(arr) == 0:
        fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        return
    row_items = int(np.prod(arr.shape[1:]))
    step = max(1, len(scratch) // (row_items * arr.itemsize))
    if row_items == 0 or step >= len(arr):
        fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        return
    buf = np.frombuffer(scratch, dtype=arr.dtype, count=step * row_items).reshape(step, *arr.shape[1:])
    for start in range(0, len(arr), step):
        part = arr[start: start + step]
        out = buf[: len(part)]
        np.copyto(out, part)
        fh.write(memoryview(out).cast("B"))


def _rewrite_header(path: Path, old: bytes, new: bytes) -> None:
    """Put `new` in place of `old` at the start of the closed file; same length in the common case."""
    with open(path, "r+b") as fh:
        if len(new) == len(old):
            fh.write(new)
            return
        fh.seek(len(old))                        # rare: the padded header got shorter by 64 bytes
        body = fh.read()
        fh.seek(0)
        fh.truncate()
        fh.write(new)
        fh.write(body)


class ShardWriter:
    """Streams rows into `root/shard_XXXXX/<group>.npy`, exactly `shard_rows` rows per shard.

    `done` holds shard indices that a previous, interrupted run already finished: their rows are still
    consumed (so later shards line up) and written aside; when the finished shard on disk has the expected
    layout, the new copy is discarded and the old files are left untouched.
    Arrays passed to `add` are referenced until written: callers must not modify them afterwards.

    `first_row` > 0: the rows given are the global rows from there on (a partition of a parallel build), so
    shard k still holds rows [k * shard_rows, (k + 1) * shard_rows). With `fragments`, a shard this writer sees
    only part of (it starts before `first_row`, or `close` cuts it short) is a fragment: saved as
    `frag_XXXXX/` (same files, `fragments` lists it), for the parent to join with the neighbours' fragments.
    """

    def __init__(self, root: Path, shard_rows: int, done: set[int] | None = None,
                 on_shard: Callable[[ShardInfo], None] | None = None, background: bool = True,
                 first_row: int = 0, fragments: bool = False) -> None:
        if first_row % shard_rows and not fragments:
            raise ValueError(f"first_row {first_row} is inside a shard: pass fragments=True")
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.first_row = first_row
        self.fragment_mode = fragments
        self.fragments: list[ShardInfo] = []
        self.done = set(done or ())
        self.on_shard = on_shard
        self.shards: list[ShardInfo] = []
        self.rows_written = 0
        self.bytes_written = 0
        self.row_bytes = 0                              # bytes a stored row takes over all groups (estimates)
        self._open: _OpenShard | None = None
        self._files: _Files | None = None               # touched by the writer thread only
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctrpipe-shard-write") \
            if background else None
        self._pending: deque[Future[None]] = deque()
        self._failed = False                            # set by the writer thread when a task raised
        self._staging: Staging | None = None            # the writer thread's buffer for direct writes

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """Always wait for the writes in flight (also on errors), so no thread touches files afterwards.

        When an error is already propagating it is the one reported: the writes still queued were skipped
        (see `_guarded`) or fail for the same reason, and a second traceback would only hide the first."""
        try:
            if exc_type is None:
                self._drain()
            else:
                while self._pending:
                    self._pending.popleft().exception()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._files is not None:     # a shard left unfinished is rewritten on resume anyway: give its
                self._files.discard()       # space back now (a full disk's message then counts it as free)
            self._release_staging()

    def add(self, arrays: Arrays) -> None:
        """Append a chunk (every group with the same number of rows); full shards are finished."""
        n = _rows(arrays)
        self.row_bytes = sum(a.dtype.itemsize * int(np.prod(a.shape[1:])) for a in arrays.values())
        start = 0
        while start < n:
            if self._open is None:
                row = self.first_row + self.rows_written
                offset = row % self.shard_rows
                self._open = _OpenShard(row // self.shard_rows, self.shard_rows - offset, offset > 0)
                self._submit(self._start_files, shard_dirname(self._open.index))
            shard = self._open
            stop = min(n, start + shard.capacity - shard.rows)
            streamed: Arrays = {}
            for g, a in arrays.items():
                part = a[start:stop]
                known = shard.layout.setdefault(g, (part.dtype, part.shape[1:]))
                if part.dtype.kind == "U" and known[0].kind == "U":     # widths may differ: joined at the end
                    shard.unicode.setdefault(g, []).append(part)
                    continue
                if known != (part.dtype, part.shape[1:]):
                    raise ValueError(f"group {g!r}: chunk has {part.dtype} {part.shape[1:]}, shard has {known}")
                streamed[g] = part
            full = {g: (shard.capacity, *shape) for g, (_, shape) in shard.layout.items()}
            self._submit(self._append, streamed, full)
            shard.rows += stop - start
            start = stop
            if shard.rows == shard.capacity:
                self._finish_shard()

    def close(self) -> list[ShardInfo]:
        """Finish the last (smaller) shard and return every shard's info in order (fragments aside)."""
        if self._open is not None and self._open.rows:
            self._open.fragment = self._open.fragment or self.fragment_mode
            self._finish_shard()
        self._drain()
        self._release_staging()
        return self.shards

    # -- main thread
    def _finish_shard(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None
        rows, name = shard.rows, shard_dirname(shard.index)
        whole = {g: _fit_unicode(np.concatenate(parts)) for g, parts in shard.unicode.items()}
        files: dict[str, ArrayInfo] = {}
        for g, (dtype, shape) in shard.layout.items():
            dt = whole[g].dtype if g in whole else dtype
            files[g] = ArrayInfo(f"{name}/{g}.npy", (rows, *(int(s) for s in shape)), str(dt))
        info = ShardInfo(index=shard.index, rows=rows, row_start=self.first_row + self.rows_written, files=files)
        self.rows_written += rows
        self.bytes_written += sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in files.values())
        (self.fragments if shard.fragment else self.shards).append(info)
        self._submit(self._end_files, info, whole, shard.fragment)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        self._pending.append(self._pool.submit(self._guarded, fn, *args))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft().result()            # re-raises a write error here

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    # -- writer thread (tasks run one at a time, in submission order)
    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one task unless an earlier one failed: after a failed append (e.g. a full disk) the shard's
        end task would otherwise still rename it into place, making a short shard look complete."""
        if self._failed:
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def _release_staging(self) -> None:
        if self._staging is not None:
            self._staging.release()
            self._staging = None

    def _start_files(self, name: str) -> None:
        if self._staging is None and direct_io_enabled():
            self._staging = Staging()
        self._files = _Files(self.root, name, self._staging)

    def _append(self, arrays: Arrays, full: dict[str, tuple[int, ...]]) -> None:
        assert self._files is not None
        for g, a in arrays.items():
            self._files.append(g, a, full[g])

    def _end_files(self, info: ShardInfo, whole: Arrays, fragment: bool) -> None:
        files = self._files
        assert files is not None
        shapes = {g: a.shape for g, a in info.files.items()}
        # self._files is kept until the shard is in place: if finishing fails (a full disk at a file's tail),
        # __exit__ still closes the files left open and removes the .incomplete folder
        if fragment:
            files.finish(shapes, whole, self.root / fragment_dirname(info.index))
            self._files = None
            return
        if info.index in self.done and _matches(self.root, info):
            files.discard()                             # resumed: the finished shard stays untouched
        else:
            files.finish(shapes, whole)
        self._files = None
        if self.on_shard is not None:
            self.on_shard(info)


def _rows(arrays: Arrays) -> int:
    return int(next(iter(arrays.values())).shape[0]) if arrays else 0


def _matches(root: Path, info: ShardInfo) -> bool:
    """True when a finished shard on disk has exactly the files `info` lists, each whole, of its shape and dtype."""
    shard_dir = root / shard_dirname(info.index)
    if not shard_dir.is_dir() or {p.name for p in shard_dir.iterdir()} != {f"{g}.npy" for g in info.files}:
        return False
    try:
        for group in info.files:
            check_array(root, info, group)        # headers and sizes only: no data is read
    except ManifestMismatchError:
        return False
    return True
