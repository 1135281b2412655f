"""Benchmark: training samples/s from shards (end to end) against the same model on device-resident batches.

Usage: python benchmarks/bench_train.py [--rows 400000] [--hash-bins 1000000] [--models dnn,deepfm,dcnv2]
           [--batch-sizes 4096,16384] [--steps 20] [--device cpu|cuda] [--amp off|bf16] [--threads 2]
           [--embedding-optimizer lazy_adam] [--dropout 0] [--repeat 2]

Data: `ctrpipe synth --rows N` then `ctrpipe shard --cfg cfgs/criteo.yaml --set data.hash_bins=H` (26 hashed
fields x H rows of one shared table, 13 numeric columns), written once under .bench/train/ and reused.
Each model is built from cfgs/criteo_<model>.yaml (+ the --set overrides this script passes: printed first)
with the optimisers `ctrpipe train` builds (train/optim.py) and trained with the fit loop's own step
function (`loop.train_step`, with the run's `Objective`), lr schedule and on-device loss sum. Per model and batch size:

* e2e      samples/s of `--steps` steps fed by a ShardLoader over the train split (shuffled, background
           thread, host->device copies on CUDA): what `ctrpipe train` gets;
* ceiling  samples/s of `--steps` steps over 8 pre-built batches already on the device, cycled: the model's
           own speed, nothing to wait for;
* ratio    e2e / ceiling (on a GPU the loader should keep it >= 0.9 at batch 16384);
* opt%     share of a step spent in the optimiser steps (one instrumented pass with device syncs).

e2e and ceiling alternate `--repeat` times (best of each), so a busy machine hurts both alike; the load average
is printed with every table. Memory note: a 1M-bin cache makes a 26M x 16 fp32 table (1.7 GB); lazy_adam and
sparse_adam add two moments of that size, adagrad one, sgd none; dense adam adds two AND rewrites all of it
every step. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from itertools import cycle, islice
from pathlib import Path

import torch

from ctrpipe.config import load_config
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.models.heads import heads_of
from ctrpipe.models.registry import build_model
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.train.loop import train_step
from ctrpipe.train.objective import Objective, build_tasks
from ctrpipe.train.optim import build_optimizers, lr_factor, set_lr

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / ".bench" / "train"
CEILING_BATCHES = 8


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def build_cache(rows: int, hash_bins: int) -> Path:
    """synth + shard once; reused while the manifest has the same row count."""
    synth = ROOT / f"synth_{rows}"
    cache = ROOT / f"cache_{rows}_{hash_bins}"
    try:
        if read_manifest(cache).rows.get("total") == rows:
            return cache
    except Exception:  # noqa: BLE001 - absent or stale: rebuild
        pass
    cli = [sys.executable, "-m", "ctrpipe.cli"]
    if not (synth / "train.tsv").is_file():
        subprocess.run([*cli, "synth", "--rows", str(rows), "--seed", "0", "--out", str(synth), "-q"], check=True)
    subprocess.run([*cli, "shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(synth / "train.tsv"),
                    "--out", str(cache), "--set", f"data.hash_bins={hash_bins}", "--set", "data.folds.n_splits=0",
                    "--force", "-q"], check=True)
    return cache


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model + its optimisers, stepped exactly as `loop.fit` steps them (schedule, step fn, loss sum)."""

    def __init__(self, name: str, overrides: list[str], spec, device: torch.device) -> None:  # noqa: ANN001
        cfg = load_config(REPO / "cfgs" / f"criteo_{name}.yaml", overrides)
        self.cfg = cfg.train
        self.device = device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model.name, cfg.model.params, spec,
                                 sparse=cfg.train.sparse_embeddings).to(device)
        self.model.train()
        self.optimizers = build_optimizers(self.model, cfg.train, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        tasks = build_tasks(heads_of(self.model, spec), spec, cfg.train)
        self.objective = Objective(tasks, device, cfg.train.pos_weight_clip, cfg.train.pos_weight_clip_mode)
        self.step_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)

    def run(self, batches, steps: int) -> float:  # noqa: ANN001 - an iterable of Batch
        """samples/s of `steps` steps (the loss stays on the device; one sync at the end)."""
        sync(self.device)
        t = time.perf_counter()
        n = 0
        for batch in islice(batches, steps):
            set_lr(self.optimizers, lr_factor(self.step, 10 ** 6, self.cfg))
            loss, _ = train_step(self.step_model, batch, self.objective, self.optimizers, self.scaler, self.cfg,
                                 self.device)
            self.loss_sum += loss
            self.step += 1
            n += len(batch)
        float(self.loss_sum.item())   # sync, as fit does on log steps
        return n / (time.perf_counter() - t)

    def optimizer_share(self, batches: list, steps: int) -> float:
        """Fraction of step time in optimizer.step() (syncs around it: a separate, instrumented pass)."""
        total = opt = 0.0
        originals = [o.step for o in self.optimizers]

        def timed(fn):  # noqa: ANN001, ANN202
            def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
                nonlocal opt
                sync(self.device)
                t = time.perf_counter()
                out = fn(*a, **k)
                sync(self.device)
                opt += time.perf_counter() - t
                return out
            return wrapper

        for o in self.optimizers:
            o.step = timed(o.step)
        try:
            for batch in islice(cycle(batches), steps):
                sync(self.device)
                t = time.perf_counter()
                train_step(self.step_model, batch, self.objective, self.optimizers, self.scaler, self.cfg,
                           self.device)
                sync(self.device)
                total += time.perf_counter() - t
        finally:
            for o, fn in zip(self.optimizers, originals, strict=True):
                o.step = fn
        return opt / total if total > 0 else float("nan")


def endless(loader: ShardLoader):  # noqa: ANN201 - a generator of Batch over as many epochs as needed
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_one(name: str, batch_size: int, cache: Path, args: argparse.Namespace, overrides: list[str],
              device: torch.device) -> dict[str, float]:
    loader = ShardLoader(cache, RowView.train(), batch_size, shuffle=True, seed=0, device=device,
                         drop_last=True)
    trainer = Trainer(name, overrides, loader.spec, device)
    resident = [b for b, _ in zip(endless(loader), range(CEILING_BATCHES), strict=False)]
    trainer.run(cycle(resident), args.warmup)                      # first-touch, autotuning, compile
    e2e, ceiling = [], []
    stream = endless(loader)
    for _ in range(args.repeat):
        e2e.append(trainer.run(stream, args.steps))
        ceiling.append(trainer.run(cycle(resident), args.steps))
    stream.close()
    share = trainer.optimizer_share(resident, max(3, args.steps // 4))
    out = {"e2e": max(e2e), "ceiling": max(ceiling), "opt_share": share,
           "e2e_med": statistics.median(e2e), "ceiling_med": statistics.median(ceiling)}
    del trainer, resident, stream, loader
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--hash-bins", type=int, default=1_000_000, help="per categorical field (cfgs/criteo.yaml)")
    ap.add_argument("--models", default="dnn,deepfm,dcnv2")
    ap.add_argument("--batch-sizes", default="4096,16384")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="e2e/ceiling alternations; best of each is shown")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true", help="train.compile=true")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--embedding-optimizer", default="", help="override train.embedding_optimizer")
    ap.add_argument("--dropout", default="", help="override model.dropout")
    ap.add_argument("--set", action="append", default=[], help="more config overrides, KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cache = build_cache(args.rows, args.hash_bins)
    overrides = [f"train.amp={args.amp}", f"train.compile={str(args.compile).lower()}",
                 f"train.device={args.device}", *args.set]
    if args.embedding_optimizer:
        overrides.append(f"train.embedding_optimizer={args.embedding_optimizer}")
    if args.dropout:
        overrides.append(f"model.dropout={args.dropout}")
    print(f"cache {cache} ({args.rows:,} rows, {args.hash_bins:,} bins x 26 fields), device {device}, "
          f"torch {torch.__version__}, {args.threads} threads, overrides {overrides}", flush=True)
    print(f"{'model':8s} {'batch':>6s} {'e2e/s':>9s} {'ceiling/s':>10s} {'ratio':>6s} {'opt%':>5s}  load",
          flush=True)
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for name in args.models.split(","):
            r = bench_one(name, batch_size, cache, args, overrides, device)
            print(f"{name:8s} {batch_size:6d} {r['e2e']:9,.0f} {r['ceiling']:10,.0f} "
                  f"{r['e2e'] / r['ceiling']:6.2f} {100 * r['opt_share']:4.0f}%  {load()}", flush=True)


if __name__ == "__main__":
    main()
