"""Atomic file writes shared by every stage: write '<name>.incomplete', fsync, rename onto the final name.

A crash at any moment leaves the old file or none, never a truncated file under the final name; a full disk
becomes a `DiskFullError` naming the file, the free space and the size being written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ctrpipe.errors import BusyError, disk_full_as_error, human_bytes


class _StopHold:
    depth = 0           # nested stops_held() blocks now running
    pending = False     # a stop signal arrived inside them


@contextmanager
def stops_held() -> Iterator[None]:
    """Hold a stop (Ctrl-C, SIGTERM) that arrives while the block runs, and raise it as KeyboardInterrupt
    when the block ends: files that belong together (a submission and the .json record of where it came from)
    are committed together, never the one without the other. Keep such a block short (renames, a small
    record). Only the command-line handler of stop signals consults it (`hold_stop`)."""
    _StopHold.depth += 1
    try:
        yield
    finally:
        _StopHold.depth -= 1
        pending = _StopHold.pending and _StopHold.depth == 0
        if _StopHold.depth == 0:
            _StopHold.pending = False
    if pending:
        raise KeyboardInterrupt


def hold_stop() -> bool:
    """Called by a stop signal's handler: True (and the stop recorded for the end of the block) while a
    `stops_held()` block runs, False when the stop should be raised now."""
    if _StopHold.depth:
        _StopHold.pending = True
        return True
    return False


@contextmanager
def atomic_open(final: Path | str, mode: str = "w", size_hint: int | None = None,
                stale: tuple[Path, ...] = (), then: Callable[[], object] | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside `final`; on success fsync + rename onto `final`, on error delete the temp file.

    `size_hint` (bytes about to be written, when the caller knows) goes into the message of a full disk;
    without it the message gives what was written before the disk filled, a lower bound. `stale`: files that
    describe an older `final` (its .json record), removed just before the rename, so a failed write keeps
    both and the new file is never paired with them (as `SubmissionWriter(stale=)`). `then`: writes the files
    that describe the new `final` (its record), right after the rename with stops held until it returns.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".incomplete")
    written = 0

    def needs() -> str:
        if size_hint is not None:
            return f"this file needs about {human_bytes(size_hint)}"
        return f"this file needs more than the {human_bytes(written)} written before the disk filled" \
            if written else ""

    with disk_full_as_error(final, needs):
        fh = open_temp(tmp, final, mode)
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
                commit(tmp, final, stale, then)     # before the close, which ends the temp file's lock
        except BaseException:
            written = _size(tmp)
            tmp.unlink(missing_ok=True)
            raise


def commit(tmp: Path, final: Path, stale: tuple[Path, ...] = (), then: Callable[[], object] | None = None) -> None:
    """Rename the finished temp file onto `final`, with stops held from the removal of the files that describe
    an older `final` (`stale`) to the end of `then`, which writes those of the new one."""
    with stops_held():
        for old in stale:
            old.unlink(missing_ok=True)
        os.replace(tmp, final)
        if then is not None:
            then()


def open_temp(tmp: Path, final: Path, mode: str = "wb") -> IO[Any]:
    """Open (and empty) the temp file `tmp` that becomes `final`, holding an exclusive lock on it until it is
    closed: two commands writing one file (two `infer` to one --out) shared the temp name, interleaved their
    bytes into it and raced to rename it. The second is refused instead, and its refusal leaves the first's
    temp file alone. Callers rename before they close. Where flock is missing, no lock is taken."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        _lock(fd, lambda: BusyError(f"another process is writing {final.name} right now (its temp file "
                                    f"{tmp.name} is in use)", where=str(final),
                                    fix="wait for that command to finish, or write to another path"))
        os.ftruncate(fd, 0)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def write_text_atomic(path: Path | str, text: str) -> Path:
    data = text.encode()
    with atomic_open(path, "wb", size_hint=len(data)) as fh:
        fh.write(data)
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any, indent: int = 2) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))


@contextmanager
def folder_lock(folder: Path, busy: Callable[[], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs, or raise `busy()` when another process holds
    it: two commands writing one cache or run folder at once interleaved their files (a manifest over a
    missing shard; a run log with steps twice). flock on the folder itself: no file is added, and the kernel
    releases it when the process ends, killed or not. Where flock is missing, no lock is taken."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        _lock(fd, busy)
        yield
    finally:
        os.close(fd)


def _lock(fd: int, busy: Callable[[], Exception]) -> None:
    """flock `fd` exclusively, or raise `busy()` when another process holds it. No lock where there is no
    flock (not POSIX) or the filesystem refuses it (some network mounts): writes go on as before the locks."""
    try:
        import fcntl
    except ImportError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise busy() from None
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a working folder named after it is then not a crashed one's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # alive, another user's
        return True
    return True
