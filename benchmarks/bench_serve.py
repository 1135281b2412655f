"""Benchmark: serving latency of a trained run: `Predictor.predict` on raw Criteo text rows and the exported
TorchScript module on prepared tensors, per batch size.

Usage: python benchmarks/bench_serve.py [--models dnn dcnv2] [--batch-sizes 1 16 256] [--threads 1]
           [--rows 20000] [--hash-bins 100000] [--calls 300] [--work DIR]

Builds a `ctrpipe synth` Criteo cache with `cfgs/criteo.yaml` (hash bins reduced from 1M to --hash-bins per
field so the tables fit a shared machine: the lookup cost per row does not depend on the table's size),
trains `cfgs/criteo_<model>.yaml` as shipped for a few steps (latency does not depend on the weights) and
exports it with `ctrpipe export --format torchscript`. Then, per batch size B, over --calls calls after a
warm-up, it reports p50 / p99 milliseconds per call and rows/s (B / mean) of:

- predict:    `Predictor.predict(lines)`: B raw text lines -> {head: probabilities} (what a service calls);
- transform:  `Predictor.batch(lines)`: the shard build's reader + transforms + host buffers alone (the part
              of `predict` that is not the model);
- eager:      the baseline: the same serving module (folds, shift, calibration, combine) run eagerly on the
              prepared tensors, under no_grad. It takes the same inputs and gives the same outputs as the
              traced module, so the pair shows what export itself costs or saves. (`ctrpipe infer`-style
              shard-then-predict per call is not a sensible baseline: it writes a cache to disk per call.)
- torchscript: the exported `model.pt` (torch.jit.load) on the same tensors.

Threads: torch.set_num_threads(--threads) for everything (1 by default: a serving process usually pins one
core per worker). Run it on a quiet machine; it prints `os.getloadavg()` first and last.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrpipe.cli import app  # noqa: E402
from ctrpipe.serve.export import ServingModule, example_inputs  # noqa: E402
from ctrpipe.serve.predictor import Predictor  # noqa: E402


def cli(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise SystemExit(f"ctrpipe {' '.join(args[:1])} failed:\n{res.output}{res.exception!r}")


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def prepare(work: Path, models: list[str], rows: int, hash_bins: int) -> tuple[dict[str, Path], list[str]]:
    """A synth cache, one short run + export per model; returns {model: run dir} and raw test lines."""
    data = [f"data.hash_bins={hash_bins}", "data.folds.n_splits=0"]
    if not (work / "cache" / "manifest.json").is_file():
        cli("synth", "--format", "criteo", "--rows", str(rows), "--test-rows", "2000", "--out",
            str(work / "d"), "-q")
        cli("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(work / "d" / "train.tsv"),
            "--out", str(work / "cache"), "-q", *sets(data))
    runs = {}
    for m in models:
        run = work / "runs" / f"criteo_{m}"
        if not (run / "export" / "model.pt").is_file():
            cli("train", "--cfg", str(REPO / "cfgs" / f"criteo_{m}.yaml"), "--shards", str(work / "cache"),
                "--runs", str(work / "runs"), "-q",
                *sets(data + ["train.max_steps=20", "train.min_steps=0", "train.evals_per_epoch=1",
                              "train.device=cpu"]))
            cli("export", "--run", str(run), "--format", "torchscript", "--out", str(run / "export"))
        runs[m] = run
    lines = (work / "d" / "test.tsv").read_text().splitlines()
    return runs, lines


def timed(fn: Callable[[], object], calls: int, warmup: int) -> np.ndarray:
    """Milliseconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        t = time.perf_counter_ns()
        fn()
        out[i] = (time.perf_counter_ns() - t) / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dnn", "dcnv2"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--hash-bins", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--work", type=Path, default=None, help="keep the cache and runs here (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        runs, lines = prepare(work, args.models, args.rows, args.hash_bins)
        print("| model | B | path | p50 ms | p99 ms | rows/s |\n|---|---:|---|---:|---:|---:|")
        for m, run in runs.items():
            p = Predictor.load(run)
            eager = ServingModule(p).eval()
            traced = torch.jit.load(str(run / "export" / "model.pt"))
            for b in args.batch_sizes:
                rows = lines[:b]
                inputs = example_inputs(p, p.batch(rows))
                with torch.no_grad():
                    same = np.abs(eager(inputs).numpy() - traced(inputs).numpy()).max()
                assert same < 1e-5, (m, b, same)
                calls = max(20, args.calls * 16 // max(16, b))       # fewer calls for large batches
                paths: dict[str, Callable[[], object]] = {
                    "predict": lambda r=rows, p=p: p.predict(r),
                    "transform": lambda r=rows, p=p: p.batch(r),
                    "eager": lambda x=inputs, f=eager: f(x),
                    "torchscript": lambda x=inputs, f=traced: f(x),
                }
                with torch.no_grad():
                    for name, fn in paths.items():
                        ms = timed(fn, calls, args.warmup)
                        print(f"| {m} | {b} | {name} | {np.percentile(ms, 50):.3f} | {np.percentile(ms, 99):.3f} "
                              f"| {b / ms.mean() * 1e3:,.0f} |", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
