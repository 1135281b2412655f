"""Stage 5: one readable `fit()` -- batches in, optimiser steps, periodic evaluation, checkpoints out.

`fit` reads top to bottom: plan the steps, then per batch `train_step` and the bookkeeping of `_Run`, which
owns everything that changes during a run (position, timers, best metrics) and what is saved for --resume.
GPU syncs (`.item()`) happen only on log steps and evaluations: the loss is summed on the device, and the
first step with a non-finite loss is recorded on the device too, so a NaN is reported with its exact step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ctrpipe.console import console, human_rate, make_progress
from ctrpipe.device import autocast
from ctrpipe.errors import TrainingError
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import keep_freed_memory, release_free_heap
from ctrpipe.loader.batch import Batch
from ctrpipe.models.heads import as_output
from ctrpipe.models.layers.embedding import split_parameters
from ctrpipe.train.checkpoint import Checkpoint, RunPosition, TrainState, save_checkpoint
from ctrpipe.train.config import TrainConfig
from ctrpipe.train.distributed import Distributed, RowExchange, raised_alike
from ctrpipe.train.ema import ModelEMA
from ctrpipe.train.evaluate import Predictions, bad_id_error, predict
from ctrpipe.train.objective import Objective, Task, task_gradients
from ctrpipe.train.optim import build_optimizers, is_dense, lr_factor, set_lr
from ctrpipe.train.plan import StepPlan, plan_steps
from ctrpipe.train.rundir import RunLog
from ctrpipe.train.stopping import EarlyStopping
from ctrpipe.train.tables import ChangedRows, load_optimizer, load_packed, pack, pack_optimizer, unpack

# NaN inputs (a cache built from bad values) make the very first loss NaN, where no learning rate is to blame
NAN_FIX = ("lower train.lr (or train.weight_decay) or set train.grad_clip=1.0 (with train.amp=fp16, try bf16 or off); "
           "at the first steps, "
           "check that the cache's inputs are finite: `ctrpipe inspect SHARDS` (its 'numeric finite' row)")


class Loader(Protocol):
    """What fit() needs from `ctrpipe.loader.ShardLoader`."""

    num_rows: int
    batch_size: int

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def start_at(self, batch_idx: int) -> None: ...
    def batch_rows(self) -> np.ndarray: ...
    def rank_rows(self) -> np.ndarray: ...


@dataclass
class FitInputs:
    """Everything one training run (or one fold) needs."""

    model: nn.Module                  # built from `template.init_seed` (sparse tables if the optimizer wants them)
    spec: FeatureSpec
    train_loader: Loader
    val_loader: Loader | None         # None: no validation rows (the last weights are the best)
    cfg: TrainConfig                  # amp: the training steps' precision, resolved (device.resolve_amp)
    device: torch.device
    out_dir: Path                     # holds ckpt_last.pt, train_log.csv, val_predictions.npz
    best_path: Path                   # ckpt_best.pt, or ckpt_fold{k}.pt
    template: Checkpoint              # identity of every checkpoint of this run (config, spec, fingerprints, seed)
    tasks: tuple[Task, ...] = ()      # the model's heads with train.tasks applied (objective.build_tasks)
    logit_shift: tuple[float, ...] = ()   # per head, added at evaluation: undoes the training rows' sampling
    eval_amp: str | None = None       # the evaluations' precision (device.predict_amp); None: cfg.amp
    resume: Checkpoint | None = None  # a loaded ckpt_last.pt to continue from
    quiet: bool = False
    label: str = "train"
    # a torchrun job (train/distributed.py): the loaders serve this rank's share of each batch, rank 0 writes
    dist: Distributed | None = None


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
    notes: tuple[str, ...] = ()       # the plan's adjustments and warnings
    best_preds: Predictions | None = field(default=None, repr=False)
    # a torchrun job: bytes of embedding-gradient rows one rank sent per step (mean of this process's steps),
    # and what a dense all-reduce of the tables would move instead
    exchange: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0


def fit(inp: FitInputs) -> FitResult:
    """Train `inp.model` and return its best evaluation.

    Writes ckpt_last.pt, train_log.csv and val_predictions.npz into `inp.out_dir`, the best weights to
    `best_path`.
    """
    if len(inp.train_loader) == 0:
        raise raised_alike(inp.dist, TrainingError("the training view has no rows", where=inp.label,
                                                   fix="check the cache's split sizes with `ctrpipe inspect DIR`"))
    plan = plan_steps(inp.cfg, inp.train_loader.num_rows, inp.train_loader.batch_size, len(inp.train_loader))
    run = _Run(inp, plan)
    if run.finished:                                   # resumed a run that had already ended
        return run.result()
    run.announce()
    with run.progress:
        while run.pos.step < plan.total_steps and not (run.stopped or run.interrupted):
            for batch in run.epoch_batches():
                loss, diagnostics = run.step(batch)
                run.after_step(batch, loss, diagnostics)
                if plan.evaluates_at(run.pos.step, run.pos.batch_in_epoch):
                    run.evaluate_and_save()
                elif inp.cfg.checkpoint_every and run.pos.step % inp.cfg.checkpoint_every == 0:
                    run.save_last()
                if run.stopped or run.interrupted or run.pos.step >= plan.total_steps:
                    break
            run.end_epoch()
        run.finish()
    return run.result()


def train_step(model: nn.Module, batch: Batch, objective: Objective, optimizers: list[torch.optim.Optimizer],
               scaler: torch.amp.GradScaler, cfg: TrainConfig, device: torch.device,
               diagnose: list[nn.Parameter] | None = None, exchange: Callable[[], None] | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward, optional clipping, optimiser steps. Returns the detached loss and the model's
    diagnostics (both on the device: no sync). With `diagnose` (dense parameters), the heads' gradients on
    them are compared first (objective.task_gradients). `exchange` runs right after backward (a torchrun
    job's embedding-gradient exchange, distributed.RowExchange), so clipping and the steps see the averaged
    gradients.

    Gradients stay on the parameters until the next step's zero_grad (ChangedRows reads the tables' ones).
    """
    assert batch.labels is not None, "training batches carry labels"
    with autocast(device, cfg.amp):
        out = as_output(model(batch))                                      # logits (B, H)
    loss = objective(out, batch.labels)                                    # sum_k w_k L_k + aux
    diagnostics = {k: v.detach() for k, v in out.diagnostics.items()}
    if diagnose:
        diagnostics.update(task_gradients(objective, out, batch.labels, diagnose))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if exchange is not None:
        exchange()
    if cfg.grad_clip > 0:
        for opt in optimizers:
            scaler.unscale_(opt)
        # the dense layers' gradients only, as documented: the tables' are left out whatever their optimiser
        # (with embedding_optimizer=adam their dense gradients joined the norm and set how hard it clipped)
        grads = [p for opt in optimizers if is_dense(opt) for g in opt.param_groups for p in g["params"]
                 if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    return loss.detach(), diagnostics


class _Run:
    """The state of one run between steps: optimisers, EMA, early stopping, position, timers, the log."""

    def __init__(self, inp: FitInputs, plan: StepPlan) -> None:
        self.inp, self.plan, self.cfg, self.device = inp, plan, inp.cfg, inp.device
        self.model = inp.model.to(inp.device)
        # no page faults for each step's activations (see hostmem.py); what the steps keep is released before each
        # evaluation, whose larger batch would otherwise come on top of it (release_free_heap)
        if inp.device.type == "cpu":
            keep_freed_memory()
        self.optimizers = build_optimizers(self.model, self.cfg, inp.device)
        self.scaler = torch.amp.GradScaler(inp.device.type, enabled=self.cfg.amp == "fp16")
        self.changed = ChangedRows(self.model)
        self._rows_at: tuple[int, dict[str, torch.Tensor]] = (-1, {})   # (step, changed rows at that step)
        self._dense = [p for p in split_parameters(self.model).dense if p.requires_grad]
        self.ema = ModelEMA(self.model, self.cfg.ema) if self.cfg.ema > 0 else None
        self.stopper = EarlyStopping(self.cfg.early_stopping)
        self.objective = Objective(inp.tasks, inp.device, self.cfg.pos_weight_clip, self.cfg.pos_weight_clip_mode)
        self.task_names = [t.name for t in inp.tasks]
        self.checked_classes = False
        self.eval_notes: list[str] = []          # found at the first evaluation, recorded with the plan's notes
        self.metric_weights = [t.metric_weight for t in inp.tasks]
        self.dist = inp.dist
        self.main = inp.dist is None or inp.dist.is_main      # the one process that logs and writes files
        self.exchange: RowExchange | None = None
        train_model = self.model
        if inp.dist is not None:
            if self.changed.tables:
                self.exchange = RowExchange(inp.dist, self.changed.tables, dense=not self.cfg.sparse_embeddings)
            train_model = inp.dist.wrap(self.model, self.changed.tables, inp.template.config.get("model"))
            if any(t.mask is not None for t in inp.tasks):   # masked heads: means over the global batch
                dist = inp.dist
                self.objective.count_over_ranks(lambda c: dist.mean_(c.clone(), "counting masked heads' rows"),
                                                dist.world_size)
        self.step_model = torch.compile(train_model) if self.cfg.compile else train_model
        # (K,) rows of each global batch of an epoch: a rank's share of one may differ from the others' (a batch
        # size that is no multiple of the ranks, an unshuffled ragged last batch); the samples count the batch
        self.batch_rows = inp.train_loader.batch_rows().tolist() if inp.dist is not None else None
        self.pos = RunPosition()
        self.finished = False
        self.stopped = False              # early stopping fired
        self.interrupted = False          # train.stop_after_steps reached
        self.last_loss = float("nan")
        if inp.resume is not None:
            self._restore(inp.resume)
        # a resumed run's log keeps the rows up to its checkpoint: a killed process may have logged past it
        self.log = RunLog(inp.out_dir, append=inp.resume is not None,
                          through_step=self.pos.step if inp.resume is not None else None) \
            if self.main and not self.finished else None
        self.loss_sum = torch.zeros((), device=inp.device)        # summed on the device between log steps
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=inp.device)
        self.logged_steps = 0
        self.diag_sum: dict[str, torch.Tensor] = {}               # model diagnostics summed between log steps
        self.diag_n: dict[str, int] = {}                          # ... and how many steps reported each
        if inp.resume is not None and inp.resume.train_state is not None:
            self._restore_log_sums(inp.resume.train_state.log_sums)
        self.t_mark = time.perf_counter()
        # a log line's rate: its samples over the training time since the last line (evaluations and saves
        # between them left out, as pos.train_seconds leaves them out)
        self.samples_at_log, self.seconds_at_log = self.pos.samples, self.pos.train_seconds
        self.progress = make_progress(inp.quiet)
        self.task = self.progress.add_task(inp.label, total=plan.total_steps, completed=self.pos.step)

    # ------------------------------------------------------------------ the loop's steps
    def announce(self) -> None:
        inp, plan = self.inp, self.plan
        if not self.main:
            return
        for note in plan.notes:
            if note.startswith("warning"):
                console.print(f"[yellow]{inp.label}:[/] {note}", highlight=False)
            elif not inp.quiet:
                console.print(f"[dim]{inp.label}: {note}[/]", highlight=False)
        if not inp.quiet:
            resuming = f", resuming at step {self.pos.step}" if self.pos.step else ""
            ranks = f" x {self.dist.world_size} processes" if self.dist is not None else ""
            console.print(f"[bold]{inp.label}[/]: {inp.train_loader.num_rows:,} rows, {plan.per_epoch} "
                          f"batches/epoch, {plan.total_steps} steps on {self.device}{ranks}{resuming}")

    def epoch_batches(self) -> Iterator[Batch]:
        """The batches of the current epoch not yet trained on (all of them unless resuming mid-epoch)."""
        loader = self.inp.train_loader
        loader.set_epoch(self.pos.epoch)
        if self.pos.batch_in_epoch:
            loader.start_at(self.pos.batch_in_epoch)
        return iter(loader) if self.pos.batch_in_epoch < self.plan.per_epoch else iter(())

    def diagnose_params(self, step: int) -> list[nn.Parameter] | None:
        """The dense parameters when step `step` compares the heads' gradients (train.grad_diagnostics_every)."""
        every = self.cfg.grad_diagnostics_every
        if not every or step % every or len(self.inp.tasks) < 2:
            return None
        return self._dense

    def step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step at the schedule's rate (`train_step`); in a torchrun job a failed collective
        becomes a TrainingError naming the step."""
        set_lr(self.optimizers, lr_factor(self.pos.step, self.plan.total_steps, self.cfg, self.plan.warmup_steps))
        self.objective.at_step(self.pos.step)
        if self.batch_rows is not None:
            assert self.dist is not None
            self.objective.rows_share = len(batch) * self.dist.world_size / self.batch_rows[self.pos.batch_in_epoch]
        args = (self.step_model, batch, self.objective, self.optimizers, self.scaler, self.cfg, self.device,
                self.diagnose_params(self.pos.step + 1), self.exchange)
        try:
            if self.dist is None:
                return train_step(*args)
            self.dist.step = self.pos.step + 1
            with self.dist.guard("a training step"):
                return train_step(*args)
        except IndexError as exc:        # an embedding lookup out of range: name the id and where it is stored
            found = bad_id_error(self.inp.train_loader, batch)
            if found is None:
                raise
            raise found from exc

    def after_step(self, batch: Batch, loss: torch.Tensor, diagnostics: dict[str, torch.Tensor]) -> None:
        if self.ema is not None:
            self.ema.update()
        self.changed.mark()
        pos = self.pos
        # a torchrun job counts the global batch
        pos.samples += len(batch) if self.batch_rows is None else self.batch_rows[pos.batch_in_epoch]
        pos.step += 1
        pos.batch_in_epoch += 1
        self.loss_sum += loss
        for k, v in diagnostics.items():
            self.diag_sum[k] = self.diag_sum[k] + v if k in self.diag_sum else v.float().clone()
            self.diag_n[k] = self.diag_n.get(k, 0) + 1
        self.first_bad = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), pos.step, self.first_bad)
        self.logged_steps += 1
        if pos.step % self.cfg.log_every == 0 or pos.step == self.plan.total_steps:
            self._log_train()
        if self.cfg.stop_after_steps and pos.step == self.cfg.stop_after_steps < self.plan.total_steps:
            self.interrupted = True         # at the run's last step it finishes: nothing is left to resume
        every = self.cfg.distributed.check_every
        if self.dist is not None and every and pos.step % every == 0:
            self.dist.check_replicas(self.model)

    def end_epoch(self) -> None:
        """Close the epoch if it ran to its end (a stop in the middle leaves it open for --resume)."""
        if self.pos.batch_in_epoch >= self.plan.per_epoch:
            self.pos.epoch += 1
            self.pos.batch_in_epoch = 0

    def finish(self) -> None:
        if self.logged_steps and self.interrupted:
            # the sums since the last row go into the checkpoint, not a row of their own
            if self.dist is not None:
                self.first_bad = self.dist.earliest_(self.first_bad, "comparing the ranks' non-finite losses")
            self._check_finite()
        elif self.logged_steps:
            self._log_train()
        if self.interrupted:
            self.save_last()
        elif self.pos.last_eval_step != self.pos.step:
            self.evaluate_and_save()
        elif not self.finished:
            self.save_last(finished=True)
        if self.dist is not None:
            self.dist.check_replicas(self.model)
        if self.log is not None:
            self.log.close()

    def evaluate_and_save(self) -> None:
        """Evaluate (if there are validation rows), keep the best weights, save the state for --resume."""
        self._tick()
        if self.dist is None:
            # an evaluation syncs with the host anyway: a loss already NaN stops here, not at the next log row
            # after evaluating (and checkpointing) NaN weights; a torchrun job's ranks agree at log rows only
            self._check_finite()
        inp, pos = self.inp, self.pos
        metrics: dict[str, float] = {}
        preds: Predictions | None = None
        if inp.val_loader is not None:
            if self.device.type == "cpu":
                release_free_heap()
            with self.ema.applied() if self.ema is not None else nullcontext():
                preds = self._predict(inp.val_loader)
        if preds is not None:                              # one process, or rank 0 of a torchrun job
            metrics = preds.metrics(self.task_names, self.metric_weights)
            if not self.checked_classes:
                self._warn_one_class_heads(preds)
            assert self.log is not None
            self.log.evaluation(pos.step, pos.epoch, metrics)
            # a NaN metric (e.g. AUC on a one-class view) never improves: keep the first weights anyway
            counting = pos.step > self.plan.warmup_steps
            if self.stopper.update(metrics, pos.step, pos.epoch, counting) or not inp.best_path.is_file():
                if self.stopper.best_step < 0:
                    self.stopper.best_metrics = dict(metrics)
                    self.stopper.best_step, self.stopper.best_epoch = pos.step, pos.epoch
                save_checkpoint(inp.best_path, self._checkpoint(metrics))
                preds.save(inp.out_dir / "val_predictions.npz", self.task_names)
            self.stopped = self.stopper.should_stop
            if not inp.quiet:
                shown = "  ".join(f"{k} {metrics[k]:.5f}" for k in ("auc", "logloss", "score") if k in metrics)
                self.progress.console.print(f"[dim]{inp.label} step {pos.step}[/]  val {shown}")
        if self.dist is not None and inp.val_loader is not None:
            self.stopped = self.dist.broadcast(self.stopped, "sharing rank 0's early-stopping decision")
        pos.last_eval_step = pos.step
        done = self.stopped or pos.step >= self.plan.total_steps
        if inp.val_loader is None and done and self.main:
            self.stopper.best_step, self.stopper.best_epoch = pos.step, pos.epoch
            save_checkpoint(inp.best_path, self._checkpoint({}))
        self.t_mark = time.perf_counter()     # evaluation time is not training time
        self.save_last(finished=done and not self.interrupted)

    def save_last(self, finished: bool = False) -> None:
        self._tick()
        ckpt = self._checkpoint(self.stopper.best_metrics, finished)   # a collective in a torchrun job
        if self.main:
            save_checkpoint(self.inp.out_dir / "ckpt_last.pt", ckpt)
        self.finished = finished
        self.t_mark = time.perf_counter()     # saving is not training time either

    def result(self) -> FitResult:
        inp = self.inp
        preds_path = inp.out_dir / "val_predictions.npz"
        # rank 0's file: another rank of a torchrun job need not see the run directory
        preds = Predictions.load(preds_path) if self.main and inp.val_loader is not None and preds_path.is_file() \
            else None
        if preds is not None:
            self._warn_constant_heads(preds)
        s = self.stopper
        return FitResult(best_metrics=dict(s.best_metrics), best_step=s.best_step, best_epoch=s.best_epoch,
                         steps=self.pos.step, epochs=self.pos.epoch, samples=self.pos.samples,
                         train_seconds=self.pos.train_seconds, stopped_early=s.should_stop,
                         interrupted=self.interrupted, last_loss=self.last_loss,
                         notes=(*self.plan.notes, *self.eval_notes),
                         best_preds=preds, exchange=self._exchange_bytes())

    def _warn_constant_heads(self, preds: Predictions) -> None:
        """A head that gives every validation row the same prediction at its best evaluation ranks nothing
        (AUC 0.5), yet trains, calibrates and infers without complaint: a model collapsed to a constant, such as
        a deep stack of quadratic layers without residuals or normalisation whose output underflows."""
        for t, task in enumerate(self.inp.tasks):
            z = preds.logits[~np.isnan(preds.labels[:, t]), t]
            if len(z) < 2 or z.min() != z.max():
                continue
            note = (f"warning: head {task.name!r} gives all {len(z):,} validation rows the same prediction at its "
                    f"best evaluation (step {self.stopper.best_step}): the model ranks nothing. Look at train.lr "
                    "and at the model's depth, residuals and normalisation (its model.* keys in docs/config.md), "
                    "or train longer")
            self.eval_notes.append(note)
            console.print(f"[yellow]{self.inp.label}:[/] {note}", highlight=False)

    def _warn_one_class_heads(self, preds: Predictions) -> None:
        """A head whose validation rows (under its mask) hold one class has no AUC: say so once, with the rows
        and the fix, instead of leaving a NaN in the metrics (and, weighted, in the stopping metric)."""
        self.checked_classes = True
        for t, task in enumerate(self.inp.tasks):
            y = preds.labels[:, t]
            y = y[~np.isnan(y)]
            if len(y) and y.min() != y.max():
                continue
            held = "no rows" if not len(y) else f"{len(y):,} rows, all {'positive' if y[0] else 'negative'}"
            spec = self.inp.spec
            # a label with one class in the train split too: no split of the rows gives it both
            constant = [(spec.labels[i], spec.label_rates[i]) for i in task.labels
                        if i < len(spec.label_rates) and spec.label_rates[i] in (0.0, 1.0)]
            note = (f"warning: head {task.name!r} has one class in its validation rows ({held}"
                    + (", under its mask" if task.mask is not None else "") + "): its AUC is NaN"
                    + (", and so is the primary AUC early stopping reads: stop on logloss "
                       "(train.early_stopping.metric=logloss)"
                       + (f" or set train.tasks.{task.name}.metric_weight=0" if len(self.inp.tasks) > 1 else "")
                       if task.metric_weight > 0 else "")
                    + ("; its mask is its own label, so every row it keeps is positive: mask it by another "
                       f"label or drop the mask (train.tasks.{task.name}.mask=)" if task.labels == (task.mask,)
                       else f"; its label {constant[0][0]!r} is {int(constant[0][1])} in every train row too, so more "
                       "rows will not help: check how the label is made (a derived label's values or pattern, "
                       "labels swapped between heads)" if constant
                       else f"; the rows its mask keeps may hold one class by the labels' nature (every conversion "
                       f"was clicked): check train.tasks.{task.name}.mask" if task.mask is not None
                       else "; more validation rows (data.split.val_ratio) would give it both"))
            self.eval_notes.append(note)
            console.print(f"[yellow]{self.inp.label}:[/] {note}", highlight=False)

    def _exchange_bytes(self) -> dict[str, float]:
        ex = self.exchange
        if ex is None or not ex.steps:
            return {}
        return {"row_bytes_per_step": ex.bytes_sent / ex.steps, "dense_bytes_per_step": float(ex.dense_bytes())}

    # ------------------------------------------------------------------ helpers
    def _predict(self, loader: Loader) -> Predictions | None:
        """The model's predictions over the validation view; in a torchrun job every rank predicts its shares
        of the batches and rank 0 gets them all, in one-process order (None on the other ranks)."""
        inp = self.inp
        amp = self.cfg.amp if inp.eval_amp is None else inp.eval_amp
        if self.dist is None:
            return predict(self.model, loader, loader.num_rows, inp.tasks, self.device, amp,
                           logit_shift=inp.logit_shift)
        shares = loader.rank_rows()                                          # (K, W)
        mine = predict(self.model, loader, int(shares[:, self.dist.rank].sum()), inp.tasks, self.device,
                       amp, logit_shift=inp.logit_shift)
        return self.dist.gather_predictions(mine, shares)

    def _tick(self) -> None:
        """Add the time since the last mark to the training time (evaluations are left out)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.pos.train_seconds += now - self.t_mark
        self.t_mark = now

    def _log_train(self) -> None:
        """Sync point: mean loss since the last log line; TrainingError at the first non-finite step."""
        if self.dist is not None:
            self._combine_ranks()
        self._check_finite()
        self.last_loss = float(self.loss_sum.item()) / max(self.logged_steps, 1)
        self._tick()
        rate = (self.pos.samples - self.samples_at_log) / max(self.pos.train_seconds - self.seconds_at_log, 1e-9)
        lr = self.optimizers[-1].param_groups[0]["lr"]
        if self.log is not None:
            self.log.train(self.pos.step, self.pos.epoch, lr, self.last_loss, rate)
        if self.diag_sum:
            if self.log is not None:
                self.log.diagnostics(self.pos.step, {f"train/{k}": float(v.item()) / self.diag_n[k]
                                                     for k, v in self.diag_sum.items()})
            self.diag_sum, self.diag_n = {}, {}
        self.progress.update(self.task, completed=self.pos.step,
                             rate_text=f"loss {self.last_loss:.4f}  {human_rate(rate, 'samples/s')}")
        self.loss_sum.zero_()
        self.logged_steps, self.samples_at_log, self.seconds_at_log = 0, self.pos.samples, self.pos.train_seconds

    def _check_finite(self) -> None:
        bad = int(self.first_bad.item())
        if bad >= 0:        # under torchrun every rank has the same earliest step (Distributed.earliest_)
            raise raised_alike(self.dist, TrainingError(
                f"loss became NaN/inf at step {bad} (epoch {(bad - 1) // self.plan.per_epoch})",
                where=self.inp.label, fix=NAN_FIX))

    def _log_sums(self) -> dict[str, Any]:
        """What `TrainState.log_sums` keeps: the sums since the last log row, so a resumed run's next row is the
        uninterrupted run's. A torchrun job's are each rank's own until a row averages them: rank r > 0's go
        under "rank{r}" (a collective; every rank has logged the same steps, so all of them take this path)."""
        if not self.logged_steps:
            return {}
        mine = {"loss": float(self.loss_sum.item()), "steps": self.logged_steps,
                "diag": {k: float(v.item()) for k, v in self.diag_sum.items()}, "diag_n": dict(self.diag_n)}
        if self.dist is None:
            return mine
        every = self.dist.gather_objects(mine, "gathering the ranks' log sums for a checkpoint")
        return {**mine, **{f"rank{r}": theirs for r, theirs in list(enumerate(every or []))[1:]}}

    def _restore_log_sums(self, saved: dict[str, Any]) -> None:
        if self.dist is not None and self.dist.rank:
            saved = saved.get(f"rank{self.dist.rank}", {})
        if not saved:
            return
        self.loss_sum.fill_(saved["loss"])
        self.logged_steps = int(saved["steps"])
        self.diag_sum = {k: torch.tensor(v, device=self.device) for k, v in saved["diag"].items()}
        self.diag_n = {k: int(v) for k, v in saved["diag_n"].items()}

    def _combine_ranks(self) -> None:
        """A torchrun job's log step: the loss and diagnostics summed since the last log become their mean
        over the ranks, and the first non-finite step is the earliest of any rank, so every rank logs the same
        numbers and stops at the same step. The loss is then the global batch's (each rank's is weighted by its
        share, Objective.rows_share); a diagnostic is the ranks' unweighted mean of their own values, which is
        the batch's only where the shares are equal."""
        assert self.dist is not None
        keys = sorted(self.diag_sum)
        sums = torch.stack([self.loss_sum.float(), *(self.diag_sum[k].float().reshape(()) for k in keys)])
        self.dist.mean_(sums, "averaging the logged loss over ranks")
        self.loss_sum.copy_(sums[0])
        self.diag_sum.update({k: sums[i + 1] for i, k in enumerate(keys)})
        self.first_bad = self.dist.earliest_(self.first_bad, "comparing the ranks' non-finite losses")

    def _checkpoint(self, metrics: dict[str, float], finished: bool | None = None) -> Checkpoint:
        """The run's checkpoint now: evaluation weights, plus the training state unless `finished` is None."""
        # best and last checkpoints of one evaluation share the step: scan the masks once for both
        if self._rows_at[0] != self.pos.step:
            self._rows_at = (self.pos.step, self.changed.all_rows())
        rows = self._rows_at[1]
        model, ema = self.model, self.ema
        weights = pack(ema.state_dict(model) if ema is not None else model.state_dict(), rows)
        ckpt = dataclasses.replace(self.inp.template, weights=weights, val_metrics=dict(metrics),
                                   epoch=self.pos.epoch, step=self.pos.step)
        if finished is None:
            return ckpt
        rng = self._rng_states()
        position = dataclasses.replace(self.pos)
        if finished and position.batch_in_epoch >= self.plan.per_epoch:
            # the last step's evaluation saves before the loop closes the epoch: record it closed, as the
            # run's result counts it (a resumed finished run reports the same epochs)
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0
        ckpt.train_state = TrainState(
            position=position,
            optimizers=[pack_optimizer(opt, self.changed.tables, rows) for opt in self.optimizers],
            changed_rows=rows, scaler=self.scaler.state_dict(), rng=rng,
            early_stopping=self.stopper.state_dict(),
            raw_weights=pack(model.state_dict(), rows) if ema is not None else None,
            ema_updates=ema.updates if ema is not None else 0, finished=finished,
            world_size=self.dist.world_size if self.dist is not None else 1, log_sums=self._log_sums())
        return ckpt

    def _rng_states(self) -> dict[str, torch.Tensor]:
        """The random generators' states: this process's, or in a torchrun job every rank's (rank r > 0 under
        "torch.rank{r}" / "cuda.rank{r}": each rank draws its own dropout masks)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist is None:
            return rng
        every = self.dist.gather_objects(rng, "gathering the ranks' random states for a checkpoint")
        for r, theirs in list(enumerate(every or []))[1:]:
            rng.update({f"{k}.rank{r}": v for k, v in theirs.items()})
        return rng

    def _restore(self, ckpt: Checkpoint) -> None:
        """Put model, optimisers, EMA, early stopping and RNG back where ckpt_last.pt left them."""
        ts = ckpt.train_state
        assert ts is not None, "resume needs a ckpt_last.pt"
        load_packed(self.model, ts.raw_weights if ts.raw_weights is not None else ckpt.weights)
        self.changed.load(ts.changed_rows)
        if self.ema is not None:
            self.ema = ModelEMA(self.model, self.cfg.ema)      # shadows start from the restored weights
            self.ema.load(unpack(ckpt.weights, self.model.state_dict()), ts.ema_updates)
        for opt, packed in zip(self.optimizers, ts.optimizers, strict=True):
            load_optimizer(opt, packed)
        if ts.scaler:
            self.scaler.load_state_dict(ts.scaler)
        self.stopper.load_state_dict(ts.early_stopping)
        mine = f".rank{self.dist.rank}" if self.dist is not None and self.dist.rank else ""
        torch.set_rng_state(ts.rng["torch" + mine])
        if self.device.type == "cuda" and "cuda" + mine in ts.rng:
            torch.cuda.set_rng_state(ts.rng["cuda" + mine], self.device)
        self.pos = dataclasses.replace(ts.position)
        self.finished = ts.finished
        self.stopped = self.stopper.should_stop
