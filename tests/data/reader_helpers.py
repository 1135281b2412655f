"""Helpers for the stage-1 reader tests: a pure-Python reference parse and line editing of tiny files."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT

SHARED_CRITEO = Path(__file__).resolve().parents[3] / "shared" / "data" / "criteo"


def reference_frame(path: Path) -> pl.DataFrame:
    """Pure-Python parse of a clean labelled Criteo file, the reader's ground truth."""
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines(keepends=True)]
    data: dict[str, list[object]] = {"label": [float(r[0]) for r in rows]}
    for j, c in enumerate(CRITEO_INT, start=1):
        data[c] = [float(r[j]) if r[j] else None for r in rows]
    for j, c in enumerate(CRITEO_CAT, start=14):
        data[c] = [r[j] or None for r in rows]
    schema = {"label": pl.Float32, **dict.fromkeys(CRITEO_INT, pl.Float64),
              **dict.fromkeys(CRITEO_CAT, pl.String)}
    return pl.DataFrame(data, schema=schema)


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


def unlabelled_copy(src: Path, dst: Path) -> Path:
    """The same rows without their label field: a 39-field test file."""
    return write_lines(dst, [ln[ln.index("\t") + 1:] for ln in lines_of(src)])
