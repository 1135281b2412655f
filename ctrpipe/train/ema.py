"""Stage 5: exponential moving average of the weights; evaluation and `ckpt_*.pt` use the averaged weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ModelEMA:
    """shadow = decay * shadow + (1 - decay) * weights after each step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so early evaluations are not
    dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state_dict with parameters replaced by their averages (buffers as they are).

        Live tensors, not copies (a table's copy would be its whole size): read them before the next step.
        """
        sd = dict(model.state_dict())
        for name, s in zip(self.names, self.shadow, strict=True):
            sd[name] = s.detach()
        return sd

    def load(self, averaged: dict[str, Tensor], updates: int) -> None:
        """Restore shadows from an averaged state_dict (as saved in a checkpoint)."""
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow, strict=True):
                s.copy_(averaged[name])
        self.updates = updates

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights into the model for evaluation (no copies: storages are exchanged)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            tmp = p.data
            p.data = s
            s.data = tmp  # noqa: B010 - swap storages in place
