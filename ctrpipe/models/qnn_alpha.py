"""Stage 4 model: QNN-α: quadratic interaction layers over the field embeddings, a linear output, and the
self-ensemble loss in training (layers/qnn.py). No MLP tower: the layers are the whole network.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import Activation, InputConfig, NumericMode, check_choice, check_config, divisor_near
from ctrpipe.models.heads import ModelOutput
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.layers.qnn import QNNNorm, QuadraticInteraction, self_ensemble
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class QNNAlphaConfig(InputConfig):
    numeric: NumericMode = "token"   # numeric columns must be fields: the layers read the input as (F, d)
    # quadratic layers; layer l reaches feature interactions of order up to 2^l (piecewise, through act)
    num_layers: int = 3
    # rows R: each layer's W maps D = F*d -> R*D, so parameters and FLOPs are R*D^2 per layer (Criteo,
    # D = 624: 1.2M per layer at R=3); the rows' outputs are summed before the product with x
    rank: int = 3
    # H: head k multiplies the k-th d/H-wide slice of every field; products are laid head-major, so with
    # H > 1 each position also mixes with another one (layers/qnn.py says exactly how). Must divide
    # embedding_dim; 1 is the reference's default and its best Criteo setting
    heads: int = 1
    # on each layer's h = act(norm(W x)) and on its output; also what makes the self-ensemble's two passes
    # differ (0: they would be identical, so training runs one pass and no consistency loss)
    dropout: float = 0.1
    norm: QNNNorm = "batch"          # on W x, before the activation: batch (reference), layer or none
    activation: Activation = "relu"
    use_residual: bool = True        # x_next = x * g + x; false: x * g alone
    # training runs the layers twice (two dropout draws) on the same embeddings and predicts the mean
    # probability; off: one pass, plain QNN. Inference always runs one pass
    self_ensemble: bool = True
    # weight of the consistency loss BCE(p1, sg(p_mean)) + BCE(p2, sg(p_mean)) (1.0 in the reference),
    # logged less the entropy of sg(p_mean), which has no gradient: 0 when the two passes agree
    self_ensemble_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_layers", "rank", "heads"):
            value = getattr(self, key)
            check_config(isinstance(value, int) and value >= 1, key, value, "3" if key != "heads" else "1")
        check_config(self.embedding_dim % self.heads == 0, "heads", self.heads,
                     str(divisor_near(self.heads, self.embedding_dim)),
                     why=f"heads must divide embedding_dim ({self.embedding_dim})")
        check_config(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0.1")
        check_choice(self.norm, QNNNorm, "norm")
        check_choice(self.activation, Activation, "activation")
        check_config(self.self_ensemble_weight >= 0, "self_ensemble_weight", self.self_ensemble_weight, "1.0")
        check_config(self.numeric == "token", "numeric", self.numeric, "token",
                     why="the quadratic layers need numeric columns as fields")


@register("qnn_alpha", QNNAlphaConfig)
class QNNAlpha(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: QNNAlphaConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.require_fields("qnn_alpha")
        # field_dims can give every field another common dim than embedding_dim
        check_config(dim % cfg.heads == 0, "heads", cfg.heads, str(divisor_near(cfg.heads, dim)),
                     why=f"heads must divide the field dim ({dim})")
        self.qnn = QuadraticInteraction(self.inputs.n_fields, dim, cfg.num_layers, cfg.rank, cfg.heads,
                                        cfg.dropout, cfg.norm, cfg.activation, cfg.use_residual)
        self.head = OutputHead(self.qnn.out_dim, spec)
        # without dropout the two passes are the same function: the ensemble would cost 2x for nothing
        self.ensemble = cfg.self_ensemble and cfg.dropout > 0
        self.ensemble_weight = cfg.self_ensemble_weight

    def forward(self, batch: Batch) -> ModelOutput:
        fields = self.inputs(batch).fields                                     # (B, F, d), computed once
        assert fields is not None                                              # require_fields checked it
        return self_ensemble(lambda: self.head(self.qnn(fields)), self.ensemble_weight,
                             self.training and self.ensemble, (self.qnn, self.head))   # logits (B, T)
