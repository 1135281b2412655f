"""Benchmark: data-parallel training on this CPU -- samples/s of one process x 2 threads against torchrun with
2 processes x 1 thread, and what the embedding-gradient exchange moves and costs against the alternatives.

Usage: python benchmarks/bench_ddp.py [--rows 200000] [--hash-bins 1000000] [--models dnn,dcnv2]
           [--batch-size 4096] [--steps 40] [--repeat 1] [--reps 3] [--skip-e2e] [--skip-micro]

Data: `ctrpipe synth --rows N` then `ctrpipe shard --cfg cfgs/criteo.yaml --set data.hash_bins=H` (26 hashed
fields: one 26H x 16 fp32 table), written once under .bench/ddp/ and reused.

* e2e: `ctrpipe train --cfg cfgs/criteo_<model>.yaml` (lazy_adam, fp32, batch --batch-size, --steps steps), once as
  one process with train.num_threads=2, once as `torchrun --nproc_per_node 2 -m ctrpipe.cli train ...` with
  train.num_threads=1 per rank: the same 2 cores either way. samples/s is metrics.json's (training time only:
  evaluations and checkpoint writes are left out); the exchange bytes are the ones the run reports. With
  --repeat N the two alternate N times and the best of each counts (a busy machine then hurts both alike).
* micro (the design choice): two gloo processes, each with the gradient of its share of one real batch
  (sparse table gradient of cfgs/criteo_dnn.yaml at --batch-size), time per step of
    rows    ctrpipe's RowExchange: an all_gather of row counts, one of (ids, rows), a rank-ordered sum
    sparse  torch.distributed.all_reduce of the sparse gradient (gloo only: NCCL has no sparse all-reduce)
    dense   all_reduce of the table-sized dense gradient (DDP over tables built with sparse=False)
  and the bytes each rank sends per step (ring all-reduce: 2 (W-1)/W x the table; all_gather: (W-1) x the
  payload). Best of --reps.

Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".bench" / "ddp"
CLI = [sys.executable, "-m", "ctrpipe.cli"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_cache(rows: int, hash_bins: int) -> Path:
    """synth + shard once; reused while the manifest has the same row count."""
    from ctrpipe.shard.manifest import read_manifest

    synth, cache = ROOT / f"synth_{rows}", ROOT / f"cache_{rows}_{hash_bins}"
    try:
        if read_manifest(cache).rows.get("total") == rows:
            return cache
    except Exception:  # noqa: BLE001 - absent or stale: rebuild
        pass
    if not (synth / "train.tsv").is_file():
        subprocess.run([*CLI, "synth", "--rows", str(rows), "--seed", "0", "--out", str(synth), "-q"], check=True)
    subprocess.run([*CLI, "shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(synth / "train.tsv"),
                    "--out", str(cache), "--set", f"data.hash_bins={hash_bins}", "--set", "data.folds.n_splits=0",
                    "--force", "-q"], check=True)
    return cache


# ----------------------------------------------------------------------------------------------- end to end

def train_sets(model: str, batch: int, steps: int, threads: int, exp: str) -> list[str]:
    values = [f"exp_name={exp}", f"loader.batch_size={batch}", f"train.max_steps={steps}", "train.min_steps=0",
              "train.embedding_optimizer=lazy_adam", "model.dropout=0.0", "train.evals_per_epoch=1",
              "train.early_stopping.patience=0", f"train.num_threads={threads}", "train.log_every=20",
              "infer.calibration.method=none", "train.amp=off"]
    return [a for v in values for a in ("--set", v)]


def e2e(cache: Path, model: str, batch: int, steps: int, world: int) -> dict:
    runs = ROOT / "runs"
    exp = f"{model}_{world}x{2 // world}"
    subprocess.run(["rm", "-rf", str(runs / exp)], check=True)
    args = ["train", "--cfg", str(REPO / "cfgs" / f"criteo_{model}.yaml"), "--shards", str(cache), "--runs",
            str(runs), "-q", *train_sets(model, batch, steps, 2 // world, exp)]
    if world == 1:
        cmd = [*CLI, *args]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc_per_node", str(world), "--master_port", str(free_port()), "-m", "ctrpipe.cli",
               *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    m = json.loads((runs / exp / "metrics.json").read_text())
    return {"samples_per_s": m["samples_per_s"], "wall": wall, "auc": m["val"].get("auc"),
            "exchange": m.get("exchange", {})}


# ----------------------------------------------------------------------------------------------- micro

def micro_rank(cache: Path, batch: int, reps: int) -> dict:
    """One rank of the micro benchmark (started by `micro`, torchrun's environment)."""
    import torch.distributed as dist

    from ctrpipe.config import load_config
    from ctrpipe.loader.loader import ShardLoader
    from ctrpipe.loader.view import RowView
    from ctrpipe.models.heads import as_output
    from ctrpipe.models.layers.embedding import named_tables
    from ctrpipe.models.registry import build_model
    from ctrpipe.train.distributed import Distributed, RowExchange, rank_info

    torch.set_num_threads(1)
    info = rank_info()
    assert info is not None
    group = Distributed(info, torch.device("cpu"), timeout_s=600)
    cfg = load_config(REPO / "cfgs" / "criteo_dnn.yaml", ["model.dropout=0.0"])
    loader = ShardLoader(cache, RowView.train(), batch, shuffle=True, seed=0, drop_last=True, rank=info.rank,
                         world_size=info.world_size)
    torch.manual_seed(0)
    model = build_model("dnn", cfg.model.params, loader.spec, sparse=True)
    out = as_output(model(next(iter(loader))))
    torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.rand_like(out.logits)).backward()
    tables = named_tables(model)
    local = {n: p.grad for n, p in tables.items()}
    exchange = RowExchange(group, tables, dense=False)
    times: dict[str, list[float]] = {"rows": [], "sparse": [], "dense": []}
    dense = {n: torch.zeros_like(p) for n, p in tables.items()}
    for _ in range(reps):
        for n, p in tables.items():
            p.grad = local[n].clone()
        dist.barrier()
        t0 = time.perf_counter()
        exchange()
        times["rows"].append(time.perf_counter() - t0)
        grads = [g.clone() for g in local.values()]
        dist.barrier()
        t0 = time.perf_counter()
        for g in grads:
            dist.all_reduce(g)
        times["sparse"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        for g in dense.values():
            dist.all_reduce(g)
        times["dense"].append(time.perf_counter() - t0)
    lookups = sum(g._indices().shape[1] for g in local.values())
    touched = sum(g.coalesce()._nnz() for g in local.values())
    w = info.world_size
    result = {"ms": {k: 1e3 * min(v) for k, v in times.items()},
              "bytes_sent": {"rows": (w - 1) * exchange.bytes_sent / exchange.steps,
                             "dense": 2 * (w - 1) / w * exchange.dense_bytes()},
              "lookups": lookups, "touched_rows": touched, "table_bytes": exchange.dense_bytes()}
    group.close()
    return result


def micro(cache: Path, batch: int, reps: int) -> dict:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    out = ROOT / "micro"
    out.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, "--micro-rank", "--cache", str(cache), "--batch-size",
                               str(batch), "--reps", str(reps), "--out", str(out / f"rank{r}.json")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    if any(p.wait() for p in procs):
        raise SystemExit("micro benchmark failed")
    return json.loads((out / "rank0.json").read_text())


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--hash-bins", type=int, default=1_000_000)
    ap.add_argument("--models", default="dnn,dcnv2")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--micro-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.micro_rank:
        result = micro_rank(a.cache, a.batch_size, a.reps)
        if int(os.environ["RANK"]) == 0:
            a.out.write_text(json.dumps(result))
        return
    cache = build_cache(a.rows, a.hash_bins)
    print(f"cache {cache} ({a.rows:,} rows, 26 x {a.hash_bins:,} table rows); {load()}")
    if not a.skip_e2e:
        print(f"\ne2e: batch {a.batch_size} (global), {a.steps} steps, lazy_adam")
        print("| model | 1 process x 2 threads | 2 processes x 1 thread (torchrun) | ratio | rows sent / step / rank "
              "| dense table / step | val AUC 1 / 2 |")
        print("|---|---|---|---|---|---|---|")
        for model in a.models.split(","):
            runs = [(e2e(cache, model, a.batch_size, a.steps, 1), e2e(cache, model, a.batch_size, a.steps, 2))
                    for _ in range(a.repeat)]
            one = max((r[0] for r in runs), key=lambda r: r["samples_per_s"])
            two = max((r[1] for r in runs), key=lambda r: r["samples_per_s"])
            ex = two["exchange"]
            print(f"| {model} | {one['samples_per_s']:,.0f} samples/s | {two['samples_per_s']:,.0f} samples/s | "
                  f"{two['samples_per_s'] / one['samples_per_s']:.2f} | {mb(ex['row_bytes_per_step'])} | "
                  f"{mb(ex['dense_bytes_per_step'])} | {one['auc']:.5f} / {two['auc']:.5f} |", flush=True)
        print(load())
    if not a.skip_micro:
        r = micro(cache, a.batch_size, a.reps)
        print(f"\nmicro: one exchange of table gradients, 2 gloo ranks, batch {a.batch_size} (global): "
              f"{r['lookups']:,} lookups per rank touch {r['touched_rows']:,} rows; table {mb(r['table_bytes'])}")
        print("| exchange | ms per step | bytes sent per rank per step |")
        print("|---|---|---|")
        print(f"| rows (RowExchange) | {r['ms']['rows']:,.1f} | {mb(r['bytes_sent']['rows'])} |")
        print(f"| sparse all_reduce (gloo only) | {r['ms']['sparse']:,.1f} | - |")
        print(f"| dense all_reduce | {r['ms']['dense']:,.1f} | {mb(r['bytes_sent']['dense'])} |")
        print(load())


if __name__ == "__main__":
    main()
