"""Benchmark: hashing Criteo-like categorical columns, numpy xxh64 vs distinct values + Python xxhash.

Usage: python benchmarks/bench_hash.py [--rows 500000] [--cols 26] [--repeat 3] [--zipf-a 1.2]
Prints values/s of each approach on the same data and the ratio, plus a polars parse-only baseline of the same
rows written as tab-separated text (what the shard build is judged against).

Why hashing looks as it does: a plain numpy xxh64 over whole arrays lost to hashing each column's distinct
values with Python xxhash; reading polars' string views in place and running the arithmetic in 32k-row blocks
with in-place ufuncs beats it. The polars-hash plugin computes the same hash, but once the modulo and the
missing mask are polars expressions too it gains too little to justify a new dependency. For Criteo text the
shard build hashes in the compiled kernel (ctrpipe/_native.c) instead, straight from the bytes while it checks
the fields, so the 26 string columns are never built at all. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import polars as pl

from ctrpipe.data.hashing import field_seed, hash_ids, xxh64_strings, xxh64_strings_unique


def make_columns(rows: int, cols: int, seed: int = 0, zipf_a: float = 1.2) -> list[pl.Series]:
    """Zipf-distributed 8-hex-digit values with Criteo-like cardinalities (10 .. 1M) and ~10% missing."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(cols):
        vocab = int(10 ** (1 + 5 * j / max(cols - 1, 1)))
        ranks = np.minimum(rng.zipf(zipf_a, rows), vocab) - 1
        codes = (ranks * 2654435761 + j) % 2**32
        series = pl.Series(f"C{j + 1}", np.char.mod("%08x", codes), dtype=pl.String)
        out.append(series.scatter(np.flatnonzero(rng.random(rows) < 0.1), None))
    return out


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--cols", type=int, default=26)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--zipf-a", type=float, default=1.2, help="smaller -> more distinct values per column")
    args = ap.parse_args()
    columns = make_columns(args.rows, args.cols, zipf_a=args.zipf_a)
    seeds = [field_seed(s.name, 0) for s in columns]
    n_values = args.rows * args.cols
    uniq = sum(s.n_unique() for s in columns)
    print(f"data: {args.rows:,} rows x {args.cols} columns = {n_values:,} values, "
          f"{uniq:,} distinct (sum per column)")

    pairs = list(zip(columns, seeds, strict=True))
    for s, sd in pairs[:3] + pairs[-3:]:     # both approaches give identical hashes
        assert np.array_equal(xxh64_strings(s, sd), xxh64_strings_unique(s, sd))

    t_vec = best_of(lambda: [xxh64_strings(s, sd) for s, sd in pairs], args.repeat)
    t_uniq = best_of(lambda: [xxh64_strings_unique(s, sd) for s, sd in pairs], args.repeat)
    t_ids = best_of(lambda: [hash_ids(s, sd, 1_000_000) for s, sd in pairs], args.repeat)

    frame = pl.DataFrame(columns)
    buf = io.BytesIO()
    frame.write_csv(buf, separator="\t", include_header=False)
    raw = buf.getvalue()
    schema = {s.name: pl.String for s in columns}
    t_parse = best_of(lambda: pl.read_csv(io.BytesIO(raw), has_header=False, separator="\t", schema=schema,
                                          quote_char=None), args.repeat)

    def line(name: str, t: float) -> str:
        rates = f"{n_values / t / 1e6:7.2f}M values/s  {args.rows / t / 1e6:6.2f}M rows/s"
        return f"{name:<44} {t:7.3f} s  {rates}"

    print(line("numpy xxh64, every row (xxh64_strings)", t_vec))
    print(line("distinct + python xxhash + join", t_uniq))
    print(line("hash_ids (numpy xxh64 + modulo, int32)", t_ids))
    print(line(f"baseline: polars parse of the {len(raw) / 1e6:.0f} MB text", t_parse))
    print(f"ratio distinct+python / numpy time: {t_uniq / t_vec:.2f}x  (>1 means numpy is faster)")
    print(f"hash_ids time / parse time: {t_ids / t_parse:.2f}")


if __name__ == "__main__":
    main()
