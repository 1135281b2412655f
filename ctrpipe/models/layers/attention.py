"""Stage 4 shared layer: self-attention over fields (AutoInt layer, post-LN; FT-Transformer block, pre-LN)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FieldAttention(nn.Module):
    """Multi-head self-attention over the F axis: (B, F, in_dim) -> (B, F, n_heads * head_dim)."""

    def __init__(self, in_dim: int, head_dim: int, n_heads: int, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(in_dim, 3 * n_heads * head_dim, bias=bias)
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.out_dim = n_heads * head_dim

    def forward(self, x: Tensor) -> Tensor:
        B, F_, _ = x.shape
        qkv = self.qkv(x).view(B, F_, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # each (B, H, F, hd)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, F_, self.out_dim)


class AutoIntLayer(nn.Module):
    """AutoInt interacting layer: ReLU(attention(x) + W_res x), then LayerNorm (post-LN) when enabled."""

    def __init__(self, in_dim: int, head_dim: int, n_heads: int, residual: bool = True,
                 layer_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = FieldAttention(in_dim, head_dim, n_heads, dropout=dropout, bias=False)
        out_dim = self.attention.out_dim
        self.residual = (nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)) \
            if residual else None
        self.norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.attention(x)                                           # (B, F, H*hd)
        if self.residual is not None:
            h = h + self.residual(x)
        return self.norm(F.relu(h))


class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + FFN(LN(x)); GELU FFN `ffn_multiplier` x wide."""

    def __init__(self, dim: int, n_heads: int, ffn_multiplier: int = 4, attention_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, residual_dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = FieldAttention(dim, dim // n_heads, n_heads, dropout=attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_multiplier * dim), nn.GELU(), nn.Dropout(ffn_dropout),
                                 nn.Linear(ffn_multiplier * dim, dim))
        self.drop = nn.Dropout(residual_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.proj(self.attention(self.norm1(x))))    # (B, F, D)
        return x + self.drop(self.ffn(self.norm2(x)))
