"""Stage 4 model: DCN (Deep & Cross Network v1): vector-weight cross layers + an MLP, stacked or parallel."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, check_choice, check_config
from ctrpipe.models.layers.cross import CrossAndDeep, CrossNetV1, Structure
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DCNConfig(DeepConfig):
    cross_layers: int = 3
    structure: Structure = "parallel"   # the DCN paper's layout; "stacked" feeds the cross output to the MLP

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(isinstance(self.cross_layers, int) and self.cross_layers >= 1, "cross_layers",
                     self.cross_layers, "3")
        check_choice(self.structure, Structure, "structure")


@register("dcn", DCNConfig)
class DCN(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DCNConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.flat_dim
        cross = self.make_cross(dim, cfg)
        mlp = MLP(dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation) \
            if cfg.hidden_units else None
        self.tower = CrossAndDeep(cross, mlp, cfg.structure)
        self.head = OutputHead(self.tower.out_dim, spec)

    def make_cross(self, dim: int, cfg: DCNConfig) -> nn.Module:
        """The cross tower; DCN v2 overrides only this."""
        return CrossNetV1(dim, cfg.cross_layers)

    def forward(self, batch: Batch) -> Tensor:
        x = self.inputs(batch)
        # the cross tower needs x0 whole; the MLP beside it reads the parts (no copy of x0's gradient)
        return self.head(*self.tower(x.flat, x.flat_parts))   # (B, T)
