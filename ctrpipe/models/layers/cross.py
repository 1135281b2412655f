"""Stage 4 shared layer: explicit feature crosses (DCN, DCN-V2) and how a cross tower combines with an MLP.

Every cross layer keeps the input width and adds a residual, as in the papers: DCN x_{l+1} = x0 (x_l . w_l) + b_l
+ x_l (the bias outside the product with x0), DCN-V2 x_{l+1} = x0 * (W_l x_l + b_l) + x_l (inside it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ctrpipe.models.layers.fused import cpu_kernel_dtype, full_cross_tower
from ctrpipe.models.layers.mlp import MLP

CrossKind = Literal["full", "lowrank", "mixture"]
Structure = Literal["stacked", "parallel"]


class CrossNetV1(nn.Module):
    """DCN: f_l(x) = x . w_l, a scalar per row from a vector w_l: a rank-1 cross per layer (2*dim params)."""

    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_layers, dim) / dim ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_layers, dim))
        self.out_dim = dim

    def forward(self, x0: Tensor) -> Tensor:
        x = x0                                                          # (B, dim)
        for w, b in zip(self.weight, self.bias, strict=True):           # loop over layers
            x = x0 * (x @ w).unsqueeze(1) + b + x                       # (B, 1) scalar per row
        return x


class CrossNetV2(nn.Module):
    """DCN-V2 cross layers, f_l(x) = W x + b with W

    - "full":     a dim x dim matrix;
    - "lowrank":  U V^T with U, V of dim x rank (cheaper, the paper's DCN-M at one expert);
    - "mixture":  a softmax-gated mixture of `n_experts` low-rank experts U_i tanh(C_i tanh(V_i^T x))
      (DCN-Mix).
    Experts are evaluated as one batched einsum, not a Python loop.
    """

    def __init__(self, dim: int, n_layers: int, kind: CrossKind = "full", rank: int = 32,
                 n_experts: int = 4) -> None:
        super().__init__()
        self.kind = kind
        self.out_dim = dim
        if kind == "full":
            self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        elif kind == "lowrank":
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))
                                        for _ in range(n_layers))
        else:
            self.layers = nn.ModuleList(_CrossMixture(dim, rank, n_experts) for _ in range(n_layers))

    def forward(self, x0: Tensor) -> Tensor:
        dtype = cpu_kernel_dtype(x0, self.layers[0].weight) if self.kind == "full" else None
        if dtype is not None:
            # same maths, hand-written backward: fewer passes over (B, dim) tensors (see fused.py)
            return full_cross_tower(x0, [layer.weight for layer in self.layers],
                                    [layer.bias for layer in self.layers], dtype)
        x = x0                                                          # (B, dim)
        for layer in self.layers:
            if self.kind == "mixture":
                x = layer(x0, x) + x
            else:
                x = x0 * layer(x) + x
        return x


class _CrossMixture(nn.Module):
    """One DCN-Mix layer: sum_i g_i(x) * (x0 * (U_i tanh(C_i tanh(V_i^T x)) + b))."""

    def __init__(self, dim: int, rank: int, n_experts: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(n_experts, dim, rank) / dim ** 0.5)
        self.c = nn.Parameter(torch.randn(n_experts, rank, rank) / rank ** 0.5)
        self.u = nn.Parameter(torch.randn(n_experts, rank, dim) / rank ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bd,edr->ber", x, self.v))         # (B, E, r)
        h = torch.tanh(torch.einsum("ber,ers->bes", h, self.c))        # (B, E, r)
        h = torch.einsum("ber,erd->bed", h, self.u) + self.bias        # (B, E, dim)
        g = torch.softmax(self.gate(x), dim=-1)                        # (B, E)
        return x0 * torch.einsum("be,bed->bd", g, h)                   # (B, dim)


class CrossAndDeep(nn.Module):
    """Combine a cross tower with an optional MLP.

    stacked:  x0 -> cross -> MLP (or cross alone when there is no MLP);
    parallel: concat(cross(x0), MLP(x0)), returned as its two parts (the head reads them without the copy).
    """

    def __init__(self, cross: CrossNetV1 | CrossNetV2, mlp: MLP | None,
                 structure: Structure = "parallel") -> None:
        super().__init__()
        self.cross = cross
        self.mlp = mlp
        self.structure = structure
        if mlp is None:
            self.out_dim = cross.out_dim
        elif structure == "stacked":
            self.out_dim = mlp.out_dim
        else:
            self.out_dim = cross.out_dim + mlp.out_dim

    def forward(self, x0: Tensor, x0_parts: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
        """The tower's output as parts of one (B, out_dim) vector: (cross, MLP) when parallel, else one.

        `x0_parts` (optional): the column blocks x0 was concatenated from (embeddings | raw numerics); the
        parallel MLP reads those instead of x0 (see MLP.forward and fused.py).
        """
        crossed = self.cross(x0)
        if self.mlp is None:
            return (crossed,)
        if self.structure == "stacked":
            return (self.mlp(crossed),)
        return crossed, self.mlp(*(x0_parts or (x0,)))
