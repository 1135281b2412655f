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
    bench_kernels.py). Here the rows go through in chunks whose (rows * H, F, F) scores stay in the cache:
    batched GEMMs (oneDNN's in bf16) and the softmax and its backward in fp32 (torch's bf16 softmax over a
    short last dim is several times slower). The attention weights are kept for the backward in the input's
    dtype (B * H * F * F values per layer: cheaper than computing them again). q is scaled once, in the one
    copy that puts q, k, v in (row, head)-major order.
    """

    @staticmethod
    def forward(ctx: Any, qkv: Tensor) -> Tensor:
        B, F_, _, H, hd = qkv.shape
        # (3, B*H, F, hd): always a copy (a reshape can be a view of qkv, e.g. at H = 1), scaled in place
        t = qkv.permute(2, 0, 3, 1, 4).clone(memory_format=torch.contiguous_format).view(3, B * H, F_, hd)
        t[0].mul_(hd ** -0.5)                                        # q / sqrt(hd)
        q, k, v = t.unbind(0)
        out = torch.empty_like(q)                                    # (B*H, F, hd)
        weights = q.new_empty(B * H, F_, F_)                         # softmax(q k^T), kept for the backward
        acc = torch.promote_types(t.dtype, torch.float32)            # the softmax's dtype
        for a, b in _chunks(B, H, F_):
            weights[a:b] = torch.bmm(q[a:b], k[a:b].transpose(1, 2)).to(acc).softmax(dim=-1)   # (n, F, F)
            torch.bmm(weights[a:b], v[a:b], out=out[a:b])
        ctx.save_for_backward(t, weights)
        return out.view(B, H, F_, hd).transpose(1, 2).reshape(B, F_, H * hd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        t, weights = ctx.saved_tensors
        _, BH, F_, hd = t.shape
        B = grad.shape[0]
        H = BH // B
        q, k, v = t.unbind(0)
        g = grad.reshape(B, F_, H, hd).transpose(1, 2).reshape(BH, F_, hd)    # dL/d out per (row, head)
        d = torch.empty_like(t)                                      # (3, B*H, F, hd): dq, dk, dv
        acc = torch.promote_types(t.dtype, torch.float32)
        for a, b in _chunks(B, H, F_):
            w = weights[a:b]                                         # (n, F, F)
            d_weights = torch.bmm(g[a:b], v[a:b].transpose(1, 2)).to(acc)
            d_scores = torch._softmax_backward_data(d_weights, w.to(acc), -1, acc).to(t.dtype)
            torch.bmm(d_scores, k[a:b], out=d[0, a:b])
            torch.bmm(d_scores.transpose(1, 2), q[a:b], out=d[1, a:b])     # q is scaled: dk needs no scale
            torch.bmm(w.transpose(1, 2), g[a:b], out=d[2, a:b])
        d[0].mul_(hd ** -0.5)
        return d.view(3, B, H, F_, hd).permute(1, 3, 0, 2, 4).reshape(B, F_, 3, H, hd)


CHUNK_SCORES = 1 << 19   # scores per chunk (2 MiB in fp32): a chunk's scores and their gradient stay in the cache


def _chunks(B: int, H: int, F_: int) -> list[tuple[int, int]]:
    """[start, end) ranges over the B*H (row, head) pairs, whole rows, about CHUNK_SCORES scores each."""
    rows = max(1, CHUNK_SCORES // (H * F_ * F_))
    return [(a * H, min(B, a + rows) * H) for a in range(0, B, rows)]


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
