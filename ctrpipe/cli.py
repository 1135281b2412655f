"""Typer app: synth, shard, inspect, train, infer, report, blend. The one place that turns errors into exit codes.

Each command is a thin shell over a stage function; a `CtrpipeError` (or a path the system refuses: missing,
read-only, not permitted) becomes one red message on stderr and exit code 1, anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperCommand

from ctrpipe.atomic import hold_stop
from ctrpipe.console import console
from ctrpipe.errors import CtrpipeError, DiskFullError, first_on_node

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Click logs -> shard cache -> GPU batches -> CTR models -> submissions.")
blend_app = typer.Typer(no_args_is_help=True, help="Blend prediction files.")
app.add_typer(blend_app, name="blend")

T = TypeVar("T")

CfgOpt = typer.Option(None, "--cfg", help="YAML config, e.g. cfgs/criteo.yaml")
SetOpt = typer.Option([], "--set", help="dotted override, repeatable: --set data.hash_bins=1000000")
# a run keeps its cache's data section, so training's examples are other sections' keys
TrainSetOpt = typer.Option([], "--set", help="dotted override, repeatable: --set train.lr=0.002 (data.* keys "
                                             "are the cache's: shard again to change them)")
InferSetOpt = typer.Option([], "--set", help="inference override, repeatable: --set infer.method=mean "
                                             "(infer.*, loader.*, train.device, train.amp)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bar; one summary line")


RERUN = "run the same command again"
QUIET_RANK_WAIT_S = 60      # at most: torchrun ends a waiting rank once the printing one has exited


def _run(fn: Callable[[], T], rerun_note: str | None = None, interrupted_note: str = RERUN) -> T:
    """Call a stage; render user errors as what / where / fix without a traceback.

    `rerun_note` replaces a full disk's note on what running the command again does, where the command
    needs a flag for it (train: --resume); `interrupted_note` says what to run after Ctrl-C."""
    with _CtrlC() as ctrl_c:
        try:
            result = fn()
        except CtrpipeError as exc:
            if exc.shown_by_peer:
                _let_the_printing_rank_exit_first()
                raise typer.Exit(1) from None
            if rerun_note and isinstance(exc, DiskFullError):
                exc = exc.rerun_as(rerun_note)
            # escaped: a message may quote text with brackets (a path, gloo's "[pair.cc:537]") that is not markup
            console.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            message = _refused_path(exc)
            if message is None:
                raise
            console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _interrupted(interrupted_note, ctrl_c.signum)
        except Exception:
            if ctrl_c.signum:           # a library turned Ctrl-C into an error of its own (see _CtrlC)
                _interrupted(interrupted_note, ctrl_c.signum)
            raise
        if ctrl_c.signum:   # raised where Python drops it (a garbage collector's weakref callback): still a stop
            _interrupted(interrupted_note, ctrl_c.signum)
        return result


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, imported when first called: inside `_run`, so Ctrl-C or SIGTERM while a stage's
    libraries load (torch, polars: a second or so) gets the interrupted note, not a silent exit."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


def _refused_path(exc: OSError) -> str | None:
    """The message for a path the system refused, or None for another OSError (a bug keeps its traceback).

    Mostly paths the user gave, so said plainly (and how to tell if it was not): an output path through a file
    (--out preds.csv/x, --runs notes.txt: every command creates folders), a name already taken, a path that is
    missing, not permitted, read-only or a folder where a file was meant."""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        what = "a part of that path is a file, not a folder" if isinstance(exc, NotADirectoryError) \
            else "a file of that name is already there"
        return (f"cannot use {exc.filename}: {what}\n"
                "  fix: check the path; an output path's folders must be folders (or move the file away)")
    if exc.filename is None or exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR):
        return None
    if exc.errno == errno.EROFS:     # only ever met writing: the output folder (--out, --runs) is read-only
        where = str(exc.filename).removesuffix(".incomplete")
        return (f"cannot write {where}: the file system there is read-only\n  fix: give an output folder you may "
                "write to (--out, or --runs for train)")
    # an output is written as NAME.incomplete first: the user gave NAME
    path = str(exc.filename).removesuffix(".incomplete")
    if exc.filename2 is not None and str(exc.filename2) != path:       # a rename onto another name
        path += f" -> {exc.filename2}"
    return (f"cannot use {path}: {exc.strerror or ''} ({type(exc).__name__})\n  fix: check the path: it must "
            "exist to be read, an output must name a file in a folder you may write to; if it is no path you "
            "gave, report it as a bug")


def _interrupted(note: str, signum: int = 0) -> NoReturn:
    if first_on_node():             # a torchrun job's ranks all get Ctrl-C: one note per machine
        what = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
        console.print(f"[yellow]{what}[/]: nothing partial was left behind; {note}")
    raise typer.Exit(128 + (signum or signal.SIGINT)) from None


class _CtrlC:
    """Which stop signal arrived while a stage ran (`signum`, 0 for none). A library may catch the
    KeyboardInterrupt raised inside its own call and raise another error (polars: a TypeError naming no data
    type): that is the interruption, not a bug. Installed only in the main thread, over Python's own Ctrl-C
    handler (an ignored SIGINT stays ignored). SIGTERM (a scheduler's preemption, `kill`) stops a stage as
    Ctrl-C does, so it cleans up and says how to continue, instead of ending the process mid-write with no
    word; not in a torchrun rank, which torchrun itself stops with SIGTERM when another rank fails (that
    rank's error is the message)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if not hold_stop():         # raised at the end of a commit of files that belong together instead
            signal.default_int_handler(signum, frame)

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and "TORCHELASTIC_RUN_ID" not in os.environ:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _let_the_printing_rank_exit_first() -> None:
    """A quiet torchrun rank waits before it exits: torchrun stops every process as soon as one fails, which
    could stop the rank that prints the error before it has (and name the quiet one as the failure)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(QUIET_RANK_WAIT_S)


@app.command()
def synth(
    fmt: str = typer.Option("criteo", "--format", help="criteo | parquet"),
    rows: int = typer.Option(100_000, "--rows", help="training rows"),
    test_rows: int = typer.Option(0, "--test-rows", help="also write a labelled test file from the same model"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("data/synth"), "--out", help="output folder"),
    gz: bool = typer.Option(False, "--gzip", help="criteo: write .tsv.gz"),
    quiet: bool = QuietOpt,
) -> None:
    """Generate a deterministic synthetic click log plus the true click probability of every row."""
    run_synth = _lazy("ctrpipe.synth", "run_synth")

    _run(lambda: run_synth(fmt=fmt, rows=rows, test_rows=test_rows, seed=seed, out=out, gz=gz, quiet=quiet))


class _PathLists(TyperCommand):
    """`--input a b` and `--gold g1 g2`: paths right after a list option's value are more values of that option.
    Click gives an option one value per occurrence, so they arrived as positional arguments, which `shard`
    reads as further inputs: `--gold g1 g2` trained on g2, held-out rows leaking into training."""

    LISTS = ("--input", "-i", "--gold")

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        extending: str | None = None             # the list option whose values bare paths continue
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                out += args[i:]
                break
            if a.startswith("-") and a != "-":
                out.append(a)
                extending = None
                if a in self.LISTS and i + 1 < len(args):
                    out.append(args[i + 1])
                    extending = a
                    i += 1
                elif a.split("=", 1)[0] in self.LISTS:
                    extending = a.split("=", 1)[0]
            else:
                out += [extending, a] if extending else [a]
            i += 1
        return super().parse_args(ctx, out)


@app.command(cls=_PathLists)
def shard(
    inputs: list[Path] = typer.Option(..., "--input", "-i",
                                      help="Criteo text or CSV (.gz ok), or Parquet: files, folders or globs"),
    more_inputs: list[Path] = typer.Argument(None, help="further inputs", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="cache folder, e.g. shards/criteo"),
    cfg: Optional[Path] = CfgOpt,  # noqa: UP045 - typer needs Optional on 3.10
    overrides: list[str] = SetOpt,
    gold: list[Path] = typer.Option([], "--gold", help="separate gold-evaluation inputs (labelled): --gold a b"),
    stats_from: Optional[Path] = typer.Option(None, "--stats-from",  # noqa: UP045
                                              help="train cache whose fitted statistics to reuse (test data)"),
    test: bool = typer.Option(False, "--test", help="input is test data: every row goes to the test split"),
    bad_rows: Optional[str] = typer.Option(None, "--bad-rows", help="error | skip"),  # noqa: UP045
    force: bool = typer.Option(False, "--force", help="rebuild even if a matching cache exists; the old "
                                                      "cache stays until the new one is complete"),
    workers: int = typer.Option(1, "--workers", help="processes for both passes (statistics, shards), one "
                                                     "input file per task (same cache for any value)"),
    dask: Optional[str] = typer.Option(None, "--dask",  # noqa: UP045
                                       help="run them on Dask instead: 'local' (a local cluster of "
                                            "--workers processes) or a scheduler address, tcp://host:8786; "
                                            "workers must see the inputs and --out (shared filesystem)"),
    quiet: bool = QuietOpt,
) -> None:
    """Parse raw logs once into a memory-mappable shard cache with a manifest."""
    from ctrpipe.hostmem import share_main_arena

    share_main_arena()      # before polars and pyarrow start threads: no thread of the build takes an arena
    run_shard = _lazy("ctrpipe.shard.build", "run_shard")

    all_inputs = [*inputs, *(more_inputs or [])]
    _run(lambda: run_shard(cfg_path=cfg, overrides=overrides, inputs=all_inputs, out=out, gold=gold,
                           stats_from=stats_from, test=test, bad_rows=bad_rows, force=force, quiet=quiet,
                           workers=workers, dask=dask),
         interrupted_note="run the same command to resume the build (its finished shards are kept)")


@app.command()
def inspect(cache: Path = typer.Argument(..., help="shard cache folder")) -> None:
    """Check a shard cache before training; exits non-zero when a check fails."""
    run_inspect = _lazy("ctrpipe.shard.inspect", "run_inspect")

    ok = _run(lambda: run_inspect(cache))
    if not ok:
        raise typer.Exit(1)


@app.command()
def train(
    shards: Path = typer.Option(..., "--shards", help="shard cache folder"),
    cfg: Optional[Path] = CfgOpt,  # noqa: UP045
    overrides: list[str] = TrainSetOpt,
    runs: Path = typer.Option(Path("runs"), "--runs", help="folder that holds run directories"),
    kfold: int = typer.Option(0, "--kfold", help="train one model per stored fold (same as --set cv.n_splits=K)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run"),
    quiet: bool = QuietOpt,
) -> None:
    """Train a model on a shard cache; writes runs/<exp_name>/."""
    run_train = _lazy("ctrpipe.train.fit", "run_train")

    _run(lambda: run_train(cfg_path=cfg, overrides=overrides, shards=shards, runs=runs, kfold=kfold,
                           resume=resume, quiet=quiet),
         rerun_note="add --resume, and training continues from the last complete checkpoint (ckpt_last.pt)",
         interrupted_note="run the same command with --resume to continue from the last complete checkpoint")


@app.command()
def infer(
    run: Path = typer.Option(..., "--run", help="run directory, e.g. runs/criteo_dnn"),
    shards: Path = typer.Option(..., "--shards", help="test shard cache"),
    out: Optional[Path] = typer.Option(None, "--out", help="submission path (default RUN/submission.csv)"),  # noqa: UP045
    overrides: list[str] = InferSetOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Ensemble a run's fold checkpoints over test shards into a submission."""
    run_infer = _lazy("ctrpipe.infer.predict", "run_infer")

    _run(lambda: run_infer(run=run, shards=shards, out=out, overrides=overrides, quiet=quiet))


@app.command()
def export(
    run: Path = typer.Option(..., "--run", help="run directory, e.g. runs/criteo_dnn"),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript (model.pt) | onnx (model.onnx; needs "
                                                            "pip install 'ctrpipe\\[onnx]')"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN/export)"),  # noqa: UP045
    cache: Optional[Path] = typer.Option(None, "--cache", help="the run's training cache, if it moved"),  # noqa: UP045
    overrides: list[str] = typer.Option([], "--set", help="inference override, repeatable: --set "
                                                          "infer.method=logit_mean"),
) -> None:
    """Export a run (folds combined, calibration applied) as one TorchScript or ONNX model + model.json."""
    import json

    export_model = _lazy("ctrpipe.serve.export", "export_model")

    def go() -> None:
        path = export_model(run, out if out is not None else run / "export", fmt, cache=cache, overrides=overrides)
        console.print(f"wrote {path} and {path.with_name('model.json')}", highlight=False)
        note = json.loads(path.with_name("model.json").read_text())["precision"]["note"]
        if note:
            console.print(f"[yellow]note[/]: {note}", highlight=False)

    _run(go)


@app.command()
def predict(
    run: Path = typer.Option(..., "--run", help="run directory, e.g. runs/criteo_dnn"),
    input_: Path = typer.Option(..., "--input", help="raw rows (Criteo text, CSV or Parquet) as trained on"),
    out: Path = typer.Option(..., "--out", help="CSV of id (or row) + one probability column per head"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="the run's training cache, if it moved"),  # noqa: UP045
    overrides: list[str] = typer.Option([], "--set", help="inference override, repeatable: --set "
                                                          "infer.method=logit_mean"),
    quiet: bool = QuietOpt,
) -> None:
    """Score a file of raw rows with a run (no shard cache needed): calibrated, fold-combined probabilities."""
    predict_file = _lazy("ctrpipe.serve.predict_file", "predict_file")

    def go() -> None:
        n = predict_file(run, input_, out, cache=cache, overrides=overrides)
        # --quiet: the one summary line every data command ends with (it printed nothing at all)
        rows = f"{n:,} row{'' if n == 1 else 's'}"
        console.print(f"wrote {rows} to {out}" + ("" if quiet else f" (record: {out.name}.json)"), highlight=False)

    _run(go)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="run directories, e.g. runs/criteo_dnn runs/criteo_dcnv2"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder: index.html + figures/"),
    baseline: Optional[str] = typer.Option(None, "--baseline",  # noqa: UP045
                                           help="run (name or path) the leaderboard's deltas refer to; default "
                                                "the first"),
    strict: bool = typer.Option(False, "--strict", help="refuse runs from another cache, or with other "
                                                        "heads, masks or metric weights, instead of listing "
                                                        "them unranked"),
    quiet: bool = QuietOpt,
) -> None:
    """Static HTML report of runs: curves, reliability diagrams, gate usage and a leaderboard."""
    run_report = _lazy("ctrpipe.report.build", "run_report")

    _run(lambda: run_report(runs=runs, out=out, baseline=baseline, strict=strict, quiet=quiet))


@app.command()
def plan(
    shards: Path = typer.Option(..., "--shards", help="shard cache folder the run would train on"),
    cfg: Optional[Path] = CfgOpt,  # noqa: UP045
    overrides: list[str] = TrainSetOpt,
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the config's train.device)"),  # noqa: UP045
    memory: Optional[str] = typer.Option(None, "--memory", help="compare with this much memory, e.g. 16GB "  # noqa: UP045
                                         "(default: free GPU memory, or available host RAM)"),
    kfold: int = typer.Option(0, "--kfold", help="plan one model per stored fold, as train --kfold K"),
) -> None:
    """Estimate a training run's memory before allocating it; exits 1 when it would not fit, 3 when a GPU plan
    has no GPU memory to compare with (no GPU here: pass --memory)."""
    run_plan = _lazy("ctrpipe.tools.planner", "run_plan")

    result = _run(lambda: run_plan(cfg_path=cfg, overrides=overrides, shards=shards, device=device, memory=memory,
                                   kfold=kfold))
    if result.available is None and result.device == "cuda":     # a script reading 0 as "fits" would go on to
        raise typer.Exit(3)                                        # train (2 is click's usage error)
    if not result.fits:
        raise typer.Exit(1)


@app.command()
def doctor() -> None:
    """Check the environment: versions, devices, compiled kernels, a smoke test per device; exit 1 on a failure."""
    run_doctor = _lazy("ctrpipe.tools.doctor", "run_doctor")

    checks = _run(run_doctor)
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


@blend_app.command("submissions")
def blend_submissions(
    files: list[Path] = typer.Argument(..., help="submission CSVs"),
    method: str = typer.Option("logit_mean", "--method", help="logit_mean | mean | geom_mean | median | "
                               "trim_mean | rank_avg (rank scores) | weighted (needs --weights)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="comma-separated, one per file"),  # noqa: UP045
    out: Path = typer.Option(Path("blended.csv"), "--out"),
    trim_ratio: float = typer.Option(0.1, "--trim-ratio", help="trim_mean: share of files cut from each end, "
                                                                "per row (at least 1/N of N files)"),
    quiet: bool = QuietOpt,
) -> None:
    """Blend submission files row-aligned by ID."""
    run_blend = _lazy("ctrpipe.infer.blend", "run_blend")

    _run(lambda: run_blend(files=files, method=method, weights=weights, out=out, quiet=quiet,
                           trim_ratio=trim_ratio))


if __name__ == "__main__":
    app()
