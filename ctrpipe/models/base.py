"""Stage 4: config pieces every core model shares (embedding + numeric input options, the deep MLP options).

Model configs subclass these, so YAML keys stay flat (`model.embedding_dim`, `model.hidden_units`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from ctrpipe.errors import ConfigError

EmbeddingMode = Literal["shared", "per_field"]   # one offset-indexed table per dim vs one table per field
PoolingMode = Literal["mean", "sum"]             # how multihot bags are reduced
NumericMode = Literal["concat", "token"]         # raw values beside embeddings vs a vector per column
Activation = Literal["relu", "gelu", "silu"]


MIN_RECENCY_TAU = 1e-30     # sequence.recency_tau: smaller positive values round to 0 in float32


def check_config(ok: bool, key: str, value: Any, example: str, why: str = "") -> None:
    """Raise a ConfigError naming `model.<key>` and an example value unless `ok`."""
    if not ok:
        what = f"bad value {value!r} for 'model.{key}'" + (f": {why}" if why else "")
        raise ConfigError(what, where=f"model.{key}", fix=f"use e.g. model.{key}={example}")


def divisor_near(value: int, dim: int) -> int:
    """The largest divisor of `dim` not above `value` (at least 1): the example a `must divide` error gives."""
    return max(k for k in range(1, max(1, min(int(value), dim)) + 1) if dim % k == 0) if dim >= 1 else 1


def check_choice(value: Any, choices: Any, key: str) -> None:
    """Literal fields are checked by the YAML builder; this also guards configs built in Python."""
    options = get_args(choices)
    check_config(value in options, key, value, str(options[0]), why=f"choose one of {', '.join(options)}")


@dataclass(frozen=True)
class InputConfig:
    """How ids and numeric columns become vectors (see `layers.inputs.FeatureInput`)."""

    embedding_dim: int = 16
    embedding_mode: EmbeddingMode = "shared"
    # per-field overrides, e.g. {C3: 32}; unequal dims only suit models reading the flat vector (dnn, dcn*)
    field_dims: dict[str, int] = field(default_factory=dict, hash=False)
    embedding_init_std: float = 1e-2      # normal init std of the tables; 0 = zeros, except numeric tokens
    #                                       and DARE's attention table, which take 1e-2 instead
    multihot_pooling: PoolingMode = "mean"
    numeric: NumericMode = "token"

    def __post_init__(self) -> None:
        check_config(isinstance(self.embedding_dim, int) and self.embedding_dim >= 1,
                     "embedding_dim", self.embedding_dim, "16")
        check_choice(self.embedding_mode, EmbeddingMode, "embedding_mode")
        for name, dim in self.field_dims.items():
            check_config(isinstance(dim, int) and dim >= 1, f"field_dims.{name}", dim, "32")
        check_config(0.0 <= self.embedding_init_std <= 1.0, "embedding_init_std", self.embedding_init_std,
                     "0.01")
        check_choice(self.multihot_pooling, PoolingMode, "multihot_pooling")
        check_choice(self.numeric, NumericMode, "numeric")


@dataclass(frozen=True)
class DeepConfig(InputConfig):
    """InputConfig plus the options of one MLP (the "deep" part); empty `hidden_units`: no MLP."""

    hidden_units: tuple[int, ...] = (400, 400, 400)
    dropout: float = 0.1
    batch_norm: bool = False
    activation: Activation = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(all(isinstance(h, int) and h >= 1 for h in self.hidden_units), "hidden_units",
                     list(self.hidden_units), "[400,400,400]")
        check_config(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "0.1")
        check_choice(self.activation, Activation, "activation")


@dataclass(frozen=True)
class MultiTaskConfig(DeepConfig):
    """DeepConfig whose MLP is the shared bottom (or each expert), plus one tower per task."""

    numeric: NumericMode = "concat"
    hidden_units: tuple[int, ...] = (256, 128)   # the shared bottom, or each expert
    tower_units: tuple[int, ...] = (64,)         # each task's tower before its logit

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(all(isinstance(h, int) and h >= 1 for h in self.tower_units), "tower_units",
                     list(self.tower_units), "[64]")


@dataclass(frozen=True)
class GatedConfig(MultiTaskConfig):
    """MultiTaskConfig plus the softmax gates' stabilisers (see layers/experts.py)."""

    gate_temperature: float = 1.0   # softmax(logits / T): > 1 spreads weight over experts
    gate_noise: float = 0.0         # std of Gaussian noise on gate logits, training only
    gate_entropy: float = 0.0       # weight of the entropy regulariser (log E - mean row entropy)
    gate_balance: float = 0.0       # weight of the load-balance regulariser KL(mean gate || uniform)

    def __post_init__(self) -> None:
        super().__post_init__()
        # finite: an infinite temperature makes every gate uniform (the experts are never chosen), infinite
        # noise or regulariser weights a NaN loss at the first step; below 1e-6 the logits overflow alike
        check_config(1e-6 <= self.gate_temperature < math.inf, "gate_temperature", self.gate_temperature, "1.0")
        for key in ("gate_noise", "gate_entropy", "gate_balance"):
            check_config(0 <= getattr(self, key) < math.inf, key, getattr(self, key), "0.001")


def check_expert_widths(cfg: MultiTaskConfig) -> None:
    """MMoE's and PLE's experts are MLPs of `hidden_units`: with none, every expert would pass its input
    through unchanged and the gates would mix identical copies (accepted before, without a word)."""
    check_config(bool(cfg.hidden_units), "hidden_units", list(cfg.hidden_units), "[128,64]",
                 why="the experts are MLPs of these widths; with none, every expert passes its input through "
                     "unchanged and the gates mix identical copies")


SearchMode = Literal["soft", "hard"]
QueryMode = Literal["S1", "S2", "concat"]


# the shard setting that writes a behaviour history in its candidate's id space (in errors' fixes)
SHARD_A_HISTORY = "data.sequence: [{column: <history column>, share_ids_with: <candidate column>}]"


@dataclass(frozen=True)
class SequenceConfig:
    """`model.sequence`: which history a sequence model reads, against which candidate."""

    # accepted for configs written for other pipelines; shards always pad with id 0 (see `Batch`)
    FIXED_KEYS: ClassVar[dict[str, tuple[Any, str]]] = {
        "pad_id": (0, "shards pad every history with id 0 after its most recent token (see Batch)")}

    column: str = ""       # a data.sequence column; "" = the first one in the shards
    # the candidate: a categorical column in the history's id space (data.sequence[].share_ids_with);
    # "" = the column the history shares its ids with
    query_key: str = ""
    max_len: int = 0       # read only the most recent max_len stored tokens; 0 = all of them

    def __post_init__(self) -> None:
        check_config(isinstance(self.max_len, int) and self.max_len >= 0, "sequence.max_len", self.max_len, "50")


@dataclass(frozen=True)
class TfmConfig:
    """`model.sequence.tfm`: the transformer encoder run over the history before the search."""

    n_layers: int = 1      # encoder blocks (self-attention + feed-forward, pre-norm)
    n_heads: int = 2       # attention heads; must divide the attention dim (model.attention_dim)
    dropout: float = 0.1   # in attention and the feed-forward layer
    ffn_hidden: int = 0    # width of each block's feed-forward layer; 0 = 4 x the attention dim

    def __post_init__(self) -> None:
        check_config(self.n_layers >= 1, "sequence.tfm.n_layers", self.n_layers, "1")
        check_config(self.n_heads >= 1, "sequence.tfm.n_heads", self.n_heads, "2")
        check_config(0.0 <= self.dropout < 1.0, "sequence.tfm.dropout", self.dropout, "0.1")
        check_config(self.ffn_hidden >= 0, "sequence.tfm.ffn_hidden", self.ffn_hidden, "64")


@dataclass(frozen=True)
class SearchConfig(SequenceConfig):
    """SequenceConfig plus DARE's search over the history (see layers/sequence.py DecoupledSearch)."""

    # behaviours kept by the search; 0 = all (plain softmax attention; the default, as any top_k must be
    # at most the history's length: the shipped configs set 20, DARE's setting for 200-long histories)
    top_k: int = 0
    search: SearchMode = "soft"   # soft: the top_k best scores; hard: the top_k most recent behaviours
    # > 0: each score loses age / recency_tau (age 0 = the most recent behaviour) before the search, so
    # older behaviours must match better to be picked; 0 = off
    recency_tau: float = 0.0
    # what the search is keyed by: S1 = the candidate (query_key); S2 = the most recent behaviour (for
    # data whose candidate is not an item); concat = both searches, their outputs side by side
    query_mode: QueryMode = "S1"
    transformer_block: bool = False   # contextualise the history's attention vectors with `tfm` first
    tfm: TfmConfig = field(default_factory=TfmConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(isinstance(self.top_k, int) and self.top_k >= 0, "sequence.top_k", self.top_k, "20")
        check_choice(self.search, SearchMode, "sequence.search")
        # ages are divided by it in float32: a positive value that rounds to 0 there made 0/0 = NaN scores
        check_config(self.recency_tau == 0 or self.recency_tau >= MIN_RECENCY_TAU, "sequence.recency_tau",
                     self.recency_tau, "20.0", why=f"0 (off) or at least {MIN_RECENCY_TAU:g}")
        check_choice(self.query_mode, QueryMode, "sequence.query_mode")
