"""Stage 4 model: the DARE + QNN-α pipeline: a DARE search over the behaviour history (layers/sequence.py)
becomes a few more fields beside the categorical embeddings and the numeric columns (co-visitation features
included), an optional squeeze-excitation reweights the fields, QNN-α quadratic layers interact them
(layers/qnn.py) and an MLP (or a linear layer) gives the logit; training uses QNN-α's self-ensemble.

The pipeline this model comes from names two keys differently; both names are accepted (`KEY_ALIASES`):
`emb_dim` is `model.embedding_dim`, `cat_embedding_dims` is `model.field_dims`. Its `sequence.*` is
`model.sequence.*` (`max_len` is a shard-time setting, `data.sequence[].max_len`, which
`model.sequence.max_len` can only shorten; `pad_id` is accepted only as 0, ctrpipe's padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import (
    Activation,
    InputConfig,
    NumericMode,
    SearchConfig,
    check_choice,
    check_config,
    divisor_near,
)
from ctrpipe.models.dare import aux_heads
from ctrpipe.models.heads import ModelOutput
from ctrpipe.models.layers.embedding import FieldEmbedding
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.numeric import NumericTokenizer
from ctrpipe.models.layers.output import OutputHead
from ctrpipe.models.layers.qnn import QNNNorm, QuadraticInteraction, self_ensemble
from ctrpipe.models.layers.sequence import DareEncoder, resolve_history
from ctrpipe.models.registry import register

PairGrouping = Literal["dims", "fields"]


@dataclass(frozen=True)
class QNNHeadConfig:
    """`model.qnn_alpha`: the interaction head over every input field."""

    feature_embed_dim: int = 16   # d of the QNN fields; embeddings of another dim are projected to it
    num_layers: int = 2           # quadratic layers, each (B, F, d) -> (B, F, d)
    rank: int = 3                 # rows R of each layer's W (D -> R*D)
    heads: int = 1                # head k multiplies the k-th d/heads slice of every field (must divide d)
    # the search features [candidate, found, candidate * found] (3 x emb dim per query) are projected by one
    # Linear to proj_dim and cut into proj_dim / feature_embed_dim fields; 0 = each vector is one field
    proj_dim: int = 0
    mlp_hidden: tuple[int, ...] = ()   # MLP after the quadratic layers; [] = a linear output (QNN-α's own)
    dropout: float = 0.1          # in the quadratic layers and the MLP; what makes the two passes differ
    use_se: bool = False          # squeeze-excitation: reweight fields by a gate on their mean values
    se_reduction: int = 4         # the gate's bottleneck: n_fields // se_reduction units, at least 1
    use_residual: bool = True     # each layer adds its input to the quadratic term
    norm: QNNNorm = "batch"       # normalisation of W x, before the activation
    # how heads cut the field tensor: dims = each field's dims split into `heads` slices (QNN-α's heads);
    # fields = the fields split into `heads` groups (the tensor is read transposed, (d, F)). With heads 1 the
    # two are one model (the same features in another order); fields needs heads dividing the field count
    pair_grouping: PairGrouping = "dims"
    # weight of the auxiliary head on full-attention search features (DARE's aux loss); 0 = no such head
    aux_head_weight: float = 0.0
    # training runs the tower twice (two dropout draws), loss on the mean prediction plus each pass against
    # the detached mean; inference runs once. Needs dropout > 0 (with 0 both passes are equal: one pass)
    self_ensemble: bool = True
    self_ensemble_weight: float = 1.0   # weight of the two passes' loss against the detached mean

    def __post_init__(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for key in ("feature_embed_dim", "num_layers", "rank", "heads", "se_reduction"):
            value = getattr(self, key)      # the example: the key's own default (2 for every key read oddly)
            check_config(isinstance(value, int) and value >= 1, f"qnn_alpha.{key}", value, str(defaults[key]))
        check_config(self.proj_dim >= 0 and self.proj_dim % self.feature_embed_dim == 0, "qnn_alpha.proj_dim",
                     self.proj_dim, str(4 * self.feature_embed_dim),
                     why="a multiple of qnn_alpha.feature_embed_dim (or 0)")
        check_config(all(h >= 1 for h in self.mlp_hidden), "qnn_alpha.mlp_hidden", list(self.mlp_hidden), "[128]")
        check_config(0.0 <= self.dropout < 1.0, "qnn_alpha.dropout", self.dropout, "0.1")
        check_choice(self.norm, QNNNorm, "qnn_alpha.norm")
        check_choice(self.pair_grouping, PairGrouping, "qnn_alpha.pair_grouping")
        check_config(self.aux_head_weight >= 0, "qnn_alpha.aux_head_weight", self.aux_head_weight, "0.1")
        check_config(self.self_ensemble_weight >= 0, "qnn_alpha.self_ensemble_weight", self.self_ensemble_weight,
                     "1.0")


@dataclass(frozen=True)
class DareQNNConfig(InputConfig):
    # the names this model's original pipeline uses, accepted beside ctrpipe's own
    KEY_ALIASES: ClassVar[dict[str, str]] = {"emb_dim": "embedding_dim", "cat_embedding_dims": "field_dims"}

    numeric: NumericMode = "token"   # every numeric column (co-visitation features too) is a field
    sequence: SearchConfig = field(default_factory=SearchConfig)
    attention_dim: int = 8           # DARE's attention vectors (the representation keeps embedding_dim)
    dare_dropout: float = 0.0        # on the search features
    activation: Activation = "relu"
    qnn_alpha: QNNHeadConfig = field(default_factory=QNNHeadConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self.numeric == "token", "numeric", self.numeric, "token",
                     why="the quadratic layers need numeric columns as fields")
        check_config(self.attention_dim >= 1, "attention_dim", self.attention_dim, "8")
        check_config(0.0 <= self.dare_dropout < 1.0, "dare_dropout", self.dare_dropout, "0.1")


class SqueezeExcitation(nn.Module):
    """(B, F, d) -> the same fields scaled by a gate in (0, 2) computed from each field's mean value."""

    def __init__(self, n_fields: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, n_fields // reduction)
        self.gate = nn.Sequential(nn.Linear(n_fields, hidden), nn.ReLU(), nn.Linear(hidden, n_fields))

    def forward(self, x: Tensor) -> Tensor:
        # 2 * sigmoid starts every gate at 1 (identity) when the last layer's output is near 0
        return x * (2.0 * torch.sigmoid(self.gate(x.mean(dim=-1)))).unsqueeze(-1)


@register("dare_qnn", DareQNNConfig, requires=("sequence",))
class DareQNN(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DareQNNConfig, sparse: bool = False) -> None:
        super().__init__()
        s, q = cfg.sequence, cfg.qnn_alpha
        d = q.feature_embed_dim
        self.history = resolve_history(spec, "dare_qnn", s.column, s.query_key, s.max_len,
                                       need_query=s.query_mode != "S2")
        self.embedding = FieldEmbedding(spec, dict(cfg.field_dims), mode=cfg.embedding_mode, sparse=sparse,
                                        pooling=cfg.multihot_pooling, init_std=cfg.embedding_init_std,
                                        default_dim=cfg.embedding_dim, unpooled=(self.history.name,))
        # pooled id fields come per table group, one dim each; a group of another dim than d is projected
        self.group_dims = [g_dim for g_dim in self._group_dims()]
        self.project = nn.ModuleDict({str(k): nn.Linear(k, d, bias=False) for k in sorted(set(self.group_dims))
                                      if k != d})
        self.numeric = NumericTokenizer(spec.n_numeric, d, init_std=cfg.embedding_init_std) \
            if spec.n_numeric else None
        rep_dim = self.embedding.dim_of(self.history.name)
        self.encoder = DareEncoder(spec, self.history, s, cfg.attention_dim, rep_dim, sparse,
                                   cfg.embedding_init_std)
        search_width = self.encoder.n_fields * rep_dim
        if q.proj_dim:
            self.search_proj: nn.Module = nn.Linear(search_width, q.proj_dim)
            search_fields = q.proj_dim // d
        else:
            self.search_proj = nn.Linear(rep_dim, d, bias=False) if rep_dim != d else nn.Identity()
            search_fields = self.encoder.n_fields
        self.proj_dim = q.proj_dim
        self.dare_dropout = nn.Dropout(cfg.dare_dropout) if cfg.dare_dropout > 0 else nn.Identity()
        n_fields = self.embedding.n_fields + spec.n_numeric + search_fields
        self.se = SqueezeExcitation(n_fields, q.se_reduction) if q.use_se else None
        self.transpose = q.pair_grouping == "fields"
        qf, qd = (d, n_fields) if self.transpose else (n_fields, d)
        check_config(qd % q.heads == 0, "qnn_alpha.heads", q.heads, str(divisor_near(q.heads, qd)),
                     why=f"heads must divide {'the number of fields' if self.transpose else 'feature_embed_dim'} "
                         f"({qd})")
        self.qnn = QuadraticInteraction(qf, qd, q.num_layers, q.rank, q.heads, q.dropout, q.norm, cfg.activation,
                                        q.use_residual)
        self.mlp = MLP(self.qnn.out_dim, q.mlp_hidden, q.dropout, False, cfg.activation) if q.mlp_hidden else None
        self.head = OutputHead(self.mlp.out_dim if self.mlp is not None else self.qnn.out_dim, spec)
        self.heads = aux_heads(spec, q.aux_head_weight)
        self.aux: nn.Module | None = None
        if q.aux_head_weight > 0:
            self.aux = MLP(search_width, (max(q.mlp_hidden[:1] or (64,)),), q.dropout, False, cfg.activation)
            self.aux_head = OutputHead(self.aux.out_dim, spec)
        self.ensemble = q.self_ensemble and q.dropout > 0
        self.ensemble_weight = q.self_ensemble_weight

    def _group_dims(self) -> list[int]:
        return [g.cat_table.embedding_dim if g.cat_table is not None else g.bag_table.embedding_dim
                for g in self.embedding.groups if g.n_outputs]

    def fields(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """(B, F, d) every input as a field, and the full-attention search features for the aux head."""
        parts = []
        for g, g_dim in zip((g for g in self.embedding.groups if g.n_outputs), self.group_dims, strict=True):
            x = g(batch)                                                          # (B, n_g, g_dim)
            parts.append(self.project[str(g_dim)](x) if str(g_dim) in self.project else x)
        if self.numeric is not None:
            parts.append(self.numeric(batch.numeric))
        found, whole = self.encoder(batch, self.embedding, full=self.aux is not None)
        found = self.dare_dropout(found)
        if self.proj_dim:
            parts.append(self.search_proj(found.flatten(1)).view(found.shape[0], -1, parts[0].shape[-1]))
        else:
            parts.append(self.search_proj(found))
        x = torch.cat(parts, dim=1)
        if self.se is not None:
            x = self.se(x)
        return (x.transpose(1, 2) if self.transpose else x), whole

    def forward(self, batch: Batch) -> ModelOutput:
        x, whole = self.fields(batch)

        def tower() -> Tensor:
            h = self.qnn(x)
            return self.head(self.mlp(h) if self.mlp is not None else h)

        out = self_ensemble(tower, self.ensemble_weight, self.training and self.ensemble,
                            (self.qnn, self.mlp, self.head))
        if self.aux is not None:
            out.logits = torch.cat([out.logits, self.aux_head(self.aux(whole.flatten(1)))], dim=1)
        return out
