"""Stage 1: the chunk type every raw reader (Criteo text, Parquet) yields, so the build sees one shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

MAX_BAD_EXAMPLES = 5     # readers name at most this many bad rows in an error message


@dataclass
class BadRow:
    """One malformed input row, skipped in `bad_rows=skip` mode (one object per skipped row)."""

    source: str
    line: int | None          # 1-based line in a text file
    row: int | None           # 0-based row in a Parquet file
    column: str | None
    reason: str               # short, stable (tallied by reason): "field count", "not a number", "bad label"


@dataclass
class RawChunk:
    """A bounded slice of one input file, typed but not yet transformed.

    frame columns: numeric -> Float64 (null = missing); categorical -> String (null or "" = missing);
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

    def line_of(self, i: int) -> int:
        """Line (text) or row (Parquet) in `source` of frame row i."""
        return int(self.line_numbers[i]) if self.line_numbers is not None else self.first_line + i
