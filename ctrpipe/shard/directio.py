"""Shard files written past the page cache (O_DIRECT) where the filesystem takes it and keeps up.

Why: a build writes each shard file once and reads back only headers (and, with `--workers`, the fragments it
joins). Through the page cache every byte is first copied into newly allocated cache pages (the kernel's copy
was a fifth of a Parquet build's CPU samples), and a cache larger than memory pushes out the pages training
and the input reads need. With O_DIRECT the device takes the bytes from one reused, aligned staging buffer
instead. The files are byte-identical either way.

A direct write waits for the device, where a buffered one returns once the bytes are in memory: on storage
slower than the build (a throttled cloud volume, NFS) that wait would set the pace. So the writer measures its
direct writes and goes back to ordinary writes for the rest of the build once they run below
`MIN_DIRECT_RATE`. A filesystem that refuses O_DIRECT (at open or at a write) gets ordinary writes too;
`CTRPIPE_DIRECT_IO=0` asks for them everywhere.

Example::

    staging = Staging()                      # one per writing thread
    f = ShardFile(path, staging)
    f.write(header); f.write(memoryview(arr).cast("B"))
    f.close()                                # the last partial block goes through the page cache
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from pathlib import Path

ALIGN = 4096                 # offsets, lengths and buffer addresses of direct writes: a multiple of this
STAGING_BYTES = 4 << 20      # the bytes one direct write hands over (fewer system calls; stays in RAM)
MIN_DIRECT_RATE = 400e6      # bytes/s: below this, direct writes would hold the build back (see above)
PROBE_BYTES = 64 << 20       # direct bytes written before their rate is judged
ENV_OFF = "CTRPIPE_DIRECT_IO"
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)       # Windows: no newline translation
_REFUSED = {errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), getattr(errno, "ENOTSUP", errno.EINVAL)}


def direct_io_enabled() -> bool:
    """O_DIRECT is tried unless CTRPIPE_DIRECT_IO=0 or the platform has no such flag (macOS, Windows)."""
    return bool(_O_DIRECT) and os.environ.get(ENV_OFF, "1") != "0"


class Staging:
    """The aligned buffer the bytes of direct writes are gathered in: page-aligned (an anonymous map), and
    reused for every file a thread writes, so its pages are touched once per build, not once per chunk.
    It also keeps the writer's verdict on direct writes (`direct`): off once refused or too slow."""

    def __init__(self, size: int = STAGING_BYTES) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError(f"staging size {size} is not a positive multiple of {ALIGN}")
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self.direct = True
        self._bytes = 0
        self._seconds = 0.0

    def __len__(self) -> int:
        return len(self.view)

    def timed(self, nbytes: int, seconds: float) -> None:
        """Count one direct write; past PROBE_BYTES, a rate below MIN_DIRECT_RATE turns direct writes off."""
        self._bytes += nbytes
        self._seconds += seconds
        if self._bytes >= PROBE_BYTES and self._bytes < MIN_DIRECT_RATE * self._seconds:
            self.direct = False

    def release(self) -> None:
        """Unmap the buffer, unless a slice of it is still referenced (the traceback of a failed write, while
        its error propagates): then it goes when that does, and the error is not hidden behind this one."""
        try:
            self.view.release()
            self._map.close()
        except BufferError:
            pass


class ShardFile:
    """A new file written sequentially: whole blocks with O_DIRECT (through `staging`), the tail (< ALIGN
    bytes) with an ordinary write at close. Falls back to ordinary writes for the rest of the file where
    O_DIRECT is refused or too slow; `direct` says which it has now."""

    def __init__(self, path: Path | str, staging: Staging | None) -> None:
        self.path = Path(path)
        self._staging = staging
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | _O_BINARY
        self._fd = -1
        self.direct = False
        if staging is not None and staging.direct and direct_io_enabled():
            try:
                self._fd = os.open(self.path, flags | _O_DIRECT, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno not in _REFUSED:      # this filesystem has no O_DIRECT
                    raise
                staging.direct = False
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o666)
        self._tail = bytearray()                   # bytes after the last whole block written

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if not self.direct:
            if self._tail:                         # left from direct writes refused mid-file: it comes first
                _write_all(self._fd, memoryview(self._tail))
                self._tail = bytearray()
            _write_all(self._fd, view)
            return
        assert self._staging is not None
        whole = (len(self._tail) + len(view)) // ALIGN * ALIGN
        if whole == 0:
            self._tail += view
            return
        buf = self._staging.view
        fill = len(self._tail)
        buf[:fill] = self._tail
        take_until = whole - fill                  # bytes of `view` that go out now (> 0, as fill < ALIGN)
        pos = 0
        while pos < take_until:
            n = min(len(buf) - fill, take_until - pos)
            buf[fill: fill + n] = view[pos: pos + n]
            fill += n
            pos += n
            if fill == len(buf) or pos == take_until:   # fill is a multiple of ALIGN at both
                self._write_block(buf[:fill])
                fill = 0
        self._tail = bytearray(view[take_until:])

    def _write_block(self, block: memoryview) -> None:
        assert self._staging is not None
        while len(block):
            if not self.direct:
                _write_all(self._fd, block)
                return
            start = time.perf_counter()
            try:
                n = os.write(self._fd, block)
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
                self._staging.direct = False       # a filesystem that takes O_DIRECT at open only
                self._buffered()
                continue
            self._staging.timed(n, time.perf_counter() - start)
            block = block[n:]
            if not self._staging.direct:
                self._buffered()

    def _buffered(self) -> None:
        """Go on with ordinary writes (the file offset is block-aligned here)."""
        if self.direct:
            import fcntl  # only where O_DIRECT exists, so POSIX

            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
            self.direct = False

    def close(self) -> None:
        """Write the tail and close. Raises what the tail's write raises (a full disk), closing anyway."""
        if self._fd < 0:
            return
        try:
            if self._tail:
                self._buffered()                   # the last partial block: an ordinary write, no padding
                _write_all(self._fd, memoryview(self._tail))
                self._tail = bytearray()
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close without writing the tail (the file is being abandoned)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:      # a file object closes itself when dropped; this raw descriptor must too
        if getattr(self, "_fd", -1) >= 0:
            self.abort()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
