"""Benchmark: `ctrpipe plan`'s memory estimate against the measured peak of a short real run, per model family.

Usage: python benchmarks/bench_plan.py [--rows 200000] [--bins 100000] [--steps 30]
           [--models dnn dcnv2 autoint ft_transformer] [--work .bench/plan] [--set KEY=VALUE ...]
       python benchmarks/bench_plan.py --format parquet --data-cfg cfgs/parquet_mmoe.yaml \
           --cfg 'cfgs/parquet_{model}.yaml' --models mmoe ple shared_bottom esmm
       python benchmarks/bench_plan.py --format parquet --data-cfg cfgs/dare_qnn.yaml \
           --cfg 'cfgs/{model}.yaml' --models parquet_din parquet_dare dare_qnn

Builds a synthetic cache (`ctrpipe synth`; Criteo: `cfgs/criteo.yaml` with data.hash_bins=BINS; Parquet: the
data section of --data-cfg, i.e. labels, vocabularies, sequences, co-visitation; no folds), then for each model
runs `ctrpipe train --cfg` (--cfg with {model} filled in, default cfgs/criteo_{model}.yaml) as it ships (the
Criteo configs: batch 4096, lazy_adam, 4 evaluations per epoch, each saving ckpt_best/ckpt_last) on CPU for
--steps steps, in a child process of its own, and compares the peak memory with `ctrpipe plan`'s estimate for
the same config (computed in this process).

The child measures over a baseline taken after imports and loading, before the model is built: torch, the
CLI, every model module, tensorboard and the training stage are imported, the config and the manifest are
read and one tiny matmul with backward has run (the CPU runtime's own start-up), then the peak is reset
(/proc/self/clear_refs 5). Then `ctrpipe train` runs in the same process. Reported:
  anon  peak RssAnon over the baseline (sampled every millisecond by a thread): the memory the run needs;
        the estimate is compared with this
  hwm   VmHWM over the baseline VmRSS: also counts shard file pages the loader read through its memory maps
        (page cache, reclaimable), which the estimate leaves out
The estimate's working set (steps and evaluation forwards replayed through tools/heap.py's model of glibc
malloc) replaces max(step, eval) in its peak. The ratio is estimate / measured anon; `ctrpipe plan`'s target
is 0.8..1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("dnn", "dcnv2", "autoint", "ft_transformer")


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(args: list[str]) -> None:
    """Run `ctrpipe train ARGS` in this process and print the memory figures as one JSON line."""
    import torch
    import torch.utils.tensorboard  # noqa: F401 - imported by the run log; an import, not training memory

    import ctrpipe.infer.calibrate  # noqa: F401
    import ctrpipe.train.fit  # noqa: F401
    from ctrpipe.cli import app
    from ctrpipe.config import load_config
    from ctrpipe.hostmem import AnonPeak
    from ctrpipe.models.registry import model_names
    from ctrpipe.shard.manifest import read_manifest

    model_names()                                          # imports every model module
    cfg_path = Path(args[args.index("--cfg") + 1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    load_config(cfg_path, sets)
    read_manifest(Path(args[args.index("--shards") + 1]))
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()
    Path("/proc/self/clear_refs").write_text("5")          # VmHWM := VmRSS now
    base = _status()
    t0 = time.perf_counter()
    with AnonPeak(interval=0.001) as anon:                 # RssAnon, every millisecond
        app(["train", *args], standalone_mode=False)
    end = _status()
    print(json.dumps({"anon": (anon.peak or base["RssAnon"]) - base["RssAnon"], "hwm": end["VmHWM"] - base["VmRSS"],
                      "base_rss": base["VmRSS"], "seconds": time.perf_counter() - t0}))


def prepare_parquet(work: Path, rows: int, data_cfg: Path) -> Path:
    data, shards = work / "data_parquet", work / f"shards_parquet_{rows}_{data_cfg.stem}"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ctrpipe.cli", "synth", "--format", "parquet", "--rows", str(rows),
                        "--seed", "0", "--out", str(data), "-q"], check=True)
        subprocess.run([sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", str(data_cfg), "--input",
                        str(data / "train.parquet"), "--out", str(shards), "-q", "--force", "--set",
                        "data.folds.n_splits=0"], check=True)
    return shards


def prepare(work: Path, rows: int, bins: int) -> Path:
    data, shards = work / "data", work / f"shards_{rows}_{bins}"
    if not (shards / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "ctrpipe.cli", "synth", "--format", "criteo", "--rows", str(rows),
                        "--seed", "0", "--out", str(data), "-q"], check=True)
        subprocess.run([sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"),
                        "--input", str(data / "train.tsv"), "--out", str(shards), "-q", "--set",
                        f"data.hash_bins={bins}", "--set", "data.folds.n_splits=0"], check=True)
    return shards


def measure(model: str, cfg_path: Path, shards: Path, work: Path, steps: int, sets: list[str]) -> dict[str, float]:
    runs = work / "runs"
    run_dir = runs / f"plan_{model}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    sets = [f"exp_name=plan_{model}", *sets]
    args = ["--cfg", str(cfg_path), "--shards", str(shards), "--runs", str(runs),
            "-q", "--set", f"train.max_steps={steps}", "--set", "train.device=cpu",
            *(x for s in sets for x in ("--set", s))]
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    if res.returncode != 0:
        raise SystemExit(f"{model} failed:\n{res.stdout}\n{res.stderr}")
    measured = json.loads(res.stdout.strip().splitlines()[-1])

    from ctrpipe.config import load_config
    from ctrpipe.tools.planner import estimate

    cfg = load_config(cfg_path, [f"train.max_steps={steps}", "train.device=cpu", *sets])
    t0 = time.perf_counter()
    plan = estimate(cfg, shards, "cpu", memory=1 << 50)
    # measured is over the child's baseline after its imports, so the plan's line for the process itself
    # (this benchmark's process, besides) is left out of the comparison
    process = sum(line.nbytes for line in plan.lines if line.part == "process")
    return {**measured, "estimate": plan.peak() - process, "plan_seconds": time.perf_counter() - t0,
            "resident": plan.phase_bytes("resident", "device") + plan.phase_bytes("resident", "host") - process,
            "step": plan.phase_bytes("step", "device"), "eval": plan.phase_bytes("eval", "device")
            + plan.phase_bytes("eval", "host"), "checkpoint": plan.phase_bytes("checkpoint", "host"),
            "working": plan.working or 0}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--bins", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "plan")
    ap.add_argument("--format", choices=("criteo", "parquet"), default="criteo", help="the synthetic data")
    ap.add_argument("--data-cfg", type=Path, default=REPO / "cfgs" / "parquet_mmoe.yaml",
                    help="--format parquet: the config whose data section builds the cache")
    ap.add_argument("--cfg", default="cfgs/criteo_{model}.yaml", help="each model's config, {model} filled in")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="a config override for every model's run and plan, e.g. --set train.amp=off")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.format == "parquet":
        shards = prepare_parquet(a.work, a.rows, a.data_cfg)
        print(f"cache: {a.rows:,} synthetic Parquet rows, data section of {a.data_cfg}; {a.steps} steps")
    else:
        shards = prepare(a.work, a.rows, a.bins)
        print(f"cache: {a.rows:,} synthetic Criteo rows, {a.bins:,} hash bins per field; {a.steps} steps of batch "
              "4096")
    mb = 1e6
    print("| model | estimate MB (resident / step / eval / ckpt; working set) | measured anon MB | hwm MB |"
          " estimate / anon |"
          " train s | plan s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for model in a.models:
        r = measure(model, REPO / a.cfg.format(model=model), shards, a.work, a.steps, a.sets)
        print(f"| {model} | {r['estimate'] / mb:.0f} ({r['resident'] / mb:.0f} / {r['step'] / mb:.0f} / "
              f"{r['eval'] / mb:.0f} / {r['checkpoint'] / mb:.0f}; {r['working'] / mb:.0f}) | {r['anon'] / mb:.0f} | "
              f"{r['hwm'] / mb:.0f} | "
              f"{r['estimate'] / r['anon']:.2f} | {r['seconds']:.0f} | {r['plan_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
