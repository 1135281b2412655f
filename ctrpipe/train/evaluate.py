"""Stages 5 and 6: a model's predictions over a whole view into preallocated arrays, then exact metrics once.

The one prediction loop: training evaluates with it, `ctrpipe infer` predicts test rows with it. Both pass the
per-head `logit_shift` of a run whose training rows were sampled (`logit_shifts`), so every logit it returns
is on the data's scale.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrpipe.atomic import atomic_open
from ctrpipe.device import autocast
from ctrpipe.errors import CheckpointError, ConfigError, CtrpipeError
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
                fix=f"sample by head {t.name!r}'s label (loader.sample_label), score it on {sampling.name}-positive "
                    f"rows only where it is defined there (--set train.tasks.{t.name}.mask={sampling.name}, e.g. "
                    "conversions of clicks), or turn sampling off (loader.neg_keep_prob=1.0, "
                    "loader.balance_pos_fraction=0)")
    return tuple(out)


STAGE_ROWS = 1 << 20           # rows a device-side stage of `predict` holds before its copy to the host


class _Outputs:
    """Where `predict` puts each batch's logits, targets and row ids: the host arrays it returns.

    On the CPU the batches write into those arrays. On a GPU they write into a device stage of `stage_rows`
    rows; a full stage is copied into a pinned host buffer without blocking (ordered after the writes on the
    stream) and into the arrays once its event completed, one stage later: device memory stays bounded
    whatever the view's size, and the host waits on a copy only once per stage, never per batch.
    """

    def __init__(self, num_rows: int, n_heads: int, device: torch.device, stage_rows: int | None) -> None:
        self.logits = np.empty((num_rows, n_heads), dtype=np.float32)
        self.labels = np.full((num_rows, n_heads), np.nan, dtype=np.float32)
        self.rows = np.empty(num_rows, dtype=np.int64)
        self.device = device
        self.staged = stage_rows is not None
        self.stage_rows = max(1, min(stage_rows or num_rows, num_rows))
        self.pos = 0                   # rows served so far
        self.flushed = 0               # rows of them copied (or on their way) to the host
        self.pending: tuple[torch.cuda.Event | None, int, int] | None = None   # (copied, rows from, rows to)
        if self.staged:
            self._allocate()

    def _allocate(self) -> None:
        """Device stage and pinned host buffer of `stage_rows` rows (labels NaN: rows without labels)."""
        n, h = self.stage_rows, self.logits.shape[1]
        shapes, dtypes = ((n, h), (n, h), (n,)), (torch.float32, torch.float32, torch.int64)
        self.stage = [torch.empty(sh, dtype=dt, device=self.device) for sh, dt in zip(shapes, dtypes, strict=True)]
        self.stage[1].fill_(float("nan"))
        pin = self.device.type == "cuda"
        # pinned under the stage's own device: on another one it would start a context on the current GPU
        with torch.cuda.device(self.device) if pin else nullcontext():
            self.host = [torch.empty(sh, dtype=dt, pin_memory=pin) for sh, dt in zip(shapes, dtypes, strict=True)]

    def targets(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, H) logits, (n, H) labels and (n,) row ids to write the next batch's n rows into."""
        if not self.staged:
            at = slice(self.pos, self.pos + n)
            self.pos += n
            return (torch.from_numpy(self.logits[at]), torch.from_numpy(self.labels[at]),
                    torch.from_numpy(self.rows[at]))
        if self.pos + n - self.flushed > self.stage_rows:
            self._flush()
            if n > self.stage_rows:                   # a batch larger than a stage: the stage grows to it
                self._land()
                self.stage_rows = n
                self._allocate()
        at = slice(self.pos - self.flushed, self.pos - self.flushed + n)
        self.pos += n
        return self.stage[0][at], self.stage[1][at], self.stage[2][at]

    def _flush(self) -> None:
        """Start the stage's copy to the host; the stage is then free (later writes follow it on the stream)."""
        self._land()
        n = self.pos - self.flushed
        if not n:
            return
        for host, stage in zip(self.host, self.stage, strict=True):
            host[:n].copy_(stage[:n], non_blocking=True)
        self.stage[1][:n].fill_(float("nan"))            # unlabelled rows of the next stage read NaN
        event = None
        if self.device.type == "cuda":
            # the copies run on the stage's device's stream, which need not be the current device's (a
            # one-process run on cuda:1): an event recorded on the current device's would complete at once
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self.pending = (event, self.flushed, self.pos)
        self.flushed = self.pos

    def _land(self) -> None:
        """The pending copy, once done, into the host arrays."""
        if self.pending is None:
            return
        event, lo, hi = self.pending
        if event is not None:
            event.synchronize()
        for out, host in zip((self.logits, self.labels, self.rows), self.host, strict=True):
            out[lo:hi] = host[:hi - lo].numpy()
        self.pending = None

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.staged:
            self._flush()
            self._land()
        return self.rows, self.logits, self.labels


def bad_id_error(batches: object, batch: Batch) -> CtrpipeError | None:
    """Why a lookup of `batch` failed, when `batches` (a ShardLoader) finds an id beyond its field's table."""
    find = getattr(batches, "bad_id_error", None)
    return find(batch) if find is not None else None


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], num_rows: int, tasks: int | Sequence[Task],
            device: torch.device, amp: str = "off", with_labels: bool = True,
            on_batch: Callable[[int], None] | None = None,
            logit_shift: Sequence[float] | None = None, stage_rows: int | None = None) -> Predictions:
    """Run `model` over every batch of a view into host arrays, without a host sync per batch.

    `tasks`: the run's heads (labels become each head's targets, NaN where its mask drops the row), or a
    count T for a model with one head per label column.

    `on_batch(rows)` is called after each batch (a progress bar); it must not read the outputs (no sync).

    `logit_shift` (H,) is added to the logits (`logit_shifts`: a run trained on sampled rows).

    `stage_rows`: rows of a device-side stage (`_Outputs`); STAGE_ROWS on a GPU, none on the CPU by default.
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
    if stage_rows is None and device.type != "cpu":
        stage_rows = STAGE_ROWS
    outputs = _Outputs(num_rows, n_heads, device, stage_rows)
    shift_t = torch.tensor(shift, dtype=torch.float32, device=device) if any(shift) else None
    try:
        for batch in batches:
            n = len(batch)
            if outputs.pos + n > num_rows:
                raise AssertionError(f"loader served over {num_rows} rows for a view of {num_rows}")
            logits, labels, rows = outputs.targets(n)
            try:
                with autocast(device, amp):
                    out = as_output(model(batch)).logits                               # (B, H)
            except IndexError as exc:    # an embedding lookup out of range: name the id and where it is stored
                found = bad_id_error(batches, batch)
                if found is None:
                    raise
                raise found from exc
            logits.copy_(out.float().reshape(n, n_heads))
            if shift_t is not None:
                logits += shift_t                                                      # (n, H) + (H,)
            if with_labels and batch.labels is not None:
                y = batch.labels if isinstance(tasks, int) else masked_targets(batch.labels, tasks)
                labels.copy_(y.reshape(n, n_heads))
            rows.copy_(batch.row_index)
            if on_batch is not None:
                on_batch(n)
    finally:
        if toggle:
            model.train(was_training)
    assert outputs.pos == num_rows, f"loader served {outputs.pos} rows for a view of {num_rows}"
    return Predictions(*outputs.finish())
