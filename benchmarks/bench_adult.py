"""Benchmark: multi-task models on real data -- UCI Adult (income >50K and married), per-task test AUC.

Usage: python benchmarks/bench_adult.py [--adult ../shared/data/adult] [--seeds 0 1 2]

Shards `uci_adult.data` (val split 10%) with `uci_adult.test` as the gold split (`cfgs/adult.yaml`), then trains
on the same cache: a single-task DNN per label (`cfgs/adult_dnn.yaml` with the other head's loss weight 0),
the DNN on both labels, and `cfgs/adult_{shared_bottom,mmoe,ple}.yaml`, each with every seed. Prints gold
(test-file) AUC and logloss per label, mean and spread over seeds, and training samples/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = [
    ("DNN, income only", "adult_dnn", ["train.tasks.married.weight=0"], ("income",)),
    ("DNN, married only", "adult_dnn", ["train.tasks.income.weight=0"], ("married",)),
    ("DNN, both labels", "adult_dnn", [], ("income", "married")),
    ("shared-bottom", "adult_shared_bottom", [], ("income", "married")),
    ("MMoE", "adult_mmoe", [], ("income", "married")),
    ("PLE", "adult_ple", [], ("income", "married")),
]


def ctrpipe(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ctrpipe.cli", *args], check=True, cwd=REPO)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adult", type=Path, default=REPO.parent / "shared" / "data" / "adult")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_adult_") as tmp:
        work = Path(tmp)
        shards = work / "shards"
        ctrpipe("shard", "--cfg", "cfgs/adult.yaml", "--input", str(args.adult / "uci_adult.data"), "--gold",
                str(args.adult / "uci_adult.test"), "--out", str(shards), "-q")
        rows: list[tuple[str, tuple[str, ...], list[dict]]] = []
        print(f"seeds {args.seeds}; gold = uci_adult.test (16,281 rows); mean (min-max) over seeds", flush=True)
        print("| model | income AUC | income logloss | married AUC | married logloss | samples/s |")
        print("|---|---|---|---|---|---|", flush=True)
        for label, cfg, sets, scored in RUNS:
            results = []
            for seed in args.seeds:
                name = f"{cfg}_{len(rows)}_{seed}"
                extra = [x for s in (*sets, f"seed={seed}", f"exp_name={name}") for x in ("--set", s)]
                ctrpipe("train", "--cfg", f"cfgs/{cfg}.yaml", "--shards", str(shards), "--runs", str(work / "runs"),
                        "-q", *extra)
                results.append(json.loads((work / "runs" / name / "metrics.json").read_text()))
            rows.append((label, scored, results))
            print(_row(label, scored, results), flush=True)


def _row(label: str, scored: tuple[str, ...], results: list[dict]) -> str:
    """One table row: per label, the mean (min-max) over seeds of the gold AUC and logloss."""
    cells = []
    for head in ("income", "married"):
        for metric in ("auc", "logloss"):
            if head not in scored:
                cells.append("")
                continue
            values = [r["gold"][f"{metric}.{head}"] for r in results]
            cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
    rate = statistics.mean(r["samples_per_s"] for r in results)
    return f"| {label} | {' | '.join(cells)} | {rate:,.0f} |"


if __name__ == "__main__":
    main()
