"""Benchmark: the least CPU time the Parquet build of `bench_shard.py --format parquet` could take with
ctrpipe's own compiled primitives, next to that build and a `polars.read_parquet` of the same file.

Usage: python benchmarks/bench_shard_floor.py [--rows 1000000] [--repeat 3] [--data .bench/shard]

Why: the goal there is b/a >= 0.25 (the build at a quarter of read_parquet's throughput). This measures what
the build's config asks for, one primitive at a time, on one thread, with nothing else running: the two reads
(statistics columns, then every column, in the build's chunks), splitting and hashing the token columns,
hashing the categoricals, counting and looking up vocabularies, counting and scoring co-visitation, the
numeric statistics and transforms, padding, and writing the cache's bytes. Their sum, divided by the cores,
is the wall time of a perfect build on this machine: no Python between the kernels, no waiting, no page
faults beyond the primitives' own. The build's own figures (same run, same machine) show how far it is from
that floor; the floor's ratio shows what these primitives allow at all.

Not counted, so the floor is lower still than any real build: split/fold assignment, labels, ids, tallies,
the fitted tables' sorting and saving, the merge of per-chunk results. Statistics run on every row here (the
build counts only train rows), so fit-side figures are scaled by the train share (roughly: a hash table's
cost is not quite linear in the rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shard import REPO, as_ctrpipe_shard, ensure_data, run_child  # noqa: E402 - the sibling's helpers

CFG = REPO / "cfgs" / "parquet_example.yaml"


@contextmanager
def clock(costs: dict[str, float], name: str) -> Iterator[None]:
    """Adds the CPU time of this thread inside the block to costs[name]."""
    t0 = time.thread_time()
    yield
    costs[name] += time.thread_time() - t0


def floor_costs(path: Path, cache: Path) -> dict[str, float]:
    """CPU seconds per primitive over the whole file."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    from ctrpipe.config import load_config
    from ctrpipe.data.chunks import column_hashes
    from ctrpipe.data.covisit import ContextTokens, CovisitCounter, covisit_features
    from ctrpipe.data.fitted import Fitted, KeyCounter, MomentAccumulator, NumericAccumulator
    from ctrpipe.data.parquet import row_group_slices
    from ctrpipe.data.transforms import log1p_transform
    from ctrpipe.shard.manifest import read_manifest
    from ctrpipe.shard.passes import fit_columns, resolve_plan
    from ctrpipe.shard.transform import ChunkTokens, numeric32

    data = load_config(CFG, [], resolve_model=False).data
    plan = resolve_plan(data, [path])
    manifest = read_manifest(cache)
    fitted = Fitted.load(cache, manifest.fitted)
    train_share = manifest.rows.get("train", 0) / max(manifest.total_rows, 1)
    row_bytes = sum(int(np.prod(f.shape[1:])) * np.dtype(f.dtype).itemsize
                    for f in manifest.shards[0].files.values())
    (seq,) = plan.sequence
    ids_seed, own_seed = plan.token_seed(seq), plan.seed(seq.column)
    cv = plan.covisit[0]
    pairs, ctx_table = fitted.covisit[cv.name]
    cats, nums = plan.categorical, plan.numeric
    fit: dict[str, float] = defaultdict(float)
    write: dict[str, float] = defaultdict(float)
    counters = {c: KeyCounter() for c in cats}
    covisit = CovisitCounter()
    nacc, mom = NumericAccumulator(nums, need_median=True), MomentAccumulator(len(nums))
    fill = np.array([fitted.numeric[c].fill for c in nums], dtype=np.float32)
    mean = np.array([fitted.numeric[c].mean for c in nums], dtype=np.float32)
    std = np.array([fitted.numeric[c].std for c in nums], dtype=np.float32)
    for table in [*fitted.vocab.values(), pairs, ctx_table]:
        _ = table.index         # built before timing, as the build does once
    fit_read = list(fit_columns(plan).raw_columns())
    every = list(plan.columns.raw_columns())
    total = manifest.total_rows
    meta = pq.ParquetFile(path).metadata
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        # a guest page's first use in a VM can cost a host fault: that is the machine's cost, not the build's,
        # so the cache's bytes go into page-cache pages freed just before
        with open(Path(tmp) / "warm.bin", "wb") as warm:
            block = np.ones(data.chunk_rows * row_bytes, dtype=np.uint8)
            for _ in range(0, total, data.chunk_rows):
                warm.write(memoryview(block))
        (Path(tmp) / "warm.bin").unlink()
        with (Path(tmp) / "out.bin").open("wb") as out:
            for row0, n in row_group_slices(groups, data.chunk_rows):      # the build's chunks
                c0 = time.process_time()            # polars reads on all its threads: process time
                frame = pl.scan_parquet(path).select(fit_read).slice(row0, n).collect()
                fit["read (statistics columns)"] += time.process_time() - c0
                tokens = ChunkTokens(plan, frame)
                with clock(fit, "split + hash sequence (2 seeds)"):
                    tokens.kept(seq, ids_seed)
                hashes = {}
                with clock(fit, "hash categoricals"):
                    for c in cats:
                        hashes[c] = column_hashes(frame, c, plan.seed(c))
                with clock(fit, "count vocabularies"):
                    for c in cats:
                        counters[c].add(hashes[c][0][~hashes[c][1]])
                    counters[seq.share_ids_with or seq.column].add(tokens.hashes(seq, ids_seed)[0])
                ctx = ContextTokens(*tokens.hashes(seq, own_seed))
                with clock(fit, "count co-visitation"):
                    t, t_missing = hashes[cv.target]
                    covisit.update(t, t_missing, ctx, np.ones(n, dtype=bool))
                with clock(fit, "numeric statistics"):
                    raw = numeric32(frame, nums).astype(np.float64)
                    nacc.update(raw)
                    valid = np.isfinite(raw)
                    mom.update(np.asarray(log1p_transform(np.where(valid, raw, 0.0), data.numeric.log1p)), valid)

                c0 = time.process_time()
                frame = pl.scan_parquet(path).select(every).slice(row0, n).collect()
                write["read (every column)"] += time.process_time() - c0
                tokens = ChunkTokens(plan, frame)
                with clock(write, "split + hash token columns"):
                    kept = [tokens.kept(tc, plan.token_seed(tc)) for tc in plan.tokens]
                with clock(write, "hash categoricals"):
                    hashes = {c: column_hashes(frame, c, plan.seed(c)) for c in cats}
                with clock(write, "vocabulary ids"):
                    for c in cats:
                        fitted.vocab[c].lookup(*hashes[c])
                with clock(write, "token ids + padding"):
                    for tc, k in zip(plan.tokens, kept, strict=True):
                        assert k is not None, "the compiled kernels are needed for the floor"
                        k.padded(tc.max_len, plan.token_bins(tc, fitted), plan.token_vocab(tc, fitted))
                ctx = ContextTokens(*tokens.hashes(seq, own_seed))
                with clock(write, "co-visitation features"):
                    t, t_missing = hashes[cv.target]
                    covisit_features(pairs, ctx_table, t, t_missing, ctx, cv.smoothing, np.ones(n, dtype=bool))
                with clock(write, "numeric transform"):
                    x = numeric32(frame, nums)
                    missing = np.isnan(x)
                    np.copyto(x, np.broadcast_to(fill, x.shape), where=missing)
                    y = log1p_transform(x, data.numeric.log1p)
                    y -= mean
                    y /= std
                block = np.ones(n * row_bytes, dtype=np.uint8)
                with clock(write, "write the cache's bytes"):
                    out.write(memoryview(block))
                del tokens, frame, kept, hashes, ctx, block
    costs = {f"fit: {k}": v * (1.0 if k.startswith("read") else train_share) for k, v in fit.items()}
    costs.update({f"write: {k}": v for k, v in write.items()})
    return costs


def main() -> None:
    as_ctrpipe_shard()          # the primitives run under the allocator setup the build they are compared to has
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (medians)")
    ap.add_argument("--data", type=Path, default=REPO / ".bench" / "shard")
    args = ap.parse_args()
    path = ensure_data(args.data, args.rows, "parquet")
    cache = args.data / f"floor_cache_{args.rows}"
    reads, builds = [], []
    for _ in range(args.repeat):
        reads.append(run_child(["read_parquet", str(path)]))
        builds.append(run_child(["build", str(path), str(cache), CFG.name, "data.chunk_rows=100000"]))
    runs = [floor_costs(path, cache) for _ in range(args.repeat)]
    costs = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    cores = len(os.sched_getaffinity(0))
    read_wall = statistics.median(r["seconds"] for r in reads)
    build_wall = statistics.median(r["seconds"] for r in builds)
    build_cpu = statistics.median(r["cpu_seconds"] for r in builds)
    floor_cpu = sum(costs.values())
    print(f"\n{args.rows:,} rows of {path.name} ({path.stat().st_size / 1e6:.0f} MB), cfgs/{CFG.name}, "
          f"{cores} cores, medians of {args.repeat}")
    print(f"{'primitive (one thread)':<48}{'CPU s':>8}{'share':>8}")
    for name, sec in sorted(costs.items(), key=lambda kv: -kv[1]):
        print(f"{name:<48}{sec:8.2f}{sec / floor_cpu:8.1%}")
    print(f"{'floor: sum of the primitives':<48}{floor_cpu:8.2f}")
    print(f"\n(a) polars read_parquet: wall {read_wall:.2f} s")
    print(f"(b) the build: wall {build_wall:.2f} s, CPU {build_cpu:.2f} s "
          f"({build_cpu - floor_cpu:+.2f} s over the floor: {build_cpu / floor_cpu:.2f}x)")
    best = floor_cpu / cores
    print(f"floor on {cores} cores, perfectly parallel: wall {best:.2f} s -> b/a at most "
          f"{read_wall / best:.3f} (the build: {read_wall / build_wall:.3f}; goal >= 0.25)")


if __name__ == "__main__":
    main()
