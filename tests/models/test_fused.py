"""Hand-written backward passes (models/layers/fused.py): gradients equal autograd's over plain torch ops."""

from __future__ import annotations

import pytest
import torch

from ctrpipe.features import FeatureSpec
from ctrpipe.models.layers.cross import CrossNetV2
from ctrpipe.models.layers.fused import _FullCrossTower, _LinearOverParts, cpu_fp32
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
    assert cpu_fp32(x0, cross.layers[0].weight)
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


def test_fast_paths_stand_aside_for_other_dtypes_and_autocast():
    x = torch.randn(2, 3)
    assert cpu_fp32(x) and not cpu_fp32(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_fp32(x)
