"""Hand-written backward passes (models/layers/fused.py, fm.py, attention.py): gradients equal autograd's over
plain torch ops, in fp32 and, within bf16 rounding, under CPU bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from ctrpipe.features import FeatureSpec
from ctrpipe.models.layers.attention import FieldAttention, _chunks, _SmallAttention
from ctrpipe.models.layers.cross import CrossNetV2
from ctrpipe.models.layers.fm import fm_interaction
from ctrpipe.models.layers.fused import _FullCrossTower, _LinearOverParts, cpu_kernel_dtype
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead


def _params(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_cross_tower_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x0, w1, b1, w2, b2 = _params(*(torch.randn(s, generator=gen, dtype=torch.float64)
                                   for s in [(5, 4), (4, 4), (4,), (4, 4), (4,)]))
    assert torch.autograd.gradcheck(_FullCrossTower.apply, (x0, w1, b1, w2, b2))   # width 4: padded to 16
    x0, w1, b1 = _params(*(torch.randn(s, generator=gen, dtype=torch.float64) for s in [(3, 16), (16, 16), (16,)]))
    assert torch.autograd.gradcheck(_FullCrossTower.apply, (x0, w1, b1))           # a multiple of 16: as is


# a narrow last part (<= 32 wide) carries the bias as a weight column; (3, 40) and (40, 35) do not
@pytest.mark.parametrize("widths,tasks", [((3,), 1), ((3, 2), 1), ((3, 2, 4), 2), ((3, 40), 1), ((40, 35), 2)])
def test_linear_over_parts_gradcheck(widths: tuple[int, ...], tasks: int):
    gen = torch.Generator().manual_seed(1)
    parts = _params(*(torch.randn(5, w, generator=gen, dtype=torch.float64) for w in widths))
    w, b = _params(torch.randn(tasks, sum(widths), generator=gen, dtype=torch.float64),
                   torch.randn(tasks, generator=gen, dtype=torch.float64))
    assert torch.autograd.gradcheck(_LinearOverParts.apply, (w, b, *parts))


@pytest.mark.parametrize("dim", [12, 16])     # 12: run padded to 16 inside the tower; 16: as is
def test_cpu_cross_net_matches_the_plain_loop(dim: int):
    torch.manual_seed(0)
    cross = CrossNetV2(dim, 3, "full")
    x0 = torch.randn(32, dim, requires_grad=True)
    assert cpu_kernel_dtype(x0, cross.layers[0].weight) == torch.float32
    fast = cross(x0)
    (fast * torch.linspace(-1, 1, dim)).sum().backward()
    fast_grads = [x0.grad.clone()] + [p.grad.clone() for p in cross.parameters()]
    x0.grad = None
    cross.zero_grad()
    x = x0                                     # DCN-V2's definition, through autograd
    for layer in cross.layers:
        x = x0 * layer(x) + x
    (x * torch.linspace(-1, 1, dim)).sum().backward()
    torch.testing.assert_close(fast, x)
    for a, b in zip(fast_grads, [x0.grad] + [p.grad for p in cross.parameters()], strict=True):
        torch.testing.assert_close(a, b)


def test_output_head_reads_parts_like_their_concatenation():
    head = OutputHead(7, FeatureSpec(numeric=("I1",)))
    a, b = torch.randn(6, 3, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    out = head(a, b)
    out.sum().backward()
    grads = a.grad.clone(), b.grad.clone(), head.linear.weight.grad.clone()
    a.grad = b.grad = head.linear.weight.grad = None
    ref = torch.nn.functional.linear(torch.cat([a, b], dim=1), head.linear.weight, head.linear.bias)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, (a.grad, b.grad, head.linear.weight.grad), strict=True):
        torch.testing.assert_close(g, r)


def test_fast_paths_run_in_fp32_or_under_bf16_autocast_only():
    x = torch.randn(2, 3)
    assert cpu_kernel_dtype(x) == torch.float32 and cpu_kernel_dtype(x.double()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernel_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert cpu_kernel_dtype(x) is None


def _grads(out: torch.Tensor, weight: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """d(sum(out * weight))/d tensors, as fp32 (the hand-written and the autograd paths alike)."""
    return [g.float() for g in torch.autograd.grad((out.float() * weight).sum(), tensors)]


def _close_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Within bf16 rounding (8 mantissa bits) of each other, relative to the tensors' scale."""
    scale = b.abs().max().item()
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.03 * scale)


def test_cross_tower_under_bf16_autocast_matches_autograd():
    torch.manual_seed(0)
    cross = CrossNetV2(430, 3, "full")
    x0 = torch.randn(64, 430, requires_grad=True)
    params = [x0, *cross.parameters()]
    w = torch.linspace(-1, 1, 430)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = cross(x0)                               # the hand-written tower, in bf16
        x = x0                                         # DCN-V2's definition, through autograd under autocast
        for layer in cross.layers:
            x = x0 * layer(x) + x
    assert fast.dtype == torch.bfloat16 and fast.grad_fn is not None
    _close_bf16(fast, x)
    for a, b in zip(_grads(fast, w, *params), _grads(x, w, *params), strict=True):
        assert a.dtype == torch.float32
        _close_bf16(a, b)


@pytest.mark.parametrize("widths", [(416, 13), (64, 40)])   # narrow last part (bias folded), and not
def test_linear_over_parts_under_bf16_autocast_matches_autograd(widths: tuple[int, ...]):
    torch.manual_seed(1)
    parts = [torch.randn(128, w, requires_grad=True) for w in widths]
    lin = torch.nn.Linear(sum(widths), 400)
    params = [*parts, lin.weight, lin.bias]
    w = torch.linspace(-1, 1, 400)
    head = OutputHead(sum(widths), FeatureSpec(numeric=("I1",)))
    mlp = MLP(sum(widths), (400,), activation="gelu")   # smooth: no ReLU kink to flip between the two
    mlp.net[0] = lin
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = mlp(*parts)                             # first layer over the parts, in bf16
        ref = torch.nn.functional.gelu(lin(torch.cat(parts, dim=1)))
        one = head(*parts)                             # the head's single output column
        one_ref = head.linear(torch.cat(parts, dim=1))
    assert fast.dtype == one.dtype == torch.bfloat16
    _close_bf16(fast, ref)
    for a, b in zip(_grads(fast, w, *params), _grads(ref, w, *params), strict=True):
        _close_bf16(a, b)
    hp = [*parts, head.linear.weight, head.linear.bias]
    for a, b in zip(_grads(one, torch.ones(1), *hp), _grads(one_ref, torch.ones(1), *hp), strict=True):
        _close_bf16(a, b)


def test_fm_backward_runs_under_bf16_autocast_in_fp32():
    # fp32 on purpose: the term is a difference of two large sums, which bf16 would cancel away
    fields = torch.randn(32, 6, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fm_interaction(fields)
    assert out.dtype == torch.float32 and type(out.grad_fn).__name__ == "_FMInteractionBackward"
    total = fields.sum(dim=1)
    ref = 0.5 * ((total * total).sum(1) - (fields * fields).sum((1, 2)))
    torch.testing.assert_close(out.squeeze(1), ref)
    torch.testing.assert_close(*(torch.autograd.grad(o.sum(), fields)[0] for o in (out, ref)))


def test_small_attention_gradcheck():
    qkv = torch.randn(3, 5, 3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                      requires_grad=True)
    assert torch.autograd.gradcheck(_SmallAttention.apply, (qkv,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_small_attention_in_chunks_matches_sdpa(dtype: torch.dtype):
    # 40 fields, 1 head: chunks of 655 rows, so 1400 rows take three chunks (the last one short)
    B, F_, H, hd = 1400, 40, 1, 4
    assert len(_chunks(B, H, F_)) == 3
    qkv = torch.randn(B, F_, 3, H, hd, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, F_, H * hd)
    out = _SmallAttention.apply(qkv)
    w = torch.randn(F_, H * hd, dtype=torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(*(_grads(o, w, qkv)[0] for o in (out, ref)))
    else:                          # the reference in fp32: bf16 SDPA rounds more than the fp32 softmax here
        ref32 = _SmallAttention.apply(qkv.detach().float().requires_grad_(True))
        _close_bf16(out, ref32)


def test_field_attention_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(4)
    layer = FieldAttention(16, 8, 2)
    x = torch.randn(64, 26, 16, requires_grad=True)
    ref = layer(x)
    ref_grads = _grads(ref, torch.ones(16), x, layer.qkv.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ == "_SmallAttentionBackward"
    _close_bf16(out, ref)
    for a, b in zip(_grads(out, torch.ones(16), x, layer.qkv.weight), ref_grads, strict=True):
        _close_bf16(a, b)
