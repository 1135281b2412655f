"""Stage 1: the chunk type every raw reader (Criteo text, Parquet, CSV) yields, so the build sees one shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.data.hashing import xxh64_strings
from ctrpipe.data.token_kernel import string_hashes

MAX_BAD_EXAMPLES = 5     # readers name at most this many bad rows in an error message
HASHED_PREFIX = "xxh64:"  # frame column "xxh64:C1": C1 already hashed by the reader (see column_hashes)


@dataclass(frozen=True)
class Remedies:
    """What the command reading the input lets its user do about a bad file, for the readers' fixes to name:
    a fix names only options its command has (`ctrpipe predict` scores every row of a file in the run's
    format; a --gold file needs labels and cannot be --test). The default is `ctrpipe shard`'s."""

    skip_rows: bool = True            # --bad-rows skip exists
    run_format: str = ""              # the one format the command reads ("": any, by --set data.format)
    # for a file without the label columns
    unlabelled: str = "pass --test to shard unlabelled test data, or check that this is the training file"

    def or_skip(self, fix: str, what: str = "rows") -> str:
        """`fix`, and where the command can skip bad rows, that option."""
        return f"{fix}, or pass --bad-rows skip to skip and count such {what}" if self.skip_rows else fix

    def bad_label(self, labels_optional: bool) -> str:
        """The fix for a label that is not 0/1. Where the file's labels are optional (a --test build), it may
        drop them; skipping its rows would leave them out of the submission, so that is not offered there."""
        if labels_optional:
            return "labels must be 0/1 (no missing values): fix the file, or drop the label columns from it " \
                "(a test file's labels are optional)"
        return self.or_skip("labels must be 0/1 (no missing values); fix the file")

    def read_as(self, fmt: str) -> str:
        """How to read a file that is in format `fmt`."""
        if self.run_format:
            return f"pass input in the run's format (data.format={self.run_format})"
        return f"pass --set data.format={fmt}"

    def or_read_as(self, fix: str, fmt: str, what: str) -> str:
        """`fix`, and how to read `what` input (format `fmt`): another data.format, or the run's own."""
        if self.run_format:
            return f"{fix} (the run reads data.format={self.run_format})"
        return f"{fix}, or pass --set data.format={fmt} for {what} input"

    def or_config(self, fix: str, change: str) -> str:
        """`fix`, and where the data config can still change (a build, not a trained run), `change`."""
        return f"{fix}, or {change}" if not self.run_format else fix


SHARD_REMEDIES = Remedies()


@dataclass
class BadRow:
    """One malformed input row, skipped in `bad_rows=skip` mode (one object per skipped row)."""

    source: str
    line: int | None          # 1-based line in a text file (CSV: the row's first line)
    row: int | None           # 0-based row in a Parquet file
    column: str | None
    reason: str               # short, stable (tallied by reason): "field count", "not a number", "bad label"


@dataclass
class RawChunk:
    """A bounded slice of one input file, typed but not yet transformed.

    frame columns: numeric -> Float64 (null or NaN = missing); categorical -> String (null or "" = missing),
    or, when the reader hashed it already, UInt64 under the name `HASHED_PREFIX + name` (see column_hashes);
    token columns -> String (null or "" = no tokens); labels -> Float32; id column -> its own dtype.
    Criteo text: 'label', I1..I13, C1..C26 ('label' absent for 39-field test files).
    """

    frame: pl.DataFrame
    source: Path
    first_line: int           # 1-based line (text) or 0-based row (Parquet) in `source` of frame row 0
    nbytes: int               # uncompressed bytes this chunk consumed (MB/s)
    bad_rows: list[BadRow] = field(default_factory=list)
    has_labels: bool = True
    # line (text) or row (Parquet) of every frame row; None when no row was skipped (then row i is at
    # first_line + i)
    line_numbers: np.ndarray | None = None
    file_bytes: int = 0       # on-disk bytes consumed (compressed for .gz), for progress against file sizes
    # CSV, where rows and lines differ (header, comment and blank lines, quoted line breaks): the 0-based data-row
    # position in `source` of every frame row, and the data rows up to this chunk's end, bad ones included
    # (positional ids); None: the position follows from the line (Criteo) or row (Parquet)
    positions: np.ndarray | None = None
    records_end: int = 0

    def line_of(self, i: int) -> int:
        """Line (text) or row (Parquet) in `source` of frame row i."""
        return int(self.line_numbers[i]) if self.line_numbers is not None else self.first_line + i


def hashed_name(column: str) -> str:
    """Frame name of a categorical column that the reader delivers as xxh64 hashes."""
    return HASHED_PREFIX + column


def has_column(frame: pl.DataFrame, column: str) -> bool:
    """Whether `column` is in the frame, as text or already hashed."""
    return column in frame.columns or hashed_name(column) in frame.columns


def string_missing(s: pl.Series) -> np.ndarray:
    """(N,) bool: null or empty string, the categorical 'missing' convention."""
    if s.dtype != pl.String:
        s = s.cast(pl.String)
    return (s.is_null() | (s.str.len_bytes() == 0)).to_numpy()


def column_hashes(frame: pl.DataFrame, column: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """((N,) uint64 xxh64 of each value's UTF-8 text with `seed`, (N,) bool missing); hash 0 where missing.

    A reader may hash a column already (the compiled Criteo kernel does, with the column's field seed, 0 for
    an empty value): then the frame holds `hashed_name(column)` instead of the text, and a real hash of
    exactly 0 (probability 2**-64) would read as missing. Both forms give the same arrays.
    """
    pre = frame.get_column(hashed_name(column), default=None)
    if pre is not None:
        h = pre.to_numpy()
        return h, h == 0
    s = frame[column]
    fast = string_hashes(s, seed)       # the compiled kernel over polars' string views, in place
    if fast is not None:
        h, missing = fast
    else:
        h, missing = xxh64_strings(s, seed), string_missing(s)
    h[missing] = 0
    return h, missing
