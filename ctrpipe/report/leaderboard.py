"""Report leaderboard: runs ranked on the split they share, best value per column, deltas to a baseline run.

Runs are comparable when they were trained on one cache (the same manifest fingerprint: the same rows in
the same splits). The board scores them on the gold split when every one of them has gold metrics, else on
validation. Runs on another cache -- or, on validation, K-fold runs (out-of-fold rows) next to single runs
(the validation split) -- are listed below the ranking, marked and never ranked, unless `strict` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ctrpipe.errors import ManifestMismatchError, ReportError, human_bytes
from ctrpipe.report.rundata import RunData

Better = Literal["high", "low", "one"]       # larger is better, smaller is better, closest to 1 is better
Split = Literal["gold", "val"]


@dataclass(frozen=True)
class Column:
    key: str                                  # name in report.json
    title: str
    better: Better
    delta: Literal["diff", "ratio"]           # to the baseline: difference (metrics) or ratio (costs)
    value: Callable[[RunData, Split], float | None]
    text: Callable[[float], str]


def _metric(name: str) -> Callable[[RunData, Split], float | None]:
    def get(run: RunData, split: Split) -> float | None:
        scores = run.gold if split == "gold" else run.val
        v = (scores or {}).get(name)
        return v if v is not None and math.isfinite(v) else None
    return get


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


COLUMNS: tuple[Column, ...] = (
    Column("auc", "AUC", "high", "diff", _metric("auc"), lambda v: f"{v:.4f}"),
    Column("logloss", "logloss", "low", "diff", _metric("logloss"), lambda v: f"{v:.4f}"),
    Column("calibration", "calibration (mean pred / pos rate)", "one", "diff", _metric("calibration"),
           lambda v: f"{v:.3f}"),
    Column("samples_per_s", "samples/s", "high", "ratio", lambda r, s: r.resources.samples_per_s,
           lambda v: f"{v:,.0f}"),
    Column("parameters", "parameters", "low", "ratio",
           lambda r, s: float(r.resources.parameters) if r.resources.parameters is not None else None,
           lambda v: f"{v:,.0f}"),
    Column("peak_memory", "peak memory", "low", "ratio",
           lambda r, s: float(r.resources.peak_memory_bytes) if r.resources.peak_memory_bytes else None,
           human_bytes),
    Column("wall_seconds", "wall time", "low", "ratio", lambda r, s: r.resources.wall_seconds, _seconds),
    Column("train_seconds", "training time", "low", "ratio", lambda r, s: r.resources.train_seconds, _seconds),
)


@dataclass(frozen=True)
class Entry:
    run: RunData
    values: tuple[float | None, ...]          # one per COLUMNS entry; None: not recorded (shown as n/a)
    comparable: bool
    reason: str                               # why the run is not ranked ("" when it is)


@dataclass(frozen=True)
class Leaderboard:
    split: Split
    baseline: RunData
    entries: tuple[Entry, ...]                # ranked runs by AUC (then logloss), then the unranked ones
    best: tuple[frozenset[int], ...]          # per column: indices into entries of the best ranked value(s)

    @property
    def split_title(self) -> str:
        if self.split == "gold":
            return "gold split"
        return "out-of-fold rows" if self.baseline.val_kind == "oof" else "validation split"

    @property
    def baseline_entry(self) -> Entry:
        return next(e for e in self.entries if e.run is self.baseline)

    def delta(self, i: int, c: int) -> float | None:
        """Entry i's column c against the baseline: a difference or a ratio; None for the baseline itself,
        unranked runs and missing values."""
        entry, col = self.entries[i], COLUMNS[c]
        base = self.baseline_entry.values[c]
        v = entry.values[c]
        if entry.run is self.baseline or not entry.comparable or v is None or base is None:
            return None
        if col.delta == "diff":
            return v - base
        return v / base if base else None


def find_baseline(runs: Sequence[RunData], baseline: str | None) -> RunData:
    """The run named by `baseline` (its name or its path as given), or the first run."""
    if baseline is None:
        return runs[0]
    for run in runs:
        if baseline in (run.name, str(run.path)) or run.path.resolve() == Path(baseline).resolve():
            return run
    raise ReportError(f"--baseline {baseline!r} is none of the runs in the report", where="--baseline",
                      fix="pass one of: " + ", ".join(r.name for r in runs))


def build_leaderboard(runs: Sequence[RunData], baseline: str | None = None, strict: bool = False) -> Leaderboard:
    """Rank `runs` against the baseline's cache and split; with `strict`, refuse runs that cannot be ranked."""
    base = find_baseline(runs, baseline)
    same_cache = [r for r in runs if r.manifest_fingerprint and r.manifest_fingerprint == base.manifest_fingerprint]
    split: Split = "gold" if all(r.gold for r in same_cache) else "val"
    reasons = {id(r): _why_not_comparable(r, base, split) for r in runs}
    odd = [r for r in runs if reasons[id(r)]]
    if strict and odd:
        raise ManifestMismatchError(
            "runs cannot be compared on one split: " + "; ".join(f"{r.name} ({reasons[id(r)]})" for r in odd),
            where=", ".join(str(r.path) for r in odd),
            fix=f"train them on the baseline's cache ({base.name}: fingerprint {base.manifest_fingerprint[:12]}), "
                f"leave them out, or drop --strict to list them unranked")
    entries = [Entry(r, tuple(c.value(r, split) for c in COLUMNS), not reasons[id(r)], reasons[id(r)])
               for r in runs]
    entries.sort(key=_rank_key)
    best = tuple(_best(entries, c) for c in range(len(COLUMNS)))
    return Leaderboard(split, base, tuple(entries), best)


def _why_not_comparable(run: RunData, base: RunData, split: Split) -> str:
    if not run.manifest_fingerprint or run.manifest_fingerprint != base.manifest_fingerprint:
        return f"another cache: fingerprint {run.manifest_fingerprint[:12] or 'unknown'}, " \
               f"the baseline's {base.manifest_fingerprint[:12] or 'unknown'}"
    if split == "val" and run.val_kind != base.val_kind:
        kinds = {"oof": "out-of-fold rows", "val": "the validation split"}
        return f"scored on {kinds[run.val_kind]}, the baseline on {kinds[base.val_kind]}"
    return ""


def _rank_key(e: Entry) -> tuple[bool, float, float]:
    auc, logloss = e.values[0], e.values[1]
    return (not e.comparable, -(auc if auc is not None else -math.inf), logloss if logloss is not None else math.inf)


def _best(entries: Sequence[Entry], c: int) -> frozenset[int]:
    col = COLUMNS[c]
    scored = [(i, e.values[c]) for i, e in enumerate(entries) if e.comparable and e.values[c] is not None]
    if len(scored) < 2:
        return frozenset()            # one value is nobody's best
    score = {"high": lambda v: -v, "low": lambda v: v, "one": lambda v: abs(v - 1.0)}[col.better]
    top = min(score(v) for _, v in scored)
    return frozenset(i for i, v in scored if math.isclose(score(v), top, rel_tol=1e-12, abs_tol=1e-15))
