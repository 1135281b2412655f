"""Stage 4 shared layer: hand-written backward passes for the CPU hot spots: DCN v2's cross tower, and the
layers that read a concatenated input (the output head, the MLP's first layer).

On a CPU at fp32 a training step is GEMMs plus elementwise passes over (B, width) activations, and each pass
costs about as much as reading and writing those tensors once. Autograd's generic backward makes more passes
than these layers need: it gives every partial gradient of x0 its own tensor and adds them up afterwards,
and a layer over a concatenation (the head over DCN's cross and deep parts, the first MLP layer over
embeddings and raw numerics) needs the concatenation and a contiguous copy of its gradient's slices. The
Functions below compute the same gradients with in-place accumulation and no concatenation, and where an
input gains a column anyway they carry the bias as a weight column on a constant-1 input column (no bias
copy before the GEMM, no column sum for its gradient). Per-piece A/B figures: benchmarks/bench_kernels.py.
They are used only on a CPU (`cpu_kernel_dtype`): in fp32, and under bf16 autocast in bf16 (inputs and
weights cast once on the way in, as autocast would cast them, the same maths in bf16 GEMMs and elementwise
passes; the parameters' gradients come back in fp32 through those casts). On a GPU or under fp16 the models
keep plain torch ops, which are fast there and which torch.compile fuses anyway. One rule for export: no
autograd.Function while tracing (`eager_kernels`): a traced graph cannot record a Python Function, and
serving needs no backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor


def eager_kernels() -> bool:
    """Whether hand-written autograd Functions may run: not under torch.jit.trace or torch.export (the
    TorchScript and ONNX exports of serve/export.py), whose graphs cannot hold a Python Function (and whose
    Python loops over row chunks would fix the batch size); they only speed up training's backward anyway."""
    return not (torch.jit.is_tracing() or torch.compiler.is_exporting())


def cpu_kernel_dtype(*tensors: Tensor) -> torch.dtype | None:
    """The dtype the hand-written CPU paths run in for `tensors` (fp32, on the CPU): fp32 without autocast,
    bf16 under CPU bf16 autocast; None where they do not apply (another device or dtype, fp16, tracing)."""
    if not eager_kernels() or not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


def _cast(dtype: torch.dtype, tensors: Sequence[Tensor]) -> tuple[AbstractContextManager[object], list[Tensor]]:
    """The tensors in `dtype` (autograd records the casts), and a context that turns CPU autocast off for
    the Function: its inputs already have the dtype autocast would give them."""
    if dtype == torch.float32:
        return nullcontext(), list(tensors)
    return torch.autocast("cpu", enabled=False), [t.to(dtype) for t in tensors]


# The tower runs on x0 widened by at least one column, to a multiple of PAD_TO floats:
# - column `dim` holds a constant 1 and each W_l gets its bias b_l as column `dim`, so x_l W_l^T includes the
#   bias and dh^T x_l includes its gradient: no bias copy before each GEMM and no column sum after it;
# - the other new columns are 0: MKL's fp32 GEMMs on AVX-512 run the 3 layers faster at a width that is a
#   multiple of 16 floats (benchmarks/bench_kernels.py times 432 against 430).
# Row `dim` and the rows after it of every widened W_l are 0, so h is 0 there and x_{l+1} = x0 * h + x_l keeps
# the constant column at 1 and the zero columns at 0 through every layer: the maths is unchanged.
PAD_TO = 16


def _widen(t: Tensor, extra: int, one: bool) -> Tensor:
    """(B, d) -> (B, d + extra): new columns 0, column d 1 if `one`; one pass (F.pad fills everything first)."""
    out = t.new_empty(t.shape[0], t.shape[1] + extra)
    out[:, :t.shape[1]].copy_(t)
    out[:, t.shape[1]:].zero_()
    if one:
        out[:, t.shape[1]].fill_(1.0)
    return out


class _FullCrossTower(torch.autograd.Function):
    """x_{l+1} = x0 * (x_l W_l^T + b_l) + x_l for every layer l, with x_0 = x0. Inputs: x0, W_1, b_1, ...

    Runs at the widened width (see PAD_TO above); the output is the (B, dim) view of the real columns.
    """

    @staticmethod
    def forward(ctx, x0: Tensor, *params: Tensor) -> Tensor:  # noqa: ANN001 - autograd's ctx
        dim = x0.shape[1]
        wide = dim + 1 + (-(dim + 1) % PAD_TO)
        x0 = _widen(x0, wide - dim, one=True)
        weights = []
        for w, b in zip(params[0::2], params[1::2], strict=True):
            w_wide = w.new_zeros(wide, wide)
            w_wide[:dim, :dim] = w
            w_wide[:dim, dim] = b                                         # the bias, on the constant column
            weights.append(w_wide)
        xs, hs = [], []
        x = x0
        for w_wide in weights:
            h = x.mm(w_wide.t())                                          # (B, wide), bias included
            xs.append(x)
            hs.append(h)
            x = torch.addcmul(x, x0, h)                                   # one pass for x0 * h + x
        ctx.dim = dim
        ctx.save_for_backward(x0, *weights, *xs, *hs)
        return x[:, :dim]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        dim = ctx.dim
        saved = ctx.saved_tensors
        n = (len(saved) - 1) // 3
        x0, weights, xs, hs = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:]
        # dL/dx_{l+1}, ours to overwrite; what its extra columns pick up on the way down is discarded
        g = _widen(grad, x0.shape[1] - dim, one=False)
        grads: list[Tensor] = []
        dx0: Tensor | None = None
        for layer in reversed(range(n)):
            w, x, h = weights[layer], xs[layer], hs[layer]
            dh = g * x0                                                   # dL/dh_l
            if dx0 is None:
                dx0 = g * h
            else:
                dx0.addcmul_(g, h)                                        # x0's part, summed in place
            dw = dh.t().mm(x)                                             # dL/dW_l (out, in); bias: column dim
            grads[:0] = [dw[:dim, :dim].contiguous(), dw[:dim, dim].contiguous()]
            g.addmm_(dh, w)                                               # dL/dx_l = g (residual) + dh W_l
        assert dx0 is not None
        dx0.add_(g)                                                       # the first layer's x_l is x0
        return (dx0[:, :dim], *grads)


def full_cross_tower(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """DCN-V2's full-rank cross layers applied to x0 (B, dim), with the hand-written backward, in `dtype`
    (`cpu_kernel_dtype`; in bf16 the whole tower, residual stream included, runs in bf16)."""
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    context, (x0, *params) = _cast(dtype, [x0, *params])
    with context:
        return _FullCrossTower.apply(x0, *params)


NARROW = 32   # a part at most this wide (raw numerics) is "narrow": see _LinearOverParts


class _LinearOverParts(torch.autograd.Function):
    """concat(parts) W^T + b without the concatenation. Inputs: W (T, sum of widths), b (T,), parts...

    When the last of several parts is narrow (the raw numerics beside the embeddings), it gets a constant-1
    column and the bias rides in its GEMM as one more weight column, as in the cross tower above: no bias copy
    before the first GEMM and no column sum for the bias gradient. A narrow part's weight gradient is
    computed as (part^T grad)^T: MKL is much slower at a (T, 13) = grad^T part product over a large batch
    than the other way round.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, *parts: Tensor) -> Tensor:  # noqa: ANN001
        widths = [p.shape[1] for p in parts]
        w_parts = list(weight.split(widths, dim=1))
        fold = len(parts) > 1 and widths[-1] <= NARROW
        if fold:
            last = parts[-1]
            parts = (*parts[:-1], torch.cat([last, last.new_ones(last.shape[0], 1)], dim=1))
            w_parts[-1] = torch.cat([w_parts[-1], bias.unsqueeze(1)], dim=1)
            out = parts[0].mm(w_parts[0].t())
        else:
            out = torch.addmm(bias, parts[0], w_parts[0].t())
        for p, w in zip(parts[1:], w_parts[1:], strict=True):
            out.addmm_(p, w.t())
        ctx.widths, ctx.fold = widths, fold
        ctx.save_for_backward(*w_parts, *parts)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        n = len(ctx.widths)
        saved = ctx.saved_tensors
        w_parts, parts = saved[:n], saved[n:]
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        # one output column (a single task): dL/dpart is an outer product, which a broadcast multiply does
        # several times faster than a K=1 GEMM; parts that need no gradient (raw numerics) get none
        d_parts = [(grad * w[:, :width] if grad.shape[1] == 1 else grad.mm(w[:, :width])) if need else None
                   for w, width, need in zip(w_parts, ctx.widths, needs[2:], strict=True)]
        d_weight = d_bias = None
        if needs[0] or needs[1]:
            d_ws = [p.t().mm(grad).t() if p.shape[1] <= NARROW + 1 else grad.t().mm(p) for p in parts]
            if ctx.fold:
                d_bias = d_ws[-1][:, -1].contiguous()
                d_ws[-1] = d_ws[-1][:, :-1]
            else:
                d_bias = grad.sum(0)
            d_weight = torch.cat(d_ws, dim=1)
        return (d_weight if needs[0] else None, d_bias if needs[1] else None, *d_parts)


def linear_over_parts(weight: Tensor, bias: Tensor, parts: Sequence[Tensor],
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """`F.linear(torch.cat(parts, 1), weight, bias)` with the hand-written backward and no concatenation, in
    `dtype` (`cpu_kernel_dtype`)."""
    if not eager_kernels():
        return torch.nn.functional.linear(torch.cat(list(parts), 1), weight, bias)
    context, (weight, bias, *parts) = _cast(dtype, [weight, bias, *parts])
    with context:
        return _LinearOverParts.apply(weight, bias, *parts)
