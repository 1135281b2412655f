"""Report input: one finished run directory (see ctrpipe/train/rundir.py) read into a typed `RunData`.

Reads metrics.json, train_log.csv and diagnostics.csv (the run's, or each fold's), the saved validation or
out-of-fold predictions, and counts the model's parameters from its checkpoint when metrics.json has no count.
Each head's mask and metric weight are read as training resolved them (metrics.json "tasks"; older runs: their
config's train.tasks).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrpipe.errors import CtrpipeError, ReportError
from ctrpipe.train.metrics import sigmoid

NOT_A_RUN_FIX = "pass a folder written by `ctrpipe train`, such as runs/criteo_dnn (it holds config.json)"


@dataclass(frozen=True)
class Curve:
    """One series over training steps: steps (n,) int64 increasing, values (n,) float64."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.steps.size)


@dataclass(frozen=True)
class RunLogs:
    """train_log.csv and diagnostics.csv of one model: a single run, or one fold of a K-fold run."""

    name: str                       # "" for a single run, "fold0", "fold1", ... for K-fold
    loss: Curve                     # training loss at log steps
    lr: Curve                       # dense learning rate at log steps
    val: dict[str, Curve]           # main validation metrics per evaluation: "auc" -> Curve
    diagnostics: dict[str, Curve]   # long-format diagnostics by name: "val/auc.clicked", "train/gate.clicked.e0"


@dataclass(frozen=True)
class HeadPredictions:
    """One head's saved validation (or out-of-fold) predictions, rows its mask drops removed."""

    head: str
    probs: np.ndarray      # (n,) float64 sigmoid(logit)
    labels: np.ndarray     # (n,) float64 0/1


@dataclass(frozen=True)
class HeadSettings:
    """What one head adds to the primary (mean) metric: the label whose 1-rows alone it is scored on, and its
    weight in the mean, as training resolved them (metrics.json "tasks"). From a run that predates that record,
    as its config set them: None where the config left the model's default, which is one value per head name
    in every model, so two such runs leaving a head's value unset use the same value.
    """

    mask: str | None               # label whose 1-rows alone count for the head
    metric_weight: float | None    # weight of the head in the primary metric


@dataclass(frozen=True)
class Resources:
    """Cost of a run; None where the run directory does not record it."""

    samples_per_s: float | None
    train_seconds: float | None      # the training loop's time (metrics.json train_seconds)
    wall_seconds: float | None       # the `ctrpipe train` call from its config on, imports not counted (metrics.json)
    parameters: int | None           # one model's parameters (one fold's for K-fold)
    parameters_from: str             # "metrics.json", "ckpt_best.pt", ... or why it is missing
    peak_memory_bytes: int | None
    peak_memory_where: str           # "GPU", "host", "host RSS" (runs recorded before the anonymous peak) or ""
    # why wall time and peak memory are not shown although recorded: a resumed run records its last process only
    partial: str = ""


@dataclass(frozen=True, eq=False)     # identity equality: runs hold arrays, and two loads are two runs
class RunData:
    """Everything the report shows about one run."""

    path: Path
    name: str                              # exp_name
    model: str
    heads: tuple[str, ...]
    head_settings: dict[str, HeadSettings]  # per head in `heads`
    manifest_fingerprint: str
    kfold: int                             # folds of a K-fold run, 0 for a single run
    best_step: int | None
    steps: int | None
    val: dict[str, float]                  # validation metrics (out-of-fold for K-fold)
    gold: dict[str, float] | None          # gold-split metrics, None without a gold split
    notes: tuple[str, ...]                 # training's notes plus what the report could not show
    logs: tuple[RunLogs, ...]
    predictions: tuple[HeadPredictions, ...]
    predictions_from: str                  # "val_predictions.npz", "oof.npz" or ""
    resources: Resources

    @property
    def val_kind(self) -> str:
        """Which rows `val` is over: the validation split, or the out-of-fold rows of a K-fold run."""
        return "oof" if self.kfold else "val"

    def gate_tasks(self) -> dict[str, list[str]]:
        """Mixture-of-experts gate usage series per task: 'clicked' -> ['train/gate.clicked.e0', ...]."""
        names = sorted({n for lg in self.logs for n in lg.diagnostics if n.startswith("train/gate.")},
                       key=_natural_key)
        tasks: dict[str, list[str]] = {}
        for n in names:
            task = n[len("train/gate."):].rsplit(".e", 1)[0]
            tasks.setdefault(task, []).append(n)
        return tasks


def load_run(path: Path) -> RunData:
    """Read a finished run directory; a `ReportError` names what is missing and how to get it."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise ReportError(f"{path} {what}", where=str(path), fix=NOT_A_RUN_FIX)
    if not (path / "config.json").is_file():
        raise ReportError(f"{path} is not a run directory (no config.json)", where=str(path), fix=NOT_A_RUN_FIX)
    metrics = _read_metrics(path / "metrics.json")
    kfold = _fold_count(metrics, path / "metrics.json")
    notes = [str(n) for n in metrics.get("notes") or []]
    log_dirs = [path / f"fold{k}" for k in range(kfold)] if kfold else [path]
    logs = tuple(_read_logs(d, f"fold{k}" if kfold else "") for k, d in enumerate(log_dirs))
    heads = _heads(metrics, path / "metrics.json")
    preds_name = "oof.npz" if kfold else "val_predictions.npz"
    predictions = _read_predictions(path / preds_name, heads) if (path / preds_name).is_file() else ()
    if not predictions:
        notes.append(f"no {preds_name}: no reliability diagram or prediction histograms")
    return RunData(
        path=path, name=str(metrics.get("exp_name") or path.name), model=str(metrics.get("model", "?")),
        heads=heads, head_settings=_head_settings(metrics, heads),
        manifest_fingerprint=str(metrics.get("manifest_fingerprint", "")), kfold=kfold,
        best_step=_opt_int(metrics.get("best_step")), steps=_opt_int(metrics.get("steps")),
        val=_float_dict(metrics.get("val")), gold=_float_dict(metrics["gold"]) if metrics.get("gold") else None,
        notes=tuple(notes), logs=logs, predictions=predictions,
        predictions_from=preds_name if predictions else "", resources=_resources(path, metrics, kfold))


DAMAGED_FIX = "the file is damaged: retrain the run (or restore metrics.json from a copy)"


def _fold_count(metrics: dict[str, Any], path: Path) -> int:
    """metrics.json's cv.n_splits (0 for a single run); a damaged value is named, not a traceback."""
    cv = metrics.get("cv")
    if cv is None:
        return 0
    if not isinstance(cv, dict):
        raise ReportError(f"metrics.json's cv is {cv!r}, not a mapping holding n_splits", where=str(path),
                          fix=DAMAGED_FIX)
    n = cv.get("n_splits", 0)
    if n is None:
        return 0
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ReportError(f"metrics.json's cv.n_splits is {n!r}, not a number of folds", where=str(path),
                          fix=DAMAGED_FIX)
    return n


def _heads(metrics: dict[str, Any], path: Path) -> tuple[str, ...]:
    """metrics.json's heads (or, from older runs, labels): a list of names; text there read as one head per
    character."""
    heads = metrics.get("heads") or metrics.get("labels") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ReportError(f"metrics.json's heads are {heads!r}, not a list of head names", where=str(path),
                          fix=DAMAGED_FIX)
    return tuple(heads)


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"run {path.parent} has not finished: it has no metrics.json", where=str(path),
                          fix="finish it with the same `ctrpipe train ... --resume`, or leave it out of the report")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read metrics.json ({exc})", where=str(path),
                          fix="the file is damaged: retrain the run") from None
    if not isinstance(metrics, dict) or "val" not in metrics:
        raise ReportError("metrics.json holds no validation metrics", where=str(path),
                          fix="pass a run finished by `ctrpipe train` (an interrupted run has none)")
    return metrics


def _head_settings(metrics: dict[str, Any], heads: tuple[str, ...]) -> dict[str, HeadSettings]:
    """Each head's mask and metric weight as training resolved them (metrics.json "tasks"); from runs that
    predate that record, as the config set them: "" (mask) and -1 (metric_weight) are training's spelling of
    "the model's default" (train/config.py TaskConfig)."""
    resolved = metrics.get("tasks")
    if isinstance(resolved, dict) and all(isinstance(resolved.get(h), dict) for h in heads):
        return {h: HeadSettings(mask=resolved[h].get("mask") or None,
                                metric_weight=_opt_float(resolved[h].get("metric_weight"))) for h in heads}
    config = metrics.get("config")
    train = config.get("train") if isinstance(config, dict) else None
    tasks = train.get("tasks") if isinstance(train, dict) else None
    out = {}
    for head in heads:
        own = tasks.get(head) if isinstance(tasks, dict) else None
        own = own if isinstance(own, dict) else {}
        mask, weight = own.get("mask"), _opt_float(own.get("metric_weight"))
        out[head] = HeadSettings(mask=str(mask) if isinstance(mask, str) and mask else None,
                                 metric_weight=weight if weight is not None and weight >= 0 else None)
    return out


def _read_logs(directory: Path, name: str) -> RunLogs:
    log = directory / "train_log.csv"
    if not log.is_file():
        raise ReportError(f"{log.name} is missing", where=str(log), fix="the run directory is damaged: retrain it")
    df = _read_csv(log, ("step", "lr", "loss", "val_auc"), infer_schema_length=0) \
        .with_columns(pl.all().cast(pl.Float64, strict=False))
    train = df.filter(pl.col("loss").is_not_null()) if "loss" in df.columns else df.clear()
    evals = df.filter(pl.col("val_auc").is_not_null()) if "val_auc" in df.columns else df.clear()
    val = {c[len("val_"):]: _curve(evals, c) for c in evals.columns if c.startswith("val_")}
    return RunLogs(name=name, loss=_curve(train, "loss"), lr=_curve(train, "lr"),
                   val={k: v for k, v in val.items() if len(v)}, diagnostics=_read_diagnostics(directory))


def _read_csv(path: Path, needed: tuple[str, ...], **options: Any) -> pl.DataFrame:
    """A run's log, or a ReportError naming it when it cannot be read: emptied, cut by a full disk or a copy
    (training writes whole lines, so a log not ending in a newline was cut), or without the `needed` columns
    (cut inside its header)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - 1, 0))
            if size and fh.read(1) != b"\n":
                raise ValueError("its last line is cut short")
        df = pl.read_csv(path, **options)
        missing = [c for c in needed if c not in df.columns]
        if missing:
            raise ValueError(f"its header lacks {', '.join(missing)}")
        return df
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReportError(f"cannot read {path.name}: {reason}", where=str(path),
                          fix="the run directory is damaged: retrain it (or leave this run out)") from None


def _curve(df: pl.DataFrame, column: str) -> Curve:
    """(step, column) rows with a value; after a --resume a step logged twice keeps its last row."""
    if column not in df.columns or df.height == 0:
        return Curve(np.zeros(0, np.int64), np.zeros(0, np.float64))
    d = (df.select(pl.col("step").cast(pl.Int64), pl.col(column)).drop_nulls()
         .unique(subset="step", keep="last", maintain_order=True).sort("step"))
    return Curve(d["step"].to_numpy(), d[column].to_numpy().astype(np.float64))


def _read_diagnostics(directory: Path) -> dict[str, Curve]:
    path = directory / "diagnostics.csv"
    if not path.is_file():
        return {}
    df = _read_csv(path, ("step", "name", "value"),
                   schema_overrides={"step": pl.Int64, "name": pl.Utf8, "value": pl.Float64})
    out: dict[str, Curve] = {}
    for (name,), part in df.group_by("name", maintain_order=True):
        out[str(name)] = _curve(part.rename({"value": "v"}), "v")
    return out


def _read_predictions(path: Path, heads: tuple[str, ...]) -> tuple[HeadPredictions, ...]:
    try:
        with np.load(path) as z:
            logits, labels = z["logits"], z["labels"]                          # (N, H), (N, H)
            names = [str(n) for n in z["label_names"]] if "label_names" in z.files else list(heads)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # numpy's own text for a damaged file may suggest loading it with pickles allowed: not said here
        reason = "a pickled object, not arrays" if "pickle" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ReportError(f"cannot read predictions ({reason})", where=str(path),
                          fix="the file is damaged: retrain the run") from None
    if logits.ndim != 2 or logits.shape != labels.shape or len(names) != logits.shape[1]:
        raise ReportError(f"predictions of shape {logits.shape} / labels {labels.shape} do not match the heads "
                          f"{names}", where=str(path), fix="the file is damaged: retrain the run")
    bad = ~np.isfinite(logits) & ~np.isnan(labels)          # a kept row's prediction (training stops on NaN)
    if bad.any():
        row, h = (int(v[0]) for v in np.nonzero(bad))
        raise ReportError(f"{int(bad.sum())} predictions are not finite (first: row {row}, head {names[h]!r})",
                          where=str(path), fix="the file is damaged: retrain the run")
    out = []
    for h, head in enumerate(names):
        keep = ~np.isnan(labels[:, h])                                          # rows the head's mask keeps
        out.append(HeadPredictions(head, sigmoid(logits[keep, h]), labels[keep, h].astype(np.float64)))
    return tuple(out)


def _resources(path: Path, metrics: dict[str, Any], kfold: int) -> Resources:
    params, params_from = _opt_int(metrics.get("parameters")), "metrics.json"
    if params is None:
        params, params_from = count_parameters(path / ("ckpt_fold0.pt" if kfold else "ckpt_best.pt"))
    device_peak = _opt_int(metrics.get("peak_device_memory_bytes"))
    # what the run needed, without the mapped cache pages the kernel reclaims; older runs recorded only the peak
    # RSS, cache pages included, and say so
    host_peak, host = _opt_int(metrics.get("peak_host_anon_bytes")), "host"
    if host_peak is None:
        host_peak, host = _opt_int(metrics.get("peak_host_memory_bytes")), "host RSS"
    peak, where = (device_peak, "GPU") if device_peak is not None else (host_peak, host if host_peak else "")
    wall = _opt_float(metrics.get("wall_seconds"))
    partial = ""
    if metrics.get("resumed"):      # the earlier processes' time and memory are not in it: no ranking on them
        partial = "the run was resumed: metrics.json records the wall time and peak memory of its last process only"
        wall, peak = None, None
    return Resources(samples_per_s=_opt_float(metrics.get("samples_per_s")),
                     train_seconds=_opt_float(metrics.get("train_seconds")),
                     wall_seconds=wall, parameters=params, parameters_from=params_from, peak_memory_bytes=peak,
                     peak_memory_where=where, partial=partial)


def count_parameters(ckpt_path: Path) -> tuple[int | None, str]:
    """(parameter count, where it came from): the checkpoint's model rebuilt on the meta device.

    Checkpoints store only the embedding rows training touched, so the count comes from the rebuilt model,
    not from the stored tensors; on the meta device nothing is allocated.
    """
    if not ckpt_path.is_file():
        return None, f"no {ckpt_path.name}"
    import torch

    from ctrpipe.train.checkpoint import build_initial_model, load_checkpoint

    try:
        ckpt = load_checkpoint(ckpt_path)
        with torch.device("meta"):
            model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    except CtrpipeError as exc:
        raise ReportError(f"cannot count the model's parameters: {exc.what}", where=str(ckpt_path),
                          fix=exc.fix or "retrain the run") from None
    return sum(p.numel() for p in model.parameters()), ckpt_path.name


def _natural_key(name: str) -> tuple[str, int]:
    """'train/gate.t.e10' sorts after 'train/gate.t.e9'."""
    stem, _, num = name.rpartition(".e")
    return (stem, int(num)) if num.isdigit() else (name, -1)


def _float_dict(d: Any) -> dict[str, float]:
    if not isinstance(d, dict):
        return {}
    return {str(k): float(v) if v is not None else float("nan") for k, v in d.items()
            if isinstance(v, (int, float)) or v is None}


def _opt_float(v: Any) -> float | None:
    """A recorded count, size, time or rate: finite and not negative, else none recorded (an edited or damaged
    metrics.json wrote Infinity into report.json, and a size of -5 bytes ranked best)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    return float(v) if ok else None


def _opt_int(v: Any) -> int | None:
    f = _opt_float(v)
    return int(f) if f is not None else None
