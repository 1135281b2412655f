"""Stage 5 entry point (`ctrpipe train`): config + shard cache -> run directory, single run or K-fold.

Checks everything a user can get wrong before the first step (cache, model, device, folds, run dir), then
calls `loop.fit` once per model, scores gold rows, writes metrics.json and fits calibration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from rich.table import Table

from ctrpipe.atomic import folder_lock
from ctrpipe.config import RunConfig, flatten_dotted, load_config, to_dict
from ctrpipe.console import console, human_rate
from ctrpipe.data.config import DataConfig
from ctrpipe.device import AmpChoice, check_amp, model_family, predict_amp, resolve_amp, resolve_device
from ctrpipe.errors import (
    CheckpointError,
    ConfigError,
    CtrpipeError,
    ManifestMismatchError,
    SchemaError,
    TrainingError,
    first_on_node,
    human_bytes,
)
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import AnonPeak, available_bytes, peak_rss, release_free_heap
from ctrpipe.infer.calibrate import calibrate_run
from ctrpipe.infer.submission import shard_cache_holding
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.sampling import Sampling, stream_spec, training_sampling, view_labels
from ctrpipe.loader.view import RowView, resolve_view
from ctrpipe.models.heads import Head, default_heads, head_rate, heads_of, label_rate, positives_outside_mask
from ctrpipe.models.layers.sequence import History
from ctrpipe.models.registry import build_model, largest_tensor, weight_bytes
from ctrpipe.shard.build import identity_config
from ctrpipe.shard.manifest import Manifest, read_manifest
from ctrpipe.train.checkpoint import (
    Checkpoint,
    build_initial_model,
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
)
from ctrpipe.train.config import CVConfig, EarlyStoppingConfig
from ctrpipe.train.distributed import Distributed, RankInfo, batch_norm_settings, rank_info
from ctrpipe.train.evaluate import Predictions, logit_shifts, predict
from ctrpipe.train.loop import FitInputs, FitResult, fit
from ctrpipe.train.metrics import QUALITY_METRICS, metrics_from_logits, refuse_descriptive_metric
from ctrpipe.train.objective import Task, build_tasks
from ctrpipe.train.optim import least_training_bytes
from ctrpipe.train.rundir import write_config, write_json, write_text
from ctrpipe.train.stopping import EarlyStopping

SUMMARY_METRICS = ("auc", "logloss", "ap", "wll", "score", "calibration")


@dataclasses.dataclass(frozen=True)
class TrainContext:
    """What every model of one `ctrpipe train` call shares."""

    cfg: RunConfig
    shards: Path
    manifest: Manifest
    spec: FeatureSpec
    device: torch.device
    run_dir: Path
    resume: bool
    quiet: bool
    tasks: tuple[Task, ...]          # the model's heads with train.tasks applied
    parameters: int                  # of one model, tables whole (counted on the meta build)
    logit_shift: tuple[float, ...] = ()   # per head, undoes the training rows' sampling (loader/sampling.py)
    dist: Distributed | None = None  # a torchrun job: this rank's process group (train/distributed.py)
    amp: AmpChoice = AmpChoice("off", "train.amp=off")   # the training steps' precision (train.amp resolved)
    finished: bool = False           # --resume of a run that had already ended: nothing to train or rewrite
    sampling_rate: float | None = None    # the rate a K-fold model's balanced batches are shifted by (its view's)

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and prints (one process, or rank 0)."""
        return self.dist is None or self.dist.is_main

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def metric_weights(self) -> list[float]:
        return [t.metric_weight for t in self.tasks]


def run_train(cfg_path: Path | None, overrides: Sequence[str], shards: Path, runs: Path, kfold: int = 0,
              resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train one model (or one per fold) and write runs/<exp_name>/; returns the metrics.json content."""
    # `held`: the run folder's lock (rank 0), until the run's last file (metrics.json) is written
    with AnonPeak() as anon, ExitStack() as held:
        return _train(cfg_path, overrides, shards, runs, kfold, resume, quiet, anon, held)


def with_kfold(cfg: RunConfig, kfold: int) -> RunConfig:
    """`cfg` with --kfold K applied: the setting --set cv.n_splits=K names (train and plan take either)."""
    if not kfold:
        return cfg
    if cfg.sources.get("cv.n_splits") == "--set" and cfg.cv.n_splits != kfold:
        raise ConfigError(f"--kfold {kfold} and --set cv.n_splits={cfg.cv.n_splits} name the same setting with "
                          "two values", where="--kfold", fix="give one of them")
    return dataclasses.replace(cfg, cv=CVConfig(n_splits=kfold), sources={**cfg.sources, "cv.n_splits": "--kfold"})


def _train(cfg_path: Path | None, overrides: Sequence[str], shards: Path, runs: Path, kfold: int, resume: bool,
           quiet: bool, anon: AnonPeak, held: ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    try:        # every rank of a node reads the same files and environment: the same error on each
        cfg = with_kfold(load_config(cfg_path, overrides), kfold)
        info = rank_info()
        place = (info, _rank_device(cfg, info)) if info is not None else None     # the job is joined below
    except CtrpipeError as exc:
        exc.shown_by_peer = not first_on_node()
        raise
    group = Distributed(*place, cfg.train.distributed.timeout_s) if place is not None else None
    try:
        ctx = _prepare_ranks(cfg, Path(shards), Path(runs), resume, quiet, group, held)
        if ctx.finished:
            return _already_finished(ctx)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            with _reproducible(cfg):
                if cfg.cv.n_splits:
                    summary = _run_kfold(ctx)
                else:
                    summary = _run_single(ctx)
        except ConfigError:
            if ctx.main and not ctx.resume:
                _remove_unstarted_run(ctx.run_dir)
            raise
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
            if not out_of_memory(exc):
                raise
            if ctx.main and not ctx.resume:
                _remove_unstarted_run(ctx.run_dir)
            raise _out_of_memory_error(ctx, exc) from exc
        # on every rank, before the group closes: a job's memory is that of its processes together
        costs = None if summary.get("interrupted") else _costs(ctx, started, anon, group)
    finally:
        if group is not None:
            group.close()
    if costs is None or not ctx.main:
        return summary
    summary.update(costs, resumed=ctx.resume)
    _calibrate(ctx)                 # before metrics.json, which marks the run finished for --resume
    write_json(ctx.run_dir / "metrics.json", summary)
    _print_summary(ctx, summary)
    return summary


def out_of_memory(exc: BaseException) -> bool:
    """The allocator's failure, on the GPU (torch.OutOfMemoryError) or the host (torch's CPU allocator
    raises a plain RuntimeError; numpy a MemoryError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def _out_of_memory_error(ctx: TrainContext, exc: BaseException) -> TrainingError:
    """A run that ran out of memory, with what to change: the plan shows what a config needs part by part."""
    started = any(ctx.run_dir.rglob("*.pt"))
    cmd = f"ctrpipe plan --cfg CFG --shards {ctx.shards}"
    new_run = " in a new run (--set exp_name=NEW): a resumed run keeps its batch size" if started else ""
    return TrainingError(
        f"out of memory on {ctx.device}: {str(exc).splitlines()[0][:300]}", where=str(ctx.run_dir),
        fix=f"`{cmd}` (with your --set options) shows what the run needs and settings that fit; lower "
            f"loader.batch_size (loader.eval_batch_size when it ran out evaluating) or the model's sizes{new_run}")


def _remove_unstarted_run(run_dir: Path) -> None:
    """A new run refused before its first checkpoint (a setting only the training loop can check, e.g. a
    torchrun job's batch against the fold's rows): its folder holds only its config, which made the fixed
    command fail with "already holds a run". This command created it (a new run needs an empty folder)."""
    if run_dir.is_dir() and not any(run_dir.rglob("*.pt")) and not any(run_dir.rglob("*.pt.incomplete")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _already_finished(ctx: TrainContext) -> dict[str, Any]:
    """--resume of a finished run: its record stays as it was (metrics.json, config, calibration)."""
    if not ctx.main:
        return {}
    summary: dict[str, Any] = json.loads((ctx.run_dir / "metrics.json").read_text())
    if not ctx.quiet:
        console.print(f"[green]the run has already finished[/]: nothing to resume; its results are in "
                      f"{ctx.run_dir / 'metrics.json'}", highlight=False)
    return summary


# ----------------------------------------------------------------------------------------------- checks

def _rank_device(cfg: RunConfig, info: RankInfo) -> torch.device:
    """A torchrun process's device: one GPU per process (LOCAL_RANK), or the CPU."""
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)     # torchrun's convention, whatever train.device names
        torch.cuda.set_device(device)
    return device


def _prepare_ranks(cfg: RunConfig, shards: Path, runs: Path, resume: bool, quiet: bool,
                   group: Distributed | None, held: ExitStack | None = None) -> TrainContext:
    """`prepare` on every rank of a torchrun job: all of them go on, or all stop (naming the rank that
    failed); all must read the same cache with the same config."""
    if group is None:
        return prepare(cfg, shards, runs, resume, quiet, held=held)
    try:
        ctx = prepare(cfg, shards, runs, resume, quiet or not group.is_main, group, held)
    except CtrpipeError as exc:
        group.agree(exc, "preparing the run")
        raise
    group.agree(None, "preparing the run")
    # only rank 0 need see the run directory: it tells the others whether the run had already finished
    ctx = dataclasses.replace(ctx, finished=group.broadcast(ctx.finished, "sharing whether the run finished"))
    identity = (ctx.manifest.fingerprint, flatten_dotted(to_dict(cfg)))
    others = group.differing_ranks(identity, "comparing the ranks' caches and configs")
    if others:
        raise group.alike(ManifestMismatchError(
            f"rank(s) {others} read another shard cache or config than rank 0 ({shards})",
            where=str(shards / "manifest.json"),
            fix="run the same command on every node, with --shards naming the same build (a shared file system "
                "or a copy of the whole folder)"))
    return ctx


def with_cache_data(cfg: RunConfig, manifest: Manifest, shards: Path, quiet: bool) -> RunConfig:
    """The run's config with the cache's own `data` section: the model is built from the manifest, and
    whatever serves the run later (predict, export) prepares raw rows by the recorded `data` section, so it
    must be the one the shards were built with, not the --cfg file's (which may differ by a --set at shard
    time). A difference is noted, not refused: training never reads raw data."""
    cache = manifest.data_config(str(shards / "manifest.json"))
    mine, theirs = flatten_dotted(identity_config(cfg.data)), flatten_dotted(identity_config(cache))
    diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not diffs:
        return cfg
    if not quiet:
        console.print("[yellow]note:[/] the run records the shard cache's data section, which differs from "
                      "the config's in " + ", ".join(f"data.{k} ({theirs.get(k)!r}, config {mine.get(k)!r})"
                                                    for k in diffs[:4]) + (" ..." if len(diffs) > 4 else ""))
    sources = {k: v for k, v in cfg.sources.items() if not k.startswith("data.")}
    sources.update({f"data.{k}": f"{shards / 'manifest.json'}" for k in flatten_dotted(to_dict(cache))})
    return dataclasses.replace(cfg, data=cache, sources=sources)


def warn_heads_of_unnamed_labels(cfg_data: DataConfig, manifest: Manifest, tasks: tuple[Task, ...],
                                 train_tasks: Mapping[str, Any]) -> None:
    """The cache holds labels the config does not name, and the model trains a head named after each (a model
    with a head per label; ESMM's ctr/ctcvr/cvr are its own and read only the labels it names): its main
    metrics and early stopping average them in. `cfg_data`: the config's data section, before the cache's
    replaced it."""
    named = {*cfg_data.labels, *(d.name for d in cfg_data.derived_labels)}
    off = {h for h, t in train_tasks.items() if t.weight == 0 and t.metric_weight == 0}   # the fix, taken
    heads = {t.name for t in tasks}
    extra = [n for n in manifest.label_names if n not in named and n not in off and n in heads] if named else []
    if extra and first_on_node():
        fix = " ".join(f"--set train.tasks.{n}.weight=0 --set train.tasks.{n}.metric_weight=0" for n in extra)
        console.print(f"[yellow]warning:[/] the cache holds the labels {list(manifest.label_names)}, the config "
                      f"names {list(cfg_data.labels)}: the model trains a head for each of the cache's labels, and "
                      f"its main metrics (and early stopping) average them; to train only the config's, shard "
                      f"with this config, or add {fix}", highlight=False)


OUTSIDE_MASK_WARN = 0.01     # a share of a masked label's positives outside its mask worth a word


def warn_positives_outside_masks(spec: FeatureSpec, tasks: tuple[Task, ...], train_tasks: Mapping[str, Any]) -> None:
    """A head masked by another label (conversion on clicked rows) never sees its label's positives outside
    the mask: with post-view conversions, or labels swapped, a share of them is lost without a word, and a
    head of both labels' AND (ESMM's ctcvr) leaves them out too. Said once per (label, mask), from the cache's
    pair rates; the fix depends on whose the mask is: train.tasks' (drop it) or the model's own head's."""
    said_for: set[tuple[int, int]] = set()
    for t in tasks:
        if t.mask is None or len(t.labels) != 1 or (t.labels[0], t.mask) in said_for:
            continue        # a head that shadows another (DARE's <label>_full) has its mask: said once
        said_for.add((t.labels[0], t.mask))
        label, mask = spec.labels[t.labels[0]], spec.labels[t.mask]
        share = positives_outside_mask(spec, label, mask)
        if share is None or share <= OUTSIDE_MASK_WARN or not first_on_node():
            continue
        both = next((x.name for x in tasks if x.mask is None and {t.labels[0], t.mask} <= set(x.labels)), None)
        own = getattr(train_tasks.get(t.name), "mask", "")      # set by train.tasks, else the model's
        said = [f"head {t.name!r} learns {label!r} on the rows where {mask!r} is 1, and {share:.1%} of the train "
                f"split's {label!r} positives are on rows where {mask!r} is 0: it never sees them"
                + (f", nor does head {both!r} (their AND)" if both else "")]
        if label_rate(spec, label) > label_rate(spec, mask):
            said.append(f"{label!r} is more frequent than {mask!r}: check that the labels are not swapped"
                        + (f" (train.tasks.{t.name}.mask)" if own else " (the model's label settings, e.g. "
                           "model.click_label / model.conversion_label)"))
        said.append(f"to learn them, drop the mask (train.tasks.{t.name}.mask)" if own else
                    "if those positives are real (e.g. conversions after a view), train a head per label instead "
                    "(e.g. model mmoe)")
        console.print("[yellow]warning:[/] " + "; ".join(said), highlight=False)


def no_training_rows_fix(manifest: Manifest) -> str:
    """Why a cache has nothing to train on, as its manifest tells: a --test build, no labels configured, or
    every row outside the train split."""
    if manifest.role == "test":
        return "train on a cache built without --test (a labelled training file)"
    if not manifest.label_names:
        return "the cache was built with no label columns (data.labels is empty): set data.labels and shard again"
    return "every row went to another split: lower data.split.val_ratio (or check --gold) and shard again"


def prepare(cfg: RunConfig, shards: Path, runs: Path, resume: bool, quiet: bool,
            dist: Distributed | None = None, held: ExitStack | None = None) -> TrainContext:
    """Everything that can fail before training: cache, labels, device, metric, folds, model, run dir.

    In a torchrun job (`dist`) every rank checks the cache and config; rank 0 alone checks and writes the run
    directory."""
    manifest = read_manifest(shards)
    if manifest.role == "test" or not manifest.label_names or manifest.rows.get("train", 0) == 0:
        raise SchemaError(f"shard cache {shards} has no labelled training rows (role {manifest.role!r}, rows "
                          f"{manifest.rows})", where=str(shards / "manifest.json"), fix=no_training_rows_fix(manifest))
    spec = manifest.feature_spec()
    own_data = cfg.data
    cfg = with_cache_data(cfg, manifest, shards, quiet or (dist is not None and not dist.is_main))
    device = resolve_device(cfg.train.device) if dist is None else dist.device
    check_amp(cfg.train.amp, device)
    if dist is not None and cfg.loader.batch_size < dist.world_size:
        b, w = cfg.loader.batch_size, dist.world_size
        raise ConfigError(f"loader.batch_size {b} is the global batch, and {w} processes need a row each",
                          where="loader.batch_size", fix=f"use a loader.batch_size of at least {w}")
    model, tasks, shift = check_training(cfg, manifest, shards)
    check_training_memory(cfg, model, device)
    warn_heads_of_unnamed_labels(own_data, manifest, tasks, cfg.train.tasks)
    warn_positives_outside_masks(spec, tasks, cfg.train.tasks)
    check_batch_norm(cfg, model, dist.world_size if dist is not None else 1)
    # a model that reads a history against the candidate, or a multi-task model over one as its backbone
    history = next((h for m in model.modules() if isinstance(h := getattr(m, "history", None), History)), None)
    if history is not None and manifest.column(history.name).stats.get("max") == 0 and first_on_node():
        # shard and inspect said so, but a cache built by someone else trains without a word
        console.print(f"[yellow]warning:[/] the history {history.name!r} is empty in every row of the cache, so "
                      f"{cfg.model.name} reads nothing against the candidate; check the input column and "
                      "data.sequence[].separator, and shard again", highlight=False)
    parameters = sum(p.numel() for p in model.parameters())
    amp = resolve_amp(cfg.train.amp, device, model_family(cfg.model.name, cfg.model.params))
    run_dir = run_dir_of(runs, cfg.exp_name)
    if dist is not None and not dist.is_main:
        return TrainContext(cfg, shards, manifest, spec, device, run_dir, resume, quiet, tasks, parameters, shift,
                            dist, amp)
    locked = False
    if held is not None and run_dir.is_dir():
        held.enter_context(folder_lock(run_dir, lambda: _run_busy(run_dir)))
        locked = True
    if resume and not (run_dir / "config.json").is_file():
        raise CheckpointError(f"nothing to resume: {run_dir} holds no run", where=str(run_dir),
                              fix="drop --resume to start the run, or pass the --runs/exp_name of the run")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"run directory {run_dir} already holds a run", where=str(run_dir),
                              fix="pass --resume to continue it, --set exp_name=NEW for a new run, "
                                  "or delete it")
    if resume:      # before config.json is rewritten: a refused resume leaves the run's record as it was
        recorded = json.loads((run_dir / "config.json").read_text())
        recorded = dict(recorded.get("config", recorded))
        # another cache (data.*) is left to the checkpoint's check, whose message names both caches
        refuse_resume_changes({**recorded, "data": to_dict(cfg.data)}, cfg, run_dir / "config.json")
        if (run_dir / "metrics.json").is_file():
            _refuse_changes_to_finished(recorded, cfg, run_dir)
            return TrainContext(cfg, shards, manifest, spec, device, run_dir, resume, quiet, tasks, parameters,
                                shift, dist, amp, finished=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if held is not None and not locked:
        held.enter_context(folder_lock(run_dir, lambda: _run_busy(run_dir)))
    write_config(run_dir, to_dict(cfg), dict(cfg.sources))
    write_text(run_dir / "manifest_fingerprint.txt",
               f"{manifest.fingerprint}\nschema {manifest.schema_fingerprint()}\nshards {shards.resolve()}\n")
    return TrainContext(cfg, shards, manifest, spec, device, run_dir, resume, quiet, tasks, parameters, shift,
                        dist, amp)


def check_training(cfg: RunConfig, manifest: Manifest, shards: Path
                   ) -> tuple[torch.nn.Module, tuple[Task, ...], tuple[float, ...]]:
    """What training refuses about a config on a cache before any work (folds, the model, its early-stopping
    metric and label sampling): train runs it first, and `ctrpipe plan`, so a plan never says "fits" for a
    run train refuses. Returns the model built on the meta device (nothing allocated or initialised; the real
    build comes once, per fold), its tasks and their logit shifts under sampling."""
    check_folds(cfg, manifest, shards)
    spec = manifest.feature_spec()
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.params, spec, sparse=cfg.train.sparse_embeddings)
    heads = heads_of(model, spec)
    tasks = build_tasks(heads, spec, cfg.train)
    _check_metric(cfg, tasks)
    return model, tasks, _check_sampling(cfg, spec, heads, tasks)


def check_training_memory(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a model whose training state alone (weights, gradients, optimiser moments) outgrows the memory
    of its device, before building it: one whose weights fit was built and initialised, and then ended by
    the kernel's OOM killer in its first step, without a word. `model` is check_training's meta build."""
    need = least_training_bytes(model, cfg.train, device)
    if device.type == "cuda":
        available, what = torch.cuda.mem_get_info(device)[0], f"free memory of GPU {device}"
    else:
        host = available_bytes()
        if host is None:
            return
        # the processes of a torchrun job on this node share its memory
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        available = host // local
        what = "memory available to this process" + (f" (the node's, shared by {local} processes)"
                                                     if local > 1 else " (the host's, or its cgroup's limit)")
    if need <= available:
        return
    weights = weight_bytes(model)
    raise ConfigError(f"training model {cfg.model.name!r} needs at least {human_bytes(need)} before any batch: "
                      f"{human_bytes(weights)} of weights with their gradients and optimiser state "
                      f"(embedding_optimizer={cfg.train.embedding_optimizer}"
                      + (", an EMA copy" if cfg.train.ema > 0 else "") + f"), more than the "
                      f"{human_bytes(available)} of {what}; {largest_tensor(model)}", where="model",
                      fix="lower the model section's sizes (embedding dims, hidden units, experts, ranks, heads); "
                          "`ctrpipe plan` shows where the memory goes and which settings fit")


def check_batch_norm(cfg: RunConfig, model: torch.nn.Module, processes: int = 1) -> None:
    """Batch norm's statistics need 2+ rows a batch (a process): torch refuses one, deep in the first step.
    Train and `ctrpipe plan` refuse it alike; `model` may be a meta build."""
    per_process = cfg.loader.batch_size // processes
    if per_process < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        keys = batch_norm_settings(to_dict(cfg)["model"])
        off = ", ".join(f"{k}={v}" for k, v in keys.items()) or "a model config without batch norm"
        raise ConfigError(f"loader.batch_size {cfg.loader.batch_size} gives batches of one row"
                          + (" a process" if processes > 1 else "") + ", and the model's batch norm needs 2 or more",
                          where="loader.batch_size",
                          fix=f"use a larger loader.batch_size, or turn batch norm off ({off})")


def _run_busy(run_dir: Path) -> CheckpointError:
    """Another `ctrpipe train` holds the run folder: two processes writing one run interleaved its log (steps
    twice) and raced for its checkpoint's temp file."""
    return CheckpointError(f"another `ctrpipe train` is writing the run {run_dir} right now", where=str(run_dir),
                           fix="wait for it to finish (or stop it), or start another run with --set exp_name=NEW")


def _refuse_changes_to_finished(recorded: dict[str, Any], cfg: RunConfig, run_dir: Path) -> None:
    """A finished run (its metrics.json is written) trains no further on --resume: a changed setting, more
    epochs or steps included, would be recorded in its config without having trained anything."""
    changed = config_changes(recorded, cfg)
    if changed:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed[:4])
        raise CheckpointError(f"the run has finished, so --resume has nothing to continue and would not apply "
                              f"the changed settings: {shown}" + (" ..." if len(changed) > 4 else ""),
                              where=str(run_dir / "metrics.json"),
                              fix="start a new run with these settings (--set exp_name=NEW, without --resume); "
                                  "--resume continues a run stopped before its end")


def _check_sampling(cfg: RunConfig, spec: FeatureSpec, heads: Sequence[Head], tasks: tuple[Task, ...]
                    ) -> tuple[float, ...]:
    """Each head's logit shift under the config's training sampling; refuses what no shift can undo."""
    sampling: Sampling | None = training_sampling(cfg.loader, spec)
    # a head that shadows another (DARE's <label>_full) predicts that head's target on its own: not tied to it
    own = tuple(h for h in heads if not h.shadows)
    if sampling is not None and own != default_heads(spec):
        key = "loader.neg_keep_prob" if sampling.neg_keep_prob < 1.0 else "loader.balance_pos_fraction"
        raise ConfigError(f"model {cfg.model.name!r} has heads of its own ({', '.join(h.name for h in own)}) "
                          "tied together (ESMM: ctcvr = ctr * cvr), so training rows sampled by label "
                          f"{sampling.name!r} would bias them in ways no per-head logit shift undoes", where=key,
                          fix="turn sampling off for this model (loader.neg_keep_prob=1.0, "
                              "loader.balance_pos_fraction=0), or use a model with one head per label (e.g. "
                              "mmoe, with train.tasks.<other label>.mask=<sampled label>)")
    return logit_shifts(tasks, sampling)


def _check_metric(cfg: RunConfig, tasks: tuple[Task, ...]) -> None:
    valid = list(QUALITY_METRICS)
    if len(tasks) > 1:
        valid += [f"{m}.{t.name}" for t in tasks for m in QUALITY_METRICS]
    metric = cfg.train.early_stopping.metric
    if metric in valid:
        return
    name, _, head = metric.partition(".")
    if len(tasks) == 1 and name in QUALITY_METRICS and head == tasks[0].name:
        # one head's metrics are the run's own, named without it
        raise ConfigError(f"metric {metric!r} names the run's only head", where="train.early_stopping.metric",
                          fix=f"use train.early_stopping.metric={name}: a run with one head names its metrics "
                              "without it")
    refuse_descriptive_metric(metric, "train.early_stopping.metric", valid)
    raise ConfigError(f"unknown metric {metric!r}", where="train.early_stopping.metric",
                      fix=f"use one of {', '.join(valid)}")


def check_folds(cfg: RunConfig, manifest: Manifest, shards: Path) -> None:
    """cv.n_splits against the cache's folds (training and `ctrpipe plan` refuse the same)."""
    k = cfg.cv.n_splits
    stored = int(manifest.folds.get("n_splits", 0) or 0)
    if k and stored != k:
        have = "no folds" if stored == 0 else f"{stored} folds"
        raise ManifestMismatchError(
            f"K-fold training with K={k} needs a cache with {k} folds; {shards} has {have}",
            where=str(shards / "manifest.json"),
            fix=f"rebuild the cache with --set data.folds.n_splits={k}" +
                (f", or use --kfold {stored}" if stored else ""))
    sizes = [int(n) for n in manifest.folds.get("sizes", [])]
    if k and 0 in sizes:      # found before any fold trains: a late failure left a run of some folds only
        raise ManifestMismatchError(
            f"fold {sizes.index(0)} of the cache has no rows (fold sizes {sizes}), so it can neither train nor "
            "validate a model", where=str(shards / "manifest.json"),
            fix="shard with fewer folds (data.folds.n_splits), or group folds on a key with more distinct values "
                "than folds")


@contextmanager
def _reproducible(cfg: RunConfig) -> Iterator[None]:
    """Thread count and deterministic kernels for the duration of training; the caller's settings return."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        if resolve_device(cfg.train.device).type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace, chosen before its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# ----------------------------------------------------------------------------------------------- one model

def _loader(ctx: TrainContext, view: RowView, train: bool, seed: int, ranks: bool = False) -> ShardLoader:
    """The view's loader; with `ranks` in a torchrun job, one serving this rank's share of each batch."""
    rank, world = (ctx.dist.rank, ctx.dist.world_size) if ranks and ctx.dist is not None else (0, 1)
    return ShardLoader.from_config(ctx.shards, view, ctx.cfg.loader, seed=seed, device=ctx.device, train=train,
                                   rank=rank, world_size=world)


def _template(ctx: TrainContext, fold: int, seed: int) -> Checkpoint:
    """What every checkpoint of this model shares: config, data identity, and the seed it was built from."""
    return Checkpoint(config=to_dict(ctx.cfg), feature_spec=ctx.spec,
                      schema_fingerprint=ctx.manifest.schema_fingerprint(),
                      manifest_fingerprint=ctx.manifest.fingerprint, shards=str(ctx.shards.resolve()),
                      fold=fold, init_seed=seed, weights={"dense": {}, "tables": {}}, sampling_rate=ctx.sampling_rate)


def config_changes(old_config: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, new value) of every setting `cfg` changes, sorted by key."""
    old, new = flatten_dotted(old_config), flatten_dotted(to_dict(cfg))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def run_dir_of(runs: Path, exp_name: str) -> Path:
    """runs/<exp_name>, which must lie inside --runs: an empty name wrote the run into --runs itself, and
    '../x' or an absolute path wrote it elsewhere. A name may nest (grid/lr_1e-3)."""
    if not exp_name.strip() or PurePath(exp_name).is_absolute() or \
            any(part in (".", "..") for part in exp_name.split("/")):
        raise ConfigError(f"bad value {exp_name!r} for 'exp_name': it names the run's folder inside --runs",
                          where="exp_name", fix="use a name without '..' or a leading '/', e.g. exp_name=dnn_v2 "
                                                "(or grid/dnn_v2 for a folder of runs)")
    if (cache := shard_cache_holding(runs)) is not None:    # its folder is the build's: a rebuild refused it
        raise ConfigError(f"--runs {runs} is inside the shard cache {cache}, whose folder belongs to `ctrpipe shard`",
                          where=f"--runs {runs}", fix="pass a runs folder outside the cache, e.g. --runs runs")
    return runs / exp_name


def refuse_resume_changes(old_config: dict[str, Any], cfg: RunConfig, where: Path) -> list[tuple[str, Any, Any]]:
    """Refuse (CheckpointError) a resume whose config changes what the run's state fixes; returns the other
    changes (`config_changes`). Checked against the run's config.json before anything is written, and against
    each checkpoint it resumes."""
    changes = config_changes(old_config, cfg)
    old = {k: a for k, a, _ in changes}
    changed = [k for k, _, _ in changes]
    # the training rows' sampling fixes the kept rows and the logit shift of the checkpoints written so far
    sampling = ("loader.neg_keep_prob", "loader.sample_label", "loader.balance_pos_fraction")
    # the restored optimiser state carries its own learning rates, weight decay and state layout (a changed
    # value would be announced and then ignored, or crash), and the position within the epoch counts batches
    restored = ("train.lr", "train.embedding_lr", "train.weight_decay", "train.embedding_optimizer",
                "loader.batch_size")
    # the rows' order: the position resumes at a batch index of the run's order, so another order would serve
    # some rows of the epoch twice and others never
    order = ("loader.shuffle", "loader.shuffle_strategy", "loader.block_rows", "loader.window_shards")
    # the best value of the validation metric so far (which picks ckpt_best and stops early) is a number of that
    # metric: another metric, direction, mix of heads or rows a head is scored on would be compared against it
    fixed = [k for k in changed if k.startswith(("model.", "data.")) or k in ("seed", "cv.n_splits")
             or k in sampling + restored + order or k == "train.early_stopping.metric"]
    was_stop = EarlyStoppingConfig(**{k.rsplit(".", 1)[1]: v for k, v in flatten_dotted(old_config).items()
                                      if k in ("train.early_stopping.metric", "train.early_stopping.mode")})
    if "train.early_stopping.mode" in changed and \
            EarlyStopping(was_stop).mode != EarlyStopping(cfg.train.early_stopping).mode:
        fixed.append("train.early_stopping.mode")         # auto is max for AUC: auto -> max changes nothing
    defaults = {"metric_weight": -1.0, "mask": ""}     # a head's entry added by --set holds the defaults
    n_labels = len(cfg.data.labels) + len(cfg.data.derived_labels)     # derived labels are labels too
    for k, was, now in changes:
        field = k.rsplit(".", 1)[-1]
        if k.startswith("train.tasks.") and field in defaults and n_labels > 1 and \
                (defaults[field] if was is None else was) != (defaults[field] if now is None else now):
            fixed.append(k)                                # one label: a weight of the only head changes nothing
    if "cv.n_splits" in fixed:     # resuming a K-fold run without --kfold started a single model in its folder
        was, now = int(old.get("cv.n_splits") or 0), cfg.cv.n_splits
        run_is = f"a {was}-fold run" if was else "a single-model run"
        trains = f"K={now} folds" if now else "a single model"
        raise CheckpointError(f"the run is {run_is}, and this command trains {trains}", where=str(where),
                              fix=f"resume with {f'--kfold {was}' if was else 'no --kfold'}, as the run started")
    if fixed:
        raise CheckpointError(f"cannot resume with changed {', '.join(fixed)}", where=str(where),
                              fix="resume with the config the run started with (see its config.yaml)")
    return changes


def _load_resume(ctx: TrainContext, out_dir: Path) -> Checkpoint | None:
    path = out_dir / "ckpt_last.pt"
    if not ctx.resume or not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if ckpt.train_state is None:
        raise CheckpointError("checkpoint holds no training state to resume from", where=str(path),
                              fix="resume only from a ckpt_last.pt written by `ctrpipe train`")
    check_compatible(ckpt, ctx.manifest, ctx.shards, path)
    if ckpt.manifest_fingerprint != ctx.manifest.fingerprint:
        # the same layout (hashed ids of other rows fit it) is not the same rows: the resumed epoch's order,
        # and the record of what the run trained on, would both be wrong
        raise CheckpointError(
            f"the run trained on the cache {ckpt.shards} (fingerprint {ckpt.manifest_fingerprint[:12]}), and "
            f"{ctx.shards} is another (fingerprint {ctx.manifest.fingerprint[:12]}: other inputs or settings)",
            where=str(path), fix="resume on the cache the run started on (the same inputs and config give it "
                                 "again), or start a new run: drop --resume or set another exp_name")
    world = ctx.dist.world_size if ctx.dist is not None else 1
    if ckpt.train_state.world_size != world:
        was = ckpt.train_state.world_size
        raise CheckpointError(
            f"the run was trained by {was} process(es) and this command runs {world}: each rank's random "
            "stream (dropout masks) is part of the state --resume continues", where=str(path),
            fix=f"resume with {was} process(es) in all: " +
                ("`ctrpipe train ... --resume` without torchrun" if was == 1 else
                 f"torchrun with --nnodes x --nproc_per_node = {was}, e.g. torchrun --nproc_per_node {was} "
                 "-m ctrpipe.cli train ... --resume"))
    refuse_resume_changes(ckpt.config, ctx.cfg, path)     # the others are noted by _train_one
    return ckpt


def _fold_label(out_dir: Path) -> str:
    """'fold 1: ' for a K-fold run's fold folder (fold1/), '' for a single run."""
    m = re.fullmatch(r"fold(\d+)", out_dir.name)
    return f"fold {m.group(1)}: " if m else ""


# settings that do not change what a resumed run trains: where it stops this time, how often it logs, and how
# infer later combines and calibrates its checkpoints
_OUTSIDE_TRAINING = ("train.stop_after_steps", "train.log_every", "infer.", "loader.prefetch", "loader.pin_memory",
                     "loader.eval_batch_size")


def _training_changes(changed: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    return [c for c in changed if not c[0].startswith(_OUTSIDE_TRAINING)]


def resume_note(changed: Sequence[tuple[str, Any, Any]], step: int, label: str = "", finished: bool = False) -> str:
    """What a resume with changed settings did: the run's config.yaml records the new values as if the whole
    run had used them, so metrics.json keeps which steps ran with the old ones (all of them, for a K-fold
    run's fold that had finished before the stop)."""
    changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changed)
    if finished:
        return (f"{label}finished before the resume with changed settings ({changes}): trained wholly with the "
                "old values; config.yaml records the new ones")
    return (f"{label}resumed at step {step} with changed settings: {changes} (steps up to {step} ran with the old "
            "values; config.yaml records the new ones)")


def fold_seed(cfg: RunConfig, fold: int) -> int:
    """The seed of fold `fold`'s model and loader (-1: the single run's, the config's own)."""
    return cfg.seed + max(fold, 0)


def check_rank_shares(shares: np.ndarray, label: str, shuffle: bool) -> None:
    """Refuse a training view whose batches one process trains and a torchrun job cannot share: `shares`
    (K, W) rows of each batch per rank (ShardLoader.rank_rows); each rank needs a row of every batch to step.
    One process keeps a ragged last batch for a view under one batch, or unshuffled (the same rows each epoch,
    never trained otherwise); a job cuts it into its ranks' shares."""
    if not len(shares) or shares.min() > 0:
        return
    world, rows, last = shares.shape[1], int(shares.sum()), int(shares[-1].sum())
    if rows < world:
        fix = f"train in at most {rows:,} processes, or on more rows"
    else:
        fix = (f"use a loader.batch_size that leaves a last batch of at least {world} of the {rows:,} rows, or "
               "none" + (", shuffle (loader.shuffle=true: a full batch's ragged tail is dropped)" if not shuffle
                         else "") + ", or train in fewer processes")
    raise ConfigError(f"the training view ({label}) ends in a batch of {last:,} rows, which one process trains and "
                      f"{world} processes cannot share (each needs a row)", where="loader.batch_size", fix=fix)


def _train_one(ctx: TrainContext, train_view: RowView, val_view: RowView | None, fold: int, out_dir: Path,
               best_path: Path, label: str) -> FitResult:
    cfg = ctx.cfg
    seed = fold_seed(cfg, fold)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    template = _template(ctx, fold, seed)
    group = ctx.dist
    if group is None:
        resume = _load_resume(ctx, out_dir)
    else:   # rank 0 reads ckpt_last.pt (the run directory need not be shared) and hands it to every rank
        resume = group.from_main(lambda: _load_resume(ctx, out_dir), "reading ckpt_last.pt for --resume")
    # settings changed since the checkpoint (those it fixes were refused): warned of, with -q too, and noted
    note = ""
    changed = _training_changes(config_changes(resume.config, cfg)) if resume is not None else []
    if changed:
        done = resume.train_state is not None and resume.train_state.finished     # a K-fold run's earlier fold
        note = resume_note(changed, resume.step, _fold_label(out_dir), done)
        if ctx.main:
            console.print(f"[yellow]warning:[/] {note}", highlight=False)
    # built once, from the seed alone: checkpoints store what training changed and rebuild the rest from it;
    # a torchrun job exchanges the tables' gradient rows (distributed.RowExchange), so its tables are sparse
    # sampled rows and masked heads: each head starts at the prior of the rows it trains on (checkpoints keep
    # the cache's spec, and dense weights whole, so the rebuilt model takes the trained bias whatever spec built it)
    model = build_initial_model(template.config, _stream_start(ctx), seed,
                                sparse=cfg.train.sparse_embeddings or group is not None)
    if group is not None and group.rank:
        torch.manual_seed(group.rank_seed(seed))        # its own dropout masks; rank 0 keeps the run's stream
    train_loader = _loader(ctx, train_view, True, seed, ranks=True)
    if group is not None:
        group.check(lambda: check_rank_shares(train_loader.rank_rows(), label, cfg.loader.shuffle),
                    "checking the ranks' shares of the batches")
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if val_view is None and cfg.train.early_stopping.patience and ctx.main and not ctx.quiet:
        console.print(f"[yellow]note:[/] {label}: train.early_stopping.patience="
                      f"{cfg.train.early_stopping.patience} never fires: there are no validation rows to evaluate "
                      "(the run trains every planned step)", highlight=False)
    inputs = FitInputs(
        model=model, spec=ctx.spec, train_loader=train_loader,
        val_loader=_loader(ctx, val_view, False, seed, ranks=True) if val_view is not None else None,
        cfg=dataclasses.replace(cfg.train, amp=ctx.amp.precision), eval_amp=predict_amp(cfg.train.amp),
        device=ctx.device, out_dir=out_dir, best_path=best_path, template=template,
        tasks=ctx.tasks, logit_shift=ctx.logit_shift,
        resume=resume, quiet=ctx.quiet, label=label, dist=group)
    result = fit(inputs)
    if note:
        result.notes = (*result.notes, note)
    return result


def _label_heads(spec: FeatureSpec, tasks: Sequence[Task]) -> list[Task] | None:
    """The head of each label, in label order, when the model has one per label (after them, heads that
    shadow one of them, such as DARE's <label>_full, follow its settings); None for heads of its own (ESMM)."""
    main = tasks[:spec.n_tasks]
    if len(main) != spec.n_tasks or any(t.name != spec.labels[k] or t.labels != (k,) for k, t in enumerate(main)):
        return None
    return list(main)


def label_shifts(spec: FeatureSpec, tasks: Sequence[Task], shifts: Sequence[float]) -> tuple[float, ...]:
    """Each label's logit shift under sampling (`shifts` are per head; sampling needs a head per label)."""
    if not any(shifts):
        return (0.0,) * spec.n_tasks
    heads = _label_heads(spec, tasks)
    assert heads is not None, "fit._check_sampling allows sampling only with one head per label"
    return tuple(shifts[k] for k in range(len(heads)))


def _stream_start(ctx: TrainContext) -> FeatureSpec:
    """The spec a model is first built from: each head's rate as the training stream shows it (masked heads,
    then sampling). A K-fold model under balanced batches starts from its own rows' rate, so its sampled head
    starts at exactly the batches' positive fraction."""
    spec = masked_spec(ctx.spec, ctx.tasks)
    if ctx.sampling_rate is not None:
        sampled = training_sampling(ctx.cfg.loader, ctx.spec)
        assert sampled is not None
        spec = dataclasses.replace(spec, label_rates=tuple(ctx.sampling_rate if i == sampled.label else r
                                                           for i, r in enumerate(spec.label_rates)))
    return stream_spec(spec, label_shifts(ctx.spec, ctx.tasks, ctx.logit_shift))


def masked_spec(spec: FeatureSpec, tasks: Sequence[Task]) -> FeatureSpec:
    """`spec` with the rate of each one-label head that `train.tasks` masks as its rows show it: a conversion
    head trained on clicked rows starts at rate(converted) / rate(clicked) (exact when the labels nest, as
    `heads.head_rate` estimates a model's own masked heads), not at the far lower rate over every row."""
    main = _label_heads(spec, tasks)
    if main is None or all(t.mask is None for t in main):
        return spec
    heads = [Head(t.name, (spec.labels[k],), mask=spec.labels[t.mask] if t.mask is not None else None)
             for k, t in enumerate(main)]
    # the rates are now the heads' (over their masks' rows): the labels' pair rates no longer go with them
    return dataclasses.replace(spec, label_rates=tuple(head_rate(spec, h) for h in heads), label_pair_rates=())


def _gold_predictions(ctx: TrainContext, ckpt_path: Path) -> Predictions | None:
    if ctx.manifest.rows.get("gold", 0) == 0:
        return None
    if ctx.device.type == "cpu":
        release_free_heap()     # the heap training kept is free now (hostmem.release_free_heap)
    model = model_from_checkpoint(load_checkpoint(ckpt_path), ctx.device)
    loader = _loader(ctx, RowView.gold(), False, ctx.cfg.seed)
    return predict(model, loader, loader.num_rows, ctx.tasks, ctx.device, predict_amp(ctx.cfg.train.amp),
                   logit_shift=ctx.logit_shift)


def _fold_context(ctx: TrainContext, k: int) -> TrainContext:
    """Fold k's context: under balanced batches its logit shift comes from the rate of the rows fold k trains
    on (every other fold, val rows included), which time or group folds of a drifting click rate put far from
    the train split's rate."""
    sampling = training_sampling(ctx.cfg.loader, ctx.spec)
    if sampling is None or sampling.pos_fraction <= 0:
        return ctx
    rate = fold_sampling_rate(ctx, k, sampling.label)
    fold_sampling = training_sampling(ctx.cfg.loader, ctx.spec, rate)
    return dataclasses.replace(ctx, logit_shift=logit_shifts(ctx.tasks, fold_sampling), sampling_rate=rate)


def fold_sampling_rate(ctx: TrainContext, k: int, label: int) -> float:
    """Label column `label`'s rate in fold k's training view, over the rows with a label (those balanced
    batches draw from), from the cache's labels."""
    index = resolve_view(ctx.shards, ctx.manifest, RowView.fold_train(k))
    y = view_labels(ctx.shards, ctx.manifest, index, label)
    y = y[~np.isnan(y)]
    return float(np.count_nonzero(y > 0.5) / max(len(y), 1))


def _fit_summary(result: FitResult) -> dict[str, Any]:
    return {"best_step": result.best_step, "best_epoch": result.best_epoch, "steps": result.steps,
            "epochs": result.epochs, "samples": result.samples,
            "train_seconds": round(result.train_seconds, 3),
            "samples_per_s": round(result.samples_per_s, 1), "stopped_early": result.stopped_early,
            "notes": list(result.notes), **({"exchange": result.exchange} if result.exchange else {})}


def _costs(ctx: TrainContext, started: float, anon: AnonPeak, group: Distributed | None) -> dict[str, Any] | None:
    """What the run cost: wall time of the call so far (from loading its config: the interpreter's start and
    its imports, a few seconds, come before), peak memory, parameters of one model.

    Host memory twice: the process's peak RSS (the loader's buffers and Python itself, and the shard cache's
    pages it mapped: on a large cache mostly those, which the kernel reclaims), and the peak of what no file
    backs (hostmem.AnonPeak, sampled), the memory the run needs. A resumed run reports the resumed process only
    (metrics.json `resumed`; the report then shows neither).

    A torchrun job (every rank calls this; rank 0 gets the result, the others None): host figures are the sum
    of its processes' peaks (the memory the job held; file pages mapped by several ranks count in each RSS),
    the device figure the largest rank's (each rank has a GPU of its own), and `peak_memory_by_rank` each
    process's own. Rank 0's alone had made a 4-process job look like a quarter of its cost.
    """
    mine = {"host": peak_rss(), "host_anon": anon.so_far(),
            "device": int(torch.cuda.max_memory_allocated(ctx.device)) if ctx.device.type == "cuda" else None}
    ranks = [mine] if group is None else group.gather_objects(mine, "gathering the ranks' peak memory")
    if ranks is None:
        return None

    def total(key: str) -> int | None:
        values = [r[key] for r in ranks]
        return None if None in values else sum(values)

    devices = [r["device"] for r in ranks if r["device"] is not None]
    return {"wall_seconds": round(time.perf_counter() - started, 3),
            "peak_host_memory_bytes": total("host"),
            "peak_host_anon_bytes": total("host_anon"),
            "peak_device_memory_bytes": max(devices) if devices else None,
            **({"peak_memory_by_rank": ranks} if group is not None else {}),
            "parameters": ctx.parameters}


def _base_summary(ctx: TrainContext) -> dict[str, Any]:
    return {"exp_name": ctx.cfg.exp_name, "model": ctx.cfg.model.name, "device": str(ctx.device),
            "world_size": ctx.dist.world_size if ctx.dist is not None else 1,
            "precision": {"train": ctx.amp.precision, "predict": predict_amp(ctx.cfg.train.amp),
                          "reason": ctx.amp.reason},
            "shards": str(ctx.shards.resolve()), "manifest_fingerprint": ctx.manifest.fingerprint,
            "schema_fingerprint": ctx.manifest.schema_fingerprint(), "labels": list(ctx.spec.labels),
            "heads": ctx.task_names, "tasks": _resolved_tasks(ctx),
            **({"logit_shift": dict(zip(ctx.task_names, ctx.logit_shift, strict=True))}
               if any(ctx.logit_shift) else {}),
            "config": to_dict(ctx.cfg), "config_sources": dict(ctx.cfg.sources)}


def _resolved_tasks(ctx: TrainContext) -> dict[str, dict[str, Any]]:
    """Each head's target, mask and weights as training used them (the model's defaults filled in): what makes
    two runs' mean metrics the same mean (the report compares these)."""
    labels = ctx.spec.labels
    return {t.name: {"labels": [labels[i] for i in t.labels], "mask": labels[t.mask] if t.mask is not None else None,
                     "weight": t.weight, "metric_weight": t.metric_weight} for t in ctx.tasks}


def _interrupted(ctx: TrainContext, step: int) -> dict[str, Any]:
    if ctx.main:
        console.print(f"[yellow]stopped at step {step}[/] (train.stop_after_steps); continue with --resume")
    return {"interrupted": True, "step": step}


def _run_single(ctx: TrainContext) -> dict[str, Any]:
    has_val = ctx.manifest.rows.get("val", 0) > 0
    result = _train_one(ctx, RowView.train(), RowView.val() if has_val else None, -1, ctx.run_dir,
                        ctx.run_dir / "ckpt_best.pt", "train")
    if result.interrupted:
        return _interrupted(ctx, result.steps)
    if not ctx.main:
        return {}
    summary = _base_summary(ctx)
    summary.update(_fit_summary(result))
    summary["val"] = result.best_metrics
    gold = _gold_predictions(ctx, ctx.run_dir / "ckpt_best.pt")
    summary["gold"] = gold.metrics(ctx.task_names, ctx.metric_weights) if gold is not None else None
    return summary


# ----------------------------------------------------------------------------------------------- K-fold

def _run_kfold(ctx: TrainContext) -> dict[str, Any]:
    k_total = ctx.cfg.cv.n_splits
    folds: list[dict[str, Any]] = []
    oof_parts: list[Predictions] = []
    gold_logits: list[np.ndarray] = []
    gold: Predictions | None = None
    results: list[FitResult] = []
    if ctx.dist is not None:
        # every fold's batches before the first fold trains: a fold refused later would waste the folds before it
        def check_folds() -> None:
            for k in range(k_total):
                loader = _loader(ctx, RowView.fold_train(k), True, fold_seed(ctx.cfg, k), ranks=True)
                check_rank_shares(loader.rank_rows(), f"fold {k} ({k + 1} of {k_total})", ctx.cfg.loader.shuffle)
        ctx.dist.check(check_folds, "checking the ranks' shares of every fold's batches")
    run_ctx = ctx
    for k in range(k_total):
        ctx = _fold_context(run_ctx, k)
        best = ctx.run_dir / f"ckpt_fold{k}.pt"
        fold_dir = ctx.run_dir / f"fold{k}"
        result = _train_one(ctx, RowView.fold_train(k), RowView.fold_val(k), k, fold_dir, best,
                            f"fold {k} ({k + 1} of {k_total})")
        if result.interrupted:
            return _interrupted(ctx, result.steps)
        if not ctx.main:
            continue
        if result.best_preds is None:
            raise CheckpointError(f"fold {k} left no validation predictions", where=str(fold_dir),
                                  fix="delete that fold folder and train again with --resume")
        results.append(result)
        folds.append({"fold": k, "rows_val": int(result.best_preds.row_index.size), **_fit_summary(result),
                      "val": result.best_metrics,
                      **({"sampling_rate": ctx.sampling_rate,      # balanced batches: this fold's own shift
                          "logit_shift": dict(zip(ctx.task_names, ctx.logit_shift, strict=True))}
                         if ctx.sampling_rate is not None else {})})
        oof_parts.append(result.best_preds)
        g = _gold_predictions(ctx, best)
        if g is not None:
            gold = g
            gold_logits.append(g.logits)
    ctx = run_ctx
    if not ctx.main:
        return {}
    oof = _assemble_oof(oof_parts)
    oof.save(ctx.run_dir / "oof.npz", ctx.task_names)
    summary = _base_summary(ctx)
    total_samples = sum(r.samples for r in results)
    total_seconds = sum(r.train_seconds for r in results)
    summary.update(samples=total_samples, train_seconds=round(total_seconds, 3),
                   samples_per_s=round(total_samples / total_seconds, 1) if total_seconds > 0 else 0.0)
    # the plan's notes are alike for every fold; a fold's resume note is its own
    summary["notes"] = list(dict.fromkeys(n for r in results for n in r.notes))
    summary["cv"] = _cv_summary(folds, oof.metrics(ctx.task_names, ctx.metric_weights))
    summary["val"] = summary["cv"]["oof"]
    if gold is not None:
        ensemble = np.mean(np.stack(gold_logits), axis=0)          # (N, T): logit mean of the fold models
        summary["gold"] = metrics_from_logits(gold.labels, ensemble, ctx.task_names, ctx.metric_weights)
    else:
        summary["gold"] = None
    return summary


def _assemble_oof(parts: list[Predictions]) -> Predictions:
    rows = np.concatenate([p.row_index for p in parts])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    if rows.size and np.any(rows[1:] == rows[:-1]):
        raise ManifestMismatchError("a row appears in two validation folds", where="fold.npy",
                                    fix="rebuild the cache: its fold assignment is broken")
    return Predictions(rows, np.concatenate([p.logits for p in parts])[order],
                       np.concatenate([p.labels for p in parts])[order])


def _cv_summary(folds: list[dict[str, Any]], oof: dict[str, float]) -> dict[str, Any]:
    """metrics.json's `cv`: every fold's metrics, their mean and population std (ddof=0: the spread of these
    K models' scores, as "mean ± std" prints it), and the metrics of the joined out-of-fold predictions."""
    keys = [k for k in folds[0]["val"] if all(k in f["val"] for f in folds)]
    values = {k: np.array([f["val"][k] for f in folds], dtype=np.float64) for k in keys}
    return {"n_splits": len(folds), "folds": folds,
            "mean": {k: float(np.mean(v)) for k, v in values.items()},
            "std": {k: float(np.std(v)) for k, v in values.items()},
            "oof": oof}


# ----------------------------------------------------------------------------------------------- reporting

def _calibrate(ctx: TrainContext) -> None:
    """Fit calibration (infer.calibration) on the run's validation or out-of-fold logits, when it has any."""
    has_preds = (ctx.run_dir / "oof.npz").is_file() or (ctx.run_dir / "val_predictions.npz").is_file()
    if has_preds:
        calibrate_run(ctx.run_dir, ctx.cfg, quiet=ctx.quiet)


def _fmt(v: Any) -> str:
    return f"{v:.5f}" if isinstance(v, float) else str(v)


def _print_summary(ctx: TrainContext, s: dict[str, Any]) -> None:
    val, gold = s.get("val") or {}, s.get("gold") or {}
    if ctx.quiet:
        shown = " ".join(f"{k}={val[k]:.5f}" for k in ("auc", "logloss") if k in val)
        console.print(f"trained {s['model']} -> {ctx.run_dir}: {shown} "
                      f"{human_rate(s.get('samples_per_s', 0.0), 'samples/s')} {_precision_text(s)}")
        return
    if not val and not gold:
        console.print(f"trained {s['model']} for {s.get('steps', 0)} steps; the cache has no validation "
                      f"or gold rows to score -> {ctx.run_dir}")
        return
    table = Table(title=f"ctrpipe train: {ctx.cfg.exp_name} ({s['model']}, {s['device']})")
    table.add_column("")
    for name in ("val" if "cv" not in s else "OOF", *(["gold"] if gold else [])):
        table.add_column(name, justify="right")
    if "cv" in s:
        table.add_column("folds mean ± std", justify="right")
    for m in SUMMARY_METRICS:
        row = [m, _fmt(val.get(m, "-"))]
        if gold:
            row.append(_fmt(gold.get(m, "-")))
        if "cv" in s:
            mean, std = s["cv"]["mean"].get(m, float("nan")), s["cv"]["std"].get(m, float("nan"))
            row.append(f"{mean:.5f} ± {std:.5f}")
        table.add_row(*row)
    console.print(table)
    extra = f"best step {s['best_step']}, " if "best_step" in s else ""
    patience = ctx.cfg.train.early_stopping.patience
    if s.get("stopped_early"):     # the bar stopped short of its total: say why
        extra += f"stopped early at step {s.get('steps', 0)} (train.early_stopping.patience={patience}), "
    stopped = [f"{f.get('fold', k)} (step {f.get('steps', 0)})" for k, f in enumerate(s.get("cv", {}).get("folds", []))
               if f.get("stopped_early")]
    if stopped:
        extra += f"fold(s) {', '.join(stopped)} stopped early (train.early_stopping.patience={patience}), "
    console.print(f"{extra}{s.get('train_seconds', 0):.1f}s training, "
                  f"{human_rate(s.get('samples_per_s', 0.0), 'samples/s')} {_precision_text(s)} -> {ctx.run_dir}")
    console.print(f"[dim]precision: {s['precision']['reason']}[/]", highlight=False)


def _precision_text(s: dict[str, Any]) -> str:
    """'(bf16 steps)' or '(fp32)': what the summary line says about precision."""
    train = s["precision"]["train"]
    return "(fp32)" if train == "off" else f"({train} steps)"
