"""Stage 5: one readable `fit()` -- batches in, optimiser steps, periodic evaluation, checkpoints out.

GPU syncs (`.item()`) happen only on log steps and evaluations: the loss is summed on the device, and the
first step with a non-finite loss is recorded on the device too, so a NaN is reported with its exact step.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ctrpipe.console import console, human_rate, make_progress
from ctrpipe.errors import TrainingError
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import keep_freed_memory
from ctrpipe.loader.batch import Batch
from ctrpipe.train.checkpoint import save_checkpoint
from ctrpipe.train.config import TrainConfig
from ctrpipe.train.ema import ModelEMA
from ctrpipe.train.evaluate import Predictions, autocast, predict
from ctrpipe.train.optim import build_optimizers, lr_factor, set_lr
from ctrpipe.train.rundir import RunLog
from ctrpipe.train.stopping import EarlyStopping

NAN_FIX = "lower train.lr or set train.grad_clip=1.0 (with train.amp=fp16, try bf16 or off)"


class Loader(Protocol):
    """What fit() needs from `ctrpipe.loader.ShardLoader`."""

    num_rows: int

    def __len__(self) -> int: ...
    def __iter__(self): ...  # noqa: ANN204 - yields Batch
    def set_epoch(self, epoch: int) -> None: ...
    def start_at(self, batch_idx: int) -> None: ...


@dataclass
class FitInputs:
    """Everything one training run (or one fold) needs."""

    model: nn.Module                  # built for the train config (sparse tables if the optimizer wants them)
    spec: FeatureSpec
    train_loader: Loader
    val_loader: Loader | None         # None: no validation rows (the last weights are the best)
    cfg: TrainConfig
    device: torch.device
    out_dir: Path                     # holds ckpt_last.pt, train_log.csv, val_predictions.npz
    best_path: Path                   # ckpt_best.pt, or ckpt_fold{k}.pt
    meta: dict[str, Any]              # checkpoint keys that do not change during training (see checkpoint.py)
    resume: dict[str, Any] | None = None   # a loaded ckpt_last.pt to continue from
    quiet: bool = False
    label: str = "train"


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_step: int
    best_epoch: int
    steps: int
    epochs: int
    samples: int
    train_seconds: float
    stopped_early: bool = False
    interrupted: bool = False         # stopped by train.stop_after_steps: continue with --resume
    last_loss: float = float("nan")
    best_preds: Predictions | None = field(default=None, repr=False)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


@dataclass
class _Position:
    step: int = 0                     # optimiser steps done
    epoch: int = 0                    # epochs completed
    batch_in_epoch: int = 0           # batches of the current epoch done
    samples: int = 0
    train_seconds: float = 0.0
    last_eval_step: int = -1


def fit(inp: FitInputs) -> FitResult:  # noqa: C901 - the loop is meant to be read top to bottom
    """Train `inp.model` and return its best evaluation.

    Writes ckpt_last.pt, train_log.csv and val_predictions.npz into `inp.out_dir`, the best weights to
    `best_path`.
    """
    cfg, device, model = inp.cfg, inp.device, inp.model.to(inp.device)
    if device.type == "cpu":
        keep_freed_memory()   # no page faults for each step's activations (see hostmem.py)
    optimizers = build_optimizers(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = ModelEMA(model, cfg.ema) if cfg.ema > 0 else None
    stopper = EarlyStopping(cfg.early_stopping)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=_pos_weight(cfg, inp.spec.n_tasks, device))
    step_model = torch.compile(model) if cfg.compile else model
    per_epoch = len(inp.train_loader)
    if per_epoch == 0:
        raise TrainingError("the training view has no rows", where=inp.label,
                            fix="check the cache's split sizes with `ctrpipe inspect DIR`")
    total_steps = min(cfg.max_steps, cfg.epochs * per_epoch) if cfg.max_steps else cfg.epochs * per_epoch
    pos = _Position()
    if inp.resume is not None:
        pos = _restore(inp.resume, model, optimizers, scaler, ema, stopper, device)
        if inp.resume.get("finished"):
            return _result(inp, pos, stopper, finished_before=True)
    log = RunLog(inp.out_dir, append=inp.resume is not None)
    loss_sum = torch.zeros((), device=device)          # summed on the device between log steps
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    logged_steps, last_loss, stop, interrupted, saved_finished = 0, float("nan"), False, False, False
    t_mark = t_log = time.perf_counter()
    samples_at_log = pos.samples
    progress = make_progress(inp.quiet)
    task = progress.add_task(inp.label, total=total_steps, completed=pos.step)
    if not inp.quiet:
        resuming = f", resuming at step {pos.step}" if pos.step else ""
        console.print(f"[bold]{inp.label}[/]: {inp.train_loader.num_rows:,} rows, {per_epoch} batches/epoch, "
                      f"{total_steps} steps on {device}{resuming}")

    def tick() -> None:
        """Add the time since the last mark to the training time (evaluations are left out)."""
        nonlocal t_mark
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        pos.train_seconds += now - t_mark
        t_mark = now

    def save_last(finished: bool) -> None:
        nonlocal saved_finished
        tick()
        _save_last(inp, model, ema, optimizers, scaler, stopper, pos, finished=finished)
        saved_finished = finished

    def evaluate_and_save(finished: bool = False) -> None:
        nonlocal stop, t_mark
        tick()
        metrics: dict[str, float] = {}
        if inp.val_loader is not None:
            with ema.applied() if ema is not None else nullcontext():
                preds = predict(model, inp.val_loader, inp.val_loader.num_rows, inp.spec.n_tasks, device,
                                cfg.amp)
            metrics = preds.metrics(inp.spec.labels)
            log.evaluation(pos.step, pos.epoch, metrics)
            # a NaN metric (e.g. AUC on a one-class view) never improves: keep the first weights anyway
            if stopper.update(metrics, pos.step, pos.epoch) or not inp.best_path.is_file():
                if stopper.best_step < 0:
                    stopper.best_metrics = dict(metrics)
                    stopper.best_step, stopper.best_epoch = pos.step, pos.epoch
                save_checkpoint(inp.best_path, _checkpoint(inp, model, ema, metrics, pos))
                preds.save(inp.out_dir / "val_predictions.npz", inp.spec.labels)
            stop = stop or stopper.should_stop
            if not inp.quiet:
                shown = "  ".join(f"{k} {metrics[k]:.5f}" for k in ("auc", "logloss", "score")
                                  if k in metrics)
                progress.console.print(f"[dim]{inp.label} step {pos.step}[/]  val {shown}")
        pos.last_eval_step = pos.step
        done = finished or stop
        if inp.val_loader is None and done:
            stopper.best_step, stopper.best_epoch = pos.step, pos.epoch
            save_checkpoint(inp.best_path, _checkpoint(inp, model, ema, {}, pos))
        t_mark = time.perf_counter()                    # evaluation time is not training time
        save_last(finished=done)

    with progress:
        model.train()
        while pos.epoch < cfg.epochs and pos.step < total_steps and not stop and not interrupted:
            inp.train_loader.set_epoch(pos.epoch)
            if pos.batch_in_epoch:
                inp.train_loader.start_at(pos.batch_in_epoch)
            batches = iter(inp.train_loader) if pos.batch_in_epoch < per_epoch else iter(())
            for batch in batches:
                set_lr(optimizers, lr_factor(pos.step, total_steps, cfg))
                loss = _train_step(step_model, batch, loss_fn, optimizers, scaler, cfg, device)
                if ema is not None:
                    ema.update()
                pos.step += 1
                pos.batch_in_epoch += 1
                pos.samples += len(batch)
                loss_sum += loss
                first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), pos.step, first_bad)
                logged_steps += 1
                if pos.step % cfg.log_every == 0 or pos.step == total_steps:
                    last_loss = _check_finite(loss_sum, first_bad, logged_steps, per_epoch, inp.label)
                    now = time.perf_counter()
                    rate = (pos.samples - samples_at_log) / max(now - t_log, 1e-9)
                    lr = optimizers[-1].param_groups[0]["lr"]
                    log.train(pos.step, pos.epoch, lr, last_loss, rate)
                    progress.update(task, completed=pos.step,
                                    rate_text=f"loss {last_loss:.4f}  {human_rate(rate, 'samples/s')}")
                    loss_sum.zero_()
                    logged_steps, t_log, samples_at_log = 0, now, pos.samples
                if cfg.eval_every and pos.step % cfg.eval_every == 0:
                    evaluate_and_save(finished=pos.step >= total_steps)
                    t_log = time.perf_counter()
                elif cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                    save_last(finished=False)
                if stop or pos.step >= total_steps:
                    break
                if cfg.stop_after_steps and pos.step == cfg.stop_after_steps:
                    interrupted = True
                    break
            if interrupted:
                break
            if pos.batch_in_epoch >= per_epoch:         # the epoch ran to its end
                pos.epoch += 1
                pos.batch_in_epoch = 0
                if logged_steps:
                    last_loss = _check_finite(loss_sum, first_bad, logged_steps, per_epoch, inp.label)
                if not cfg.eval_every:
                    evaluate_and_save(finished=pos.epoch >= cfg.epochs or pos.step >= total_steps)
                    t_log = time.perf_counter()
        if logged_steps:
            last_loss = _check_finite(loss_sum, first_bad, logged_steps, per_epoch, inp.label)
        if interrupted:
            save_last(finished=False)
        elif pos.last_eval_step != pos.step:
            evaluate_and_save(finished=True)
        elif not saved_finished:
            save_last(finished=True)
    log.close()
    return _result(inp, pos, stopper, stopped_early=stopper.should_stop, interrupted=interrupted,
                   last_loss=last_loss)


def _train_step(model: nn.Module, batch: Batch, loss_fn: nn.Module, optimizers: list[torch.optim.Optimizer],
                scaler: torch.amp.GradScaler, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """Forward, backward, optional clipping, optimiser steps. Returns the detached loss (no sync)."""
    assert batch.labels is not None, "training batches carry labels"
    with autocast(device, cfg.amp):
        logits = model(batch)                                              # (B, T)
    loss = loss_fn(logits.float(), batch.labels)                           # mean over rows and tasks
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        # sparse table gradients are left out: they touch few rows and the norm kernels want dense tensors
        grads = [p for opt in optimizers for g in opt.param_groups for p in g["params"]
                 if p.grad is not None and not p.grad.is_sparse]
        torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    return loss.detach()


def _pos_weight(cfg: TrainConfig, n_tasks: int, device: torch.device) -> torch.Tensor:
    w = cfg.pos_weight if isinstance(cfg.pos_weight, tuple) else (cfg.pos_weight,) * n_tasks
    if len(w) != n_tasks:
        raise TrainingError(f"train.pos_weight has {len(w)} values for {n_tasks} labels",
                            where="train.pos_weight",
                            fix=f"give one value, or one per label ({n_tasks})")
    return torch.tensor(w, dtype=torch.float32, device=device)


def _check_finite(loss_sum: torch.Tensor, first_bad: torch.Tensor, n: int, per_epoch: int,
                  label: str) -> float:
    """Sync point: mean loss since the last log; TrainingError at the first non-finite step."""
    bad = int(first_bad.item())
    if bad >= 0:
        raise TrainingError(f"loss became NaN/inf at step {bad} (epoch {(bad - 1) // per_epoch})",
                            where=label, fix=NAN_FIX)
    return float(loss_sum.item()) / max(n, 1)


def _eval_state_dict(model: nn.Module, ema: ModelEMA | None) -> dict[str, torch.Tensor]:
    return ema.state_dict(model) if ema is not None else model.state_dict()


def _checkpoint(inp: FitInputs, model: nn.Module, ema: ModelEMA | None, metrics: dict[str, float],
                pos: _Position) -> dict[str, Any]:
    state = dict(inp.meta)
    state.update(state_dict=_eval_state_dict(model, ema), val_metrics=dict(metrics), epoch=pos.epoch,
                 step=pos.step)
    return state


def _save_last(inp: FitInputs, model: nn.Module, ema: ModelEMA | None,
               optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler, stopper: EarlyStopping,
               pos: _Position, finished: bool) -> None:
    state = _checkpoint(inp, model, ema, stopper.best_metrics, pos)
    rng = {"torch": torch.get_rng_state()}
    if inp.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(inp.device)
    state.update(
        raw_state_dict=model.state_dict() if ema is not None else None,
        optimizers=[opt.state_dict() for opt in optimizers],
        scaler=scaler.state_dict(),
        scheduler={"step": pos.step},
        rng=rng,
        ema_updates=ema.updates if ema is not None else 0,
        early_stopping=stopper.state_dict(),
        batch_in_epoch=pos.batch_in_epoch,
        samples=pos.samples,
        train_seconds=pos.train_seconds,
        last_eval_step=pos.last_eval_step,
        finished=finished,
    )
    save_checkpoint(inp.out_dir / "ckpt_last.pt", state)


def _restore(ckpt: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer],
             scaler: torch.amp.GradScaler, ema: ModelEMA | None, stopper: EarlyStopping,
             device: torch.device) -> _Position:
    """Put model, optimisers, EMA, early stopping and RNG back where ckpt_last.pt left them."""
    raw = ckpt.get("raw_state_dict") or ckpt["state_dict"]
    model.load_state_dict(raw)
    if ema is not None:
        ema.load(ckpt["state_dict"], int(ckpt.get("ema_updates", 0)))
    for opt, sd in zip(optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(sd)
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    stopper.load_state_dict(ckpt["early_stopping"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return _Position(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]),
                     batch_in_epoch=int(ckpt["batch_in_epoch"]),
                     samples=int(ckpt["samples"]), train_seconds=float(ckpt["train_seconds"]),
                     last_eval_step=int(ckpt["last_eval_step"]))


def _result(inp: FitInputs, pos: _Position, stopper: EarlyStopping, finished_before: bool = False,
            stopped_early: bool = False, interrupted: bool = False,
            last_loss: float = float("nan")) -> FitResult:
    preds_path = inp.out_dir / "val_predictions.npz"
    preds = Predictions.load(preds_path) if inp.val_loader is not None and preds_path.is_file() else None
    return FitResult(best_metrics=dict(stopper.best_metrics), best_step=stopper.best_step,
                     best_epoch=stopper.best_epoch, steps=pos.step, epochs=pos.epoch, samples=pos.samples,
                     train_seconds=pos.train_seconds, stopped_early=stopped_early or
                     (finished_before and stopper.should_stop), interrupted=interrupted, last_loss=last_loss,
                     best_preds=preds)
