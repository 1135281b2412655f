"""Stage 4 shared layer: QNN-α quadratic interaction layers and the self-ensemble training rule.

QNN-α (Quadratic Neural Networks, KDD'25, arXiv 2505.17999; reference code: FuxiCTR `model_zoo/QNN`).
One layer, on field embeddings x of shape (F, d), D = F*d, R rows ("rank") and H heads::

    h      = dropout(act(norm(W x + b)))          # W: D -> R*D; h read as (H, R, D/H)
    g_k    = sum_r h[k, r]                         # (H, D/H): the rows of head k, summed
    prod_k = x_k ⊙ g_k                             # x_k = x[:, k*d/H:(k+1)*d/H], the k-th slice of every field
    x'     = dropout(concat_k(prod_k) + x)         # the residual only with use_residual

The sum over rows comes before the product because the product distributes over it:
sum_r (x_k ⊙ h[k, r]) = x_k ⊙ sum_r h[k, r]; one (B, D) multiply instead of R of them.

What heads mean, exactly: head k takes the k-th d/H-wide slice of every field, i.e. the (F, d/H) block
x[:, k*d/H:(k+1)*d/H], read field by field. The products of the heads are laid one after the other
(head-major: the (H, F, d/H) tensor flattened) and that flat D-vector is read back as (F, d) for the residual
and the next layer, as the reference does. With H = 1 this is plain x ⊙ g. With H > 1 the product term
of position i multiplies another position of x (the head-major relabelling of i), so each output mixes two
input positions. Were the products laid back in x's own order instead, the heads would only relabel W's rows
and `heads` would change nothing. `heads` must divide d.

Self-ensemble (training only): the tower runs twice on the same embeddings, with two dropout draws, giving
logits z1, z2. The prediction is p̄ = (σ(z1) + σ(z2)) / 2, returned as its logit so the objective's BCE
against the labels is BCE(p̄, y). The auxiliary loss is BCE(σ(z1), sg(p̄)) + BCE(σ(z2), sg(p̄)), where sg
stops the gradient, times a weight, less the entropy of sg(p̄) (no gradient: see `consistency_loss`).
Inference runs one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctrpipe.models.base import Activation
from ctrpipe.models.heads import ModelOutput

QNNNorm = Literal["none", "batch", "layer"]   # normalisation of W x, before the activation

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class QuadraticLayer(nn.Module):
    """One QNN-α layer: (B, F, d) -> (B, F, d). See the module docstring for the math and the heads."""

    def __init__(self, n_fields: int, field_dim: int, rank: int = 3, heads: int = 1, dropout: float = 0.0,
                 norm: QNNNorm = "none", activation: Activation = "relu", use_residual: bool = True) -> None:
        super().__init__()
        if field_dim % heads:
            raise ValueError(f"heads={heads} must divide the field dim {field_dim}")
        dim = n_fields * field_dim
        self.n_fields, self.field_dim, self.rank, self.n_heads = n_fields, field_dim, rank, heads
        self.use_residual = use_residual
        self.linear = nn.Linear(dim, rank * dim, bias=norm != "batch")   # BN's shift replaces the bias
        self.norm: nn.Module = nn.BatchNorm1d(rank * dim) if norm == "batch" else \
            nn.LayerNorm(rank * dim) if norm == "layer" else nn.Identity()
        # in place is safe: ReLU's backward reads its output, and nothing else reads what it overwrites
        self.act = nn.ReLU(inplace=True) if activation == "relu" else _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, f, d = x.shape
        hd = d // self.n_heads
        h = self.dropout(self.act(self.norm(self.linear(x.reshape(b, f * d)))))   # (B, R*D)
        g = h.view(b, self.n_heads, self.rank, f * hd).sum(dim=2)                 # (B, H, F*d/H)
        if self.n_heads == 1:
            xh = x.reshape(b, 1, f * d)                                           # no copy
        else:
            xh = x.view(b, f, self.n_heads, hd).transpose(1, 2).reshape(b, self.n_heads, f * hd)  # (B, H, F*d/H)
        out = (xh * g).reshape(b, f, d)               # head-major products read back as (F, d)
        if self.use_residual:
            out = out + x
        return self.dropout(out)                      # the reference drops each layer's output too


class QuadraticInteraction(nn.Module):
    """A stack of QNN-α layers on field embeddings: (B, F, d) -> (B, F*d), flat for a linear output.

    Usable on any field tensor: dense extras (pooled histories, co-visitation counts) join as more fields,
    e.g. a Linear to d per extra vector (as `NumericTokenizer` does for numeric columns), concatenated on F.
    """

    def __init__(self, n_fields: int, field_dim: int, num_layers: int = 3, rank: int = 3, heads: int = 1,
                 dropout: float = 0.0, norm: QNNNorm = "none", activation: Activation = "relu",
                 use_residual: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(QuadraticLayer(n_fields, field_dim, rank, heads, dropout, norm, activation,
                                                     use_residual) for _ in range(num_layers)))
        self.out_dim = n_fields * field_dim

    def forward(self, fields: Tensor) -> Tensor:
        return self.layers(fields).flatten(1)          # (B, F*d)


def mean_probability_logit(z1: Tensor, z2: Tensor) -> Tensor:
    """logit((σ(z1) + σ(z2)) / 2), finite for any finite logits.

    log p̄ = logaddexp(log σ(z1), log σ(z2)) - log 2 and log(1 - p̄) likewise with σ(-z); the log 2 cancels.
    log σ(z) = -softplus(-z), so nothing saturates even when both probabilities round to 0 or 1.
    """
    z1, z2 = z1.float(), z2.float()
    return torch.logaddexp(-F.softplus(-z1), -F.softplus(-z2)) - torch.logaddexp(-F.softplus(z1),
                                                                                -F.softplus(z2))


def consistency_loss(z1: Tensor, z2: Tensor, mean_logit: Tensor) -> Tensor:
    """KL(sg(p̄) || σ(z1)) + KL(sg(p̄) || σ(z2)), each the mean over rows of a head, averaged over heads.

    The reference's BCE(σ(z_i), sg(p̄)) minus the entropy of sg(p̄): that entropy has no gradient, so
    training is the same, and the term reads 0 when the passes agree instead of adding ~2 x 0.5 nats to
    the logged loss (which then compares with other models' losses). H(p̄) = BCE(logit p̄, p̄), both stable.
    Scored on every row, whatever the heads' label masks: the term needs no label, and a row outside a
    head's mask (conversion on an unclicked impression) is still a row whose two passes should agree.
    """
    mean_logit = mean_logit.detach()
    target = torch.sigmoid(mean_logit)                                          # (B, H)
    entropy = F.binary_cross_entropy_with_logits(mean_logit, target, reduction="none")
    per_row = F.binary_cross_entropy_with_logits(z1.float(), target, reduction="none") + \
        F.binary_cross_entropy_with_logits(z2.float(), target, reduction="none") - 2.0 * entropy
    return per_row.mean(dim=0).mean()


def self_ensemble(tower: Callable[[], Tensor], weight: float, active: bool,
                  stateful: Sequence[nn.Module | None] = ()) -> ModelOutput:
    """Run `tower` (a closure over the embeddings, returning (B, H) logits) once, or, when `active`
    (training with a stochastic tower), twice: logits = logit(p̄) and aux_losses["self_ensemble"] =
    weight * consistency_loss. The embeddings are computed once, outside the closure, so only the tower's
    cost doubles; diagnostics["self_ensemble.gap"] is the mean |σ(z1) - σ(z2)| (how much the passes differ).
    The batch norms in `stateful` (the tower's modules) update their running statistics on the first pass
    only: one step is one batch, as for every other model, whatever the number of passes.
    """
    if not active:
        return ModelOutput(logits=tower())
    z1 = tower()
    with _running_stats_frozen(stateful):
        z2 = tower()                                                            # another dropout draw
    mean_logit = mean_probability_logit(z1, z2)
    aux = {"self_ensemble": weight * consistency_loss(z1, z2, mean_logit)} if weight > 0 else {}
    with torch.no_grad():
        gap = (torch.sigmoid(z1.float()) - torch.sigmoid(z2.float())).abs().mean()
    return ModelOutput(logits=mean_logit, aux_losses=aux, diagnostics={"self_ensemble.gap": gap})


@contextmanager
def _running_stats_frozen(modules: Sequence[nn.Module | None]) -> Iterator[None]:
    """Batch norms normalise by the batch as usual, but leave their running statistics as they were: a
    momentum of 0 keeps them (no copy of the buffers), and the batch count is put back."""
    norms = [m for module in modules if module is not None for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.sub_(1)
