"""Stage 4 shared layers of the multi-task models: expert MLPs, softmax gates with their stabilisers,
MMoE and CGC/PLE mixing, and per-task towers.

A gate turns its input into weights over experts, softmax(logits / temperature), with Gaussian noise on the
logits in training only. Two regularisers fight gate collapse (every row, or every task, sending all its
weight to one expert): the entropy term `entropy_weight * (log E - mean row entropy)` (0 for uniform rows)
and the load-balance term `balance_weight * KL(mean gate || uniform)` (0 when experts are used equally).
Both reach the objective through `ModelOutput.aux_losses`; gate usage reaches the logs as diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ctrpipe.features import FeatureSpec
from ctrpipe.models.base import Activation
from ctrpipe.models.layers.mlp import MLP
from ctrpipe.models.layers.output import prior_logits


@dataclass(frozen=True)
class GateOptions:
    temperature: float = 1.0      # > 1 flattens the gate's softmax, < 1 sharpens it
    noise_std: float = 0.0        # Gaussian noise on the gate logits, training only
    entropy_weight: float = 0.0   # weight of (log E - mean row entropy)
    balance_weight: float = 0.0   # weight of KL(mean gate weights || uniform)


def gate_entropy(weights: Tensor) -> Tensor:
    """Mean over rows of the entropy of (B, E) gate weights."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=1).mean()


def balance_kl(weights: Tensor) -> Tensor:
    """KL(mean over rows of (B, E) gate weights || uniform over E experts)."""
    mean = weights.mean(dim=0)
    return (mean * (mean.clamp_min(1e-12) * weights.shape[1]).log()).sum()


class Gate(nn.Module):
    """(B, in_dim) -> (B, E) softmax weights over E experts."""

    def __init__(self, in_dim: int, n_experts: int, opts: GateOptions) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.opts = opts

    def forward(self, x: Tensor) -> Tensor:
        logits = self.linear(x)
        if self.training and self.opts.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.opts.noise_std
        return torch.softmax(logits.float() / self.opts.temperature, dim=1)

    def regulariser(self, weights: Tensor) -> Tensor | None:
        """The weighted entropy + load-balance terms for these weights (None when both are off)."""
        o = self.opts
        if o.entropy_weight <= 0 and o.balance_weight <= 0:
            return None
        loss = weights.new_zeros(())
        if o.entropy_weight > 0:
            loss = loss + o.entropy_weight * (math.log(weights.shape[1]) - gate_entropy(weights))
        if o.balance_weight > 0:
            loss = loss + o.balance_weight * balance_kl(weights)
        return loss


class GateLog:
    """Collects one forward's gate regularisers and usage statistics under readable names."""

    def __init__(self) -> None:
        self.aux: dict[str, Tensor] = {}
        self.diagnostics: dict[str, Tensor] = {}

    def record(self, name: str, gate: Gate, weights: Tensor) -> None:
        reg = gate.regulariser(weights)
        if reg is not None:
            self.aux[f"gate_reg.{name}"] = reg
        with torch.no_grad():
            usage = weights.mean(dim=0)                                # (E,) mean weight per expert
            for e in range(usage.shape[0]):
                self.diagnostics[f"gate.{name}.e{e}"] = usage[e]
            self.diagnostics[f"gate_entropy.{name}"] = gate_entropy(weights)


class Experts(nn.Module):
    """E expert MLPs over one input: (B, in_dim) -> (B, E, out_dim)."""

    def __init__(self, n: int, in_dim: int, hidden: tuple[int, ...], dropout: float, batch_norm: bool,
                 activation: Activation) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MLP(in_dim, hidden, dropout, batch_norm, activation) for _ in range(n))
        self.out_dim = self.experts[0].out_dim if n else in_dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([e(x) for e in self.experts], dim=1)       # loop over (few) experts, not rows


def mix(experts: Tensor, weights: Tensor) -> Tensor:
    """(B, E, D) experts and (B, E) weights -> (B, D) weighted sum."""
    return torch.bmm(weights.unsqueeze(1).to(experts.dtype), experts).squeeze(1)


class CGCLevel(nn.Module):
    """One extraction level of PLE: shared experts plus each task's own, a gate per task over (its own +
    shared) experts, and -- below the last level -- a shared gate over all experts feeding the next level.

    forward(task_inputs: T x (B, D_in), shared_input (B, D_in)) -> (T x (B, D), shared (B, D) or None)
    """

    def __init__(self, n_tasks: int, in_dim: int, n_shared: int, n_task: int, hidden: tuple[int, ...],
                 dropout: float, batch_norm: bool, activation: Activation, opts: GateOptions,
                 last: bool) -> None:
        super().__init__()
        self.shared = Experts(n_shared, in_dim, hidden, dropout, batch_norm, activation)
        self.own = nn.ModuleList(Experts(n_task, in_dim, hidden, dropout, batch_norm, activation)
                                 for _ in range(n_tasks))
        self.gates = nn.ModuleList(Gate(in_dim, n_task + n_shared, opts) for _ in range(n_tasks))
        self.shared_gate = None if last else Gate(in_dim, n_tasks * n_task + n_shared, opts)
        self.out_dim = self.shared.out_dim

    def forward(self, task_inputs: list[Tensor], shared_input: Tensor, log: GateLog, level: int,
                names: tuple[str, ...]) -> tuple[list[Tensor], Tensor | None]:
        shared = self.shared(shared_input)                                        # (B, Es, D)
        own = [experts(x) for experts, x in zip(self.own, task_inputs, strict=True)]   # T x (B, Et, D)
        outs = []
        for k, (gate, x) in enumerate(zip(self.gates, task_inputs, strict=True)):
            w = gate(x)                                                           # (B, Et + Es)
            log.record(f"l{level}.{names[k]}", gate, w)
            outs.append(mix(torch.cat([own[k], shared], dim=1), w))
        if self.shared_gate is None:
            return outs, None
        w = self.shared_gate(shared_input)
        log.record(f"l{level}.shared", self.shared_gate, w)
        return outs, mix(torch.cat([*own, shared], dim=1), w)


class TaskTowers(nn.Module):
    """One MLP tower per task, each ending in a single logit whose bias starts at that task's prior.

    forward(T x (B, D_k)) -> (B, T)
    """

    def __init__(self, in_dim: int, spec: FeatureSpec, hidden: tuple[int, ...], dropout: float,
                 batch_norm: bool, activation: Activation) -> None:
        super().__init__()
        self.towers = nn.ModuleList(MLP(in_dim, hidden, dropout, batch_norm, activation)
                                    for _ in range(spec.n_tasks))
        width = self.towers[0].out_dim
        self.outputs = nn.ModuleList(nn.Linear(width, 1) for _ in range(spec.n_tasks))
        with torch.no_grad():
            for out, prior in zip(self.outputs, prior_logits(spec), strict=True):
                out.bias.fill_(prior)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        return torch.cat([o(t(x)) for t, o, x in zip(self.towers, self.outputs, inputs, strict=True)], dim=1)
