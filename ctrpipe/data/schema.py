"""Stage 1: which raw input columns the config uses, by kind, in a fixed order (the manifest's column order).

Criteo text has a fixed layout (label, I1..I13, C1..C26); Parquet and CSV columns come from the first file's
schema (CSV: its header or data.csv.column_names), selected by explicit names and/or a regex per kind.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig, DerivedLabelConfig, TokenColumnConfig
from ctrpipe.errors import ConfigError, SchemaError

CRITEO_LABEL = "label"
CRITEO_COLUMNS: tuple[str, ...] = (CRITEO_LABEL, *CRITEO_INT, *CRITEO_CAT)

SchemaLike = pa.Schema | pl.Schema | Mapping[str, object] | None


@dataclass(frozen=True)
class ResolvedColumns:
    """Raw input columns by kind. Numeric and categorical: explicit names first (config order), then regex
    matches in file order. Token columns keep their config objects (separator, max_len, ...). `labels` names
    every label in storage order: the 0/1 label columns, then the derived labels (CSV), whose values a reader
    computes from their source columns."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    multihot: tuple[TokenColumnConfig, ...]
    sequence: tuple[TokenColumnConfig, ...]
    labels: tuple[str, ...]
    id: str | None
    derived: tuple[DerivedLabelConfig, ...] = ()
    # split/fold key columns that are not features (e.g. a time column for time folds): read as they are
    # stored (Parquet) or as text (CSV), never transformed
    keys: tuple[str, ...] = ()
    # (column, `value_family`) of the Parquet categorical and token columns, as the training data stored them:
    # their values become ids through their text, so every file must store them alike; and where they came
    # from, for messages
    value_types: tuple[tuple[str, str], ...] = ()
    value_types_from: str = ""

    def value_type(self, column: str) -> str | None:
        return next((f for c, f in self.value_types if c == column), None)

    @property
    def tokens(self) -> tuple[TokenColumnConfig, ...]:
        return self.multihot + self.sequence

    @property
    def label_columns(self) -> tuple[str, ...]:
        """Input columns the labels come from: the 0/1 label columns, then derived labels' sources."""
        derived = {d.name for d in self.derived}
        return tuple(dict.fromkeys([*(c for c in self.labels if c not in derived),
                                    *(d.column for d in self.derived)]))

    def raw_columns(self, labels: bool = True) -> list[str]:
        """Every input column to read, each once: labels (or their sources), id, numeric, categorical, tokens.
        Without `labels`, the label columns that are nothing else (a derived label's source may be a feature)."""
        names = [*(self.label_columns if labels else ()), *([self.id] if self.id else []), *self.numeric,
                 *self.categorical, *(t.column for t in self.tokens), *self.keys]
        return list(dict.fromkeys(names))


def value_family(t: pa.DataType) -> str | None:
    """How a categorical or token column's values read as the text their ids come from: "text", "integer",
    "float" or "bool" (a list's, or a dictionary's, values; another type by its name); None for a column of
    nulls, which carries no values. The integer 7 reads "7" where the text "07" was stored, and the float
    1.0 reads "1.0" where the integer 1 read "1", so the same value gets another id."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if any(getattr(pa.types, f"is_{kind}", lambda _t: False)(t)      # list views: pyarrow 16 on
           for kind in ("list", "large_list", "fixed_size_list", "list_view", "large_list_view")):
        t = t.value_type
    if pa.types.is_null(t):
        return None
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    return "bool" if pa.types.is_boolean(t) else str(t)


def _value_types(schema: SchemaLike, columns: Iterable[str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(schema, pa.Schema):
        return ()
    # a name twice has no one type (the readers refuse such a file, naming it)
    types = {f.name: f.type for f in schema if schema.names.count(f.name) == 1}
    found = ((c, value_family(types[c])) for c in columns if c in types)
    return tuple((c, f) for c, f in found if f is not None)


def _names(schema: SchemaLike) -> list[str]:
    if isinstance(schema, pa.Schema):
        return list(schema.names)
    return list(schema.keys()) if schema is not None else list(CRITEO_COLUMNS)


_SEPARATORS = (",", ";", "\t", "|")


def closest(name: str, names: list[str], fixed_separator: str | None = None) -> str:
    """' (closest: "x")' when some name is similar, else a few of the existing names; a CSV header read as one
    column that holds a separator says which (a file separated by ';' read with ','). `fixed_separator`: the
    separator a run's file to predict must use (the run fixes data.csv.separator): the file is then what to
    change."""
    if len(names) == 1 and any(sep in names[0] for sep in _SEPARATORS):
        sep = max((sep for sep in _SEPARATORS if sep in names[0]), key=names[0].count)
        said = f"the header reads as one column {names[0][:60]!r}: the file looks separated by {sep!r}"
        if fixed_separator is not None:
            return (f"{said}, and the training data was read with {fixed_separator!r} (data.csv.separator stays "
                    f"as the model was trained): write the file separated by {fixed_separator!r}.")
        return f"{said} (set data.csv.separator to {sep!r})."
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"existing columns include {names[:8]}."


def _check_exists(names: list[str], present: list[str], key: str, where: str, criteo: bool,
                  to_predict: bool = False) -> None:
    """`to_predict`: the config is right (a file to predict must match the train cache's columns), the file
    is the one to change."""
    for n in names:
        if n not in present:
            what = f"column {n!r} ({key}) is not in the input"
            if criteo:
                what = f"column {n!r} ({key}) is not a Criteo column (label, I1..I13, C1..C26)"
            # a column the config already names is no suggestion: the user did not mean x1 when naming x1, x2
            others = [p for p in present if p not in names] or present
            fix = f"{closest(n, others)} Check {key} in the config." if not to_predict else \
                missing_feature_fix(n, present)
            raise SchemaError(what, where=where, fix=fix)


def missing_feature_fix(column: str, present: list[str], separator: str | None = None) -> str:
    """The fix for a file to predict (a test file, rows to serve) that lacks a feature column: the config
    must stay as the model was trained, so the file is the one to change. `separator`: a CSV's, as the run
    reads it."""
    hint = closest(column, present, separator)
    if separator is not None and hint.startswith("the header reads as one column"):
        return hint[0].upper() + hint[1:]           # the whole header is one column: not a missing feature
    return (f"add {column!r} to the file, all null where it has no values (an empty history, a missing value): "
            f"a file to predict needs every feature column the model was trained with ({hint})")


def _pattern(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"bad regex {pattern!r} for '{key}': {exc}", where=key,
                          fix=f'use a Python regex, e.g. {key}="^feat_"') from None


def _select(explicit: tuple[str, ...], pattern: str, present: list[str], taken: set[str], key: str,
            where: str, criteo: bool, to_predict: bool = False) -> tuple[str, ...]:
    _check_exists(list(explicit), present, f"{key}.columns", where, criteo, to_predict)
    out = list(dict.fromkeys(explicit))
    if pattern:
        rx = _pattern(pattern, f"{key}.pattern")
        matched = [n for n in present if rx.search(n) and n not in taken and n not in out]
        if not matched and not any(rx.search(n) for n in out):
            raise SchemaError(f"{key}.pattern {pattern!r} matches no column", where=where,
                              fix=f"existing columns include {present[:10]}")
        out += matched
    return tuple(out)


def resolve_columns(cfg: DataConfig, schema: SchemaLike, source: Path | str | None = None,
                    require_labels: bool = False, with_keys: bool = False,
                    to_predict: bool = False, separator_fixed: bool = False) -> ResolvedColumns:
    """Resolve the config's column choices against an input schema (None: the fixed Criteo layout).

    Raises SchemaError naming the column and the closest existing name, or a column picked twice. Parquet
    and CSV label columns (and derived labels' sources) are only checked with require_labels (test files have
    none; the reader checks each file). Derived labels' sources are never features. `with_keys` (a train
    build) also reads the split and fold key columns that no other kind selects. `to_predict`: a test file
    or rows to serve, whose missing feature column is the file's to add, not the config's to change.
    `separator_fixed`: the CSV separator is another cache's (a --stats-from build), so a file written with
    another one is the file's to change.
    """
    criteo = cfg.format == "criteo"
    present = list(CRITEO_COLUMNS) if criteo else _names(schema)
    where = str(source) if source is not None else ("Criteo text layout" if criteo else "first input file")
    if separator_fixed and cfg.format == "csv" and len(present) == 1 and \
            any(sep in present[0] for sep in _SEPARATORS):
        # a --stats-from test file read with the train cache's separator, which is fixed: the fix is the
        # file's, not data.csv.separator, whatever column is looked for first
        hint = closest(present[0], present, cfg.csv.separator)
        raise SchemaError("the file's header reads as one column", where=where, fix=hint[0].upper() + hint[1:])
    derived = tuple(cfg.derived_labels)
    sources = tuple(dict.fromkeys(d.column for d in derived))
    labels = (*cfg.labels, *(d.name for d in derived))
    if criteo or require_labels:
        _check_exists(list(cfg.labels), present, "data.labels", where, criteo)
        _check_exists(list(sources), present, "data.derived_labels[].column", where, criteo)
    id_col = cfg.id_column or None
    if id_col is not None:
        if criteo:
            raise SchemaError("Criteo text has no id column; ids are data.id_offset + row position",
                              where="data.id_column", fix="remove data.id_column (use data.id_offset)")
        _check_exists([id_col], present, "data.id_column", where, criteo)
    tokens = tuple(cfg.multihot) + tuple(cfg.sequence)
    _check_exists([t.column for t in tokens], present, "data.multihot/sequence", where, criteo, to_predict)
    reserved = set(labels) | set(sources) | {id_col} | {t.column for t in tokens}
    numeric = _select(tuple(cfg.numeric.columns), cfg.numeric.pattern, present, reserved, "data.numeric",
                      where, criteo, to_predict)
    categorical = _select(tuple(cfg.categorical.columns), cfg.categorical.pattern, present,
                          reserved | set(numeric), "data.categorical", where, criteo, to_predict)
    # a derived label may share its source's name (income from income); any other overlap is an error
    _check_disjoint({"data.labels": tuple(cfg.labels),
                     "data.derived_labels": tuple(dict.fromkeys((*sources, *(d.name for d in derived)))),
                     "data.id_column": (id_col,) if id_col else (),
                     "data.numeric": numeric, "data.categorical": categorical,
                     "data.multihot/sequence": tuple(t.column for t in tokens)}, where)
    keys: tuple[str, ...] = ()
    if with_keys:
        keys = _key_columns(cfg, present, where,
                            taken={*numeric, *categorical, *(t.column for t in tokens), *([id_col] if id_col else [])},
                            labels={*labels, *sources})
    return ResolvedColumns(numeric, categorical, tuple(cfg.multihot), tuple(cfg.sequence), labels, id_col,
                           derived, keys, _value_types(schema, [*categorical, *(t.column for t in tokens)]),
                           f"the first input file {where}" if isinstance(schema, pa.Schema) else "")


def _key_columns(cfg: DataConfig, present: list[str], where: str, taken: set[str],
                 labels: set[str]) -> tuple[str, ...]:
    """Split/fold key columns to read besides the features; each must exist and must not be a label."""
    named = [("data.split.key", cfg.split.key)] if cfg.split.mode == "group" else []
    f = cfg.folds
    if f.mode == "group" and f.composite_group:
        named += [("data.folds.composite_group", c) for c in f.composite_group]
    else:
        named += [(f"data.folds.{'time_key' if f.mode == 'time' else 'key'}", c) for c in f.key_columns()]
    keys: list[str] = []
    for key, col in named:
        if col not in present:
            raise SchemaError(f"column {col!r} ({key}) is not in the input", where=f"{where}, {key}",
                              fix=f"{closest(col, present)} Check {key} in the config.")
        if col in labels:
            raise SchemaError(f"{key} = {col!r} is a label column", where=key,
                              fix="group or order folds by an input column that is not a label")
        if col not in taken and col not in keys:
            keys.append(col)
    return tuple(keys)


def _check_disjoint(kinds: dict[str, tuple[str, ...]], where: str) -> None:
    seen: dict[str, str] = {}
    for key, cols in kinds.items():
        for c in cols:
            if c in seen and key != seen[c]:
                raise SchemaError(f"column {c!r} is selected by both {seen[c]} and {key}", where=where,
                                  fix=f"give {c!r} one kind (remove it from one list or narrow the pattern)")
            seen[c] = key
