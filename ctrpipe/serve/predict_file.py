"""`ctrpipe predict --run RUN --input FILE --out preds.csv`: a one-off file of raw rows -> probabilities per
head through the `Predictor` (the shard build's readers and transforms, infer's shift, calibration and fold
ensembling), in chunks of rows, written atomically (`out.incomplete`, renamed when complete).

Output columns: the id column (data.id_column, when the input has it; else `row`, the 0-based row number),
then one float64 probability column per head. Inputs: Criteo text (with or without the label field) and
Parquet, as the run was trained on; CSV-trained runs are refused for now (call `Predictor.predict` on a table).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ctrpipe.atomic import atomic_open
from ctrpipe.errors import CtrpipeError, InputFormatError
from ctrpipe.serve.predictor import Predictor


def _chunks(p: Predictor, path: Path, chunk_rows: int) -> Iterator[tuple[int, object, np.ndarray | None]]:
    """(first row, rows, ids or None) per chunk of the input file, read as the run's data.format."""
    fmt, id_col = p.cfg.data.format, p.cfg.data.id_column
    if fmt == "criteo":
        with open(path, "rb") as fh:
            for start in itertools.count(0, chunk_rows):
                lines = list(itertools.islice(fh, chunk_rows))
                if not lines:
                    return
                yield start, lines, None
    elif fmt == "parquet":
        start = 0
        for rb in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            ids = rb.column(id_col).to_numpy(zero_copy_only=False) if id_col and id_col in rb.schema.names \
                else None
            yield start, pa.Table.from_batches([rb]), ids
            start += rb.num_rows
    else:
        raise InputFormatError(f"ctrpipe predict reads Criteo text and Parquet files; this run was trained on "
                               f"{fmt} input", where=str(path),
                               fix="score a table with ctrpipe.Predictor.load(RUN).predict(polars_frame), or "
                                   "use ctrpipe shard --test --stats-from TRAIN_CACHE and ctrpipe infer")


def predict_file(run: Path, path: Path, out: Path, cache: Path | None = None, chunk_rows: int = 65536) -> int:
    """Score every row of `path` with `run`; write `out` (CSV) atomically; returns the number of rows."""
    path = Path(path)
    if not path.is_file():
        raise InputFormatError("input file not found", where=str(path), fix="pass --input an existing file")
    p = Predictor.load(run, cache=cache)
    n = 0
    with atomic_open(out, "wb") as fh:
        for start, rows, ids in _chunks(p, path, chunk_rows):
            try:
                probs = p.predict(rows)  # type: ignore[arg-type]
            except CtrpipeError as exc:      # name the file and where this chunk starts
                line = f"line {start + 1}" if p.cfg.data.format == "criteo" else f"row {start}"
                raise dataclasses.replace(exc, where=f"{path}, chunk from {line}: {exc.where}") from None
            k = len(next(iter(probs.values())))
            key = (p.cfg.data.id_column or "id", pl.Series(ids)) if ids is not None else \
                ("row", pl.Series(np.arange(start, start + k, dtype=np.int64)))
            frame = pl.DataFrame({key[0]: key[1], **{h: probs[h] for h in p.heads}})
            frame.write_csv(fh, include_header=n == 0)
            n += k
        if n == 0:
            raise InputFormatError("the input has no rows", where=str(path), fix="pass a file with rows")
    return n
