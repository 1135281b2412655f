"""Benchmark: the sequence models on real public data with histories -- MovieLens-100K as a click log.

Usage (from the repo root, in ctrpipe's venv):
    python benchmarks/bench_movielens.py --ml100k PATH/ml-100k            # every model, seeds 0 1 2
    python benchmarks/bench_movielens.py --ml100k PATH/ml-100k --prepare-only   # the Parquet files only
    python benchmarks/bench_movielens.py --ml100k PATH/ml-100k --models dnn,din --seeds 0
    python benchmarks/bench_movielens.py --ml100k PATH/ml-100k --models "" --peer     # DIN beside DeepCTR-Torch

PATH/ml-100k is the unzipped https://files.grouplens.org/datasets/movielens/ml-100k.zip (u.data, u.item,
u.user). Its licence allows research use but not redistribution, so neither the repository nor CI holds it.

Data: scripts/movielens_to_parquet.py turns the GroupLens files into WORK/data/{train,test}.parquet (its
docstring: one row per rating, clicked = rating >= 4, user and movie features, and the history `seq` of the
movies this user had rated >= 4 at an earlier second, most recent last; each user's latest 20% of ratings are
the test rows); `ctrpipe shard --cfg cfgs/movielens.yaml` makes one cache with the test file as the gold
split. The history shares item_id's vocabulary and embedding rows (the cache keeps its latest 50), so every
model, the DNN too, reads history items in the candidate's own rows. 10% of the train rows, drawn at random,
are the validation view that picks the best evaluation. `--shard-set` changes the cache (e.g. no user_id).

Models: ctrpipe's shipped sequence configs with cfgs/movielens.yaml's data section: `din`
(cfgs/parquet_din.yaml), `din_softmax` (the same with model.attention_softmax: true), `dare`
(cfgs/parquet_dare.yaml), `dare_qnn` (cfgs/dare_qnn.yaml) and `dnn`, the same-size DNN (parquet_din's
embedding 16, MLP 200-80, no dropout; the history is one more mean-pooled field). Training: the configs' own
(batch 1024, lazy_adam embeddings) for up to `--epochs` epochs, two evaluations per epoch on the validation
view, early stopping after `--patience` evaluations without a better AUC; the best evaluation's weights score
the gold rows. Each (model, seed) is one `ctrpipe train` child.

`--peer` (after `python benchmarks/bench_quality.py --setup`): ctrpipe's DIN beside DeepCTR-Torch's DIN
(benchmarks/peers/deepctr_din_run.py, the sizes and settings bench_sequence.py gives it) on the same rows
and ids, both trained alike: a second cache without the validation view, `--peer-epochs` epochs, Adam lr 1e-3
constant, batch 1024, fp32, the last weights scored on the gold rows.

Prints gold AUC / logloss per model (mean and sd over seeds) and each model's AUC minus the DNN's of the same
seed; writes everything to .bench/movielens.json. Figures and what they mean: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_multitask import load, machine  # noqa: E402
from bench_quality import log  # noqa: E402
from movielens_to_parquet import prepare  # noqa: E402

MODELS = ("dnn", "din", "din_softmax", "dare", "dare_qnn")
CONFIGS = {"dnn": "cfgs/parquet_din.yaml", "din": "cfgs/parquet_din.yaml", "din_softmax": "cfgs/parquet_din.yaml",
           "dare": "cfgs/parquet_dare.yaml", "dare_qnn": "cfgs/dare_qnn.yaml"}
VARIANTS = {"din_softmax": ["model.attention_softmax=true"]}     # shipped config + these --set overrides


# ------------------------------------------------------------------------------------------ training
def model_config(model: str, work: Path) -> Path:
    """The shipped sequence config with cfgs/movielens.yaml's data section -> WORK/<model>.yaml (a whole file:
    the shipped ones extend the synthetic Parquet schema's config). dnn: parquet_din's sizes, model dnn."""
    import yaml

    from ctrpipe.config import load_yaml

    cfg = load_yaml(ROOT / CONFIGS[model])
    cfg["data"] = load_yaml(ROOT / "cfgs" / "movielens.yaml")["data"]
    if model == "dnn":
        din = cfg["model"]
        cfg["model"] = {"name": "dnn", **{k: din[k] for k in ("embedding_dim", "hidden_units", "dropout")}}
    cfg["exp_name"] = f"movielens_{model}"
    path = work / f"{model}.yaml"
    path.write_text(f"# written by benchmarks/bench_movielens.py from {CONFIGS[model]} + cfgs/movielens.yaml\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def selection_sets(args: argparse.Namespace) -> list[str]:
    """The configs' own training, with the best of two evaluations per epoch on the validation view."""
    return [f"train.epochs={args.epochs}", "train.evals_per_epoch=2", f"train.early_stopping.patience={args.patience}",
            "train.early_stopping.metric=auc", "train.device=cpu", f"train.num_threads={args.threads}",
            "train.amp=off"]


def train(model: str, seed: int, args: argparse.Namespace, cache: Path, work: Path, training: list[str],
          tag: str = "") -> dict:
    exp = f"{model}{tag}_s{seed}"
    sets = [f"exp_name={exp}", f"seed={seed}", *training, *VARIANTS.get(model, [])]
    cmd = [sys.executable, "-m", "ctrpipe.cli", "train", "--cfg", str(model_config(model, work)),
           "--shards", str(cache), "--runs", str(work / "runs"), "-q"]
    shutil.rmtree(work / "runs" / exp, ignore_errors=True)
    for s in sets:
        cmd += ["--set", s]
    logf = work / "logs" / f"{exp}.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with logf.open("w") as fh:
        if subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{model} seed {seed}: ctrpipe train failed (log: {logf})")
    m = json.loads((work / "runs" / exp / "metrics.json").read_text())
    gold = m["gold"]
    return {"model": model, "seed": seed, "auc": float(gold["auc"]), "logloss": float(gold["logloss"]),
            "pos_rate": float(gold["pos_rate"]),
            "val_auc": m.get("val", {}).get("auc"), "best_step": m.get("best_step"), "steps": m["steps"],
            "stopped_early": m.get("stopped_early"), "samples_per_s": float(m["samples_per_s"]),
            "parameters": m.get("parameters"), "wall_s": time.perf_counter() - t0}


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: dict) -> str:
    runs = results["runs"]
    dnn = {r["seed"]: r["auc"] for r in runs if r["model"] == "dnn"}
    lines = ["| model | gold AUC, mean ± sd | gold logloss | AUC - DNN's, same seed: mean ± sd (each) "
             "| samples/s |", "|---|---|---|---|---|"]
    for model in results["models"]:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        auc = [r["auc"] for r in mine]
        ll = [r["logloss"] for r in mine]
        diff = [r["auc"] - dnn[r["seed"]] for r in mine if r["seed"] in dnn]
        cell = "" if model == "dnn" or not diff else \
            f"{statistics.mean(diff):+.4f} ± {sd(diff):.4f} ({', '.join(f'{d:+.4f}' for d in diff)})"
        lines.append(f"| {model} | {statistics.mean(auc):.4f} ± {sd(auc):.4f} | {statistics.mean(ll):.4f} | {cell} "
                     f"| {statistics.mean(r['samples_per_s'] for r in mine):,.0f} |")
    if "peer" in results:
        runs = results["peer"]["runs"]
        lines += ["", f"DIN beside DeepCTR-Torch's DIN, {results['peer']['epochs']} epochs each, no validation view:",
                  "| seed | ctrpipe AUC | DeepCTR-Torch AUC | AUC difference | ctrpipe samples/s | peer samples/s "
                  "| speed ratio |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            a, b = r["ctrpipe"], r["deepctr"]
            lines.append(f"| {r['seed']} | {a['auc']:.4f} | {b['auc']:.4f} | {a['auc'] - b['auc']:+.4f} "
                         f"| {a['samples_per_s']:,.0f} | {b['samples_per_s']:,.0f} "
                         f"| {a['samples_per_s'] / b['samples_per_s']:.2f}x |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ml100k", type=Path, required=True,
                    help="the unzipped ml-100k folder (u.data, u.item, u.user)")
    ap.add_argument("--models", default=",".join(MODELS), help=",".join(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--patience", type=int, default=3, help="evaluations (two per epoch) without a better val AUC")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of cfgs/movielens.yaml for the cache, repeatable (e.g. a column left out: "
                         "--shard-set 'data.categorical.columns=[item_id,gender,age,occupation,zip3,year]')")
    ap.add_argument("--peer", action="store_true", help="also ctrpipe's DIN beside DeepCTR-Torch's DIN, trained "
                    "alike (needs .bench/peers-venv: python benchmarks/bench_quality.py --setup)")
    ap.add_argument("--peer-epochs", type=int, default=3)
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "movielens")
    ap.add_argument("--out", type=Path, default=ROOT / ".bench" / "movielens.json")
    args = ap.parse_args()
    args.work, args.out, args.ml100k = args.work.resolve(), args.out.resolve(), args.ml100k.resolve()  # children
    args.models = [m for m in args.models.split(",") if m]                                  # run in ROOT
    for m in args.models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    return args


def shard(args: argparse.Namespace, work: Path, cache: Path, extra: tuple[str, ...] = ()) -> None:
    t0 = time.perf_counter()
    sets = [x for s in (*args.shard_set, *extra) for x in ("--set", s)]
    subprocess.run([sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", "cfgs/movielens.yaml",
                    "-i", str(work / "data" / "train.parquet"), "--gold", str(work / "data" / "test.parquet"),
                    "-o", str(cache), "-q", "--force", *sets], cwd=ROOT, check=True)
    log(f"shard: {time.perf_counter() - t0:.1f}s -> {cache}")


def peer_phase(args: argparse.Namespace, work: Path, results: dict) -> None:
    """ctrpipe's DIN beside DeepCTR-Torch's on the same rows and ids, trained alike: a cache without a
    validation view (so neither picks an evaluation), `--peer-epochs` epochs at a constant lr, fp32."""
    import bench_sequence as seq
    from bench_quality import ensure_peer_env, export_features

    cache = work / "cache_noval"
    shard(args, work, cache, ("data.split.val_ratio=0",))
    export = work / "export"
    export_features(cache, export, numeric_kinds=("numeric",), bags=True)
    y = np.load(export / "test_y.npy")
    peer_args = argparse.Namespace(epochs=args.peer_epochs, lr=1e-3, batch_size=1024, threads=args.threads,
                                   embedding_dim=16, hidden="200,80", att_hidden="36", att_activation="prelu")
    seq.check_peer_sizes(peer_args)
    ensure_peer_env(refresh=False)
    runs = results["peer"] = {"epochs": args.peer_epochs, "runs": []}
    for seed in args.seeds:
        peer_args.train_seed = seed
        training = [s for s in seq.ctrpipe_sets("din", peer_args, "_") if not s.startswith(("exp_name=", "seed="))]
        mine = train("din", seed, args, cache, work, training, tag="_fixed")
        if abs(mine["pos_rate"] - float(y.mean())) > 1e-6:      # both must score the same gold rows
            raise SystemExit(f"ctrpipe scored gold rows of positive rate {mine['pos_rate']}, the export {y.mean()}")
        theirs = seq.run_peer(50, peer_args, export, work)
        runs["runs"].append({"seed": seed, "ctrpipe": mine, "deepctr": theirs})
        log(f"seed {seed}, {args.peer_epochs} epochs: ctrpipe din AUC {mine['auc']:.4f} ({mine['samples_per_s']:,.0f}"
            f" samples/s), DeepCTR-Torch DIN AUC {theirs['auc']:.4f} ({theirs['samples_per_s']:,.0f} samples/s)")
        args.out.write_text(json.dumps(results, indent=1))


def main() -> None:
    args = parse_args()
    work = args.work
    stats = prepare(args.ml100k, work / "data")
    log(f"data: {json.dumps(stats)}")
    if args.prepare_only:
        return
    results = {"machine": machine(), "load_before": load(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "data": stats, "shard_set": args.shard_set, "models": args.models, "seeds": args.seeds,
               "epochs": args.epochs, "patience": args.patience, "runs": []}
    if args.models:
        cache = work / "cache"
        shard(args, work, cache)
        for seed in args.seeds:          # seed-major: load from other jobs falls on every model alike
            for model in args.models:
                r = train(model, seed, args, cache, work, selection_sets(args))
                results["runs"].append(r)
                log(f"{model} seed {seed}: gold AUC {r['auc']:.4f}, logloss {r['logloss']:.4f}, best step "
                    f"{r['best_step']} of {r['steps']}, {r['samples_per_s']:,.0f} samples/s ({r['wall_s']:.0f}s)")
                args.out.write_text(json.dumps(results, indent=1))
    if args.peer:
        peer_phase(args, work, results)
    results["load_after"] = load()
    args.out.write_text(json.dumps(results, indent=1))
    log("\n" + table(results))


if __name__ == "__main__":
    main()
