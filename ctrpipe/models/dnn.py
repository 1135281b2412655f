"""Stage 4 model: DNN (embeddings + numeric columns -> MLP), the baseline every other model must beat."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, NumericMode
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DNNConfig(DeepConfig):
    numeric: NumericMode = "concat"   # raw (log-scaled) values beside the embeddings


@register("dnn", DNNConfig)
class DNN(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DNNConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        self.mlp = MLP(self.inputs.flat_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.head = OutputHead(self.mlp.out_dim, spec)

    def forward(self, batch: Batch) -> Tensor:
        return self.head(self.mlp(*self.inputs(batch).flat_parts))   # (B, T)
