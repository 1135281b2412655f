"""Stage 6: post-hoc calibration of logits (temperature, bias shift), fitted on validation or OOF logits.

Training writes `calibration.json` next to its checkpoints (`calibrate_run`); `infer` applies it to each
fold model's logits before ensembling. A fit is a tiny convex problem (logistic regression on one feature),
solved with a bounded, damped Newton method in numpy: deterministic, no random restarts, no torch.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctrpipe.atomic import write_json_atomic
from ctrpipe.console import console
from ctrpipe.errors import CheckpointError
from ctrpipe.infer.config import CalibrationConfig, CalibrationMethod, CalibrationTarget
from ctrpipe.train.metrics import sigmoid

if TYPE_CHECKING:
    from ctrpipe.config import RunConfig

FORMAT = "ctrpipe.calibration/2"    # 2: method=bias with keep_rate < 1 fits its bias (1 fitted none)
_FORMAT_1 = "ctrpipe.calibration/1"
CALIBRATION_NAME = "calibration.json"
EPS = 1e-7
T_BOUNDS = (0.01, 100.0)        # temperature range searched; outside it the model is useless or constant
B_BOUNDS = (-30.0, 30.0)        # fitted logit shift range
# positives and negatives a fit needs of each: on a handful of validation rows a temperature fits their noise
# (8 rows gave T at its lower end and a logit shift of +94, test logloss 0.57 -> 3.4)
MIN_CLASS_ROWS = 20


@dataclass(frozen=True)
class Calibration:
    """Maps a model's logit z to a calibrated logit: z / temperature + bias + log(keep_rate) (no log(keep_rate)
    for target wll, see below).

    `bias` is the shift fitted on validation rows; `log(keep_rate)` is the fixed correction for negative
    downsampling at keep rate w. Why that sign: keeping each negative with probability w divides the odds the
    model learns by w, p_s = p / (p + w (1 - p)); inverting, p = p_s w / (p_s w + 1 - p_s), i.e.
    logit(p) = logit(p_s) + log(w). Since w <= 1 the shift is <= 0: it lowers the over-predicted rates.
    The validation rows are assumed sampled like the training rows, so the fit never sees this shift.
    With target `wll` there is no such shift: WLL weighs the classes equally, each by its own mean, and
    dropping negatives at random leaves the mean over negatives as it was; so a fit that minimises WLL on
    sampled rows already minimises it on un-sampled ones, and log(w) would only move away from it.
    """

    method: CalibrationMethod = "none"
    target: CalibrationTarget = "logloss"
    temperature: float = 1.0
    bias: float = 0.0
    keep_rate: float = 1.0

    @property
    def shift(self) -> float:
        """Total additive logit shift applied after dividing by the temperature (no keep-rate term for wll)."""
        return self.bias + (math.log(self.keep_rate) if self.target != "wll" else 0.0)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits, same shape as `logits`; float32 in, float32 out (float64 otherwise)."""
        z = np.asarray(logits)
        out_dtype = np.float32 if z.dtype == np.float32 else np.float64
        if self.method == "none" and self.keep_rate == 1.0:
            return z.astype(out_dtype, copy=False)
        return (z.astype(np.float64) / self.temperature + self.shift).astype(out_dtype)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(method=d["method"], target=d["target"], temperature=float(d["temperature"]),
                   bias=float(d["bias"]), keep_rate=float(d["keep_rate"]))


# ------------------------------------------------------------------------------------------------ fitting

def _row_weights(y: np.ndarray, target: CalibrationTarget) -> np.ndarray:
    """Per-row weights whose weighted logloss is the target: 1/N each, or class-balanced 1/(2 n_class)."""
    n = y.size
    if target == "logloss":
        return np.full(n, 1.0 / n)
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int(n - pos.sum())
    return np.where(pos, 0.5 / max(n_pos, 1), 0.5 / max(n_neg, 1))


def _loss(a: float, b: float, z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    s = a * z + b
    # y * softplus(-s) + (1 - y) * softplus(s): the logloss written on logits, exact for soft labels too
    return float(np.sum(w * (y * np.logaddexp(0.0, -s) + (1.0 - y) * np.logaddexp(0.0, s))))


def fit_affine(z: np.ndarray, y: np.ndarray, target: CalibrationTarget, fit_scale: bool, fit_bias: bool,
               max_iter: int = 100, tol: float = 1e-12) -> tuple[float, float]:
    """Minimise the target over p = sigmoid(a z + b) for the free parameters; returns (a, b).

    The loss is convex in (a, b), so a damped Newton step with backtracking reaches the optimum from (1, 0);
    a is kept in [1/T_max, 1/T_min] and b in B_BOUNDS (projected after each step). Fitting both, the logits
    are centred first (s = a (z - m) + c, b = c - a m, c in B_BOUNDS): logits that barely vary around an
    offset need a large a and a b near -a m, which B_BOUNDS alone would clip to a worse fit.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m = float(z.mean()) if fit_scale and fit_bias and z.size else 0.0
    z = z - m
    w = _row_weights(y, target)
    free = np.array([fit_scale, fit_bias])
    theta = np.array([1.0, 0.0])
    lo = np.array([1.0 / T_BOUNDS[1], B_BOUNDS[0]])
    hi = np.array([1.0 / T_BOUNDS[0], B_BOUNDS[1]])
    cur = _loss(*theta, z, y, w)
    for _ in range(max_iter):
        p = sigmoid(theta[0] * z + theta[1])
        r = w * (p - y)                                   # (N,) d loss / d s
        h = w * p * (1.0 - p)                             # (N,) d2 loss / d s2
        grad = np.array([np.sum(r * z), np.sum(r)])
        hess = np.array([[np.sum(h * z * z), np.sum(h * z)], [np.sum(h * z), np.sum(h)]])
        idx = np.flatnonzero(free)
        g = grad[idx]
        hs = hess[np.ix_(idx, idx)] + 1e-12 * np.eye(idx.size)
        step = np.zeros(2)
        step[idx] = -np.linalg.solve(hs, g)
        t = 1.0
        while t > 1e-10:
            cand = np.clip(theta + t * step, lo, hi)
            new = _loss(*cand, z, y, w)
            if new <= cur:
                break
            t *= 0.5
        else:
            break
        moved = np.max(np.abs(cand - theta))
        theta, improvement, cur = cand, cur - new, new
        if moved < 1e-10 or improvement < tol:
            break
    return float(theta[0]), float(theta[1] - theta[0] * m)


def bound_warning(cal: Calibration, label: str) -> str | None:
    """A warning when the fitted temperature stopped at an end of T_BOUNDS: the fit wanted more (the logits
    barely vary, or vary far too much), so the calibrated predictions are not the target's optimum."""
    if cal.method not in ("temperature", "temperature_bias"):
        return None
    for end, why in ((T_BOUNDS[0], "the logits barely vary: the model learned little (more rows or more steps, "
                                   "e.g. a smaller loader.batch_size, would help)"),
                     (T_BOUNDS[1], "the logits vary far more than the labels do")):
        if math.isclose(cal.temperature, end, rel_tol=1e-9):
            return (f"warning: {label}'s calibration stopped at the end of its temperature range (T={end:g}), "
                    f"so it is not the {cal.target} optimum: {why}")
    return None


def warn_at_bound(cal: Calibration, label: str) -> None:
    """Print `bound_warning`'s warning, if any (even under --quiet: the calibration is not the one asked for)."""
    note = bound_warning(cal, label)
    if note is not None:
        console.print(f"[yellow]{note}[/]", highlight=False)


def too_few_rows(labels: np.ndarray) -> str | None:
    """Why (N,) labels cannot fit a calibration (fewer than MIN_CLASS_ROWS positives or negatives), or None."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    y = y[np.isfinite(y)]
    pos = int(np.count_nonzero(y > 0.5))
    if min(pos, y.size - pos) >= MIN_CLASS_ROWS:
        return None
    return (f"its {y.size:,} validation rows hold {pos:,} positives and {y.size - pos:,} negatives, and a fit "
            f"needs {MIN_CLASS_ROWS} of each")


def few_rows_warning(labels: np.ndarray, label: str, method: str) -> str | None:
    """The warning for a calibration left unfitted for lack of rows (None when it could be fitted)."""
    why = too_few_rows(labels)
    if why is None or method == "none":
        return None
    return (f"warning: {label}'s calibration ({method}) is not fitted: {why}; its predictions are written "
            "uncalibrated (more validation rows: a larger data.split.val_ratio, or K-fold's out-of-fold rows)")


def fit_calibration(logits: np.ndarray, labels: np.ndarray, cfg: CalibrationConfig) -> Calibration:
    """Fit one task's calibration on (N,) logits and 0/1 labels as `cfg` asks; the identity (plus the known
    keep-rate shift) when the rows hold too few of a class to fit anything (`too_few_rows`)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    ok = np.isfinite(z) & np.isfinite(y)
    z, y = z[ok], y[ok]
    method = cfg.method
    if method == "none" or too_few_rows(y) is not None:
        return Calibration(method="none", target=cfg.target, keep_rate=cfg.keep_rate)
    fit_scale = method in ("temperature", "temperature_bias")
    fit_bias = method in ("bias", "temperature_bias")
    a, b = fit_affine(z, y, cfg.target, fit_scale=fit_scale, fit_bias=fit_bias)
    return Calibration(method=method, target=cfg.target, temperature=1.0 / a, bias=b, keep_rate=cfg.keep_rate)


# ------------------------------------------------------------------------------------------------ run files

@dataclass(frozen=True)
class TaskReport:
    label: str
    rows: int
    pos_rate: float
    mean_pred_before: float
    mean_pred_after: float
    logloss_before: float
    logloss_after: float
    wll_before: float
    wll_after: float
    calibration: Calibration


@dataclass(frozen=True)
class CalibrationReport:
    """What `calibrate_run` fitted and how the validation metrics moved (before the keep-rate shift)."""

    path: Path
    source: str
    tasks: tuple[TaskReport, ...]

    @property
    def calibrations(self) -> tuple[Calibration, ...]:
        return tuple(t.calibration for t in self.tasks)


def write_calibration(path: Path, calibrations: tuple[Calibration, ...], labels: tuple[str, ...],
                      source: str, rows: int, requested: CalibrationConfig) -> Path:
    """Atomically write calibration.json: one entry per task, in the model's output order.

    `requested` is the config asked for (a task may fall back to "none", e.g. with one class only), so
    infer can tell whether the file still matches its own `infer.calibration`.
    """
    path = Path(path)
    doc = {"format": FORMAT, "source": source, "rows": rows, "requested": asdict(requested),
           "tasks": [{"label": lab, **asdict(c)} for lab, c in zip(labels, calibrations, strict=True)]}
    return write_json_atomic(path, doc)


def read_calibration(path: Path) -> tuple[tuple[Calibration, ...], CalibrationConfig | None]:
    """(per-task calibrations, the config they were fitted for) from a `write_calibration` file. The config is
    None for a file of format 1 fitted with method=bias and keep_rate < 1: that fit left the bias at 0, so
    the file is refitted as if it were for another config."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") not in (FORMAT, _FORMAT_1):
            raise ValueError(f"format {doc.get('format')!r}")
        cals, requested = tuple(Calibration.from_dict(t) for t in doc["tasks"]), CalibrationConfig(**doc["requested"])
        for j, c in enumerate(cals):    # an edited or foreign file: NaN or reversed predictions, exit 0
            if not (math.isfinite(c.temperature) and c.temperature > 0 and math.isfinite(c.bias)
                    and 0 < c.keep_rate <= 1):
                raise ValueError(f"task {j}: temperature {c.temperature}, bias {c.bias}, keep_rate {c.keep_rate} "
                                 "(a positive finite temperature, a finite bias and a keep_rate in (0, 1] expected)")
        if doc["format"] == _FORMAT_1 and requested.method == "bias" and requested.keep_rate < 1.0:
            return cals, None
        return cals, requested
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:    # not JSON, or JSON of other shape
        raise CheckpointError(f"cannot read the calibration file ({type(exc).__name__}: {exc})", where=str(path),
                              fix="delete it: infer then refits the calibration from the run's validation "
                                  "predictions (or pass --set infer.calibration.method=none to skip it)") from None


class NoValidationPredictions(CheckpointError):
    """A run without validation predictions (no val rows, no folds): nothing to fit a calibration on. A file
    that is there but damaged is a plain CheckpointError: it must not pass for an uncalibrated run."""


def load_val_predictions(run_dir: Path) -> tuple[Path, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(file, logits (N, T) float64, labels (N, T), label names) from oof.npz, else val_predictions.npz."""
    run_dir = Path(run_dir)
    for name in ("oof.npz", "val_predictions.npz"):
        path = run_dir / name
        if path.is_file():
            break
    else:
        raise NoValidationPredictions(f"no oof.npz or val_predictions.npz in {run_dir} to fit calibration on",
                              where=str(run_dir),
                              fix="train with validation rows (a val split or --kfold K), or set "
                                  "infer.calibration.method=none")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "logits" not in npz.files or "labels" not in npz.files:
                raise CheckpointError(f"{path.name} lacks 'logits' or 'labels' (has {sorted(npz.files)})",
                                      where=str(path), fix="re-run training to rewrite it")
            logits = np.asarray(npz["logits"], dtype=np.float64)
            labels = np.asarray(npz["labels"], dtype=np.float64)
            names = tuple(str(s) for s in npz["label_names"]) if "label_names" in npz.files else ()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:      # cut or overwritten
        raise CheckpointError(f"cannot read {path.name} ({type(exc).__name__}: {exc})", where=str(path),
                              fix="the file is damaged: re-run training to rewrite it, or set "
                                  "infer.calibration.method=none") from None
    if logits.ndim == 1:
        logits, labels = logits[:, None], labels[:, None]
    if logits.shape != labels.shape:
        raise CheckpointError(f"logits {logits.shape} and labels {labels.shape} differ in shape",
                              where=str(path), fix="re-run training to rewrite it")
    if len(names) != logits.shape[1]:
        names = tuple(f"task{t}" for t in range(logits.shape[1]))
    return path, logits, labels, names


def calibrate_run(run_dir: Path, cfg: RunConfig, quiet: bool = False) -> CalibrationReport | None:
    """Fit `cfg.infer.calibration` on a finished run's OOF (preferred) or validation logits.

    Writes run_dir/calibration.json atomically and prints a before/after table; returns None when the
    configured method is "none" (nothing is written).
    """
    from ctrpipe.train.metrics import weighted_logloss

    ccfg = cfg.infer.calibration
    if ccfg.method == "none":
        return None
    path, logits, labels, names = load_val_predictions(Path(run_dir))
    tasks: list[TaskReport] = []
    for t, label in enumerate(names):
        ok = np.isfinite(logits[:, t]) & np.isfinite(labels[:, t])
        z, y = logits[ok, t], labels[ok, t]
        cal = fit_calibration(z, y, ccfg)
        fitted_only = Calibration(cal.method, cal.target, cal.temperature, cal.bias, 1.0)
        p0, p1 = sigmoid(z), sigmoid(fitted_only.apply(z))
        tasks.append(TaskReport(
            label=label, rows=int(z.size), pos_rate=float(np.mean(y > 0.5)) if y.size else float("nan"),
            mean_pred_before=float(p0.mean()) if y.size else float("nan"),
            mean_pred_after=float(p1.mean()) if y.size else float("nan"),
            logloss_before=_logloss(y, p0), logloss_after=_logloss(y, p1),
            wll_before=weighted_logloss(y, p0), wll_after=weighted_logloss(y, p1), calibration=cal))
    out = write_calibration(Path(run_dir) / CALIBRATION_NAME, tuple(t.calibration for t in tasks), names,
                            source=path.name, rows=int(logits.shape[0]), requested=ccfg)
    report = CalibrationReport(path=out, source=path.name, tasks=tuple(tasks))
    if not quiet:
        print_report(report)
    for t in range(len(tasks)):
        warn_at_bound(tasks[t].calibration, tasks[t].label)
        note = few_rows_warning(labels[np.isfinite(logits[:, t]), t], tasks[t].label, ccfg.method)
        if note is not None:        # even under --quiet, as warn_at_bound: not the calibration asked for
            console.print(f"[yellow]{note}[/]", highlight=False)
    return report


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    from ctrpipe.train.metrics import logloss

    return logloss(y, p)


def print_report(report: CalibrationReport) -> None:
    """Rich table per task: mean prediction vs positive rate, logloss and WLL before -> after, parameters."""
    from rich.table import Table

    for r in report.tasks:
        c = r.calibration
        table = Table(title=f"calibration of {r.label}: {c.method} ({c.target}), T={c.temperature:.4f}, "
                            f"bias={c.bias:+.4f}; fitted on {r.rows:,} rows of {report.source}",
                      title_justify="left")
        for col in ("", "before", "after"):
            table.add_column(col, justify="right" if col else "left")
        table.add_row(f"mean pred (pos rate {r.pos_rate:.4f})", f"{r.mean_pred_before:.4f}",
                      f"{r.mean_pred_after:.4f}")
        table.add_row("logloss", f"{r.logloss_before:.5f}", f"{r.logloss_after:.5f}")
        table.add_row("WLL", f"{r.wll_before:.5f}", f"{r.wll_after:.5f}")
        console.print(table)
        if c.keep_rate < 1.0 and c.target != "wll":            # WLL takes no keep-rate shift (Calibration)
            console.print(f"  infer also shifts logits by log(keep_rate={c.keep_rate:g}) = "
                          f"{math.log(c.keep_rate):+.4f} (negative downsampling); the figures above are "
                          "before that shift")
    console.print(f"  wrote {report.path}")
