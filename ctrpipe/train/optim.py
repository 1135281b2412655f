"""Stage 5: optimiser groups (embedding tables vs dense layers) and the learning-rate schedule.

Embedding tables get their own optimizer (sparse gradients for sgd/adagrad/sparse_adam: only the rows a batch
touched are updated); everything else gets AdamW with weight decay on matrices only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctrpipe.train.config import TrainConfig


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """[embedding optimizer (if the model has tables), dense AdamW (if it has dense params)].

    Each param group keeps its undecayed rate in `base_lr`; `set_lr` scales it by the schedule.
    """
    from ctrpipe.models.layers.embedding import split_parameters  # lazy: the zoo pulls in more torch code

    groups = split_parameters(model)
    emb = [p for p in groups.embedding if p.requires_grad]
    dense = [p for p in groups.dense if p.requires_grad]
    emb_lr = cfg.embedding_lr or cfg.lr
    out: list[torch.optim.Optimizer] = []
    if emb:
        kind = cfg.embedding_optimizer
        if kind == "sgd":
            out.append(torch.optim.SGD(emb, lr=emb_lr))
        elif kind == "adagrad":
            out.append(torch.optim.Adagrad(emb, lr=emb_lr))
        elif kind == "sparse_adam":
            out.append(torch.optim.SparseAdam(emb, lr=emb_lr))
        else:
            out.append(torch.optim.Adam(emb, lr=emb_lr))
    if dense:
        decay = [p for p in dense if p.dim() >= 2]       # matrices; biases and norm scales are not decayed
        no_decay = [p for p in dense if p.dim() < 2]
        param_groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}]
        # fused kernels: one launch for all dense params on CUDA; the default (foreach) elsewhere
        out.append(torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr,
                                     fused=True if device.type == "cuda" else None))
    for opt in out:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return out


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base rate for optimiser step `step` (0-based): linear warm-up, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    after = step - cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (after // cfg.step_every)
    span = max(1, total_steps - cfg.warmup_steps - 1)    # cosine reaches min_lr_ratio at the last step
    progress = min(1.0, after / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
