"""Stage 5: early stopping on one validation metric, with state that survives `--resume`."""

from __future__ import annotations

import math
from typing import Any

from ctrpipe.train.config import EarlyStoppingConfig
from ctrpipe.train.metrics import LOWER_IS_BETTER


class EarlyStopping:
    """Tracks the best value of `metric`; `should_stop` after `patience` evaluations without improvement."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.metric = cfg.metric
        base = cfg.metric.split(".", 1)[0]
        self.mode = cfg.mode if cfg.mode != "auto" else ("min" if base in LOWER_IS_BETTER else "max")
        self.patience = cfg.patience
        self.min_delta = cfg.min_delta
        self.best: float | None = None
        self.best_step = -1
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.bad_evals = 0

    def update(self, metrics: dict[str, float], step: int, epoch: int, counting: bool = True) -> bool:
        """Record one evaluation; True when it is the best so far (a NaN value never is).

        With `counting` False (during the learning-rate warm-up, when a model's metrics still swing as the rate
        ramps up) an evaluation can become the best but never counts towards `patience`.
        """
        value = float(metrics[self.metric])
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.best_epoch = value, step, epoch
            self.best_metrics = dict(metrics)
            self.bad_evals = 0
        elif counting:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "best_epoch": self.best_epoch,
                "best_metrics": self.best_metrics, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.best_step = int(state["best_step"])
        self.best_epoch = int(state["best_epoch"])
        self.best_metrics = dict(state["best_metrics"])
        self.bad_evals = int(state["bad_evals"])
