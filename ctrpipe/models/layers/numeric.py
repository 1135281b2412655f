"""Stage 4 shared layer: numeric columns -> vectors, so FM / cross / attention models see them as fields."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NumericTokenizer(nn.Module):
    """Column j with value x_j -> x_j * w_j + b_j: a (D,) token per column (FT-Transformer's tokenizer).

    The bias lets a column carry information even where its value is 0 (e.g. imputed or log1p(0)).
    """

    # w_j is column j's embedding, as an id's row is one: weight decay leaves both alone (train/optim.py)
    NO_WEIGHT_DECAY = ("weight",)

    def __init__(self, n_columns: int, dim: int, bias: bool = True, init_std: float = 1e-2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_columns, dim))
        self.bias = nn.Parameter(torch.zeros(n_columns, dim)) if bias else None
        # same scale as the id embeddings so no field dominates interactions at the start
        nn.init.normal_(self.weight, 0.0, init_std if init_std > 0 else 1e-2)
        self.n_columns = n_columns
        self.dim = dim

    def forward(self, numeric: Tensor) -> Tensor:
        tokens = numeric.unsqueeze(-1) * self.weight          # (B, Fn, 1) * (Fn, D) -> (B, Fn, D)
        return tokens + self.bias if self.bias is not None else tokens
