"""Stage 4 model: DeepFM -> input composer -> MMoE -> per-task towers, plus wide/FM logits on chosen heads.

The multi-task architecture the project grew from (with ESMM on top: `cfgs/deepfm_mmoe_esmm.yaml`):
- DeepFM backbone: the first-order linear term, the FM vector 0.5 * ((sum_i e_i)^2 - sum_i e_i^2) / F (per
  embedding dimension, normalised by the field count F), and a deep MLP over the flat inputs;
- the composer projects each part (deep output, FM vector, mean of the field embeddings) to a common width
  with LayerNorm and dropout, concatenates them and runs an adapter MLP, so no part dominates by scale;
- MMoE mixes experts over the adapter's output per task (gate stabilisers as in mmoe.py), one tower per task;
- the wide logits (first-order term + the FM pairwise term) are added to the heads named in `wide_heads`
  (for ESMM's backbone: ctr yes, cvr no -- the FM signal is about clicks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import GatedConfig, NumericMode, check_config
from ctrpipe.models.heads import ModelOutput
from ctrpipe.models.layers.experts import Experts, Gate, GateLog, TaskTowers, mix
from ctrpipe.models.layers.fm import LinearTerm, fm_interaction
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.mmoe import gate_options
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class DeepFMMMoEConfig(GatedConfig):
    numeric: NumericMode = "token"              # numeric columns are FM fields too
    hidden_units: tuple[int, ...] = (256, 128)  # DeepFM's deep MLP
    composer_width: int = 64                    # each part is projected to this width
    adapter_units: tuple[int, ...] = (128,)     # MLP over the concatenated projections
    n_experts: int = 4
    expert_units: tuple[int, ...] = (64,)
    wide_heads: tuple[str, ...] = ("all",)      # heads that get the wide (first-order + FM) logit; [] = none

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(isinstance(self.composer_width, int) and self.composer_width >= 1, "composer_width",
                     self.composer_width, "64")
        check_config(isinstance(self.n_experts, int) and self.n_experts >= 1, "n_experts", self.n_experts, "4")
        for key in ("adapter_units", "expert_units"):
            units = getattr(self, key)
            check_config(bool(units) and all(isinstance(u, int) and u >= 1 for u in units), key, list(units),
                         "[64]")


class _Project(nn.Module):
    """Linear to a common width -> LayerNorm -> dropout: one composer input."""

    def __init__(self, in_dim: int, width: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.LayerNorm(width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register("deepfm_mmoe", DeepFMMMoEConfig, min_labels=2)
class DeepFMMMoE(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: DeepFMMMoEConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.require_fields("deepfm_mmoe")
        self.linear = LinearTerm(spec, spec.n_tasks, sparse=sparse, pooling=cfg.multihot_pooling)
        self.fm_scale = nn.Parameter(torch.ones(spec.n_tasks))
        self.deep = MLP(self.inputs.flat_dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        w = cfg.composer_width
        self.project = nn.ModuleList([_Project(self.deep.out_dim, w, cfg.dropout), _Project(dim, w, cfg.dropout),
                                      _Project(dim, w, cfg.dropout)])
        self.adapter = MLP(3 * w, cfg.adapter_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.experts = Experts(cfg.n_experts, self.adapter.out_dim, cfg.expert_units, cfg.dropout,
                               cfg.batch_norm, cfg.activation)
        self.gates = nn.ModuleList(Gate(self.adapter.out_dim, cfg.n_experts, gate_options(cfg))
                                   for _ in spec.labels)
        self.towers = TaskTowers(self.experts.out_dim, spec, cfg.tower_units, cfg.dropout, cfg.batch_norm,
                                 cfg.activation)
        self.task_names = spec.labels
        wide = spec.labels if "all" in cfg.wide_heads else cfg.wide_heads
        unknown = sorted(set(wide) - set(spec.labels))
        check_config(not unknown, "wide_heads", list(cfg.wide_heads), f"[{spec.labels[0]}]",
                     why=f"unknown heads {unknown}; this model's heads are {', '.join(spec.labels)}")
        self.register_buffer("wide_mask", torch.tensor([float(t in wide) for t in spec.labels]), persistent=False)

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.inputs(batch)
        fields = x.fields                                                        # (B, F, D)
        total = fields.sum(dim=1)
        fm_vec = 0.5 * (total * total - (fields * fields).sum(dim=1)) / fields.shape[1]     # (B, D)
        deep = self.deep(*x.flat_parts)                                          # (B, H)
        parts = [p(v) for p, v in zip(self.project, (deep, fm_vec, fields.mean(dim=1)), strict=True)]
        h = self.adapter(torch.cat(parts, dim=1))                                # (B, A)
        experts = self.experts(h)                                                # (B, E, D_e)
        log = GateLog()
        mixed = []
        for name, gate in zip(self.task_names, self.gates, strict=True):
            weights = gate(h)
            log.record(name, gate, weights)
            mixed.append(mix(experts, weights))
        wide = self.linear(batch) + fm_interaction(fields) * self.fm_scale       # (B, T)
        logits = self.towers(mixed) + wide * self.wide_mask
        return ModelOutput(logits, aux_losses=log.aux, diagnostics=log.diagnostics)
