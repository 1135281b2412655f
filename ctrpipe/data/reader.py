"""Stage 1 entry point: one iterator of typed RawChunks over every input file, whatever the format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from ctrpipe.data.chunks import SHARD_REMEDIES, BadRow, RawChunk, Remedies
from ctrpipe.data.config import DataConfig
from ctrpipe.data.criteo import iter_criteo_chunks
from ctrpipe.data.csv_reader import iter_csv_chunks, read_header
from ctrpipe.data.parquet import iter_parquet_chunks, read_schema
from ctrpipe.data.schema import ResolvedColumns, SchemaLike, resolve_columns
from ctrpipe.data.sources import expand_inputs

__all__ = ["BadRow", "RawChunk", "Remedies", "ResolvedColumns", "expand_inputs", "input_schema", "iter_raw_chunks",
           "resolve_columns", "resolve_inputs_columns"]


def input_schema(cfg: DataConfig, path: Path) -> SchemaLike:
    """The columns of one input: Parquet's schema, a CSV header (or data.csv.column_names) as names,
    None for Criteo text (its layout is fixed)."""
    if cfg.format == "parquet":
        return read_schema(path)
    if cfg.format == "csv":
        return dict.fromkeys(read_header(cfg, path))
    return None


def resolve_inputs_columns(cfg: DataConfig, inputs: list[Path]) -> ResolvedColumns:
    """Columns resolved against the first input (Parquet, CSV) or the fixed Criteo layout."""
    if cfg.format == "criteo":
        return resolve_columns(cfg, None)
    return resolve_columns(cfg, input_schema(cfg, inputs[0]), source=inputs[0])


def iter_raw_chunks(cfg: DataConfig, inputs: list[Path], chunk_rows: int,
                    bad_rows: Literal["error", "skip"] = "error", require_labels: bool = True,
                    columns: ResolvedColumns | None = None, hash_categoricals: bool = False,
                    remedies: Remedies = SHARD_REMEDIES) -> Iterator[RawChunk]:
    """Typed chunks of at most chunk_rows rows, file by file in the given order, rows in file order.

    Columns are resolved once, against the first file, so every chunk has the same columns. With
    `hash_categoricals`, a reader may deliver categorical columns as their hashes (`column_hashes` reads
    either form); the shard build asks for that, so Criteo text is parsed and hashed in one compiled pass.
    `remedies`: the options the calling command offers for bad input, which the readers' fixes name.
    """
    if not inputs:
        return
    rc = columns or resolve_inputs_columns(cfg, inputs)
    token_columns = {t.column for t in rc.tokens}
    hashed = tuple(c for c in rc.categorical if c not in token_columns and c != rc.id) if hash_categoricals else ()
    for path in inputs:
        if cfg.format == "criteo":
            yield from iter_criteo_chunks(cfg, path, chunk_rows, rc.raw_columns(), bad_rows, require_labels,
                                          hashed=hashed, remedies=remedies)
        elif cfg.format == "csv":
            yield from iter_csv_chunks(cfg, path, chunk_rows, rc, bad_rows, require_labels, remedies)
        else:
            yield from iter_parquet_chunks(cfg, path, chunk_rows, rc, bad_rows, require_labels, remedies)
