"""Serving: raw rows in memory (a polars/pyarrow table, a list of dicts, or text lines) -> one typed RawChunk,
through the same readers `ctrpipe shard` uses, so values, missing-value rules and errors are the shard build's.

* Criteo text runs: lines go through `criteo_text_chunk` (the block parser of `iter_criteo_chunks`); tables and
  dicts are first written as tab-separated lines (null -> blank field).
* Parquet runs: tables and dicts become an Arrow table, checked by `check_schema` and typed by `ParquetChunker`.
* CSV runs: the rows are written as CSV text to a temporary file and read by `iter_csv_chunks` (its record
  cutter reads files only); lines are taken as the text of a CSV file (header first when data.csv.header).

Errors name the input as "input rows" with the row (0-based table row) or line (1-based text line) and column.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from ctrpipe.data.chunks import RawChunk, Remedies
from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig
from ctrpipe.data.criteo import criteo_text_chunk
from ctrpipe.data.csv_reader import iter_csv_chunks
from ctrpipe.data.parquet import ParquetChunker, check_schema
from ctrpipe.data.schema import CRITEO_LABEL, ResolvedColumns, closest
from ctrpipe.errors import CtrpipeError, InputFormatError, SchemaError, location

SOURCE = Path("input rows")      # how errors name the rows (no file behind them)
Rows = (pl.DataFrame | pa.Table | pa.RecordBatch | Sequence[Mapping[str, Any]] | Sequence[str]
        | Sequence[bytes] | str | bytes)


def serving_remedies(data: DataConfig) -> Remedies:
    """Fixes for bad input to a trained model: it scores every row (no --bad-rows skip) in its own format."""
    return Remedies(skip_rows=False, run_format=data.format)


def rows_chunk(data: DataConfig, rc: ResolvedColumns, rows: Rows) -> RawChunk:
    """The rows as one RawChunk, as the shard build's reader for `data.format` would deliver them."""
    if isinstance(rows, (str, bytes)):
        rows = [rows]
    if isinstance(rows, pa.RecordBatch):
        rows = pa.Table.from_batches([rows])
    # a table of no rows too: a Criteo run's text of none ended in an IndexError
    if (rows.height if isinstance(rows, pl.DataFrame) else rows.num_rows if isinstance(rows, pa.Table)
            else len(rows)) == 0:
        raise InputFormatError("no rows given", where=str(SOURCE), fix="pass at least one row")
    is_text = not isinstance(rows, (pl.DataFrame, pa.Table)) and isinstance(rows[0], (str, bytes))
    if data.format == "parquet":
        if is_text:
            raise InputFormatError("text lines given to a Parquet-trained model", where=str(SOURCE),
                                   fix="pass a polars/pyarrow table or a list of dicts with the training columns")
        return _parquet_chunk(rc, _arrow(rows, rc), serving_remedies(data))
    if data.format == "criteo":
        text = _join_lines(rows) if is_text else _criteo_text(_polars(rows, rc))
        hashed = tuple(c for c in rc.categorical if c != rc.id)
        return criteo_text_chunk(data, text, SOURCE, rc.raw_columns(), hashed, serving_remedies(data))
    if is_text:
        return _csv_chunk(data, rc, _join_lines(rows), header_lines=0, table=False)
    text, header_lines = _csv_text(data, rc, _polars(rows, rc))
    return _csv_chunk(data, rc, text, header_lines, table=True)


# ------------------------------------------------------------------------------------------ tables, dicts

def _needed(rc: ResolvedColumns) -> list[str]:
    """Columns every row must carry (labels and the id are optional when serving)."""
    return [c for c in rc.raw_columns() if c not in rc.label_columns and c != rc.id]


def _check_dicts(rows: Sequence[Mapping[str, Any]], rc: ResolvedColumns) -> None:
    """A dict lacking a key is an error (a table would fill it with null: a silent default)."""
    first = rows[0] if isinstance(rows[0], Mapping) else {}
    need = _needed(rc) + [c for c in rc.label_columns if c in first]     # labels: all rows or none
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise InputFormatError(f"row is a {type(r).__name__}, expected a dict of column -> value",
                                   where=location(SOURCE, row=i), fix="pass every row as a dict")
        for c in need:
            if c not in r:
                raise SchemaError(f"column {c!r} is missing", where=location(SOURCE, row=i, column=c),
                                  fix=f"{closest(c, list(r))} Every row needs the training columns "
                                      "(None marks a missing value)")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (bool, int, float)):
        return "number"
    if isinstance(v, (list, tuple)):
        return "list"
    return type(v).__name__


def _column_type_error(rows: Sequence[Mapping[str, Any]], col: str) -> SchemaError:
    """The first row whose value has another type than the column's first value."""
    kinds = [_kind(r.get(col)) for r in rows]
    first = next((k for k in kinds if k != "null"), "null")
    i = next((j for j, k in enumerate(kinds) if k not in ("null", first)), 0)
    return SchemaError(f"value {rows[i].get(col)!r} ({kinds[i]}) in a column of {first} values",
                       where=location(SOURCE, row=i, column=col),
                       fix="give every row of a column the same type (None for missing)")


def _arrow(rows: Any, rc: ResolvedColumns) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pl.DataFrame):
        return rows.to_arrow()
    _check_dicts(rows, rc)
    cols = {}
    for c in rows[0]:
        try:
            cols[c] = pa.array([r.get(c) for r in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise _column_type_error(rows, c) from None
    return pa.table(cols)


def _polars(rows: Any, rc: ResolvedColumns) -> pl.DataFrame:
    if isinstance(rows, pl.DataFrame):
        return rows
    if isinstance(rows, pa.Table):
        out = pl.from_arrow(rows)
        assert isinstance(out, pl.DataFrame)
        return out
    _check_dicts(rows, rc)
    cols = {}
    for c in rows[0]:
        try:
            cols[c] = pl.Series(c, [r.get(c) for r in rows], strict=True)
        except (TypeError, pl.exceptions.PolarsError):
            raise _column_type_error(rows, c) from None
    return pl.DataFrame(cols)


def _parquet_chunk(rc: ResolvedColumns, table: pa.Table, remedies: Remedies) -> RawChunk:
    if table.num_rows == 0:
        raise InputFormatError("no rows given", where=str(SOURCE), fix="pass at least one row")
    if rc.id and rc.id not in table.column_names:
        rc = dataclasses.replace(rc, id=None)      # ids are for submissions; serving needs none
    # nor labels: a log whose outcomes are pending (null) or that holds other values is still scored
    rc = dataclasses.replace(rc, labels=(), derived=())
    has_labels = check_schema(SOURCE, table.schema, rc, require_labels=False, remedies=remedies)
    have = set(table.column_names)         # a pyarrow property that builds its list on every read
    table = table.select([c for c in rc.raw_columns() if c in have]).combine_chunks()
    chunker = ParquetChunker(SOURCE, table.schema, rc, has_labels, "error", remedies)
    return chunker.chunk(table.to_batches()[0], 0, 0)


# ------------------------------------------------------------------------------------------ text

def _join_lines(rows: Sequence[str | bytes]) -> bytes:
    parts = [r.encode() if isinstance(r, str) else bytes(r) for r in rows]
    return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in parts)


def _as_text(frame: pl.DataFrame, cols: list[str]) -> list[pl.Expr]:
    """Each column as its text (null stays null); a list column is refused (text formats have none)."""
    out = []
    for c in cols:
        if isinstance(frame.schema[c], (pl.List, pl.Array, pl.Struct)):
            raise SchemaError(f"column has type {frame.schema[c]}, a text format needs one value per field",
                              where=location(SOURCE, column=c), fix="join token lists into one string")
        out.append(pl.col(c).cast(pl.String))
    return out


def _criteo_text(frame: pl.DataFrame) -> bytes:
    """label (when present), I1..I13, C1..C26 as tab-separated lines; null -> blank (missing)."""
    names = ([CRITEO_LABEL] if CRITEO_LABEL in frame.columns else []) + list(CRITEO_INT) + list(CRITEO_CAT)
    for c in names:
        if c not in frame.columns:
            raise SchemaError(f"column {c!r} is missing", where=location(SOURCE, column=c),
                              fix=f"{closest(c, frame.columns)} Criteo rows need I1..I13 and C1..C26 "
                                  "(None for missing values)")
    text = frame.select(pl.concat_str([e.fill_null("") for e in _as_text(frame, names)], separator="\t"))
    return "".join(v + "\n" for v in text.to_series()).encode()


def _csv_text(data: DataConfig, rc: ResolvedColumns, frame: pl.DataFrame) -> tuple[bytes, int]:
    """The rows as the text of a CSV file of the training layout; (text, header lines)."""
    csv = data.csv
    if csv.header:
        names = list(frame.columns)
    else:
        # the file layout: data.csv.column_names, less every label source when the rows lack one of them
        # (the reader takes all label columns or none; sources of derived labels are never features)
        unlabelled = any(c not in frame.columns for c in rc.label_columns)
        names = [c for c in csv.column_names if not (unlabelled and c in rc.label_columns)]
    for c in _needed(rc) + [c for c in names if c not in frame.columns]:
        if c not in frame.columns:
            raise SchemaError(f"column {c!r} is missing", where=location(SOURCE, column=c),
                              fix=f"{closest(c, frame.columns)} Every row needs the training columns")
    q = csv.quote_char
    special = "|".join(re.escape(s) for s in ([csv.separator, "\n"] + ([q] if q else [])))
    fields = []
    for e in _as_text(frame, names):
        if q:      # quote values holding the separator, a quote or a line break, as a CSV writer does
            e = pl.when(e.str.contains(special)).then(pl.lit(q) + e.str.replace_all(q, q + q, literal=True)
                                                      + pl.lit(q)).otherwise(e)
        fields.append(e.fill_null(""))
    body = frame.select(pl.concat_str(fields, separator=csv.separator)).to_series()
    head = [csv.separator.join(names)] if csv.header else []
    return "".join(v + "\n" for v in [*head, *body]).encode(), len(head)


def _csv_chunk(data: DataConfig, rc: ResolvedColumns, text: bytes, header_lines: int, table: bool) -> RawChunk:
    """Parsed by `iter_csv_chunks` from a temporary file; its path in errors becomes "input rows" (tables:
    with the 0-based row instead of the text line)."""
    rc = dataclasses.replace(rc, id=None) if rc.id and not _has_field(data, rc.id, text) else rc
    with tempfile.TemporaryDirectory(prefix="ctrpipe-rows-") as tmp:
        path = Path(tmp) / "rows.csv"
        path.write_bytes(text)
        try:
            chunks = list(iter_csv_chunks(data, path, max(text.count(b"\n"), 1), rc, "error",
                                          require_labels=False, remedies=serving_remedies(data), read_labels=False))
        except CtrpipeError as exc:
            where = exc.where.replace(str(path), str(SOURCE))
            if table:
                where = re.sub(r"line (\d+)", lambda m: f"row {int(m.group(1)) - header_lines - 1}", where)
            raise dataclasses.replace(exc, where=where) from None
    frames = [c.frame for c in chunks]
    return dataclasses.replace(chunks[0], frame=pl.concat(frames) if len(frames) > 1 else frames[0],
                               source=SOURCE)


def _has_field(data: DataConfig, name: str, text: bytes) -> bool:
    if not data.csv.header:
        return name in data.csv.column_names
    first = text.split(b"\n", 1)[0].decode("utf-8", "replace")
    return name in first.split(data.csv.separator)
