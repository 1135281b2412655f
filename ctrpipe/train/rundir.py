"""Stage 5: the run directory -- where a run's config, logs, checkpoints and predictions live.

Layout of runs/<exp_name>/ (single run; K-fold adds the lines marked [cv])::

    config.yaml, config.json      resolved run config (config.json also says where each value came from)
    manifest_fingerprint.txt      fingerprint + schema fingerprint of the training cache
    train_log.csv                 a row per log step (loss, lr, samples/s) and per evaluation (val_* columns)
    tb/                           TensorBoard events: the same scalars as train_log.csv and diagnostics.csv
    ckpt_best.pt, ckpt_last.pt    best weights by the early-stopping metric; last state for --resume
    val_predictions.npz           row_index (N,) int64, logits (N, T) float32, labels (N, T) float32
    ckpt_fold{k}.pt               [cv] best weights of fold k
    fold{k}/ckpt_last.pt, fold{k}/train_log.csv, fold{k}/val_predictions.npz   [cv]
    oof.npz                       [cv] out-of-fold logits of every fold-assigned row
    metrics.json                  final metrics (val, gold, cv), best step, samples/s, fingerprints, config
    calibration.json              written by ctrpipe.infer.calibrate when calibration is on
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from ctrpipe.atomic import atomic_open, write_text_atomic
from ctrpipe.errors import TrainingError, disk_full_as_error
from ctrpipe.train.metrics import METRIC_NAMES

LOG_FIELDS = ("step", "epoch", "lr", "loss", "samples_per_s", *(f"val_{m}" for m in METRIC_NAMES))
DIAG_FIELDS = ("step", "name", "value")


def write_text(path: Path, text: str) -> None:
    """Atomic text write: temp name, fsync, rename."""
    write_text_atomic(path, text)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None so metrics.json stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


def write_config(run_dir: Path, config: dict[str, Any], sources: dict[str, str]) -> None:
    write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    write_json(run_dir / "config.json", {"config": config, "sources": sources})


class RunLog:
    """Appends rows to train_log.csv (each row reaches the file at once), named values to diagnostics.csv, and
    the same numbers as TensorBoard scalars under tb/.

    A row is written whole or not at all: on a full disk the file is cut back to its last complete line,
    so `--resume` appends after whole rows. TensorBoard scalars: train/loss, train/lr, train/samples_per_s at
    log steps; val/<metric> (the primary metrics) and val/<metric>.<head> at evaluations; whatever the model
    reports (train/gate.<task>.e<k>, train/gate_entropy.<task>, gradient diagnostics) at log steps.
    A resumed run drops the events after its checkpoint from the older event files and opens a new one, so
    each step is in tb/ once, as in train_log.csv (TensorBoard's own out-of-order purge hid the repeats from
    its UI only, not from other readers of the files).

    `tensorboard=False` writes the CSV files alone (tests of the CSV writer); a run always has events.
    """

    def __init__(self, directory: Path, append: bool, tensorboard: bool = True,
                 through_step: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "train_log.csv"
        # long format (step, name, value) for whatever varies by model: per-head metrics, gate usage
        self.diag_path = directory / "diagnostics.csv"
        self.tb_dir = directory / "tb"
        if append and through_step is not None:         # --resume: rows after the checkpoint are logged again
            for path in (self.path, self.diag_path):
                _keep_rows_through(path, through_step)
            if tensorboard:
                _keep_events_through(self.tb_dir, through_step)
        self._fh = self._open(self.path, append, LOG_FIELDS)
        self._diag = self._open(self.diag_path, append, DIAG_FIELDS)
        try:
            self._tb = _event_writer(self.tb_dir) if tensorboard else None
        except BaseException:
            self._fh.close()
            self._diag.close()
            raise

    def _open(self, path: Path, append: bool, fields: tuple[str, ...]) -> Any:
        fresh = not (append and path.is_file())
        # unbuffered: every row goes to the OS at once, and a failed write is seen where it happened
        fh = open(path, "wb" if fresh else "ab", buffering=0)   # noqa: SIM115 - closed in close()
        if fresh:
            self._write(fh, path, fields, [None])
        return fh

    def _append(self, row: dict[str, Any]) -> None:
        self._write(self._fh, self.path, LOG_FIELDS, [row])

    @staticmethod
    def _write(fh: Any, path: Path, fields: tuple[str, ...], rows: list[dict[str, Any] | None]) -> None:
        """Append CSV lines (a header for None) in one write; on failure cut the file back to whole rows."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        for row in rows:
            if row is None:
                writer.writeheader()
            else:
                writer.writerow(row)
        data = memoryview(buf.getvalue().encode())
        start = os.fstat(fh.fileno()).st_size
        with disk_full_as_error(path, f"the next log row needs {len(data)} bytes"):
            try:
                while data:
                    data = data[fh.write(data) or 0:]
            except BaseException:
                os.ftruncate(fh.fileno(), start)
                raise

    def diagnostics(self, step: int, values: dict[str, float]) -> None:
        """Named values at a step (gate usage, per-head metrics) into diagnostics.csv and TensorBoard."""
        if not values:
            return
        self._write(self._diag, self.diag_path, DIAG_FIELDS,
                    [{"step": step, "name": k, "value": f"{v:.6g}"} for k, v in values.items()])
        self._scalars(step, values)

    def train(self, step: int, epoch: int, lr: float, loss: float, samples_per_s: float) -> None:
        self._append({"step": step, "epoch": epoch, "lr": f"{lr:.6g}", "loss": f"{loss:.6f}",
                      "samples_per_s": f"{samples_per_s:.1f}"})
        self._scalars(step, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": samples_per_s})

    def evaluation(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        row.update({f"val_{m}": f"{metrics[m]:.6f}" for m in METRIC_NAMES if m in metrics})
        self._append(row)
        self._scalars(step, {f"val/{k}": metrics[k] for k in METRIC_NAMES if k in metrics})
        # per-head metrics (auc.clicked, ...) vary by cache and model: the long-format file takes them
        self.diagnostics(step, {f"val/{k}": v for k, v in metrics.items() if "." in k})

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars. The writer's thread appends each event to the file as it comes; an error there
        (a full disk) surfaces at the next call, as one DiskFullError naming tb/."""
        if self._tb is None or not values:
            return
        with disk_full_as_error(self.tb_dir, "the next TensorBoard events need a few kB"):
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        self._diag.close()
        if self._tb is not None:
            tb, self._tb = self._tb, None
            with disk_full_as_error(self.tb_dir, "the last TensorBoard events need a few kB"):
                tb.close()


def _event_writer(tb_dir: Path) -> Any:
    """A TensorBoard SummaryWriter for tb_dir, or a TrainingError saying why there cannot be one.

    tensorboard is a dependency of ctrpipe: a missing package is a broken install, and a run that silently
    had no events would only be noticed when someone looked for them.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TrainingError(f"cannot write TensorBoard events: {exc}", where=str(tb_dir),
                            fix="install ctrpipe's dependencies again: pip install -e . "
                                "(or pip install tensorboard)") from None
    try:
        with disk_full_as_error(tb_dir, "the TensorBoard event file needs a few kB"):
            return SummaryWriter(str(tb_dir))
    except OSError as exc:   # not a full disk (that is a DiskFullError): permissions, a file named tb, ...
        raise TrainingError(f"cannot create the TensorBoard event file: {exc}", where=str(tb_dir),
                            fix="make the run directory writable, or remove what stands in the way of "
                                f"{tb_dir}") from None


def _keep_rows_through(path: Path, step: int) -> None:
    """Drop the rows of a log (first field: the step) after `step`; written beside, then renamed over it."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = lines[:1] + [ln for ln in lines[1:] if _step_of(ln) <= step]
    if len(kept) < len(lines):
        with atomic_open(path, "wb") as fh:
            fh.write(b"".join(kept))


def _keep_events_through(tb_dir: Path, step: int) -> None:
    """Drop the scalar events after `step` from each event file in tb_dir (rewritten beside, then renamed
    over it; a record cut short by a killed process ends the file's readable events, as for any reader)."""
    if not tb_dir.is_dir():
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(tb_dir.iterdir()):
        if "tfevents" not in path.name or not path.is_file():
            continue
        records = list(RawEventFileLoader(str(path)).Load())       # the records as written, copied unchanged
        kept = [r for r in records if (e := Event.FromString(r)).step <= step or not e.HasField("summary")]
        # a record format's 16 bytes of length and checksums around each: a file with a torn record is rewritten
        if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
            continue
        tmp = tb_dir / ".trimmed.tmp"       # no "tfevents" in the name: TensorBoard reads no half-written file
        with disk_full_as_error(tb_dir, "rewriting an event file needs a few kB"), open(tmp, "wb") as fh:
            writer = RecordWriter(fh)
            for record in kept:
                writer.write(record)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def _step_of(line: bytes) -> float:
    """A log row's step; a row cut short by a killed process (no step, or no line end) counts as after any."""
    head = line.split(b",", 1)[0]
    return int(head) if head.isdigit() and line.endswith(b"\n") else math.inf
