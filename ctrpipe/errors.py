"""User-facing failures. Library code raises these; `cli.py` renders them as what / where / fix and exits 1.

Anything that is not a `CtrpipeError` is a bug in ctrpipe and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CtrpipeError(Exception):
    """Base class: `what` went wrong, `where` (file, line, column or key) and how to `fix` it."""

    what: str
    where: str = ""
    fix: str = ""
    # Set on a torchrun rank whose error another rank on its node prints (the same error, or this rank's view of
    # that rank's failure): the CLI then exits 1 without printing it, so a job shows each error once per node.
    shown_by_peer = False

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}\n  fix: {self.fix}" if self.fix else head

    def __str__(self) -> str:
        return self.render()


def first_on_node(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process prints errors that every rank of a node meets alike before the ranks join (a bad
    --set, torchrun's environment): one process alone, or a torchrun job's LOCAL_RANK 0. A LOCAL_RANK that is
    no number above 0 prints too (the error may be about that very setting)."""
    if env.get("WORLD_SIZE", "").strip() in ("", "1"):
        return True
    try:
        return int(env.get("LOCAL_RANK", "0")) <= 0
    except ValueError:
        return True


def location(path: Path | str | None = None, line: int | None = None, row: int | None = None,
             column: str | None = None) -> str:
    """Format 'data/day_0.tsv, line 18204, column I3' from whichever parts are known."""
    parts: list[str] = []
    if path is not None:
        parts.append(str(path))
    if line is not None:
        parts.append(f"line {line}")
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column {column}")
    return ", ".join(parts)


class BusyError(CtrpipeError):
    """Another process is writing the same output right now."""


class ConfigError(CtrpipeError):
    """A config key is unknown or has a bad value."""


class InputFormatError(CtrpipeError):
    """Raw input (Criteo text or Parquet) cannot be parsed as configured."""


class SchemaError(CtrpipeError):
    """Columns are absent, of the wrong type, or a model needs a feature kind the shards lack."""


class ManifestMismatchError(CtrpipeError):
    """A shard cache, checkpoint or submission does not belong with the inputs or config it is used with."""


# The one fix for a shard cache that cannot be used as it is on disk (damaged, foreign, or an older format).
REBUILD_CACHE_FIX = "rebuild the cache: run the same `ctrpipe shard --cfg CFG --input FILE --out DIR` with --force"


class CheckpointError(CtrpipeError):
    """Checkpoints are missing, incomplete or incompatible."""


class SubmissionError(CtrpipeError):
    """A submission file is malformed or does not line up with the others."""


class TrainingError(CtrpipeError):
    """Training diverged (NaN loss) or cannot proceed."""


class ReportError(CtrpipeError):
    """A RUN is not a finished run directory, or `ctrpipe report`'s --out / --baseline cannot be used as given."""


# ------------------------------------------------------------------------------------------ full disks

# out of blocks / inodes, over a quota, or past the largest file allowed (`ulimit -f`, the filesystem's limit)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
REDO_WRITE = "the step is redone from the start; any earlier complete file under that name is untouched"


class DiskFullError(CtrpipeError):
    """A write failed for lack of space (ENOSPC), quota (EDQUOT) or past the largest file allowed (EFBIG:
    `ulimit -f`, the filesystem's own limit): which path, how much is free there,
    roughly how much the step needs, and what rerunning the same command does.

    The free space is measured each time the message is rendered, so the message the CLI prints counts the
    space that the failed writer's cleanup (temp files, scratch folders) gave back on the way out.
    """

    def __init__(self, path: Path | str, needs: str, rerun: str, reason: str = os.strerror(errno.ENOSPC)) -> None:
        self.path, self.needs, self.rerun, self.reason = Path(path), needs, rerun, reason
        self.free_bytes: int | None = None
        room = ("raise the file size limit (`ulimit -f`) or write to a filesystem that takes larger files (a "
                "shard build: or lower data.shard_rows)") if reason == os.strerror(errno.EFBIG) else \
            "free space there (or write to a larger disk)"
        super().__init__("", where=str(self.path), fix=f"{room}, then run the same command again: {rerun}")

    def render(self) -> str:
        self.free_bytes = disk_free_bytes(self.path)
        free = "unknown" if self.free_bytes is None else human_bytes(self.free_bytes)
        self.what = f"{self.reason} ({free} free on that filesystem{'; ' + self.needs if self.needs else ''})"
        return super().render()

    def rerun_as(self, rerun: str) -> DiskFullError:
        """The same failure with a command-specific note on what rerunning does (e.g. train's --resume)."""
        return DiskFullError(self.path, self.needs, rerun, self.reason)


def disk_full_reason(exc: BaseException) -> str | None:
    """'No space left on device' / 'Disk quota exceeded' / 'File too large' when `exc` or an exception it arose
    from is a full disk, a quota or a file size limit, else None.

    Libraries report it in different ways: torch.save raises a RuntimeError whose context is the OSError,
    np.save an OSError without errno ("Not enough free space to write ..." from its fallocate), polars an
    OSError without errno whose text ends "(os error 28)". Hence the walk over the chain and the texts.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError):
            if cur.errno in DISK_FULL_ERRNOS:
                return os.strerror(cur.errno)
            text = str(cur)
            if cur.errno is None and (_QUOTA_TEXT in text or f"(os error {errno.EDQUOT})" in text):
                return _QUOTA_TEXT
            if cur.errno is None and any(t in text for t in _FULL_TEXTS):
                return os.strerror(errno.ENOSPC)
            if cur.errno is None and f"(os error {errno.EFBIG})" in text:
                return os.strerror(errno.EFBIG)
        cur = cur.__cause__ or cur.__context__
    return None


_QUOTA_TEXT = os.strerror(errno.EDQUOT)
_FULL_TEXTS = (os.strerror(errno.ENOSPC), f"(os error {errno.ENOSPC})", "Not enough free space to write")


def disk_free_bytes(path: Path | str) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem holding `path` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


@contextmanager
def disk_full_as_error(path: Path | str, needs: str | Callable[[], str] = "",
                       rerun: str | None = None) -> Iterator[None]:
    """Turn a full disk or quota (see `disk_full_reason`) inside the block into one `DiskFullError`.

    `needs` is a clause such as "this file needs about 2.1 MB", or a callable returning one, so an estimate
    can use what was written before the disk filled. `rerun` says what running the same command again does
    (default `REDO_WRITE`); a block around a whole command passes it to override the note of a file-level
    error inside, whose path and size it keeps. Other errors pass through unchanged; cleaning up
    half-written files stays the writer's job.
    """
    try:
        yield
    except DiskFullError as exc:
        if rerun is None or exc.rerun == rerun:
            raise
        raise exc.rerun_as(rerun) from None
    except CtrpipeError:
        raise
    except Exception as exc:   # not only OSError: torch.save wraps the OSError in a RuntimeError
        reason = disk_full_reason(exc)
        if reason is None:
            raise
        estimate = needs() if callable(needs) else needs
        raise DiskFullError(path, estimate, rerun or REDO_WRITE, reason) from None


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as `df -H` and file managers show them)."""
    for div, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{int(n)} bytes"
