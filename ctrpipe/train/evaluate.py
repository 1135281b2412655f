"""Stages 5 and 6: a model's predictions over a whole view into preallocated arrays, then exact metrics once.

The one prediction loop: training evaluates with it, `ctrpipe infer` predicts test rows with it. Both pass the
per-head `logit_shift` of a run whose training rows were sampled (`logit_shifts`), so every logit it returns
is on the data's scale.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrpipe.atomic import atomic_open
from ctrpipe.device import autocast
from ctrpipe.errors import CheckpointError, ConfigError
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.sampling import Sampling
from ctrpipe.models.heads import as_output
from ctrpipe.train.metrics import metrics_from_logits
from ctrpipe.train.objective import Task, masked_targets


@dataclass(frozen=True)
class Predictions:
    """Logits of one model over one view.

    row_index (N,) int64 global cache rows; logits (N, T) float32; labels (N, T) float32 (NaN: unlabelled).
    """

    row_index: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    def metrics(self, label_names: Sequence[str] | None = None,
                weights: Sequence[float] | None = None) -> dict[str, float]:
        return metrics_from_logits(self.labels, self.logits, label_names, weights)

    def save(self, path: Path, label_names: Sequence[str] = ()) -> None:
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
        try:
            with np.load(path) as z:
                return cls(z["row_index"], z["logits"], z["labels"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:    # cut or overwritten
            raise CheckpointError(f"cannot read {path.name} ({type(exc).__name__}: {exc})", where=str(path),
                                  fix="the file is damaged: retrain this run (or this fold) without --resume"
                                  ) from None


def logit_shifts(tasks: Sequence[Task], sampling: Sampling | None) -> tuple[float, ...]:
    """(H,) what to add to each head's logits to undo the training stream's sampling (all 0 without it).

    Sampling by label j shifts the prior of a head whose target is label j by `sampling.shift`, whatever its
    mask; a head counting only j-positive rows (mask j) sees no row dropped: 0. Any other head (another label,
    or an AND with j such as ESMM's ctcvr) is trained on rows dropped by j, which biases it by an amount that
    depends on the features, so no shift undoes it: ConfigError. (fit.prepare also refuses models with heads
    of their own, whose heads are tied, e.g. ESMM's ctcvr = ctr * cvr.)
    """
    if sampling is None:
        return (0.0,) * len(tasks)
    j, out = sampling.label, []
    for t in tasks:
        if t.mask == j:
            out.append(0.0)
        elif t.labels == (j,):
            out.append(sampling.shift)
        else:
            raise ConfigError(
                f"loader sampling drops rows by label {sampling.name!r}, and head {t.name!r} is trained on those "
                "rows with another target, so its predictions would be biased by an amount no logit shift undoes",
                where="loader.sample_label",
                fix=f"score head {t.name!r} on {sampling.name}-positive rows only (--set train.tasks.{t.name}.mask="
                    f"{sampling.name}), sample by its label, or turn sampling off (loader.neg_keep_prob=1.0, "
                    "loader.balance_pos_fraction=0)")
    return tuple(out)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], num_rows: int, tasks: int | Sequence[Task],
            device: torch.device, amp: str = "off", with_labels: bool = True,
            on_batch: Callable[[int], None] | None = None,
            logit_shift: Sequence[float] | None = None) -> Predictions:
    """Run `model` over every batch of a view; outputs stay on the device until one copy at the end.

    `tasks`: the run's heads (labels become each head's targets, NaN where its mask drops the row), or a
    count T for a model with one head per label column.

    `on_batch(rows)` is called after each batch (a progress bar); it must not read the outputs (no sync).

    `logit_shift` (H,) is added to the logits (`logit_shifts`: a run trained on sampled rows).
    """
    n_heads = tasks if isinstance(tasks, int) else len(tasks)
    shift = tuple(logit_shift or ())
    if shift and len(shift) != n_heads:
        raise ValueError(f"logit_shift has {len(shift)} values for {n_heads} heads")
    was_training = model.training
    # a model already wholly in eval mode (a Predictor's) skips the eval()/train() walks over its modules
    # (only this check walks them): a fixed cost that dominates a one-row call
    toggle = any(m.training for m in model.modules())
    if toggle:
        model.eval()
    logits = torch.empty((num_rows, n_heads), dtype=torch.float32, device=device)   # (N, H)
    labels = torch.full((num_rows, n_heads), float("nan"), dtype=torch.float32, device=device)
    rows = torch.empty(num_rows, dtype=torch.int64, device=device)
    pos = 0
    try:
        for batch in batches:
            n = len(batch)
            with autocast(device, amp):
                out = as_output(model(batch)).logits                                   # (B, H)
            logits[pos:pos + n] = out.float().reshape(n, n_heads)
            if with_labels and batch.labels is not None:
                y = batch.labels if isinstance(tasks, int) else masked_targets(batch.labels, tasks)
                labels[pos:pos + n] = y.reshape(n, n_heads)
            rows[pos:pos + n] = batch.row_index
            pos += n
            if on_batch is not None:
                on_batch(n)
    finally:
        if toggle:
            model.train(was_training)
    assert pos == num_rows, f"loader served {pos} rows for a view of {num_rows}"
    if any(shift):
        logits += torch.tensor(shift, dtype=torch.float32, device=device)                 # (N, H) + (H,)
    return Predictions(rows.cpu().numpy(), logits.cpu().numpy(), labels.cpu().numpy())
