"""Stage 1: Parquet files -> typed RawChunks, slice by slice (never a whole file in memory).

Each file's schema is checked up front against the resolved columns, so a missing or mistyped column fails
before any row is read, naming the file, the column, what was found and what is expected.

Slices are read by polars' own Parquet reader (`scan_parquet(...).slice(...)`) with only the configured
columns: it decodes straight into polars' string views on all cores and skips pages outside the slice, where
pyarrow's `iter_batches` decodes on one thread and then needs a copy into polars' layout (the largest cost
of the whole build on sequence-heavy files; see benchmarks/RESULTS.md). A slice per chunk, rather than
`collect_batches`, keeps memory to one chunk: the streaming engine reads ahead without bound.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctrpipe.data.chunks import SHARD_REMEDIES, BadRow, RawChunk, Remedies
from ctrpipe.data.config import DataConfig, TokenColumnConfig
from ctrpipe.data.schema import ResolvedColumns, closest, missing_feature_fix, value_family
from ctrpipe.data.token_kernel import weights_all_plain
from ctrpipe.data.transforms import BadWeights, weight_error
from ctrpipe.errors import InputFormatError, SchemaError, location

BadMode = Literal["error", "skip"]
Kind = Literal["numeric", "categorical", "token", "label", "id", "key"]


def read_schema(path: Path, remedies: Remedies = SHARD_REMEDIES) -> pa.Schema:
    """The file's Arrow schema; a file that is not Parquet is an InputFormatError with a fix."""
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        fix = "check the file is Parquet (the run reads data.format=parquet)" if remedies.run_format else \
            f"check the file (for Criteo text {remedies.read_as('criteo')}; for CSV {remedies.read_as('csv')})"
        raise InputFormatError(f"not a readable Parquet file ({str(exc).splitlines()[0]})", where=str(path),
                               fix=fix) from None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number(t: pa.DataType) -> bool:
    # polars (which reads the files) takes decimals of precision up to 38 (decimal256 beyond it it refuses)
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or (pa.types.is_decimal(t) and t.precision <= 38)
            or pa.types.is_boolean(t) or pa.types.is_null(t))


def _type_ok(kind: Kind, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):     # (pandas' category dtype); an id only as text: its cast is by type
        return (kind in ("categorical", "token", "key") and _type_ok(kind, t.value_type)) or \
            (kind == "id" and _is_text(t.value_type))
    if kind in ("numeric", "label"):
        return _is_number(t) or (kind == "numeric" and _is_text(t))
    if kind == "categorical":
        return _is_text(t) or pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t)
    if kind == "token":
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return _is_text(t.value_type) or pa.types.is_integer(t.value_type)
        return _is_text(t) or pa.types.is_null(t)
    if kind == "key":                                 # split/fold keys: anything with an order or identity
        return _is_text(t) or _is_number(t) or pa.types.is_temporal(t)
    return _is_text(t) or pa.types.is_integer(t)     # id


_EXPECTED = {
    "numeric": "a number (int, float, decimal, bool) or text holding numbers",
    "label": "a 0/1 number (int, float or bool)",
    "categorical": "text, an integer or a bool (integers are hashed as their decimal text)",
    "token": "text with separated tokens ('a|b|c') or a list of strings/integers",
    "id": "text or an integer",
    "key": "a number, a timestamp/date or text",
}
_FIX = {      # (what to change in the file, what to change in the config instead: a build's option only)
    "numeric": ("cast the column to a number when writing the file", "list it under data.categorical"),
    "label": ("store labels as 0/1 integers", "fix data.labels"),
    "categorical": ("cast floats to integers or strings when writing the file", "list it under data.numeric"),
    "token": ("store tokens as one separated string or a list column", ""),
    "id": ("store the id column as text or integers", "set another data.id_column"),
    "key": ("group or order by a scalar column (not a list or struct)", ""),
}


def _kind_fix(kind: Kind, remedies: Remedies) -> str:
    in_file, in_config = _FIX[kind]
    return remedies.or_config(in_file, in_config) if in_config else in_file


def _type_fix(kind: Kind, t: pa.DataType, remedies: Remedies) -> str:
    """The fix for a mistyped column, by what it holds where the kind alone would mislead: the other kind
    is offered only where it takes the type (a timestamp is neither numeric nor categorical)."""
    if pa.types.is_decimal(t) and kind in ("numeric", "label"):
        return "cast it to float64 or a decimal of precision 38 or less when writing the file"
    if kind in ("numeric", "categorical") and pa.types.is_temporal(t):
        return ("cast it to text (e.g. '2024-01-31') or an integer when writing the file" if kind == "categorical"
                else "cast it to a number (e.g. seconds since 1970) when writing the file") + \
            "; a time column can order folds as it is (data.folds.time_key)"
    if kind == "categorical" and (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return remedies.or_config("store one value per row", "list a list column under data.multihot "
                                                             "(or data.sequence): it is a token column")
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or pa.types.is_binary_view(t):
        return "decode it to text (or hex) when writing the file"
    if kind == "token" and (pa.types.is_list_view(t) or pa.types.is_large_list_view(t)
                            or pa.types.is_fixed_size_list(t)):
        return "cast it to a plain list (pa.list_(pa.string())) or one separated string when writing the file"
    other: Kind | None = {"numeric": "categorical", "categorical": "numeric"}.get(kind)  # type: ignore[assignment]
    if other is not None and not _type_ok(other, t):
        return _FIX[kind][0]
    return _kind_fix(kind, remedies)


_FEATURES = ("numeric", "categorical", "token")


def check_schema(path: Path, schema: pa.Schema, rc: ResolvedColumns, require_labels: bool,
                 remedies: Remedies = SHARD_REMEDIES) -> bool:
    """Raise SchemaError for a missing or mistyped column; return whether the file has the label columns."""
    names = list(schema.names)
    counts = Counter(names)
    twice = sorted(c for c, n in counts.items() if n > 1)
    if twice:       # polars refuses to read such a file at all, which read as "corrupt or truncated"
        raise SchemaError(f"the file has {counts[twice[0]]} columns named {twice[0]!r}", where=str(path),
                          fix="give each column its own name when writing the file (rename or drop the copies)")
    kinds: list[tuple[str, Kind]] = [(c, "numeric") for c in rc.numeric] + \
        [(c, "categorical") for c in rc.categorical] + [(t.column, "token") for t in rc.tokens] + \
        ([(rc.id, "id")] if rc.id else []) + [(c, "key") for c in rc.keys]
    missing_labels = [c for c in rc.labels if c not in names]
    if missing_labels and (require_labels or len(missing_labels) < len(rc.labels)):
        c = missing_labels[0]
        fix = closest(c, names) + " Check data.labels" + ("" if require_labels else
                                                          " (a test file must have all labels or none)")
        if require_labels and len(missing_labels) == len(rc.labels):
            fix += f"; {remedies.unlabelled}"
        raise SchemaError(f"label column {c!r} is not in the file", where=str(path), fix=fix)
    has_labels = bool(rc.labels) and not missing_labels
    if has_labels and not require_labels and all(_all_null(path, schema, c) for c in rc.labels):
        has_labels = False  # a test file's placeholder label columns (null type, or no values): no labels
    if has_labels:
        kinds += [(c, "label") for c in rc.labels]
    for col, kind in kinds:
        if col not in names:
            fix = missing_feature_fix(col, names) if not require_labels and kind in _FEATURES else \
                f"{closest(col, names)} Check the data section of the config (all Parquet inputs need the same columns)"
            raise SchemaError(f"{kind} column {col!r} is not in the file", where=str(path), fix=fix)
        t = schema.field(col).type
        if not _type_ok(kind, t):
            raise SchemaError(f"{kind} column has type {t}, expected {_EXPECTED[kind]}",
                              where=location(path, column=col), fix=_type_fix(kind, t, remedies))
        _check_value_type(path, col, kind, t, rc)
    return has_labels


_CASTS = {"text": "pl.String", "integer": "pl.Int64", "float": "pl.Float64", "bool": "pl.Boolean"}


def _check_value_type(path: Path, col: str, kind: str, t: pa.DataType, rc: ResolvedColumns) -> None:
    """A categorical or token column stored with other values than the training data's (text "07" there,
    the integer 7 here) maps the same value to another id: predictions changed without a word."""
    want, got = rc.value_type(col), value_family(t)
    if kind not in ("categorical", "token") or want is None or got is None or got == want:
        return
    # a cast to text is no fix: the integer 7 becomes "7", not the "07" training stored, and passes this check
    cast = _CASTS.get(want) if want != "text" else None
    raise SchemaError(f"{kind} column holds {got} values ({t}) where {rc.value_types_from or 'the training data'} "
                      f"stored {want} values: a value reads as other text (7 against '07', 1.0 against 1), so "
                      "it would get another id", where=location(path, column=col),
                      fix=f"write {col!r} with {want} values, as the training data has them"
                          + (f" (polars: pl.col({col!r}).cast({cast}))" if cast else
                             " and written exactly as there (a cast of 7 to text gives '7', not '07'): read the "
                             "column as text where the file is made (pandas: dtype=str)" if want == "text" else ""))


def _all_null(path: Path, schema: pa.Schema, column: str) -> bool:
    """Whether a column holds no value: its type is null, or the footer's statistics count only nulls."""
    if pa.types.is_null(schema.field(column).type):
        return True
    try:
        meta = pq.ParquetFile(path).metadata
        j = meta.schema.names.index(column)
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        stats = [g.column(j).statistics for g in groups]
        return all(st is not None and st.has_null_count and st.null_count == g.num_rows
                   for st, g in zip(stats, groups, strict=True))
    except (ValueError, pa.ArrowInvalid, OSError):     # no such flat column in the footer: read the values
        return False


def check_id_types(paths: list[Path], id_column: str) -> None:
    """Every Parquet input stores the ID column as integers or every one as text: the cache holds one ID array
    per shard, so files of both kinds failed in the writer, or wrote a cache that lost one kind's IDs."""
    first: tuple[Path, bool] | None = None
    for path in paths:
        schema = read_schema(path)
        if id_column not in schema.names:
            continue                    # check_schema names the missing column, with its own fix
        t = schema.field(id_column).type
        integer = pa.types.is_integer(t) or (pa.types.is_dictionary(t) and pa.types.is_integer(t.value_type))
        if first is None:
            first = (path, integer)
        elif integer != first[1]:
            kinds = ("integers", "text") if first[1] else ("text", "integers")
            raise SchemaError(f"the ID column holds {kinds[1]} here and {kinds[0]} in {first[0]}",
                              where=location(path, column=id_column),
                              fix=f"store {id_column!r} with one type in every input file (cast the integer IDs "
                                  "to text, or the text IDs to integers where they all are numbers)")


class ParquetChunker:
    """Converts Arrow record batches of one file into typed RawChunks, checking values as it goes."""

    def __init__(self, path: Path, schema: pa.Schema, rc: ResolvedColumns, has_labels: bool,
                 bad_rows: BadMode, remedies: Remedies = SHARD_REMEDIES, labels_optional: bool = False) -> None:
        self.path, self.schema, self.rc = path, schema, rc
        self.has_labels, self.bad_rows, self.remedies = has_labels, bad_rows, remedies
        self.labels_optional = labels_optional

    def _token_expr(self, tc: TokenColumnConfig) -> pl.Expr:
        t = self.schema.field(tc.column).type
        col = pl.col(tc.column)
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return col.list.eval(pl.element().cast(pl.String)).list.join(tc.separator).alias(tc.column)
        return col.cast(pl.String)

    def _check_list_elements(self, frame: pl.DataFrame, tc: TokenColumnConfig, row0: int) -> None:
        """List columns are joined with the separator and split again by the token kernels: an element that
        holds the separator would silently become several tokens."""
        t = self.schema.field(tc.column).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return
        if not _is_text(t.value_type):
            # an integer's text holds only digits and '-': other separators cannot occur in it
            if not (pa.types.is_integer(t.value_type) and tc.separator in "-0123456789"):
                return
            holds = frame[tc.column].list.eval(pl.element().cast(pl.String).str.contains(
                tc.separator, literal=True)).list.any()
        else:
            holds = frame[tc.column].list.eval(pl.element().str.contains(tc.separator, literal=True)).list.any()
        holds = holds.fill_null(False).to_numpy()
        if holds.any():
            i = int(np.argmax(holds))
            raise SchemaError(f"a list element holds the separator {tc.separator!r}, so it would be split into "
                              f"several tokens: {frame[tc.column][i].to_list()[:5]!r}",
                              where=location(self.path, row=row0 + i, column=tc.column),
                              fix=f"set the separator of {tc.column!r} (data.sequence / data.multihot) to a "
                                  "character that no element contains")

    def chunk(self, batch: pa.RecordBatch | pl.DataFrame, row0: int, file_bytes: int) -> RawChunk:
        """Type and check one slice of the file (an Arrow batch, or a frame polars read) starting at row0."""
        if isinstance(batch, pl.DataFrame):
            frame, nbytes = batch, int(batch.estimated_size())
        else:
            converted = pl.from_arrow(batch, rechunk=False)
            assert isinstance(converted, pl.DataFrame)
            frame, nbytes = converted, int(batch.nbytes)
        keep = np.ones(frame.height, dtype=bool)
        bad: list[BadRow] = []
        for c in self.rc.numeric:
            if _is_text(self.schema.field(c).type):
                s = frame[c].str.strip_chars()
                wrong = (s.str.len_bytes() > 0) & s.cast(pl.Float64, strict=False).is_null()
                self._flag(wrong.fill_null(False).to_numpy(), keep, bad, row0, c, "not a number",
                           lambda i, c=c: SchemaError(
                               f"numeric column stored as text holds {frame[c][i]!r}, not a number",
                               where=location(self.path, row=row0 + i, column=c),
                               fix=_kind_fix("numeric", self.remedies)))
        if self.has_labels:
            for c in self.rc.labels:
                y = frame[c].cast(pl.Float64)
                yv = y.to_numpy()                   # null reads as NaN, which is wrong too; numpy: no lazy query
                wrong = (yv != 0.0) & (yv != 1.0)
                self._flag(wrong, keep, bad, row0, c, "bad label",
                           lambda i, c=c: InputFormatError(
                               "the label is missing" if frame[c][i] is None else
                               f"label {frame[c][i]!r} is not 0 or 1", where=location(self.path, row=row0 + i,
                                                                                       column=c),
                               fix=self.remedies.bad_label(self.labels_optional)))
        if self.rc.id and self.schema.field(self.rc.id).type == pa.uint64():
            big = (frame[self.rc.id] > np.iinfo(np.int64).max).fill_null(False).to_numpy()
            if big.any():   # the cache stores integer ids as int64
                i = int(np.argmax(big))
                raise SchemaError(f"the ID {frame[self.rc.id][i]} is larger than an int64 holds (uint64 column)",
                                  where=location(self.path, row=row0 + i, column=self.rc.id),
                                  fix=f"store {self.rc.id!r} as text (or as int64) when writing the files")
        if self.rc.id:      # a submission row needs an ID: a null one would be written as an empty ID
            missing = frame[self.rc.id].is_null()
            if missing.any():
                self._flag(missing.to_numpy(), keep, bad, row0, self.rc.id, "missing ID",
                           lambda i: InputFormatError(
                               "the ID is missing (null)", where=location(self.path, row=row0 + i,
                                                                          column=self.rc.id),
                               fix=self.remedies.or_skip("give every row an ID")))
        for tc in self.rc.tokens:
            self._check_list_elements(frame, tc, row0)
        frame = frame.with_columns([self._token_expr(tc) for tc in self.rc.tokens])
        for tc in self.rc.multihot:
            if tc.weighted:
                self._check_weights(frame, tc, keep, bad, row0)
        exprs = [pl.col(c).cast(pl.Float32) for c in self.rc.labels] if self.has_labels else []
        if self.rc.id:
            t = self.schema.field(self.rc.id).type
            exprs.append(pl.col(self.rc.id).cast(pl.Int64 if pa.types.is_integer(t) else pl.String))
        # text numbers were checked above, so a non-strict cast only turns blanks into null (missing)
        exprs += [pl.col(c).str.strip_chars().cast(pl.Float64, strict=False)
                  if _is_text(self.schema.field(c).type) else pl.col(c).cast(pl.Float64)
                  for c in self.rc.numeric]
        exprs += [pl.col(c).cast(pl.String) for c in self.rc.categorical]
        exprs += [pl.col(tc.column) for tc in self.rc.tokens]
        exprs += [pl.col(c) for c in self.rc.keys]           # split/fold keys, as stored
        lines = None
        if not keep.all():
            frame = frame.filter(pl.Series(keep))
            lines = (row0 + np.flatnonzero(keep)).astype(np.int64)
        out = frame.select(exprs)
        first = int(lines[0]) if lines is not None and len(lines) else row0
        return RawChunk(frame=out, source=self.path, first_line=first, nbytes=nbytes, bad_rows=bad,
                        has_labels=self.has_labels, line_numbers=lines, file_bytes=file_bytes)

    def _flag(self, wrong: np.ndarray, keep: np.ndarray, bad: list[BadRow], row0: int, col: str, reason: str,
              error: Callable[[int], Exception]) -> None:
        rows = np.flatnonzero(wrong & keep)
        if len(rows) == 0:
            return
        if self.bad_rows == "error":
            raise error(int(rows[0]))
        bad.extend(BadRow(str(self.path), None, row0 + int(i), col, reason) for i in rows)
        keep[rows] = False

    def _check_weights(self, frame: pl.DataFrame, tc: TokenColumnConfig, keep: np.ndarray, bad: list[BadRow],
                       row0: int) -> None:
        s = frame[tc.column]
        if weights_all_plain(s, tc.separator):
            return       # every weight is a plain decimal: nothing to flag, and no polars split needed
        found = BadWeights(s, tc.separator)
        rows = found.rows[keep[found.rows]]         # rows an earlier check flagged are not named again
        if not len(rows):
            return
        if self.bad_rows == "error":
            i = int(rows[0])
            raise weight_error(tc.column, str(s[i]), found.reason(i),
                               where=location(self.path, row=row0 + i, column=tc.column))
        bad.extend(BadRow(str(self.path), None, row0 + int(i), tc.column, "bad weight") for i in rows)
        keep[rows] = False


def iter_parquet_chunks(cfg: DataConfig, path: Path, chunk_rows: int, rc: ResolvedColumns,
                        bad_rows: BadMode = "error", require_labels: bool = True,
                        remedies: Remedies = SHARD_REMEDIES) -> Iterator[RawChunk]:
    """RawChunks of one Parquet file, at most chunk_rows rows each, reading only the configured columns."""
    del cfg   # the resolved columns carry everything Parquet needs
    schema = read_schema(path, remedies)
    has_labels = check_schema(path, schema, rc, require_labels, remedies)
    cols = [c for c in rc.raw_columns() if c in schema.names]
    chunker = ParquetChunker(path, schema, rc, has_labels, bad_rows, remedies, labels_optional=not require_labels)
    try:
        meta = pq.ParquetFile(path).metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except (pa.ArrowInvalid, OSError) as exc:
        raise _unreadable(path, 0, exc) from None
    total_rows = sum(groups)
    size = path.stat().st_size
    # the path is one file, taken literally: no glob ('[' in a name) and no hive columns from its folders
    scan = pl.scan_parquet(path, glob=False, hive_partitioning=False).select(cols)
    for row0, n in row_group_slices(groups, chunk_rows):
        try:
            frame = scan.slice(row0, n).collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise _unreadable(path, row0, exc) from None
        if cols and frame.height != n:      # the footer promised rows the pages do not hold
            raise _unreadable(path, row0, ValueError(f"{frame.height:,} rows where the footer lists {n:,}"))
        yield chunker.chunk(frame, row0, size * n // max(total_rows, 1))


def row_group_slices(groups: list[int], chunk_rows: int) -> Iterator[tuple[int, int]]:
    """(first row, rows) of each chunk: whole row groups, as many as fit in chunk_rows, and a row group larger
    than that in equal parts. polars decodes a slice page by page, so a slice that ends inside a row group
    has the page it ends in decompressed again by the next slice; the cache does not depend on where chunks
    end."""
    row0, pending = 0, 0
    for rows in groups:
        if pending and pending + rows > chunk_rows:
            yield row0, pending
            row0, pending = row0 + pending, 0
        if rows > chunk_rows:
            parts = -(-rows // chunk_rows)
            for k in range(parts):
                lo, hi = rows * k // parts, rows * (k + 1) // parts
                yield row0 + lo, hi - lo
            row0 += rows
        else:
            pending += rows
    if pending:
        yield row0, pending


def _unreadable(path: Path, row0: int, exc: BaseException) -> InputFormatError:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return InputFormatError(f"cannot read the file after row {row0:,}: {reason}",
                            where=str(path),
                            fix="the file is corrupt or truncated; re-create or re-copy it")
