"""Stage 6: submission CSV files: an atomic, chunked writer and a strict, streaming reader (for blending).

A submission is `ID,clicked` (names from `infer.id_header` / `infer.pred_header`): one header line, then one
row per test row. The writer formats bounded chunks and renames `<name>.incomplete` into place only when every
row is written; the reader yields bounded chunks and refuses, naming file and line, anything it cannot trust.
Line numbers assume one physical line per row (no quoted newlines), which holds for ID / number files.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctrpipe.atomic import commit, open_temp
from ctrpipe.errors import SubmissionError, disk_full_as_error, human_bytes, location

DEFAULT_CHUNK_BYTES = 16 << 20      # ~16 MB of CSV text per chunk: ~700k rows of "12345678,0.123456789"


def check_out_file(out: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output path that names a folder (the final rename would fail after it), or
    anything but a regular file: the output is written beside it and renamed onto it, which replaced a device
    (/dev/null, /dev/full: as root, the node itself), a FIFO, or a symbolic link instead of its target."""
    path = Path(out)
    try:
        mode = os.stat(path).st_mode            # of the target, for a link (/dev/stdout: a pipe or terminal)
    except OSError:                             # new, a dangling link, or unreadable: the write says why
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a FIFO" if stat.S_ISFIFO(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "no regular file"
        raise SubmissionError(f"{option} names {kind}, not a file: the output is written beside it and renamed "
                              "onto it, which would replace it", where=str(out),
                              fix="give a file path (the command always writes a file and its .json record; delete "
                                  "them afterwards if you only want the printed figures)")
    if path.is_symlink():
        target = os.path.realpath(path)
        raise SubmissionError(f"{option} names a symbolic link (to {target}); the output would replace the link, "
                              "not its target", where=str(out),
                              fix=f"give the file itself, e.g. {option} {target}" if not os.path.isdir(target) else
                              f"give a file name, e.g. {option} {Path(target) / 'submission.csv'}")
    if path.is_dir():
        raise SubmissionError(f"{option} names a folder, and the output is a file", where=str(out),
                              fix=f"give a file name, e.g. {option} {Path(out) / 'submission.csv'}")
    _refuse_files_of_caches_and_runs(path, option)


def shard_cache_holding(path: Path) -> Path | None:
    """The shard cache whose folder holds `path` (or is it), if any: a folder with a manifest.json and shards."""
    p = Path(path).resolve()
    for folder in (p, *p.parents):
        if (folder / "manifest.json").is_file() and next(folder.glob("shard_*"), None) is not None:
            return folder
    return None


def _refuse_files_of_caches_and_runs(out: Path, option: str) -> None:
    """Any shard cache's folder, and any run's own files, not only those of the run and cache the command
    reads (`check_out_outside`): --out naming another run's ckpt_best.pt or another cache's manifest.json
    replaced it with CSV text, exit 0, and that run or cache failed later. A run's earlier submission (with
    its .json record) and its submission.csv are replaced as before."""
    o = out.resolve()
    cache = shard_cache_holding(o)
    if cache is not None:
        raise SubmissionError(f"{option} is inside the shard cache {cache}, whose folder belongs to "
                              "`ctrpipe shard`", where=f"{option} {out}",
                              fix="write the output outside the cache's folder")
    # a run's own files, in its folder or below it (fold0/ckpt_last.pt is what --resume reads, tb/ its events);
    # the nearest folder a run wrote, whatever the folders are named (a run may be named fold1)
    run = next((p for p in o.parents if (p / "config.json").is_file() and (p / "manifest_fingerprint.txt").is_file()),
               None)
    if run is not None and o.exists() and not (o.parent == run and o.name == "submission.csv") and \
            not o.with_name(o.name + ".json").is_file():
        raise SubmissionError(f"{option} names the run's own {o.name} (of the run {run}), which no infer, predict "
                              "or blend wrote: it would be replaced", where=f"{option} {out}",
                              fix=f"give another file name, e.g. {option} {run / 'submission.csv'}")


def check_out_outside(out: Path, run: Path, caches: tuple[Path, ...], option: str = "--out") -> None:
    """Refuse, before any work, an output that would replace what the command reads: any path inside a shard
    cache (the cache's folder belongs to `ctrpipe shard`), or a file of the run folder that no earlier output
    wrote (a checkpoint, calibration.json, the config); an earlier submission or prediction file has its
    `.json` record beside it and is replaced as before, as is infer's default RUN/submission.csv (training
    never writes it), and a new name in the run folder is written as before."""
    o = Path(out).resolve()
    for cache in caches:
        c = Path(cache).resolve()
        if o == c or c in o.parents:
            raise SubmissionError(f"{option} is inside the shard cache {cache}, which this command reads",
                                  where=f"{option} {out}", fix="write the output outside the cache's folder")
    default = (Path(run) / "submission.csv").resolve()
    if Path(run).resolve() in o.parents and o.exists() and o != default and \
            not o.with_name(o.name + ".json").is_file():
        raise SubmissionError(f"{option} names the run's own {o.name}, which this command did not write: it "
                              "would be replaced", where=f"{option} {out}",
                              fix=f"give another file name, e.g. {option} {Path(run) / 'submission.csv'}")


class SubmissionWriter:
    """Write `id,pred` rows chunk by chunk to `<path>.incomplete`; rename to `path` on a clean exit.

    `expected_rows`, when known, lets a full disk's message say how big the whole file gets.

    Example::

        with SubmissionWriter(Path("sub.csv"), "ID", "clicked") as w:
            w.write(np.array([10, 11]), np.array([0.25, 0.5], dtype=np.float32))
    """

    def __init__(self, path: Path, id_header: str = "ID", pred_header: str = "clicked",
                 expected_rows: int | None = None, stale: tuple[Path, ...] = (),
                 then: Callable[[], object] | None = None) -> None:
        self.path = Path(path)
        # files describing an older `path` (its .json record): removed just before the new file replaces it, so
        # a failed write keeps both, and a finished one is never paired with them
        self.stale = stale
        # writes the files describing the new `path` (its record) right after the rename, stops held meanwhile:
        # a Ctrl-C between the two left a finished submission without its record
        self.then = then
        self.tmp = self.path.with_name(self.path.name + ".incomplete")
        self.headers = (id_header, pred_header)
        self.expected_rows = expected_rows
        self.rows = 0
        self._fh: BinaryIO | None = None
        self._raw: BinaryIO = io.BytesIO()      # the temp file under _fh (the same object unless gzipped)
        self._tried = (0, 0)        # (rows, bytes) handed to the file so far, the failed chunk included

    def __enter__(self) -> SubmissionWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._raw = open_temp(self.tmp, self.path)     # closed in __exit__, after the rename (the lock)
        # a .gz name gets gzip (what readers of that name expect); mtime 0 keeps equal inputs byte-identical
        self._fh = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0) \
            if is_gzip_name(self.path) else self._raw
        try:
            self._put((",".join(self.headers) + "\n").encode(), 0)
        except BaseException:           # __exit__ does not run when __enter__ raises
            self._abandon(self._fh)
            self._fh = None
            raise
        return self

    def write(self, ids: np.ndarray | pa.Array | pl.Series, preds: np.ndarray) -> None:
        """Append one chunk; ids int64 or strings, preds float32 (short text) or float64 (full precision)."""
        assert self._fh is not None, "use SubmissionWriter as a context manager"
        ids_s = ids if isinstance(ids, pl.Series) else pl.Series(self.headers[0], ids)
        if len(ids_s) != len(preds):
            raise ValueError(f"{len(ids_s)} ids for {len(preds)} predictions")
        bad = ~np.isfinite(np.asarray(preds))
        if bad.any():               # a file of NaN rows would look finished; readers refuse it later
            i = int(np.flatnonzero(bad)[0])
            raise SubmissionError(f"{int(bad.sum()):,} of {len(preds):,} predictions in this chunk are not finite "
                                  f"(ID {ids_s[i]}: {preds[i]})", where=str(self.path),
                                  fix="nothing was written: check the models and calibration.json of the run "
                                      "(a diverged model or an edited calibration gives NaN)")
        frame = pl.DataFrame({self.headers[0]: ids_s.alias(self.headers[0]), self.headers[1]: preds})
        buf = io.BytesIO()          # formatted first, so a full disk surfaces as Python's OSError on write
        frame.write_csv(buf, include_header=False)
        self._put(buf.getbuffer(), len(preds))
        self.rows += len(preds)

    def _put(self, data: bytes | memoryview, rows: int) -> None:
        assert self._fh is not None
        self._tried = (self._tried[0] + rows, self._tried[1] + len(data))
        with disk_full_as_error(self.path, self._needs):
            self._fh.write(data)

    def _needs(self) -> str:
        rows, size = self._tried
        if self.expected_rows and rows:
            return (f"the file needs about {human_bytes(size / rows * self.expected_rows)} "
                    f"({self.expected_rows:,} rows)")
        return f"the file needs at least {human_bytes(size)} (the rows formatted so far)"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        fh, self._fh = self._fh, None
        assert fh is not None
        if exc_type is not None:
            self._abandon(fh)
            return
        try:
            with disk_full_as_error(self.path, self._needs):   # buffered bytes reach the disk here
                if fh is not self._raw:
                    fh.close()                                 # the gzip trailer
                self._raw.flush()
                os.fsync(self._raw.fileno())
            commit(self.tmp, self.path, self.stale, self.then)
            self._raw.close()               # after the rename: closing ends the temp file's lock
        except BaseException:
            self._abandon(fh)
            raise

    def _abandon(self, fh: BinaryIO) -> None:
        """Close and delete the temp file. Flushing its buffered tail may fail again on a full disk; that
        must not hide the error that abandoned it."""
        for f in (fh, self._raw):
            try:
                f.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class SubmissionChunk:
    ids: pa.Array           # (n,) string IDs exactly as written in the file
    preds: np.ndarray       # (n,) float64, checked finite and in [0, 1]
    first_row: int          # 0-based data row of ids[0]; its file line is first_row + 2 (after the header)


def line_of(row: int) -> int:
    """1-based file line of 0-based data row `row` (line 1 is the header)."""
    return row + 2


def read_header(path: Path) -> tuple[str, str]:
    """The two header names of a submission; refuses a missing or empty file or a header that is data."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError("file does not exist", where=str(path),
                              fix="check the path; submissions are written by `ctrpipe infer`")
    gz = is_gzip_name(path)
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as fh:
            first = fh.readline().decode("utf-8-sig").rstrip("\r\n")
            second = fh.readline()
            more = bool(fh.read(1)) if not second.strip() else True     # a blank line 2, then rows?
    except (OSError, EOFError, UnicodeDecodeError) as exc:      # gzip.BadGzipFile is an OSError
        raise SubmissionError(f"cannot read it as {'gzip ' if gz else ''}CSV text ({exc})",
                              where=str(path), fix="pass the submission CSV (a .gz name must hold gzip data)"
                              ) from None
    if not first:
        if second or more:
            raise SubmissionError("line 1 is blank: the header must come first", where=location(path, line=1),
                                  fix="remove the blank line(s) before the header 'ID,clicked'")
        raise SubmissionError("file is empty", where=str(path),
                              fix="re-create it; a submission starts with a header such as 'ID,clicked'")
    names = [n.strip().strip('"') for n in first.split(",")]
    if len(names) != 2:
        raise SubmissionError(f"header {first!r} has {len(names)} columns, expected 2 (ID, prediction)",
                              where=location(path, line=1), fix="write files as 'ID,clicked' rows")
    try:
        float(names[1])
        looks_like_data = True
    except ValueError:
        looks_like_data = False
    if looks_like_data:
        raise SubmissionError(f"first line {first!r} looks like data, not a header",
                              where=location(path, line=1), fix="add a header line such as 'ID,clicked'")
    if not second.strip() and not more:
        raise SubmissionError("file has a header and no rows", where=str(path),
                              fix="re-create it from a finished `ctrpipe infer`")
    return names[0], names[1]


def is_gzip_name(path: Path) -> bool:
    """`.gz` in any case (a download may come as `.GZ`)."""
    return path.suffix.lower() == ".gz"


def _parse_preds(path: Path, raw: pa.Array, first_row: int, header: str) -> np.ndarray:
    """Strings -> float64; refuses missing, non-numeric, NaN and out-of-[0, 1] values, naming the line."""
    try:
        preds = pc.cast(raw, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.isnan(preds)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed = pl.from_arrow(raw).cast(pl.Float64, strict=False)
        bad = parsed.is_null().to_numpy() | parsed.is_nan().fill_null(False).to_numpy()
        preds = parsed.fill_null(float("nan")).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = raw[i].as_py()
        what = "missing prediction" if not value else f"non-numeric prediction {value!r}"
        raise SubmissionError(what, where=location(path, line=line_of(first_row + i), column=header),
                              fix="every row needs a probability in [0, 1]; regenerate the file")
    out = (preds < 0.0) | (preds > 1.0)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise SubmissionError(f"prediction {raw[i].as_py()} is outside [0, 1]",
                              where=location(path, line=line_of(first_row + i), column=header),
                              fix="blend probabilities, not logits or rank scores above 1")
    return preds


def iter_submission(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[SubmissionChunk]:
    """Stream a submission in bounded chunks of checked rows (IDs as strings, predictions as float64)."""
    path = Path(path)
    _, pred_name = read_header(path)
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    def parse_error(exc: pa.ArrowInvalid) -> SubmissionError:
        if bad_rows:
            r = bad_rows[0]
            return SubmissionError(f"{r.actual_columns} fields ({r.text!r}), expected 2",
                                   where=location(path, line=r.number),
                                   fix="each row must be 'ID,prediction'")
        return SubmissionError(f"cannot parse as CSV: {exc}", where=str(path),
                               fix="write it as 'ID,clicked' rows")

    def damaged(exc: OSError) -> SubmissionError:      # pyarrow: a cut or corrupted gzip stream, a read error
        return SubmissionError(f"cannot read it ({exc})", where=str(path),
                               fix="the file is damaged (a cut or corrupted .gz?): copy or re-create it")

    try:  # the reader parses its first block when opened, so errors can surface here already
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="gzip" if is_gzip_name(path) else None),
            read_options=pacsv.ReadOptions(block_size=chunk_bytes, use_threads=False, skip_rows=1,
                                           column_names=["id", "pred"]),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={"id": pa.string(), "pred": pa.string()},
                                                 strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        raise parse_error(exc) from None
    except OSError as exc:
        raise damaged(exc) from None
    row = 0
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                raise parse_error(exc) from None
            except OSError as exc:
                raise damaged(exc) from None
            ids = batch.column(0)
            n = len(ids)
            empty = pc.equal(pc.utf8_length(ids), 0).to_numpy(zero_copy_only=False)
            if empty.any():
                i = int(np.flatnonzero(empty)[0])
                raise SubmissionError("empty ID (a blank line?)", where=location(path, line=line_of(row + i)),
                                      fix="remove blank lines; every row must be 'ID,prediction'")
            preds = _parse_preds(path, batch.column(1), row, pred_name)
            yield SubmissionChunk(ids=ids, preds=preds, first_row=row)
            row += n
    finally:
        reader.close()  # an abandoned reader's read-ahead thread aborts the interpreter at exit


def id_at_rows(path: Path, rows: np.ndarray | list[int]) -> dict[int, str]:
    """The IDs at given 0-based data rows (for error messages; reads the file once, in chunks)."""
    want = np.unique(np.asarray(rows, dtype=np.int64))
    found: dict[int, str] = {}
    for chunk in iter_submission(path):
        hit = want[(want >= chunk.first_row) & (want < chunk.first_row + len(chunk.ids))]
        for r in hit.tolist():
            found[r] = chunk.ids[r - chunk.first_row].as_py()
        if len(found) == len(want):
            break
    return found
