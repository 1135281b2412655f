"""`ctrpipe report` entry point: run directories -> DIR/index.html, DIR/figures/*.png, DIR/report.json.

The report is built in a hidden sibling folder `.DIR.incomplete-<pid>` and renamed onto DIR when whole
(report.json is written last), so a crash never leaves a half-written report under DIR; an older report
in DIR is replaced only then. A folder at DIR that is not a report is never touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from matplotlib.figure import Figure

from ctrpipe import __version__
from ctrpipe.atomic import pid_alive, write_json_atomic, write_text_atomic
from ctrpipe.console import console
from ctrpipe.errors import DISK_FULL_ERRNOS, ReportError, disk_full_as_error
from ctrpipe.infer.submission import shard_cache_holding
from ctrpipe.report.figures import (
    comparison_figure,
    gate_figure,
    histogram_figure,
    reliability,
    reliability_figure,
    save_png,
    training_figure,
    validation_figure,
)
from ctrpipe.report.leaderboard import COLUMNS, Leaderboard, build_leaderboard
from ctrpipe.report.page import FigureRef, RunSection, render_page
from ctrpipe.report.rundata import RunData, load_run

FORMAT = "ctrpipe.report/2"      # 2: "split" says "oof" for K-fold runs' out-of-fold rows; "rows" added
MARKER = "report.json"           # written last: its presence marks a complete report
FIGURES = "figures"


def run_report(runs: Sequence[Path], out: Path, baseline: str | None = None, strict: bool = False,
               quiet: bool = False) -> Path:
    """Write the report of `runs` into `out`; returns the path of index.html."""
    if not runs:
        raise ReportError("no run directories given", where="RUN", fix="pass one or more, e.g. runs/criteo_dnn")
    data = _unique_names([load_run(Path(r)) for r in runs])
    board = build_leaderboard(data, baseline, strict)
    out = Path(out).resolve()
    _check_out(out, [Path(r) for r in runs])
    work = out.parent / f".{out.name}.incomplete-{os.getpid()}"
    _remove_stale(out)
    with disk_full_as_error(out, rerun="the report is written again from the start; an older report in "
                                        f"{out} stays until the new one is whole"):
        try:
            shutil.rmtree(work, ignore_errors=True)      # ours: left by an earlier call in this process
            try:
                (work / FIGURES).mkdir(parents=True)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:      # a full disk or quota: its own error (disk_full_as_error)
                    raise
                raise ReportError(f"cannot write in {out.parent}, the folder of --out {out}: "
                                  f"{exc.strerror or exc}", where=f"--out {out}",
                                  fix="pass a report folder in a place you may write to") from None
            _write(work, data, board)
            _swap(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    index = out / "index.html"
    if not quiet:
        for entry in board.entries:
            if not entry.comparable:
                console.print(f"[yellow]not ranked:[/] {entry.run.name}: {entry.reason}")
    console.print(f"report of {len(data)} run(s), ranked on the {board.split_title} -> {index}")
    return index


def _unique_names(runs: list[RunData]) -> list[RunData]:
    """Runs with the same exp_name are named by as much of their folder's path as it takes to tell them apart
    (A/runs/dnn and B/runs/dnn: 'A/runs/dnn', not 'runs/dnn' twice, whose links and --baseline then found one
    of them; runs/dnn and its copy runs/dnn_2: 'dnn' and 'dnn_2')."""
    seen = [r.path.resolve() for r in runs]
    for i, p in enumerate(seen):
        if p in seen[:i]:
            raise ReportError(f"run {runs[i].path} is given twice", where=str(runs[i].path),
                              fix="pass each run directory once")
    names = [r.name for r in runs]
    out = list(names)
    for name in {n for n in names if names.count(n) > 1}:
        clash = [i for i, n in enumerate(names) if n == name]
        paths = [seen[i].parts[1:] for i in clash]          # resolved: absolute, without the root
        for depth in range(1, max(len(p) for p in paths) + 1):
            labels = ["/".join(p[-depth:]) for p in paths]
            if len(set(labels)) == len(labels):
                break
        for i, label in zip(clash, labels, strict=True):
            out[i] = label
    return [dataclasses.replace(r, name=n) if n != r.name else r for r, n in zip(runs, out, strict=True)]


OWN_ENTRIES = frozenset({"index.html", MARKER, FIGURES})     # what a report folder holds: replaced whole
# what a file browser or editor leaves in a folder it showed: replaced with the report, not the user's
OS_LITTER = frozenset({"Thumbs.db", "desktop.ini"})


def _check_out(out: Path, runs: Sequence[Path]) -> None:
    """Refuse an --out whose replacement would delete anything but an earlier report: a run given (a run
    copied into the report folder was deleted with it), or files of the user's beside the report."""
    for run in runs:
        if run.resolve() == out or out in run.resolve().parents:
            raise ReportError(f"run {run} is inside --out {out}, which the new report replaces whole",
                              where=f"--out {out}", fix="pass a report folder that holds no run, e.g. --out report")
    if out == Path.cwd() or out in Path.cwd().parents:    # the finished report replaces the folder
        raise ReportError(f"--out {out} is the current folder (or holds it): the new report replaces that "
                          "folder whole", where=str(out), fix="pass a report folder below the current one, "
                                                              "e.g. --out report, or run from its parent folder")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file", where=str(out), fix="pass a folder for the report")
    if (cache := shard_cache_holding(out)) is not None:    # its folder is the build's: a rebuild refused it
        raise ReportError(f"--out {out} is inside the shard cache {cache}, whose folder belongs to `ctrpipe shard`",
                          where=f"--out {out}", fix="pass a report folder outside the cache, e.g. --out report")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():          # else the error named the report's temp folder, a path the user never gave
        raise ReportError(f"--out {out} goes through {above}, which is a file", where=f"--out {out}",
                          fix="pass a report folder whose parent folders are folders")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot make the folder of --out {out}: {exc.strerror or exc}", where=f"--out {out}",
                          fix="pass a report folder in a place you may write to") from None
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ReportError(f"--out {out} holds files that are not a ctrpipe report; it is left as it is",
                          where=str(out), fix="pass a new or empty folder, or an earlier report's folder")
    if (out / MARKER).is_file():
        extra = sorted(p.name for p in out.iterdir()
                       if p.name not in OWN_ENTRIES | OS_LITTER and not p.name.startswith("."))
        if extra:
            raise ReportError(f"--out {out} is an earlier report, and it also holds {extra[0]!r}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + ", which replacing the report would delete; it is left as it is",
                              where=str(out / extra[0]),
                              fix="move it out of the report folder, or pass another --out")


def _remove_stale(out: Path) -> None:
    """Leftovers of a report to the same folder that crashed (its process is gone)."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind in ("incomplete", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _swap(work: Path, out: Path) -> None:
    """Rename the finished report onto `out`; an older report moves aside first and is deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(work: Path, runs: list[RunData], board: Leaderboard) -> None:
    def draw(name: str, fig: Figure | None, alt: str, caption: str) -> FigureRef | None:
        if fig is None:
            return None
        w, h = save_png(fig, work / FIGURES / name)
        return FigureRef(f"{FIGURES}/{name}", alt, caption, w, h)

    sections = [_section(i, run, draw) for i, run in enumerate(runs)]
    comparison = draw("all_runs.png", comparison_figure(runs), "training loss and validation AUC of every run",
                      "Every run's training loss and validation AUC (first fold of K-fold runs).") \
        if len(runs) > 1 else None
    title = "ctrpipe report: " + ", ".join(r.name for r in runs[:4]) + (" …" if len(runs) > 4 else "")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f" by ctrpipe {__version__}"
    write_text_atomic(work / "index.html", render_page(title, board, comparison, sections, generated))
    write_json_atomic(work / MARKER, _summary(board))


def _section(i: int, run: RunData, draw: Callable[[str, Figure | None, str, str], FigureRef | None]) -> RunSection:
    n = f"run{i}"
    bins = reliability(run)
    figs = [
        draw(f"{n}_training.png", training_figure(run), f"{run.name}: training loss and learning rate",
             "Training loss and dense learning rate at each log step (dotted: the best step)."),
        draw(f"{n}_validation.png", validation_figure(run), f"{run.name}: validation metrics per task",
             "Validation AUC and logloss at each evaluation, per task (dashed: the heads' weighted mean)."),
        draw(f"{n}_reliability.png", reliability_figure(bins) if bins else None,
             f"{run.name}: reliability diagram",
             f"Reliability from {run.predictions_from}: equal-count bins of the predicted probability; mean "
             f"prediction vs observed positive rate (95% intervals), rows per bin below."),
        draw(f"{n}_histograms.png", histogram_figure(run) if bins else None,
             f"{run.name}: prediction histograms per class",
             "Predicted probabilities of negative and positive rows, each class summing to 1."),
        draw(f"{n}_gates.png", gate_figure(run), f"{run.name}: gate usage over time",
             "Mixture-of-experts gate weight per expert over training steps, per task."),
    ]
    return RunSection(run, f"run-{i}", tuple(f for f in figs if f is not None), tuple(bins))


def _summary(board: Leaderboard) -> dict[str, object]:
    """report.json: the leaderboard in machine-readable form."""
    return {"format": FORMAT, "split": board.rows_key, "rows": board.split_title, "baseline": board.baseline.name,
            "runs": [{"name": e.run.name, "path": str(e.run.path), "model": e.run.model,
                      "manifest_fingerprint": e.run.manifest_fingerprint, "ranked": e.comparable,
                      "reason": e.reason, **{c.key: _json_number(v) for c, v in zip(COLUMNS, e.values, strict=True)},
                      "best": [c.key for k, c in enumerate(COLUMNS) if i in board.best[k]]}
                     for i, e in enumerate(board.entries)]}


def _json_number(v: float | None) -> float | int | None:
    """A value as JSON holds it: NaN and infinities (an AUC of one class) are null, not invalid JSON."""
    if v is None or not math.isfinite(v):
        return None
    return int(v) if float(v).is_integer() else v
