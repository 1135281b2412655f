"""Stage 2: the per-chunk inputs of fold assignment (group keys, time values) and the pre-pass that cuts time
folds into periods.

Time folds need the whole input's order before the first row is assigned, so a cheap pre-pass reads only
the time column and counts rows per distinct time value (memory grows with the distinct values, never with
the rows); the periods follow from those counts (`ctrpipe.data.splits.period_starts`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.data.chunks import RawChunk, column_hashes, has_column, hashed_name
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.data.splits import combine_hashes, mix64, period_starts
from ctrpipe.errors import InputFormatError, SchemaError, location
from ctrpipe.shard.transform import Plan

_KEYLESS_SALT = np.uint64(0x6B65_796C_6573_7321)    # keeps row-keyed hashes apart from value hashes


def fold_key_hash(plan: Plan, frame: pl.DataFrame, rows: np.ndarray) -> np.ndarray | None:
    """(N,) uint64 group key of group folds (one column's value hash, or several columns' combined), else
    None. `rows`: the frame's global row indices, which place rows without a key (`keyless_by_row`)."""
    f = plan.cfg.folds
    if f.mode != "group" or not f.n_splits:
        return None
    cols = f.composite_group or (f.key,)
    key = "data.folds.composite_group" if f.composite_group else "data.folds.key"
    for c in cols:
        if not has_column(frame, c):
            raise SchemaError(f"group key column {c!r} is not among the parsed columns", where=key,
                              fix=f"use one of {frame.columns[:10]}")
    parts = [group_hashes(plan, frame, c) for c in cols]
    hashes = [h for h, _ in parts]
    combined = hashes[0] if len(hashes) == 1 else combine_hashes(hashes)
    return keyless_by_row(combined, np.logical_and.reduce([m for _, m in parts]), rows)


def group_hashes(plan: Plan, frame: pl.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """`column_hashes` of a grouping column, whole numbers hashed as the integers they are: a key stored as
    int64 in one file and as float64 in another (what pandas writes for an int column with a NaN), or written
    "1" and "1.0" in CSV, hashed apart and split one group. NaN is a missing key (it was one big group)."""
    s = frame.get_column(column, default=None)
    x = pl.col(column)
    if s is not None and s.dtype.is_float():
        whole = x.is_finite() & (x == x.floor()) & (x.abs() < 2.0**63)
        text = pl.when(x.is_nan()).then(pl.lit(None, pl.String)).when(whole) \
            .then(x.cast(pl.Int64).cast(pl.String)).otherwise(x.cast(pl.String))
        frame = frame.select(text.alias(column))
    elif s is not None and s.dtype == pl.String:
        frame = frame.select(x.str.replace(r"^(-?\d+)\.0+$", "${1}").alias(column))
    return column_hashes(frame, column, plan.seed(column))


def keyless_by_row(hashes: np.ndarray, missing: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`hashes` with each row whose key is missing keyed by its global row index instead: as its own group.
    Missing keys would all share one hash, so one group: a fold (or a side of the split) far larger than the
    others. A row with no key has no group to keep together, and its row index is the same for any chunking
    or number of workers."""
    if not missing.any():
        return hashes
    out = hashes.copy()
    out[missing] = mix64(rows[missing].astype(np.uint64) ^ _KEYLESS_SALT)
    return out

# what each kind of time value is compared as (one dtype for every input file, whatever each stores)
_TIME_KINDS = {"timestamps": pl.Int64, "durations": pl.Int64, "times of day": pl.Int64, "numbers": pl.Float64,
               "text": pl.String}
_SHOWN_AS = {"timestamps": pl.Datetime("us"), "durations": pl.Duration("us"), "times of day": pl.Time}


def time_values(chunk: RawChunk, key: str) -> tuple[pl.Series, str]:
    """((N,) time values of a chunk in one comparable dtype whatever the file stores, their kind).

    Timestamps and dates are counted in microseconds (files written in ms, us or ns, or as dates, compare as
    one time line), durations too; numbers are Float64; text stays text here (`fit_periods` reads it as
    numbers when every value of the inputs is one). A missing value is an error: a row with no time has no
    period."""
    frame = chunk.frame
    if key not in frame.columns:
        hashed = hashed_name(key) in frame.columns
        raise SchemaError(f"time key column {key!r} is " + ("only available hashed (a Criteo categorical)"
                                                            if hashed else "not among the parsed columns"),
                          where="data.folds.time_key",
                          fix="order folds by a numeric, timestamp or text column of the input")
    s = frame[key]
    if s.dtype == pl.Date:
        s, kind = s.cast(pl.Datetime("us")).to_physical(), "timestamps"
    elif isinstance(s.dtype, pl.Datetime):
        s, kind = s.dt.cast_time_unit("us").to_physical(), "timestamps"
    elif isinstance(s.dtype, pl.Duration):
        s, kind = s.dt.cast_time_unit("us").to_physical(), "durations"
    elif s.dtype == pl.Time:
        s, kind = s.to_physical(), "times of day"
    elif s.dtype.is_numeric() or s.dtype == pl.Boolean:
        s, kind = s.cast(pl.Float64).fill_nan(None), "numbers"
    else:
        s, kind = s.cast(pl.String), "text"
    s = s.cast(_TIME_KINDS[kind])
    _refuse_missing_times(s, key, chunk)
    return s, kind


def _text_numbers(s: pl.Series) -> pl.Series | None:
    """Text time values as numbers when every one is a number (a CSV column, an integer column read as a
    categorical: "10" after "2", not before), else None."""
    number = s.str.strip_chars().cast(pl.Float64, strict=False).fill_nan(None)
    return number if number.null_count() == s.null_count() else None


def _refuse_missing_times(s: pl.Series, key: str, chunk: RawChunk) -> None:
    missing = s.is_null().to_numpy()
    if missing.any():
        i = int(np.argmax(missing))
        raise InputFormatError(f"time key {key!r} is missing in {int(missing.sum())} rows of this chunk",
                               where=location(chunk.source, row=chunk.line_of(i), column=key),
                               fix="fill the missing times in the input, or use another data.folds.mode")


def fold_times(chunk: RawChunk, key: str, starts: pl.Series) -> pl.Series:
    """The write pass's time values of a chunk in the periods' dtype (text as numbers where `fit_periods` read
    the inputs' text as numbers), refused where they are another kind."""
    values, kind = time_values(chunk, key)
    if kind == "text" and starts.dtype == pl.Float64:
        number = _text_numbers(values)
        if number is None:      # the statistics' pass saw the main inputs all numbers: another input is not
            raise _mixed_kinds(key, "numbers", "text", chunk)
        return number
    if values.dtype != starts.dtype:
        want = next(k for k, t in _TIME_KINDS.items() if t == starts.dtype)
        raise _mixed_kinds(key, want, kind, chunk)
    return values


def _mixed_kinds(key: str, first: str, this: str, chunk: RawChunk) -> InputFormatError:
    return InputFormatError(f"time key {key!r} holds {this} here and {first} in the inputs before, which do not "
                            "compare as one time line", where=location(chunk.source, row=chunk.line_of(0), column=key),
                            fix=f"store {key!r} with one type in every input file (all timestamps, all numbers or "
                                "all text)")


def fit_periods(plan: Plan, paths: list[Path], n_splits: int) -> tuple[pl.Series, list[str]]:
    """The first time value of periods 1..K-1 over the rows of `paths` (the main inputs), from a pass that
    reads only the time column (typed as the write pass types it), and each as text (timestamps compare as
    their microsecond counts; the manifest shows them as times). Text is read as numbers when every distinct
    value of the inputs is one: decided over all of them, so no chunk size changes it."""
    key = plan.cfg.folds.time_key
    rc = plan.columns
    only = dataclasses.replace(
        rc, numeric=tuple(c for c in rc.numeric if c == key), categorical=tuple(c for c in rc.categorical if c == key),
        multihot=(), sequence=(), labels=(), derived=(), id=rc.id if rc.id == key else None,
        keys=tuple(c for c in rc.keys if c == key))
    data = dataclasses.replace(plan.cfg, labels=(), derived_labels=())
    counts: pl.DataFrame | None = None
    kind = ""
    for chunk in iter_raw_chunks(data, paths, data.chunk_rows, bad_rows=data.bad_rows, require_labels=False,
                                 columns=only):
        values, this = time_values(chunk, key)
        if kind and this != kind:
            raise _mixed_kinds(key, kind, this, chunk)
        kind = this
        vc = values.alias("t").value_counts(name="n")
        counts = vc if counts is None else pl.concat([counts, vc]).group_by("t").agg(pl.col("n").sum())
    if counts is None:
        raise InputFormatError("the inputs hold no rows", where=", ".join(str(p) for p in paths[:3]),
                               fix="check the --input paths")
    if kind == "text":
        number = _text_numbers(counts["t"])
        if number is not None:            # "2" and "2.0" are one time: their counts add up
            kind = "numbers"
            counts = counts.with_columns(t=number).group_by("t").agg(pl.col("n").sum())
    counts = counts.sort("t")
    try:
        starts = period_starts(counts["t"], counts["n"].to_numpy().astype(np.int64), n_splits)
        shown = starts.cast(_SHOWN_AS[kind]) if kind in _SHOWN_AS else starts
        return starts, [_shown(v) for v in shown.to_list()]
    except ValueError as exc:
        raise InputFormatError(f"time key {key!r} cannot be cut into {n_splits} periods: {exc} (equal time "
                               "values stay in one period)", where="data.folds.time_key",
                               fix="use fewer folds (data.folds.n_splits) or a finer time column") from None


def _shown(value: object) -> str:
    """A period start as the manifest shows it: a whole number without '.0' (day 6, not 6.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
