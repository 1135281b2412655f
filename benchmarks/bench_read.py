"""Benchmark: the Criteo text reader (with its checks) and hashing, against a polars parse-only pass.

Usage: python benchmarks/bench_read.py FILE.tsv [--chunk-rows 250000] [--repeat 2]
  (make a file with `ctrpipe synth --rows 500000 --out /tmp/synth`)
Prints seconds, rows/s and MB/s of: polars parse-only of the same blocks, iter_raw_chunks (our reader:
blocking, field-count checks, typed parse, label checks) through polars, the same + hash_ids of the 26
categorical columns, and the reader asking for hashed categoricals, which the compiled kernel
(ctrpipe/_native.c) delivers in one pass (skipped when it is not built), plus ratios to the parse-only
baseline (higher is better; 1.0 = as fast as parsing alone).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import polars as pl

from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig
from ctrpipe.data.criteo import iter_blocks
from ctrpipe.data.hashing import field_seed, hash_ids
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.native import native

SCHEMA = {"label": pl.Float64, **dict.fromkeys(CRITEO_INT, pl.Float64),
          **dict.fromkeys(CRITEO_CAT, pl.String)}


def parse_only(path: Path, chunk_rows: int) -> int:
    rows = 0
    for block in iter_blocks(path, chunk_rows):
        rows += pl.read_csv(io.BytesIO(block.data), has_header=False, separator="\t", schema=SCHEMA,
                            quote_char=None).height
    return rows


def reader(path: Path, chunk_rows: int, hash_too: bool, kernel: bool = False) -> int:
    cfg = DataConfig()
    seeds = {c: field_seed(c, 0) for c in CRITEO_CAT}
    rows = 0
    for chunk in iter_raw_chunks(cfg, [path], chunk_rows, hash_categoricals=kernel):
        rows += chunk.frame.height
        if hash_too and not kernel:
            for c in CRITEO_CAT:
                hash_ids(chunk.frame[c], seeds[c], cfg.hash_bins)
    return rows


def best_of(fn, repeat: int) -> tuple[float, int]:
    best, rows = float("inf"), 0
    for _ in range(repeat):
        t = time.perf_counter()
        rows = fn()
        best = min(best, time.perf_counter() - t)
    return best, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file", type=Path)
    ap.add_argument("--chunk-rows", type=int, default=250_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    mb = args.file.stat().st_size / 1e6
    runs = {
        "polars parse-only (same blocks)": lambda: parse_only(args.file, args.chunk_rows),
        "iter_raw_chunks via polars (checked, typed)": lambda: reader(args.file, args.chunk_rows, False),
        "iter_raw_chunks + hash_ids x26": lambda: reader(args.file, args.chunk_rows, True),
    }
    if native() is not None:
        runs["kernel: checked, typed, hashed x26"] = lambda: reader(args.file, args.chunk_rows, True, True)
    base = None
    print(f"file: {args.file} ({mb:.0f} MB), chunk_rows={args.chunk_rows:,}")
    for name, fn in runs.items():
        t, rows = best_of(fn, args.repeat)
        base = base or t
        print(f"{name:<44} {t:6.2f} s  {rows / t / 1e6:5.2f}M rows/s  {mb / t:6.1f} MB/s  "
              f"speed vs parse-only {base / t:.2f}x")


if __name__ == "__main__":
    main()
