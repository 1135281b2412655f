"""Benchmark: ctrpipe's sequence models (DIN, DARE, DARE + QNN-α) against the same-size DNN that mean-pools the
history, against the oracle, against DeepCTR-Torch's DIN, and their training throughput / peak memory at
history lengths 50 and 200.

Usage (from the repo root, in ctrpipe's venv):
    python benchmarks/bench_quality.py --setup          # create/refresh .bench/peers-venv once
    python benchmarks/bench_sequence.py --quick         # 20k train + 10k test rows: plumbing only
    python benchmarks/bench_sequence.py                 # full: 300k train + 100k gold rows, L = 50 and 200
    python benchmarks/bench_sequence.py --skip-speed --skip-peer    # quality of ctrpipe's models only
    python benchmarks/bench_sequence.py --prepare-only  # synth + shard + export only
    python benchmarks/bench_sequence.py --skip-speed --skip-peer --amp both   # + each model in bf16 autocast

Data: `ctrpipe synth --format parquet` (click label; a candidate `item_id` from the history's vocabulary and a
hidden candidate x recency-weighted-history click term; the true P(click) of every row), sharded once per
history length from cfgs/parquet_example.yaml (written to WORK/data_<sizes>_L<len>.yaml: click label only, no
validation split, no folds, the test file as gold split, `data.sequence[].max_len` = the length, `tags` hash
bins sized from the data, and no weighted multi-hot `tags_w`, because DeepCTR-Torch's VarLenSparseFeat takes no
per-token weights). The history `seq` shares its vocabulary and embedding rows with `item_id`
(`share_ids_with`), so every model, the DNN too, reads history items in the candidate's own rows.

Models (ctrpipe, each its shipped config plus the training settings below): `dnn` = cfgs/parquet_din.yaml's
sizes (embedding 16, MLP 200-80, no dropout) with `model.name: dnn` (WORK/dnn.yaml): the history is one more
mean-pooled field; `din` cfgs/parquet_din.yaml (activation unit 36, PReLU); `dare` cfgs/parquet_dare.yaml
(attention dim 8, soft top-20); `dare_qnn` cfgs/dare_qnn.yaml (as shipped: QNN-α head, dropout 0.1,
self-ensemble). Every model reads all stored behaviours (config max_len 0).
Peer: DeepCTR-Torch's `DIN` (benchmarks/peers/deepctr_din_run.py) on the same rows and ids exported from the
cache (bench_quality.export_features): 16 categorical fields, `tags` mean-pooled, the history as
`hist_item_id` in item_id's table with its length column, 26 numeric inputs; embedding 16, activation unit 36
with PReLU, MLP 200-80, no L2 / dropout / batch norm, unnormalised attention scores, as ctrpipe's DIN.
Training (both libraries): `--epochs` epochs, batch `--batch-size`, Adam lr `--lr` constant, no weight decay or
gradient clipping, fp32 (ctrpipe: `train.amp=off`, so both libraries compute alike; `--amp both` adds a bf16
autocast run of each ctrpipe model beside its fp32 one), `--threads` torch threads (OMP/MKL threads to match);
ctrpipe updates embeddings with `lazy_adam` (the shipped configs'), the peer with its dense Adam. AUC and
logloss of every run come from ctrpipe.train.metrics on the gold rows (ctrpipe's metrics.json; the peer's saved
predictions here).

1. Quality (history length `--quality-length`, default 50 as shipped): `ctrpipe train` of every model and the
   peer's fit, each a child process; samples/s there is the library's own figure for the whole run (ctrpipe's
   metrics.json `samples_per_s`; the peer's rows x epochs / seconds in `fit`), peak RSS the child's VmHWM
   (PEAK_WRAPPER below: Python, torch, data, and the gold evaluation at loader.eval_batch_size 16384).
2. Speed (each of `--lengths`, one cache each, resharded from the same files): each model trains
   `--speed-steps` steps (after `--speed-warmup`) in a child process of this script (`--child-speed`) with the
   fit loop's own step function (train.loop.train_step), its optimisers and a shuffled ShardLoader over the
   train split, as `ctrpipe train` feeds it, and nothing else (no evaluation); peak RSS = that child's
   VmHWM (with `--device cuda`, also the device's peak allocation). `--speed-rounds` rounds, every (length,
   model) once per round, interleaved, so load from other jobs falls on all alike; samples/s = the best
   round (other jobs only ever slow a run down), median kept too.

Writes the tables to stdout, a markdown copy to WORK/tables.md, everything to .bench/sequence.json
(WORK = .bench/sequence). Figures and what they mean: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_multitask import load, machine, token_bins  # noqa: E402
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
    run,
    score,
    thread_env,
)

MODELS = ("dnn", "din", "dare", "dare_qnn")
BF16 = " bf16"            # suffix of a quality job trained in bf16 autocast (--amp both)
CONFIGS = {"din": "cfgs/parquet_din.yaml", "dare": "cfgs/parquet_dare.yaml", "dare_qnn": "cfgs/dare_qnn.yaml"}
NUMERIC_KINDS = ("numeric", "missing_indicator", "covisit")
HISTORY, QUERY = "seq", "item_id"


# ----------------------------------------------------------------------------------------------- data
def data_config(synth: Path, path: Path, max_len: int) -> Path:
    """cfgs/parquet_example.yaml, adjusted for this benchmark, -> `path`."""
    import yaml

    from ctrpipe.config import load_yaml

    cfg = load_yaml(ROOT / "cfgs" / "parquet_example.yaml")
    data = cfg["data"]
    data["labels"] = ["clicked"]
    # DeepCTR-Torch's VarLenSparseFeat pools ids without per-token weights: leave weighted columns out
    data["multihot"] = [m for m in data.get("multihot", []) if not m.get("weighted")]
    # hashed multi-hot columns get bins sized from the data (the peer updates every table row each step);
    # the history takes item_id's vocabulary (share_ids_with), so it needs none
    bins = token_bins(synth / "train.parquet", {m["column"]: m.get("separator", "|") for m in data["multihot"]})
    for m in data["multihot"]:
        m["bins"] = bins[m["column"]]
    seqs = [s for s in data["sequence"] if s["column"] == HISTORY]
    if len(seqs) != 1 or seqs[0].get("share_ids_with") != QUERY:
        raise SystemExit(f"cfgs/parquet_example.yaml: expected sequence {HISTORY!r} sharing ids with {QUERY!r}")
    seqs[0]["max_len"] = max_len
    data["split"] = {**data.get("split", {}), "val_ratio": 0.0}
    data["folds"] = {**data.get("folds", {}), "n_splits": 0}
    cfg["exp_name"] = "bench_sequence_data"
    text = "# written by benchmarks/bench_sequence.py from cfgs/parquet_example.yaml\n" + \
        yaml.safe_dump(cfg, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def make_synth(args: argparse.Namespace, work: Path) -> Path:
    synth = work / f"synth_{args.rows}_{args.test_rows}_s{args.seed}"
    meta = synth / "synth.json"
    want = {"rows": args.rows, "test_rows": args.test_rows, "seed": args.seed, "format": "parquet"}
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if any(have.get(k) != v for k, v in want.items()):
        log(f"synth: {args.rows:,} train + {args.test_rows:,} test rows (parquet) -> {synth}")
        run(ctrpipe_cmd("synth", "--format", "parquet", "--rows", str(args.rows), "--test-rows",
                        str(args.test_rows), "--seed", str(args.seed), "--out", str(synth), "-q"),
            work / "logs" / "synth.log")
    return synth


def make_cache(args: argparse.Namespace, work: Path, synth: Path, max_len: int) -> Path:
    """shard (train split + gold split from the test file) with histories of `max_len`; reuses a match."""
    tag = f"{args.rows}_{args.test_rows}_s{args.seed}_L{max_len}"
    cfg = data_config(synth, work / f"data_{tag}.yaml", max_len)
    cache = work / f"cache_{tag}"
    t0 = time.perf_counter()
    run(ctrpipe_cmd("shard", "--cfg", str(cfg), "-i", str(synth / "train.parquet"), "--gold",
                    str(synth / "test.parquet"), "-o", str(cache), "-q"), work / "logs" / f"shard_L{max_len}.log")
    log(f"shard: {cfg.name} -> {cache} ({time.perf_counter() - t0:.1f}s)")
    return cache


def history_stats(cache: Path) -> dict:
    """Stored history lengths of the cache's train rows: width, mean, median, share empty, share at the cap."""
    from ctrpipe.data.splits import SPLIT_CODES
    from ctrpipe.shard.reader import open_cache

    arrays = open_cache(cache)
    col = next(c for c in arrays.manifest.columns_of("sequence") if c.name == HISTORY)
    lengths = []
    for i in range(len(arrays.manifest.shards)):
        shard = arrays.shard(i)
        keep = shard["split"] == SPLIT_CODES["train"]
        lengths.append((np.asarray(shard[col.group])[keep] > 0).sum(axis=1))
    n = np.concatenate(lengths)
    return {"width": int(col.width), "mean_len": float(n.mean()), "median_len": float(np.median(n)),
            "max_len": int(n.max()), "empty": float((n == 0).mean()), "at_cap": float((n == col.width).mean())}


def oracle(synth: Path, export: Path) -> dict[str, float]:
    """The true click probabilities of the gold rows, checked to be in the exported rows' order."""
    import polars as pl

    truth = np.load(synth / "test.truth.npy").astype(np.float64)[:, 0]      # P(click)
    y = np.load(export / "test_y.npy")
    raw = pl.read_parquet(synth / "test.parquet", columns=["clicked"]).to_numpy()[:, 0].astype(np.float32)
    if truth.shape != y.shape or not np.array_equal(raw, y):
        raise SystemExit("exported gold rows are not the synth test file in order: cannot score the oracle")
    out = score(y, truth)
    # the same oracle without its candidate x history term (synth.json, generator v2 and later): the AUC that
    # reading the history against the candidate can add at most is the difference
    click = json.loads((synth / "synth.json").read_text())["splits"]["test"]["labels"]["click"]
    without = click.get("oracle_auc_without_candidate_x_history")
    if without is not None:
        out["auc_without_candidate_x_history"] = float(without)
    return out


# ------------------------------------------------------------------------------------------- running
# Runs a module (`module NAME ARGS`) or script (`path FILE ARGS`) and prints its peak RSS (VmHWM) at exit.
# Why not ru_maxrss (os.wait4, or the child's own getrusage): Linux carries the largest RSS of the process
# image an exec replaces into the new one, and a child of this script starts as a copy of it, so every child
# would report at least this script's own peak (1.3 GB after exporting 1M rows). VmHWM belongs to the memory
# map exec creates: the child's own peak only.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _peak():
    with open('/proc/self/status') as f:
        print('PEAK_RSS_KB', next(int(ln.split()[1]) for ln in f if ln.startswith('VmHWM:')), flush=True)
atexit.register(_peak)
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, *sys.argv[3:]]
if kind == 'module':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    runpy.run_path(target, run_name='__main__')
"""


def peak_rss_of(out: str) -> int:
    """Bytes from the last `PEAK_RSS_KB n` line of a child's output (PEAK_WRAPPER or the speed child)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("PEAK_RSS_KB ")]
    if not lines:
        raise SystemExit("a child reported no PEAK_RSS_KB line")
    return int(lines[-1].split()[1]) * 1024


def vm_hwm() -> int:
    """This process's peak RSS in bytes (VmHWM, see PEAK_WRAPPER)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) * 1024


def run_measured(cmd: list[str], log_file: Path, env: dict[str, str]) -> tuple[str, float, int]:
    """Run a command as a child process; (its output, wall seconds, its peak RSS in bytes from the
    PEAK_RSS_KB line it prints: wrap commands in PEAK_WRAPPER)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    out = log_file.read_text()
    if code != 0:
        tail = "\n".join(out.splitlines()[-30:])
        raise SystemExit(f"command failed ({code}) after {wall:.0f}s: {' '.join(cmd)}\n"
                         f"--- last lines (whole log: {log_file}) ---\n{tail}")
    return out, wall, peak_rss_of(out)


def dnn_config(work: Path) -> Path:
    """cfgs/parquet_din.yaml with its model swapped for the same-size DNN -> WORK/dnn.yaml. A file, because
    `--set model.name=dnn` would keep DIN's keys (attention_units, sequence), which a DNN does not take."""
    import yaml

    from ctrpipe.config import load_yaml

    cfg = load_yaml(ROOT / CONFIGS["din"])
    din = cfg["model"]
    cfg["model"] = {"name": "dnn", **{k: din[k] for k in ("embedding_dim", "hidden_units", "dropout")}}
    cfg["exp_name"] = "parquet_dnn"
    path = work / "dnn.yaml"
    path.write_text("# written by benchmarks/bench_sequence.py from cfgs/parquet_din.yaml: the same-size DNN\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def model_config(model: str, work: Path) -> str:
    return str(dnn_config(work)) if model == "dnn" else CONFIGS[model]


def ctrpipe_sets(model: str, args: argparse.Namespace, exp: str, amp: str = "off") -> list[str]:
    """The --set overrides that give the shipped configs the benchmark's training (the model sizes stay)."""
    return [f"exp_name={exp}", f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.embedding_lr=0",
            "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0", "train.grad_clip=0",
            f"train.amp={amp}", f"train.num_threads={args.threads}", f"train.device={args.device}",
            f"loader.batch_size={args.batch_size}", f"seed={args.train_seed}"]


def run_ctrpipe(model: str, max_len: int, args: argparse.Namespace, cache: Path, work: Path,
                pos_rate: float, amp: str = "off") -> dict:
    runs = work / "runs"
    exp = f"bench_{model}_L{max_len}" + ("" if amp == "off" else f"_{amp}")
    shutil.rmtree(runs / exp, ignore_errors=True)
    cfg = model_config(model, work)
    cmd = [sys.executable, "-c", PEAK_WRAPPER, "module", "ctrpipe.cli", "train", "--shards", str(cache), "--cfg", cfg,
           "--runs", str(runs), "-q"]
    for s in ctrpipe_sets(model, args, exp, amp):
        cmd += ["--set", s]
    _, wall, rss = run_measured(cmd, work / "logs" / f"ctrpipe_{exp}.log", thread_env(args.threads))
    metrics = json.loads((runs / exp / "metrics.json").read_text())
    gold = metrics["gold"]
    if abs(float(gold["pos_rate"]) - pos_rate) > 1e-6:     # ctrpipe must have scored the rows the peer is
        raise SystemExit(f"ctrpipe {model}: gold positive rate {gold['pos_rate']}, expected {pos_rate}")
    return {"lib": "ctrpipe", "model": model, "max_len": max_len, "auc": float(gold["auc"]),
            "logloss": float(gold["logloss"]), "samples_per_s": float(metrics["samples_per_s"]),
            "train_seconds": float(metrics["train_seconds"]), "process_seconds": wall, "peak_rss": rss,
            "parameters": metrics.get("parameters"), "precision": metrics["precision"]["train"],
            "notes": f"{cfg}, embedding optimiser {metrics['config']['train']['embedding_optimizer']}"}


def run_peer(max_len: int, args: argparse.Namespace, export: Path, work: Path) -> dict:
    pred_path = work / "preds" / f"deepctr_din_L{max_len}.npy"
    pred_path.unlink(missing_ok=True)
    scratch = work / "scratch" / f"deepctr_din_L{max_len}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cmd = [str(PEER_PY), "-c", PEAK_WRAPPER, "path", str(PEERS_DIR / "deepctr_din_run.py"), "--data", str(export),
           "--model", "din", "--out", str(pred_path), "--work", str(scratch), "--threads", str(args.threads),
           "--embedding-dim", str(args.embedding_dim), "--hidden", args.hidden, "--att-hidden", args.att_hidden,
           "--att-activation", args.att_activation, "--history", HISTORY, "--query", QUERY,
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--epochs", str(args.epochs),
           "--seed", str(args.train_seed)]
    out, wall, rss = run_measured(cmd, work / "logs" / f"deepctr_din_L{max_len}.log",
                                  thread_env(args.threads, _PEER_ENV))
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"deepctr din: no RESULT line (log: {work / 'logs'})")
    res = json.loads(lines[-1][len("RESULT "):])
    y = np.load(export / "test_y.npy")
    p = np.load(pred_path)
    if p.shape != y.shape:
        raise SystemExit(f"deepctr din: predictions {p.shape} for gold labels {y.shape}")
    shutil.rmtree(scratch, ignore_errors=True)
    return {"lib": "deepctr-torch", "version": res["version"], "model": "DIN", "max_len": max_len, **score(y, p),
            "samples_per_s": res["samples_per_s"], "train_seconds": res["train_seconds"], "process_seconds": wall,
            "peak_rss": rss, "parameters": res["n_params"], "precision": "fp32", "notes": res["notes"]}


# --------------------------------------------------------------------------------------------- speed
def speed_child(args: argparse.Namespace) -> None:
    """--child-speed: train one model `--speed-steps` steps after `--speed-warmup` ones, as `ctrpipe train`
    steps it (its config + the benchmark's --set overrides, its optimisers, train.loop.train_step, a shuffled
    ShardLoader from the loader config), with one loss sync at the end; print `SPEED {json}`."""
    import torch

    from ctrpipe.config import load_config
    from ctrpipe.loader.loader import ShardLoader
    from ctrpipe.loader.view import RowView
    from ctrpipe.models.heads import heads_of
    from ctrpipe.models.registry import build_model
    from ctrpipe.shard.manifest import read_manifest
    from ctrpipe.train.loop import train_step
    from ctrpipe.train.objective import Objective, build_tasks
    from ctrpipe.train.optim import build_optimizers

    torch.set_num_threads(args.threads)
    cfg = load_config(Path(args.child_cfg), ctrpipe_sets(args.child_model, args, "speed"))
    device = torch.device(args.device)
    spec = read_manifest(args.child_cache).feature_spec()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.model.params, spec, sparse=cfg.train.sparse_embeddings).to(device)
    model.train()
    optimizers = build_optimizers(model, cfg.train, device)
    objective = Objective(build_tasks(heads_of(model, spec), spec, cfg.train), device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)                 # train.amp=off: fp32
    loader = ShardLoader.from_config(args.child_cache, RowView.train(), cfg.loader, seed=cfg.seed, device=device)

    def batches():  # noqa: ANN202 - endless, epoch after epoch
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    loss_sum = torch.zeros((), device=device)
    for _ in range(args.speed_warmup):   # first touch of tables and optimiser state, allocator warm-up
        loss_sum += train_step(model, next(stream), objective, optimizers, scaler, cfg.train, device)[0]
    float(loss_sum)
    t0 = time.perf_counter()
    rows = 0
    for _ in range(args.speed_steps):
        batch = next(stream)
        loss_sum += train_step(model, batch, objective, optimizers, scaler, cfg.train, device)[0]
        rows += len(batch)
    float(loss_sum)                      # one sync, as fit does on its log steps
    seconds = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    print("SPEED " + json.dumps({"samples_per_s": rows / seconds, "seconds": seconds, "rows": rows,
                                 "parameters": sum(p.numel() for p in model.parameters()),
                                 "peak_device_bytes": gpu_peak}), flush=True)
    print(f"PEAK_RSS_KB {vm_hwm() // 1024}", flush=True)


def run_speed(model: str, length: int, rnd: int, args: argparse.Namespace, cache: Path, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-speed", "--child-model", model,
           "--child-cfg", model_config(model, work), "--child-cache", str(cache),
           "--speed-steps", str(args.speed_steps), "--speed-warmup", str(args.speed_warmup),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
           "--epochs", str(args.epochs), "--train-seed", str(args.train_seed), "--device", args.device]
    out, wall, rss = run_measured(cmd, work / "logs" / f"speed_{model}_L{length}_r{rnd}.log",
                                  thread_env(args.threads))
    res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("SPEED "))[len("SPEED "):])
    return {**res, "peak_rss": rss, "process_seconds": wall}


def speed_phase(args: argparse.Namespace, caches: dict[int, Path], work: Path, results: dict) -> None:
    """Every (length, model) once per round, rounds interleaved; best and median samples/s, max peak RSS."""
    speed = results["speed"] = {}
    for rnd in range(args.speed_rounds):
        for length in args.lengths:
            for model in args.models:
                before = load()
                r = run_speed(model, length, rnd, args, caches[length], work)
                entry = speed.setdefault(str(length), {}).setdefault(model, {"runs": []})
                entry["runs"].append({**r, "load_before": before})
                rates = [x["samples_per_s"] for x in entry["runs"]]
                entry.update(samples_per_s=max(rates), median_samples_per_s=float(np.median(rates)),
                             peak_rss=max(x["peak_rss"] for x in entry["runs"]), parameters=r["parameters"],
                             peak_device_bytes=r.get("peak_device_bytes"))
                log(f"speed round {rnd + 1}/{args.speed_rounds} L={length} {model}: {r['samples_per_s']:,.0f} "
                    f"samples/s, peak RSS {_mb(r['peak_rss'])} MB (load {before})")
                args.out.write_text(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------------- output
def _mb(b: float | None) -> str:
    return f"{b / 2**20:,.0f}" if b else "-"


def tables(results: dict) -> str:
    """Print the tables; return their markdown version."""
    md: list[str] = []

    def table(title: str, head: list[str], rows: list[list[str]]) -> None:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else []
        log(f"\n{title}")
        log("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
        for r in rows:
            log("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        md.extend(["", f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        md.extend("| " + " | ".join(r) + " |" for r in rows)

    m = results["machine"]
    log(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load {results['load_before']} before, "
        f"{results.get('load_after', '-')} after")
    log(f"training: {results['training']}")
    q = results.get("quality")
    if q:
        runs, orc, hist = q["runs"], q["oracle"], q["history"]
        base = runs.get("dnn")
        rows = [["oracle (true P)", f"{orc['auc']:.4f}", f"{orc['logloss']:.4f}", "", "", "", "", ""]]
        if "auc_without_candidate_x_history" in orc:
            rows.append(["oracle without its candidate x history term", f"{orc['auc_without_candidate_x_history']:.4f}",
                         "", f"{orc['auc'] - orc['auc_without_candidate_x_history']:.4f}", "", "", "", ""])
        for model in (*(j for m in MODELS for j in (m, f"{m}{BF16}")), "deepctr_din"):
            r = runs.get(model)
            if r is None:
                continue
            gain = share = ""
            if model.endswith(BF16) and model.removesuffix(BF16) in runs:     # against its own fp32 run
                fp32 = runs[model.removesuffix(BF16)]
                gain = f"{r['auc'] - fp32['auc']:+.4f} vs fp32"
                share = f"{r['samples_per_s'] / fp32['samples_per_s']:.2f}x fp32 speed"
            elif base is not None and model != "dnn":
                gain = f"{r['auc'] - base['auc']:+.4f}"
                span = orc["auc"] - base["auc"]
                share = f"{(r['auc'] - base['auc']) / span:.0%}" if span > 0 else ""
            name = "DeepCTR-Torch DIN" if model == "deepctr_din" else f"ctrpipe {model}"
            rows.append([name, f"{r['auc']:.4f}", f"{r['logloss']:.4f}", f"{orc['auc'] - r['auc']:.4f}", gain, share,
                         f"{r['samples_per_s']:,.0f}", _mb(r["peak_rss"])])
        table(f"Quality on {q['rows']['test']:,} gold rows after {q['rows']['train']:,} train rows, L = {q['length']} "
              f"(mean stored history {hist['mean_len']:.1f}, {hist['at_cap']:.0%} of rows at the cap, "
              f"{hist['empty']:.1%} empty)",
              ["model", "gold AUC", "gold logloss", "oracle - AUC", "AUC - dnn", "of oracle - dnn", "samples/s",
               "peak RSS MB"], rows)
        ours, peer = runs.get("din"), runs.get("deepctr_din")
        if ours and peer:
            d = ours["auc"] - peer["auc"]
            x = ours["samples_per_s"] / peer["samples_per_s"]
            table("DIN beside DeepCTR-Torch DIN (AUC diff goal >= -0.001, speed goal >= 2x; '!' = missed)",
                  ["L", "ctrpipe AUC", "peer AUC", "AUC diff", "ctrpipe samples/s", "peer samples/s", "speed",
                   "ctrpipe peak RSS MB", "peer peak RSS MB"],
                  [[str(q["length"]), f"{ours['auc']:.4f}", f"{peer['auc']:.4f}",
                    f"{d:+.4f}" + ("" if d >= GOAL_AUC_DIFF else " !"), f"{ours['samples_per_s']:,.0f}",
                    f"{peer['samples_per_s']:,.0f}", f"{x:.2f}x" + ("" if x >= GOAL_SPEEDUP else " !"),
                    _mb(ours["peak_rss"]), _mb(peer["peak_rss"])]])
    sp = results.get("speed")
    if sp:
        rows = []
        models = list(next(iter(sp.values())))
        for model in models:
            for length, entry in sp.items():
                r = entry.get(model)
                if r is None:
                    continue
                hist = results["history"][length]
                gpu = r.get("peak_device_bytes")
                rows.append([model, length, f"{hist['mean_len']:.1f}", f"{r['samples_per_s']:,.0f}",
                             f"{r['median_samples_per_s']:,.0f}", _mb(r["peak_rss"]),
                             f"{gpu / 2**20:,.0f}" if gpu is not None else "-", f"{r['parameters']:,}"])
        table("Training throughput and peak RSS by history length (train steps only, best / median of "
              f"{results['speed_rounds']} interleaved rounds)",
              ["model", "L", "mean stored len", "samples/s best", "samples/s median", "peak RSS MB",
               "peak GPU MB", "parameters"],
              rows)
    log("\noracle - AUC: the model's distance to the true probabilities; of oracle - dnn: the share of the DNN's "
        "AUC gap to the oracle the model closes; peak RSS: the child process's VmHWM")
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000, help="training rows")
    ap.add_argument("--test-rows", type=int, default=100_000, help="gold rows")
    ap.add_argument("--quick", action="store_true", help="20,000 train + 10,000 test rows, 5 speed steps "
                    "(plumbing check)")
    ap.add_argument("--seed", type=int, default=0, help="synth seed (training seeds use --train-seed)")
    ap.add_argument("--train-seed", type=int, default=2026)
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--quality-length", type=int, default=50, help="history length of the quality runs")
    ap.add_argument("--lengths", default="50,200", help="history lengths of the speed runs, one cache each")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--amp", choices=("off", "both"), default="off",
                    help="both: train each ctrpipe model of the quality runs in bf16 autocast too, right after its "
                         "fp32 run (AUC and speed against fp32: what train.amp=auto rests on)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--prepare-only", action="store_true", help="synth, shard and export only; no training")
    ap.add_argument("--speed-steps", type=int, default=40, help="timed training steps per speed run")
    ap.add_argument("--speed-warmup", type=int, default=5)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where ctrpipe trains (cpu, cuda); the peer stays on the CPU, "
                    "so pass --skip-peer with cuda")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    # the peer's sizes: those of cfgs/parquet_din.yaml (checked in main)
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--hidden", default="200,80")
    ap.add_argument("--att-hidden", default="36")
    ap.add_argument("--att-activation", default="prelu", help="the peer's activation unit: prelu or dice")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "sequence")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "sequence.json")
    # the speed child (run by this script)
    ap.add_argument("--child-speed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--child-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--child-cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.test_rows, args.speed_steps, args.speed_rounds = 20_000, 10_000, 5, 1
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    args.lengths = [] if args.skip_speed else [int(x) for x in args.lengths.split(",") if x]
    args.peer = not (args.skip_peer or args.skip_quality or "din" not in args.models)
    return args


def check_peer_sizes(args: argparse.Namespace) -> None:
    """The peer must get cfgs/parquet_din.yaml's sizes: fail rather than compare different models."""
    from ctrpipe.config import load_yaml

    model = load_yaml(ROOT / CONFIGS["din"])["model"]
    want = {"embedding_dim": args.embedding_dim, "hidden_units": [int(h) for h in args.hidden.split(",")],
            "attention_units": [int(h) for h in args.att_hidden.split(",")], "dropout": 0.0}
    have = {k: (list(model[k]) if isinstance(model[k], list | tuple) else model[k]) for k in want}
    if have != want:
        raise SystemExit(f"peer sizes {want} differ from {CONFIGS['din']}'s {have}")


def quality_phase(args: argparse.Namespace, synth: Path, cache: Path, work: Path, results: dict) -> None:
    length = args.quality_length
    export = work / f"export_{cache.name.removeprefix('cache_')}"
    meta = export_features(cache, export, numeric_kinds=NUMERIC_KINDS, bags=True)
    orc = oracle(synth, export)
    y = np.load(export / "test_y.npy")
    log(f"quality: L={length}, {meta['rows']['train']:,} train / {meta['rows']['test']:,} gold rows; oracle AUC "
        f"{orc['auc']:.4f}")
    q = results["quality"] = {"length": length, "history": results["history"][str(length)], "oracle": orc,
                              "rows": meta["rows"], "runs": {}}
    jobs = [*args.models]
    if args.peer and "din" in jobs:   # right after ctrpipe's DIN, so both see about the same machine load
        jobs.insert(jobs.index("din") + 1, "deepctr_din")
    if args.amp == "both":   # each model's bf16 run right after its fp32 one (the quality guard of train.amp=auto)
        jobs = [j for job in jobs for j in ((job,) if job == "deepctr_din" else (job, f"{job}{BF16}"))]
    for job in jobs:
        before = load()
        t0 = time.perf_counter()
        log(f"quality {job}: training (load {before}) ...")
        model, bf16 = job.removesuffix(BF16), job.endswith(BF16)
        r = run_peer(length, args, export, work) if job == "deepctr_din" else \
            run_ctrpipe(model, length, args, cache, work, float(y.mean()), amp="bf16" if bf16 else "off")
        q["runs"][job] = {**r, "load_before": before, "load_after": load()}
        log(f"quality {job}: AUC {r['auc']:.4f}, logloss {r['logloss']:.4f}, {r['samples_per_s']:,.0f} samples/s, "
            f"peak RSS {_mb(r['peak_rss'])} MB ({time.perf_counter() - t0:.0f}s wall)")
        args.out.write_text(json.dumps(results, indent=1))       # partial results survive a crash


def main() -> None:
    args = parse_args()
    if args.child_speed:
        speed_child(args)
        return
    results: dict = {"machine": machine(), "load_before": load(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "speed_rounds": args.speed_rounds, "history": {}}
    log(f"load average before: {results['load_before']}")
    if args.peer and not args.prepare_only:
        check_peer_sizes(args)
        ensure_peer_env(refresh=False)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["training"] = (f"{args.epochs} epoch(s), batch {args.batch_size}, Adam lr {args.lr} constant, fp32, "
                           f"{args.threads} threads; ctrpipe lazy_adam embeddings, peer dense Adam; DIN/peer: "
                           f"embedding {args.embedding_dim}, attention {args.att_hidden} ({args.att_activation} "
                           f"in the peer), MLP {args.hidden}")
    synth = make_synth(args, work)
    lengths = sorted(set(args.lengths) | (set() if args.skip_quality else {args.quality_length}))
    caches = {}
    for length in lengths:
        caches[length] = make_cache(args, work, synth, length)
        hist = results["history"][str(length)] = history_stats(caches[length])
        log(f"L={length}: stored histories of the train rows: mean {hist['mean_len']:.1f}, median "
            f"{hist['median_len']:.0f}, longest {hist['max_len']}, {hist['at_cap']:.0%} at the cap, "
            f"{hist['empty']:.1%} empty")
    if not args.skip_quality:
        if args.prepare_only:
            export_features(caches[args.quality_length], work / f"export_"
                            f"{caches[args.quality_length].name.removeprefix('cache_')}",
                            numeric_kinds=NUMERIC_KINDS, bags=True)
        else:
            quality_phase(args, synth, caches[args.quality_length], work, results)
    if args.prepare_only:
        return
    if args.lengths:
        speed_phase(args, caches, work, results)
    results["load_after"] = load()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.write_text(json.dumps(results, indent=1))
    md = tables(results)
    (work / "tables.md").write_text(md)
    log(f"\nresults: {args.out}; markdown tables: {work / 'tables.md'}; logs: {work / 'logs'}")


if __name__ == "__main__":
    main()
