"""User-facing failures. Library code raises these; `cli.py` renders them as what / where / fix and exits 1.

Anything that is not a `CtrpipeError` is a bug in ctrpipe and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class CtrpipeError(Exception):
    """Base class: `what` went wrong, `where` (file, line, column or key) and how to `fix` it."""

    what: str
    where: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head}\n  fix: {self.fix}" if self.fix else head

    def __str__(self) -> str:
        return self.render()


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
