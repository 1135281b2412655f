"""Shard files written past the page cache (O_DIRECT) where the filesystem takes it.

Why: a build writes its whole cache once and does not read it back. Through the page cache every byte is
first copied into newly allocated cache pages (the kernel's copy was a fifth of a Parquet build's CPU
samples), and a cache larger than memory pushes out the pages training and the input reads need. With
O_DIRECT the device takes the bytes from one reused, aligned staging buffer instead. The files are
byte-identical either way. A filesystem that refuses O_DIRECT (at open or at the first write) gets ordinary
writes; `CTRPIPE_DIRECT_IO=0` asks for them everywhere.

Example::

    staging = Staging()                      # one per writing thread
    f = ShardFile(path, staging)
    f.write(header); f.write(memoryview(arr).cast("B"))
    f.close()                                # the last partial block goes through the page cache
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

ALIGN = 4096                 # offsets, lengths and buffer addresses of direct writes: a multiple of this
STAGING_BYTES = 4 << 20      # the bytes one direct write hands over (fewer system calls; stays in RAM)
ENV_OFF = "CTRPIPE_DIRECT_IO"
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_io_enabled() -> bool:
    """O_DIRECT is tried unless CTRPIPE_DIRECT_IO=0 or the platform has no such flag (macOS, Windows)."""
    return bool(_O_DIRECT) and os.environ.get(ENV_OFF, "1") != "0"


class Staging:
    """The aligned buffer the bytes of direct writes are gathered in: page-aligned (an anonymous map), and
    reused for every file a thread writes, so its pages are touched once per build, not once per chunk."""

    def __init__(self, size: int = STAGING_BYTES) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError(f"staging size {size} is not a positive multiple of {ALIGN}")
        self._map = mmap.mmap(-1, size)
        self.view = memoryview(self._map)

    def __len__(self) -> int:
        return len(self.view)

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
    bytes) with an ordinary write at close. Falls back to ordinary writes for the whole file where O_DIRECT
    is refused; `direct` says which it got."""

    def __init__(self, path: Path | str, staging: Staging | None) -> None:
        self.path = Path(path)
        self._staging = staging
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = -1
        self.direct = False
        if staging is not None and direct_io_enabled():
            try:
                self._fd = os.open(self.path, flags | _O_DIRECT, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:      # EINVAL: this filesystem has no O_DIRECT
                    raise
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
        while len(block):
            try:
                n = os.write(self._fd, block)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()                   # a filesystem that takes O_DIRECT at open only
                continue
            block = block[n:]

    def _buffered(self) -> None:
        if self.direct:
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


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
