"""Benchmark: `build_shards` on synthetic Criteo text vs a polars parse-only pass over the same file.

Usage: python benchmarks/bench_shard.py [--rows 2000000 [8000000 ...]] [--chunk-rows 100000]
                                        [--data .bench/shard]

For each size it writes (once, cached under --data) a synthetic Criteo TSV with `ctrpipe.synth`, then runs
in separate subprocesses, one at a time:
  (a) parse only: polars `scan_csv(...).collect_batches()` with the Criteo schema, no transforms;
  (b) the shard build with cfgs/criteo.yaml (hashing, signed log1p, random split, stratified folds, writes).
Each child reports wall seconds, CPU seconds (user + sys, all threads) and its own peak RSS
(getrusage(RUSAGE_SELF).ru_maxrss). Printed: rows/s, MB/s, peak RSS and the ratio b/a (throughput of the
build relative to the parse-only pass, by wall time and by CPU time). Goals: b/a >= 0.7, peak RSS < 2 GiB and
flat between sizes. On a shared machine, compare the CPU-time ratio: wall time includes other processes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_parse(path: Path, chunk_rows: int) -> dict[str, float]:
    import polars as pl

    from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT

    schema = {"label": pl.Float32, **{c: pl.Float64 for c in CRITEO_INT},
              **{c: pl.String for c in CRITEO_CAT}}
    rows = 0
    t0, c0 = time.perf_counter(), time.process_time()
    lf = pl.scan_csv(path, separator="\t", has_header=False, schema=schema, quote_char=None)
    for batch in lf.collect_batches(chunk_size=chunk_rows):
        rows += batch.height
    return {"rows": rows, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def child_build(path: Path, out: Path, chunk_rows: int) -> dict[str, float]:
    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    cfg = load_config(REPO / "cfgs" / "criteo.yaml", [f"data.chunk_rows={chunk_rows}"])
    t0, c0 = time.perf_counter(), time.process_time()
    res = build_shards(cfg, [path], out, force=True, progress=False)
    return {"rows": res.manifest.total_rows, "shards": len(res.manifest.shards),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def run_child(args: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    """Runs one measured variant; timings exclude imports and config loading."""
    kind, path = argv[0], Path(argv[1])
    if kind == "parse":
        res = child_parse(path, int(argv[2]))
    else:
        res = child_build(path, Path(argv[2]), int(argv[3]))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def ensure_data(data: Path, rows: int) -> Path:
    from ctrpipe.synth import synth_criteo

    folder = data / f"criteo_{rows}"
    path = folder / "train.tsv"
    if not path.is_file():
        print(f"writing {rows:,} synthetic Criteo rows to {path} ...", flush=True)
        synth_criteo(folder, rows=rows, seed=0)
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000])
    ap.add_argument("--chunk-rows", type=int, default=100_000, help="as in cfgs/criteo.yaml")
    ap.add_argument("--data", type=Path, default=REPO / ".bench" / "shard")
    args = ap.parse_args()
    results = []
    for rows in args.rows:
        path = ensure_data(args.data, rows)
        mb = path.stat().st_size / 1e6
        out = args.data / f"cache_{rows}"
        a = run_child(["parse", str(path), str(args.chunk_rows)])
        b = run_child(["build", str(path), str(out), str(args.chunk_rows)])
        shutil.rmtree(out, ignore_errors=True)
        assert a["rows"] == b["rows"] == rows, (a, b)
        print(f"\n{rows:,} rows, {mb:.0f} MB of text, chunk_rows {args.chunk_rows:,}")
        print(f"{'':<28}{'wall s':>8}{'cpu s':>8}{'rows/s':>12}{'MB/s':>8}{'peak RSS':>11}")
        for name, r in (("(a) polars parse only", a), ("(b) build_shards", b)):
            print(f"{name:<28}{r['seconds']:8.2f}{r['cpu_seconds']:8.2f}{rows / r['seconds']:12,.0f}"
                  f"{mb / r['seconds']:8.1f}{r['peak_rss_mb']:9.0f} MB")
        print(f"ratio b/a (throughput): wall {a['seconds'] / b['seconds']:.2f}, "
              f"cpu {a['cpu_seconds'] / b['cpu_seconds']:.2f}   (goal >= 0.7)")
        results.append((rows, b["peak_rss_mb"]))
    if len(results) > 1:
        (r0, m0), (r1, m1) = results[0], results[-1]
        print(f"\npeak RSS of the build: {m0:.0f} MB at {r0:,} rows, {m1:.0f} MB at {r1:,} rows "
              f"(x{m1 / m0:.2f} for x{r1 / r0:.0f} rows; goal: flat and < 2048 MB)")


if __name__ == "__main__":
    main()
