"""Benchmark: ctrpipe's multi-task models beside DeepCTR-Torch's on the same data -- per-task test AUC and
logloss, training samples/s, and the oracle from synth's true probabilities.

Usage (from the repo root, in ctrpipe's venv):
    python benchmarks/bench_quality.py --setup                        # create/refresh .bench/peers-venv once
    python benchmarks/bench_multitask.py --quick                      # 20k train + 10k test rows: plumbing
    python benchmarks/bench_multitask.py                              # full: 700k train + 100k test rows
    python benchmarks/bench_multitask.py --repeat 2                   # each run twice, best samples/s

Pairs: ctrpipe shared_bottom / mmoe / ple / esmm against DeepCTR-Torch SharedBottom / MMOE / PLE / ESMM.
Same data: `ctrpipe synth --format parquet` (labels clicked, converted; a conversion only after a click; the
true P(click) and P(click and conversion) of every row beside it), sharded once with a config derived from
cfgs/parquet_example.yaml (written to WORK/data_<sizes>.yaml: no validation split, no folds, the test file as
gold split, token hash bins sized from the data, and no weighted multi-hot column, because DeepCTR-Torch's
VarLenSparseFeat takes no per-token weights). The cache is exported once (bench_quality.export_features)
so the peer reads the same ids (15 categorical fields, the multi-hot `tags` and the sequence `seq`, both
mean-pooled bags in both libraries) and the same 26 numeric inputs (12 standardised signed-log1p values,
12 missing indicators, 2 co-visitation features).
Same sizes: embedding dim 16; shared bottom 256-128; MMoE 4 experts of 128-64; PLE 2 levels of 2 shared +
2 per-task experts of 128-64; towers 64; ESMM two towers of 256-128 over the shared embeddings (what
DeepCTR-Torch's ESMM is; ctrpipe: `esmm` with backbone `shared_bottom`, empty bottom); linear softmax gates;
one epoch, batch 2048, Adam lr 1e-3 constant, no dropout, batch norm or L2; 2 torch threads. ctrpipe runs
with its default train.amp=auto (bf16 training steps where the CPU has native bf16 and the family was measured
faster, see ctrpipe/device.py) and, with `--amp both` (the default), again in fp32 (train.amp=off); the peer
has no CPU mixed precision.
Tasks: DeepCTR-Torch has no label masks, so shared_bottom / mmoe / ple train and score `converted` over
every row (ctrpipe: `train.tasks.converted.mask=` clears the shipped `mask: clicked`); ESMM is scored as
ctr and ctcvr over every row and cvr on clicked rows. All AUC / logloss figures come from
ctrpipe.train.metrics: the peer's saved predictions here, ctrpipe's gold metrics in its metrics.json.
Writes the table to stdout, a markdown copy to WORK/table.md and everything to .bench/multitask.json
(WORK = .bench/multitask).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (  # noqa: E402
    _PEER_ENV,
    GOAL_AUC_DIFF,
    GOAL_SPEEDUP,
    PEER_PY,
    PEERS_DIR,
    ROOT,
    ctrpipe_cmd,
    ensure_peer_env,
    export_features,
    log,
    peer_result,
    run,
    score,
    thread_env,
)

MODELS = ("shared_bottom", "mmoe", "ple", "esmm")
PEER_MODEL = {"shared_bottom": "SharedBottom", "mmoe": "MMOE, linear gates", "ple": "PLE, linear gates",
              "esmm": "ESMM (two towers over the embeddings)"}
# heads scored per model: (head, which rows, oracle); ctrpipe names the plain models' heads after the labels
PLAIN_TASKS = (("clicked", "all", "click"), ("converted", "all", "click_and_conversion"))
ESMM_TASKS = (("ctr", "all", "click"), ("ctcvr", "all", "click_and_conversion"), ("cvr", "clicked", "cvr"))
NUMERIC_KINDS = ("numeric", "missing_indicator", "covisit")


# ----------------------------------------------------------------------------------------------- data
def token_bins(train: Path, columns: dict[str, str]) -> dict[str, int]:
    """Hash bins per token column: the power of two >= 2 x (distinct tokens + 1) on the train file, at least
    16 (as bench_quality sizes categorical fields: few collisions, no rows a library can never use)."""
    import polars as pl

    def distinct(column: str, sep: str) -> pl.Expr:
        tokens = pl.col(column).str.split(sep).explode().str.split(":").list.first().drop_nulls()  # 'tok:w' -> tok
        return tokens.filter(tokens != "").n_unique().alias(column)

    exprs = [distinct(c, sep) for c, sep in columns.items()]
    counts = pl.scan_parquet(train).select(exprs).collect().row(0)
    return {c: max(16, 1 << int(np.ceil(np.log2(2 * (n + 1))))) for c, n in zip(columns, counts, strict=True)}


def data_config(synth: Path, path: Path) -> Path:
    """cfgs/parquet_example.yaml, adjusted for a side-by-side run, -> `path` (WORK/data_<sizes>.yaml)."""
    import yaml

    from ctrpipe.config import load_yaml

    cfg = load_yaml(ROOT / "cfgs" / "parquet_example.yaml")
    data = cfg["data"]
    # DeepCTR-Torch's VarLenSparseFeat pools ids without per-token weights: leave weighted columns out
    data["multihot"] = [m for m in data.get("multihot", []) if not m.get("weighted")]
    tokens = {m["column"]: m.get("separator", "|") for m in data["multihot"] + data.get("sequence", [])}
    bins = token_bins(synth / "train.parquet", tokens)
    for m in data["multihot"] + data.get("sequence", []):
        # its own table in both libraries: the peer runner gives every bag its own embedding
        m.pop("share_ids_with", None)
        m["bins"] = bins[m["column"]]
    data["split"] = {**data.get("split", {}), "val_ratio": 0.0}
    data["folds"] = {**data.get("folds", {}), "n_splits": 0}
    cfg["exp_name"] = "bench_multitask_data"
    text = "# written by benchmarks/bench_multitask.py from cfgs/parquet_example.yaml\n" + \
        yaml.safe_dump(cfg, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def make_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """synth -> shard (train split + gold split from the test file); both reuse matching outputs.
    Returns (synth folder, cache)."""
    tag = f"{args.rows}_{args.test_rows}_s{args.seed}"
    synth = work / f"synth_{tag}"
    meta = synth / "synth.json"
    want = {"rows": args.rows, "test_rows": args.test_rows, "seed": args.seed, "format": "parquet"}
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if any(have.get(k) != v for k, v in want.items()):
        log(f"synth: {args.rows:,} train + {args.test_rows:,} test rows (parquet) -> {synth}")
        run(ctrpipe_cmd("synth", "--format", "parquet", "--rows", str(args.rows), "--test-rows",
                        str(args.test_rows), "--seed", str(args.seed), "--out", str(synth), "-q"),
            work / "logs" / "synth.log")
    cfg = data_config(synth, work / f"data_{tag}.yaml")
    cache = work / f"cache_{tag}"
    t0 = time.perf_counter()
    run(ctrpipe_cmd("shard", "--cfg", str(cfg), "-i", str(synth / "train.parquet"), "--gold",
                    str(synth / "test.parquet"), "-o", str(cache), "-q"), work / "logs" / "shard.log")
    log(f"shard: {cfg} -> {cache} ({time.perf_counter() - t0:.1f}s)")
    return synth, cache


# -------------------------------------------------------------------------------------------- metrics
def task_rows(kind: str, labels: np.ndarray) -> np.ndarray:
    return np.ones(len(labels), dtype=bool) if kind == "all" else labels[:, 0] > 0.5


def targets(head: str, labels: np.ndarray) -> np.ndarray:
    """(N,) target of a head: click for clicked/ctr, conversion (= click and conversion) otherwise."""
    return labels[:, 0] if head in ("clicked", "ctr") else labels[:, 1]


def oracle(synth: Path, export: Path) -> dict[str, np.ndarray]:
    """True probabilities of the test rows by name, checked to be in the exported rows' order."""
    import polars as pl

    truth = np.load(synth / "test.truth.npy").astype(np.float64)            # (N, 2) P(click), P(click & conv)
    labels = np.load(export / "test_labels.npy")
    raw = pl.read_parquet(synth / "test.parquet", columns=["clicked", "converted"]).to_numpy().astype(np.float32)
    if truth.shape != labels.shape or not np.array_equal(raw, labels):
        raise SystemExit("exported test rows are not the synth test file in order: cannot score the oracle")
    cvr = np.divide(truth[:, 1], truth[:, 0], out=np.zeros(len(truth)), where=truth[:, 0] > 0)
    return {"click": truth[:, 0], "click_and_conversion": truth[:, 1], "cvr": cvr}


def score_tasks(tasks: tuple, labels: np.ndarray, preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for head, rows, _ in tasks:
        keep = task_rows(rows, labels)
        out[head] = score(targets(head, labels)[keep], preds[head][keep])
    return out


# ----------------------------------------------------------------------------------------- libraries
def _units(units: list[int]) -> str:
    return "[" + ",".join(str(u) for u in units) + "]"


def ctrpipe_sets(model: str, args: argparse.Namespace, amp: str = "auto") -> list[str]:
    """The --set overrides that give ctrpipe's shipped config the benchmark's sizes and training."""
    sets = [f"exp_name=bench_{model}", f"train.amp={amp}", "train.epochs=1", f"train.lr={args.lr}",
            "train.embedding_lr=0",
            f"train.embedding_optimizer={args.embedding_optimizer}", "train.schedule=constant",
            "train.warmup_steps=0", "train.weight_decay=0", "train.grad_clip=0", f"train.num_threads={args.threads}",
            "train.device=cpu", f"loader.batch_size={args.batch_size}", f"seed={args.train_seed}"]
    plain_gates = ["model.gate_temperature=1.0", "model.gate_noise=0", "model.gate_entropy=0",
                   "model.gate_balance=0"]
    if model == "esmm":           # the backbone's sizes are in WORK/esmm.yaml (esmm_config)
        return sets
    # no label mask: conversion over every row, as the peer trains it (the shipped configs mask it by clicked;
    # --set merges mappings, so the mask is cleared by name rather than with train.tasks={})
    sets += ["train.tasks.converted.mask=",
             f"model.embedding_dim={args.embedding_dim}", "model.dropout=0", "model.batch_norm=false",
             f"model.tower_units={_units(args.tower)}"]
    if model == "shared_bottom":
        return sets + [f"model.hidden_units={_units(args.bottom)}"]
    sets += [f"model.hidden_units={_units(args.expert)}", *(plain_gates if args.plain_gates else [])]
    if model == "mmoe":
        return sets + [f"model.n_experts={args.n_experts}"]
    return sets + [f"model.levels={args.levels}", f"model.shared_experts={args.ple_experts}",
                   f"model.task_experts={args.ple_experts}"]


def esmm_config(args: argparse.Namespace, work: Path) -> Path:
    """cfgs/parquet_esmm.yaml with the backbone DeepCTR-Torch's ESMM has -- two towers straight over the
    embeddings, i.e. a shared bottom with no layers -- -> WORK/esmm.yaml. A file, because `--set` merges into
    the shipped `backbone_params` (an MMoE's) and cannot drop its keys."""
    import yaml

    from ctrpipe.config import load_yaml

    cfg = load_yaml(ROOT / "cfgs" / "parquet_esmm.yaml")
    cfg["model"]["backbone"] = "shared_bottom"
    cfg["model"]["backbone_params"] = {"embedding_dim": args.embedding_dim, "hidden_units": [],
                                       "tower_units": list(args.esmm_tower), "dropout": 0.0, "batch_norm": False}
    path = work / "esmm.yaml"
    path.write_text("# written by benchmarks/bench_multitask.py from cfgs/parquet_esmm.yaml\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_ctrpipe(model: str, args: argparse.Namespace, cache: Path, work: Path, labels: np.ndarray,
                amp: str = "auto") -> dict:
    runs = work / "runs"
    shutil.rmtree(runs / f"bench_{model}", ignore_errors=True)
    cfg = str(esmm_config(args, work)) if model == "esmm" else f"cfgs/parquet_{model}.yaml"
    cmd = ctrpipe_cmd("train", "--shards", str(cache), "--cfg", cfg, "--runs", str(runs), "-q")
    for s in ctrpipe_sets(model, args, amp):
        cmd += ["--set", s]
    t0 = time.perf_counter()
    run(cmd, work / "logs" / f"ctrpipe_{model}_{amp}.log", env=thread_env(args.threads))
    wall = time.perf_counter() - t0
    metrics = json.loads((runs / f"bench_{model}" / "metrics.json").read_text())
    gold = metrics["gold"]
    tasks = ESMM_TASKS if model == "esmm" else PLAIN_TASKS
    for head, rows, _ in tasks:        # the rows ctrpipe scored must be the rows scored for the peer
        want = float(np.mean(targets(head, labels)[task_rows(rows, labels)]))
        if abs(float(gold[f"pos_rate.{head}"]) - want) > 1e-6:
            raise SystemExit(f"ctrpipe {model}: head {head} was scored on other rows (positive rate "
                             f"{gold[f'pos_rate.{head}']:.4f}, expected {want:.4f} over {rows} rows)")
    return {"lib": "ctrpipe", "model": model,
            "tasks": {h: {"auc": float(gold[f"auc.{h}"]), "logloss": float(gold[f"logloss.{h}"])}
                      for h, _, _ in tasks},
            "samples_per_s": float(metrics["samples_per_s"]), "train_seconds": float(metrics["train_seconds"]),
            "process_seconds": wall, "amp": amp, "precision": metrics["precision"],
            "notes": f"{cfg}, embedding optimiser {args.embedding_optimizer}"
                     + (", plain gates" if args.plain_gates and model in ("mmoe", "ple") else "")}


def run_peer(model: str, args: argparse.Namespace, export: Path, work: Path) -> dict:
    pred_path = work / "preds" / f"deepctr_{model}.npy"
    pred_path.unlink(missing_ok=True)
    scratch = work / "scratch" / f"deepctr_{model}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    hidden = {"shared_bottom": args.bottom, "esmm": args.esmm_tower}.get(model, args.expert)
    cmd = [str(PEER_PY), str(PEERS_DIR / "deepctr_multitask_run.py"), "--data", str(export), "--model", model,
           "--out", str(pred_path), "--work", str(scratch), "--threads", str(args.threads),
           "--embedding-dim", str(args.embedding_dim), "--hidden", ",".join(str(h) for h in hidden),
           "--tower", ",".join(str(h) for h in args.tower), "--n-experts", str(args.n_experts),
           "--levels", str(args.levels), "--ple-experts", str(args.ple_experts),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--epochs", "1",
           "--seed", str(args.train_seed)]
    res, wall = peer_result(cmd, work / "logs" / f"deepctr_{model}.log", thread_env(args.threads, _PEER_ENV),
                         f"deepctr {model}")
    labels = np.load(export / "test_labels.npy")
    p = np.load(pred_path)
    if p.shape != labels.shape:
        raise SystemExit(f"deepctr {model}: predictions {p.shape} for test labels {labels.shape}")
    if model == "esmm":    # the library predicts (ctr, ctcvr); cvr = ctcvr / ctr
        cvr = np.clip(np.divide(p[:, 1], p[:, 0], out=np.zeros(len(p)), where=p[:, 0] > 0), 0.0, 1.0)
        preds = {"ctr": p[:, 0], "ctcvr": p[:, 1], "cvr": cvr}
    else:
        preds = {"clicked": p[:, 0], "converted": p[:, 1]}
    shutil.rmtree(scratch, ignore_errors=True)
    return {"lib": res["lib"], "version": res["version"], "model": model,
            "tasks": score_tasks(ESMM_TASKS if model == "esmm" else PLAIN_TASKS, labels, preds),
            "samples_per_s": res["samples_per_s"], "train_seconds": res["train_seconds"],
            "process_seconds": wall, "n_params": res["n_params"],
            "notes": f"{PEER_MODEL[model]}, {res['notes']}".strip(", ")}


# ------------------------------------------------------------------------------------------- output
def machine() -> dict:
    import torch

    from ctrpipe.device import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table_rows(results: dict) -> list[list[str]]:
    """One row per (model, task), then each model's speed: the cells of both the text and markdown table."""
    rows = []
    for model, r in results["models"].items():
        ours, peer, fp32 = r.get("ctrpipe"), r.get("deepctr"), r.get("ctrpipe_fp32")
        for head, rows_kind, orc in ESMM_TASKS if model == "esmm" else PLAIN_TASKS:
            o = results["oracle"][orc if rows_kind == "all" else "cvr_on_clicked"]
            a = ours["tasks"][head] if ours else None
            b = peer["tasks"][head] if peer else None
            diff = ""
            if a and b:
                d = a["auc"] - b["auc"]
                diff = f"{d:+.4f}" + ("" if d >= GOAL_AUC_DIFF else " !")
            f = fp32["tasks"][head] if fp32 else None
            rows.append([model, f"{head} ({'all rows' if rows_kind == 'all' else 'clicked rows'})",
                         f"{o['auc']:.4f}", f"{a['auc']:.4f}" if a else "-", f"{f['auc']:.4f}" if f else "-",
                         f"{b['auc']:.4f}" if b else "-", diff,
                         f"{o['logloss']:.4f}", f"{a['logloss']:.4f}" if a else "-",
                         f"{b['logloss']:.4f}" if b else "-", "", "", "", ""])
        speed = ratio = ""
        if ours and peer:
            x = ours["samples_per_s"] / peer["samples_per_s"]
            ratio = f"{x:.2f}x" + ("" if x >= GOAL_SPEEDUP else " !")
        speed = [f"{x['samples_per_s']:,.0f}" if x else "-" for x in (ours, fp32, peer)]
        if fp32 and peer:
            ratio += f" (fp32 {fp32['samples_per_s'] / peer['samples_per_s']:.2f}x)"
        rows.append([model, "training samples/s", "", "", "", "", "", "", "", "", *speed, ratio])
    return rows


HEAD = ["model", "task", "oracle AUC", "ctrpipe AUC", "ctrpipe fp32 AUC", "peer AUC", "AUC diff", "oracle LL",
        "ctrpipe LL", "peer LL", "ctrpipe samples/s", "ctrpipe fp32 samples/s", "peer samples/s", "speed"]


def print_table(results: dict) -> str:
    """Print the text table; return its markdown version."""
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    log("")
    m, d = results["machine"], results["data"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load {results['load_before']} before, "
        f"{results['load_after']} after")
    log(f"data: {d['train_rows']:,} train / {d['test_rows']:,} test rows, {d['features']}")
    log(f"training: {results['training']}")
    line = "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(HEAD, widths, strict=True)))
    log(line)
    log("-" * len(line))
    for r in rows:
        log("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    log("ctrpipe = its default train.amp=auto (the precision it resolved is in the JSON), ctrpipe fp32 = "
        "train.amp=off; AUC diff = ctrpipe - DeepCTR-Torch (goal >= -0.001); speed = ctrpipe / DeepCTR-Torch "
        "training samples/s (goal >= 2); '!' marks a missed goal; LL = logloss")
    md = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md) + "\n"


def train_all(args: argparse.Namespace, cache: Path, export: Path, work: Path, labels: np.ndarray,
              results: dict) -> None:
    """Train every model with each library, `--repeat` times, interleaved (ctrpipe, peer, ctrpipe, ...).
    Metrics come from the first run; samples/s is the best run's (the VM's other jobs only ever slow a run
    down), with every run's figure and load average kept in the JSON."""
    results["models"] = {}
    amps = {"auto": ["auto"], "off": ["off"], "both": ["auto", "off"]}[args.amp]
    ours = [] if args.skip_ctrpipe else ["ctrpipe" if a == "auto" else "ctrpipe_fp32" for a in amps]
    jobs = ours + ([] if args.skip_peer else ["deepctr"])
    for model in args.models:
        entry = results["models"].setdefault(model, {})
        for rep in range(args.repeat):
            for lib in jobs:
                t0 = time.perf_counter()
                before = load()
                log(f"{model}: training {lib}{f' (repeat {rep + 1})' if rep else ''} (load {before}) ...")
                r = run_peer(model, args, export, work) if lib == "deepctr" else \
                    run_ctrpipe(model, args, cache, work, labels, "auto" if lib == "ctrpipe" else "off")
                run_info = {"samples_per_s": r["samples_per_s"], "load_before": before, "load_after": load(),
                            "auc": {h: v["auc"] for h, v in r["tasks"].items()}}
                if rep == 0:
                    entry[lib] = {**r, "runs": [run_info]}
                else:
                    entry[lib]["runs"].append(run_info)
                    entry[lib]["samples_per_s"] = max(x["samples_per_s"] for x in entry[lib]["runs"])
                aucs = ", ".join(f"{h} {v['auc']:.4f}" for h, v in r["tasks"].items())
                log(f"{model}: {lib}: AUC {aucs}; {r['samples_per_s']:,.0f} samples/s "
                    f"({time.perf_counter() - t0:.0f}s wall)")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))       # partial results survive a crash


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=700_000, help="training rows")
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="20,000 train + 10,000 test rows (plumbing check)")
    ap.add_argument("--seed", type=int, default=0, help="synth seed (training seeds use --train-seed)")
    ap.add_argument("--train-seed", type=int, default=2026)
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--skip-ctrpipe", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--amp", choices=("both", "auto", "off"), default="both",
                    help="ctrpipe's train.amp: both (its default auto beside fp32), or one of them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="train each model this many times per library, interleaved; samples/s = the best run's")
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--bottom", default="256,128", help="shared_bottom's bottom MLP")
    ap.add_argument("--expert", default="128,64", help="each MMoE / PLE expert MLP")
    ap.add_argument("--tower", default="64", help="each task's tower (shared_bottom, mmoe, ple)")
    ap.add_argument("--esmm-tower", default="256,128", help="ESMM's ctr and cvr towers")
    ap.add_argument("--n-experts", type=int, default=4)
    ap.add_argument("--levels", type=int, default=2, help="PLE extraction levels")
    ap.add_argument("--ple-experts", type=int, default=2,
                    help="PLE shared experts and experts per task, per level (DeepCTR-Torch needs them equal)")
    ap.add_argument("--shipped-gates", dest="plain_gates", action="store_false",
                    help="keep the shipped configs' gate temperature, noise and regularisers (default: plain "
                         "softmax gates, as DeepCTR-Torch's)")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embedding-optimizer", default="lazy_adam",
                    help="ctrpipe's embedding optimiser: lazy_adam (the shipped configs') or adam (dense, like "
                         "the peer)")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "multitask")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "multitask.json")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.test_rows = 20_000, 10_000
    for key in ("bottom", "expert", "tower", "esmm_tower"):
        setattr(args, key, [int(h) for h in getattr(args, key).split(",") if h])
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    return args


def main() -> None:
    args = parse_args()
    results: dict = {"machine": machine(), "load_before": load(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"load average before: {results['load_before']}")
    if not args.skip_peer:
        ensure_peer_env(refresh=False)
    work = args.work
    synth, cache = make_data(args, work)
    export = work / f"export_{cache.name.removeprefix('cache_')}"
    t0 = time.perf_counter()
    meta = export_features(cache, export, numeric_kinds=NUMERIC_KINDS, bags=True)
    log(f"export: {meta['rows']['train']:,} train / {meta['rows']['test']:,} test rows, "
        f"{len(meta['cat_fields'])} categorical + {len(meta['bag_fields'])} bag + {len(meta['num_fields'])} "
        f"numeric inputs, labels {meta['labels']} -> {export} ({time.perf_counter() - t0:.1f}s)")
    labels = np.load(export / "test_labels.npy")
    truth = oracle(synth, export)
    clicked = task_rows("clicked", labels)
    results["oracle"] = {"click": score(labels[:, 0], truth["click"]),
                         "click_and_conversion": score(labels[:, 1], truth["click_and_conversion"]),
                         "cvr_on_clicked": score(labels[clicked, 1], truth["cvr"][clicked])}
    results["data"] = {"train_rows": meta["rows"]["train"], "test_rows": meta["rows"]["test"],
                       "synth_seed": args.seed, "labels": meta["labels"],
                       "categorical": dict(zip(meta["cat_fields"], meta["bins"], strict=True)),
                       "bags": dict(zip(meta["bag_fields"], meta["bag_bins"], strict=True)),
                       "numeric": meta["num_fields"],
                       "features": f"{len(meta['cat_fields'])} categorical, bags {meta['bag_fields']} (mean), "
                                   f"{len(meta['num_fields'])} numeric (values, missing indicators, co-visitation)"}
    results["training"] = (f"one epoch, batch {args.batch_size}, Adam lr {args.lr} constant, emb "
                           f"{args.embedding_dim}, bottom {args.bottom}, experts {args.n_experts} x {args.expert}, "
                           f"PLE {args.levels} levels x ({args.ple_experts} shared + {args.ple_experts} per task), "
                           f"towers {args.tower}, ESMM towers {args.esmm_tower}, "
                           f"{'plain' if args.plain_gates else 'shipped'} gates, {args.threads} threads; "
                           f"samples/s = best of {args.repeat} run(s)")
    train_all(args, cache, export, work, labels, results)
    results["load_after"] = load()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.write_text(json.dumps(results, indent=1))
    md = print_table(results)
    (work / "table.md").write_text(md)
    log(f"\nresults: {args.out}; markdown table: {work / 'table.md'}; logs: {work / 'logs'}")


if __name__ == "__main__":
    main()
