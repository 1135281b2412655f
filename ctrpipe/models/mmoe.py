"""Stage 4 model: MMoE (Ma et al., KDD 2018) -- shared experts, one softmax gate per task, one tower per task.

Each task mixes the same experts with its own gate, so tasks that disagree can use different experts
instead of fighting over one bottom. Gate usage per task (mean weight per expert, entropy) is logged; gate
temperature, noise and the entropy / load-balance regularisers keep gates from collapsing onto one expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import GatedConfig, check_config, check_expert_widths
from ctrpipe.models.heads import ModelOutput
from ctrpipe.models.layers.experts import Experts, Gate, GateLog, GateOptions, TaskTowers, mix
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class MMoEConfig(GatedConfig):
    n_experts: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_widths(self)
        check_config(isinstance(self.n_experts, int) and self.n_experts >= 1, "n_experts", self.n_experts, "4")


def gate_options(cfg: GatedConfig) -> GateOptions:
    return GateOptions(cfg.gate_temperature, cfg.gate_noise, cfg.gate_entropy, cfg.gate_balance)


@register("mmoe", MMoEConfig, min_labels=2)
class MMoE(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: MMoEConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dim = self.inputs.flat_dim
        self.experts = Experts(cfg.n_experts, dim, cfg.hidden_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.gates = nn.ModuleList(Gate(dim, cfg.n_experts, gate_options(cfg)) for _ in spec.labels)
        self.towers = TaskTowers(self.experts.out_dim, spec, cfg.tower_units, cfg.dropout, cfg.batch_norm,
                                 cfg.activation)
        self.task_names = spec.labels

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.inputs(batch).flat                                            # (B, D_in)
        experts = self.experts(x)                                              # (B, E, D)
        log = GateLog()
        mixed = []
        for name, gate in zip(self.task_names, self.gates, strict=True):
            w = gate(x)                                                        # (B, E)
            log.record(name, gate, w)
            mixed.append(mix(experts, w))
        return ModelOutput(self.towers(mixed), aux_losses=log.aux, diagnostics=log.diagnostics)
