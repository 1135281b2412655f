"""Stage 4 model: DCN-V2: matrix cross layers (full, low-rank or a mixture of low-rank experts) + an MLP.

Same composition as DCN (inputs -> cross tower beside/below an MLP -> head); only the cross layers differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctrpipe.models.base import check_choice, check_config
from ctrpipe.models.dcn import DCN, DCNConfig
from ctrpipe.models.layers.cross import CrossKind, CrossNetV2
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DCNv2Config(DCNConfig):
    cross_kind: CrossKind = "full"
    # rank of U V^T for "lowrank" and of each expert for "mixture"; from half the cross input's width up it
    # holds as many weights as "full", and is slower
    low_rank: int = 32
    n_experts: int = 4            # "mixture" only

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.cross_kind, CrossKind, "cross_kind")
        check_config(isinstance(self.low_rank, int) and self.low_rank >= 1, "low_rank", self.low_rank, "32")
        check_config(isinstance(self.n_experts, int) and self.n_experts >= 1, "n_experts", self.n_experts,
                     "4")


@register("dcnv2", DCNv2Config)
class DCNv2(DCN):
    def make_cross(self, dim: int, cfg: DCNConfig) -> nn.Module:
        assert isinstance(cfg, DCNv2Config)   # registry pairs DCNv2 with DCNv2Config
        return CrossNetV2(dim, cfg.cross_layers, cfg.cross_kind, cfg.low_rank, cfg.n_experts)
