"""Benchmark: what a training run spends on embedding-table initialisation and checkpoints, and its disk use.

Usage: python benchmarks/bench_checkpoint.py [--input ../shared/data/criteo/train_sample.tsv]
           [--models dnn dcnv2] [--baseline-ref REF] [--no-baseline]

Shards the input with `cfgs/criteo.yaml` (1M hash bins per field: a 26M x 16 table), then runs
`ctrpipe train --cfg cfgs/criteo_<model>.yaml` as it ships, in its own process under cProfile, and reports:
wall time, seconds in table initialisation (`torch.nn.init.normal_`, which only tables call at that size) and
in checkpoint writes (`save_checkpoint`), their share of the wall time, the run directory's size, the
process's peak RSS and the validation AUC.

The baseline, measured in the same invocation, is the same command at `--baseline-ref` (default: the last
commit before compact checkpoints), checked out into a temporary git worktree with this build's compiled
kernel copied in; it shards and trains with its own code and its own shipped configs. Without the real
Criteo sample (../shared absent) the input is 6,626 rows of `ctrpipe synth` Criteo text.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo" / "train_sample.tsv"
BEFORE_COMPACT = "624439f"        # the last commit that saved whole tables and built the model twice


def profile_run(code: Path, args: list[str], work: Path, tag: str) -> dict[str, float]:
    """Run `python -m ctrpipe.cli ARGS` from checkout `code` under cProfile and /usr/bin/time."""
    prof = work / f"{tag}.prof"
    timing = work / f"{tag}.time"
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), sys.executable, "-m", "cProfile", "-o", str(prof),
           "-m", "ctrpipe.cli", *args]
    res = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{res.stdout}\n{res.stderr}")
    wall, rss_kb = timing.read_text().split()[-2:]
    stats = pstats.Stats(str(prof))
    return {"wall": float(wall), "rss_mb": int(rss_kb) / 1024,
            "init": _cumtime(stats, "init.py", "normal_"),
            "save": _cumtime(stats, "checkpoint.py", "save_checkpoint")}


def _cumtime(stats: pstats.Stats, file_suffix: str, name: str) -> float:
    """Cumulative seconds of function `name` defined in a file ending with `file_suffix` (0 if never called)."""
    total = 0.0
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():   # type: ignore[attr-defined]
        if func == name and file.endswith(file_suffix):
            total += cum
    return total


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def measure(code: Path, label: str, data: Path, models: list[str], work: Path) -> list[dict[str, object]]:
    shards = work / f"{label}_shards"
    profile_run(code, ["shard", "--cfg", "cfgs/criteo.yaml", "--input", str(data), "--out", str(shards), "-q"],
                work, f"{label}_shard")
    rows: list[dict[str, object]] = []
    for model in models:
        runs = work / f"{label}_runs_{model}"
        r = profile_run(code, ["train", "--cfg", f"cfgs/criteo_{model}.yaml", "--shards", str(shards),
                               "--runs", str(runs), "-q"], work, f"{label}_{model}")
        metrics = json.loads(next(runs.glob("*/metrics.json")).read_text())
        rows.append({"code": label, "model": model, "steps": metrics["steps"], **r,
                     "share": (r["init"] + r["save"]) / r["wall"], "dir_mb": dir_mb(runs),
                     "auc": metrics["val"]["auc"]})
        shutil.rmtree(runs)
    return rows


def baseline_checkout(ref: str, work: Path) -> Path:
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    for built in (REPO / "ctrpipe").glob("_native*.so"):      # the kernel's C source is the same at that ref
        shutil.copy(built, tree / "ctrpipe" / built.name)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=SAMPLE)
    ap.add_argument("--models", nargs="+", default=["dnn", "dcnv2"])
    ap.add_argument("--baseline-ref", default=BEFORE_COMPACT)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        work = Path(tmp)
        data = args.input
        if not data.is_file():
            subprocess.run([sys.executable, "-m", "ctrpipe.cli", "synth", "--rows", "6626", "--seed", "0",
                            "--out", str(work / "synth"), "-q"], check=True, cwd=REPO)
            data = work / "synth" / "train.tsv"
        rows: list[dict[str, object]] = []
        tree = None
        try:
            if not args.no_baseline:
                tree = baseline_checkout(args.baseline_ref, work)
                rows += measure(tree, f"baseline {args.baseline_ref}", data, args.models, work)
            rows += measure(REPO, "current", data, args.models, work)
        finally:
            if tree is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    from ctrpipe.device import cpu_name

    print(f"input: {data} | cpu: {cpu_name()} x {os.cpu_count()}")
    print("| code | model | steps | wall s | table init s | checkpoint writes s | (init+writes)/wall "
          "| run dir MB | peak RSS MB | val AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['model']} | {r['steps']} | {r['wall']:.1f} | {r['init']:.1f} | "
              f"{r['save']:.1f} | {r['share']:.2f} | {r['dir_mb']:,.0f} | {r['rss_mb']:,.0f} | {r['auc']:.4f} |")
    by = {(r["code"].split()[0], r["model"]): r for r in rows}
    for model in args.models:
        b, c = by.get(("baseline", model)), by.get(("current", model))
        if b and c:
            print(f"{model}: run dir {b['dir_mb'] / c['dir_mb']:.0f}x smaller, wall {b['wall'] / c['wall']:.2f}x "
                  f"({b['steps']} -> {c['steps']} steps), init+writes share {b['share']:.2f} -> {c['share']:.2f}")


if __name__ == "__main__":
    main()
