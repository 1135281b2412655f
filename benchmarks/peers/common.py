"""Peer-side helpers for the quality benchmark: read the exported features, parse the shared options, report.

Runs inside the peers' own virtual environment (.bench/peers-venv), never in ctrpipe's: it imports only
numpy and torch. The exported folder is written by benchmarks/bench_quality.py from a ctrpipe shard cache,
so every library sees the same hashed ids and the same log1p numeric values:

    DIR/meta.json          {"cat_fields": [...], "num_fields": [...], "bins": [...], "rows": {...}}
    DIR/{train,test}_cat.npy   int32   (N, Fc)  hashed id per field, in [0, bins[f])
    DIR/{train,test}_num.npy   float32 (N, Fn)  log1p numeric values
    DIR/{train,test}_y.npy     float32 (N,)     click label (the cache's first label)
    DIR/{train,test}_labels.npy   float32 (N, T)  every label, in meta["labels"] order (several labels only)
    DIR/{train,test}_bag_<field>.npy  int32 (N, L)  multi-hot / sequence ids, 0 = padding (meta["bag_fields"])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Split:
    cat: np.ndarray   # (N, Fc) int32
    num: np.ndarray   # (N, Fn) float32
    y: np.ndarray     # (N,) float32
    labels: np.ndarray | None = None                    # (N, T) float32, several labels only
    bags: dict[str, np.ndarray] = field(default_factory=dict)   # bag field -> (N, L) int32


@dataclass(frozen=True)
class Export:
    cat_fields: list[str]
    num_fields: list[str]
    bins: list[int]
    train: Split
    test: Split
    label_names: list[str] = field(default_factory=list)
    bag_fields: list[str] = field(default_factory=list)   # multi-hot / sequence fields, mean-pooled bags
    bag_bins: list[int] = field(default_factory=list)


def load_export(folder: Path) -> Export:
    meta = json.loads((folder / "meta.json").read_text())
    labels = meta.get("labels", [])
    bag_fields = meta.get("bag_fields", [])

    def split(name: str) -> Split:
        multi = np.load(folder / f"{name}_labels.npy") if len(labels) > 1 else None
        bags = {f: np.load(folder / f"{name}_bag_{f}.npy") for f in bag_fields}
        return Split(np.load(folder / f"{name}_cat.npy"), np.load(folder / f"{name}_num.npy"),
                     np.load(folder / f"{name}_y.npy"), multi, bags)

    return Export(meta["cat_fields"], meta["num_fields"], [int(b) for b in meta["bins"]],
                  split("train"), split("test"), labels, bag_fields,
                  [int(b) for b in meta.get("bag_bins", [])])


def parse_args(models: tuple[str, ...],
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every peer runner shares; the benchmark passes the same values to ctrpipe. `extra` adds a
    runner's own options (e.g. the multi-task sizes)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="exported feature folder")
    ap.add_argument("--model", choices=models, required=True)
    ap.add_argument("--out", type=Path, required=True, help="where to save test predictions (.npy)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for library files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--hidden", default="400,400,400")
    ap.add_argument("--cross-layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2026)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.hidden = [int(h) for h in args.hidden.split(",") if h]
    return args


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Timer:
    """Wall-clock seconds of the `with` block."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def report(lib: str, version: str, args: argparse.Namespace, train_rows: int, train_s: float,
           pred: np.ndarray, n_params: int, notes: str = "") -> None:
    """Save predictions ((N,), or (N, T) for several tasks) and print one `RESULT {json}` line for the
    benchmark to parse."""
    pred = np.asarray(pred, dtype=np.float64)
    pred = pred.reshape(pred.shape[0], -1)
    pred = pred[:, 0] if pred.shape[1] == 1 else pred
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.stem + ".incomplete.npy")
    np.save(tmp, pred)
    os.replace(tmp, args.out)
    out = {"lib": lib, "version": version, "model": args.model, "train_rows": train_rows,
           "train_seconds": train_s, "samples_per_s": train_rows * args.epochs / train_s,
           "n_params": n_params, "pred": str(args.out), "threads": args.threads, "notes": notes}
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
