"""`train:` and `cv:` sections: optimisation, schedule, precision, evaluation and stopping."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from ctrpipe.errors import ConfigError

EmbeddingOptimizer = Literal["lazy_adam", "sgd", "adagrad", "sparse_adam", "adam"]
Schedule = Literal["cosine", "step", "constant"]
Amp = Literal["auto", "off", "bf16", "fp16"]

# embedding optimizers that accept sparse gradients; the model is then built with sparse=True
SPARSE_OPTIMIZERS: frozenset[str] = frozenset({"lazy_adam", "sgd", "adagrad", "sparse_adam"})


def _bad(key: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"bad value {value!r} for '{key}'", fix=fix)


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when `metric` on the validation view has not improved for `patience` evaluations."""

    metric: str = "auc"              # auc, logloss, ap, wll or score; with several heads also e.g. auc.click
    patience: int = 0                # 0: off (train every epoch; the best evaluation still wins)
    mode: Literal["auto", "max", "min"] = "auto"   # auto: min for logloss/wll, max otherwise
    min_delta: float = 0.0           # improvement smaller than this does not count

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise _bad("train.early_stopping.patience", self.patience,
                       "use 0 (off) or a number of evaluations, e.g. train.early_stopping.patience=2")
        if not 0 <= self.min_delta < math.inf:     # an infinite one would count no evaluation as better
            raise _bad("train.early_stopping.min_delta", self.min_delta,
                       "use e.g. train.early_stopping.min_delta=0")


@dataclass(frozen=True)
class DistributedConfig:
    """Data-parallel runs under torchrun (train/distributed.py); a single process ignores this section."""

    # seconds a rank waits in a collective for the others before the run ends with an error: a rank that
    #   died or hangs stops the job instead of leaving the rest waiting; must exceed the longest time ranks
    #   wait on rank 0 (its checkpoint writes, its gold-row scoring between folds)
    timeout_s: float = 1800.0
    # every this many steps, compare a checksum of every parameter across ranks and stop on a difference
    #   (one read of the model per check); 0 = only at the end of each run
    check_every: int = 0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise _bad("train.distributed.timeout_s", self.timeout_s,
                       "use a positive number of seconds, e.g. train.distributed.timeout_s=1800")
        if self.check_every < 0:
            raise _bad("train.distributed.check_every", self.check_every,
                       "use 0 (at the end of a run) or a number of steps, e.g. train.distributed.check_every=1000")


@dataclass(frozen=True)
class TaskConfig:
    """Per head (`train.tasks.<head>`, heads are named after labels unless a model names its own)."""

    weight: float = -1.0             # loss weight (-1: the model's default for the head, usually 1)
    pos_weight: float = 0.0          # BCE weight of positives (0: train.pos_weight)
    mask: str = ""                   # label whose positive rows alone count for this head, e.g. clicked
    metric_weight: float = -1.0      # weight in the primary (mean) metrics (-1: the model's default)
    # focal auxiliary term: focal_weight * mean((1 - p_t)^focal_gamma * BCE) from focal_start steps on, the
    #   factor from a detached fp32 probability (it reweights rows, it does not add a gradient path)
    focal_weight: float = 0.0
    focal_gamma: float = 2.0
    focal_start: int = 0

    def __post_init__(self) -> None:
        # '<head>' in a key: the config loader puts the head's name in its place
        for key in ("weight", "pos_weight", "metric_weight", "focal_weight", "focal_gamma"):
            if not math.isfinite(getattr(self, key)):       # inf made the loss inf, or every mean metric NaN
                raise _bad(f"train.tasks.<head>.{key}", getattr(self, key), "use a finite number, e.g. 1.0")
        if self.weight < 0 and self.weight != -1.0:
            raise _bad("train.tasks.<head>.weight", self.weight, "use 0 or more, e.g. weight: 1.0")
        if self.pos_weight < 0:
            raise _bad("train.tasks.<head>.pos_weight", self.pos_weight, "use a positive number, e.g. 1.0")
        if self.metric_weight < 0 and self.metric_weight != -1.0:
            raise _bad("train.tasks.<head>.metric_weight", self.metric_weight, "use 0 or more, e.g. 1.0")
        for key, example in (("focal_weight", "0.1"), ("focal_gamma", "2.0"), ("focal_start", "1000")):
            if getattr(self, key) < 0:
                raise _bad(f"train.tasks.<head>.{key}", getattr(self, key), f"use 0 or more, e.g. {key}: {example}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3                 # dense parameters (AdamW)
    weight_decay: float = 0.0        # AdamW, weight matrices only (not biases, norms, embeddings, numeric tokens)
    embedding_optimizer: EmbeddingOptimizer = "adam"
    embedding_lr: float = 0.0        # 0: same as lr
    warmup_steps: int = 0            # linear warm-up from 0 to lr, at most a tenth of the run's steps
    schedule: Schedule = "cosine"    # after warm-up; cosine decays to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.0
    step_every: int = 1000           # schedule=step: multiply lr by step_gamma every step_every steps
    step_gamma: float = 0.5
    grad_clip: float = 0.0           # max global grad norm of dense parameters; 0 = off
    # auto: bf16 autocast for the training steps where the device runs it natively and the model's bf16 step
    #   was measured faster (device.py says which), fp32 elsewhere; predictions stay fp32. bf16 works on CPU
    #   and GPU; fp16 (with a GradScaler) needs CUDA. `bool` only because YAML reads a bare `off` as false:
    #   __post_init__ turns false into "off", so code sees the four names only
    amp: Amp | bool = "auto"
    compile: bool = False            # torch.compile the model (opt-in: slow first steps)
    ema: float = 0.0                 # EMA decay, e.g. 0.999; evaluation then uses the EMA weights; 0 = off
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    eval_every: int = 0              # steps between evaluations; 0 = evals_per_epoch evaluations per epoch
    evals_per_epoch: int = 1         # with eval_every=0: evaluations spread evenly over each epoch (the last at
    #                                  its end); with early_stopping.patience a plateau stops within the epoch
    min_steps: int = 0               # repeat epochs until the run has this many optimiser steps to take (small
    #                                  data); early stopping may still end it sooner; 0 = epochs alone decide
    log_every: int = 50              # steps between log lines (the only points where the loss syncs to host)
    checkpoint_every: int = 0        # steps between extra ckpt_last saves; 0 = at evaluations only
    pos_weight: float | tuple[float, ...] = 1.0   # BCE weight of positives: one value or one per task
    # every this many steps (0 = off), each head's gradient norm on the shared dense parameters and the cosine
    #   between heads' gradients go to diagnostics.csv: tasks that fight show negative cosines
    grad_diagnostics_every: int = 0
    # upper bound on every pos_weight over the run, as [step, clip] milestones, e.g. [[0, 300], [8000, 30]]:
    #   300 until step 8000, then 30 (piecewise), or moving from one to the next (linear); [] = no clip
    pos_weight_clip: tuple[tuple[int, float], ...] = ()
    pos_weight_clip_mode: Literal["piecewise", "linear"] = "piecewise"
    # per head: loss weight, pos_weight, label mask, metric weight, e.g. {converted: {mask: clicked}}
    tasks: dict[str, TaskConfig] = field(default_factory=dict, hash=False)
    device: str = "auto"             # auto | cpu | cuda | cuda:1
    # at most this many optimiser steps (0: no cap), the schedule spanning them; it never adds steps: more
    # epochs or train.min_steps do
    max_steps: int = 0
    stop_after_steps: int = 0        # stop (saving ckpt_last) at this step WITHOUT changing the schedule:
    #                                  simulates an interruption; continue with --resume. 0 = off
    num_threads: int = 0             # torch CPU threads; 0 = torch default
    deterministic: bool = False      # torch.use_deterministic_algorithms on any device (CPU runs are already
    #                                  deterministic; on a GPU it swaps atomic index_add_/scatter_add_ for slower paths)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)   # torchrun runs only

    def __post_init__(self) -> None:
        if self.amp is False:
            object.__setattr__(self, "amp", "off")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise _bad("train.amp", self.amp, "use train.amp=auto, off, bf16 or fp16")
        if self.epochs < 1:
            raise _bad("train.epochs", self.epochs, "use e.g. train.epochs=1")
        if not 0 < self.lr < math.inf:
            raise _bad("train.lr", self.lr, "use a positive number, e.g. train.lr=0.001")
        for key in ("weight_decay", "embedding_lr", "grad_clip", "min_lr_ratio"):
            # .inf is a float YAML reads too: an infinite rate or decay only turns the weights to NaN
            if not 0 <= getattr(self, key) < math.inf:
                raise _bad(f"train.{key}", getattr(self, key), f"use 0 or more, e.g. train.{key}=0")
        if self.min_lr_ratio > 1:
            # the schedule would climb to min_lr_ratio * lr, past the rate asked for
            raise _bad("train.min_lr_ratio", self.min_lr_ratio,
                       "use a share of train.lr in [0, 1] that the schedule ends at, e.g. train.min_lr_ratio=0.1")
        for key in ("warmup_steps", "eval_every", "checkpoint_every", "max_steps", "stop_after_steps",
                    "num_threads", "min_steps", "grad_diagnostics_every"):
            if getattr(self, key) < 0:
                raise _bad(f"train.{key}", getattr(self, key), f"use 0 (off) or more, e.g. train.{key}=0")
        steps = [m[0] for m in self.pos_weight_clip]
        if steps != sorted(set(steps)) or any(s < 0 for s in steps) or any(m[1] <= 0 for m in self.pos_weight_clip):
            raise _bad("train.pos_weight_clip", self.pos_weight_clip,
                       "give [step, clip] pairs with increasing steps and positive clips, e.g. [[0, 300], [8000, 30]]")
        if self.pos_weight_clip_mode not in ("piecewise", "linear"):
            raise _bad("train.pos_weight_clip_mode", self.pos_weight_clip_mode, "use piecewise or linear")
        if self.evals_per_epoch < 1:
            raise _bad("train.evals_per_epoch", self.evals_per_epoch, "use e.g. train.evals_per_epoch=4")
        if self.log_every < 1:
            raise _bad("train.log_every", self.log_every, "use a positive integer, e.g. train.log_every=50")
        if self.step_every < 1 or not 0 < self.step_gamma <= 1:
            raise _bad("train.step_every/step_gamma", (self.step_every, self.step_gamma),
                       "use e.g. train.step_every=1000 train.step_gamma=0.5")
        if not 0 <= self.ema < 1:
            raise _bad("train.ema", self.ema, "use 0 (off) or a decay in (0, 1), e.g. train.ema=0.999")
        weights = self.pos_weight if isinstance(self.pos_weight, tuple) else (self.pos_weight,)
        if not weights or any(not w > 0 or not math.isfinite(w) for w in weights):
            raise _bad("train.pos_weight", self.pos_weight, "use positive numbers, e.g. train.pos_weight=1.0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device or ""):      # what resolve_device accepts
            raise _bad("train.device", self.device, "use auto, cpu, cuda or cuda:1")

    @property
    def sparse_embeddings(self) -> bool:
        """Whether the model must produce sparse embedding gradients for the chosen optimizer."""
        return self.embedding_optimizer in SPARSE_OPTIMIZERS


@dataclass(frozen=True)
class CVConfig:
    n_splits: int = 0                # >0: one model per stored fold (the cache must hold that many)

    def __post_init__(self) -> None:
        if self.n_splits == 1 or self.n_splits < 0:
            raise _bad("cv.n_splits", self.n_splits,
                       "use 0 (single run) or the cache's fold count, e.g. cv.n_splits=5")
