"""Benchmark `ctrpipe blend submissions` (external hash partition) against a polars in-memory join.

Writes F submission files of N rows with the same IDs in different (shuffled) orders, then blends them
twice, each in its own subprocess so peak RSS is that method's alone:
  ctrpipe   run_blend (streaming, P bucket files on disk)
  polars    read every file fully, inner-join on ID keeping the first file's order, same combine(), write
Prints rows/s and peak RSS for both, their ratio, and checks that both outputs agree.

    python benchmarks/bench_blend.py --rows 5000000 --files 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shard import own_peak_mb  # noqa: E402 - the sibling benchmark's helper

ROOT = Path(__file__).resolve().parents[1]


def make_files(folder: Path, rows: int, files: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    ids = np.arange(60_000_000, 60_000_000 + rows, dtype=np.int64)
    paths = []
    for j in range(files):
        perm = ids if j == 0 else rng.permutation(ids)
        path = folder / f"sub{j}.csv"
        pl.DataFrame({"ID": perm, "clicked": rng.random(rows).astype(np.float32)}).write_csv(path)
        paths.append(path)
    return paths


def run_ctrpipe(paths: list[Path], out: Path, method: str) -> None:
    from ctrpipe.infer.blend import run_blend

    run_blend(paths, method, None, out, quiet=True)


def run_polars(paths: list[Path], out: Path, method: str) -> None:
    from ctrpipe.infer.ensemble import combine

    frames = [pl.read_csv(p, schema={"ID": pl.String, "clicked": pl.Float64}).rename({"clicked": f"p{j}"})
              for j, p in enumerate(paths)]
    joined = frames[0]
    for f in frames[1:]:
        joined = joined.join(f, on="ID", how="inner", maintain_order="left")
    if joined.height != frames[0].height:
        raise SystemExit("ID sets differ")
    mat = np.stack([joined[f"p{j}"].to_numpy() for j in range(len(paths))])
    pl.DataFrame({"ID": joined["ID"], "clicked": combine(mat, method)}).write_csv(out)


def child(which: str, paths: list[Path], out: Path, method: str) -> None:
    t0 = time.perf_counter()
    (run_ctrpipe if which == "ctrpipe" else run_polars)(paths, out, method)
    seconds = time.perf_counter() - t0
    peak_mb = own_peak_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--method", default="logit_mean")
    ap.add_argument("--child", choices=["ctrpipe", "polars"])
    ap.add_argument("--paths", nargs="*", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.paths, args.out, args.method)
        return
    (ROOT / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = make_files(folder, args.rows, args.files)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{args.files} files x {args.rows:,} rows ({size_mb:.0f} MB CSV, shuffled IDs) "
              f"written in {time.perf_counter() - t0:.1f}s; method {args.method}")
        results = {}
        for which in ("ctrpipe", "polars"):
            out = folder / f"{which}.csv"
            cmd = [sys.executable, __file__, "--child", which, "--method", args.method, "--out", str(out),
                   "--paths", *map(str, paths)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[which] = json.loads(res.stdout.strip().splitlines()[-1])
            r = results[which]
            rate = args.rows * args.files / r["seconds"]
            print(f"  {which:8s} {r['seconds']:7.1f}s  {rate / 1e6:6.2f}M input rows/s  "
                  f"peak RSS {r['peak_mb']:7.0f} MB")
        a = pl.read_csv(folder / "ctrpipe.csv", schema={"ID": pl.String, "clicked": pl.Float64})
        b = pl.read_csv(folder / "polars.csv", schema={"ID": pl.String, "clicked": pl.Float64})
        same_ids = a["ID"].equals(b["ID"])
        max_diff = float(np.max(np.abs(a["clicked"].to_numpy() - b["clicked"].to_numpy())))
        c, p = results["ctrpipe"], results["polars"]
        print(f"  ctrpipe / polars: time x{c['seconds'] / p['seconds']:.2f}, "
              f"peak RSS x{c['peak_mb'] / p['peak_mb']:.2f}; same IDs and order: {same_ids}, "
              f"max |diff| {max_diff:.2e}")


if __name__ == "__main__":
    main()
