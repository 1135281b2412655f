"""Stage 4 model: DeepFM = first-order linear term + FM pairwise term + MLP, sharing one set of embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig
from ctrpipe.models.layers.fm import LinearTerm, fm_interaction
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DeepFMConfig(DeepConfig):
    pass   # numeric="token" (inherited default): numeric columns are FM fields too


@register("deepfm", DeepFMConfig)
class DeepFM(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DeepFMConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        self.inputs.require_fields("deepfm")
        self.linear = LinearTerm(spec, spec.n_tasks, sparse=sparse, pooling=cfg.multihot_pooling)
        # the FM term is one scalar; each task scales it (1.0 at the start = plain DeepFM for one task)
        self.fm_scale = nn.Parameter(torch.ones(spec.n_tasks))
        self.mlp = MLP(self.inputs.flat_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation) \
            if cfg.hidden_units else None
        self.head = OutputHead(self.mlp.out_dim if self.mlp is not None else self.inputs.flat_dim, spec)
        if self.mlp is None:   # FM only: the head keeps just its prior bias
            nn.init.zeros_(self.head.linear.weight)
            self.head.linear.weight.requires_grad_(False)

    def forward(self, batch: Batch) -> Tensor:
        x = self.inputs(batch)
        deep = self.head(self.mlp(*x.flat_parts)) if self.mlp is not None else self.head(*x.flat_parts)
        return deep + self.linear(batch) + fm_interaction(x.fields) * self.fm_scale  # (B, T)
