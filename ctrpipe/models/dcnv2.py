"""Stage 4 model: DCN-V2: matrix cross layers (full, low-rank or a mixture of low-rank experts) + an MLP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, check_choice, check_config
from ctrpipe.models.layers.cross import CrossAndDeep, CrossKind, CrossNetV2, Structure
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DCNv2Config(DeepConfig):
    cross_layers: int = 3
    cross_kind: CrossKind = "full"
    low_rank: int = 32            # rank of U V^T for "lowrank" and of each expert for "mixture"
    n_experts: int = 4            # "mixture" only
    structure: Structure = "parallel"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(isinstance(self.cross_layers, int) and self.cross_layers >= 1, "cross_layers",
                     self.cross_layers, "3")
        check_choice(self.cross_kind, CrossKind, "cross_kind")
        check_config(isinstance(self.low_rank, int) and self.low_rank >= 1, "low_rank", self.low_rank, "32")
        check_config(isinstance(self.n_experts, int) and self.n_experts >= 1, "n_experts", self.n_experts,
                     "4")
        check_choice(self.structure, Structure, "structure")


@register("dcnv2", DCNv2Config)
class DCNv2(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DCNv2Config, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.flat_dim
        cross = CrossNetV2(dim, cfg.cross_layers, cfg.cross_kind, cfg.low_rank, cfg.n_experts)
        mlp = MLP(dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation) \
            if cfg.hidden_units else None
        self.tower = CrossAndDeep(cross, mlp, cfg.structure)
        self.head = OutputHead(self.tower.out_dim, spec)

    def forward(self, batch: Batch) -> Tensor:
        return self.head(self.tower(self.inputs(batch).flat))   # (B, T)
