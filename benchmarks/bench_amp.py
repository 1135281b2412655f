"""Benchmark: one model family's training step in fp32 against bf16 autocast on this machine, per family.

Usage (from the repo root, in ctrpipe's venv):
    python benchmarks/bench_amp.py                                  # the single-label families, a synth cache
    python benchmarks/bench_amp.py --cache .bench/multitask/cache_200000_50000_s0 \\
        --cfg 'cfgs/parquet_{model}.yaml' --models shared_bottom,mmoe,ple,deepfm_mmoe,esmm

This is what `train.amp=auto` rests on (ctrpipe/device.py, CPU_BF16_FASTER): auto trains a family in bf16
on a CPU instruction set only where its bf16 step was measured faster than fp32 there. Each family is built
from its config (`--cfg`, `{model}` filled in) with the benchmark settings of bench_quality.py (embedding dim
16, MLP 400-400-400, no dropout; autoint with 2 heads of 8 and numerics into the MLP), and trained with the fit
loop's own `train_step` on 6 batches of the cache held in memory, fp32 and bf16 in alternation. With
`--threads 1` (the default) steps are timed in the thread's CPU time, so other jobs on the machine change the
figures little; with more threads, in wall time (then the machine must be quiet). Prints samples/s of both,
their ratio, and what auto picks here.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from itertools import cycle, islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import ROOT, cpu_model, make_data  # noqa: E402

from ctrpipe.config import load_config  # noqa: E402
from ctrpipe.device import model_family, resolve_amp  # noqa: E402
from ctrpipe.hostmem import keep_freed_memory  # noqa: E402
from ctrpipe.loader.loader import ShardLoader  # noqa: E402
from ctrpipe.loader.view import RowView  # noqa: E402
from ctrpipe.models.heads import heads_of  # noqa: E402
from ctrpipe.models.registry import build_model  # noqa: E402
from ctrpipe.train.loop import train_step  # noqa: E402
from ctrpipe.train.objective import Objective, build_tasks  # noqa: E402
from ctrpipe.train.optim import build_optimizers  # noqa: E402

MODELS = ("dnn", "deepfm", "dcn", "dcnv2", "autoint", "ft_transformer")
DEEP = ["model.embedding_dim=16", "model.hidden_units=[400,400,400]", "model.dropout=0", "model.batch_norm=false"]
SETS = {"dnn": DEEP, "deepfm": [*DEEP, "model.numeric=concat"], "dcn": [*DEEP, "model.numeric=concat"],
        "dcnv2": [*DEEP, "model.numeric=concat"],
        "autoint": ["model.embedding_dim=16", "model.hidden_units=[400,400]", "model.dropout=0",
                    "model.numeric=concat", "model.attention_heads=2", "model.attention_dim=8"],
        "ft_transformer": []}


class Stepper:
    """One model + optimisers + objective at one precision, stepped as `loop.fit` steps them."""

    def __init__(self, cfg_path: Path, sets: list[str], spec, amp: str) -> None:  # noqa: ANN001
        cfg = load_config(cfg_path, ["train.device=cpu", *sets])
        self.name = cfg.model.name
        self.family = model_family(cfg.model.name, cfg.model.params)
        self.cfg = dataclasses.replace(cfg.train, amp=amp)
        torch.manual_seed(0)
        self.model = build_model(cfg.model.name, cfg.model.params, spec, sparse=self.cfg.sparse_embeddings)
        self.model.train()
        tasks = build_tasks(heads_of(self.model, spec), spec, self.cfg)
        self.objective = Objective(tasks, torch.device("cpu"))
        self.optimizers = build_optimizers(self.model, self.cfg, torch.device("cpu"))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)

    def seconds_per_step(self, batches: list, steps: int, clock) -> float:  # noqa: ANN001
        t = clock()
        for batch in islice(cycle(batches), steps):
            train_step(self.model, batch, self.objective, self.optimizers, self.scaler, self.cfg,
                       torch.device("cpu"))
        return (clock() - t) / steps


def bench(model: str, args: argparse.Namespace, batches: list, spec) -> dict:  # noqa: ANN001
    cfg_path = ROOT / args.cfg.format(model=model)
    sets = SETS.get(model, []) + args.set
    steppers = {amp: Stepper(cfg_path, sets, spec, amp) for amp in ("off", "bf16")}
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    for s in steppers.values():
        s.seconds_per_step(batches, 2, clock)                        # first touch, oneDNN primitive caches
    times: dict[str, list[float]] = {"off": [], "bf16": []}
    for i in range(args.repeat):
        for amp in (("off", "bf16") if i % 2 == 0 else ("bf16", "off")):
            times[amp].append(steppers[amp].seconds_per_step(batches, args.steps, clock))
    rows = len(batches[0])
    rate = {amp: rows / statistics.median(t) for amp, t in times.items()}
    choice = resolve_amp("auto", torch.device("cpu"), steppers["off"].family)
    return {"model": model, "fp32": rate["off"], "bf16": rate["bf16"], "ratio": rate["bf16"] / rate["off"],
            "auto": choice.precision}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cache", type=Path, default=None,
                    help="a shard cache (default: bench_quality's synth cache of --rows rows, built once)")
    ap.add_argument("--rows", type=int, default=50_000, help="rows of the default cache")
    ap.add_argument("--cfg", default="cfgs/criteo_{model}.yaml", help="config path, {model} filled in")
    ap.add_argument("--set", action="append", default=[], help="more config overrides, KEY=VALUE")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="steps per timing")
    ap.add_argument("--repeat", type=int, default=4, help="fp32 / bf16 alternations (median shown)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cache = args.cache
    if cache is None:
        data = argparse.Namespace(rows=args.rows, test_rows=10_000, seed=0, hash_bins=20_000, fit_bins=True,
                                  standardize=True)
        cache = make_data(data, ROOT / ".bench" / "amp")
    loader = ShardLoader(cache, RowView.train(), args.batch_size, shuffle=True, seed=0,
                         device=torch.device("cpu"), drop_last=True)
    batches = list(islice(iter(loader), 6))
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s) "
          f"({'thread CPU time' if args.threads == 1 else 'wall time'}), batch {args.batch_size}, cache {cache}")
    print(f"{'model':<15} {'fp32 samples/s':>15} {'bf16 samples/s':>15} {'bf16 / fp32':>12}  auto here")
    for model in [m for m in args.models.split(",") if m]:
        r = bench(model, args, batches, loader.spec)
        print(f"{r['model']:<15} {r['fp32']:>15,.0f} {r['bf16']:>15,.0f} {r['ratio']:>11.2f}x  "
              f"{'bf16' if r['auto'] == 'bf16' else 'fp32'}")


if __name__ == "__main__":
    main()
