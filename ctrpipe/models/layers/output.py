"""Stage 4 shared layer: the last Linear of every model, one logit per task, started at the label prior."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ctrpipe.errors import SchemaError
from ctrpipe.features import FeatureSpec
from ctrpipe.models.layers.fused import cpu_fp32, linear_over_parts

RATE_CLAMP = 1e-4   # keeps logit(rate) finite for a label that is all 0 or all 1 in the train split


def prior_logits(spec: FeatureSpec) -> list[float]:
    """logit(positive rate) per task, clamped to [1e-4, 1 - 1e-4]."""
    rates = list(spec.label_rates)
    if len(rates) == 1 and spec.n_tasks > 1:
        rates = rates * spec.n_tasks
    if len(rates) != spec.n_tasks:
        raise SchemaError(f"{len(rates)} label rates for {spec.n_tasks} labels {list(spec.labels)}",
                          where="feature spec (manifest)", fix="rebuild the shards so every label has a rate")
    out = []
    for r in rates:
        r = min(max(float(r), RATE_CLAMP), 1.0 - RATE_CLAMP)
        out.append(math.log(r / (1.0 - r)))
    return out


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
        if cpu_fp32(w, *parts):
            return linear_over_parts(w, b, parts)
        return self.linear(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
