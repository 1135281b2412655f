"""Benchmark: `ctrpipe shard --workers N` over the same 8 input files, N = 1 (the single-process build) vs
N = 2, ... (both passes, statistics and write, mapped over the files on N worker processes).

Usage: python benchmarks/bench_shard_workers.py [--format parquet|criteo] [--rows-per-file 125000]
                                                [--workers 1 2] [--repeat 2] [--data .bench/shard_workers]

Writes (once, cached under --data) 8 synthetic files with `ctrpipe.synth` (seeds 0..7), then builds them in
separate subprocesses, one at a time, alternating the worker counts (R times each, medians reported), with
cfgs/parquet_example.yaml (vocabularies, median imputation, standardisation, co-visitation: a heavy
statistics pass) or cfgs/criteo.yaml with vocabulary categoricals and mean imputation. Printed per worker
count: wall and CPU seconds, rows/s, the ratio to the 1-worker build, the peak RSS of the coordinating process
and the largest peak RSS of one worker process (getrusage RUSAGE_CHILDREN). Each child also checks that its
cache's .npy files hash the same as the first run's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shard import as_ctrpipe_shard, own_peak_mb  # noqa: E402 - the sibling benchmark's helpers

REPO = Path(__file__).resolve().parents[1]
FILES = 8


def child_build(out: Path, fmt: str, workers: int, paths: list[Path]) -> dict[str, float | str]:
    """The build as `ctrpipe shard` runs it."""
    as_ctrpipe_shard()
    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    if fmt == "parquet":
        cfg = load_config(REPO / "cfgs" / "parquet_example.yaml", [], resolve_model=False)
    else:
        cfg = load_config(REPO / "cfgs" / "criteo.yaml", ["data.categorical.mode=vocab",
                                                          "data.categorical.min_count=2",
                                                          "data.numeric.impute=mean"], resolve_model=False)
    t0, c0 = time.perf_counter(), time.process_time()
    res = build_shards(cfg, paths, out, force=True, progress=False, workers=workers)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    h = hashlib.sha256()
    for p in sorted(out.rglob("*.npy")):
        h.update(str(p.relative_to(out)).encode())
        h.update(p.read_bytes())
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"rows": res.manifest.total_rows, "seconds": seconds,
            "cpu_seconds": cpu + kids.ru_utime + kids.ru_stime,
            "peak_rss_mb": own_peak_mb(),
            "worker_peak_rss_mb": kids.ru_maxrss / 1024 if workers > 1 else 0.0, "sha256": h.hexdigest()}


def ensure_files(data: Path, fmt: str, rows: int) -> list[Path]:
    from ctrpipe.synth import GENERATOR_VERSION, synth_criteo, synth_parquet

    paths = []
    for i in range(FILES):
        folder = data / f"{fmt}_v{GENERATOR_VERSION}_{rows}_{i}"
        path = folder / ("train.parquet" if fmt == "parquet" else "train.tsv")
        if not path.is_file():
            print(f"writing {rows:,} synthetic {fmt} rows to {path} ...", flush=True)
            (synth_parquet if fmt == "parquet" else synth_criteo)(folder, rows=rows, seed=i)
        paths.append(path)
    return paths


def run_child(args: list[str]) -> dict[str, float | str]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        out, fmt, workers, *paths = sys.argv[2:]
        print(json.dumps(child_build(Path(out), fmt, int(workers), [Path(p) for p in paths])))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", choices=["parquet", "criteo"], default="parquet")
    ap.add_argument("--rows-per-file", type=int, default=125_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2, help="runs per worker count, alternating; medians")
    ap.add_argument("--data", type=Path, default=REPO / ".bench" / "shard_workers")
    args = ap.parse_args()
    paths = ensure_files(args.data, args.format, args.rows_per_file)
    out = args.data / "cache"
    runs: dict[int, list[dict[str, float | str]]] = {w: [] for w in args.workers}
    for _ in range(args.repeat):
        for w in args.workers:
            runs[w].append(run_child([str(out), args.format, str(w), *map(str, paths)]))
            shutil.rmtree(out, ignore_errors=True)
    digests = {r["sha256"] for rs in runs.values() for r in rs}
    rows = FILES * args.rows_per_file
    print(f"\n{FILES} {args.format} files x {args.rows_per_file:,} rows, {args.repeat} run(s) each (median); "
          f"same cache bytes for every run: {len(digests) == 1}")
    print(f"{'workers':<9}{'wall s':>8}{'cpu s':>8}{'rows/s':>12}{'vs 1':>7}{'coord RSS':>11}{'worker RSS':>12}"
          "   wall s of each run")
    base = None
    for w, rs in runs.items():
        med = sorted(rs, key=lambda r: float(r["seconds"]))[(len(rs) - 1) // 2]
        sec = float(med["seconds"])
        base = base or sec
        print(f"{w:<9}{sec:8.2f}{statistics.median(float(r['cpu_seconds']) for r in rs):8.2f}"
              f"{rows / sec:12,.0f}{base / sec:7.2f}{max(float(r['peak_rss_mb']) for r in rs):8.0f} MB"
              f"{max(float(r['worker_peak_rss_mb']) for r in rs):9.0f} MB   "
              + ", ".join(f"{float(r['seconds']):.2f}" for r in rs))


if __name__ == "__main__":
    main()
