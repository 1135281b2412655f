"""Report leaderboard: runs ranked on the split they share, best value per column, deltas to a baseline run.

Runs are comparable when they were trained on one cache (the same manifest fingerprint: the same rows in
the same splits) and their primary metrics are the same mean: a run's AUC or logloss is the mean of its heads'
values weighted by their metric weights, each head scored on the rows its mask keeps, so the runs need the
same heads, the same `train.tasks.<head>.mask` and (with two heads or more) the same
`train.tasks.<head>.metric_weight`. The board scores them on the gold split when every one of them has gold
metrics, else on validation. Runs on another cache, with other heads, masks or metric weights -- or, on
validation, K-fold runs (out-of-fold rows) next to single runs (the validation split) -- and runs whose AUC on
the split is no number are listed below the ranking, marked and never ranked, unless `strict` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ctrpipe.errors import ManifestMismatchError, ReportError, human_bytes
from ctrpipe.report.rundata import HeadSettings, RunData

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


def _calibration(run: RunData, split: Split) -> float | None:
    """mean pred / pos rate, or with several heads the ratio farthest from 1 among the heads the primary
    metric counts (metric weight not 0): the all-heads ratio pools their predictions and labels, so heads 13%
    over and 13% under read as a perfect 1.000."""
    scores = (run.gold if split == "gold" else run.val) or {}
    heads = [v for h in run.heads if run.head_settings[h].metric_weight != 0
             and (v := scores.get(f"calibration.{h}")) is not None and math.isfinite(v) and v > 0]
    if len(heads) > 1:
        return max(heads, key=lambda v: abs(math.log(v)))
    return _metric("calibration")(run, split)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


COLUMNS: tuple[Column, ...] = (
    Column("auc", "AUC", "high", "diff", _metric("auc"), lambda v: f"{v:.4f}"),
    Column("logloss", "logloss", "low", "diff", _metric("logloss"), lambda v: f"{v:.4f}"),
    Column("calibration", "calibration (mean pred / pos rate; the head farthest from 1)", "one", "diff",
           _calibration, lambda v: f"{v:.3f}"),
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
    def rows_key(self) -> str:
        """The rows the board is ranked on: "gold", "val", or "oof" (K-fold runs' out-of-fold rows)."""
        return "gold" if self.split == "gold" else self.baseline.val_kind

    @property
    def split_title(self) -> str:
        return {"gold": "gold split", "oof": "out-of-fold rows", "val": "validation split"}[self.rows_key]

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
        if not _same_kind(entry.run, self.baseline, col):
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
    """Rank `runs` against the baseline's cache, heads and split; with `strict`, refuse runs that cannot be
    ranked. Only runs whose metric means the baseline's pick the split: one that is never ranked must not move
    the board off gold."""
    base = find_baseline(runs, baseline)
    peers = [r for r in runs if not _why_other_metric(r, base)]
    # gold ranks when every peer has it, and the baseline's gold AUC is a number: a gold split of one class
    # (NaN for every run of the cache) refused the whole report, with a fix (another baseline) that could not work
    split: Split = "gold" if all(r.gold for r in peers) and not _no_score(base, "gold") else "val"
    reasons = {id(r): _why_not_comparable(r, base, split) for r in runs}
    odd = [r for r in runs if reasons[id(r)]]
    if _no_score(base, split):      # the baseline's AUC is no number: nothing could be ranked against it
        raise ReportError(f"the baseline {base.name} cannot be ranked: {_no_score(base, split)}", where=str(base.path),
                          fix="pass another run as --baseline (one whose metrics.json holds its AUC), or leave "
                              "this one out")
    if strict and any(_no_score(r, split) for r in odd):
        r = next(r for r in odd if _no_score(r, split))
        raise ReportError(f"run {r.name} cannot be ranked: {_no_score(r, split)}", where=str(r.path),
                          fix="leave it out, drop --strict to list it unranked, or retrain it (a damaged "
                              "metrics.json)")
    if strict and odd:
        raise ManifestMismatchError(
            "runs cannot be compared on one split: " + "; ".join(f"{r.name} ({reasons[id(r)]})" for r in odd),
            where=", ".join(str(r.path) for r in odd),
            fix=f"train them like the baseline ({base.name}: cache fingerprint {base.manifest_fingerprint[:12]}, "
                f"heads {list(base.heads)}, its train.tasks masks and metric weights), leave them out, or drop "
                f"--strict to list them unranked")
    entries = [Entry(r, tuple(c.value(r, split) for c in COLUMNS), not reasons[id(r)], reasons[id(r)])
               for r in runs]
    entries.sort(key=_rank_key)
    best = tuple(_best(entries, c) for c in range(len(COLUMNS)))
    return Leaderboard(split, base, tuple(entries), best)


def _why_not_comparable(run: RunData, base: RunData, split: Split) -> str:
    """Why `run` cannot be ranked next to the baseline ("" when it can), in words the page and --strict show."""
    return _why_other_metric(run, base) or _other_rows(run, base, split) or _no_score(run, split)


def _no_score(run: RunData, split: Split) -> str:
    """A run whose AUC on the split is no number cannot be placed: listed unranked with why, not ranked with
    'n/a' (a metrics.json edited or damaged; NaN from a split of one class)."""
    scores = run.gold if split == "gold" else run.val
    value = (scores or {}).get("auc")
    if value is None:
        return f"metrics.json holds no {split} auc (missing, or not a number)"
    if not math.isfinite(value):
        return f"metrics.json's {split} auc is {value} (a split of one class, or a damaged file)"
    return ""


def _why_other_metric(run: RunData, base: RunData) -> str:
    """Why `run`'s metrics measure something else than the baseline's on any split ("" when they do not)."""
    return _other_cache(run, base) or _other_heads(run, base) or _other_head_settings(run, base)


def _other_cache(run: RunData, base: RunData) -> str:
    """Another cache holds other rows, so its splits are other examples."""
    if run.manifest_fingerprint and run.manifest_fingerprint == base.manifest_fingerprint:
        return ""
    return f"another cache: fingerprint {run.manifest_fingerprint[:12] or 'unknown'}, " \
           f"the baseline's {base.manifest_fingerprint[:12] or 'unknown'}"


def _other_rows(run: RunData, base: RunData, split: Split) -> str:
    """On validation a K-fold run is scored on its out-of-fold rows (every row once), a single run on the
    validation split: other rows of one cache."""
    if split == "val" and run.val_kind != base.val_kind:
        kinds = {"oof": "out-of-fold rows", "val": "the validation split"}
        return f"scored on {kinds[run.val_kind]}, the baseline on {kinds[base.val_kind]}"
    return ""


def _other_heads(run: RunData, base: RunData) -> str:
    """The primary metric is a mean over the heads: over other heads (another label set, or ESMM's ctr / ctcvr /
    cvr against one head per label) it is another number. The heads' order does not change the mean."""
    if sorted(run.heads) == sorted(base.heads):
        return ""
    return f"other heads: {list(run.heads)}, the baseline's {list(base.heads)}"


def _other_head_settings(run: RunData, base: RunData) -> str:
    """Same heads, another mean: a head's mask picks the rows it is scored on (conversion on clicked rows, or on
    every row), its metric weight its share of the mean ((1, 1) and (2, 2) weigh alike). One head is the whole
    mean whatever its weight.

    Runs record each head's settings as training resolved them; a run from before that record gives them as its
    config wrote them, where a value set to the model's default still differs from the default left unset --
    listed unranked, never ranked wrongly.
    """
    diffs = []
    for head in base.heads:
        mine, theirs = _settings(run, head), _settings(base, head)
        if mine.mask != theirs.mask:
            diffs.append(_differs(f"train.tasks.{head}.mask", mine.mask, theirs.mask))
    if len(base.heads) > 1:
        mine_w, base_w = _weight_shares(run, base.heads), _weight_shares(base, base.heads)
        if any(not math.isclose(mine_w[h], base_w[h], rel_tol=1e-9) for h in base.heads):
            diffs += [_differs(f"train.tasks.{h}.metric_weight", mine, theirs) for h in base.heads
                      if (mine := _settings(run, h).metric_weight) != (theirs := _settings(base, h).metric_weight)]
    return "other head settings: " + "; ".join(diffs) if diffs else ""


def _weight_shares(run: RunData, heads: Sequence[str]) -> dict[str, float]:
    """Each head's share of the mean; the raw weights (-1: unknown) when one is unknown, so that only equal
    values agree."""
    weights = [_settings(run, h).metric_weight for h in heads]
    if any(w is None for w in weights) or not sum(w for w in weights if w is not None) > 0:
        return {h: float(w) if w is not None else -1.0 for h, w in zip(heads, weights, strict=True)}
    total = sum(w for w in weights if w is not None)
    return {h: float(w) / total for h, w in zip(heads, weights, strict=True) if w is not None}


def _settings(run: RunData, head: str) -> HeadSettings:
    """The head's recorded settings; a head the run does not record left both to the model."""
    return run.head_settings.get(head, HeadSettings(mask=None, metric_weight=None))


def _differs(key: str, value: str | float | None, base_value: str | float | None) -> str:
    """'train.tasks.converted.mask clicked, the baseline's none'."""
    return f"{key} {_setting_text(value)}, the baseline's {_setting_text(base_value)}"


def _setting_text(value: str | float | None) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else value


def _rank_key(e: Entry) -> tuple[bool, float, float]:
    auc, logloss = e.values[0], e.values[1]
    return (not e.comparable, -(auc if auc is not None else -math.inf), logloss if logloss is not None else math.inf)


def _same_kind(run: RunData, base: RunData, col: Column) -> bool:
    """Whether `run`'s value of `col` measures what the baseline's does: a GPU run's peak memory is GPU memory,
    a CPU run's the host's, and one is no ratio or rival of the other."""
    return col.key != "peak_memory" or run.resources.peak_memory_where == base.resources.peak_memory_where


def _best(entries: Sequence[Entry], c: int) -> frozenset[int]:
    """The best value of column c among the ranked runs; peak memory within each kind (GPU, host, host RSS):
    one kind's bytes are no rival of another's."""
    col = COLUMNS[c]
    kinds: dict[str, list[tuple[int, float]]] = {}
    for i, e in enumerate(entries):
        v = e.values[c]
        if e.comparable and v is not None:
            kind = e.run.resources.peak_memory_where if col.key == "peak_memory" else ""
            kinds.setdefault(kind, []).append((i, v))
    score = {"high": lambda v: -v, "low": lambda v: v, "one": lambda v: abs(v - 1.0)}[col.better]
    best: set[int] = set()
    for scored in kinds.values():
        if len(scored) < 2:
            continue                  # one value is nobody's best
        top = min(score(v) for _, v in scored)
        best |= {i for i, v in scored if math.isclose(score(v), top, rel_tol=1e-12, abs_tol=1e-15)}
    return frozenset(best)
