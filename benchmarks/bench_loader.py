"""Benchmark: ShardLoader alone (no model, device cpu) on a Criteo-shaped cache, against a same-run floor.

Usage: python benchmarks/bench_loader.py [--rows 4000000] [--shard-rows 1000000] [--repeat 3]

The cache (13 float32 numeric + 26 int32 categorical + 1 float32 label per row, ~160 B/row, 1M-row shards,
the layout `ctrpipe shard` writes for Criteo) is written once under .bench/ and reused. The floor is a plain
`np.copyto` of the same bytes per batch from the memmaps into reused buffers, in shard order: what any loader
must at least pay. Each figure is samples/s over one whole (shuffled) epoch, best of `--repeat` runs taken in
turn with the floor (so a busy machine hurts all alike), after a warm-up pass that brings the files into
the page cache; the last column is the ratio loader / floor.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import ArrayInfo, ColumnSpec, Manifest, ShardInfo, read_manifest, write_manifest
from ctrpipe.shard.reader import open_cache

ROOT = Path(__file__).resolve().parents[1] / ".bench"
N_INT, N_CAT = 13, 26


def build_cache(out: Path, rows: int, shard_rows: int) -> Path:
    """Write a Criteo-shaped cache with the shard format's files and manifest (skipped when present)."""
    try:
        if read_manifest(out).total_rows == rows:
            return out
    except Exception:  # noqa: BLE001 - absent or stale: rebuild
        pass
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        d = out / f"shard_{s:05d}"
        d.mkdir(exist_ok=True)
        bins = (10 ** (1 + 5 * np.arange(N_CAT) / (N_CAT - 1))).astype(np.int64)
        arrays = {
            "numeric": rng.standard_normal((n, N_INT), dtype=np.float32),
            "categorical": (rng.zipf(1.2, (n, N_CAT)) % bins).astype(np.int32),
            "labels": (rng.random((n, 1)) < 0.25).astype(np.float32),
            "ids": np.arange(start, start + n, dtype=np.int64),
            "split": np.where(rng.random(n) < 0.9, 0, 1).astype(np.int8),
            "fold": np.full(n, -1, np.int8),
        }
        files = {}
        for group, arr in arrays.items():
            np.save(d / f"{group}.npy", arr)
            files[group] = ArrayInfo(f"{d.name}/{group}.npy", arr.shape, str(arr.dtype))
        shards.append(ShardInfo(s, n, start, files))
    cols = ([ColumnSpec(f"I{i + 1}", "numeric", "numeric", "float32", index=i) for i in range(N_INT)]
            + [ColumnSpec(f"C{i + 1}", "categorical", "categorical", "int32", index=i, bins=1_000_000)
               for i in range(N_CAT)]
            + [ColumnSpec("label", "label", "labels", "float32"), ColumnSpec("id", "id", "ids", "int64")])
    write_manifest(out, Manifest(fingerprint="bench", config={}, config_sources={}, role="train", sources=(),
                                 columns=tuple(cols), shards=tuple(shards), rows={"total": rows}, folds={},
                                 label_rates={}, bad_rows={}, fitted={}))
    return out


def floor_rate(cache: Path, batch_size: int, epoch: int) -> float:
    """samples/s of np.copyto of each batch's bytes (numeric, categorical, labels) from the memmaps."""
    arrays = open_cache(cache, groups=("numeric", "categorical", "labels"))
    maps = [arrays.shard(i) for i in range(len(arrays.manifest.shards))]
    bufs = {g: np.empty((batch_size, *a.shape[1:]), a.dtype) for g, a in maps[0].items()}
    t = time.perf_counter()
    rows = 0
    for shard in maps:
        n_rows = len(shard["numeric"])
        for lo in range(0, n_rows, batch_size):
            n = min(batch_size, n_rows - lo)
            for g, a in shard.items():
                np.copyto(bufs[g][:n], a[lo:lo + n])
            rows += n
    return rows / (time.perf_counter() - t)


def loader_rate(cache: Path, batch_size: int, epoch: int, **kw: object) -> float:
    """samples/s of iterating one epoch (plan + reads + thread hand-off), the loader built beforehand."""
    loader = ShardLoader(cache, RowView(("train", "val")), batch_size, seed=0, **kw)  # type: ignore[arg-type]
    loader.set_epoch(epoch)
    t = time.perf_counter()
    rows = sum(len(batch) for batch in loader)
    return rows / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t = time.perf_counter()
    cache = build_cache(ROOT / f"loader_criteo_{args.rows}", args.rows, args.shard_rows)
    mb = sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20
    print(f"cache {cache} ({args.rows:,} rows, {mb:,.0f} MiB, ready in {time.perf_counter() - t:.1f} s); "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
    loader_rate(cache, 16384, 0, shuffle=False)  # warm the page cache
    variants: list[tuple[str, dict[str, object]]] = [
        ("unshuffled", {"shuffle": False}),
        ("block 256, global", {"shuffle": True, "strategy": "block", "block_rows": 256}),
        ("block 256, 1 shard at a time", {"shuffle": True, "strategy": "block", "block_rows": 256,
                                          "window_shards": 1}),
        ("block 64, global", {"shuffle": True, "strategy": "block", "block_rows": 64}),
        ("gather (row permutation)", {"shuffle": True, "strategy": "gather"}),
    ]
    print(f"{'batch':>6}  {'variant':<30} {'samples/s':>12}  {'vs floor':>8}")
    for batch_size in (4096, 16384):
        best = {"floor": 0.0, **{name: 0.0 for name, _ in variants}}
        for r in range(args.repeat):
            best["floor"] = max(best["floor"], floor_rate(cache, batch_size, r))
            for name, kw in variants:
                best[name] = max(best[name], loader_rate(cache, batch_size, r, **kw))
        print(f"{batch_size:>6}  {'floor: np.copyto per batch':<30} {best['floor']:>12,.0f}  {1.0:>8.2f}")
        for name, _ in variants:
            print(f"{batch_size:>6}  {name:<30} {best[name]:>12,.0f}  {best[name] / best['floor']:>8.2f}")
    print(f"load avg after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
