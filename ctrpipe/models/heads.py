"""Stage 4 -> 5 contract: what a model predicts (its heads) and what it returns (`ModelOutput`).

A head is one predicted probability scored against the cache's labels. Most models have one head per label
(`default_heads`). A model may declare its own (ESMM: ctr, ctcvr = click AND conversion over all
impressions, cvr = conversion on clicked rows only), with a default loss weight and a default weight in the
primary metric; `train.tasks.<head>` overrides both (train/objective.py). Models never see labels or losses:
they return logits, and optionally log-probabilities, auxiliary losses and diagnostics.

Example: a cache labelled (clicked, converted) and ESMM::

    heads = (Head("ctr", ("clicked",)), Head("ctcvr", ("clicked", "converted")),
             Head("cvr", ("converted",), mask="clicked", loss_weight=0.0, metric_weight=0.2))
    ModelOutput(logits=(B, 3), log_probs=(B, 3))       # columns in head order
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ctrpipe.errors import SchemaError
from ctrpipe.features import FeatureSpec

RATE_CLAMP = 1e-4   # keeps logit(rate) finite for a label that is all 0 or all 1 in the train split
LOG_HALF = -0.6931471805599453


@dataclass(frozen=True)
class Head:
    name: str                   # metric suffix (auc.<name>) and key of train.tasks.<name>
    labels: tuple[str, ...]     # the target is the AND of these label columns (usually one)
    mask: str = ""              # only rows where this label is 1 count, in loss and metrics ("" = all rows)
    loss_weight: float = 1.0    # default weight of this head's loss
    metric_weight: float = 1.0  # default weight of this head in the primary (mean) metrics
    # an auxiliary head predicting the same target as head `shadows` from other features (DARE's
    # "<label>_full"): unless train.tasks names it, it takes that head's task settings (mask, pos_weight,
    # focal) and its loss weight is `loss_weight` times that head's, so the two always train on the same rows
    shadows: str = ""


@dataclass
class ModelOutput:
    """What `model(batch)` returns (a bare (B, H) logits tensor is read as `ModelOutput(logits)`)."""

    logits: Tensor                          # (B, H) one column per head, in the model's head order
    # (B, H) log-probabilities, when a head's probability is a product of others (ESMM): the loss is then
    # computed from them, which stays finite where the logit of a tiny product is not
    log_probs: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)    # weighted, added to the loss as they are
    diagnostics: dict[str, Tensor] = field(default_factory=dict)   # detached scalars logged as running means


def as_output(out: Tensor | ModelOutput) -> ModelOutput:
    return out if isinstance(out, ModelOutput) else ModelOutput(logits=out)


def default_heads(spec: FeatureSpec) -> tuple[Head, ...]:
    """One head per label column, named after it."""
    return tuple(Head(label, (label,)) for label in spec.labels)


def heads_of(model: object, spec: FeatureSpec) -> tuple[Head, ...]:
    """A model's declared `heads`, or one per label."""
    heads = getattr(model, "heads", None)
    return tuple(heads) if heads is not None else default_heads(spec)


def label_rate(spec: FeatureSpec, label: str) -> float:
    rates = list(spec.label_rates)
    if len(rates) == 1 and spec.n_tasks > 1:
        rates = rates * spec.n_tasks
    if len(rates) != spec.n_tasks:
        raise SchemaError(f"{len(rates)} label rates for {spec.n_tasks} labels {list(spec.labels)}",
                          where="feature spec (manifest)", fix="rebuild the shards so every label has a rate")
    return float(rates[spec.labels.index(label)])


def prior_logit(rate: float) -> float:
    """logit(rate), with the rate clamped to [1e-4, 1 - 1e-4]."""
    r = min(max(float(rate), RATE_CLAMP), 1.0 - RATE_CLAMP)
    return math.log(r / (1.0 - r))


def joint_rate(spec: FeatureSpec, labels: tuple[str, ...]) -> float:
    """The train rate of every one of `labels` positive (their AND).

    Exact for one label, and for two whose pair rate the manifest records; otherwise the least of the rates
    it has (marginal and pair), which is exact when the labels nest (a conversion only after a click)."""
    names = tuple(dict.fromkeys(labels))
    rates = [label_rate(spec, name) for name in names]
    inside = set(names)
    rates += [r for a, b, r in spec.label_pair_rates if a in inside and b in inside]
    return min(rates)


def head_rate(spec: FeatureSpec, head: Head) -> float:
    """A head's train positive rate from the manifest's label rates: of the AND of its labels, over the rows
    its mask keeps (conversion given click: rate(conversion AND click) / rate(click))."""
    if not head.mask:
        return min(joint_rate(spec, head.labels), 1.0)
    rate = joint_rate(spec, (*head.labels, head.mask)) / max(label_rate(spec, head.mask), RATE_CLAMP)
    return min(rate, 1.0)


def positives_outside_mask(spec: FeatureSpec, label: str, mask: str) -> float | None:
    """The share of `label`'s train positives on rows where `mask` is 0, which a head of `label` masked by
    `mask` never sees; None without the pair's rate (a cache built before they were recorded)."""
    if label == mask:
        return 0.0
    pair = next((r for a, b, r in spec.label_pair_rates if {a, b} == {label, mask}), None)
    rate = label_rate(spec, label)
    if pair is None or rate <= 0.0:
        return None
    return max(rate - pair, 0.0) / rate


def spec_for_heads(spec: FeatureSpec, heads: tuple[Head, ...]) -> FeatureSpec:
    """`spec` with one pseudo-label per head and its rate: lets any model build one output per head with the
    right prior (ESMM builds its backbone on the ctr and cvr heads this way)."""
    return replace(spec, labels=tuple(h.name for h in heads),
                   label_rates=tuple(head_rate(spec, h) for h in heads), label_pair_rates=())


def check_labels(spec: FeatureSpec, heads: tuple[Head, ...], model: str) -> None:
    """Every label a head names must exist in the cache."""
    for h in heads:
        for name in (*h.labels, *((h.mask,) if h.mask else ())):
            if name not in spec.labels:
                raise SchemaError(f"model {model!r} head {h.name!r} needs label {name!r}, the cache has "
                                  f"{list(spec.labels)}", where="model",
                                  fix="shard data with that label, or set the model's label names "
                                      "(e.g. model.click_label / model.conversion_label)")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's split at -log 2)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def logit_from_log_prob(log_p: Tensor) -> Tensor:
    """log p - log(1 - p): the logit of a probability given in log space (finite for tiny p)."""
    return log_p - log1mexp(log_p)
