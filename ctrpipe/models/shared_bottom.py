"""Stage 4 model: shared-bottom multi-task learning -- one MLP over the inputs, then one tower per task.

The simplest multi-task form and the baseline MMoE and PLE must beat; loss sum_k w_k * L_k (objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import MultiTaskConfig
from ctrpipe.models.layers.experts import TaskTowers
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class SharedBottomConfig(MultiTaskConfig):
    pass


@register("shared_bottom", SharedBottomConfig, min_labels=2)
class SharedBottom(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: SharedBottomConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        self.bottom = MLP(self.inputs.flat_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.towers = TaskTowers(self.bottom.out_dim, spec, cfg.tower_units, cfg.dropout, cfg.batch_norm,
                                 cfg.activation)

    def forward(self, batch: Batch) -> Tensor:
        shared = self.bottom(*self.inputs(batch).flat_parts)                   # (B, D)
        return self.towers([shared] * len(self.towers.towers))                 # (B, T)
