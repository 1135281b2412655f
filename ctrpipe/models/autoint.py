"""Stage 4 model: AutoInt: stacked multi-head self-attention over fields.

With `hidden_units` a parallel MLP branch is added (AutoInt+). Numeric columns are attention fields
(`numeric=token`, the default) or, with an MLP, go raw into the MLP alone (`numeric=concat`, as DeepCTR-Torch's
AutoInt does): attention then runs over the id fields only, and its cost grows with the square of the fields.
Scores are scaled by 1/sqrt(attention_dim), as in transformers (the paper uses the plain inner product; the
learned query and key maps absorb the constant), and `layer_norm` (post-LN, on by default) is not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, check_config
from ctrpipe.models.layers.attention import AutoIntLayer
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class AutoIntConfig(DeepConfig):
    attention_layers: int = 3
    attention_heads: int = 2
    attention_dim: int = 32           # per head, as in the AutoInt paper
    attention_dropout: float = 0.0
    residual: bool = True
    layer_norm: bool = True           # post-LN after each interacting layer
    # empty: plain AutoInt, where dropout, batch_norm and activation have nothing to act on (they are the MLP's;
    # attention_dropout is the attention's); e.g. [400,400] adds an MLP (AutoInt+)
    hidden_units: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("attention_layers", "attention_heads", "attention_dim"):
            value = getattr(self, key)
            check_config(isinstance(value, int) and value >= 1, key, value, "2")
        check_config(0.0 <= self.attention_dropout < 1.0, "attention_dropout", self.attention_dropout, "0.1")
        # concat: numerics skip attention and enter the MLP raw (DeepCTR-Torch's AutoInt layout), so the
        # attention runs over the id fields only; without an MLP they would reach nothing
        check_config(self.numeric == "token" or bool(self.hidden_units), "numeric", self.numeric, "token",
                     why="with numeric=concat the numeric columns reach only the MLP, and hidden_units is empty")


@register("autoint", AutoIntConfig)
class AutoInt(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: AutoIntConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        width = self.inputs.require_fields("autoint")
        layers = []
        for _ in range(cfg.attention_layers):
            layers.append(AutoIntLayer(width, cfg.attention_dim, cfg.attention_heads, cfg.residual,
                                       cfg.layer_norm, cfg.attention_dropout))
            width = layers[-1].out_dim
        self.attention = nn.Sequential(*layers)
        out_dim = self.inputs.n_fields * width
        self.mlp = MLP(self.inputs.flat_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation) \
            if cfg.hidden_units else None
        if self.mlp is not None:
            out_dim += self.mlp.out_dim
        self.head = OutputHead(out_dim, spec)

    def forward(self, batch: Batch) -> Tensor:
        x = self.inputs(batch)
        h = self.attention(x.fields).flatten(1)                         # (B, F * H * hd)
        if self.mlp is not None:
            return self.head(h, self.mlp(*x.flat_parts))                # (B, T)
        return self.head(h)
