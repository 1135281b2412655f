"""Stage 4 model: DIN (deep interest network): the history is read against the candidate by target attention
(an activation unit scoring each behaviour), the attended vector joins the other inputs of an MLP.

The history and the candidate must share an id space (`data.sequence[].share_ids_with`), so both are looked
up in one table; the attended history replaces the history's mean-pooled field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, NumericMode, SequenceConfig, check_config
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.layers.sequence import TargetAttention, history_tokens, resolve_history
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DINConfig(DeepConfig):
    numeric: NumericMode = "concat"
    hidden_units: tuple[int, ...] = (200, 80)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    attention_units: tuple[int, ...] = (36,)   # the activation unit's hidden layers (PReLU)
    attention_softmax: bool = False   # normalise scores over the history (the paper uses them as they are)
    # also feed the mean-pooled history as a field: all stored tokens, as the other models pool it, while the
    # attention reads the most recent sequence.max_len
    keep_pooled_history: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(len(self.attention_units) >= 1 and all(u >= 1 for u in self.attention_units),
                     "attention_units", list(self.attention_units), "[36]")


@register("din", DINConfig, requires=("sequence",))
class DIN(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DINConfig, sparse: bool = False) -> None:
        super().__init__()
        self.history = resolve_history(spec, "din", cfg.sequence.column, cfg.sequence.query_key,
                                       cfg.sequence.max_len)
        unpooled = () if cfg.keep_pooled_history else (self.history.name,)
        self.inputs = FeatureInput(spec, cfg, sparse=sparse, unpooled=unpooled)
        assert self.inputs.embedding is not None   # the history is an id field
        dim = self.inputs.embedding.dim_of(self.history.name)
        self.attention = TargetAttention(dim, cfg.attention_units, softmax=cfg.attention_softmax)
        self.mlp = MLP(self.inputs.flat_dim + dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.head = OutputHead(self.mlp.out_dim, spec)

    def forward(self, batch: Batch) -> Tensor:
        emb = self.inputs.embedding
        tokens = history_tokens(batch, self.history)                            # (B, L)
        keys, query = emb.history_with_candidate(batch, "sequence", self.history.index, tokens,
                                                 self.history.query)             # (B, L, D), (B, D)
        attended = self.attention(query, keys, tokens > 0)
        return self.head(self.mlp(*self.inputs(batch).flat_parts, attended))   # (B, T)
