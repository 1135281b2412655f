"""Stage 2: the per-chunk inputs of fold assignment (group keys, time values) and the pre-pass that cuts time
folds into periods.

Time folds need the whole input's order before the first row is assigned, so a cheap pre-pass reads only
the time column and counts rows per distinct time value; the periods follow from those counts
(`ctrpipe.data.splits.period_starts`). Past a million distinct values (fine-grained timestamps) a sample of the
values and a second pass over the column give the same periods in bounded memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.data.chunks import RawChunk, column_hashes, has_column, hashed_name
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.data.splits import combine_hashes, mix64, period_starts, value_periods
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
    # a row missing any of the values is its own group, as a missing `key` is: (no user, site s) is no one
    # user's rows, and keyed alike they made one group far larger than the others
    return keyless_by_row(combined, np.logical_or.reduce([m for _, m in parts]), rows)


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
    elif s is not None and isinstance(s.dtype, pl.Decimal):
        # a decimal's text keeps its scale ("467.00", what Spark and databases write) where another file's
        # integer reads "467" and a float "467.5": written as the number it is, so one group stays one
        text = x.cast(pl.String).str.replace(r"^(-?\d+\.\d*[1-9])0+$", "${1}").str.replace(r"^(-?\d+)\.0*$", "${1}")
        frame = frame.select(text.alias(column))
    if s is not None and s.dtype == pl.Date:
        # a date is the midnight of its day, as another file's timestamp of that midnight (one group)
        frame, s = frame.select(x.cast(pl.Datetime("us"))), frame.get_column(column).cast(pl.Datetime("us"))
    if s is not None and isinstance(s.dtype, (pl.Datetime, pl.Duration)):
        # their text shows the file's unit and time zone ("...00.000" in ms, "...00.000000" in us, "+00:00"):
        # one instant stored in two files' units hashed apart, so its rows were split across folds. As
        # time_values compares them: in microseconds, an aware timestamp as its UTC time (a duration, which
        # polars cannot write as text and used to crash here, as its count of microseconds)
        if isinstance(s.dtype, pl.Datetime) and s.dtype.time_zone is not None:
            x = x.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        x = x.dt.cast_time_unit("us")
        frame = frame.select((x if isinstance(s.dtype, pl.Datetime) else x.to_physical()).alias(column))
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
    period, and neither has empty text."""
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
    else:                           # empty text is missing, as it is everywhere else (not the earliest time)
        s, kind = s.cast(pl.String), "text"
        s = s.set(s.str.strip_chars() == "", None)
    s = s.cast(_TIME_KINDS[kind])
    _refuse_missing_times(s, key, chunk)
    return s, kind


def _text_numbers(s: pl.Series) -> pl.Series | None:
    """Text time values as numbers when every one is a number (a CSV column, an integer column read as a
    categorical: "10" after "2", not before), else None."""
    number = s.str.strip_chars().cast(pl.Float64, strict=False).fill_nan(None)
    return number if number.null_count() == s.null_count() else None


# a month's whole name or its 3-letter form, not a word that starts like one (market, Mayotte, America/Juneau)
_MONTH_NAME = (r"(?i)\b(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec|january|february|march|april|june|"
               r"july|august|september|october|november|december)\b")
# day and month before a 4-digit year (9/5/2024, 09.05.2024), or a 2-digit one after slashes or dots
# (09/05/24); 24-05-09 with dashes is read as year first, as ISO writes it
_YEAR_LAST = r"^\s*(\d{1,2}[/.\-]\d{1,2}[/.\-]\d{4}|\d{1,2}[/.]\d{1,2}[/.]\d{2})\b"


# a time of day on a 12-hour clock (04:54:10 AM): "01:00 PM" orders before "11:00 AM"
_TWELVE_HOUR = r"(?i)\b\d{1,2}:\d\d(:\d\d([.,]\d+)?)?\s*[ap]\.?m\b"
# a time of day and what follows it: a UTC offset (+09:00, -0400, -04, Z) or nothing. Text orders local
# times, so offsets that differ, or some times with one and some without, break time order. Only after a time
# of day: 20240509-1030 (a date, then a time) is no offset
_TIME_OFFSET = r"\d\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*(Z|[+-]\d\d(?::?\d\d)?)?\s*$"


def _utc_offsets(values: pl.Series) -> pl.Series:
    """The distinct UTC offsets (+HH:MM; null for a time without one) of the values ending in a time of day."""
    timed = values.filter(values.str.contains(_TIME_OFFSET))
    offset = timed.str.extract(_TIME_OFFSET).str.replace("Z", "+00:00").str.replace(r"^([+-]\d\d)$", "${1}:00") \
        .str.replace(r"^([+-]\d\d)(\d\d)$", "${1}:${2}")
    return offset.unique()


def refuse_unsorted_text_times(values: pl.Series, key: str) -> None:
    """Text time values are ordered as text, which is their time order only when it is written so: zero-padded
    numbers, most significant first (2024-05-09 10:00). Text that reads as a time otherwise ("2024-5-9" after
    "2024-10-1", "9/5/2024", "May 9 2024") would cut periods in another order than time, and the folds would
    train on the future without a word: refused, with how to store it. `values`: the distinct values, or a
    sample of them."""
    shown = values.drop_nulls()
    why = ""
    if shown.str.contains(_MONTH_NAME).any():
        why, example = "names months", shown.filter(shown.str.contains(_MONTH_NAME))[0]
    elif shown.str.contains(_YEAR_LAST).any():
        why, example = "puts the day or month before the year", shown.filter(shown.str.contains(_YEAR_LAST))[0]
    elif shown.str.contains(_TWELVE_HOUR).any():
        why, example = "writes a 12-hour clock (AM/PM)", shown.filter(shown.str.contains(_TWELVE_HOUR))[0]
    elif (offsets := _utc_offsets(shown)).len() > 1:
        first = sorted(offsets.unique().fill_null("none").to_list())[:3]
        why, example = (f"carries different UTC offsets, or some times have one and some not ({', '.join(first)}): "
                        "it orders local times, not one time line",
                        shown.filter(shown.str.extract(_TIME_OFFSET).is_not_null())[0])
    else:
        # the n-th number of each value: one width throughout (zero-padded), or text order is not number order
        # (a fraction of a second orders as text whatever its width, 10:00:00.5 < 10:00:00.75: left out)
        whole = shown.str.replace_all(r":(\d\d)[.,]\d+", ":$1")
        runs = pl.DataFrame({"runs": whole.str.extract_all(r"\d+")}).with_row_index("v").explode("runs").drop_nulls()
        runs = runs.with_columns(pos=pl.int_range(pl.len()).over("v"), width=pl.col("runs").str.len_bytes())
        widths = runs.group_by("pos").agg(lo=pl.col("width").min(), hi=pl.col("width").max()).filter(
            pl.col("lo") != pl.col("hi"))
        if widths.height:
            pos = int(widths["pos"].min())
            narrow = runs.filter((pl.col("pos") == pos) & (pl.col("width") == widths.filter(
                pl.col("pos") == pos)["lo"][0]))["v"][0]
            why, example = "writes numbers of different widths (not zero-padded)", shown[int(narrow)]
    if why:
        raise InputFormatError(
            f"time key {key!r} is text that {why}, e.g. {example!r}: text is ordered character by character, "
            "which is not its time order, so the periods would not follow time",
            where="data.folds.time_key",
            fix=f"store {key!r} as timestamps or numbers (parse it with its format before writing the file), or "
                "as zero-padded text written year first (2024-05-09 08:00)")


def _refuse_missing_times(s: pl.Series, key: str, chunk: RawChunk) -> None:
    missing = s.is_null().to_numpy()
    if missing.any():
        i = int(np.argmax(missing))
        raise InputFormatError(f"time key {key!r} is missing in {int(missing.sum())} "
                               f"row{'' if missing.sum() == 1 else 's'} of this chunk",
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


# distinct time values counted exactly; inputs with more (timestamps to the second over months of logs) get
# their period starts from a sample and one more pass that counts only the values near each start
EXACT_DISTINCT = 1 << 20
_SAMPLE_ROWS = 1 << 20
_SAMPLE_SALT = np.uint64(0x7469_6D65_5F73_6D70)


def fit_periods(plan: Plan, paths: list[Path], n_splits: int, exact_distinct: int = EXACT_DISTINCT,
                sample_rows: int = _SAMPLE_ROWS) -> tuple[pl.Series, list[str]]:
    """The first time value of periods 1..K-1 over the rows of `paths` (the main inputs), from a pass that
    reads only the time column (typed as the write pass types it; with bad_rows=skip every column, so the rows
    the build skips count nowhere), and each as text (timestamps compare as their microsecond counts; the
    manifest shows them as times). Text is read as numbers when every value of the inputs is one: decided
    over all of them, so no chunk size changes it.

    Up to `exact_distinct` distinct values are counted exactly (`period_starts`). Past that, memory would grow
    with the rows: a uniform sample of the values brackets each start, and a second pass counts the rows
    below each bracket and each value inside it, which gives the same starts (see `_refined_starts`)."""
    key = plan.cfg.folds.time_key
    tally = _TimeTally(exact_distinct, sample_rows)
    for values, kind, chunk in _time_chunks(plan, paths):
        if tally.kind and kind != tally.kind:
            raise _mixed_kinds(key, tally.kind, kind, chunk)
        tally.add(values, kind)
    if tally.total == 0:
        raise InputFormatError("the inputs hold no rows", where=", ".join(str(p) for p in paths[:3]),
                               fix="check the --input paths")
    try:
        counts = tally.exact_counts()
        if counts is not None:
            kind = tally.kind
            number = _text_numbers(counts["t"]) if kind == "text" else None
            if number is not None:                  # "2" and "2.0" are one time: their counts add up
                kind = "numbers"
                counts = counts.with_columns(t=number).group_by("t").agg(pl.col("n").sum())
            elif kind == "text":
                refuse_unsorted_text_times(counts["t"], key)
            counts = counts.sort("t")
            starts = period_starts(counts["t"], counts["n"].to_numpy().astype(np.int64), n_splits)
        else:
            kind = "numbers" if tally.kind == "text" and tally.all_numbers else tally.kind
            as_kind = _text_numbers if kind != tally.kind else (lambda v: v)
            if kind == "text":
                refuse_unsorted_text_times(tally.sample().unique(), key)
            starts = _refined_starts(n_splits, tally.total, as_kind(tally.sample()).sort(),
                                     lambda: (as_kind(v) for v, _, _ in _time_chunks(plan, paths)))  # type: ignore
        shown = starts.cast(_SHOWN_AS[kind]) if kind in _SHOWN_AS else starts
        return starts, [_shown(v) for v in shown.to_list()]
    except ValueError as exc:
        raise InputFormatError(f"time key {key!r} cannot be cut into {n_splits} periods: {exc} (equal time "
                               "values stay in one period)", where="data.folds.time_key",
                               fix="use fewer folds (data.folds.n_splits) or a finer time column") from None


def _time_chunks(plan: Plan, paths: list[Path]) -> Iterator[tuple[pl.Series, str, RawChunk]]:
    """(time values, their kind, the chunk) of the main inputs. Only the time column is read, except with
    bad_rows=skip: a row the build skips for another column (a bad label, a missing ID, a bad weight) must
    not count in the periods, so every column is read and checked as the build reads it."""
    key = plan.cfg.folds.time_key
    rc = plan.columns
    data = plan.cfg
    if data.bad_rows != "skip":
        rc = dataclasses.replace(
            rc, numeric=tuple(c for c in rc.numeric if c == key),
            categorical=tuple(c for c in rc.categorical if c == key), multihot=(), sequence=(), labels=(),
            derived=(), id=rc.id if rc.id == key else None, keys=tuple(c for c in rc.keys if c == key))
        data = dataclasses.replace(data, labels=(), derived_labels=())
    for chunk in iter_raw_chunks(data, paths, data.chunk_rows, bad_rows=data.bad_rows, require_labels=False,
                                 columns=rc):
        values, kind = time_values(chunk, key)
        yield values.alias("t"), kind, chunk


class _TimeTally:
    """The statistics pass over the time key: the rows, each value's count while there are at most `exact`
    distinct values, and a uniform sample of the values (the rows whose seeded row-index hash is among the
    smallest: the same sample for any chunking). Past `exact`, whether text values are all numbers is
    followed chunk by chunk (before, the distinct values decide it at the end)."""

    def __init__(self, exact: int, sample_rows: int) -> None:
        self.exact, self.sample_rows, self.total, self.kind, self.all_numbers = exact, sample_rows, 0, "", True
        self._parts: list[pl.DataFrame] = []         # value counts not yet merged, and the merged ones
        self._pending = self._merged = 0
        self._over = False                           # more than `exact` distinct values: no counts kept
        self._hashes: list[np.ndarray] = []          # the sample: row-index hashes and values, in pieces
        self._values: list[pl.Series] = []
        self._held = 0
        self._cut = np.uint64(np.iinfo(np.uint64).max)

    def add(self, values: pl.Series, kind: str) -> None:
        rows = np.arange(self.total, self.total + len(values), dtype=np.uint64)
        self.total += len(values)
        self.kind = kind
        if not self._over:
            vc = values.value_counts(name="n")
            self._parts.append(vc)
            self._pending += len(vc)
            if self._pending > max(self._merged, 1 << 16):     # merge seldom: amortised, not once per chunk
                self._merge()
        elif kind == "text" and self.all_numbers:
            self.all_numbers = _text_numbers(values.unique()) is not None
        h = mix64(rows ^ _SAMPLE_SALT)
        take = h <= self._cut
        self._hashes.append(h[take])
        self._values.append(values.filter(pl.Series(take)))
        self._held += int(take.sum())
        if self._held > 2 * self.sample_rows:
            self._prune()

    def _prune(self) -> None:
        h = np.concatenate(self._hashes)
        keep = np.argpartition(h, self.sample_rows - 1)[:self.sample_rows]
        self._hashes, self._values = [h[keep]], [pl.concat(self._values).gather(keep)]
        self._held, self._cut = self.sample_rows, h[keep].max()

    def _merge(self) -> None:
        merged = pl.concat(self._parts).group_by("t").agg(pl.col("n").sum())
        self._parts, self._pending, self._merged = [merged], 0, len(merged)
        if len(merged) > self.exact:
            if self.kind == "text":         # decided on the values so far; later chunks in `add`
                self.all_numbers = _text_numbers(merged["t"]) is not None
            self._parts, self._over = [], True

    def exact_counts(self) -> pl.DataFrame | None:
        if not self._over:
            self._merge()
        return None if self._over else self._parts[0]

    def sample(self) -> pl.Series:
        return pl.concat(self._values)


# Exact counting re-cuts such ties on the rows that remain (`splits.period_starts`); sampled periods cannot
_SAMPLED = "; past a million distinct times the periods come from a sample, which cannot re-cut around a time " \
    "holding that many rows"


def _refined_starts(k: int, total: int, sample: pl.Series, passes: Callable[[], Iterator[pl.Series]]) -> pl.Series:
    """`period_starts` of all the values, from a sorted uniform `sample` of them and passes over them.

    The start of period p is the first value whose rows' middle rank reaches p/k of the rows. The sample's
    values around rank p/k (with a margin of several standard deviations of sampling error) bracket it; a
    pass counts the rows below each bracket and every value inside it, which is all the arithmetic of
    `period_starts` needs for the values there. Where a bracket missed (rows below it reach the period, or no
    value in it does), its margin widens and the pass is repeated; a bracket open at both ends holds every
    value, so a start it cannot find does not exist (that period and the ones after it would be empty)."""
    n = len(sample)
    margin = int(4 * n ** 0.5) + 2
    while True:
        lo_at = [int(p * n / k) - margin for p in range(1, k)]
        hi_at = [int(p * n / k) + margin for p in range(1, k)]
        lo = [sample[i] if i > 0 else None for i in lo_at]            # None: no bound
        hi = [sample[i] if i < n - 1 else None for i in hi_at]
        below = [0] * (k - 1)
        parts: list[list[pl.DataFrame]] = [[] for _ in range(k - 1)]
        for values in passes():
            for j in range(k - 1):
                inside = pl.Series(np.ones(len(values), dtype=bool))
                if lo[j] is not None:
                    under = values < lo[j]
                    below[j] += int(under.sum())
                    inside &= ~under
                if hi[j] is not None:
                    inside &= values <= hi[j]
                parts[j].append(values.filter(inside).value_counts(name="n"))
        starts, missed = [], False
        for j, p in enumerate(range(1, k)):
            near = pl.concat(parts[j]).group_by("t").agg(pl.col("n").sum()).sort("t")
            counts = near["n"].to_numpy().astype(np.int64)
            period = value_periods(below[j] + np.cumsum(counts), counts, total, k)
            first = int(np.searchsorted(period, p, side="left"))
            if first == len(counts) and hi[j] is None:
                raise ValueError(f"the values fill fewer than {k} periods (period {p} holds none){_SAMPLED}")
            if below[j] * k > p * total or first == len(counts):
                missed = True                                        # the start lies outside the bracket
                break
            if period[first] > p or (p == 1 and lo[j] is None and first == 0):
                empty = p if period[first] > p else 0                # (the smallest value already in period 1)
                raise ValueError(f"the values fill fewer than {k} periods (period {empty} holds none){_SAMPLED}")
            starts.append(near["t"][first])
        if not missed:
            return pl.Series(starts, dtype=sample.dtype)
        margin *= 8


def _shown(value: object) -> str:
    """A period start as the manifest shows it: a whole number without '.0' (day 6, not 6.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
