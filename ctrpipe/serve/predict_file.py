"""`ctrpipe predict --run RUN --input FILE --out preds.csv`: a one-off file of raw rows -> probabilities per
head through the `Predictor` (the shard build's readers and transforms, infer's shift, calibration and fold
ensembling), in chunks of rows, written atomically (`out.incomplete`, renamed when complete).

Output columns: the id column (data.id_column, when the input has it; else `row`, the 0-based row number),
then one float64 probability column per head. Inputs: Criteo text (with or without the label field) and
Parquet or CSV, as the run was trained on; CSV files are read by the shard build's CSV reader itself (quoting,
comment lines, missing-value tokens and errors with file and line are the build's).
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctrpipe.atomic import atomic_open, write_json_atomic
from ctrpipe.config import to_dict
from ctrpipe.data.chunks import RawChunk
from ctrpipe.data.criteo import iter_blocks
from ctrpipe.data.csv_reader import iter_csv_chunks, read_header
from ctrpipe.errors import ConfigError, CtrpipeError, InputFormatError
from ctrpipe.infer.submission import check_out_file, check_out_outside, is_gzip_name
from ctrpipe.serve.predictor import Predictor
from ctrpipe.serve.rows import serving_remedies


def parquet_batches(path: Path, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The file's record batches of `chunk_rows` rows. Not pre-buffered: pyarrow's default keeps every row
    group read so far in memory until the reader closes, so predict's memory grew with the file."""
    return pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=chunk_rows)


def _chunks(p: Predictor, path: Path, chunk_rows: int) -> Iterator[tuple[int, object, np.ndarray | None]]:
    """(first row, rows, ids or None) per chunk of the input file, read as the run's data.format."""
    fmt, id_col = p.cfg.data.format, p.cfg.data.id_column
    if fmt == "criteo":
        # blocks of whole lines, as `ctrpipe shard` reads Criteo text (gzip by its magic bytes): one bytes object
        # per chunk, not a Python string per line
        for block in iter_blocks(path, chunk_rows, remedies=serving_remedies(p.cfg.data)):
            yield block.first_line - 1, block.data, None
    elif fmt == "parquet":
        start = 0
        try:
            batches = parquet_batches(path, chunk_rows)
        except (pa.ArrowInvalid, OSError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise InputFormatError(f"the run was trained on Parquet, and this file cannot be read as Parquet "
                                   f"({reason})", where=str(path),
                                   fix="pass a Parquet file with the columns the run was sharded from") from None
        while True:
            try:
                rb = next(batches, None)
            except (pa.ArrowInvalid, OSError) as exc:
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise InputFormatError(f"cannot read the file after row {start:,}: {reason}", where=str(path),
                                       fix="check the file is whole (re-copy or re-export it)") from None
            if rb is None:
                return
            ids = rb.column(id_col).to_numpy(zero_copy_only=False) if id_col and id_col in rb.schema.names \
                else None
            yield start, pa.Table.from_batches([rb]), ids
            start += rb.num_rows
    else:
        rc = p.plan.columns
        if rc.id and not _csv_has_column(p, path, rc.id):
            rc = dataclasses.replace(rc, id=None)       # no id column in this file: rows are numbered
        start = 0
        for chunk in iter_csv_chunks(p.plan.cfg, path, chunk_rows, rc, "error", require_labels=False,
                                     remedies=serving_remedies(p.cfg.data), read_labels=False):
            ids = chunk.frame[rc.id].to_numpy() if rc.id else None
            yield start, chunk, ids
            start += chunk.frame.height


def _csv_has_column(p: Predictor, path: Path, name: str) -> bool:
    """Whether the file's header names `name`, read as `ctrpipe shard` reads it (byte-order mark, blank and
    comment lines, quoting)."""
    return name in read_header(p.plan.cfg, path, serving_remedies(p.cfg.data))


def predict_file(run: Path, path: Path, out: Path, cache: Path | None = None, chunk_rows: int = 65536,
                 overrides: Sequence[str] = ()) -> int:
    """Score every row of `path` with `run`; write `out` (CSV) atomically; returns the number of rows.
    `overrides`: inference-only `--set` values (infer.*, as `ctrpipe infer` takes them)."""
    path = Path(path)
    if path.is_dir():
        raise InputFormatError("--input is a folder; predict scores one file", where=str(path),
                               fix="pass one file (run predict once per file, or shard the folder and use "
                                   "`ctrpipe infer`)")
    if not path.is_file():
        raise InputFormatError("input file not found", where=str(path), fix="pass --input an existing file")
    out = Path(out)
    check_out_file(out)
    if out.resolve() == path.resolve():
        raise ConfigError("--out is the --input file: the predictions would replace the rows they score",
                          where=f"--out {out}", fix="write the predictions to another file")
    t0 = time.perf_counter()
    # a whole file has the rows the build's separator check needs (serving's request batches may not): a
    # history split by another character would score as one unknown token per row, without a word
    p = Predictor.load(run, cache=cache, overrides=overrides, quiet=False, separators="run")
    check_out_outside(out, run, (p.cache_dir,))
    out.parent.mkdir(parents=True, exist_ok=True)      # as `ctrpipe infer` makes its --out folder
    doc = _record(p, path, out)         # hashed before the commit, which holds Ctrl-C while it runs
    return _write(p, path, out, chunk_rows,
                  then=lambda rows: _write_record(out, {**doc, "rows": rows}, time.perf_counter() - t0))


def _record(p: Predictor, path: Path, out: Path) -> dict[str, Any]:
    """What `<out>.json` says, as `ctrpipe infer` writes beside a submission: the input file (sha256), the
    run and its checkpoints, the training cache's fingerprint, the calibrations and the resolved config."""
    from ctrpipe.infer.predict import file_sha256, find_checkpoints

    return {"predictions": str(out.resolve()), "rows": None,       # filled in when written
            "input": {"path": str(path.resolve()), "sha256": file_sha256(path), "bytes": path.stat().st_size},
            "run": str(p.run.resolve()), "exp_name": p.cfg.exp_name, "method": p.cfg.infer.method,
            "weights": list(p.weights) if p.weights is not None else None,
            "checkpoints": [{"path": str(c.resolve()), "sha256": file_sha256(c)} for c in find_checkpoints(p.run)],
            "training_cache": str(p.cache_dir.resolve()), "shards_fingerprint": p.manifest.fingerprint,
            "shards_schema_fingerprint": p.manifest.schema_fingerprint(),
            "calibration": {h: dataclasses.asdict(c) for h, c in zip(p.heads, p.calibrations, strict=True)},
            "config": to_dict(p.cfg), "config_sources": dict(p.cfg.sources)}


def _write_record(out: Path, doc: dict[str, Any], seconds: float) -> Path:
    return write_json_atomic(out.with_name(out.name + ".json"), {**doc, "seconds": round(seconds, 3)})


def _where_in_file(where: str, path: Path, start: int) -> str:
    """An error's place in a chunk of rows ("input rows, line 7") as its place in the file; "input rows" alone
    (a column missing from every row) is the file."""
    where = re.sub(r"input rows, line (\d+)", lambda m: f"{path}, line {start + int(m.group(1))}", where)
    where = re.sub(r"input rows, row (\d+)", lambda m: f"{path}, row {start + int(m.group(1))}", where)
    return re.sub(r"^input rows\b", lambda m: str(path), where)


def _write(p: Predictor, path: Path, out: Path, chunk_rows: int, then: Callable[[int], object]) -> int:
    """Write the predictions to `out` (gzip for a .gz name, as infer writes a submission), atomically; the
    record of an earlier output is removed only once this one is whole (a failed predict keeps both), and
    `then(rows)` writes the new record, committed with it (`atomic_open(then=)`)."""
    n = 0
    with atomic_open(out, "wb", stale=(out.with_name(out.name + ".json"),), then=lambda: then(n)) as raw:
        # mtime 0 keeps equal inputs byte-identical
        fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if is_gzip_name(out) else raw
        for start, rows, ids in _chunks(p, path, chunk_rows):
            try:
                if isinstance(rows, RawChunk):        # CSV: already parsed by the build's reader
                    probs = p.probabilities(p.batch_logits(p.chunk_batch(rows)), p.heads)
                else:
                    probs = p.predict(rows)  # type: ignore[arg-type]
            except CtrpipeError as exc:      # name the file and where this chunk starts
                if isinstance(rows, RawChunk):        # the reader's errors already name the file and line
                    raise
                raise dataclasses.replace(exc, where=_where_in_file(exc.where, path, start)) from None
            k = len(next(iter(probs.values())))
            key = (p.cfg.data.id_column or "id", pl.Series(ids)) if ids is not None else \
                ("row", pl.Series(np.arange(start, start + k, dtype=np.int64)))
            frame = pl.DataFrame({key[0]: key[1], **{h: probs[h] for h in p.heads}})
            frame.write_csv(fh, include_header=n == 0)
            n += k
        if n == 0:
            raise InputFormatError("the input has no rows", where=str(path), fix="pass a file with rows")
        if fh is not raw:
            fh.close()                                          # the gzip trailer
    return n
