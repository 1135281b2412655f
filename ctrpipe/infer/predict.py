"""Stage 6: `ctrpipe infer`: a run's checkpoints (one, or one per fold) over a shard cache -> submission CSV.

Each checkpoint predicts every row of the view (unshuffled, batched, on the GPU when there is one) into a
preallocated (K, N) float32 logit array; its saved calibration is applied per model; the K probability
vectors are combined with `ensemble.combine` in row chunks; IDs are streamed from the cache's `ids.npy`.
Next to `submission.csv` goes `submission.csv.json`: resolved config, run, checkpoint and cache fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ctrpipe.atomic import atomic_open, write_json_atomic
from ctrpipe.config import RunConfig, apply_overrides, check_calibration_fit, config_from_dict, to_dict
from ctrpipe.console import console, human_rate, make_progress
from ctrpipe.data.splits import SPLIT_CODES
from ctrpipe.device import predict_amp, resolve_device
from ctrpipe.errors import CheckpointError, ConfigError, ManifestMismatchError
from ctrpipe.infer.calibrate import (
    CALIBRATION_NAME,
    Calibration,
    NoValidationPredictions,
    few_rows_warning,
    fit_calibration,
    load_val_predictions,
    read_calibration,
    warn_at_bound,
)
from ctrpipe.infer.config import InferConfig, check_trim_ratio
from ctrpipe.infer.ensemble import combine, rank_normalise, resolve_weights
from ctrpipe.infer.submission import SubmissionWriter, check_out_file, check_out_outside
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.sampling import training_sampling
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import Manifest, read_manifest
from ctrpipe.shard.reader import open_cache
from ctrpipe.train.checkpoint import (
    Checkpoint,
    check_compatible,
    checkpoint_tasks,
    load_checkpoint,
    model_from_checkpoint,
)
from ctrpipe.train.evaluate import logit_shifts, predict
from ctrpipe.train.metrics import LOWER_IS_BETTER, QUALITY_METRICS, compute_metrics, refuse_descriptive_metric, sigmoid
from ctrpipe.train.objective import Task

# keys an inference run may change; the model and data sections are fixed by the checkpoint
OVERRIDABLE = ("infer.", "loader.", "train.device", "train.amp")


@dataclass(frozen=True)
class InferReport:
    out: Path
    rows: int
    checkpoints: tuple[Path, ...]
    weights: tuple[float, ...] | None
    view: str
    task: str
    metrics: dict[str, float] | None
    seconds: float
    notes: tuple[str, ...] = ()        # why metrics were left out or what they cannot tell


# ----------------------------------------------------------------------------------------------- inputs

def find_checkpoints(run: Path) -> list[Path]:
    """ckpt_fold{k}.pt for k = 0..K-1 when any exist (all K required), else ckpt_best.pt; only from a run
    that finished training (its metrics.json is written last): a run's best checkpoint exists from its first
    evaluation on, so an interrupted run would otherwise pass for a finished one."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"run folder {run} does not exist", where=str(run),
                              fix=_train_fix(run) + _other_runs(run.parent))
    folds = _fold_checkpoints(run)
    best = run / "ckpt_best.pt"
    if not folds and not best.is_file():
        exp = _exp_name(run)
        raise CheckpointError(f"no checkpoint in run folder {run} (exp_name {exp!r}): neither ckpt_best.pt nor "
                              "ckpt_fold*.pt", where=str(run), fix=_train_fix(run) + _other_runs(run.parent))
    if not (run / "metrics.json").is_file():
        raise CheckpointError(f"the run in {run} has not finished training (no metrics.json, which training "
                              "writes when it ends): its checkpoints are from an interrupted or still running "
                              "training", where=str(run),
                              fix="finish it with the same `ctrpipe train ...` command plus --resume, or wait "
                                  "for it to end")
    return folds or [best]


_FOLD_NAME = re.compile(r"^ckpt_fold(\d+)\.pt$")
# what makes checkpoints one run's: its name, seed, model, folds and the cache it trained on (other settings
# may change on --resume, and are not compared)
_RUN_IDENTITY = ("exp_name", "seed", "model", "cv")


def load_run_checkpoints(run: Path) -> tuple[list[Path], list[Checkpoint]]:
    """`find_checkpoints` of a run, loaded, each checked to be this run's and the fold its name says: a copy
    of another run's checkpoint (or of fold 0 as fold 1) joined the ensemble without a word, and the run's
    calibration, fitted on its own folds, was applied to it."""
    paths = find_checkpoints(run)
    ckpts = [load_checkpoint(p) for p in paths]
    recorded = _run_config_json(run)
    base = recorded or ckpts[0].config
    for path, ckpt in zip(paths, ckpts, strict=True):
        m = _FOLD_NAME.match(path.name)
        want = int(m.group(1)) if m else -1
        if ckpt.fold != want:
            what = f"fold {ckpt.fold}" if ckpt.fold >= 0 else "no fold (a single model's ckpt_best.pt)"
            raise CheckpointError(f"{path.name} holds the model of {what}, not of "
                                  + (f"fold {want}" if want >= 0 else "a single model"), where=str(path),
                                  fix=f"put that fold's own checkpoint back as {path.name} (a copy of another "
                                      "fold or run would count in the ensemble as this one)")
        other = [k for k in _RUN_IDENTITY if ckpt.config.get(k) != base.get(k)]
        if not other and ckpt.manifest_fingerprint != ckpts[0].manifest_fingerprint:
            other = ["the shard cache it trained on"]
        if other:
            against = "the run's config.json" if recorded else paths[0].name
            raise CheckpointError(f"{path.name} is another run's checkpoint: its {', '.join(other)} "
                                  f"{'differs' if len(other) == 1 else 'differ'} from "
                                  f"{against}", where=str(path),
                                  fix=f"put this run's own {path.name} back, or infer with the run it came from")
    return paths, ckpts


def _fold_checkpoints(run: Path) -> list[Path]:
    """A K-fold run's ckpt_fold0.pt .. ckpt_fold{K-1}.pt, all required; any other ckpt_fold* file is refused
    (a copy such as ckpt_fold0_backup.pt would otherwise weigh its fold twice in the ensemble)."""
    found = sorted(run.glob("ckpt_fold*.pt"))
    if not found:
        return []
    odd = [p.name for p in found if not _FOLD_NAME.match(p.name)]
    want = _n_splits(run) or len(found)
    folds = {int(m.group(1)): p for p in found if (m := _FOLD_NAME.match(p.name))}
    odd += [folds[k].name for k in sorted(folds) if k >= want]
    if odd:
        raise CheckpointError(f"the run folder holds {odd[0]}, which is not a fold checkpoint of this "
                              f"{want}-fold run (ckpt_fold0.pt .. ckpt_fold{want - 1}.pt)", where=str(run),
                              fix=f"move {', '.join(odd)} out of {run}: every ckpt_fold*.pt there joins the "
                                  "ensemble")
    missing = sorted(set(range(want)) - set(folds))
    if missing:
        # a finished run (metrics.json) lost it afterwards: --resume would only say the run has finished
        fix = f"finish training with `ctrpipe train ... --kfold {want} --resume`" if not \
            (run / "metrics.json").is_file() else \
            (f"the run finished with it, so it was moved or deleted since: put it back, or train the folds again "
             f"as a new run (`ctrpipe train ... --kfold {want} --set exp_name=NEW`)")
        raise CheckpointError(f"K-fold run is incomplete: ckpt_fold{missing[0]}.pt is missing "
                              f"(found folds {sorted(folds)} of {want})", where=str(run), fix=fix)
    return [folds[k] for k in range(want)]


def _run_config_json(run: Path) -> dict[str, Any]:
    try:
        doc = json.loads((run / "config.json").read_text())
        return doc.get("config", doc) if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _exp_name(run: Path) -> str:
    return str(_run_config_json(run).get("exp_name", run.name))


def _n_splits(run: Path) -> int:
    cv = _run_config_json(run).get("cv", {})
    return int(cv.get("n_splits", 0)) if isinstance(cv, dict) else 0


def _train_fix(run: Path) -> str:
    return (f"train first, e.g. `ctrpipe train --cfg cfgs/criteo.yaml --shards shards/criteo "
            f"--set exp_name={run.name}` (writes {run}/ckpt_best.pt), or point --run at a finished run")


def _other_runs(parent: Path) -> str:
    if not parent.is_dir():
        return ""
    found = sorted(p.name for p in parent.iterdir()
                   if p.is_dir() and ((p / "ckpt_best.pt").is_file() or any(p.glob("ckpt_fold*.pt"))))
    return f"; runs with checkpoints in {parent}: {', '.join(found[:10])}" if found else ""


def resolve_config(ckpt: Checkpoint, overrides: Sequence[str]) -> RunConfig:
    """The run's resolved config (from its checkpoint) plus inference-only `--set` overrides."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith(OVERRIDABLE):
            raise ConfigError(f"--set {text}: '{key}' cannot change at inference (the checkpoint fixes it)",
                              where="--set",
                              fix="override only infer.*, loader.*, train.device or train.amp, "
                                  "e.g. --set infer.method=mean")
    data = json.loads(json.dumps(ckpt.config))     # deep copy
    apply_overrides(data, overrides)
    sources = {text.split("=", 1)[0].strip(): "--set" for text in overrides}
    cfg = config_from_dict(data, sources=sources, origin="run config + --set")
    check_calibration_fit(cfg)
    return cfg


def resolve_view(name: str, manifest: Manifest) -> RowView:
    """auto: the test split when the cache has test rows, else every row; otherwise the named split."""
    if name == "all" or (name == "auto" and manifest.rows.get("test", 0) == 0):
        return RowView(splits=tuple(SPLIT_CODES))
    if name == "auto":
        return RowView.test()
    return RowView(splits=(name,))


def task_index(cfg: RunConfig, heads: Sequence[str]) -> int:
    """infer.task names the head to write (default: the model's first head)."""
    if not cfg.infer.task:
        return 0
    if cfg.infer.task not in heads:
        raise ConfigError(f"unknown task {cfg.infer.task!r}", where="infer.task",
                          fix=f"use one of the model's heads: {', '.join(heads)}")
    return list(heads).index(cfg.infer.task)


def checkpoint_logit_shift(ckpt: Checkpoint, tasks: Sequence[Task]) -> tuple[float, ...]:
    """Per head, what undoes the sampling of the checkpoint's training rows: from the loader settings it was
    trained with (not the --set loader.* overrides of this inference) and its FeatureSpec's label rates, or the
    rate its balanced batches drew from where it recorded one (a K-fold model's training view)."""
    trained = config_from_dict(json.loads(json.dumps(ckpt.config)), sources={}, origin="checkpoint config")
    return logit_shifts(tasks, training_sampling(trained.loader, ckpt.feature_spec, ckpt.sampling_rate))


def check_ids(shards: Path, manifest: Manifest) -> None:
    """Refuse early (before any model runs) a cache without ids.npy: a submission needs IDs."""
    lacking = [s.index for s in manifest.shards if "ids" not in s.files]
    if lacking:
        raise ManifestMismatchError(f"shard {lacking[0]} of the cache has no ids.npy, so rows have no IDs "
                                    "to write", where=str(shards),
                                    fix="rebuild the test cache with an ID column (data.id_column for "
                                        "Parquet; Criteo text uses row positions): "
                                        "`ctrpipe shard --test ... --force`")


def load_calibrations(run: Path, cfg: RunConfig, task: int, head: str, quiet: bool) -> tuple[Calibration, str]:
    """The task's (head's) calibration from calibration.json, refitted in memory if the file is for another
    config. What makes it differ from what was asked is said even when `quiet`; `quiet` only keeps the
    missing-predictions warning back (a library's Predictor)."""
    ccfg = cfg.infer.calibration
    # method none still applies the known keep-rate shift (log keep_rate), as a fitted calibration does
    identity = Calibration(method="none", target=ccfg.target, keep_rate=ccfg.keep_rate)
    if ccfg.method == "none":
        return identity, "none" if ccfg.keep_rate == 1.0 else f"none, keep-rate shift log({ccfg.keep_rate:g})"
    path = run / CALIBRATION_NAME
    why = "calibration.json is for another config or absent"
    if path.is_file():
        cals, requested = read_calibration(path)
        if requested == ccfg and task < len(cals):
            # what training warned of once is said again where the predictions are written (even quiet)
            warn_at_bound(cals[task], head)
            if cals[task].method == "none":
                console.print(f"[yellow]warning:[/] {CALIBRATION_NAME} holds no fit for head {head!r} "
                              f"(infer.calibration.method={ccfg.method} was asked: its validation rows held one "
                              "class, or too few of one); writing uncalibrated predictions", highlight=False)
            return cals[task], f"{CALIBRATION_NAME}"
        if requested is None:
            why = "calibration.json is from a ctrpipe whose method=bias with keep_rate < 1 fitted no bias"
    try:
        src, logits, labels, names = load_val_predictions(run)
    except NoValidationPredictions:     # a damaged file is an error: it must not pass for an uncalibrated run
        if not quiet:
            console.print(f"[yellow]warning:[/] {run} has no validation predictions, so infer.calibration."
                          f"method={ccfg.method} cannot be fitted; writing uncalibrated predictions")
        return identity, "none (no validation predictions)"
    cal = fit_calibration(logits[:, task], labels[:, task], ccfg)
    warn_at_bound(cal, names[task])
    note = few_rows_warning(labels[np.isfinite(logits[:, task]), task], names[task], ccfg.method)
    if note is not None:
        console.print(f"[yellow]{note}[/]", highlight=False)
    return cal, f"refitted on {src.name} ({why})"


def fold_weights(cfg: RunConfig, ckpts: Sequence[Checkpoint]) -> tuple[float, ...] | None:
    """Explicit infer.weights, or softmax(fold val score / T) for method=weighted; None when unweighted."""
    ic = cfg.infer
    scores = None
    if ic.method == "weighted" and not ic.weights:
        metric = ic.weight_metric
        refuse_descriptive_metric(metric, "infer.weight_metric", list(QUALITY_METRICS))
        vals = [c.val_metrics.get(metric) for c in ckpts]
        if any(v is None for v in vals):
            raise ConfigError(f"a checkpoint has no validation {metric!r} to weight folds by",
                              where="infer.weight_metric",
                              fix="give explicit weights (--set infer.weights=[1,1,2]) or another metric")
        lower = metric.split(".", 1)[0] in LOWER_IS_BETTER         # logloss.clicked too
        scores = [-float(v) if lower else float(v) for v in vals]
    w = resolve_weights(ic.method, len(ckpts), ic.weights or None, scores, ic.weight_temperature, "infer.weights")
    return None if w is None else tuple(float(x) for x in w)


# ----------------------------------------------------------------------------------------------- predicting

def ensemble_logits(logits: np.ndarray, cals: Sequence[Calibration], method: str,
                    weights: Sequence[float] | None, trim_ratio: float, chunk_rows: int) -> np.ndarray:
    """(K, N) float32 logits -> (N,) float64 probabilities: calibrate each model, then combine per chunk."""
    k, n = logits.shape
    if method == "rank_avg":
        # ranks are over all N rows, so build them one model at a time instead of per chunk
        w = np.asarray(weights if weights is not None else np.full(k, 1.0 / k), dtype=np.float64)
        out = np.zeros(n, dtype=np.float64)
        for m in range(k):
            out += w[m] * rank_normalise(cals[m].apply(logits[m]))
        return out
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, chunk_rows):
        b = min(n, a + chunk_rows)
        probs = np.stack([sigmoid(cals[m].apply(logits[m, a:b])) for m in range(k)])   # (K, b - a)
        out[a:b] = combine(probs, method, weights=weights, trim_ratio=trim_ratio)
    return out


def refuse_duplicate_ids(shards: Path, rows: np.ndarray, chunk: int) -> None:
    """Refuse, before any model runs, a submission whose rows repeat an ID (a test file with duplicated rows):
    blending and scoring join on IDs. One 64-bit hash per row (int IDs as they are), sorted in place, is the
    only row-length array it holds; only when two hashes are equal are the rows found again and compared on
    the IDs."""
    cache = open_cache(shards, groups=("ids",))

    def hashes() -> np.ndarray:
        keys = np.empty(len(rows), dtype=np.uint64)
        for a in range(0, len(rows), chunk):
            ids = cache.take("ids", rows[a:a + chunk])
            keys[a:a + len(ids)] = ids.view(np.uint64) if ids.dtype == np.int64 else \
                pl.Series(ids.astype(str)).hash(seed=0).to_numpy()
        return keys

    keys = hashes()
    keys.sort()
    same = np.unique(keys[1:][keys[1:] == keys[:-1]])
    if not len(same):
        return
    del keys
    keys = hashes()                                # rare: the rows of each repeated hash, in row order
    at = np.flatnonzero(np.isin(keys, same))
    order = at[np.argsort(keys[at], kind="stable")]
    for i, j in zip(order[:-1], order[1:], strict=True):
        if keys[i] != keys[j]:
            continue
        a, b = int(rows[i]), int(rows[j])
        first, second = cache.take("ids", np.array([a])), cache.take("ids", np.array([b]))
        if first[0] == second[0]:
            raise ManifestMismatchError(f"ID {first[0].item()!r} is on two rows of the cache (rows {min(a, b):,} and "
                                        f"{max(a, b):,}): a submission needs one row per ID",
                                        where=str(shards / "manifest.json"),
                                        fix="drop the duplicated rows from the test file and shard it again")


def _write_ids_and_preds(shards: Path, rows: np.ndarray, preds: np.ndarray, out: Path,
                         cfg: RunConfig, then: Callable[[], object]) -> None:
    """Stream (ID, prediction) chunks: IDs are gathered from each shard's ids.npy memmap per chunk. `then`
    writes the files that describe the submission, committed with it (`SubmissionWriter(then=)`)."""
    cache = open_cache(shards, groups=("ids",))
    chunk = cfg.infer.write_chunk_rows
    # a new submission never sits beside an older one's sidecar or fold predictions (an interrupt between
    # its rename and theirs, or a run without save_fold_preds, would pair them); a failed one keeps them
    stale = (out.with_name(out.name + ".json"), out.with_name(out.name + ".folds.npz"))
    with SubmissionWriter(out, cfg.infer.id_header, cfg.infer.pred_header, expected_rows=len(rows),
                          stale=stale, then=then) as writer:
        for a in range(0, len(rows), chunk):
            writer.write(cache.take("ids", rows[a:a + chunk]), preds[a:a + chunk].astype(np.float32))


# ----------------------------------------------------------------------------------------------- command

def run_infer(run: Path, shards: Path, out: Path | None, overrides: Sequence[str],
              quiet: bool = False) -> InferReport:
    """Predict a shard cache with every checkpoint of a run, ensemble, calibrate, write a submission."""
    t0 = time.perf_counter()
    run, shards = Path(run), Path(shards)
    out = Path(out) if out is not None else run / "submission.csv"
    check_out_file(out)
    check_out_outside(out, run, (shards,))
    paths, ckpts = load_run_checkpoints(run)
    cfg = resolve_config(ckpts[0], overrides)
    manifest = read_manifest(shards)
    for ckpt, path in zip(ckpts, paths, strict=True):
        check_compatible(ckpt, manifest, shards, path)
    check_ids(shards, manifest)
    tasks = checkpoint_tasks(ckpts[0], cfg.train)
    heads = [t.name for t in tasks]
    task = task_index(cfg, heads)
    if task and not quiet and cfg.infer.pred_header == InferConfig.pred_header:
        # the column keeps its default name: a conversion submission headed 'clicked' reads as a click one
        console.print(f"[yellow]note[/]: head {heads[task]!r} is written as column {cfg.infer.pred_header!r} "
                      f"(infer.pred_header); set --set infer.pred_header=... to name it otherwise", highlight=False)
    weights = fold_weights(cfg, ckpts)
    if cfg.infer.method == "trim_mean":
        check_trim_ratio(cfg.infer.trim_ratio, "infer.trim_ratio", len(ckpts))
    # warned of even under -q: the predictions are not calibrated as infer.calibration asks
    cal, cal_source = load_calibrations(run, cfg, task, heads[task], quiet=False)
    device = resolve_device(cfg.train.device)
    view = resolve_view(cfg.infer.view, manifest)
    labelled = bool(manifest.columns_of("label")) and all("labels" in s.files for s in manifest.shards)
    batch = cfg.infer.batch_size or cfg.loader.eval_batch_size
    loader = ShardLoader.from_config(shards, view, dataclasses.replace(cfg.loader, eval_batch_size=batch),
                                     seed=cfg.seed, device=device, train=False, with_labels=labelled)
    n = loader.num_rows
    labels = np.empty(n, dtype=np.float32) if labelled else None
    logits = np.empty((len(ckpts), n), dtype=np.float32)                 # (K, N)
    rows = loader.row_indices()
    refuse_duplicate_ids(shards, rows, cfg.infer.write_chunk_rows)
    with make_progress(quiet) as progress:
        for k, (ckpt, path) in enumerate(zip(ckpts, paths, strict=True)):
            model = model_from_checkpoint(ckpt, device)
            bar = progress.add_task(f"predict {path.name}", total=n)
            preds = predict(model, loader, n, tasks, device, predict_amp(cfg.train.amp), with_labels=labelled,
                            on_batch=lambda b, bar=bar: progress.advance(bar, b),
                            logit_shift=checkpoint_logit_shift(ckpt, tasks))
            if not np.array_equal(preds.row_index, rows):
                raise AssertionError("loader order differs from its row_indices() with shuffle=False")
            logits[k] = preds.logits[:, task]
            if k == 0 and labels is not None:
                labels[:] = preds.labels[:, task]
            del model, preds
    preds = ensemble_logits(logits, [cal] * len(ckpts), cfg.infer.method, weights, cfg.infer.trim_ratio,
                            cfg.infer.write_chunk_rows)
    metrics = None
    notes = _metric_notes(view, manifest, ckpts, cal, cfg.infer.method)
    if labels is not None and np.isfinite(labels).any() and not notes.withheld:
        metrics = compute_metrics(labels, preds)          # rows a head's mask drops (NaN) are skipped
        if cfg.infer.method == "rank_avg":                # ranks order the rows; they are no probabilities
            metrics = {k: v for k, v in metrics.items() if k in ("auc", "ap")}
    # what goes beside the submission is written before it lands, so the commit (which holds Ctrl-C) only
    # renames and writes the small record: a full disk there left a submission with neither
    sha256s = [file_sha256(p) for p in paths]
    folds = out.with_name(out.name + ".folds.npz")
    staged = _save_fold_preds(folds.with_name(folds.name + ".staged"), rows, logits, paths, labels) \
        if cfg.infer.save_fold_preds else None
    reports: list[InferReport] = []

    def companions() -> None:
        """The submission's fold predictions and record, committed with it (`SubmissionWriter(then=)`)."""
        if staged is not None:
            os.replace(staged, folds)
        reports.append(InferReport(out=out, rows=n, checkpoints=tuple(paths), weights=weights,
                                   view=view.describe(), task=heads[task], metrics=metrics,
                                   seconds=time.perf_counter() - t0, notes=notes.lines))
        _write_sidecar(reports[0], cfg, run, shards, manifest, ckpts, sha256s, cal, cal_source)

    try:
        _write_ids_and_preds(shards, rows, preds, out, cfg, then=companions)
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)          # moved into place, or not used: a failed write
    _print_summary(reports[0], cfg, cal, cal_source, device, quiet)
    return reports[0]


@dataclass(frozen=True)
class _MetricNotes:
    lines: tuple[str, ...]
    withheld: bool                     # the view's labels say nothing held-out about these models


def _metric_notes(view: RowView, manifest: Manifest, ckpts: Sequence[Checkpoint], cal: Calibration,
                  method: str) -> _MetricNotes:
    """What the view's metrics can tell. On the cache the run trained on, rows a model trained on give
    in-sample numbers (K-fold: every fold covers the train and val rows, and each model trained on all but
    one of them): they are withheld, pointing to the held-out figures training recorded. A calibration fitted
    on the validation rows it is scored on flatters them a little: said, not withheld."""
    lines: list[str] = []
    withheld = False
    same_cache = all(c.manifest_fingerprint == manifest.fingerprint for c in ckpts)
    kfold = any(c.fold >= 0 for c in ckpts)
    trained = {"train", "val"} if kfold else {"train"}
    touched = sorted(trained & set(view.splits)) if same_cache else []
    if touched:
        withheld = True
        held_out = "cv.oof in metrics.json (each row scored by the fold model that did not train on it)" \
            if kfold else "val in metrics.json"
        lines.append(f"metrics withheld: the models trained on the {' and '.join(touched)} rows of this view; "
                     f"the held-out figures are {held_out}")
    elif same_cache and "val" in view.splits and cal.method != "none":
        flattered = "WLL and Score" if cal.target == "wll" else "logloss and calibration"
        lines.append(f"the calibration (target {cal.target}) was fitted on these validation rows: {flattered} are "
                     "slightly optimistic")
    if method == "rank_avg":
        lines.append("rank_avg writes rank scores in [0, 1], not probabilities: only AUC and AP are reported")
    return _MetricNotes(tuple(lines), withheld)


# ----------------------------------------------------------------------------------------------- outputs

def _save_fold_preds(path: Path, rows: np.ndarray, logits: np.ndarray, paths: Sequence[Path],
                     labels: np.ndarray | None) -> Path:
    """<submission>.folds.npz (at `path`, staged): row_index (N,), logits (K, N) per-model logits
    (uncalibrated, sampling shift applied), checkpoints (K,)."""
    extra = {"labels": labels} if labels is not None else {}
    with atomic_open(path, "wb") as fh:
        np.savez(fh, row_index=rows, logits=logits, checkpoints=np.array([p.name for p in paths]), **extra)
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_sidecar(r: InferReport, cfg: RunConfig, run: Path, shards: Path, manifest: Manifest,
                   ckpts: Sequence[Checkpoint], sha256s: Sequence[str], cal: Calibration,
                   cal_source: str) -> Path:
    """`<submission>.json`: everything needed to tell where a submission came from (written with it)."""
    path = r.out.with_name(r.out.name + ".json")
    doc = {
        "submission": str(r.out.resolve()), "rows": r.rows, "view": r.view, "task": r.task,
        "run": str(run.resolve()), "exp_name": cfg.exp_name, "method": cfg.infer.method,
        "weights": list(r.weights) if r.weights is not None else None,
        "checkpoints": [{"path": str(p.resolve()), "sha256": sha, "fold": c.fold,
                         "epoch": c.epoch, "step": c.step, "val_metrics": _finite(c.val_metrics),
                         "schema_fingerprint": c.schema_fingerprint,
                         "manifest_fingerprint": c.manifest_fingerprint}
                        for p, c, sha in zip(r.checkpoints, ckpts, sha256s, strict=True)],
        "shards": str(shards.resolve()), "shards_fingerprint": manifest.fingerprint,
        "shards_schema_fingerprint": manifest.schema_fingerprint(),
        "calibration": {**asdict(cal), "source": cal_source},
        "metrics": _finite(r.metrics) if r.metrics is not None else None, "notes": list(r.notes),
        "config": to_dict(cfg), "config_sources": dict(cfg.sources), "seconds": round(r.seconds, 3),
    }
    return write_json_atomic(path, doc)


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _print_summary(r: InferReport, cfg: RunConfig, cal: Calibration, cal_source: str, device: torch.device,
                   quiet: bool) -> None:
    rate = human_rate(r.rows * len(r.checkpoints) / max(r.seconds, 1e-9), "rows/s")
    k = len(r.checkpoints)
    # rank_avg ranks one model's scores too: its name says the output is no probability
    how = f"{k} checkpoint{'s' if k > 1 else ''}" + \
        (f", {cfg.infer.method}" if k > 1 or cfg.infer.method == "rank_avg" else "")
    if quiet:
        extra = "".join(f" {m}={r.metrics[m]:.5f}" for m in ("auc", "logloss") if r.metrics and m in r.metrics)
        console.print(f"wrote {r.out} ({r.rows:,} rows, {how}, {r.seconds:.1f}s){extra}", highlight=False)
        for note in r.notes:
            console.print(f"  note: {note}", highlight=False)
        return
    from rich.table import Table

    table = Table(title=f"ctrpipe infer: {cfg.exp_name}", title_justify="left", show_header=False)
    table.add_row("submission", f"[bold]{r.out}[/] (+ {r.out.name}.json)")
    table.add_row("rows", f"{r.rows:,} of {r.view}, task {r.task}")
    table.add_row("models", how + ("" if r.weights is None else
                                   " weights " + ",".join(f"{w:.3f}" for w in r.weights)))
    table.add_row("calibration",
                  f"{cal.method} T={cal.temperature:.4f} shift={cal.shift:+.4f} ({cal_source})")
    table.add_row("time", f"{r.seconds:.1f}s on {device} ({rate})")
    if r.metrics is not None:
        table.add_row("metrics", "  ".join(f"{m}={r.metrics[m]:.5f}" for m in ("auc", "logloss", "wll", "ap")
                                           if m in r.metrics))
    console.print(table)
    for note in r.notes:
        console.print(f"  note: {note}", highlight=False)
