"""Benchmark: `build_shards` vs a polars pass that only reads the same file.

Usage: python benchmarks/bench_shard.py [--format criteo|parquet] [--rows 2000000 [8000000 ...]]
                                        [--chunk-rows N] [--repeat R] [--set data.k=v ...] [--data .bench/shard]

For each size it writes (once, cached under --data) a synthetic file with `ctrpipe.synth`, then runs in
separate subprocesses, one at a time (R times each, alternating, medians reported):
  criteo:  (a) parse only: polars `scan_csv(...).collect_batches()` with the Criteo schema, no transforms;
           (b) the shard build with cfgs/criteo.yaml (hashing, signed log1p, random split, stratified folds).
           Goals: b/a >= 0.7, peak RSS < 2 GiB and flat between sizes.
  parquet: (a) `polars.read_parquet` of the whole file (every column, all cores);
           (b) the shard build with cfgs/parquet_example.yaml: vocabulary categoricals (one shared with the
           sequence), median imputation with standardisation, a sequence, multi-hot and weighted multi-hot
           columns, co-visitation of inventory_id with the sequence, random split, stratified folds; two
           passes over the file (statistics, then shards). Goals: b/a >= 0.25, and peak RSS bounded as rows
           grow beyond what the fitted vocabularies and co-visitation tables need.
Each child reports wall seconds, CPU seconds (user + sys, all threads) and its own peak RSS
(VmHWM; ru_maxrss off Linux). Printed: rows/s, MB/s, peak RSS and the ratio b/a (throughput of the
build relative to the read-only pass, by wall time and by CPU time). On a shared machine, compare the
CPU-time ratio as well: wall time includes other processes. `--set` overrides the build's config (e.g.
`--set data.covisit=[]` to see what co-visitation costs); `CTRPIPE_NATIVE=0` measures the polars + numpy path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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


def child_read_parquet(path: Path) -> dict[str, float]:
    import polars as pl

    t0, c0 = time.perf_counter(), time.process_time()
    rows = pl.read_parquet(path).height
    return {"rows": rows, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def as_ctrpipe_shard() -> None:
    """Set the process up as `ctrpipe shard` does, before polars or pyarrow start threads: malloc arenas shared.
    Callers also load configs with resolve_model=False, as the command does (no torch in the process)."""
    from ctrpipe.hostmem import share_main_arena

    share_main_arena()


def child_build(path: Path, out: Path, cfg_name: str, overrides: list[str]) -> dict[str, float]:
    """The build as `ctrpipe shard` runs it."""
    as_ctrpipe_shard()
    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    cfg = load_config(REPO / "cfgs" / cfg_name, overrides, resolve_model=False)
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
    elif kind == "read_parquet":
        res = child_read_parquet(path)
    else:
        res = child_build(path, Path(argv[2]), argv[3], argv[4:])
    res["peak_rss_mb"] = own_peak_mb()
    print(json.dumps(res))


def own_peak_mb() -> float:
    """This process's peak RSS since its exec, in MB (`hostmem.peak_rss`: VmHWM, not ru_maxrss, which Linux
    carries over from the parent that generated the data)."""
    from ctrpipe.hostmem import peak_rss

    return peak_rss() / 2**20


def ensure_data(data: Path, rows: int, fmt: str = "criteo") -> Path:
    from ctrpipe.synth import GENERATOR_VERSION, synth_criteo, synth_parquet

    if fmt == "parquet":      # the folder names the generator version: its columns follow the config
        folder = data / f"parquet_v{GENERATOR_VERSION}_{rows}"
        path = folder / "train.parquet"
        if not path.is_file():
            print(f"writing {rows:,} synthetic Parquet rows to {path} ...", flush=True)
            synth_parquet(folder, rows=rows, seed=0)
        return path
    folder = data / f"criteo_{rows}"
    path = folder / "train.tsv"
    if not path.is_file():
        print(f"writing {rows:,} synthetic Criteo rows to {path} ...", flush=True)
        synth_criteo(folder, rows=rows, seed=0)
    return path


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run of median wall time (its CPU time and peak RSS with it); peak RSS is the largest of all."""
    best = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    return {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", choices=["criteo", "parquet"], default="criteo")
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="default: 2,000,000 (criteo), 1,000,000 (parquet)")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="default: the configs' 100k")
    ap.add_argument("--repeat", type=int, default=1, help="runs of (a) and (b) each, alternating; medians")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="build config override")
    ap.add_argument("--data", type=Path, default=REPO / ".bench" / "shard")
    args = ap.parse_args()
    parquet = args.format == "parquet"
    cfg_name = "parquet_example.yaml" if parquet else "criteo.yaml"
    chunk_rows = args.chunk_rows or 100_000
    overrides = [f"data.chunk_rows={chunk_rows}", *args.overrides]
    a_name, goal = ("(a) polars read_parquet", 0.25) if parquet else ("(a) polars parse only", 0.7)
    results = []
    for rows in args.rows or [1_000_000 if parquet else 2_000_000]:
        path = ensure_data(args.data, rows, args.format)
        mb = path.stat().st_size / 1e6
        out = args.data / f"cache_{args.format}_{rows}"
        a_runs, b_runs = [], []
        for _ in range(args.repeat):
            a_runs.append(run_child(["read_parquet", str(path)] if parquet
                                    else ["parse", str(path), str(chunk_rows)]))
            b_runs.append(run_child(["build", str(path), str(out), cfg_name, *overrides]))
            shutil.rmtree(out, ignore_errors=True)
        a, b = median_run(a_runs), median_run(b_runs)
        assert a["rows"] == b["rows"] == rows, (a, b)
        what = "Parquet (zstd)" if parquet else "text"
        print(f"\n{rows:,} rows, {mb:.0f} MB of {what}, chunk_rows {chunk_rows:,}, {args.repeat} run(s) each "
              f"(median){', ' + ' '.join(args.overrides) if args.overrides else ''}")
        print(f"{'':<28}{'wall s':>8}{'cpu s':>8}{'rows/s':>12}{'MB/s':>8}{'peak RSS':>11}")
        for name, r in ((a_name, a), ("(b) build_shards", b)):
            print(f"{name:<28}{r['seconds']:8.2f}{r['cpu_seconds']:8.2f}{rows / r['seconds']:12,.0f}"
                  f"{mb / r['seconds']:8.1f}{r['peak_rss_mb']:9.0f} MB")
        if args.repeat > 1:
            for name, runs in ((a_name, a_runs), ("(b) build_shards", b_runs)):
                print(f"  {name} wall s of each run: " + ", ".join(f"{r['seconds']:.2f}" for r in runs))
        print(f"ratio b/a (throughput): wall {a['seconds'] / b['seconds']:.3f}, "
              f"cpu {a['cpu_seconds'] / b['cpu_seconds']:.3f}   (goal >= {goal})")
        results.append((rows, b["peak_rss_mb"]))
    if len(results) > 1:
        (r0, m0), (r1, m1) = results[0], results[-1]
        print(f"\npeak RSS of the build: {m0:.0f} MB at {r0:,} rows, {m1:.0f} MB at {r1:,} rows "
              f"(x{m1 / m0:.2f} for x{r1 / r0:.0f} rows; goal: flat and < 2048 MB)")


if __name__ == "__main__":
    main()
