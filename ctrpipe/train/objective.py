"""Stage 5: the training objective -- per-head BCE with weights, pos_weight and label masks, plus the model's
auxiliary losses -- and the one place that turns label columns into each head's targets.

loss = sum_k w_k * L_k + sum(aux), where L_k is head k's mean BCE over the rows its mask keeps (all rows
unless `mask` is set: conversion given click counts only clicked rows). A head whose probability is a
product (ESMM's ctcvr) is scored from the model's log-probabilities:
BCE = -(pw * y * log p + (1 - y) * log(1 - p)) with log(1 - p) = log1mexp(log p), finite for tiny p.
Predictions and metrics use the same targets, with masked-out rows set to NaN (metrics skip them).

Example: labels (clicked, converted), DNN, `train.tasks: {converted: {mask: clicked, weight: 0.5}}` ->
tasks (clicked: w 1, all rows), (converted: w 0.5, clicked rows only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec
from ctrpipe.models.heads import Head, ModelOutput, log1mexp
from ctrpipe.train.config import TaskConfig, TrainConfig


@dataclass(frozen=True)
class Task:
    """One head as the objective and the metrics see it: where its target comes from, and its weights."""

    name: str
    labels: tuple[int, ...]      # label columns whose AND is the target
    mask: int | None             # label column whose 1-rows alone count; None = every row
    weight: float                # loss weight
    pos_weight: float
    metric_weight: float
    focal_weight: float = 0.0    # focal auxiliary term (0 = off), see Objective
    focal_gamma: float = 2.0
    focal_start: int = 0


def build_tasks(heads: Sequence[Head], spec: FeatureSpec, cfg: TrainConfig) -> tuple[Task, ...]:
    """The model's heads with `train.tasks` applied; unknown head or label names are ConfigErrors."""
    names = [h.name for h in heads]
    unknown = sorted(set(cfg.tasks) - set(names))
    if unknown:
        raise ConfigError(f"train.tasks names {unknown}, which this model does not predict",
                          where=f"train.tasks.{unknown[0]}",
                          fix=f"use the model's heads: {', '.join(names)} (heads are named after the labels "
                              "unless the model names its own)")
    by_name = {h.name: h for h in heads}
    base = _base_pos_weights(cfg, heads)
    tasks = []
    for k, h in enumerate(heads):
        own = cfg.tasks.get(h.name)
        tc = own or (cfg.tasks.get(h.shadows) if h.shadows else None) or TaskConfig()
        if own is None and h.shadows:     # follows its head: same rows and weights, scaled loss weight
            main = by_name[h.shadows]
            main_weight = tc.weight if tc.weight >= 0 else main.loss_weight
            tc = replace(tc, weight=main_weight * h.loss_weight, metric_weight=-1.0)
        mask = tc.mask or h.mask
        if mask and mask not in spec.labels:
            where = h.name if own is not None or not h.shadows else h.shadows
            raise ConfigError(f"train.tasks.{where}.mask names label {mask!r}, the cache has "
                              f"{list(spec.labels)}", where=f"train.tasks.{where}.mask",
                              fix=f"use one of {', '.join(spec.labels)}")
        tasks.append(Task(name=h.name, labels=tuple(spec.labels.index(n) for n in h.labels),
                          mask=spec.labels.index(mask) if mask else None,
                          weight=tc.weight if tc.weight >= 0 else h.loss_weight,
                          pos_weight=tc.pos_weight or base[k],
                          metric_weight=tc.metric_weight if tc.metric_weight >= 0 else h.metric_weight,
                          focal_weight=tc.focal_weight, focal_gamma=tc.focal_gamma, focal_start=tc.focal_start))
    if not any(t.weight > 0 for t in tasks):
        raise ConfigError("every head has loss weight 0: nothing would be trained", where="train.tasks",
                          fix="give at least one head a positive weight")
    if len(tasks) > 1 and not any(t.metric_weight > 0 for t in tasks):
        raise ConfigError("every head has metric weight 0: the primary metric (early stopping, the best "
                          "checkpoint) would weigh nothing", where=f"train.tasks.{tasks[0].name}.metric_weight",
                          fix="give at least one head a positive metric_weight")
    return tuple(tasks)


def _base_pos_weights(cfg: TrainConfig, heads: Sequence[Head]) -> tuple[float, ...]:
    """train.pos_weight per head: one value for all, one per head, or one per primary head (auxiliary heads
    that shadow a head then take its value)."""
    n = len(heads)
    primary = [h.name for h in heads if not h.shadows]
    w = cfg.pos_weight if isinstance(cfg.pos_weight, tuple) else (cfg.pos_weight,) * n
    if len(w) == len(primary) and len(w) != n:
        of = dict(zip(primary, w, strict=True))
        w = tuple(of[h.shadows or h.name] for h in heads)
    if len(w) != n:
        also = f" or one per primary head ({len(primary)})" if len(primary) != n else ""
        raise ConfigError(f"train.pos_weight has {len(w)} values for {n} heads", where="train.pos_weight",
                          fix=f"give one value, one per head ({n}){also}, or set train.tasks.<head>.pos_weight")
    return tuple(float(x) for x in w)


def targets(labels: Tensor, tasks: Sequence[Task]) -> tuple[Tensor, Tensor]:
    """Label columns (B, L) -> per-head targets (B, H) and row masks (B, H) as floats (1 = counts)."""
    cols = []
    masks = []
    for t in tasks:
        y = labels[:, t.labels[0]]
        for extra in t.labels[1:]:
            y = y * labels[:, extra]
        cols.append(y)
        masks.append(labels[:, t.mask] if t.mask is not None else torch.ones_like(y))
    return torch.stack(cols, dim=1), torch.stack(masks, dim=1)


def masked_targets(labels: Tensor, tasks: Sequence[Task]) -> Tensor:
    """(B, H) targets with NaN where a head's mask drops the row (what metrics read)."""
    y, m = targets(labels, tasks)
    return torch.where(m > 0.5, y, torch.full_like(y, float("nan")))


def clip_at(step: int, milestones: Sequence[tuple[int, float]], mode: str) -> float:
    """The pos_weight clip at `step`: piecewise = the last milestone at or before it; linear = interpolated
    between milestones (the first value before the first, the last after the last); inf without milestones
    (or, piecewise, before the first)."""
    if not milestones:
        return math.inf
    if mode == "linear":
        steps = [float(m[0]) for m in milestones]
        return float(np.interp(step, steps, [float(m[1]) for m in milestones]))
    before = [clip for at, clip in milestones if at <= step]
    return float(before[-1]) if before else math.inf


class Objective:
    """The run's loss: `objective(output, labels)` -> scalar tensor (no host sync).

    `at_step(step)` before each step applies the step-dependent parts: the pos_weight clip schedule
    (`train.pos_weight_clip`) and the focal terms that start at a step.
    """

    def __init__(self, tasks: Sequence[Task], device: torch.device, clip: Sequence[tuple[int, float]] = (),
                 clip_mode: str = "piecewise") -> None:
        self.tasks = tuple(tasks)
        self.weights = torch.tensor([t.weight for t in tasks], dtype=torch.float32, device=device)
        self.base_pos_weight = torch.tensor([t.pos_weight for t in tasks], dtype=torch.float32, device=device)
        self.pos_weight = self.base_pos_weight.clone()
        self.clip, self.clip_mode = tuple(clip), clip_mode
        self.focal = [k for k, t in enumerate(tasks) if t.focal_weight > 0]
        self.step = 0
        self._clip_now = math.inf
        # a torchrun job sets this: (H,) rows each head counts on this rank -> the mean over ranks, so a
        # masked head's loss is its mean over the global batch's kept rows, as in one process (DDP then
        # averages the ranks' gradients); None: one process, or no head has a mask (rows_share weights the means)
        self.global_count: Callable[[Tensor], Tensor] | None = None
        self.min_count = 1.0
        # a torchrun job's share of this step's global batch: world_size * its rows / the batch's rows (1 where
        # the batch splits evenly; not for a batch size that is no multiple of the ranks, or the ragged last
        # batch of an unshuffled view). Means over this rank's rows are scaled by it, so DDP's average of the
        # ranks' gradients is the one-process gradient of the whole batch
        self.rows_share = 1.0

    def count_over_ranks(self, mean: Callable[[Tensor], Tensor], world_size: int) -> None:
        """In a job of `world_size` ranks, count each head's rows as `mean` (the ranks' mean) makes them. The
        least non-zero count is then 1 / world_size: clamped at 1, a global batch keeping fewer rows than
        there are ranks divided its loss by 1 instead of n / world_size."""
        self.global_count = mean
        self.min_count = 1.0 / world_size

    def _count(self, m: Tensor) -> Tensor:
        """(H,) denominators of the per-head means: this batch's kept rows (the ranks' mean in a job)."""
        counts = m.sum(dim=0)
        if self.global_count is not None:
            counts = self.global_count(counts)
        return counts.clamp(min=self.min_count)

    def at_step(self, step: int) -> None:
        self.step = step
        clip = clip_at(step, self.clip, self.clip_mode)
        # recomputed on the device when the clip moves (every step of a linear ramp): a clamp by a Python float
        # needs no host-to-device copy, which on a GPU would synchronise each step
        if clip != self._clip_now:
            self._clip_now = clip
            torch.clamp(self.base_pos_weight, max=clip, out=self.pos_weight)

    def per_row(self, out: ModelOutput, y: Tensor) -> Tensor:
        """(B, H) BCE of every row and head (pos_weight applied), from logits or log-probabilities."""
        if out.log_probs is not None:
            log_p = out.log_probs.float()
            return -(self.pos_weight * y * log_p + (1.0 - y) * log1mexp(log_p))
        return F.binary_cross_entropy_with_logits(out.logits.float(), y, pos_weight=self.pos_weight,
                                                  reduction="none")

    def per_head(self, out: ModelOutput, labels: Tensor) -> Tensor:
        """(H,) mean loss of each head over the rows its mask keeps (0 for a head with no such row)."""
        y, m = targets(labels, self.tasks)
        return (self.per_row(out, y) * m).sum(dim=0) / self._count(m)

    def __call__(self, out: ModelOutput, labels: Tensor) -> Tensor:
        y, m = targets(labels, self.tasks)
        bce = self.per_row(out, y)                                             # (B, H)
        counts = self._count(m)
        per_head = (bce * m).sum(dim=0) / counts
        loss = (per_head * self.weights).sum()
        for k in self.focal:
            t = self.tasks[k]
            if self.step >= t.focal_start:
                loss = loss + t.focal_weight * self._focal(out, bce, y, m, k, t.focal_gamma, counts[k])
        if self.rows_share != 1.0 and self.global_count is None:
            loss = loss * self.rows_share          # the heads' means were over this rank's rows only
        for aux in out.aux_losses.values():        # a model's own means, over this rank's rows
            loss = loss + (aux.float() * self.rows_share if self.rows_share != 1.0 else aux.float())
        return loss

    @staticmethod
    def _focal(out: ModelOutput, bce: Tensor, y: Tensor, m: Tensor, k: int, gamma: float, count: Tensor) -> Tensor:
        """mean over the head's rows of (1 - p_t)^gamma * BCE, the factor from a detached fp32 probability."""
        with torch.no_grad():
            if out.log_probs is not None:
                p = out.log_probs[:, k].float().exp()
            else:
                p = torch.sigmoid(out.logits[:, k].float())
            p_t = torch.where(y[:, k] > 0.5, p, 1.0 - p)
            factor = (1.0 - p_t).pow(gamma)
        return (factor * bce[:, k] * m[:, k]).sum() / count


def task_gradients(objective: Objective, out: ModelOutput, labels: Tensor,
                   params: Sequence[torch.nn.Parameter]) -> dict[str, Tensor]:
    """Each head's gradient norm over the dense parameters at least two heads reach, and the cosine between
    every pair of heads' gradients there (on the device: no sync). Costs one extra backward per head.

    Only heads with a loss weight count; the graph is kept for the step's own backward.
    """
    per_head = objective.per_head(out, labels)
    live = [k for k, t in enumerate(objective.tasks) if t.weight > 0]
    grads: list[list[Tensor | None]] = []
    for k in live:
        g = torch.autograd.grad(per_head[k], list(params), retain_graph=True, allow_unused=True)
        grads.append(list(g))
    shared = [i for i in range(len(params)) if sum(g[i] is not None for g in grads) >= 2]
    if not shared:
        return {}
    flat = [torch.cat([g[i].reshape(-1) if g[i] is not None else params[i].new_zeros(params[i].numel())
                       for i in shared]) for g in grads]
    stats: dict[str, Tensor] = {}
    names = [objective.tasks[k].name for k in live]
    for name, v in zip(names, flat, strict=True):
        stats[f"grad_norm.{name}"] = v.norm().detach()
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            cos = torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)
            stats[f"grad_cos.{names[a]}.{names[b]}"] = cos.detach()
    return stats
