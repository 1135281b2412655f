"""Stage 4 model: PLE (Tang et al., RecSys 2020) -- progressive layered extraction.

Each level (a CGC block) has shared experts and every task's own experts; a task's gate mixes its own and the
shared ones, and below the last level a shared gate mixes all of them for the next level. `levels: 1` is CGC.
Gates take the same stabilisers as MMoE's and log their usage per level and task.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.base import GatedConfig, check_config, check_expert_widths
from ctrpipe.models.heads import ModelOutput
from ctrpipe.models.layers.experts import CGCLevel, GateLog, TaskTowers
from ctrpipe.models.layers.inputs import FeatureInput
from ctrpipe.models.mmoe import gate_options
from ctrpipe.models.registry import register


@dataclass(frozen=True)
class PLEConfig(GatedConfig):
    levels: int = 2              # extraction levels (1 = CGC)
    shared_experts: int = 2      # per level
    task_experts: int = 2        # per task and level

    def __post_init__(self) -> None:
        super().__post_init__()
        check_expert_widths(self)
        for key in ("levels", "shared_experts", "task_experts"):
            value = getattr(self, key)
            check_config(isinstance(value, int) and value >= 1, key, value, "2")


@register("ple", PLEConfig, min_labels=2)
class PLE(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: PLEConfig, sparse: bool = False) -> None:
        super().__init__()
        self.inputs = FeatureInput(spec, cfg, sparse=sparse)
        dims = self.inputs.flat_dim
        self.levels = nn.ModuleList()
        for level in range(cfg.levels):
            block = CGCLevel(spec.n_tasks, dims, cfg.shared_experts, cfg.task_experts, cfg.hidden_units,
                             cfg.dropout, cfg.batch_norm, cfg.activation, gate_options(cfg),
                             last=level == cfg.levels - 1)
            self.levels.append(block)
            dims = block.out_dim
        self.towers = TaskTowers(dims, spec, cfg.tower_units, cfg.dropout, cfg.batch_norm, cfg.activation)
        self.task_names = spec.labels

    def forward(self, batch: Batch) -> ModelOutput:
        x = self.inputs(batch).flat                                            # (B, D_in)
        task_inputs, shared = [x] * len(self.task_names), x
        log = GateLog()
        for level, block in enumerate(self.levels):
            task_inputs, shared = block(task_inputs, shared, log, level, self.task_names)
        return ModelOutput(self.towers(task_inputs), aux_losses=log.aux, diagnostics=log.diagnostics)
