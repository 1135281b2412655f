"""Stage 4 model: FT-Transformer: every feature (ids and numeric columns) is a token; pre-LN blocks.

One departure from the paper, kept for the checkpoints trained so far: the first block normalises its input
before attention too (the paper leaves that first LayerNorm out), and the feed-forward is GELU (not ReGLU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import InputConfig, check_choice, check_config, divisor_near
from ctrpipe.models.layers.attention import TransformerBlock
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register

Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class FTTransformerConfig(InputConfig):
    embedding_dim: int = 32           # token width; must divide by n_heads
    n_blocks: int = 3
    n_heads: int = 4
    ffn_multiplier: int = 4           # GELU FFN hidden width = ffn_multiplier * embedding_dim
    # 0 by default (the paper uses 0.2 / 0.1 on small tables): click logs are trained for ~1 epoch, and on CPU
    # attention dropout forces the slow SDPA path while dropout masks take a large share of the step
    attention_dropout: float = 0.0
    ffn_dropout: float = 0.0
    residual_dropout: float = 0.0
    pooling: Pooling = "cls"          # a learned [CLS] token, or the mean of the output tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_blocks", "n_heads", "ffn_multiplier"):
            value = getattr(self, key)
            check_config(isinstance(value, int) and value >= 1, key, value, "4")
        check_config(self.embedding_dim % self.n_heads == 0, "n_heads", self.n_heads,
                     str(divisor_near(self.n_heads, self.embedding_dim)),
                     why=f"must divide model.embedding_dim={self.embedding_dim}")
        for key in ("attention_dropout", "ffn_dropout", "residual_dropout"):
            value = getattr(self, key)
            check_config(0.0 <= value < 1.0, key, value, "0.1")
        check_choice(self.pooling, Pooling, "pooling")
        check_config(self.numeric == "token", "numeric", self.numeric, "token",
                     why="the transformer reads numeric columns as tokens")


@register("ft_transformer", FTTransformerConfig)
class FTTransformer(nn.Module):
    NO_WEIGHT_DECAY = ("cls",)      # a learned token, like an embedding row: not decayed (train/optim.py)

    def __init__(self, spec: FeatureSpec, cfg: FTTransformerConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.require_fields("ft_transformer")
        # field_dims can give every field another common dim than embedding_dim (checked in the config)
        check_config(dim % cfg.n_heads == 0, "n_heads", cfg.n_heads, str(divisor_near(cfg.n_heads, dim)),
                     why=f"n_heads must divide the field dim ({dim}, from model.field_dims)")
        self.cls = nn.Parameter(torch.randn(1, 1, dim) / dim ** 0.5) if cfg.pooling == "cls" else None
        self.blocks = nn.Sequential(*(
            TransformerBlock(dim, cfg.n_heads, cfg.ffn_multiplier, cfg.attention_dropout, cfg.ffn_dropout,
                             cfg.residual_dropout) for _ in range(cfg.n_blocks)))
        # pre-LN blocks leave the residual stream un-normalised, so the head normalises first (as the paper)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.ReLU()
        self.head = OutputHead(dim, spec)

    def forward(self, batch: Batch) -> Tensor:
        tokens = self.inputs(batch).fields                              # (B, F, D)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)   # (B, 1 + F, D)
        h = self.blocks(tokens)
        pooled = h[:, 0] if self.cls is not None else h.mean(dim=1)     # (B, D)
        return self.head(self.act(self.norm(pooled)))                   # (B, T)
