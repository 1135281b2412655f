"""Stage 4 model: ESMM (Ma et al., SIGIR 2018) -- conversion modelled over the whole impression space.

Any registered model (`backbone`, e.g. shared_bottom, mmoe, ple, dnn, deepfm, dcnv2) is built with two heads,
ctr and cvr, each starting at its own prior; ESMM multiplies them: p_ctcvr = p_ctr * p_cvr, in log space
(log p_ctcvr = logsigmoid(z_ctr) + logsigmoid(z_cvr)), so the loss stays finite for tiny conversion rates.
Heads: ctr (click, all impressions), ctcvr (click AND conversion, all impressions) and cvr (conversion on
clicked rows only; loss weight 0 by default -- ESMM trains cvr through ctcvr -- set
train.tasks.cvr.weight for an auxiliary loss). The primary metric weighs ctcvr 1.0, ctr 0.2, cvr 0.2
(train.tasks.<head>.metric_weight changes it).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.heads import (
    Head,
    ModelOutput,
    as_output,
    check_labels,
    heads_of,
    logit_from_log_prob,
    spec_for_heads,
)
from ctrpipe.models.registry import build_model, config_class, register


@dataclass(frozen=True)
class ESMMConfig:
    backbone: str = "shared_bottom"      # any registered model; it gets two heads: ctr and cvr
    backbone_params: dict[str, Any] = field(default_factory=dict, hash=False)   # its model.* keys
    click_label: str = ""                # default: the cache's first label
    conversion_label: str = ""           # default: the cache's second label

    def __post_init__(self) -> None:
        if self.backbone == "esmm":
            raise ConfigError("ESMM cannot be its own backbone", where="model.backbone",
                              fix="use e.g. model.backbone=mmoe")
        self.backbone_config()               # a bad backbone or backbone key fails when the config loads

    def backbone_config(self) -> Any:
        """The backbone's own config, built from backbone_params; its errors name model.backbone(_params.*)."""
        from ctrpipe.config import build_dataclass
        from ctrpipe.models.registry import model_names

        if self.backbone not in model_names():
            close = difflib.get_close_matches(self.backbone, model_names(), n=1)
            raise ConfigError(f"unknown backbone {self.backbone!r}", where="model.backbone",
                              fix=(f"did you mean {close[0]!r}? " if close else "") + "backbones: " +
                                  ", ".join(n for n in model_names() if n != "esmm"))
        try:
            return build_dataclass(config_class(self.backbone), self.backbone_params, "model.backbone_params.",
                                   "model")
        except ConfigError as exc:
            raise as_backbone_error(exc) from None


def as_backbone_error(exc: ConfigError) -> ConfigError:
    """The backbone's checks name its keys as model.<key>; under ESMM they are model.backbone_params.<key>."""
    def nested(text: str) -> str:
        return re.sub(r"\bmodel\.(?!backbone)", "model.backbone_params.", text)     # ESMM's own keys stay
    return ConfigError(nested(exc.what), where=nested(exc.where), fix=nested(exc.fix))


def esmm_labels(spec: FeatureSpec, click: str, conversion: str) -> tuple[str, str]:
    """(click, conversion) label names: each defaults to the first of the cache's labels the other does not
    take (`click_label: converted` alone made `converted` both, a model whose cvr head is all positives)."""
    click = click or next(n for n in spec.labels if n != conversion)
    conversion = conversion or next(n for n in spec.labels if n != click)
    if click == conversion:
        raise ConfigError(f"ESMM needs two labels, and {click!r} is set as both the click and the conversion label",
                          where="model.click_label / model.conversion_label",
                          fix=f"name two of the cache's labels {list(spec.labels)}, e.g. "
                              f"model.click_label={spec.labels[0]} model.conversion_label={spec.labels[1]}")
    return click, conversion


def esmm_heads(click: str, conversion: str) -> tuple[Head, ...]:
    return (Head("ctr", (click,), metric_weight=0.2),
            Head("ctcvr", (click, conversion), metric_weight=1.0),
            Head("cvr", (conversion,), mask=click, loss_weight=0.0, metric_weight=0.2))


@register("esmm", ESMMConfig, min_labels=2)
class ESMM(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ESMMConfig, sparse: bool = False) -> None:
        super().__init__()
        click, conversion = esmm_labels(spec, cfg.click_label, cfg.conversion_label)
        self.heads = esmm_heads(click, conversion)
        check_labels(spec, self.heads, "esmm")
        params = cfg.backbone_config()
        # the backbone predicts ctr and cvr as two ordinary heads, each starting at its own prior
        inner = spec_for_heads(spec, (self.heads[0], self.heads[2]))
        try:               # checks against the cache (e.g. head names) run when the backbone is built
            self.backbone = build_model(cfg.backbone, params, inner, sparse=sparse)
        except ConfigError as exc:
            raise as_backbone_error(exc) from None
        extra = [h.name for h in heads_of(self.backbone, inner)][2:]
        if extra:   # ESMM reads exactly two logit columns (ctr, cvr); more would be misread or dropped
            raise ConfigError(f"ESMM's backbone {cfg.backbone!r} predicts heads {extra} besides ctr and cvr",
                              where="model.backbone_params",
                              fix="turn the backbone's extra heads off (dare: model.backbone_params."
                                  "aux_loss_weight: 0; dare_qnn: model.backbone_params.qnn_alpha."
                                  "aux_head_weight: 0)")

    def forward(self, batch: Batch) -> ModelOutput:
        out = as_output(self.backbone(batch))
        z_ctr, z_cvr = out.logits.float().unbind(dim=1)                       # (B,), (B,)
        log_ctr, log_cvr = F.logsigmoid(z_ctr), F.logsigmoid(z_cvr)
        log_ctcvr = log_ctr + log_cvr
        logits = torch.stack([z_ctr, logit_from_log_prob(log_ctcvr), z_cvr], dim=1)      # (B, 3)
        log_probs = torch.stack([log_ctr, log_ctcvr, log_cvr], dim=1)
        return ModelOutput(logits, log_probs=log_probs, aux_losses=out.aux_losses, diagnostics=out.diagnostics)
