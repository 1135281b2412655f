"""Stage 4 shared layer: factorisation-machine terms (first-order linear part, second-order pairwise part)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import PoolingMode
from ctrpipe.models.layers.embedding import FieldEmbedding
from ctrpipe.models.layers.fused import eager_kernels


class _FMInteraction(torch.autograd.Function):
    """The FM term with a hand-written backward: d/dv_i = (sum_j v_j) - v_i, times the output's gradient.

    Autograd over the plain formula writes v^2, its gradient and their sum as (B, F, D) temporaries; this
    makes two passes forward (a sum and dot products) and two backward (a subtract, a scale in place).
    """

    @staticmethod
    def forward(ctx: Any, fields: Tensor) -> Tensor:
        out, total = _fm_forward(fields)
        ctx.save_for_backward(fields, total)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        fields, total = ctx.saved_tensors
        return (total.unsqueeze(1) - fields).mul_(grad.view(-1, 1, 1))


def _fm_forward(fields: Tensor) -> tuple[Tensor, Tensor]:
    """(B, F, D) -> the FM term (B, 1) and the field sum (B, D)."""
    total = fields.sum(dim=1)                                              # (B, D)
    flat = fields.flatten(1)        # not reshape(B, -1): a traced export of it failed on a batch of no rows
    out = 0.5 * (torch.linalg.vecdot(total, total) - torch.linalg.vecdot(flat, flat))   # (B,)
    return out.unsqueeze(1), total                                         # (B, 1)


def fm_interaction(fields: Tensor) -> Tensor:
    """(B, F, D) -> (B, 1): sum of <v_i, v_j> over field pairs i<j, in O(F*D) as
    0.5 * (|sum_i v_i|^2 - sum_i |v_i|^2)."""
    if not eager_kernels():      # export: the same forward as plain ops (fused.py)
        return _fm_forward(fields)[0]
    # always fp32: the term is the difference of two large sums, which bf16 / fp16 autocast would cancel away
    with torch.autocast(fields.device.type, enabled=False):
        return _FMInteraction.apply(fields.to(torch.promote_types(fields.dtype, torch.float32)))


class LinearTerm(nn.Module):
    """First-order term: a weight per id (a dim-`n_out` embedding summed over fields) + a numeric linear map.

    Starts at zero so that, with the head's prior bias, the model first predicts the label rate.
    """

    def __init__(self, spec: FeatureSpec, n_out: int, sparse: bool = False,
                 pooling: PoolingMode = "mean") -> None:
        super().__init__()
        self.weights = FieldEmbedding(spec, n_out, sparse=sparse, pooling=pooling, init_std=0.0) \
            if spec.id_fields else None
        self.numeric = nn.Linear(spec.n_numeric, n_out, bias=False) if spec.n_numeric else None
        if self.numeric is not None:
            nn.init.zeros_(self.numeric.weight)

    def forward(self, batch: Batch) -> Tensor:
        out = 0
        if self.weights is not None:
            out = self.weights(batch).sum(dim=1)               # (B, F, T) -> (B, T)
        if self.numeric is not None:
            out = out + self.numeric(batch.numeric)            # (B, T)
        return out
