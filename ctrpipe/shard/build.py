"""Stage 2: `ctrpipe shard` -- raw inputs -> (pass 1) train-split statistics -> (pass 2) transformed
fixed-size shards -> manifest.json, built in DIR/.incomplete-<fingerprint>/ and moved into DIR, manifest last.

A crash leaves only the incomplete folder (never something that looks finished); running the same command
again resumes it: the fitted statistics are reused and finished shards are not rewritten (their rows are
re-parsed, so the resumed output is byte-identical to an uninterrupted build).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.markup import escape

from ctrpipe.atomic import folder_lock
from ctrpipe.config import RunConfig, flatten_dotted, load_config, to_dict
from ctrpipe.console import console, human_rate
from ctrpipe.data.config import DataConfig
from ctrpipe.data.fitted import FITTED_DIR, Fitted
from ctrpipe.data.sources import expand_inputs
from ctrpipe.errors import ConfigError, ManifestMismatchError, SchemaError, disk_full_as_error, human_bytes
from ctrpipe.hostmem import keep_freed_memory
from ctrpipe.shard.inspect import print_cache_problems
from ctrpipe.shard.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    fingerprint,
    read_manifest,
    source_info,
    write_manifest,
)
from ctrpipe.shard.passes import RESUME_NOTE, Inputs, check_plan, fit_pass, resolve_plan, write_pass
from ctrpipe.shard.transform import Plan
from ctrpipe.shard.writer import shard_dirname

Role = Literal["train", "test"]
_OURS = re.compile(r"^(shard_\d{5}(\.incomplete)?|fitted|manifest\.json\.incomplete|\.incomplete-[0-9a-f]+)$")
_FINISHED_PART = re.compile(r"^(shard_\d{5}|fitted)$")      # what a finished cache holds beside its manifest
_PROGRESS = "progress.json"


@dataclass(frozen=True)
class BuildResult:
    """What a build produced (or found up to date)."""

    out: Path
    manifest: Manifest
    reused: bool
    seconds: float
    input_bytes: int

    @property
    def rows_per_s(self) -> float:
        return self.manifest.total_rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def identity_config(data: DataConfig) -> dict[str, Any]:
    """The part of the data config that decides the output (chunk_rows only bounds memory)."""
    d = to_dict(data)
    d.pop("chunk_rows", None)
    return d


def build_shards(cfg: RunConfig | DataConfig, inputs: Sequence[Path], out: Path, *, gold: Sequence[Path] = (),
                 stats_from: Path | None = None, role: Role = "train", force: bool = False,
                 progress: bool = True, workers: int = 1, dask: str | None = None) -> BuildResult:
    """Build (or reuse, or resume) the shard cache `out` from raw `inputs`; see the module docstring.

    `workers` > 1 runs the statistics and the write pass over the input files on that many processes, `dask` on
    a Dask cluster ("local" or a scheduler address; `shard/parallel.py`); the cache is byte-identical."""
    # `held`: the --out folder's lock, from before the cache is looked at until the build has finished
    with ExitStack() as held:
        return _build_shards(cfg, inputs, out, gold, stats_from, role, force, progress, workers, dask, held)


def _build_shards(cfg: RunConfig | DataConfig, inputs: Sequence[Path], out: Path, gold: Sequence[Path],
                  stats_from: Path | None, role: Role, force: bool, progress: bool, workers: int, dask: str | None,
                  held: ExitStack) -> BuildResult:
    t0 = time.perf_counter()
    keep_freed_memory()     # each chunk's ~30 MB of arrays is reused, not page-faulted in again (see hostmem.py)
    data = cfg.data if isinstance(cfg, RunConfig) else cfg
    cfg_sources = {k: v for k, v in (cfg.sources if isinstance(cfg, RunConfig) else {}).items()
                   if k.startswith("data.")}
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}", where="--workers",
                          fix="pass --workers 1 (one process) or the number of cores to use")
    if role not in ("train", "test"):
        raise ConfigError(f"unknown role {role!r}", fix="use role='train' or role='test' (--test)")
    if stats_from is not None and role != "test":      # a train cache fits its own statistics and saves them
        raise ConfigError("--stats-from reuses a train cache's statistics for test data, and this build is not "
                          "--test (its cache would have no fitted/ for a test cache to use)", where="--stats-from",
                          fix="add --test to shard test data, or drop --stats-from to build a train cache")
    if role == "test" and gold:
        raise ConfigError("--gold inputs cannot be combined with --test",
                          fix="shard gold data into a train cache")
    main_paths = expand_inputs(list(inputs), data.format)
    gold_paths = expand_inputs(list(gold), data.format) if gold else []
    both = sorted({p.resolve() for p in main_paths} & {p.resolve() for p in gold_paths})
    if both:        # gold rows must be unseen in training, or the gold metrics flatter the model
        raise ConfigError("the same file is given as --input and as --gold", where=str(both[0]),
                          fix="pass held-out rows as --gold (a file not among the training inputs)")
    if data.format == "parquet" and data.id_column:
        from ctrpipe.data.parquet import check_id_types

        check_id_types(main_paths + gold_paths, data.id_column)
    if stats_from is not None and (Path(out).resolve() == Path(stats_from).resolve()
                                   or Path(stats_from).resolve() in Path(out).resolve().parents):
        # with --force the test cache replaced the train cache whose statistics (fitted/) it reads
        raise ConfigError("--out is the --stats-from train cache (or inside it)", where=f"--out {out}",
                          fix="give the test cache a folder of its own, e.g. --out shards/test")
    train_m = read_manifest(Path(stats_from)) if stats_from is not None else None
    if train_m is not None and stats_from is not None:
        _check_stats_from(train_m, data, Path(stats_from))
    srcs = tuple(source_info(p) for p in main_paths + gold_paths)
    extra = {"role": role, "gold_inputs": len(gold_paths),
             "stats_from": train_m.fingerprint if train_m else ""}
    if _keyed_assignment(data):      # an older build put some rows elsewhere: it is not this cache
        extra["assignment_rules"] = ASSIGNMENT_RULES
    fp = fingerprint(identity_config(data), srcs, extra)
    out = Path(out)
    input_bytes = sum(s.size for s in srcs)
    plan = resolve_plan(data, main_paths, role, gold_paths, separator_fixed=stats_from is not None)
    check_plan(plan, role)
    if train_m is not None and stats_from is not None:
        _check_layout(plan, train_m, Path(stats_from), main_paths[0])
        # the train cache's values fix how this file's must be stored (text "07", not the integer 7)
        columns = dataclasses.replace(plan.columns, value_types=train_m.value_types(),
                                      value_types_from=f"the --stats-from train cache {stats_from}")
        plan = dataclasses.replace(plan, separators_fixed=True, columns=columns)
    inputs_obj = Inputs(main=main_paths, gold=gold_paths, role=role, input_bytes=input_bytes)

    if force:
        _check_out_folder(out)          # a refused rebuild leaves the cache as it was
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(folder_lock(out, lambda: ConfigError(
        f"another `ctrpipe shard` is building into {out} right now", where=str(out),
        fix="wait for it to finish (the same command then finds the cache up to date), or pass another --out")))
    existing = _existing_manifest(out, force)
    if existing is not None:
        if existing.fingerprint == fp:
            _check_shards_on_disk(out)
            console.print(f"[green]cache up to date[/]: {out} ({existing.total_rows:,} rows, "
                          f"{len(existing.shards)} shards)", highlight=False)
            for line in _unfinished_rebuilds(out):
                console.print(f"[yellow]note[/]: {line}", highlight=False)
            return BuildResult(out, existing, True, time.perf_counter() - t0, input_bytes)
        raise ManifestMismatchError(
            "the cache was built from other inputs or settings: "
            + _describe_diff(existing, data, srcs, extra),
            where=str(out / MANIFEST_NAME),
            fix=f"pass --force to rebuild it (fingerprint {existing.fingerprint[:12]} -> {fp[:12]}), "
                "or choose another --out folder")
    work = out / f".incomplete-{fp[:12]}"
    # the write pass explains a full disk with a size estimate; this covers statistics, progress and manifest
    with disk_full_as_error(out, lambda: _written_note(work), _resume_note(out)):
        _clear_out(out, keep=f".incomplete-{fp[:12]}")
        state = _BuildState.open(work, fp)
        files = len(main_paths) + len(gold_paths)
        # one pool (or Dask client) for both passes: worker processes start once
        with _workers_pool(workers, dask, files) as pool:
            fitted, fitted_meta, loo = _fitted_stats(plan, inputs_obj, train_m, stats_from, state, progress,
                                                     workers, dask, pool)
            if pool is not None:
                from ctrpipe.shard.parallel import parallel_write_pass

                # where workers load the statistics from: the train cache, this build's fitted/, or none needed
                source = (Path(stats_from), train_m.fitted) if train_m is not None and stats_from is not None \
                    else (work, None) if plan.needs_fit() else None
                result = parallel_write_pass(plan, inputs_obj, source, loo, work, state.finished,
                                             state.mark_shard, workers, progress, dask, pool)
            else:
                result = write_pass(plan, inputs_obj, fitted, loo, work, state.finished, state.mark_shard,
                                    progress)

        seconds = time.perf_counter() - t0
        build = {"seconds": round(seconds, 3), "rows_per_s": round(result.rows / seconds, 1),
                 "mb_per_s": round(result.parsed_bytes / 1e6 / seconds, 3), "input_bytes": float(input_bytes),
                 "parsed_bytes": float(result.parsed_bytes), "output_bytes": float(result.output_bytes),
                 "passes": float(1 + int(loo)), "chunk_rows": float(data.chunk_rows)}
        manifest = Manifest(
            fingerprint=fp, config=to_dict(data), config_sources=cfg_sources, role=role, sources=srcs,
            columns=tuple(plan.column_specs(fitted, result.id_dtype, result.column_stats, result.has_labels)),
            shards=tuple(result.shards), rows=result.rows_dict, folds=result.folds,
            label_rates=result.label_rates, label_pair_rates=result.label_pair_rates,
            bad_rows=result.bad_rows, fitted=fitted_meta, stats_from=train_m.fingerprint if train_m else "",
            build=build, gold_sources=len(gold_paths))
        _finish(work, out, result.shards, manifest)
    return BuildResult(out, manifest, False, seconds, input_bytes)


# ------------------------------------------------------------------------------------- fitted statistics

def _workers_pool(workers: int, dask: str | None, files: int) -> AbstractContextManager[Executor | None]:
    """The executor both passes map over files with, or None for the single-process build (one worker, or
    a single input file)."""
    asked = workers > 1 or dask is not None
    if asked and files <= 1:                # nothing to spread: say so, not silently
        flag = f"--dask {dask}" if dask is not None else f"--workers {workers}"
        console.print(f"[yellow]note[/]: {escape(flag)} spreads the build's input files (one per task); with one "
                      "file it runs in this process (its threads use the cores)", highlight=False)
    if not (asked and files > 1):
        return nullcontext(None)
    from ctrpipe.shard.parallel import executor

    return executor(min(workers, files), dask)


def _fitted_stats(plan: Any, inputs: Inputs, train_m: Manifest | None, stats_from: Path | None,
                  state: _BuildState, progress: bool, workers: int = 1, dask: str | None = None,
                  pool: Executor | None = None) -> tuple[Fitted, dict[str, Any], bool]:
    """(statistics, their manifest entry, whether this build's own train rows were counted)."""
    if train_m is not None and stats_from is not None:
        fitted = Fitted.load(Path(stats_from), train_m.fitted)
        return fitted, dict(train_m.fitted, cache=str(Path(stats_from).resolve())), False
    if not plan.needs_fit():
        fitted = Fitted()
        return fitted, fitted.to_manifest(), False
    if inputs.role == "test":
        raise ConfigError(f"this config needs train-split statistics ({', '.join(plan.fitted_keys())}), and test "
                          "data must not provide them", where="--test",
                          fix="pass --stats-from DIR with the train cache built from the same config")
    if state.fitted_done:
        fitted = Fitted.load(state.work)
    else:
        if pool is not None and len(inputs.main) > 1:
            from ctrpipe.shard.parallel import parallel_fit_pass

            fitted = parallel_fit_pass(plan, inputs, state.work, workers, progress, dask, pool)
        else:
            fitted = fit_pass(plan, inputs, progress)
        fitted.save(state.work)
        state.mark_fitted()
    return fitted, fitted.to_manifest(), True


def _check_stats_from(train_m: Manifest, data: DataConfig, path: Path) -> None:
    """A test cache must hash, impute and lay out columns exactly like its train cache."""
    if train_m.role != "train":
        raise ConfigError(f"--stats-from must be a train cache, {path} was built with --test",
                          where=str(path / MANIFEST_NAME), fix="pass the train cache's folder")
    mine = identity_config(data)
    # csv: the test file must be read alike (separator, missing tokens) for its values to mean the same
    keys = ("format", "csv", "hash_bins", "hash_seed", "numeric", "categorical", "multihot", "sequence",
            "covisit")
    diffs = [k for k in keys if mine.get(k) != train_m.config.get(k)]
    if diffs:
        detail = "; ".join(f"data.{k}: {train_m.config.get(k)!r} (train) vs {mine.get(k)!r} (now)"
                           for k in diffs)
        raise ManifestMismatchError(f"the train cache used different hashing/columns: {detail}",
                                    where=str(path / MANIFEST_NAME),
                                    fix="shard the test data with the same --cfg as the train cache")


def _check_layout(plan: Plan, train_m: Manifest, path: Path, first: Path) -> None:
    """The test cache's feature columns must be the train cache's, in its order: a pattern resolved against a
    test file lacking a column gave fewer columns, every later one shifted to another index, silently."""
    kinds = {"numeric": [n for n, *_ in plan.numeric_layout()], "categorical": list(plan.categorical),
             "token": sorted(tc.column for tc in plan.tokens)}
    stored = {"numeric": [c.name for c in train_m.columns_of("numeric", "missing_indicator", "covisit")],
              "categorical": [c.name for c in train_m.columns_of("categorical")],
              "token": sorted(c.name for c in train_m.columns_of("multihot", "sequence"))}
    for kind, want in stored.items():
        got = kinds[kind]
        if got == want:
            continue
        lacking, extra = [c for c in want if c not in got], [c for c in got if c not in want]
        what = (f"lacks the {kind} columns {lacking}" if lacking else f"has {kind} columns the train cache "
                f"lacks: {extra}" if extra else f"orders the {kind} columns otherwise than the train cache")
        raise SchemaError(f"this file {what} (the train cache {path} has {len(want)}; a test cache's features "
                          "must be the train cache's, in its order)", where=str(first),
                          fix="give the test file the train file's columns (a column it cannot have may be "
                              "written empty: its values count as missing)")


# ---------------------------------------------------------------------------------- folders and resume

class _BuildState:
    """progress.json in the incomplete folder: which shards are finished and whether statistics are saved."""

    def __init__(self, work: Path, fp: str, finished: set[int], fitted_done: bool) -> None:
        self.work, self.fp, self.finished, self.fitted_done = work, fp, finished, fitted_done

    @classmethod
    def open(cls, work: Path, fp: str) -> _BuildState:
        path = work / _PROGRESS
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError:
                raw = {}
            if raw.get("fingerprint") == fp:
                finished = {i for i in raw.get("finished", []) if (work / shard_dirname(i)).is_dir()}
                fitted_done = bool(raw.get("fitted")) and (work / FITTED_DIR / "fitted.json").is_file()
                if finished or fitted_done:
                    console.print(f"resuming an interrupted build: {len(finished)} shards already written",
                                  highlight=False)
                return cls(work, fp, finished, fitted_done)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        state = cls(work, fp, set(), False)
        state._save()
        return state

    def mark_shard(self, info: ShardInfo) -> None:
        self.finished.add(info.index)
        self._save()

    def mark_fitted(self) -> None:
        self.fitted_done = True
        self._save()

    def _save(self) -> None:
        tmp = self.work / (_PROGRESS + ".incomplete")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "fitted": self.fitted_done,
                                   "finished": sorted(self.finished)}))
        tmp.replace(self.work / _PROGRESS)


def _existing_manifest(out: Path, force: bool) -> Manifest | None:
    """The finished cache at `out` to reuse or refuse, or None. With `force` it is left as it is: the
    rebuild writes beside it and `_finish` swaps it out only once the new cache is whole, so a rebuild that
    fails (bad input, full disk, Ctrl-C) loses nothing."""
    path = out / MANIFEST_NAME
    if force or not path.exists():
        return None
    return read_manifest(out)


def _check_shards_on_disk(out: Path) -> None:
    """A cache reused as up to date must hold every array its manifest lists, whole (headers and sizes: no data
    is read); a deleted or cut shard is refused with the rebuild command instead of failing later in training."""
    from ctrpipe.shard.reader import open_cache

    try:
        open_cache(out)                      # reads the manifest and checks every header and size
    except ManifestMismatchError as exc:
        raise ManifestMismatchError(exc.what, where=exc.where,
                                    fix="rebuild it: run the same command with --force") from None


def _check_out_folder(out: Path) -> None:
    """--out must be a folder holding nothing but a shard cache: checked before `--force` deletes anything."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", fix="pass a folder, e.g. --out shards/criteo")
    if not out.exists():
        return
    foreign = [p.name for p in out.iterdir() if not _OURS.match(p.name) and not p.name.startswith(".")
               and p.name != MANIFEST_NAME]
    if foreign:
        raise ConfigError(f"--out {out} holds files that are not part of a shard cache: "
                          f"{sorted(foreign)[:5]}",
                          where=str(out), fix="choose an empty or new folder for --out")


def _clear_out(out: Path, keep: str) -> None:
    """Remove leftovers of earlier builds (ours only). A finished cache (a manifest: what `--force` replaces)
    keeps its shards and statistics until `_finish`; only unfinished work goes."""
    _check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    finished = (out / MANIFEST_NAME).exists()
    for p in out.iterdir():
        if _OURS.match(p.name) and p.name != keep and not (finished and _FINISHED_PART.match(p.name)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _finish(work: Path, out: Path, shards: list[ShardInfo], manifest: Manifest) -> None:
    """Move shards and statistics from the incomplete folder into `out`, then write the manifest last. A cache
    being replaced (`--force`) loses its manifest first, so an interruption here leaves no manifest beside
    a mix of old and new shards; then its shards the new cache lacks and its statistics go."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    new = {shard_dirname(info.index) for info in shards}
    for p in out.iterdir():
        if _FINISHED_PART.match(p.name) and p.name not in new:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for info in shards:
        src, dst = work / shard_dirname(info.index), out / shard_dirname(info.index)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
    if (work / FITTED_DIR).is_dir():
        os.replace(work / FITTED_DIR, out / FITTED_DIR)
    write_manifest(out, manifest)
    shutil.rmtree(work)


def _resume_note(out: Path) -> str:
    """What rerunning a build that filled the disk does; a --force rebuild also names the old cache it keeps
    until the new one is complete (both must fit)."""
    if not (out / MANIFEST_NAME).is_file():
        return RESUME_NOTE
    old = sum(f.stat().st_size for p in out.iterdir() if _FINISHED_PART.match(p.name)
              for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    return (f"{RESUME_NOTE}; the cache this --force build replaces ({human_bytes(old)}) stays until the new one "
            f"is complete, so both must fit: where they do not, delete {out} first")


def _unfinished_rebuilds(out: Path) -> list[str]:
    """What a reused cache has beside it from a `--force` rebuild of other settings that did not finish: kept
    (rerunning that command resumes it) but named, since it can be as large as the cache."""
    notes = []
    for work in sorted(out.glob(".incomplete-*")):
        size = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        notes.append(f"{work} ({human_bytes(size)}) is an unfinished build with other inputs or settings: "
                     "rerun that build with --force to finish it, or delete the folder to free the space")
    return notes


def _written_note(work: Path) -> str:
    """A lower bound of the space a build needs: what it had written before the disk filled."""
    written = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) if work.is_dir() else 0
    return f"the build needs more than the {human_bytes(written)} it wrote so far" if written else ""


# how group and time keys assign rows to the split and folds; raised when a change moves rows: 2 = keyless rows
# by row index, whole-number keys alike, time keys in one unit and text numbers as numbers; 3 = decimal group
# keys as their numbers, date group keys as their midnights
ASSIGNMENT_RULES = 3


def _keyed_assignment(data: DataConfig) -> bool:
    """Whether rows go to the split or folds by a group or time key (what ASSIGNMENT_RULES versions)."""
    return (data.split.mode == "group" and data.split.val_ratio > 0) or (
        data.folds.n_splits > 0 and data.folds.mode in ("group", "time"))


def _describe_diff(old: Manifest, data: DataConfig, srcs: tuple[Any, ...], extra: dict[str, Any]) -> str:
    """Name what changed between the cache on disk and this request: config keys or source files."""
    new_cfg = flatten_dotted(identity_config(data), "data.")
    old_cfg = flatten_dotted({k: v for k, v in old.config.items() if k != "chunk_rows"}, "data.")
    parts = [f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in sorted(set(new_cfg) | set(old_cfg))
             if new_cfg.get(k) != old_cfg.get(k)]
    old_src = {s.path: s for s in old.sources}
    new_src = {s.path: s for s in srcs}
    for p in sorted(set(old_src) | set(new_src)):
        a, b = old_src.get(p), new_src.get(p)
        if a is None:
            parts.append(f"new input {p}")
        elif b is None:
            parts.append(f"input {p} no longer used")
        elif a != b:
            parts.append(f"input {p} changed (size {a.size} -> {b.size}, mtime)")
    if old.role != extra["role"]:
        parts.append(f"role {old.role} -> {extra['role']}")
    if old.stats_from != extra["stats_from"]:
        parts.append("--stats-from cache differs")
    return "; ".join(parts[:8]) or ("the gold inputs or the rules that assign rows to the split and folds "
                                     "by group or time keys (changed in this ctrpipe) differ")


# -------------------------------------------------------------------------------------------------- CLI

def run_shard(cfg_path: Path | None, overrides: list[str], inputs: list[Path], out: Path, gold: list[Path],
              stats_from: Path | None, test: bool, bad_rows: str | None, force: bool, quiet: bool,
              workers: int = 1, dask: str | None = None) -> None:
    """`ctrpipe shard`: load the config, build, print a summary table (or one line with --quiet)."""
    cfg = load_config(cfg_path, overrides, resolve_model=False)  # sharding needs no torch
    if bad_rows is not None:
        if bad_rows not in ("error", "skip"):
            raise ConfigError(f"bad value {bad_rows!r} for --bad-rows", where="--bad-rows",
                              fix="use --bad-rows error (stop at the first bad row) or --bad-rows skip")
        data = dataclasses.replace(cfg.data, bad_rows="skip" if bad_rows == "skip" else "error")
        cfg = dataclasses.replace(cfg, data=data)
    res = build_shards(cfg, inputs, out, gold=gold, stats_from=stats_from, role="test" if test else "train",
                       force=force, progress=not quiet, workers=workers, dask=dask)
    if res.reused:
        return
    print_summary(res, quiet)


def print_summary(res: BuildResult, quiet: bool) -> None:
    from rich.table import Table

    m = res.manifest
    skipped = int(m.bad_rows.get("skipped", 0))
    rate = f"{human_rate(res.rows_per_s, 'rows/s')}, {res.mb_per_s:.1f} MB/s"
    if quiet:
        console.print(f"sharded {m.total_rows:,} rows into {len(m.shards)} shards at {res.out} in "
                      f"{res.seconds:.1f}s ({rate}); {skipped} bad rows skipped", highlight=False)
        print_cache_problems(m)
        return
    table = Table(title=f"shard cache {res.out}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("rows", f"{m.total_rows:,}")
    table.add_row("shards", f"{len(m.shards)} (up to {m.config.get('shard_rows'):,} rows each)")
    table.add_row("splits", ", ".join(f"{k} {v:,}" for k, v in m.rows.items() if k != "total" and v))
    if m.folds.get("n_splits"):
        table.add_row("folds", f"{m.folds['n_splits']} {m.folds['mode']}: {m.folds['sizes']}")
    for lab, rates in m.label_rates.items():
        table.add_row(f"rate {lab}", ", ".join(f"{k} {v:.4f}" for k, v in rates.items()))
    table.add_row("columns", ", ".join(f"{k} {len(m.columns_of(k))}" for k in
                                       ("numeric", "missing_indicator", "covisit", "categorical", "multihot",
                                        "sequence") if m.columns_of(k)))
    table.add_row("bad rows skipped", f"{skipped:,}" + (f" {m.bad_rows['by_reason']}" if skipped else ""))
    table.add_row("seconds", f"{res.seconds:.1f}")
    table.add_row("throughput", rate)
    console.print(table)
    print_cache_problems(m)
