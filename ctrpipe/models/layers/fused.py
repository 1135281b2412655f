"""Stage 4 shared layer: hand-written backward passes for the CPU hot spots of DCN v2's cross tower and of the
output head.

On a CPU at fp32 a training step is GEMMs plus elementwise passes over (B, width) activations, and each pass
costs about as much as reading and writing those tensors once. Autograd's generic backward makes more passes
than these layers need: it gives every partial gradient of x0 its own tensor and adds them up afterwards,
and a layer over a concatenation (the head over DCN's cross and deep parts, the first MLP layer over
embeddings and raw numerics) needs the concatenation and a contiguous copy of its gradient's slices. The
Functions below compute the same gradients with in-place accumulation and no concatenation (DCN v2 on
Criteo-like data: see the README's training figures). They are used only where `cpu_fp32` holds; on a GPU
or under autocast the models keep plain torch ops, which are fast there and which torch.compile fuses anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def cpu_fp32(*tensors: Tensor) -> bool:
    """Whether the hand-written CPU paths apply: every tensor fp32 on the CPU and no CPU autocast."""
    return not torch.is_autocast_enabled("cpu") and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


# MKL's fp32 GEMMs at batch 4096 on AVX-512: the 3 cross layers run ~5% faster at width 432 than at 429
# (interleaved A/B, benchmarks/bench_kernels.py), so the tower pads its width to a multiple of 16 floats. Zero
# columns stay zero through every layer (x0 * h + x is 0 there) and get no gradient: the maths is unchanged.
PAD_TO = 16


def _pad_columns(t: Tensor, extra: int) -> Tensor:
    """(B, d) -> (B, d + extra) with zero columns at the end; one pass (F.pad zero-fills the whole tensor first)."""
    out = t.new_empty(t.shape[0], t.shape[1] + extra)
    out[:, :t.shape[1]].copy_(t)
    out[:, t.shape[1]:].zero_()
    return out


class _FullCrossTower(torch.autograd.Function):
    """x_{l+1} = x0 * (x_l W_l^T + b_l) + x_l for every layer l, with x_0 = x0. Inputs: x0, W_1, b_1, ...

    Runs at the width padded to a multiple of PAD_TO; the output is the unpadded (B, dim) view.
    """

    @staticmethod
    def forward(ctx, x0: Tensor, *params: Tensor) -> Tensor:  # noqa: ANN001 - autograd's ctx
        dim = x0.shape[1]
        extra = -dim % PAD_TO
        if extra:
            x0 = _pad_columns(x0, extra)
            params = tuple(nn.functional.pad(t, (0, extra, 0, extra) if t.dim() == 2 else (0, extra))
                           for t in params)
        xs, hs = [], []
        x = x0
        for w, b in zip(params[0::2], params[1::2], strict=True):
            h = torch.addmm(b, x, w.t())                                  # (B, padded dim)
            xs.append(x)
            hs.append(h)
            x = torch.addcmul(x, x0, h)                                   # one pass for x0 * h + x
        ctx.n_layers, ctx.dim = len(hs), dim
        ctx.save_for_backward(x0, *params, *xs, *hs)
        return x[:, :dim] if extra else x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        n, dim = ctx.n_layers, ctx.dim
        saved = ctx.saved_tensors
        x0, params, xs, hs = saved[0], saved[1:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n], saved[1 + 3 * n:]
        extra = x0.shape[1] - dim
        # dL/dx_{l+1}; ours to overwrite, except the incoming gradient itself (unpadded case, last layer)
        g = _pad_columns(grad, extra) if extra else grad.contiguous()
        owned = extra > 0
        grads: list[Tensor | None] = [None] * (2 * n)
        dx0: Tensor | None = None
        for layer in reversed(range(n)):
            w, x, h = params[2 * layer], xs[layer], hs[layer]
            dh = g * x0                                                   # dL/dh_l
            if dx0 is None:
                dx0 = g * h
            else:
                dx0.addcmul_(g, h)                                        # x0's part, summed in place
            grads[2 * layer] = dh.t().mm(x)                               # dL/dW_l (out, in)
            grads[2 * layer + 1] = dh.sum(0)
            # dL/dx_l = g (the residual) + dh W_l
            g = g.addmm_(dh, w) if owned else torch.addmm(g, dh, w)
            owned = True
        assert dx0 is not None
        dx0.add_(g)                                                       # the first layer's x_l is x0
        if extra:
            dx0 = dx0[:, :dim]
            grads = [t[:dim, :dim].contiguous() if t.dim() == 2 else t[:dim].contiguous() for t in grads]
        return (dx0, *grads)


def full_cross_tower(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """DCN-V2's full-rank cross layers applied to x0 (B, dim), with the hand-written backward."""
    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    return _FullCrossTower.apply(x0, *params)


class _LinearOverParts(torch.autograd.Function):
    """concat(parts) W^T + b without the concatenation. Inputs: W (T, sum of widths), b (T,), parts..."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, *parts: Tensor) -> Tensor:  # noqa: ANN001
        widths = [p.shape[1] for p in parts]
        w_parts = weight.split(widths, dim=1)
        out = torch.addmm(bias, parts[0], w_parts[0].t())
        for p, w in zip(parts[1:], w_parts[1:], strict=True):
            out.addmm_(p, w.t())
        ctx.widths = widths
        ctx.save_for_backward(weight, *parts)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        weight, *parts = ctx.saved_tensors
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        w_parts = weight.split(ctx.widths, dim=1)
        # one output column (a single task): dL/dpart is an outer product, which a broadcast multiply does
        # several times faster than a K=1 GEMM; parts that need no gradient (raw numerics) get none
        d_parts = [(grad * w if grad.shape[1] == 1 else grad.mm(w)) if need else None
                   for w, need in zip(w_parts, needs[2:], strict=True)]
        d_weight = torch.cat([grad.t().mm(p) for p in parts], dim=1) if needs[0] else None
        return (d_weight, grad.sum(0) if needs[1] else None, *d_parts)


def linear_over_parts(weight: Tensor, bias: Tensor, parts: Sequence[Tensor]) -> Tensor:
    """`F.linear(torch.cat(parts, 1), weight, bias)` with the hand-written backward and no concatenation."""
    return _LinearOverParts.apply(weight, bias, *parts)
