"""Stage 5: how many optimiser steps a run takes, where it evaluates, and what to tell the user about it.

Settled once, before the first step, from the training view's size and the config, so the loop only follows
it. Small data gets a run that can learn: `train.min_steps` repeats epochs until that many steps are done,
the warm-up is kept within a tenth of the run, and evaluations (`train.evals_per_epoch` per configured epoch)
with early stopping keep the best weights. A run that is still too short to learn says so, with the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ctrpipe.train.config import TrainConfig

TOO_FEW_STEPS = 50        # below this an embedding model has barely moved from its prior
MAX_EVALS = 100           # a run stretched by min_steps evaluates at most this often (each one saves state)
MAX_WARMUP_SHARE = 0.1    # warm-up at most a tenth of the run: the rest must train at the full rate


@dataclass(frozen=True)
class StepPlan:
    per_epoch: int            # batches per epoch (the training loader's length)
    total_steps: int          # optimiser steps of the run; the lr schedule spans exactly these
    epochs: int               # epochs started (the last one may stop part-way)
    eval_every: int           # evaluate every this many steps (0: at `eval_points`), and after the last step
    eval_points: frozenset[int]   # batches into an epoch after which to evaluate (when eval_every is 0)
    warmup_steps: int         # train.warmup_steps, shortened to a tenth of a short run
    notes: tuple[str, ...]    # adjustments and warnings, printed before training and kept in metrics.json

    def evaluates_at(self, step: int, batch_in_epoch: int) -> bool:
        if step == self.total_steps:
            return True
        if self.eval_every:
            return step % self.eval_every == 0
        return batch_in_epoch in self.eval_points


def plan_steps(cfg: TrainConfig, rows: int, batch_size: int, per_epoch: int) -> StepPlan:
    """The run's steps for `rows` training rows served in `per_epoch` batches of `batch_size`."""
    planned = cfg.epochs * per_epoch
    total = max(planned, cfg.min_steps)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    notes: list[str] = []
    if cfg.max_steps > max(planned, cfg.min_steps):
        notes.append(f"train.max_steps={cfg.max_steps} caps the run and adds no steps: it trains {total} "
                     f"(train.epochs={cfg.epochs} of {per_epoch} step(s)"
                     + (f", stretched to train.min_steps={cfg.min_steps}" if cfg.min_steps > planned else "")
                     + f"); raise train.epochs or set train.min_steps={cfg.max_steps} to train longer")
    if total > planned:
        notes.append(f"{rows:,} training rows give {per_epoch} step(s) per epoch at batch {batch_size}: "
                     f"training {total} steps (train.min_steps) over {math.ceil(total / per_epoch)} epochs; "
                     "the best evaluation is kept")
    every, points = cfg.eval_every, frozenset()
    if not every and total > planned:
        # small data overfits within a few passes, so a stretched run evaluates every epoch (evals_per_epoch
        # times), but at most MAX_EVALS times: an epoch of one step would otherwise save state at every step
        every = max(math.ceil(per_epoch / cfg.evals_per_epoch), math.ceil(total / MAX_EVALS))
    elif not every:
        n = min(cfg.evals_per_epoch, per_epoch)
        points = frozenset(math.ceil(per_epoch * (i + 1) / n) for i in range(n))
    warmup = cfg.warmup_steps
    if warmup > MAX_WARMUP_SHARE * total:
        warmup = int(MAX_WARMUP_SHARE * total)
        notes.append(f"warm-up shortened from {cfg.warmup_steps} to {warmup} steps (a tenth of this "
                     f"{total}-step run)")
    for head, tc in sorted(cfg.tasks.items()):     # a scheduled term that never comes is a setting that does nothing
        if tc.focal_weight > 0 and tc.focal_start >= total:
            notes.append(f"warning: train.tasks.{head}.focal_start={tc.focal_start} is past this run's last step "
                         f"({total}): its focal term never applies; lower focal_start to use it")
    if total < TOO_FEW_STEPS and cfg.max_steps and total == cfg.max_steps < max(planned, cfg.min_steps):
        notes.append(f"warning: train.max_steps={cfg.max_steps} stops the run after {total} optimiser step(s) "
                     f"of the {max(planned, cfg.min_steps)} planned -- too few for a model to learn; raise "
                     "train.max_steps (0: no cap) unless this is a smoke test")
    elif total < TOO_FEW_STEPS:
        smaller = _smaller_batch(rows, batch_size)
        # the epochs the run makes (train.min_steps may have repeated them, and is raised, not set, if set)
        raise_ = "raise train.min_steps, e.g." if cfg.min_steps else "set"
        fixes = [f"{raise_} train.min_steps=300 (repeats epochs)"] + \
            ([f"a smaller loader.batch_size (e.g. {smaller})"] if smaller < batch_size else [])
        notes.append(f"warning: only {total} optimiser step(s) ({rows:,} rows, batch {batch_size}, "
                     f"{math.ceil(total / per_epoch)} epoch(s)) -- too few for a model to learn"
                     + "; " + " or ".join(fixes))
    return StepPlan(per_epoch=per_epoch, total_steps=total, epochs=math.ceil(total / per_epoch),
                    eval_every=every, eval_points=points, warmup_steps=warmup, notes=tuple(notes))


def _smaller_batch(rows: int, batch_size: int) -> int:
    """A power-of-two batch giving an epoch of at least ~20 steps, and below the current one (at most half)."""
    b = 1 << max(4, int(math.log2(max(rows // 20, 16))))
    return min(b, max(1, batch_size // 2))
