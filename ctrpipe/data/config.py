"""`data:` section: how raw columns become shard columns (kinds, hashing, transforms, splits, folds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctrpipe.errors import ConfigError

CRITEO_INT = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT = tuple(f"C{i}" for i in range(1, 27))


@dataclass(frozen=True)
class NumericConfig:
    """Numeric columns by explicit list and/or a regex `pattern` (matched against Parquet column names)."""

    columns: tuple[str, ...] = ()        # explicit column names
    pattern: str = ""                    # regex over Parquet column names, e.g. "^feat_"
    impute: Literal["zero", "mean", "median"] = "zero"  # fill for missing values (train-split statistics)
    missing_indicator: bool = False      # add a 0/1 '<col>_missing' column per numeric column
    # signed: sign(x) * log1p(|x|) keeps negatives ordered; clip: log1p(max(x, 0)); none: raw value
    log1p: Literal["signed", "clip", "none"] = "signed"  # signed: sign(x)*log1p(|x|)
    standardize: bool = False            # (x - mean) / std after log1p, statistics from the train split


@dataclass(frozen=True)
class CategoricalConfig:
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
            if b < 2:
                raise ConfigError(f"bad value {b} for 'data.categorical.bins.{name}'",
                                  fix=f"use at least 2, e.g. data.categorical.bins.{name}=100000")


@dataclass(frozen=True)
class TokenColumnConfig:
    """A multi-hot (`a|b|c`, optionally `a:0.5|b:0.2`) or sequence (ordered, most recent last) column."""

    column: str = ""
    separator: str = "|"
    max_len: int = 16                    # sequences keep the most recent max_len tokens
    bins: int = 0                        # 0 -> data.hash_bins
    weighted: bool = False               # multihot only: tokens carry ':weight'

    def __post_init__(self) -> None:
        if not self.column:
            raise ConfigError("a token column needs 'column'", fix="e.g. {column: history, separator: ','}")
        if self.max_len < 1:
            raise ConfigError(f"bad max_len {self.max_len} for token column {self.column!r}",
                              fix="use a positive integer such as max_len: 50")


@dataclass(frozen=True)
class CovisitConfig:
    """Co-occurrence between a `target` categorical field and the row's tokens in `context` (a sequence,
    multihot or categorical column), counted on the train split only, aggregated to max and mean features."""

    target: str = ""
    context: str = ""
    name: str = ""                       # output prefix; default '<target>_x_<context>'
    smoothing: float = 1.0               # normalised count = n(t, c) / (n(c) + smoothing)
    # train rows were counted themselves: score them without their own occurrence, so train and val/test
    # rows see the same feature distribution (otherwise a unique pair scores 1/(1+s) on train, 0 on val)
    leave_one_out: bool = True

    def __post_init__(self) -> None:
        if self.smoothing < 0:
            raise ConfigError(f"bad value {self.smoothing} for 'data.covisit[].smoothing'",
                              fix="use a non-negative number such as smoothing: 1.0")


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
    n_splits: int = 0                    # 0: no folds stored
    mode: Literal["plain", "stratified", "group"] = "plain"
    key: str = ""                        # group mode
    label: str = ""                      # stratified mode: which label (default: the first)
    seed: int = 2026

    def __post_init__(self) -> None:
        if self.n_splits == 1 or self.n_splits < 0 or self.n_splits > 100:
            raise ConfigError(f"bad value {self.n_splits} for 'data.folds.n_splits'",
                              fix="use 0 (no folds) or 2..100, e.g. data.folds.n_splits=5")
        if self.mode == "group" and not self.key:
            raise ConfigError("data.folds.mode=group needs data.folds.key", fix="e.g. data.folds.key=user_id")


@dataclass(frozen=True)
class DataConfig:
    format: Literal["criteo", "parquet"] = "criteo"  # raw input kind
    separator: str = "\t"                # criteo text
    labels: tuple[str, ...] = ("label",)  # one or more label columns, e.g. [clicked, converted]
    id_column: str = ""                  # parquet: a column kept for submissions; criteo: row position
    id_offset: int = 0                   # criteo: id = id_offset + row position (Kaggle test: 60000000)
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
    chunk_rows: int = 500_000            # rows parsed per chunk (bounds memory; never changes the output)
    bad_rows: Literal["error", "skip"] = "error"  # skip: drop malformed rows, count them in the manifest

    def __post_init__(self) -> None:
        if self.hash_bins < 2:
            raise ConfigError(f"bad value {self.hash_bins} for 'data.hash_bins'",
                              fix="use at least 2, e.g. data.hash_bins=1000000")
        for key in ("shard_rows", "chunk_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bad value {getattr(self, key)} for 'data.{key}'",
                                  fix=f"use a positive integer, e.g. data.{key}=500000")
        if self.format == "criteo" and len(self.separator) != 1:
            raise ConfigError(f"bad value {self.separator!r} for 'data.separator'",
                              fix="use a single character")
