"""Benchmark: test AUC, logloss and training samples/s of ctrpipe against peer libraries on the same data.

Usage (from the repo root, in ctrpipe's venv):
    python benchmarks/bench_quality.py --setup                     # create/refresh .bench/peers-venv only
    python benchmarks/bench_quality.py --rows 50000 --test-rows 20000          # quick check
    python benchmarks/bench_quality.py                             # full: 1.8M train + 200k test rows
    python benchmarks/bench_quality.py --rows 300000 --models autoint --hidden 400,400 --peers deepctr

Same data for everyone: `ctrpipe synth` writes train/test text; `ctrpipe shard` turns them into one cache
(train split + the test file as gold split, no validation split), and the cache's arrays are exported once
(.bench/quality/export_*) so that the peers read the very same hashed ids and numeric values. Same
training for everyone: one epoch, embedding dim 16, MLP 400-400-400 (no dropout, no batch norm, no L2),
batch 4096, Adam lr 1e-3 on embeddings and dense layers at a constant rate, 2 torch threads.
Peers (DeepCTR-Torch, FuxiCTR) live only in .bench/peers-venv and run as subprocesses
(benchmarks/peers/*_run.py). All AUC / logloss figures are computed here by ctrpipe.train.metrics from each
library's test predictions (ctrpipe's own come from its metrics.json, computed by the same code).
Also printed: the oracle (true click probabilities from synth) and a logistic-regression baseline.
ctrpipe trains each model in fp32 (train.amp=off) and with train.amp=auto (`--amp both`, the default): the
auto row says which precision auto chose and why, and its AUC is checked against fp32's (goal: within 0.001).
Writes the table to stdout and everything to .bench/quality.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "benchmarks" / "peers"
PEER_VENV = ROOT / ".bench" / "peers-venv"
PEER_PY = PEER_VENV / "bin" / "python"
MODELS = ("dnn", "deepfm", "dcnv2")
# the rest of ctrpipe's zoo, trained with the same data and settings (autoint: DeepCTR-Torch only)
ZOO_ONLY = ("dcn", "autoint", "ft_transformer", "qnn_alpha")
PEERS = {"deepctr": "deepctr_run.py", "fuxictr": "fuxictr_run.py"}
# which peer model answers which ctrpipe model (see the runners' docstrings)
PEER_MODEL = {"deepctr": {"dnn": "WDL, no wide part", "deepfm": "DeepFM",
                          "dcnv2": "DCN matrix cross, no wide part", "dcnmix": "DCNMix, no wide part",
                          "autoint": "AutoInt+ (2 heads of emb/2, numerics into the MLP only), no wide part"},
              "fuxictr": {"dnn": "DNN", "deepfm": "DeepFM", "dcnv2": "DCNv2"}}
# ctrpipe models whose numeric input layout --numeric sets (dnn always appends them: cfgs/criteo_dnn.yaml)
NUMERIC_MODELS = ("deepfm", "dcn", "dcnv2", "dcnmix", "autoint")
GOAL_AUC_DIFF = -0.001
GOAL_AMP_AUC = 0.001      # |AUC(auto) - AUC(fp32)| of ctrpipe's own two runs
GOAL_SPEEDUP = 2.0


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> str:
    """Run a command, keep its whole output in `log_file`, return stdout+stderr; fail loudly on error."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_file.write_text(" ".join(cmd) + "\n\n" + proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}) after {time.perf_counter() - t0:.0f}s: "
                         f"{' '.join(cmd)}\n--- last lines (whole log: {log_file}) ---\n{tail}")
    return proc.stdout


def peer_result(cmd: list[str], log_file: Path, env: dict[str, str], what: str) -> tuple[dict, float]:
    """Run a peer runner; (its last `RESULT {json}` line, wall seconds). No RESULT line is a failure."""
    t0 = time.perf_counter()
    out = run(cmd, log_file, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{what}: no RESULT line (log: {log_file})")
    return json.loads(lines[-1][len("RESULT "):]), wall


def cpu_model() -> str:
    """The CPU's model name and its bf16 instructions, e.g. 'AMD EPYC (avx512_bf16, no AMX)'."""
    from ctrpipe.device import cpu_flags, cpu_name

    name, flags = cpu_name(), cpu_flags()
    bf16 = ", ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "no native bf16"
    return f"{name} ({bf16}{'' if 'amx_bf16' in flags else ', no AMX'})"


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------------------- peer venv
def _requirements_digest() -> str:
    return hashlib.sha256((PEERS_DIR / "requirements.txt").read_bytes()).hexdigest()[:16]


def ensure_peer_env(refresh: bool) -> None:
    """Create (or refresh) .bench/peers-venv: torch 2.13.0 first (CPU build from the local wheels), then the
    peers. The venv records the requirements digest it was built from; a changed file rebuilds it."""
    marker = PEER_VENV / ".requirements.sha"
    if not refresh and PEER_PY.exists() and marker.exists() and marker.read_text() == _requirements_digest():
        return
    log(f"setting up the peers' environment in {PEER_VENV} (first run or requirements changed)")
    if refresh and PEER_VENV.exists():
        shutil.rmtree(PEER_VENV)
    if not PEER_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(PEER_PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-r", str(PEERS_DIR / "requirements.txt")], check=True)
    probe = ("import torch, deepctr_torch, fuxictr; from fuxictr.pytorch.layers import CrossNetV2; "
             "print('VERSIONS', torch.__version__, torch.version.cuda, deepctr_torch.__version__, "
             "fuxictr.__version__)")
    text = subprocess.run([str(PEER_PY), "-c", probe], check=True, capture_output=True, text=True,
                          env=thread_env(1, _PEER_ENV)).stdout
    out = next(ln for ln in text.splitlines() if ln.startswith("VERSIONS ")).split()[1:]
    log(f"peers' environment: torch {out[0]} (cuda {out[1]}), deepctr-torch {out[2]}, fuxictr {out[3]}")
    if out[1] != "None":
        log("warning: the peers' torch is a CUDA build; install the CPU build of torch 2.13.0 first")
    marker.write_text(_requirements_digest())


# deepctr_torch asks the package index for a newer version on import: a dead proxy makes that fail at once.
_PEER_ENV = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
             "RAY_USAGE_STATS_ENABLED": "0"}


# ----------------------------------------------------------------------------------------------- data
def ctrpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctrpipe.cli", *args]


def data_tag(args: argparse.Namespace) -> str:
    sizing = "fit" if args.fit_bins else "flat"
    return (f"{args.rows}_{args.test_rows}_s{args.seed}_bins{args.hash_bins}{sizing}_"
            f"{'std' if args.standardize else 'log1p'}")


def field_bins(train_tsv: Path, cap: int) -> dict[str, int]:
    """Hash bins per categorical field: the power of two >= 2 x (distinct values + 1) on the train file,
    at least 16 and at most `cap`. Small fields then hash almost without collisions and no field carries
    rows it can never use (every library updates its whole tables with dense Adam, so idle rows cost time)."""
    import polars as pl

    from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT

    names = ["label", *CRITEO_INT, *CRITEO_CAT]
    counts = (pl.scan_csv(train_tsv, separator="\t", has_header=False, new_columns=names,
                          schema_overrides={c: pl.String for c in CRITEO_CAT}, infer_schema_length=0)
              .select([pl.col(c).n_unique() for c in CRITEO_CAT]).collect().row(0))
    return {c: min(cap, max(16, 1 << int(np.ceil(np.log2(2 * (n + 1)))))) for c, n in zip(CRITEO_CAT, counts,
                                                                                           strict=True)}


def make_data(args: argparse.Namespace, work: Path) -> Path:
    """synth -> shard (train split + gold split from the test file); both steps reuse matching outputs."""
    synth = work / "synth"
    meta = synth / "synth.json"
    want = {"rows": args.rows, "test_rows": args.test_rows, "seed": args.seed}
    have = json.loads(meta.read_text()) if meta.exists() else {}
    fresh = any(have.get(k) != v for k, v in want.items())
    if fresh:
        log(f"synth: {args.rows:,} train + {args.test_rows:,} test rows -> {synth}")
        run(ctrpipe_cmd("synth", "--rows", str(args.rows), "--test-rows", str(args.test_rows),
                        "--seed", str(args.seed), "--out", str(synth), "-q"), work / "logs" / "synth.log")
    cache = work / f"cache_{data_tag(args)}"          # one cache per setting: ctrpipe refuses to overwrite
    sets = ["data.split.val_ratio=0", "data.folds.n_splits=0", f"data.hash_bins={args.hash_bins}",
            f"data.numeric.standardize={str(args.standardize).lower()}"]
    if args.fit_bins:
        bins = field_bins(synth / "train.tsv", args.hash_bins)
        sets += [f"data.categorical.bins.{c}={b}" for c, b in bins.items()]
        log(f"shard: hash bins per field (<= {args.hash_bins:,}): {sum(bins.values()):,} table rows in all")
    log(f"shard: -> {cache} (numeric log1p{' + standardize' * args.standardize}, no validation split, "
        "test file = gold split)")
    t0 = time.perf_counter()
    cmd = ctrpipe_cmd("shard", "--cfg", "cfgs/criteo.yaml", "-i", str(synth / "train.tsv"),
                      "--gold", str(synth / "test.tsv"), "-o", str(cache), "-q")
    if fresh:   # new synth files: a cache built from the old ones is refused, so rebuild it
        cmd.append("--force")
    for s in sets:
        cmd += ["--set", s]
    run(cmd, work / "logs" / "shard.log")
    log(f"shard: done in {time.perf_counter() - t0:.1f}s")
    return cache


def export_features(cache: Path, out: Path, numeric_kinds: tuple[str, ...] = ("numeric",),
                    bags: bool = False) -> dict:
    """Train rows (split 0) and gold rows (split 2) of the cache -> plain .npy files the peers read.

    `numeric_kinds`: the numeric-group column kinds exported as numeric inputs (bench_multitask.py adds
    missing indicators and co-visitation features); `bags`: also export unweighted multi-hot and sequence
    token arrays (0 = padding). Any other column in the cache is an error: peers must see what ctrpipe sees.
    """
    from ctrpipe.data.splits import SPLIT_CODES
    from ctrpipe.shard.reader import open_cache

    arrays = open_cache(cache)
    m = arrays.manifest
    meta_path = out / "meta.json"
    setting = {"numeric_kinds": list(numeric_kinds), "bags": bags}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("fingerprint") == m.fingerprint and old.get("setting", setting) == setting:
            return old
    cats = sorted(m.columns_of("categorical"), key=lambda c: c.index)
    nums = sorted(m.columns_of(*numeric_kinds), key=lambda c: c.index)
    bag_cols = sorted(m.columns_of("multihot", "sequence"), key=lambda c: c.name) if bags else []
    kinds = {"missing_indicator", "covisit", "numeric", "multihot", "sequence"}
    kinds -= set(numeric_kinds) | ({"multihot", "sequence"} if bags else set())
    if m.columns_of(*kinds) or any(c.weighted for c in bag_cols):
        raise SystemExit(f"the benchmark cache holds columns the export leaves out ({', '.join(sorted(kinds))}, "
                         "weighted multi-hot): peers would not see every feature ctrpipe sees")
    label_names = [c.name for c in sorted(m.columns_of("label"), key=lambda c: c.index)]
    split = arrays.concat("split")
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    shards = [arrays.shard(i) for i in range(len(m.shards))]
    for name, code in (("train", SPLIT_CODES["train"]), ("test", SPLIT_CODES["gold"])):
        keep = [np.flatnonzero(s["split"] == code) for s in shards]
        groups = ("categorical", "numeric", "labels", *(c.group for c in bag_cols))
        parts = {g: np.concatenate([s[g][k] for s, k in zip(shards, keep, strict=True)]) for g in groups}
        np.save(out / f"{name}_cat.npy", parts["categorical"][:, [c.index for c in cats]].astype(np.int32))
        np.save(out / f"{name}_num.npy", parts["numeric"][:, [c.index for c in nums]].astype(np.float32))
        np.save(out / f"{name}_y.npy", parts["labels"][:, 0].astype(np.float32))
        if len(label_names) > 1:
            np.save(out / f"{name}_labels.npy", parts["labels"].astype(np.float32))
        for c in bag_cols:
            np.save(out / f"{name}_bag_{c.name}.npy", parts[c.group].astype(np.int32))
        rows[name] = int(parts["labels"].shape[0])
        if rows[name] != int((split == code).sum()):
            raise SystemExit(f"export of {name} rows is inconsistent with the cache's split array")
    meta = {"fingerprint": m.fingerprint, "setting": setting, "cat_fields": [c.name for c in cats],
            "num_fields": [c.name for c in nums], "bins": [int(c.bins) for c in cats], "rows": rows,
            "numeric_transform": [c.transform for c in nums][:1], "labels": label_names,
            "bag_fields": [c.name for c in bag_cols], "bag_bins": [int(c.bins) for c in bag_cols],
            "bag_kinds": [c.kind for c in bag_cols]}
    tmp = out / "meta.json.incomplete"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return meta


# -------------------------------------------------------------------------------------------- metrics
def score(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from ctrpipe.train.metrics import auc, logloss

    return {"auc": auc(y, p), "logloss": logloss(y, p)}


def oracle(work: Path, export: Path) -> dict[str, float]:
    """The true click probabilities of the test rows, checked to be in the same order as the exported rows."""
    import polars as pl

    truth = np.load(work / "synth" / "test.truth.npy").astype(np.float64).reshape(-1)
    y = np.load(export / "test_y.npy")
    raw = pl.read_csv(work / "synth" / "test.tsv", separator="\t", has_header=False, columns=[0],
                      infer_schema_length=0)[:, 0].cast(pl.Float32).to_numpy()
    if truth.shape != y.shape or not np.array_equal(raw, y):
        raise SystemExit("exported test rows are not the synth test file in order: cannot score the oracle")
    return score(y, truth)


def logistic_regression(export: Path, meta: dict, threads: int, batch: int, lr: float,
                        seed: int) -> dict[str, float]:
    """Baseline: hashed one-hot weights (a 1-d embedding per id) + numeric weights + bias; 1 epoch of Adam."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cat, num, y = (np.load(export / f"train_{k}.npy") for k in ("cat", "num", "y"))
    offsets = torch.from_numpy(np.cumsum([0, *meta["bins"][:-1]]).astype(np.int64))
    table = nn.Embedding(int(sum(meta["bins"])), 1)
    nn.init.zeros_(table.weight)
    linear = nn.Linear(num.shape[1], 1)
    params = [*table.parameters(), *linear.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def logits(c: np.ndarray, x: np.ndarray) -> torch.Tensor:
        ids = torch.from_numpy(c.astype(np.int64)) + offsets                 # (B, Fc)
        return table(ids).sum(dim=(1, 2)) + linear(torch.from_numpy(x)).squeeze(1)   # (B,)

    order = np.random.default_rng(seed).permutation(len(y))
    t0 = time.perf_counter()
    for start in range(0, len(y), batch):
        idx = np.sort(order[start:start + batch])
        loss = nn.functional.binary_cross_entropy_with_logits(logits(cat[idx], num[idx]),
                                                              torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    tc, tn, ty = (np.load(export / f"test_{k}.npy") for k in ("cat", "num", "y"))
    with torch.no_grad():
        p = torch.sigmoid(torch.cat([logits(tc[s:s + 65536], tn[s:s + 65536])
                                     for s in range(0, len(ty), 65536)])).numpy()
    return {**score(ty, p), "samples_per_s": len(y) / seconds}


# ----------------------------------------------------------------------------------------- libraries
def run_ctrpipe(model: str, args: argparse.Namespace, cache: Path, work: Path, amp: str = "off") -> dict:
    runs = work / "runs"
    exp = f"bench_{model}_{amp}"
    shutil.rmtree(runs / exp, ignore_errors=True)
    hidden = "[" + ",".join(str(h) for h in args.hidden) + "]"
    # one epoch whatever the size: criteo.yaml's min_steps would repeat a small sample's epochs
    sets = [f"exp_name={exp}", "train.epochs=1", "train.min_steps=0", f"train.lr={args.lr}", "train.embedding_lr=0",
            f"train.embedding_optimizer={args.embedding_optimizer}", "train.schedule=constant", "train.warmup_steps=0",
            "train.weight_decay=0", "train.grad_clip=0", f"train.num_threads={args.threads}",
            "train.device=cpu", f"loader.batch_size={args.batch_size}", f"train.amp={amp}",
            f"seed={args.train_seed}"]
    if model == "qnn_alpha":        # no MLP, and its dropout is what makes the self-ensemble's two passes differ
        sets += [f"model.embedding_dim={args.embedding_dim}"]
    elif model != "ft_transformer":   # FT-Transformer has no MLP: its own token width (cfgs/criteo_ft_transformer.yaml)
        sets += [f"model.embedding_dim={args.embedding_dim}", f"model.hidden_units={hidden}", "model.dropout=0",
                 "model.batch_norm=false"]
    if model in ("dcnv2", "dcnmix"):
        sets += [f"model.cross_layers={args.cross_layers}"]
    if model in NUMERIC_MODELS:
        # concat: raw numerics appended to the 26 x 16 embeddings (a 429-wide MLP / cross input; FM over the 26
        # categorical fields only), as DeepCTR-Torch and the DeepFM / DCN papers do; token: one 16-d field per
        # numeric column (624 wide, FuxiCTR's layout)
        sets += [f"model.numeric={args.numeric}"]
    if model == "dcnmix":
        sets += ["model.cross_kind=mixture", "model.low_rank=32", "model.n_experts=4"]
    if model == "autoint":       # DeepCTR-Torch's AutoInt: 3 layers of 2 heads, each embedding_dim / 2 wide
        sets += ["model.attention_layers=3", "model.attention_heads=2",
                 f"model.attention_dim={max(1, args.embedding_dim // 2)}"]
    cfg = f"cfgs/criteo_{'dcnv2' if model == 'dcnmix' else model}.yaml"
    cmd = ctrpipe_cmd("train", "--shards", str(cache), "--cfg", cfg, "--runs", str(runs), "-q")
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    run(cmd, work / "logs" / f"ctrpipe_{model}_{amp}.log", env=thread_env(args.threads))
    wall = time.perf_counter() - t0
    metrics = json.loads((runs / exp / "metrics.json").read_text())
    gold = metrics.get("gold") or {}
    # single label: gold metrics are flat ({"auc": ..}); multi-label runs nest them per label
    gold = gold if "auc" in gold else next(iter(gold.values()))
    precision = metrics["precision"]["train"]
    return {"lib": "ctrpipe" if amp == "off" else f"ctrpipe {amp}", "amp": amp, "precision": precision,
            "precision_reason": metrics["precision"]["reason"],
            "model": model, "auc": float(gold["auc"]), "logloss": float(gold["logloss"]),
            "samples_per_s": float(metrics["samples_per_s"]),
            "train_seconds": float(metrics["train_seconds"]),
            "process_seconds": wall,
            "notes": f"{'fp32' if precision == 'off' else precision} steps; {cfg}, embedding optimiser "
                     f"{args.embedding_optimizer}, constant lr" +
                     (f", numeric={args.numeric}" if model in NUMERIC_MODELS else "")}


def run_peer(peer: str, model: str, args: argparse.Namespace, export: Path, work: Path) -> dict:
    pred = work / "preds" / f"{peer}_{model}.npy"
    pred.unlink(missing_ok=True)
    scratch = work / "scratch" / f"{peer}_{model}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cmd = [str(PEER_PY), str(PEERS_DIR / PEERS[peer]), "--data", str(export), "--model", model,
           "--out", str(pred), "--work", str(scratch), "--threads", str(args.threads),
           "--embedding-dim", str(args.embedding_dim), "--hidden", ",".join(str(h) for h in args.hidden),
           "--cross-layers", str(args.cross_layers), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--epochs", "1", "--seed", str(args.train_seed)]
    extra = dict(_PEER_ENV, FUXICTR_DATA_FORMAT=args.fuxictr_format)
    res, wall = peer_result(cmd, work / "logs" / f"{peer}_{model}.log", thread_env(args.threads, extra),
                         f"{peer} {model}")
    y = np.load(export / "test_y.npy")
    p = np.load(pred)
    if p.shape != y.shape:
        raise SystemExit(f"{peer} {model}: {p.shape[0]} predictions for {y.shape[0]} test rows")
    shutil.rmtree(scratch, ignore_errors=True)
    return {"lib": res["lib"], "version": res["version"], "model": model, **score(y, p),
            "samples_per_s": res["samples_per_s"], "train_seconds": res["train_seconds"],
            "process_seconds": wall, "n_params": res["n_params"],
            "notes": f"{PEER_MODEL[peer][model]} {res['notes']}".strip()}


# ------------------------------------------------------------------------------------------- output
def print_table(results: dict) -> None:
    log("")
    d = results["data"]
    log(f"cpu: {results.get('cpu', '?')}")
    log(f"data: {d['train_rows']:,} train rows, {d['test_rows']:,} test rows, {sum(d['bins'].values()):,} "
        f"hash bins in all (<= {d['hash_bins']:,} per field), numeric {d['numeric']}; {results['threads']} "
        f"threads; one epoch, batch {results['batch_size']}, Adam lr {results['lr']}, "
        f"emb {results['embedding_dim']}, MLP {results['hidden']}")
    head = f"{'model':<8} {'library':<15} {'test AUC':>9} {'logloss':>8} {'samples/s':>10} {'train s':>8}  " \
           f"{'AUC diff':>15} {'speed x':>11}  notes"
    log(head)
    log("-" * len(head))
    for row in results["reference"]:
        speed = row.get("samples_per_s", float("nan"))
        log(f"{'-':<8} {row['lib']:<15} {row['auc']:>9.4f} {row['logloss']:>8.4f} "
            f"{speed:>10.0f} {'':>8}  {'':>15} {'':>11}  {row.get('notes', '')}")
    for model, rows in results["models"].items():
        mine = [r for r in rows if r["lib"].startswith("ctrpipe")]
        for r in rows:
            diff, speed = _comparison(r, mine)
            log(f"{model:<8} {r['lib']:<15} {r['auc']:>9.4f} {r['logloss']:>8.4f} "
                f"{r['samples_per_s']:>10.0f} {r['train_seconds']:>8.1f}  {diff:>15} {speed:>11}  "
                f"{r.get('notes', '')}")
    log("peer rows: AUC diff = ctrpipe - peer (goal >= -0.001) and speed x = ctrpipe samples/s / peer samples/s "
        "(goal >= 2), for each ctrpipe row (fp32/auto); the auto row: against ctrpipe fp32 (AUC goal within "
        "0.001); '!' marks a missed goal")


def _comparison(row: dict, mine: list[dict]) -> tuple[str, str]:
    """The AUC-diff and speed-x cells of one row: a peer against each ctrpipe row, ctrpipe's mixed-precision
    row against its fp32 row, '' for the fp32 row itself."""
    if row["lib"] == "ctrpipe" or not mine:
        return "", ""
    if row["lib"].startswith("ctrpipe"):
        base = next((m for m in mine if m["lib"] == "ctrpipe"), None)
        if base is None:
            return "", ""
        d, x = row["auc"] - base["auc"], row["samples_per_s"] / base["samples_per_s"]
        return f"{d:+.4f}{'' if abs(d) <= GOAL_AMP_AUC else '!'}", f"{x:.2f}"
    diffs, speeds = [], []
    for m in mine:
        d, x = m["auc"] - row["auc"], m["samples_per_s"] / row["samples_per_s"]
        diffs.append(f"{d:+.4f}{'' if d >= GOAL_AUC_DIFF else '!'}")
        speeds.append(f"{x:.2f}{'' if x >= GOAL_SPEEDUP else '!'}")
    return "/".join(diffs), "/".join(speeds)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_800_000, help="training rows")
    ap.add_argument("--test-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0, help="synth seed (training seeds use --train-seed)")
    ap.add_argument("--train-seed", type=int, default=2026)
    ap.add_argument("--models", default=",".join(MODELS),
                    help="dnn,deepfm,dcnv2; also dcnmix, and ctrpipe-only dcn,autoint,ft_transformer")
    ap.add_argument("--peers", default="deepctr,fuxictr", help="comma list, or 'none'")
    ap.add_argument("--skip-ctrpipe", action="store_true", help="peers only")
    ap.add_argument("--amp", choices=("both", "off", "auto", "bf16"), default="both",
                    help="ctrpipe's train.amp: both (fp32 and auto, side by side: the default), or one of them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hash-bins", type=int, default=20_000,
                    help="hash bins per categorical field (the cap, with per-field sizing)")
    ap.add_argument("--flat-bins", dest="fit_bins", action="store_false",
                    help="every field gets --hash-bins bins (default: sized per field from the train file)")
    ap.add_argument("--no-standardize", dest="standardize", action="store_false",
                    help="feed the signed-log1p numeric values as they are (default: also standardise them with "
                         "train-split mean/std, for every library, as both peers' own examples scale them)")
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--hidden", default="400,400,400")
    ap.add_argument("--cross-layers", type=int, default=3)
    ap.add_argument("--numeric", choices=("concat", "token"), default="concat",
                    help="how ctrpipe's DeepFM, DCN and DCN v2 take the 13 numerics: concat (appended raw to the "
                         "embeddings, 429 wide, FM over the categorical fields: DeepCTR-Torch's layout) or token "
                         "(a 16-d field each, 624 wide: FuxiCTR's layout, ~1.1x DeepFM's and ~1.7x DCN v2's step)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--embedding-optimizer", default="lazy_adam",
                    help="ctrpipe's embedding optimiser: lazy_adam (its default: Adam on the rows a batch touches)"
                         " or adam (dense Adam over the whole table, like the peers)")
    ap.add_argument("--lr-baseline-lr", type=float, default=1e-2, help="Adam rate of the LR baseline")
    ap.add_argument("--fuxictr-format", choices=("npz", "parquet"), default="npz",
                    help="FuxiCTR data path: npz (torch DataLoader) or parquet (its Ray Data loader)")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "quality")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "quality.json")
    ap.add_argument("--setup", action="store_true", help="(re)create .bench/peers-venv and exit")
    ap.add_argument("--prepare-only", action="store_true", help="make the data (synth, shard, export) and exit")
    args = ap.parse_args()
    args.hidden = [int(h) for h in args.hidden.split(",") if h]
    args.models = [m for m in args.models.split(",") if m]
    args.peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
    for m in args.models:
        if m not in (*MODELS, "dcnmix", *ZOO_ONLY):
            ap.error(f"unknown model {m!r}; choose from {', '.join((*MODELS, 'dcnmix', *ZOO_ONLY))}")
    return args


def main() -> None:
    args = parse_args()
    if args.setup:
        ensure_peer_env(refresh=True)
        return
    if args.peers:
        ensure_peer_env(refresh=False)
    work = args.work
    cache = make_data(args, work)
    export = work / f"export_{data_tag(args)}"
    t0 = time.perf_counter()
    meta = export_features(cache, export)
    log(f"export: {meta['rows']['train']:,} train / {meta['rows']['test']:,} test rows, "
        f"{len(meta['cat_fields'])} categorical + {len(meta['num_fields'])} numeric -> {export} "
        f"({time.perf_counter() - t0:.1f}s)")
    if args.prepare_only:
        return
    results: dict = {"data": {"train_rows": meta["rows"]["train"], "test_rows": meta["rows"]["test"],
                              "hash_bins": args.hash_bins, "bins": dict(zip(meta["cat_fields"], meta["bins"],
                                                                            strict=True)),
                              "numeric": "log1p" + (" + standardize" if args.standardize else ""),
                              "synth_seed": args.seed, "train_seed": args.train_seed},
                     "threads": args.threads, "batch_size": args.batch_size, "lr": args.lr,
                     "embedding_dim": args.embedding_dim, "hidden": args.hidden, "numeric_mode": args.numeric,
                     "cpu": cpu_model(),
                     "reference": [],
                     "models": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    orc = oracle(work, export)
    results["reference"].append({"lib": "oracle", **orc, "notes": "true click probability (synth)"})
    log(f"oracle: AUC {orc['auc']:.4f} logloss {orc['logloss']:.4f}")
    lr = logistic_regression(export, meta, args.threads, args.batch_size, args.lr_baseline_lr,
                             args.train_seed)
    results["reference"].append({"lib": "logistic reg.", **lr,
                                 "notes": f"hashed one-hot + numeric, 1 epoch Adam lr {args.lr_baseline_lr}"})
    log(f"logistic regression: AUC {lr['auc']:.4f} logloss {lr['logloss']:.4f}")
    for model in args.models:
        rows = results["models"].setdefault(model, [])
        amps = [] if args.skip_ctrpipe else (["off", "auto"] if args.amp == "both" else [args.amp])
        jobs = [(f"ctrpipe amp={a}", a) for a in amps] + [(p, p) for p in args.peers]
        for name, what in jobs:
            if what in PEERS and model not in PEER_MODEL[what]:
                continue
            t0 = time.perf_counter()
            log(f"{model}: training {name} ...")
            r = run_peer(what, model, args, export, work) if what in PEERS else \
                run_ctrpipe(model, args, cache, work, amp=what)
            rows.append(r)
            log(f"{model}: {name}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
                f"{r['samples_per_s']:,.0f} samples/s ({time.perf_counter() - t0:.0f}s wall)" +
                (f"; precision {r['precision_reason']}" if "precision_reason" in r else ""))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))     # partial results survive a crash
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.write_text(json.dumps(results, indent=1))
    print_table(results)
    log(f"\nresults: {args.out}; logs: {work / 'logs'}")


if __name__ == "__main__":
    main()
