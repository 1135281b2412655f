"""Stage 4 shared layer: self-attention over fields (AutoInt layer, post-LN; FT-Transformer block, pre-LN)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctrpipe.models.layers.fused import eager_kernels


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
        qkv = self.qkv(x).view(B, F_, 3, self.n_heads, self.head_dim)   # (B, F, 3, H, hd)
        p = self.dropout if self.training else 0.0
        if qkv.device.type == "cpu" and p == 0.0 and eager_kernels():
            return _SmallAttention.apply(qkv)                           # (B, F, H * hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # each (B, H, F, hd)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return out.transpose(1, 2).reshape(B, F_, self.out_dim)


class _SmallAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hd)) v over a few dozen fields, with a hand-written backward, for a CPU:
    (B, F, 3, H, hd) -> (B, F, H * hd).

    SDPA's fused CPU kernel is tiled for long sequences and spends most of its time on per-(row, head)
    overhead at a few dozen fields, in bf16 several times more than in fp32 (A/B figures: benchmarks/RESULTS.md,
    bench_kernels.py). Here the rows go through in chunks whose (rows, F, F) scores stay in the cache, one head
    at a time: batched GEMMs (oneDNN's in bf16) straight on strided views of the projection's output -- each
    head's (rows, F, hd) slice of q, k or v is a valid GEMM operand with a row stride of 3 * H * hd -- so q, k
    and v are never permuted into (row, head)-major copies (that copy, and the one putting the gradient back,
    cost more than the GEMMs at hd = 8). The softmax and its backward run in fp32 (torch's bf16 softmax over a
    short last dim is several times slower). The attention weights are kept for the backward in the input's
    dtype (B * H * F * F values per layer: cheaper than computing them again), and so is qkv itself.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor) -> Tensor:
        B, F_, _, H, hd = qkv.shape
        scale = hd ** -0.5
        acc = torch.promote_types(qkv.dtype, torch.float32)          # the softmax's dtype
        out = qkv.new_empty(B, F_, H, hd)
        weights = qkv.new_empty(H, B, F_, F_)                        # softmax(q k^T), kept for the backward
        for a, b in _chunks(B, H, F_):
            for h in range(H):
                q, k, v = qkv[a:b, :, 0, h], qkv[a:b, :, 1, h], qkv[a:b, :, 2, h]     # (n, F, hd) views
                weights[h, a:b] = torch.bmm(q, k.transpose(1, 2)).to(acc).mul_(scale).softmax(dim=-1)
                out[a:b, :, h] = torch.bmm(weights[h, a:b], v)
        ctx.save_for_backward(qkv, weights)
        return out.view(B, F_, H * hd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        qkv, weights = ctx.saved_tensors
        B, F_, _, H, hd = qkv.shape
        scale = hd ** -0.5
        acc = torch.promote_types(qkv.dtype, torch.float32)
        g = grad.reshape(B, F_, H, hd)                               # dL/d out per head: (n, F, hd) views
        d = torch.empty_like(qkv)                                    # dq, dk, dv in qkv's layout
        for a, b in _chunks(B, H, F_):
            for h in range(H):
                q, k, v = qkv[a:b, :, 0, h], qkv[a:b, :, 1, h], qkv[a:b, :, 2, h]
                gh, w = g[a:b, :, h], weights[h, a:b]
                d_weights = torch.bmm(gh, v.transpose(1, 2)).to(acc)
                # the scores were scaled after q k^T, so both dq and dk carry the scale
                d_scores = torch._softmax_backward_data(d_weights, w.to(acc), -1, acc).mul_(scale).to(qkv.dtype)
                d[a:b, :, 0, h] = torch.bmm(d_scores, k)
                d[a:b, :, 1, h] = torch.bmm(d_scores.transpose(1, 2), q)
                d[a:b, :, 2, h] = torch.bmm(w.transpose(1, 2), gh)
        return d


CHUNK_SCORES = 1 << 20   # scores per chunk over its heads (4 MiB in fp32): one head's scores stay in the cache


def _chunks(B: int, H: int, F_: int) -> list[tuple[int, int]]:
    """[start, end) row ranges, about CHUNK_SCORES scores (over all H heads) each."""
    rows = max(1, CHUNK_SCORES // (H * F_ * F_))
    return [(a, min(B, a + rows)) for a in range(0, B, rows)]


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
