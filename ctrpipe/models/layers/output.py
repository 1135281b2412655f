"""Stage 4 shared layer: the last Linear of every model, one logit per task, started at the label prior."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.models.heads import label_rate, prior_logit
from ctrpipe.models.layers.fused import cpu_kernel_dtype, linear_over_parts


def prior_logits(spec: FeatureSpec) -> list[float]:
    """logit(train positive rate) per label of `spec`, clamped (see heads.prior_logit)."""
    return [prior_logit(label_rate(spec, label)) for label in spec.labels]


class OutputHead(nn.Module):
    """Linear(in_dim, n_tasks); the bias starts at logit(label rate) so training need not learn the prior."""

    def __init__(self, in_dim: int, spec: FeatureSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, spec.n_tasks)
        with torch.no_grad():
            self.linear.bias.copy_(torch.tensor(prior_logits(spec)))

    def forward(self, *parts: Tensor) -> Tensor:
        """(B, in_dim) -> (B, T); the input may come in parts whose widths add up to in_dim (no concat)."""
        w, b = self.linear.weight, self.linear.bias
        dtype = cpu_kernel_dtype(w, *parts)
        if dtype is not None:
            return linear_over_parts(w, b, parts, dtype)
        return self.linear(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
