"""Stage 4 shared layer: factorisation-machine terms (first-order linear part, second-order pairwise part)."""

from __future__ import annotations

from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import PoolingMode
from ctrpipe.models.layers.embedding import FieldEmbedding


def fm_interaction(fields: Tensor) -> Tensor:
    """Sum of <v_i, v_j> over field pairs i<j, in O(F*D): 0.5 * sum_D((sum_i v_i)^2 - sum_i v_i^2)."""
    square_of_sum = fields.sum(dim=1).pow(2)                  # (B, D)
    sum_of_square = fields.pow(2).sum(dim=1)                  # (B, D)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)   # (B, 1)


class LinearTerm(nn.Module):
    """First-order term: a weight per id (a dim-`n_out` embedding summed over fields) + a numeric linear map.

    Starts at zero so that, with the head's prior bias, the model first predicts the label rate.
    """

    def __init__(self, spec: FeatureSpec, n_out: int, sparse: bool = False,
                 pooling: PoolingMode = "mean") -> None:
        super().__init__()
        self.weights = FieldEmbedding(spec, n_out, sparse=sparse, pooling=pooling, init_std=0.0) \
            if spec.id_fields else None
        self.numeric = nn.Linear(spec.n_numeric, n_out, bias=False) if spec.n_numeric else None
        if self.numeric is not None:
            nn.init.zeros_(self.numeric.weight)

    def forward(self, batch: Batch) -> Tensor:
        out = 0
        if self.weights is not None:
            out = self.weights(batch).sum(dim=1)               # (B, F, T) -> (B, T)
        if self.numeric is not None:
            out = out + self.numeric(batch.numeric)            # (B, T)
        return out
