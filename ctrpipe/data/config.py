"""`data:` section: how raw columns become shard columns (kinds, hashing, transforms, splits, folds)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ctrpipe.errors import ConfigError

CRITEO_INT = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT = tuple(f"C{i}" for i in range(1, 27))
MAX_BINS = 2**31 - 1     # categorical and token ids are stored as int32 (past it they wrapped negative)


@dataclass(frozen=True)
class NumericConfig:
    """Numeric columns by explicit list and/or a regex `pattern` (matched against the first input's column
    names; a later input holding another matching column is refused)."""

    REPLACED_TOGETHER: ClassVar[tuple[str, ...]] = ("columns", "pattern")   # one selection (config.py)
    columns: tuple[str, ...] = ()        # explicit column names
    pattern: str = ""                    # regex over Parquet column names, e.g. "^feat_"
    # fill for missing values (train-split statistics); missing: null, NaN, +-inf and values beyond float32
    impute: Literal["zero", "mean", "median"] = "zero"
    missing_indicator: bool = False      # add a 0/1 '<col>_missing' column per numeric column
    # signed: sign(x) * log1p(|x|) keeps negatives ordered; clip: log1p(max(x, 0)); none: raw value
    log1p: Literal["signed", "clip", "none"] = "signed"  # signed: sign(x)*log1p(|x|)
    standardize: bool = False            # (x - mean) / std after log1p, statistics from the train split


@dataclass(frozen=True)
class CategoricalConfig:
    REPLACED_TOGETHER: ClassVar[tuple[str, ...]] = ("columns", "pattern")   # one selection (config.py)
    columns: tuple[str, ...] = ()        # explicit column names
    pattern: str = ""                    # regex over Parquet column names, e.g. "^l_feat_"
    mode: Literal["hash", "vocab"] = "hash"  # vocab: ids by train-split frequency, rare -> OOV
    # per field: the id space in hash mode (instead of data.hash_bins); in vocab mode a cap on the number of
    # ids (the most frequent values are kept)
    bins: dict[str, int] = field(default_factory=dict)
    min_count: int = 1                   # vocab mode: values seen fewer times on the train split -> OOV id 1

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ConfigError(f"bad value {self.min_count} for 'data.categorical.min_count'",
                              fix="use a positive integer such as data.categorical.min_count=10")
        for name, b in self.bins.items():
            if not 2 <= b <= MAX_BINS:
                raise ConfigError(f"bad value {b} for 'data.categorical.bins.{name}'",
                                  fix=f"use 2 to {MAX_BINS:,}, e.g. data.categorical.bins.{name}=100000")


@dataclass(frozen=True)
class TokenColumnConfig:
    """A multi-hot (`a|b|c`, optionally `a:0.5|b:0.2`) or sequence (ordered, most recent last) column."""

    column: str = ""
    # between tokens; a build refuses one that leaves most values whole while they hold another separator,
    # or leaves a space on most tokens ("a, b" needs ", ")
    separator: str = "|"
    max_len: int = 16                    # sequences keep the most recent max_len tokens
    bins: int = 0                        # 0 -> data.hash_bins
    weighted: bool = False               # multihot only (refused on a sequence): tokens carry ':weight'
    # a categorical column whose id space the tokens share (e.g. a history of items beside the candidate
    # item): hash mode uses that column's seed and bins, vocab mode one vocabulary fitted on both; models
    # then look both up in the same embedding rows
    share_ids_with: str = ""

    def __post_init__(self) -> None:
        if not self.column:
            raise ConfigError("a token column needs 'column'", fix="e.g. {column: history, separator: ','}")
        if self.max_len < 1:
            raise ConfigError(f"bad max_len {self.max_len} for token column {self.column!r}",
                              fix="use a positive integer such as max_len: 50")
        if self.bins != 0 and not 2 <= self.bins <= MAX_BINS:   # ids are 1..bins-1 (0 = padding)
            raise ConfigError(f"bad bins {self.bins} for token column {self.column!r}",
                              fix=f"use 0 (data.hash_bins) or 2 to {MAX_BINS:,}, e.g. bins: 100000")
        if not self.separator:
            raise ConfigError(f"empty separator for token column {self.column!r}: every character would be a "
                              "token", fix="give the character between tokens, e.g. separator: ','")


@dataclass(frozen=True)
class CovisitConfig:
    """Co-occurrence between a `target` categorical field and the row's tokens in `context` (a sequence,
    multihot or categorical column), counted on the train split only, aggregated to max and mean features."""

    target: str = ""
    context: str = ""
    name: str = ""                       # output prefix; default '<target>_x_<context>'
    smoothing: float = 1.0               # > 0; normalised count = n(t, c) / (n(c) + smoothing)
    # train rows were counted themselves: score them without their own occurrence, so train and val/test
    # rows see the same feature distribution (otherwise a unique pair scores 1/(1+s) on train, 0 on val)
    leave_one_out: bool = True

    def __post_init__(self) -> None:
        # not 0: a context token that no train row holds scores 0 / (0 + 0), a NaN feature
        if not self.smoothing > 0 or not math.isfinite(self.smoothing):
            raise ConfigError(f"bad value {self.smoothing} for 'data.covisit[].smoothing': it must be above 0 (a "
                              "context token never seen in the train split would score 0/0)",
                              fix="use a positive number such as smoothing: 1.0 (a small one, e.g. 0.001, for "
                                  "nearly raw co-occurrence rates)")


@dataclass(frozen=True)
class CsvConfig:
    """`data.format: csv`: delimited text, RFC 4180 quoting. Blank lines and comment lines are not rows."""

    # between fields; several characters allowed, e.g. ", " (UCI Adult): each occurrence is one separator
    separator: str = ","
    header: bool = True                  # the first row (after comment lines) names the columns
    column_names: tuple[str, ...] = ()   # header: false: the names of the fields, in file order
    # a field that starts with it may hold separators, newlines, doubled quotes (one inside an unquoted field,
    # as in 5'11", is text); "" = off
    quote_char: str = '"'
    # values that mean 'missing' (compared as written, e.g. ["?", "NA"]); an empty field is always missing
    missing: tuple[str, ...] = ()
    comment_prefix: str = ""             # lines starting with this are skipped, e.g. "|" or "#"; "" = none

    def __post_init__(self) -> None:
        sep = self.separator
        if not sep or "\n" in sep or "\r" in sep or (self.quote_char and self.quote_char in sep):
            raise ConfigError(f"bad value {sep!r} for 'data.csv.separator'",
                              fix='use one or more characters without line breaks or the quote character, '
                                  'e.g. data.csv.separator="," or ", "')
        if len(self.quote_char.encode()) > 1 or self.quote_char in ("\n", "\r"):
            raise ConfigError(f"bad value {self.quote_char!r} for 'data.csv.quote_char'",
                              fix="use one character such as '\"', or \"\" for no quoting")
        if self.header and self.column_names:
            raise ConfigError("data.csv.column_names is set but data.csv.header is true",
                              fix="set data.csv.header=false (names come from the config), or remove "
                                  "data.csv.column_names (names come from the header)")
        dup = sorted({c for c in self.column_names if self.column_names.count(c) > 1})
        if dup or any(not c for c in self.column_names):
            what = f"duplicate names {dup}" if dup else "an empty name"
            raise ConfigError(f"data.csv.column_names has {what}", where="data.csv.column_names",
                              fix="give every field a distinct, non-empty name")
        if self.comment_prefix.startswith(("\n", "\r")):
            raise ConfigError(f"bad value {self.comment_prefix!r} for 'data.csv.comment_prefix'",
                              fix='use e.g. data.csv.comment_prefix="#"')
        prefix, sep_bytes = self.comment_prefix.encode(), sep.encode()
        if len(sep_bytes) > 1 and any(prefix[i:].startswith(sep_bytes) or sep_bytes.startswith(prefix[i:])
                                      for i in range(len(prefix))):
            # the reader stands one byte in for each multi-byte separator before it finds comment lines
            raise ConfigError(f"data.csv.comment_prefix {self.comment_prefix!r} overlaps the separator {sep!r}: "
                              "a line starting with it may begin with a separator (an empty first field)",
                              where="data.csv.comment_prefix",
                              fix="use a comment prefix that shares no characters with the start of the "
                                  "separator, e.g. data.csv.comment_prefix=\"#\"")


@dataclass(frozen=True)
class DerivedLabelConfig:
    """A 0/1 label computed from a text column: 1 when the value is in `positive` or matches `pattern`.
    Its source column is never a feature. A missing source value is a bad row."""

    name: str = ""                       # the label's name (manifest, metrics, heads); default: `column`
    column: str = ""                     # the source column, e.g. income or marital-status
    positive: tuple[str, ...] = ()       # values (as written) that make the label 1, e.g. [">50K", ">50K."]
    pattern: str = ""                    # or: a regex searched in the value (Rust regex syntax), e.g. "^Married"
    # optional: the values that make it 0; then any other value is a bad row (catches typos and new values)
    negative: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.column:
            raise ConfigError("a derived label needs 'column'", where="data.derived_labels",
                              fix="e.g. {name: income, column: income, positive: ['>50K']}")
        if not self.name:
            object.__setattr__(self, "name", self.column)
        key = f"data.derived_labels[{self.name}]"
        if bool(self.positive) == bool(self.pattern):
            raise ConfigError(f"{key} needs exactly one of 'positive' (a list of values) and 'pattern' (a regex)",
                              where=key, fix="e.g. {name: married, column: marital-status, pattern: '^Married'}")
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ConfigError(f"{key}: {both} are both positive and negative", where=key,
                              fix="list each value once")
        if self.pattern:
            _check_regex(self.pattern, f"{key}.pattern")


def _check_regex(pattern: str, key: str) -> None:
    """Patterns run in polars (Rust regex): check there, so look-arounds fail here and not mid-build."""
    # lazy: configs load without polars' start-up cost
    import polars as pl

    try:
        pl.Series([""]).str.contains(pattern)
    except pl.exceptions.PolarsError as exc:
        # the Rust message spans lines (pattern, caret, "error: <why>"): its last error line says why
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln.removeprefix("error:").strip() for ln in reversed(lines) if ln.startswith("error:")),
                   lines[0] if lines else "")
        raise ConfigError(f"bad regex {pattern!r} for '{key}': {why}", where=key,
                          fix="use Rust regex syntax (no look-around or back-references), e.g. '^Married'"
                          ) from None


@dataclass(frozen=True)
class SplitConfig:
    val_ratio: float = 0.1
    mode: Literal["random", "tail", "group"] = "random"  # tail: the last val_ratio of rows (chronological)
    key: str = ""                        # group mode: rows sharing this column's value stay together
    seed: int = 2026

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"bad value {self.val_ratio} for 'data.split.val_ratio'",
                              fix="use a fraction in [0, 1), e.g. data.split.val_ratio=0.1")
        if self.mode == "group" and not self.key:
            raise ConfigError("data.split.mode=group needs data.split.key", fix="e.g. data.split.key=user_id")


@dataclass(frozen=True)
class FoldConfig:
    """K-fold ids of the train+val rows (fold.npy); `ctrpipe train --kfold K` trains fold k on the other folds
    and validates it on fold k.

    mode=time: the rows, ordered by `time_key`, are cut into K contiguous periods of near-equal row counts
    (rows with equal time values never split; where one time holds so many rows that a period would be left
    empty, each later cut takes an equal share of the rows left, so K distinct times make K periods; not
    past a million distinct times, see below);
    fold k is period k, so fold K-1 validates on the latest
    period. Blocked rather than forward-chaining: every row is validated once (complete out-of-fold
    predictions) and every fold trains on K-1 periods; only the last fold trains on the past alone. A
    pre-pass reads the time column (every column with bad_rows=skip, so skipped rows count nowhere); past a
    million distinct times it samples them and reads the column once more, in bounded memory.
    """

    n_splits: int = 0                    # 0: no folds stored
    # plain: by row; stratified: label rates equal across folds; group: rows sharing `key` (or all the values
    # of `composite_group`) share a fold; time: contiguous periods of `time_key` (see above)
    mode: Literal["plain", "stratified", "group", "time"] = "plain"
    key: str = ""                        # group mode: one column; a row whose key is missing is its own group
    # group mode, instead of `key`: rows sharing the values of ALL these columns share a fold, e.g.
    # [user_id, inventory_id]; a row missing any of them is its own group
    composite_group: tuple[str, ...] = ()
    # time mode: a numeric, timestamp/date or sortably written text column (e.g. '2024-05-01 13:00'); it
    # need not be a feature; a missing or empty value is an error. Text holding only numbers orders as numbers, and
    # timestamps as one time line whatever unit each file stores; one kind in every input file. Other text
    # orders character by character, so text written otherwise (2024-5-9, 9/5/2024, May 9, 04:30 PM, or times
    # with different UTC offsets) is refused
    time_key: str = ""
    label: str = ""                      # stratified mode: which label (default: the first)
    seed: int = 2026

    def __post_init__(self) -> None:
        if self.n_splits == 1 or self.n_splits < 0 or self.n_splits > 100:
            raise ConfigError(f"bad value {self.n_splits} for 'data.folds.n_splits'",
                              fix="use 0 (no folds) or 2..100, e.g. data.folds.n_splits=5")
        if self.mode == "group" and not (self.key or self.composite_group):
            raise ConfigError("data.folds.mode=group needs data.folds.key or data.folds.composite_group",
                              where="data.folds", fix="e.g. data.folds.key=user_id or "
                                                      "data.folds.composite_group=[user_id, inventory_id]")
        if self.key and self.composite_group:
            raise ConfigError("data.folds.key and data.folds.composite_group are both set",
                              where="data.folds.composite_group",
                              fix="list every grouping column in composite_group and remove key")
        if self.composite_group and self.mode != "group":
            raise ConfigError(f"data.folds.composite_group needs data.folds.mode=group (not {self.mode})",
                              where="data.folds.composite_group", fix="set data.folds.mode=group")
        if len(set(self.composite_group)) != len(self.composite_group) or "" in self.composite_group:
            raise ConfigError(f"data.folds.composite_group {list(self.composite_group)} repeats a column or has "
                              "an empty name", where="data.folds.composite_group",
                              fix="list distinct column names, e.g. [user_id, inventory_id]")
        if self.mode == "time" and not self.time_key:
            raise ConfigError("data.folds.mode=time needs data.folds.time_key", where="data.folds",
                              fix="e.g. data.folds.time_key=event_time")
        if self.time_key and self.mode != "time":
            raise ConfigError(f"data.folds.time_key needs data.folds.mode=time (not {self.mode})",
                              where="data.folds.time_key", fix="set data.folds.mode=time")

    def key_columns(self) -> tuple[str, ...]:
        """The input columns fold assignment reads (besides labels)."""
        if self.n_splits == 0:
            return ()
        if self.mode == "group":
            return self.composite_group or (self.key,)
        return (self.time_key,) if self.mode == "time" else ()


@dataclass(frozen=True)
class DataConfig:
    format: Literal["criteo", "parquet", "csv"] = "criteo"  # raw input kind
    separator: str = "\t"                # criteo text (CSV: data.csv.separator)
    labels: tuple[str, ...] = ("label",)  # 0/1 label columns, e.g. [clicked, converted]; [] with derived_labels
    # csv: labels computed from a column (appended after `labels`), e.g. income from income, married from
    # marital-status; their source columns are excluded from the features
    derived_labels: tuple[DerivedLabelConfig, ...] = ()
    csv: CsvConfig = field(default_factory=CsvConfig)
    id_column: str = ""                  # parquet/csv: a column kept for submissions; criteo: row position
    # criteo/csv without id_column: id = id_offset + 0-based row position (Kaggle test: 60000000)
    id_offset: int = 0
    hash_bins: int = 1_000_000           # id space per categorical/token field (ids 1..bins-1, 0 = missing)
    hash_seed: int = 0                   # xxh64 seed; each field hashes with its own seed derived from it
    numeric: NumericConfig = field(default_factory=lambda: NumericConfig(columns=CRITEO_INT))
    categorical: CategoricalConfig = field(default_factory=lambda: CategoricalConfig(columns=CRITEO_CAT))
    multihot: tuple[TokenColumnConfig, ...] = ()
    sequence: tuple[TokenColumnConfig, ...] = ()
    covisit: tuple[CovisitConfig, ...] = ()
    split: SplitConfig = field(default_factory=SplitConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    shard_rows: int = 1_000_000          # rows per shard on disk
    chunk_rows: int = 100_000            # most rows parsed per chunk (bounds memory; never changes the output):
    #                                      at 100k a wide chunk's arrays stay under glibc's 32 MB mmap threshold;
    #                                      Parquet chunks end at row-group boundaries where they fit
    bad_rows: Literal["error", "skip"] = "error"  # skip: drop malformed rows, count them in the manifest

    @staticmethod
    def keeps_field_defaults(given: Mapping[str, Any]) -> bool:
        """A partly given numeric/categorical section keeps the Criteo columns only for Criteo text (config.py
        `_onto_field_default`): Parquet and CSV name their own columns."""
        return given.get("format", "criteo") == "criteo"

    def __post_init__(self) -> None:
        if not 2 <= self.hash_bins <= MAX_BINS:
            raise ConfigError(f"bad value {self.hash_bins} for 'data.hash_bins'",
                              fix=f"use 2 to {MAX_BINS:,}, e.g. data.hash_bins=1000000")
        if not 0 <= self.id_offset < 2**62:     # ids are int64 offset + position: past this they wrapped negative
            raise ConfigError(f"bad value {self.id_offset} for 'data.id_offset'",
                              fix="use an offset from 0 to below 2**62, e.g. data.id_offset=60000000")
        for key in ("shard_rows", "chunk_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bad value {getattr(self, key)} for 'data.{key}'",
                                  fix=f"use a positive integer, e.g. data.{key}=100000")
        for i, tc in enumerate(self.sequence):
            if tc.weighted:         # sequence models read ids in order, never weights: they would be ignored
                raise ConfigError(f"data.sequence[{i}] ({tc.column!r}) sets weighted: true, which only "
                                  "multi-hot columns support", where=f"data.sequence[{i}].weighted",
                                  fix="drop weighted from the sequence entry (and any ':weight' suffixes "
                                      "from its tokens), or list the column under data.multihot instead")
        if self.format == "criteo" and len(self.separator) != 1:
            raise ConfigError(f"bad value {self.separator!r} for 'data.separator'",
                              fix="use a single character")
        if self.derived_labels and self.format != "csv":
            raise ConfigError(f"data.derived_labels needs data.format=csv (not {self.format})",
                              where="data.derived_labels",
                              fix="store 0/1 label columns in the input and list them in data.labels")
        if self.format == "csv" and not self.csv.header and not self.csv.column_names:
            raise ConfigError("data.csv.header is false but data.csv.column_names is empty",
                              where="data.csv", fix="list the fields' names: data.csv.column_names=[a, b, c]")
        names = [*self.labels, *(d.name for d in self.derived_labels)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"label names {dup} are given twice (data.labels / data.derived_labels[].name)",
                              where="data.derived_labels", fix="give each label a distinct name")
