"""Benchmark: serving latency of trained runs: `Predictor.predict` on raw rows, its transform part alone, the
serving module run eagerly, and the exported TorchScript and ONNX models, per family, batch size and thread
count.

Usage: python benchmarks/bench_serve.py [--models dnn deepfm dcnv2 autoint ft_transformer mmoe din]
           [--batch-sizes 1 8 64 512 4096] [--threads 1 2] [--rows 20000] [--hash-bins 100000]
           [--budget 0.25] [--max-calls 300] [--work DIR]

Data and runs: `ctrpipe synth` Criteo text sharded with `cfgs/criteo.yaml` for the single-label families
(dnn, deepfm, dcn, dcnv2, autoint, ft_transformer, qnn_alpha), and `ctrpipe synth --format parquet` (two
labels, multi-hot, a behaviour sequence, co-visitation) sharded with `cfgs/parquet_example.yaml` for the
multi-task and sequence families (mmoe, shared_bottom, ple, esmm, deepfm_mmoe, din, dare; din trained on both
labels, as the export tests do). Hash bins are reduced from 1M to --hash-bins per field so the tables fit a
shared machine (the lookup cost per row does not depend on the table's size). Each family trains
`cfgs/<data>_<model>.yaml` as shipped for 20 steps (latency does not depend on the weights) and is exported
with `ctrpipe export --format torchscript` and `--format onnx`. The raw rows are the synth test file's:
Criteo text lines, or slices of the Parquet test table.

Per family, thread count T and batch size B, after a warm-up, it times each path until --budget seconds and
at least 5 calls have passed (at most --max-calls; so fewer calls at large B) and reports p50 / p99
milliseconds per call and rows/s (B / mean):

- predict:     `Predictor.predict(rows)`: B raw rows -> {head: probabilities} (what a service calls);
- transform:   `Predictor.batch(rows)`: the shard build's reader + transforms + host buffers alone, the part of
               `predict` that is not the model (its share of predict is the "transform %" column);
- eager:       the same serving module the exports hold (folds, shift, calibration, combine) run eagerly on the
               prepared tensors under no_grad: the baseline for the exported models (same inputs and outputs);
- torchscript: the exported model.pt (torch.jit.load) on the same tensors;
- onnx:        the exported model.onnx in onnxruntime (CPUExecutionProvider, intra-op threads = T).

Before timing, the three model paths are checked equal to each other to 1e-5 on the rows. Threads:
torch.set_num_threads(T) for predict / transform / eager / torchscript, the session's intra-op threads for onnx;
polars keeps its own pool. Run it on a quiet machine; it prints `os.getloadavg()` first and last.
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
import polars as pl
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrpipe.cli import app  # noqa: E402
from ctrpipe.device import cpu_name  # noqa: E402
from ctrpipe.serve.export import ServingModule, example_inputs, input_names  # noqa: E402
from ctrpipe.serve.predictor import Predictor  # noqa: E402

CRITEO = ("dnn", "deepfm", "dcn", "dcnv2", "autoint", "ft_transformer", "qnn_alpha")
PARQUET = {"mmoe": [], "shared_bottom": [], "ple": [], "esmm": [], "deepfm_mmoe": [],
           "din": ["data.labels=[clicked,converted]"], "dare": ["data.labels=[clicked,converted]"]}


def cli(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise SystemExit(f"ctrpipe {' '.join(args[:1])} failed:\n{res.output}{res.exception!r}")


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def prepare(work: Path, models: list[str], rows: int, hash_bins: int,
            test_rows: int) -> tuple[dict[str, Path], dict[str, object]]:
    """Synth caches, one short run + both exports per model; returns {model: run dir}, {model: raw test rows}."""
    data = [f"data.hash_bins={hash_bins}", "data.folds.n_splits=0"]
    kinds = {m: "criteo" if m in CRITEO else "parquet" for m in models}
    unknown = [m for m in models if m not in CRITEO and m not in PARQUET]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {list(CRITEO) + list(PARQUET)}")
    for kind in sorted(set(kinds.values())):
        if not (work / f"cache_{kind}" / "manifest.json").is_file():
            raw = work / f"d_{kind}"
            cli("synth", "--format", kind, "--rows", str(rows), "--test-rows", str(test_rows), "--out", str(raw),
                "-q")
            inp, cfg = (raw / "train.tsv", "criteo.yaml") if kind == "criteo" else \
                (raw / "train.parquet", "parquet_example.yaml")
            cli("shard", "--cfg", str(REPO / "cfgs" / cfg), "--input", str(inp), "--out", str(work / f"cache_{kind}"),
                "-q", *sets(data))
    lines = (work / "d_criteo" / "test.tsv").read_text().splitlines() if "criteo" in kinds.values() else []
    table = pl.read_parquet(work / "d_parquet" / "test.parquet") if "parquet" in kinds.values() else None
    runs, raw_rows = {}, {}
    for m in models:
        kind = kinds[m]
        name = f"{kind}_{m}"
        run = work / "runs" / name
        if not (run / "export" / "model.onnx").is_file():
            extra = PARQUET.get(m, [])
            cli("train", "--cfg", str(REPO / "cfgs" / f"{name}.yaml"), "--shards", str(work / f"cache_{kind}"),
                "--runs", str(work / "runs"), "-q",
                *sets(data + extra + [f"exp_name={name}", "train.max_steps=20", "train.min_steps=0",
                                      "train.evals_per_epoch=1", "train.device=cpu"]))
            cli("export", "--run", str(run), "--format", "torchscript", "--out", str(run / "export"))
            cli("export", "--run", str(run), "--format", "onnx", "--out", str(run / "export"))
        runs[m] = run
        raw_rows[m] = lines if kind == "criteo" else table
    return runs, raw_rows


def timed(fn: Callable[[], object], budget: float, max_calls: int, warmup: int) -> np.ndarray:
    """Milliseconds per call of `fn` after `warmup` untimed calls: until `budget` seconds and 5 calls have
    passed, or `max_calls`."""
    for _ in range(warmup):
        fn()
    out = []
    start = time.perf_counter()
    while len(out) < max_calls and (len(out) < 5 or time.perf_counter() - start < budget):
        t = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t) / 1e6)
    return np.asarray(out)


def cell(ms: np.ndarray) -> str:
    return f"{np.percentile(ms, 50):.3f} / {np.percentile(ms, 99):.3f}"


def rate(ms: np.ndarray, b: int) -> str:
    return f"{b / ms.mean() * 1e3:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dnn", "deepfm", "dcnv2", "autoint", "ft_transformer", "mmoe",
                                                    "din"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 64, 512, 4096])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--hash-bins", type=int, default=100_000)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timed calls per path and cell")
    ap.add_argument("--max-calls", type=int, default=300)
    ap.add_argument("--work", type=Path, default=None, help="keep the caches and runs here (default: a temp dir)")
    args = ap.parse_args()
    import onnxruntime as ort

    print(f"load average at start: {os.getloadavg()}; cpu: {cpu_name()}, {os.cpu_count()} logical; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}", flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        runs, raw = prepare(work, args.models, args.rows, args.hash_bins, max(args.batch_sizes) + 100)
        print(f"prepared in {time.perf_counter() - t_start:.0f} s", flush=True)
        print("| model | T | B | predict p50 / p99 ms | predict rows/s | transform p50 / p99 | transform % | "
              "eager p50 / p99 | torchscript p50 / p99 | onnx p50 / p99 | onnx rows/s |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
        for m, run in runs.items():
            p = Predictor.load(run)
            eager = ServingModule(p).eval()
            traced = torch.jit.load(str(run / "export" / "model.pt"))
            names = input_names(p.layout)
            for threads in args.threads:
                torch.set_num_threads(threads)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
                session = ort.InferenceSession(str(run / "export" / "model.onnx"), opts,
                                               providers=["CPUExecutionProvider"])
                for b in args.batch_sizes:
                    src = raw[m]
                    rows = src[:b] if isinstance(src, list) else src.slice(0, b)     # type: ignore[union-attr]
                    inputs = example_inputs(p, p.batch(rows))
                    feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
                    with torch.no_grad():
                        want = eager(inputs).numpy()
                        for other in (traced(inputs).numpy(), session.run(None, feeds)[0]):
                            assert np.abs(other - want).max() < 1e-5, (m, b)
                    paths: dict[str, Callable[[], object]] = {
                        "predict": lambda r=rows, p=p: p.predict(r),
                        "transform": lambda r=rows, p=p: p.batch(r),
                        "eager": lambda x=inputs, f=eager: f(x),
                        "torchscript": lambda x=inputs, f=traced: f(x),
                        "onnx": lambda x=feeds, s=session: s.run(None, x),
                    }
                    ms = {}
                    warmup = max(2, min(20, 2000 // b))
                    with torch.no_grad():
                        for name, fn in paths.items():
                            ms[name] = timed(fn, args.budget, args.max_calls, warmup)
                    share = np.percentile(ms["transform"], 50) / np.percentile(ms["predict"], 50) * 100
                    print(f"| {m} | {threads} | {b} | {cell(ms['predict'])} | {rate(ms['predict'], b)} "
                          f"| {cell(ms['transform'])} | {share:.0f}% | {cell(ms['eager'])} "
                          f"| {cell(ms['torchscript'])} | {cell(ms['onnx'])} | {rate(ms['onnx'], b)} |", flush=True)
    print(f"load average at end: {os.getloadavg()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
