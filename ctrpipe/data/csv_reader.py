"""Stage 1: delimited text (`data.format: csv`) -> typed RawChunks, with the file, line and column of bad input.

Records come whole from `csv_records.RecordCutter` (quote-aware, any separator); polars parses each chunk's
records as text, and the values are typed here per column: numeric (missing tokens and blanks -> null; anything
else that is not a number is a bad row), categorical and token text (missing tokens -> null), 0/1 labels, and
derived labels (a value set or a regex over a source column). A record with the wrong number of fields, or one
polars cannot parse (bad quoting, invalid UTF-8), is a bad row too: an error, or skipped and counted.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from ctrpipe.data.chunks import SHARD_REMEDIES, BadRow, RawChunk, Remedies
from ctrpipe.data.config import CsvConfig, DataConfig, DerivedLabelConfig
from ctrpipe.data.criteo import polars_input
from ctrpipe.data.csv_records import SEP_BYTE, RecordCutter, Records
from ctrpipe.data.schema import ResolvedColumns, closest, missing_feature_fix
from ctrpipe.data.transforms import BadWeights, weight_error
from ctrpipe.errors import InputFormatError, SchemaError, location
from ctrpipe.prefetch import prefetch

BadMode = Literal["error", "skip"]
_PARSE_ERRORS = (pl.exceptions.PolarsError, ValueError)


def _shown_sep(sep: str) -> str:
    return {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space"}.get(sep, repr(sep))


# ------------------------------------------------------------------------------------------ column names

def _parse_record(rec: Records, i: int, cfg: DataConfig, n: int) -> list[str | None]:
    """One record's fields as text (the header row)."""
    data = rec.gather(np.array([i]))
    frame = pl.read_csv(polars_input(data), has_header=False, separator=_polars_sep(cfg),
                        quote_char=cfg.csv.quote_char or None,
                        schema={f"column_{j + 1}": pl.String for j in range(n)})
    return list(_restore_text(frame, rec, cfg.csv).row(0))


def _restore_text(frame: pl.DataFrame, rec: Records, csv: CsvConfig) -> pl.DataFrame:
    """Put back what the cutter stood in for in the text polars parsed: a multi-byte separator (SEP_BYTE,
    which only a quoted field keeps as text) and quotes inside unquoted fields (`Records.stand_in`)."""
    swaps = [(rec.stand_in, rec.text_quote)] if rec.text_quote else []
    if len(csv.separator.encode()) > 1 and csv.quote_char and csv.quote_char.encode() in rec.data:
        swaps.append((chr(SEP_BYTE), csv.separator))
    for stand_in, text in swaps:
        frame = frame.with_columns(pl.col(pl.String).str.replace_all(stand_in, text, literal=True))
    return frame


def _polars_sep(cfg: DataConfig) -> str:
    return cfg.csv.separator if len(cfg.csv.separator.encode()) == 1 else chr(SEP_BYTE)


def _header(path: Path, cfg: DataConfig, rec: Records, remedies: Remedies = SHARD_REMEDIES) -> list[str]:
    """The column names in the first record of `rec`: non-empty and distinct."""
    try:
        names = _parse_record(rec, 0, cfg, int(rec.fields[0]))
    except _PARSE_ERRORS as exc:
        reason = str(exc).splitlines()[0]
        fix = remedies.or_config("check the quoting of the header", "set data.csv.header=false and "
                                                                    "data.csv.column_names")
        if "utf-8" in reason.lower() or "utf8" in reason.lower():
            with open(path, "rb") as fh:        # a byte-order mark names UTF-16 (Windows tools write it so)
                encoding = "utf-16" if fh.read(2) in (b"\xff\xfe", b"\xfe\xff") else "latin1"
            fix = (f"the file is not UTF-8 text, which CSV inputs must be: convert it, e.g. "
                   f"`iconv -f {encoding} -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}`"
                   + (" (or from its own encoding)" if encoding == "latin1" else ""))
        raise InputFormatError(f"cannot parse the header row: {reason}", where=location(path, int(rec.lines[0])),
                               fix=fix) from None
    empty = [j + 1 for j, v in enumerate(names) if not v]
    dup = sorted({v for v in names if v and names.count(v) > 1})
    if empty or dup:
        what = f"field {empty[0]} of the header is empty" if empty else f"the header repeats {dup}"
        raise SchemaError(what, where=location(path, int(rec.lines[0])),
                          fix=remedies.or_config("give every column a distinct name in the file",
                                                 "set data.csv.header=false and list the names in "
                                                 "data.csv.column_names"))
    return [str(v) for v in names]


def read_header(cfg: DataConfig, path: Path, remedies: Remedies = SHARD_REMEDIES) -> list[str]:
    """Field names of a CSV file: its header row (the first record after comment and blank lines), or
    data.csv.column_names when the files have no header."""
    if not cfg.csv.header:
        return list(cfg.csv.column_names)
    for rec in RecordCutter(path, cfg.csv, 64, remedies=remedies):
        return _header(path, cfg, rec, remedies)
    raise InputFormatError("the file holds no header row (only blank or comment lines)", where=str(path),
                           fix=remedies.or_config("check the file", "set data.csv.header=false and "
                                                                    "data.csv.column_names"))


def _unlabelled_layouts(names: list[str], label_cols: list[str]) -> list[list[str]]:
    """Field lists an unlabelled file may have: names less 1, 2, ... of the label columns that end them (the
    last first), or that lead them (the first first), or less every label column."""
    out: list[list[str]] = []
    hi = len(names)
    while hi > 0 and names[hi - 1] in label_cols:
        hi -= 1
        out.append(names[:hi])
    lo = 0
    while lo < len(names) and names[lo] in label_cols:
        lo += 1
        out.append(names[lo:])
    out.append([c for c in names if c not in label_cols])
    return [o for o in out if len(o) < len(names)]


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]        # the file's fields in order
    has_labels: bool


def _layout(path: Path, cfg: DataConfig, rc: ResolvedColumns, names: list[str], rec: Records,
            require_labels: bool, remedies: Remedies, read_labels: bool = True) -> _Layout:
    """Which fields the file has: with a header, its names; without, data.csv.column_names, or those names
    less label columns when most records of the first chunk have that many fields (an unlabelled test file,
    as Criteo's 39-field layout). A label's source may also be an ordinary column (Adult's `married` comes
    from marital-status), which an unlabelled file keeps while the label field (income, the last) is cut:
    so the label columns ending or leading the names are tried one by one (`_unlabelled_layouts`).
    Without `read_labels` (serving: no use for them) the labels a file has are neither typed nor checked."""
    label_cols = list(rc.label_columns)
    unlabelled = False
    if not cfg.csv.header and label_cols:
        best = int((rec.fields == len(names)).sum())
        for short in _unlabelled_layouts(names, label_cols):
            if (n := int((rec.fields == len(short)).sum())) > best:
                names, best, unlabelled = short, n, True
    missing = [c for c in label_cols if c not in names]
    if unlabelled and not require_labels:
        missing = label_cols                # no labels are read from it, even those whose source it kept
    if not read_labels:
        missing = label_cols
    elif missing and (require_labels or len(missing) < len(label_cols)):
        if not cfg.csv.header:
            raise InputFormatError(
                f"most rows have {len(names)} fields: data.csv.column_names without the label columns "
                f"{label_cols}: a test file?", where=str(path), fix=remedies.unlabelled)
        fix = closest(missing[0], names) + " Check data.labels / data.derived_labels"
        if require_labels and len(missing) == len(label_cols):
            fix += f"; {remedies.unlabelled}"
        else:
            fix += " (a test file must have all label columns or none)"
        raise SchemaError(f"label column {missing[0]!r} is not in the header", where=str(path), fix=fix)
    features = {*rc.numeric, *rc.categorical, *(t.column for t in rc.tokens)}
    for c in rc.raw_columns(labels=False):
        if c not in names:
            # the run fixes the separator when it predicts (not in a test build, whose config may still change)
            fixed = cfg.csv.separator if remedies.run_format else None
            fix = missing_feature_fix(c, names, fixed) if not require_labels and c in features else \
                f"{closest(c, names)} All CSV inputs need the columns the config uses"
            raise SchemaError(f"column {c!r} is not in the header", where=str(path), fix=fix)
    return _Layout(tuple(names), bool(label_cols) and not missing)


# ------------------------------------------------------------------------------------------ chunks

class CsvChunker:
    """Parses the Records of one file into typed RawChunks, dropping or raising on bad rows."""

    def __init__(self, path: Path, cfg: DataConfig, rc: ResolvedColumns, layout: _Layout,
                 bad_rows: BadMode, remedies: Remedies = SHARD_REMEDIES, labels_optional: bool = False) -> None:
        self.path, self.cfg, self.rc, self.layout, self.bad_rows = path, cfg, rc, layout, bad_rows
        self.remedies, self.labels_optional = remedies, labels_optional
        self.missing = list(cfg.csv.missing)
        wanted = set(rc.raw_columns(labels=layout.has_labels))
        self.read_idx = [j for j, c in enumerate(layout.names) if c in wanted]
        self.schema = {c: pl.String for c in layout.names}

    def chunk(self, rec: Records, position0: int) -> RawChunk:
        """`position0`: 0-based data-row position of rec's first record in the file (ids count bad rows)."""
        n = len(rec)
        flags = _Flags(self.bad_rows, rec, self.path)
        wrong = rec.fields != len(self.layout.names)
        flags.flag(np.flatnonzero(wrong), None, "field count", self._field_error)
        frame, parsed = self._parse(rec, np.flatnonzero(flags.keep), flags)
        frame = _restore_text(frame, rec, self.cfg.csv)
        frame = self._typed(frame, parsed, flags)
        keep = flags.keep[parsed]
        if not keep.all():
            frame, parsed = frame.filter(pl.Series(keep)), parsed[keep]
        flags.raise_first()
        lines = rec.lines[parsed]
        first = int(lines[0]) if len(lines) else int(rec.lines[0])
        nbytes = int((rec.ends - rec.starts + 1).sum())
        return RawChunk(frame=frame, source=self.path, first_line=first, nbytes=nbytes, bad_rows=flags.bad,
                        has_labels=self.layout.has_labels, line_numbers=lines,
                        file_bytes=rec.file_bytes, positions=position0 + parsed.astype(np.int64),
                        records_end=position0 + n)

    # -- structure
    def _field_error(self, rec: Records, i: int) -> InputFormatError:
        names, n = self.layout.names, int(rec.fields[i])
        sep = self.cfg.csv.separator
        what = f"{n} {_shown_sep(sep)}-separated fields, expected {len(names)} ({', '.join(names[:4])}" + \
            (", ...)" if len(names) > 4 else ")")
        r = self.remedies
        fix = r.or_skip(f"check data.csv.separator ({sep!r}) and the column names" if not r.run_format else
                        f"the run reads {_shown_sep(sep)}-separated fields {', '.join(names[:4])}"
                        + (", ..." if len(names) > 4 else "") + ": check the line")
        if rec.spans[i] > 1:
            what += (f"; the row runs over {int(rec.spans[i])} lines because a quoted field holds line breaks "
                     f"(an unbalanced {self.cfg.csv.quote_char!r}?)")
            fix = r.or_skip(r.or_config("close the quote", "set data.csv.quote_char=\"\" if quote characters are "
                                                           "plain text in this file"))
        elif rec.open_quote and i == len(rec) - 1:
            what += f"; a {self.cfg.csv.quote_char!r} opened in this row never closes"
        text = rec.text(i, sep)
        if n == 1 and text.strip() == "":        # spaces or tabs alone: no separator or column name is wrong
            return InputFormatError("the line holds only spaces or tabs", where=location(self.path, int(rec.lines[i])),
                                    fix=r.or_skip("remove the line (an empty line is skipped; one with spaces is a "
                                                  "row)"))
        for other in (", ", ",", "\t", ";", "|"):
            if other != sep and text.count(other) + 1 == len(names):
                fix = f"the line has {len(names)} fields separated by {other!r}: " + (
                    f"set data.csv.separator={other!r}" if not r.run_format else
                    f"the run reads fields separated by {sep!r}; write the file with that separator")
                break
        return InputFormatError(what, where=location(self.path, int(rec.lines[i])), fix=fix)

    def _parse(self, rec: Records, idx: np.ndarray, flags: _Flags) -> tuple[pl.DataFrame, np.ndarray]:
        """The records idx as text columns, and the records parsed; those polars rejects (bad quoting,
        invalid UTF-8) are found by halving the failing range, so a clean chunk costs one parse."""
        try:
            frame = self._read(rec.gather(idx))
            if frame.height == len(idx):
                return frame, idx
            reason = f"{frame.height} rows parsed from {len(idx)} records"
        except _PARSE_ERRORS as exc:
            reason = str(exc).splitlines()[0]
        if len(idx) == 1:
            flags.flag(idx, None, "unparsable", lambda r, i: InputFormatError(
                f"cannot parse this row: {reason}", where=location(self.path, int(r.lines[i])),
                fix=self.remedies.or_skip(self.remedies.or_config(
                    "check its quoting (text after a closing quote?) and encoding (UTF-8)",
                    "set data.csv.quote_char=\"\" if quote characters are plain text"))))
            return self._read(b""), idx[:0]
        half = len(idx) // 2
        a, ia = self._parse(rec, idx[:half], flags)
        b, ib = self._parse(rec, idx[half:], flags)
        return pl.concat([a, b]), np.concatenate([ia, ib])

    def _read(self, data: bytes) -> pl.DataFrame:
        names = self.layout.names
        return pl.read_csv(polars_input(data), has_header=False, separator=_polars_sep(self.cfg),
                           quote_char=self.cfg.csv.quote_char or None, schema=self.schema,
                           columns=self.read_idx).select([names[j] for j in self.read_idx])

    # -- values
    def _is_missing(self, col: str) -> pl.Expr:
        e = pl.col(col)
        missing = e.is_null() | (e.str.len_bytes() == 0)
        return missing | e.is_in(self.missing) if self.missing else missing

    def _typed(self, frame: pl.DataFrame, parsed: np.ndarray, flags: _Flags) -> pl.DataFrame:
        """Check and type every column (frame rows are the records `parsed`): labels in storage order as
        Float32, then the id (text), numeric (Float64), categorical and token columns (text, null = missing)."""
        rc = self.rc
        derived = {d.name: d for d in rc.derived}
        labels = rc.labels if self.layout.has_labels else ()
        checks: dict[str, tuple[str, str, pl.Expr]] = {}
        for c in rc.numeric:
            t = pl.col(c).str.strip_chars()
            checks[f"num:{c}"] = ("num", c, ~self._is_missing(c) & (t.str.len_bytes() > 0)
                                  & t.cast(pl.Float64, strict=False).is_null())
        for lab in labels:
            if lab in derived:
                d = derived[lab]
                # with a negative list, a value in neither list is a bad row; without, anything else is 0
                ok = (self._positive(d) | pl.col(d.column).is_in(list(d.negative))) if d.negative else pl.lit(True)
                checks[f"der:{lab}"] = ("der", lab, self._is_missing(d.column) | ~ok.fill_null(False))
            else:
                y = pl.col(lab).str.strip_chars().cast(pl.Float64, strict=False)
                checks[f"lab:{lab}"] = ("lab", lab, ~y.is_in([0.0, 1.0]).fill_null(False))
        if rc.id:       # a submission row needs an ID: an empty one would be written as "" (blend refuses it)
            checks["id"] = ("id", rc.id, self._is_missing(rc.id))
        if checks:
            bad = frame.select([e.alias(k) for k, (_, _, e) in checks.items()])
            reasons = {"num": "not a number", "id": "missing ID"}
            for key, (kind, col, _) in checks.items():
                rows = np.flatnonzero(bad[key].fill_null(False).to_numpy())
                flags.flag(parsed[rows], col if kind != "der" else derived[col].column,
                           reasons.get(kind, "bad label"), self._value_error(frame, parsed, kind, col))
        for tc in rc.multihot:
            if tc.weighted:
                self._check_weights(frame, parsed, tc.column, tc.separator, flags)
        exprs = [self._positive(derived[lab]).cast(pl.Float32).alias(lab) if lab in derived
                 else pl.col(lab).str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Float32)
                 for lab in labels]
        if rc.id:
            exprs.append(pl.col(rc.id))
        # every numeric value was checked above, so a non-strict cast only turns missing values into null
        exprs += [pl.when(self._is_missing(c)).then(None).otherwise(pl.col(c).str.strip_chars())
                  .cast(pl.Float64, strict=False).alias(c) for c in rc.numeric]
        exprs += [pl.when(self._is_missing(c)).then(None).otherwise(pl.col(c)).alias(c)
                  for c in (*rc.categorical, *(t.column for t in rc.tokens), *rc.keys)]
        return frame.select(exprs)

    def _positive(self, d: DerivedLabelConfig) -> pl.Expr:
        col = pl.col(d.column)
        return col.str.contains(d.pattern) if d.pattern else col.is_in(list(d.positive))

    def _value_error(self, frame: pl.DataFrame, parsed: np.ndarray, kind: str, col: str,
                     ) -> Callable[[Records, int], InputFormatError]:
        def error(rec: Records, i: int) -> InputFormatError:
            row = int(np.searchsorted(parsed, i))        # parsed is ascending
            if kind == "der":
                d = next(d for d in self.rc.derived if d.name == col)
                value = frame[d.column][row]
                where = location(self.path, int(rec.lines[i]), column=d.column)
                if value is None or value == "" or value in self.missing:
                    shown = f" ({value!r} is listed in data.csv.missing)" if value else ""
                    return InputFormatError(f"the source of label {d.name!r} is missing{shown}",
                                            where=where,
                                            fix=self.remedies.or_skip(f"every row needs a label: fill in "
                                                                      f"{d.column!r}"))
                fix = f"add it to data.derived_labels[{d.name}].positive or .negative"
                if str(value).startswith(" "):      # ", "-separated text read with ",": every value starts so
                    fix = f"the value starts with a space: is the separator {self.cfg.csv.separator + ' '!r}? " \
                          "(listing it would keep the spaces in every categorical value); else " + fix
                return InputFormatError(
                    f"{value!r} is neither a positive {list(d.positive)} nor a negative {list(d.negative)} "
                    f"value of label {d.name!r}", where=where, fix=self.remedies.or_skip(fix))
            value = frame[col][row]
            where = location(self.path, int(rec.lines[i]), column=col)
            if kind == "id":
                return InputFormatError("the ID is missing" + (f" ({value!r} is listed in data.csv.missing)"
                                                               if value else ""), where=where,
                                        fix=self.remedies.or_skip("give every row an ID"))
            if kind == "lab":
                what = "the label is missing" if value is None or value == "" or value in self.missing \
                    else f"label {value!r} is not 0 or 1"
                if value is not None and str(value).strip() == col and self.cfg.csv.header:   # files joined by cat
                    return InputFormatError(what, where=where, fix=self.remedies.or_skip(
                        "the line repeats the header (files joined with cat keep each one's header): remove it"))
                return InputFormatError(what, where=where,
                                        fix=self.remedies.bad_label(self.labels_optional))
            fix = f"list it in data.csv.missing if it means 'missing', or list {col!r} under data.categorical" \
                if not self.remedies.run_format else \
                f"the run reads {col!r} as a number: fix the value (an empty field is missing)"
            text = str(value).strip()
            if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?|[+-]?\d+,\d+", text):
                # 77,516 or 77516,0: no setting reads them, and missing or categorical would lose the number
                fix = ("the value looks like a number written with a thousands separator or a decimal comma, "
                       "which no setting reads: write it plainly (77516, 0.5) where the file is made")
            if str(value).startswith(" "):
                fix = f"the value starts with a space: is the separator {self.cfg.csv.separator + ' '!r}? " + fix
            if text == col and self.cfg.csv.header:     # another file's header, joined on (cat a.csv b.csv)
                return InputFormatError(f"{value!r} is not a number", where=where, fix=self.remedies.or_skip(
                    "the line repeats the header (files joined with cat keep each one's header): remove it"))
            if text == col:      # the column's own name: a header line
                fix = ("the line is a header, and the config reads files without one (data.csv.header=false): "
                       "remove the line" + ("" if self.remedies.run_format else ", or set data.csv.header=true"))
                return InputFormatError(f"{value!r} is not a number", where=where, fix=fix)
            return InputFormatError(f"{value!r} is not a number", where=where, fix=self.remedies.or_skip(fix))
        return error

    def _check_weights(self, frame: pl.DataFrame, parsed: np.ndarray, col: str, sep: str, flags: _Flags) -> None:
        s = frame[col]
        found = BadWeights(s, sep)
        if not len(found.rows):
            return
        records = parsed[found.rows]            # increasing, as the frame's rows are the records in order

        def error(r: Records, i: int) -> InputFormatError:
            k = int(found.rows[np.searchsorted(records, i)])
            return weight_error(col, str(s[k]), found.reason(k), where=location(self.path, int(r.lines[i]),
                                                                                  column=col))

        flags.flag(records, col, "bad weight", error)


class _Flags:
    """Bad rows of one chunk: a keep mask, BadRows (skip mode), and in error mode the first error by line
    (every check runs, so the message names the earliest bad row of the chunk whatever its kind)."""

    def __init__(self, mode: BadMode, rec: Records, path: Path) -> None:
        self.mode, self.rec, self.path = mode, rec, path
        self.keep = np.ones(len(rec), dtype=bool)
        self.bad: list[BadRow] = []
        self.first: tuple[int, Callable[[Records, int], InputFormatError]] | None = None

    def flag(self, idx: np.ndarray, column: str | None, reason: str,
             error: Callable[[Records, int], InputFormatError]) -> None:
        idx = idx[self.keep[idx]]
        if not len(idx):
            return
        if self.mode == "error":
            i = int(idx.min())
            if self.first is None or i < self.first[0]:
                self.first = (i, error)
        else:
            self.bad.extend(BadRow(str(self.path), int(self.rec.lines[i]), None, column, reason) for i in idx)
        self.keep[idx] = False

    def raise_first(self) -> None:
        if self.first is not None:
            raise self.first[1](self.rec, self.first[0])


def stray_quote_resync(cfg: DataConfig, path: Path, label_columns: tuple[str, ...]) -> frozenset[int]:
    """Field counts a record may have: the header's, or without one all columns or all less the labels (a test
    file). With bad_rows=skip a record over several lines with another count is a stray quote, cut back to
    its line (RecordCutter)."""
    if not cfg.csv.quote_char:
        return frozenset()
    names = read_header(cfg, path)
    if cfg.csv.header:
        return frozenset({len(names)})
    labels = list(label_columns)
    return frozenset({len(names), *(len(short) for short in _unlabelled_layouts(names, labels))})


LAYOUT_RECORDS = 10_000     # records that vote on a headerless file's layout, whatever chunk_rows is


def iter_csv_chunks(cfg: DataConfig, path: Path, chunk_rows: int, rc: ResolvedColumns,
                    bad_rows: BadMode = "error", require_labels: bool = True,
                    remedies: Remedies = SHARD_REMEDIES, read_labels: bool = True) -> Iterator[RawChunk]:
    """RawChunks of one CSV file, at most chunk_rows rows each, with the configured columns only (labels
    left out, unchecked, without `read_labels`)."""
    chunker: CsvChunker | None = None
    position = 0
    resync = stray_quote_resync(cfg, path, rc.label_columns) if bad_rows == "skip" else frozenset()
    # records are cut one chunk ahead in their own thread: cutting overlaps the parse
    for rec in prefetch(lambda: iter(RecordCutter(path, cfg.csv, chunk_rows, resync_fields=resync,
                                                  remedies=remedies)), 1, "ctrpipe-read"):
        if chunker is None:
            names = list(cfg.csv.column_names)
            voters = rec
            if cfg.csv.header:
                names, rec = _header(path, cfg, rec, remedies), rec.drop_first()
            elif rc.label_columns:
                # the layout is voted on the file's first LAYOUT_RECORDS records, cut apart: with the first
                # chunk's, a file whose first row is short was unlabelled at chunk_rows=1, labelled at 1000
                with contextlib.closing(iter(RecordCutter(path, cfg.csv, LAYOUT_RECORDS, resync_fields=resync,
                                                          remedies=remedies))) as head:
                    voters = next(head, rec)
            layout = _layout(path, cfg, rc, names, voters, require_labels, remedies, read_labels)
            chunker = CsvChunker(path, cfg, rc, layout, bad_rows, remedies, labels_optional=not require_labels)
        if len(rec) == 0:
            continue
        yield chunker.chunk(rec, position)
        position += len(rec)
    if chunker is None:
        raise InputFormatError("the file holds no rows (only blank or comment lines)", where=str(path),
                               fix="check the file, or leave it out of --input")
