"""Stage 4 model: DARE (decoupled attention and representation embeddings): the history is searched with
small attention vectors from a table of their own, and the found behaviours' representation vectors (the
candidate's own embedding rows) are summed; [candidate, found, candidate * found] join the other inputs of an
MLP. Optionally a second head reads the same features from attention over the whole history (an auxiliary
loss, as in the reference implementation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import DeepConfig, NumericMode, SearchConfig, check_config
from ctrpipe.models.heads import Head, ModelOutput, default_heads
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.layers.sequence import DareEncoder, resolve_history
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DAREConfig(DeepConfig):
    numeric: NumericMode = "concat"
    hidden_units: tuple[int, ...] = (200, 80)
    sequence: SearchConfig = field(default_factory=SearchConfig)
    # width of the attention table's vectors: smaller than embedding_dim makes the search cheap (the
    # representation vectors keep embedding_dim)
    attention_dim: int = 8
    dare_dropout: float = 0.0      # dropout on the search features before the MLP
    # > 0: a second head ("<label>_full") on the features from attention over the whole history, trained
    # with this loss weight and left out of the primary metric; it is predicted (and scored) as well
    aux_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(isinstance(self.attention_dim, int) and self.attention_dim >= 1, "attention_dim",
                     self.attention_dim, "8")
        check_config(0.0 <= self.dare_dropout < 1.0, "dare_dropout", self.dare_dropout, "0.1")
        check_config(self.aux_loss_weight >= 0, "aux_loss_weight", self.aux_loss_weight, "0.1")


def aux_heads(spec: FeatureSpec, weight: float) -> tuple[Head, ...]:
    """The label heads, then (weight > 0) one `<label>_full` head per label for the full-attention features."""
    main = default_heads(spec)
    if weight <= 0:
        return main
    return main + tuple(Head(f"{h.name}_full", h.labels, h.mask, loss_weight=weight, metric_weight=0.0,
                             shadows=h.name) for h in main)


@register("dare", DAREConfig, requires=("sequence",))
class DARE(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DAREConfig, sparse: bool = False) -> None:
        super().__init__()
        s = cfg.sequence
        self.history = resolve_history(spec, "dare", s.column, s.query_key, s.max_len,
                                       need_query=s.query_mode != "S2")
        self.inputs = FeatureInput(spec, cfg, sparse=sparse, unpooled=(self.history.name,))
        assert self.inputs.embedding is not None
        dim = self.inputs.embedding.dim_of(self.history.name)
        self.encoder = DareEncoder(spec, self.history, s, cfg.attention_dim, dim, sparse, cfg.embedding_init_std)
        self.dropout = nn.Dropout(cfg.dare_dropout) if cfg.dare_dropout > 0 else nn.Identity()
        seq_dim = self.encoder.n_fields * dim
        self.mlp = MLP(self.inputs.flat_dim + seq_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm,
                       cfg.activation)
        self.head = OutputHead(self.mlp.out_dim, spec)
        self.heads = aux_heads(spec, cfg.aux_loss_weight)
        self.aux: nn.Module | None = None
        if cfg.aux_loss_weight > 0:   # the reference's auxiliary MLP: one hidden layer on the features alone
            self.aux = MLP(seq_dim, cfg.hidden_units[:1], cfg.dropout, cfg.batch_norm, cfg.activation)
            self.aux_head = OutputHead(self.aux.out_dim, spec)

    def forward(self, batch: Batch) -> ModelOutput:
        found, whole = self.encoder(batch, self.inputs.embedding, full=self.aux is not None)
        logits = self.head(self.mlp(*self.inputs(batch).flat_parts, self.dropout(found.flatten(1))))
        if self.aux is not None:
            logits = torch.cat([logits, self.aux_head(self.aux(whole.flatten(1)))], dim=1)
        return ModelOutput(logits=logits)
