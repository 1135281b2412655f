"""Stage 4 shared layer: the fully connected tower ("deep" part) of every model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctrpipe.models.base import Activation
from ctrpipe.models.layers.fused import cpu_kernel_dtype, linear_over_parts

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer. No output layer (see OutputHead).

    With empty `hidden` the MLP is the identity and `out_dim == in_dim`.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (400, 400, 400), dropout: float = 0.0,
                 batch_norm: bool = False, activation: Activation = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for units in hidden:
            layers.append(nn.Linear(width, units, bias=not batch_norm))   # BN's shift replaces the bias
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            # in place: the Linear/BatchNorm output it overwrites is not needed by their backward, and a
            # (B, units) allocation + pass less per layer is measurable on CPU
            layers.append(nn.ReLU(inplace=True) if activation == "relu" else _ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = width

    def forward(self, *parts: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim); the input may come in parts whose widths add up to in_dim."""
        first = self.net[0] if len(self.net) else None
        dtype = cpu_kernel_dtype(first.weight, *parts) if len(parts) > 1 and isinstance(first, nn.Linear) and \
            first.bias is not None else None
        if dtype is not None:
            # the first layer reads the parts in place: no (B, in_dim) concatenation, and the embeddings'
            # gradient comes out contiguous (see fused.py)
            return self.net[1:](linear_over_parts(first.weight, first.bias, parts, dtype))
        return self.net(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
