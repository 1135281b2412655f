"""Stage 5: optimiser groups (embedding tables vs dense layers) and the learning-rate schedule.

Embedding tables get their own optimizer (sparse gradients for lazy_adam/sgd/adagrad/sparse_adam: only the rows
a batch touched are updated); everything else gets AdamW with weight decay on weight matrices only (`no_decay_ids`).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctrpipe.native import native
from ctrpipe.train.config import TrainConfig
from ctrpipe.train.tables import zeros_like_lazily


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
        if kind == "lazy_adam":
            out.append(LazyAdam(emb, lr=emb_lr))
        elif kind == "sgd":
            out.append(torch.optim.SGD(emb, lr=emb_lr))
        elif kind == "adagrad":
            out.append(torch.optim.Adagrad(emb, lr=emb_lr))
        elif kind == "sparse_adam":
            out.append(torch.optim.SparseAdam(emb, lr=emb_lr))
        else:
            # fused: one pass over the table per step (the default for-loop kernel makes ~5 passes)
            out.append(torch.optim.Adam(emb, lr=emb_lr, fused=device.type in ("cuda", "cpu")))
    if dense:
        kept = no_decay_ids(model)
        decay = [p for p in dense if p.dim() >= 2 and id(p) not in kept]
        no_decay = [p for p in dense if p.dim() < 2 or id(p) in kept]
        param_groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}]
        # fused kernels: one launch for all dense params on CUDA, one vectorised pass per tensor on CPU
        dense_opt = torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr,
                                      fused=device.type in ("cuda", "cpu"))
        dense_opt.ctrpipe_dense = True      # type: ignore[attr-defined]  # see is_dense
        out.append(dense_opt)
    for opt in out:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return out


#: whole-table copies of optimiser state each embedding optimiser keeps (its moments)
TABLE_MOMENTS: dict[str, int] = {"adam": 2, "sparse_adam": 2, "lazy_adam": 2, "adagrad": 1, "sgd": 0}


def least_training_bytes(model: nn.Module, cfg: TrainConfig, device: torch.device) -> int:
    """Memory a training step of `model` cannot do without, batches and activations left out: the weights,
    the dense layers' gradients and AdamW moments, each table's optimiser state (lazy_adam's on a CPU maps
    only the pages of rows it touches, so none is counted) and dense gradient (embedding_optimizer=adam),
    and the EMA copy. A model that fits in memory but not with these was ended by the OOM killer mid-run,
    without a word. Works on a meta-device model."""
    from ctrpipe.models.layers.embedding import split_parameters  # lazy: the zoo pulls in more torch code

    groups = split_parameters(model)
    dense = sum(p.numel() * p.element_size() for p in groups.dense)
    tables = sum(p.numel() * p.element_size() for p in groups.embedding)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    kind = cfg.embedding_optimizer
    moments = 0 if kind == "lazy_adam" and device.type == "cpu" else TABLE_MOMENTS[kind]
    ema = 1 if cfg.ema > 0 else 0
    return dense * (4 + ema) + tables * (1 + ema + moments + (kind == "adam")) + buffers


def is_dense(opt: torch.optim.Optimizer) -> bool:
    """Whether `opt` is build_optimizers' dense AdamW (not the embedding tables' optimiser)."""
    return bool(getattr(opt, "ctrpipe_dense", False))


def no_decay_ids(model: nn.Module) -> set[int]:
    """ids of the dense parameters weight decay leaves alone beyond vectors (biases, norm scales): any named
    `bias` (DCN's stacked cross biases are (layers, dim)), and those a module lists in `NO_WEIGHT_DECAY`
    (embedding-like: the numeric tokenizer's per-column vectors, FT-Transformer's [CLS] token), as the id
    tables themselves are not decayed."""
    out: set[int] = set()
    for module in model.modules():
        listed = set(getattr(module, "NO_WEIGHT_DECAY", ()))
        out |= {id(p) for name, p in module.named_parameters(recurse=False) if name == "bias" or name in listed}
    return out


def lr_factor(step: int, total_steps: int, cfg: TrainConfig, warmup_steps: int | None = None) -> float:
    """Multiplier of the base rate for optimiser step `step` (0-based): linear warm-up, then the schedule.

    `warmup_steps` overrides cfg.warmup_steps (the run's plan shortens it on short runs, see plan.py).
    """
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    after = step - warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (after // cfg.step_every)
    span = max(1, total_steps - warmup - 1)    # cosine reaches min_lr_ratio at the last step
    progress = min(1.0, after / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor


class LazyAdam(torch.optim.Optimizer):
    """Adam for embedding tables that reads and writes only the rows a batch touched ("lazy" Adam).

    A sparse gradient (uncoalesced COO from `nn.Embedding(sparse=True)`) is reduced to its unique rows, then
    the usual Adam moments and update are applied to those rows alone, as whole tensors: a step costs
    O(rows touched x dim), not O(table). Untouched rows keep their weights and moments (their momentum does
    not keep moving them, unlike dense Adam); bias correction uses the global step, as SparseAdam does.
    Unlike torch.optim.SparseAdam it never coalesces (sorts) the gradient on CPU: duplicates are found with
    a scatter into a per-table int32 scratch array (4 bytes per row), which is far cheaper than a sort of
    B x fields ids on a busy CPU. With the compiled kernel (`ctrpipe/_native.c`) a CPU table's whole step --
    deduplication, gradient sums, moments, update -- is one pass over the batch's ids; without it, numpy and
    torch do the same in several passes (benchmarks/bench_kernels.py compares the two). The kernel runs on one
    thread on purpose: split over 2 threads it was faster alone but slower inside a training step, where
    torch's OpenMP worker still spins on the other core after the last GEMM.
    Dense gradients get a plain full-table Adam step.

    State per table: exp_avg and exp_avg_sq, each shaped like the table but mapped lazily: only the rows a run
    touches take memory (checkpoints store just those rows, see tables.py).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),  # noqa: ANN001
                 eps: float = 1e-8) -> None:
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0:
            raise ValueError(f"bad LazyAdam hyper-parameters lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        # id(param) -> int32 (rows,) scratch, all -1 between steps (both CPU paths keep it so); never saved
        self._scratch: dict[int, np.ndarray] = {}
        # (ids, rows, inverse) of the last table deduplicated in this step: tables looked up with the same ids
        # (e.g. DeepFM's embeddings and its first-order weights) share one deduplication
        self._dedup: tuple[Tensor, Tensor, Tensor] | None = None

    # GradScaler (train.amp=fp16) hands the step its scale and an inf/NaN flag as device tensors (grad_scale,
    # found_inf) instead of reading the flag with .item() to skip the step: a host sync in every step
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's Optimizer signature
        loss = closure() if closure is not None else None
        self._dedup = None
        scale: Tensor | None = getattr(self, "grad_scale", None)     # gradients still multiplied by it
        found_inf: Tensor | None = getattr(self, "found_inf", None)  # > 0: skip this step
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._sync_free(p):
                    self._device_step(p, group, scale, found_inf)
                    continue
                if found_inf is not None and bool(found_inf):    # on the CPU reading the flag costs nothing
                    continue
                self._host_step(p, group, None if scale is None else float(scale.double().reciprocal()))
        self._dedup = None
        return loss

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            # lazily mapped zeros: only rows a batch touches ever cost memory or page faults
            state["exp_avg"] = zeros_like_lazily(p.detach())
            state["exp_avg_sq"] = zeros_like_lazily(p.detach())
        return state

    def _host_step(self, p: Tensor, group: dict[str, Any], inv_scale: float | None) -> None:
        """One table's step where reading values on the host is free (CPU tables)."""
        beta1, beta2 = group["betas"]
        state = self._state(p)
        state["step"] += 1
        step = float(state["step"])
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        m, v = state["exp_avg"], state["exp_avg_sq"]
        kernel = self._kernel_for(p, m, v) if p.grad.is_sparse else None
        if kernel is not None:
            ids = p.grad._indices()[0].contiguous()
            values = p.grad._values().contiguous().reshape(ids.shape[0], p.shape[1])   # 0 rows: no -1
            if inv_scale is not None:
                values = values * inv_scale
            kernel.sparse_adam(p.detach().numpy(), m.numpy(), v.numpy(), ids.numpy(), values.numpy(),
                               self._scratch_for(p), p.shape[1], -group["lr"] / bc1, beta1, beta2,
                               group["eps"], bc2)
        elif p.grad.is_sparse:
            rows, grad = self._unique_rows(p, p.grad)
            if inv_scale is not None:
                grad = grad * inv_scale
            m_rows = m.index_select(0, rows).lerp_(grad, 1.0 - beta1)
            v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            m.index_copy_(0, rows, m_rows)
            v.index_copy_(0, rows, v_rows)
            denom = v_rows.div_(bc2).sqrt_().add_(group["eps"])
            # read-modify-write the rows (index_add_ with alpha takes a much slower CPU path than this
            # select + addcdiv + copy)
            p_rows = p.index_select(0, rows).addcdiv_(m_rows, denom, value=-group["lr"] / bc1)
            p.index_copy_(0, rows, p_rows)
        else:
            grad = p.grad if inv_scale is None else p.grad * inv_scale
            m.lerp_(grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (v / bc2).sqrt_().add_(group["eps"])
            p.addcdiv_(m, denom, value=-group["lr"] / bc1)

    def _device_step(self, p: Tensor, group: dict[str, Any], scale: Tensor | None,
                     found_inf: Tensor | None) -> None:
        """One table's step with nothing read back to the host (GPU tables): the step count and bias
        corrections stay on the device, and a step GradScaler flags as overflowed keeps the old rows, moments
        and count (selected, not branched on). Every occurrence of a row writes the same values."""
        beta1, beta2 = group["betas"]
        state = self._state(p)
        if state["step"].device != p.device:      # first step, or moved by a checkpoint load
            state["step"] = state["step"].to(p.device)
        keep = None if found_inf is None else found_inf.to(p.device) == 0
        state["step"] += 1 if keep is None else keep.to(state["step"].dtype)
        step = state["step"]
        bc1 = 1.0 - torch.pow(beta1, step)
        bc2 = 1.0 - torch.pow(beta2, step)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if p.grad.is_sparse:
            rows, grad = self._unique_rows(p, p.grad)
        else:
            rows, grad = None, p.grad
        if scale is not None:
            grad = grad * scale.double().reciprocal().float().to(p.device)
        if rows is None and keep is None:          # a dense gradient, nothing to select: in place
            m.lerp_(grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            p.addcdiv_(m * (-group["lr"] / bc1), (v / bc2).sqrt_().add_(group["eps"]))
            return
        m_old = m if rows is None else m.index_select(0, rows)
        v_old = v if rows is None else v.index_select(0, rows)
        p_old = p if rows is None else p.index_select(0, rows)
        m_new = m_old.lerp(grad, 1.0 - beta1)
        v_new = (v_old * beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = (v_new / bc2).sqrt_().add_(group["eps"])
        p_new = p_old.addcdiv(m_new * (-group["lr"] / bc1), denom)
        if keep is not None:
            m_new, v_new, p_new = (torch.where(keep, new, old) for new, old in
                                   ((m_new, m_old), (v_new, v_old), (p_new, p_old)))
        if rows is None:
            m.copy_(m_new)
            v.copy_(v_new)
            p.copy_(p_new)
        else:
            m.index_copy_(0, rows, m_new)
            v.index_copy_(0, rows, v_new)
            p.index_copy_(0, rows, p_new)

    @staticmethod
    def _kernel_for(p: Tensor, m: Tensor, v: Tensor) -> ModuleType | None:
        """The compiled kernel, if built and this table suits it (CPU, fp32, 2-d, contiguous with its moments)."""
        kernel = native()
        if kernel is None or p.device.type != "cpu" or p.dim() != 2 or p.grad.dtype != torch.float32:
            return None
        ok = all(t.is_contiguous() and t.dtype == torch.float32 for t in (p, m, v))
        return kernel if ok else None

    def _scratch_for(self, p: Tensor) -> np.ndarray:
        """Table p's int32 (rows,) scratch array, all -1 between uses."""
        scratch = self._scratch.get(id(p))
        if scratch is None or scratch.shape[0] != p.shape[0]:
            scratch = self._scratch[id(p)] = np.full(p.shape[0], -1, dtype=np.int32)
        return scratch

    @staticmethod
    def _sync_free(t: Tensor) -> bool:
        """Step without reading anything back (no data-dependent sizes, no flags): on GPUs, where each read
        costs a host sync."""
        return t.device.type != "cpu"

    def _unique_rows(self, p: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Row ids and (rows, dim) their summed gradients, from an uncoalesced sparse gradient: distinct rows on
        the CPU; on a GPU every occurrence with its row's sum (see `occurrence_sums`)."""
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        idx = grad._indices()[0]
        values = grad._values()
        if self._sync_free(idx):
            return idx, occurrence_sums(idx, values)
        prev = self._dedup
        if prev is not None and prev[0].shape == idx.shape and torch.equal(prev[0], idx):
            rows, inverse = prev[1], prev[2]
        else:
            scratch = self._scratch_for(p)
            pos_idx = idx.numpy()
            n = pos_idx.shape[0]
            scratch[pos_idx] = np.arange(n, dtype=np.int32)  # serial scatter: one occurrence wins per row
            rep = scratch[pos_idx]                            # (n,) the winning occurrence of each id's row
            first = rep == np.arange(n, dtype=np.int32)       # exactly one True per distinct row
            compact = np.cumsum(first, dtype=np.int64) - 1    # occurrence -> its row's slot if it won
            scratch[pos_idx] = -1                             # leave it as found (the kernel relies on it)
            inverse = torch.from_numpy(compact[rep])
            rows = torch.from_numpy(pos_idx[first])           # numpy mask: cheaper than torch's nonzero
        self._dedup = (idx, rows, inverse)
        if values.shape[1] == 1 and values.device.type == "cpu" and values.dtype == torch.float32:
            # one column (first-order weights): a weighted bincount sums it far faster than index_add_'s
            # per-row loop (float64 accumulation, rounded once)
            summed = np.bincount(inverse.numpy(), weights=values.numpy()[:, 0], minlength=rows.shape[0])
            return rows, torch.from_numpy(summed.astype(np.float32)).unsqueeze(1)
        grad_rows = values.new_zeros((rows.shape[0], values.shape[1]))
        grad_rows.index_add_(0, inverse, values)
        return rows, grad_rows


def occurrence_sums(idx: Tensor, values: Tensor) -> Tensor:
    """(n, dim): for each of the n gradient occurrences, the sum of `values` over every occurrence of its row.

    The GPU form of deduplication: `torch.unique` has a data-dependent size, which costs a host sync per table
    per step. Here the shapes stay n: occurrences of one row read the same old state and the same summed
    gradient, so LazyAdam's update writes identical values for each of them, whichever write lands."""
    order = torch.argsort(idx)
    ranked = idx[order]
    first = torch.ones_like(ranked, dtype=torch.bool)
    first[1:] = ranked[1:] != ranked[:-1]
    segment = torch.empty_like(idx)
    segment[order] = torch.cumsum(first, 0) - 1                 # each occurrence's row, numbered 0..U-1
    sums = values.new_zeros(values.shape).index_add_(0, segment, values)
    return sums[segment]
