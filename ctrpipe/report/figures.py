"""Report figures: matplotlib `Figure` objects drawn by the Agg renderer into PNG files.

`matplotlib.figure.Figure` is used without pyplot: no global figure registry to leak or close, no GUI
backend or display is ever chosen, and figures can be drawn from any thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ctrpipe.report.rundata import Curve, RunData, RunLogs
from ctrpipe.report.stats import ReliabilityBins, class_histograms, reliability_bins

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
         "axes.spines.top": False, "axes.spines.right": False}
DPI = 100
VAL_METRICS = ("auc", "logloss")     # the validation panels, one per metric
PANEL_W = 4.6                         # inches per panel


def save_png(fig: Figure, path: Path) -> tuple[int, int]:
    """Write `fig` as a PNG (no 'Software' stamp, so the same figure gives the same bytes); (width, height) px."""
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


def _figure(n_cols: int, height: float, n_rows: int = 1, **kw: object) -> tuple[Figure, np.ndarray]:
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(PANEL_W * n_cols, height), layout="constrained")
        axes = fig.subplots(n_rows, n_cols, squeeze=False, **kw)
    return fig, axes


def _fold_label(log: RunLogs, what: str) -> str:
    return f"{what} ({log.name})" if log.name else what


def _one_point(steps: np.ndarray) -> dict[str, object]:
    """A marker for a curve of one logged point, which a line alone does not draw (a short run's one log row)."""
    return {"marker": "o", "ms": 4} if len(steps) == 1 else {}


def training_figure(run: RunData) -> Figure:
    """Training loss and dense learning rate over steps (one line per fold of a K-fold run)."""
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(2, 3.0)
        loss_ax, lr_ax = axes[0]
        for log in run.logs:
            loss_ax.plot(log.loss.steps, log.loss.values, lw=1.2, label=_fold_label(log, "loss"),
                         **_one_point(log.loss.steps))
            lr_ax.plot(log.lr.steps, log.lr.values, lw=1.2, label=_fold_label(log, "lr"), **_one_point(log.lr.steps))
        _mark_best(loss_ax, run)
        loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
        lr_ax.set(title="learning rate (dense)", xlabel="step", ylabel="lr")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(run.logs) > 1:
            _legend(loss_ax)
    return fig


def val_curves(log: RunLogs, metric: str, heads: Sequence[str]) -> dict[str, Curve]:
    """A validation metric per head ('auc.clicked' from diagnostics.csv), or the main one for a single head."""
    per_head = {h: log.diagnostics.get(f"val/{metric}.{h}") for h in heads}
    if len(heads) > 1 and all(c is not None and len(c) for c in per_head.values()):
        curves = {h: c for h, c in per_head.items() if c is not None}
        if metric in log.val:
            curves["weighted"] = log.val[metric]
        return curves
    return {heads[0] if heads else metric: log.val[metric]} if metric in log.val else {}


def validation_figure(run: RunData) -> Figure | None:
    """Validation AUC and logloss per task over evaluations; None when the run was never evaluated."""
    if not any(m in log.val for log in run.logs for m in VAL_METRICS):
        return None
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(VAL_METRICS), 3.0)
        for ax, metric in zip(axes[0], VAL_METRICS, strict=True):
            for log in run.logs:
                for head, curve in val_curves(log, metric, run.heads).items():
                    style = {"ls": "--", "color": "black"} if head == "weighted" else {}
                    ax.plot(curve.steps, curve.values, marker="o", ms=3, lw=1.2,
                            label=_fold_label(log, head), **style)
            _mark_best(ax, run)
            ax.set(title=f"validation {metric}", xlabel="step", ylabel=metric)
            _legend(ax)
    return fig


def _mark_best(ax: Axes, run: RunData) -> None:
    if run.best_step is not None and not run.kfold:
        ax.axvline(run.best_step, color="grey", ls=":", lw=1, label="best step")


def reliability(run: RunData) -> list[tuple[str, ReliabilityBins]]:
    """(head, bins) for every head with saved predictions."""
    return [(p.head, reliability_bins(p.probs, p.labels)) for p in run.predictions if p.probs.size]


def reliability_figure(heads: Sequence[tuple[str, ReliabilityBins]]) -> Figure:
    """Per head: mean prediction vs observed rate per bin (95% binomial error bars), and rows per bin below."""
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(heads), 5.2, n_rows=2, height_ratios=(3, 1.3), sharex="col")
        for col, (head, b) in enumerate(heads):
            top_ax, count_ax = axes[0, col], axes[1, col]
            err = 1.96 * b.std_err
            lo, hi = _padded(b.lo, b.hi)                           # x: where the predictions are
            y_lo, y_hi = _padded(np.r_[lo, b.pos_rate - err], np.r_[hi, b.pos_rate + err])
            top_ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="perfectly calibrated")
            top_ax.errorbar(b.mean_pred, b.pos_rate, yerr=err, fmt="o-", ms=4, lw=1.2, capsize=2,
                            color="C0", label="observed rate")
            top_ax.set(title=f"{head}: reliability (ECE {b.ece:.4f}, {int(b.count.sum()):,} rows)",
                       ylabel="observed positive rate", xlim=(lo, hi), ylim=(y_lo, y_hi))
            top_ax.legend(loc="upper left")
            widths = np.maximum(b.hi - b.lo, (hi - lo) / 300)
            count_ax.bar(b.lo, b.count, width=widths, align="edge", color="C1", alpha=0.7, edgecolor="C1")
            for x, w, c in zip(b.lo, widths, b.count, strict=True):
                count_ax.annotate(f"{c:,}", (x + w / 2, c), ha="center", va="bottom", fontsize=7, rotation=90)
            count_ax.set(xlabel="predicted probability (bars: each bin's range)", ylabel="rows per bin")
            count_ax.set_ylim(0, 1.6 * max(int(b.count.max()), 1))
    return fig


def _padded(lows: np.ndarray, highs: np.ndarray) -> tuple[float, float]:
    """An axis range over the values padded by 5%, inside [0, 1]: predictions often span a narrow range."""
    lo, hi = float(np.min(lows)), float(np.max(highs))
    pad = 0.05 * max(hi - lo, 1e-3)
    return max(0.0, lo - pad), min(1.0, hi + pad)


def histogram_figure(run: RunData) -> Figure:
    """Per head: the distribution of predicted probabilities of negatives and positives (each sums to 1)."""
    heads = [p for p in run.predictions if p.probs.size]
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(heads), 3.0)
        for ax, p in zip(axes[0], heads, strict=True):
            edges, neg, pos = class_histograms(p.probs, p.labels)
            for counts, name, color in ((neg, "label 0", "C0"), (pos, "label 1", "C3")):
                share = counts / max(int(counts.sum()), 1)
                ax.stairs(share, edges, fill=True, alpha=0.35, color=color, label=f"{name} ({int(counts.sum()):,})")
                ax.stairs(share, edges, color=color, lw=1.2)
            ax.set(title=f"{p.head}: predictions by class", xlabel="predicted probability", ylabel="share of class")
            _legend(ax)
    return fig


def gate_figure(run: RunData) -> Figure | None:
    """Mixture-of-experts gate usage per task over steps (stacked shares per expert) and normalised entropy."""
    log = next((lg for lg in run.logs if any(n.startswith("train/gate.") for n in lg.diagnostics)), None)
    if log is None:
        return None
    tasks = {t: [n for n in ns if n in log.diagnostics] for t, ns in run.gate_tasks().items()}
    tasks = {t: ns for t, ns in tasks.items() if ns}
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(len(tasks), 3.2)
        for ax, (task, names) in zip(axes[0], tasks.items(), strict=True):
            curves = [log.diagnostics[n] for n in names]
            steps = curves[0].steps
            for c in curves[1:]:
                steps = np.intersect1d(steps, c.steps)
            shares = np.stack([c.values[np.isin(c.steps, steps)] for c in curves])       # (K, n)
            if len(steps) == 1:      # a stack over one step has no width: draw it one step wide
                steps, shares = np.array([steps[0] - 0.5, steps[0] + 0.5]), np.repeat(shares, 2, axis=1)
            ax.stackplot(steps, shares, labels=[n.rsplit(".", 1)[1] for n in names], alpha=0.85)
            entropy = log.diagnostics.get(f"train/gate_entropy.{task}")
            if entropy is not None and len(curves) > 1:
                ax.plot(entropy.steps, entropy.values / math.log(len(curves)), color="black", ls="--", lw=1.2,
                        label="entropy / log K")
            where = f", {log.name}" if log.name else ""
            ax.set(title=f"gate usage: {task}{where}", xlabel="step", ylabel="share of gate weight", ylim=(0, 1.02))
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def comparison_figure(runs: Sequence[RunData]) -> Figure:
    """Training loss and validation AUC of every run on shared axes (the first fold of K-fold runs)."""
    with matplotlib.rc_context(STYLE):
        fig, axes = _figure(2, 3.2)
        loss_ax, auc_ax = axes[0]
        for run in runs:
            log = run.logs[0]
            loss_ax.plot(log.loss.steps, log.loss.values, lw=1.2, label=run.name, **_one_point(log.loss.steps))
            if "auc" in log.val:
                auc_ax.plot(log.val["auc"].steps, log.val["auc"].values, marker="o", ms=3, lw=1.2, label=run.name)
        loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
        auc_ax.set(title="validation AUC", xlabel="step", ylabel="AUC")
        _legend(loss_ax)
        _legend(auc_ax)
    return fig


def _legend(ax: Axes, **kw: object) -> None:
    """A legend when the axes have labelled lines (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)
