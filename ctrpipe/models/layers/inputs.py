"""Stage 4 shared layer: a Batch -> the inputs models consume (field-stacked vectors and one flat vector).

One place decides how numeric columns enter a model: `numeric="concat"` appends raw values to the flat vector
(DNN style); `numeric="token"` turns each column into one more field (FM / cross / attention models).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import InputConfig
from ctrpipe.models.layers.embedding import FieldEmbedding
from ctrpipe.models.layers.numeric import NumericTokenizer


class InputTensors(NamedTuple):
    fields: Tensor | None   # (B, F, D): id fields then numeric tokens; None when field dims differ
    # (B, flat_dim) as consecutive parts: the flattened fields, then raw numeric values in "concat" mode.
    # MLP and OutputHead read parts without concatenating them (see fused.py); `flat` concatenates.
    flat_parts: tuple[Tensor, ...]

    @property
    def flat(self) -> Tensor:
        """(B, flat_dim): fields flattened, plus raw numeric values in "concat" mode."""
        parts = self.flat_parts
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class FeatureInput(nn.Module):
    """Embeddings of every id field + numeric columns (raw or tokenised), computed once per batch."""

    def __init__(self, spec: FeatureSpec, cfg: InputConfig, sparse: bool = False,
                 unpooled: Collection[str] = ()) -> None:
        """`unpooled`: sequence/multihot fields a model reads itself (attention), left out of the inputs."""
        super().__init__()
        if not spec.id_fields and spec.n_numeric == 0:
            raise SchemaError("the feature spec has no numeric and no id fields", where="manifest",
                              fix="shard data with at least one feature column")
        self.embedding = FieldEmbedding(spec, dict(cfg.field_dims), mode=cfg.embedding_mode, sparse=sparse,
                                        pooling=cfg.multihot_pooling, init_std=cfg.embedding_init_std,
                                        default_dim=cfg.embedding_dim, unpooled=unpooled) if spec.id_fields else None
        tokens = cfg.numeric == "token" and spec.n_numeric > 0
        self.tokenizer = NumericTokenizer(spec.n_numeric, cfg.embedding_dim,
                                          init_std=cfg.embedding_init_std) if tokens else None
        self.concat_numeric = cfg.numeric == "concat" and spec.n_numeric > 0
        emb_dims = self.embedding.field_dims if self.embedding is not None else ()
        dims = emb_dims + ((cfg.embedding_dim,) * spec.n_numeric if tokens else ())
        self.n_fields = len(dims)
        self.field_names = (self.embedding.field_names if self.embedding is not None else ()) + \
            (spec.numeric if tokens else ())
        # None when field dims differ (or there are no fields): only the flat vector is available then
        self.dim: int | None = dims[0] if dims and len(set(dims)) == 1 else None
        self.flat_dim = sum(dims) + (spec.n_numeric if self.concat_numeric else 0)

    def require_fields(self, model: str) -> int:
        """For models that interact fields: the common field dim, or a ConfigError explaining why not."""
        if self.dim is None:
            if self.n_fields == 0:
                raise ConfigError(f"{model} needs at least one field, and numeric='concat' leaves none",
                                  where="model.numeric", fix="use model.numeric=token")
            raise ConfigError(f"{model} interacts fields and needs one embedding dim for all of them",
                              where="model.field_dims", fix="remove model.field_dims (or give every field "
                              "model.embedding_dim)")
        return self.dim

    def forward(self, batch: Batch) -> InputTensors:
        parts: list[Tensor] = []
        if self.dim is not None:
            if self.embedding is not None:
                parts.append(self.embedding(batch))                      # (B, Fid, D)
            if self.tokenizer is not None:
                parts.append(self.tokenizer(batch.numeric))              # (B, Fn, D)
            fields = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            flat = [fields.flatten(1)]
        else:
            fields = None
            flat = []
            if self.embedding is not None:
                flat.append(self.embedding.flat(batch))
            if self.tokenizer is not None:
                flat.append(self.tokenizer(batch.numeric).flatten(1))
        if self.concat_numeric:
            flat.append(batch.numeric)
        return InputTensors(fields, tuple(flat))
