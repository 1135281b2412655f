"""Stages 5 and 6: a model's predictions over a whole view into preallocated arrays, then exact metrics once.

The one prediction loop: training evaluates with it, `ctrpipe infer` predicts test rows with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrpipe.atomic import atomic_open
from ctrpipe.device import autocast
from ctrpipe.errors import CheckpointError
from ctrpipe.loader.batch import Batch
from ctrpipe.train.metrics import metrics_from_logits


@dataclass(frozen=True)
class Predictions:
    """Logits of one model over one view.

    row_index (N,) int64 global cache rows; logits (N, T) float32; labels (N, T) float32 (NaN: unlabelled).
    """

    row_index: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    def metrics(self, label_names: tuple[str, ...] | None = None) -> dict[str, float]:
        return metrics_from_logits(self.labels, self.logits, label_names)

    def save(self, path: Path, label_names: tuple[str, ...] = ()) -> None:
        """Atomic .npz write (temp name, then rename); `label_names` (T,) is stored when given."""
        path = Path(path)
        extra = {"label_names": np.asarray(label_names, dtype=str)} if label_names else {}
        with atomic_open(path, "wb") as fh:
            np.savez(fh, row_index=self.row_index, logits=self.logits, labels=self.labels, **extra)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"prediction file {path} is missing", where=str(path),
                                  fix="retrain this run (or this fold) without --resume")
        with np.load(path) as z:
            return cls(z["row_index"], z["logits"], z["labels"])


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], num_rows: int, n_tasks: int, device: torch.device,
            amp: str = "off", with_labels: bool = True,
            on_batch: Callable[[int], None] | None = None) -> Predictions:
    """Run `model` over every batch of a view; outputs stay on the device until one copy at the end.

    `on_batch(rows)` is called after each batch (a progress bar); it must not read the outputs (no sync).
    """
    was_training = model.training
    model.eval()
    logits = torch.empty((num_rows, n_tasks), dtype=torch.float32, device=device)   # (N, T)
    labels = torch.full((num_rows, n_tasks), float("nan"), dtype=torch.float32, device=device)
    rows = torch.empty(num_rows, dtype=torch.int64, device=device)
    pos = 0
    try:
        for batch in batches:
            n = len(batch)
            with autocast(device, amp):
                out = model(batch)                                                     # (B, T)
            logits[pos:pos + n] = out.float().reshape(n, n_tasks)
            if with_labels and batch.labels is not None:
                labels[pos:pos + n] = batch.labels.reshape(n, n_tasks)
            rows[pos:pos + n] = batch.row_index
            pos += n
            if on_batch is not None:
                on_batch(n)
    finally:
        model.train(was_training)
    assert pos == num_rows, f"loader served {pos} rows for a view of {num_rows}"
    return Predictions(rows.cpu().numpy(), logits.cpu().numpy(), labels.cpu().numpy())
