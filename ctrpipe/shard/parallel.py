"""Stage 2: both passes as a map/reduce over input files on a local process pool (`ctrpipe shard --workers N`)
or on Dask distributed workers (`--dask ADDRESS`; they must see the inputs and the shard directory at the same
paths, a shared filesystem, since partial results are files there). Byte-identical to the single-process
build (`passes.py`, the reference) for any N.

Fit pass. map: every main input file is one partition. A worker process reads it chunk by chunk -- the very
chunks the single-process pass reads, since chunks never span files -- and saves its partial statistics to
WORK/partials/ (written to a temporary name, then renamed): integer counts, per-column histogram minima, the
sorted (key, count) tables of vocabularies and co-visitation, and the float sums of every chunk separately.
reduce: the parent merges the partitions in input order. Counts, minima and key tables merge exactly; the float
sums are added chunk by chunk in input order, the same additions in the same order as one process makes.
Row positions: the split of a row may depend on its index among all good rows (random and tail splits). Each
partition starts at the physical row count of the files before it (a cheap count, run on the pool); when a
file had skipped bad rows, the partitions after it are fitted again at their true start.

Write pass. Every main then gold file is one partition; a worker runs the single-process pass's own chunk loop
(`passes.StreamWriter`) over it, from the file's global start row (splits, plain folds, shard boundaries), its
physical start position (positional ids count skipped bad rows) and, for stratified folds, the rows per class
of the files before it (a row's fold follows its rank within its class). Those three come from each file's
counts (`FileCounts`): recorded by the fit pass (WORK/partitions.json), else guessed from a cheap row count, or
scanned on the pool where stratified folds need class counts. Every worker reports its file's true counts;
partitions whose start was guessed wrong are written again (a file's counts do not depend on its start, so
one redo at most). A worker writes into its own folder WORK/partitions/p<file>_<start>_<position>_<classes>/
(a temporary name, renamed when complete): the shards wholly inside its rows as shard_XXXXX/, the part of a
shard it shares with neighbouring files as frag_XXXXX/ (the shard writer with `first_row`/`fragments`), its
tallies with every chunk's float sums apart (`passes.WriteTallies`) and result.json. The parent then renames
the whole shards into WORK, joins each spanning shard from its fragments by streaming them (memory-mapped)
through the same shard writer (so a unicode group's width is again its shard's longest value) and merges the
tallies in input order (float sums chunk by chunk), so shards and manifest are those of one process. This
keeps shards fixed-size across file boundaries, as the single-process cache lays them out, at the cost of
rewriting at most the one or two shards per file boundary; each worker needs one file's chunks in flight plus
the fitted tables, the parent one spanning shard's unicode groups at most.

Resume: a fit partial or a write partition whose folder is complete is not redone after a crash (their names
hold their starts, the incomplete folder's name the inputs' and config's fingerprint); shards already moved
into WORK and recorded in progress.json stay untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ctrpipe.atomic import atomic_open
from ctrpipe.console import console
from ctrpipe.data.config import DataConfig
from ctrpipe.data.covisit import CovisitCounter
from ctrpipe.data.fitted import Fitted, KeyCounter, MomentAccumulator, NumericAccumulator
from ctrpipe.data.splits import FoldAssigner
from ctrpipe.errors import ConfigError, InputFormatError, ManifestMismatchError
from ctrpipe.hostmem import keep_freed_memory, one_arena_for_children
from ctrpipe.shard.manifest import ArrayInfo, ShardInfo
from ctrpipe.shard.passes import (
    Inputs,
    StreamWriter,
    WriteResult,
    WriteTallies,
    _accumulate_numeric,
    _chunks,
    _count_covisit,
    _count_vocab,
    _Positions,
    _Splitter,
    count_rows,
    fit_columns,
    fitted_from,
    fold_assigner,
    resolve_plan,
    small_pages,
    train_frames,
)
from ctrpipe.shard.transform import ChunkTokens, Plan, labels_matrix
from ctrpipe.shard.writer import ShardWriter, fragment_dirname, shard_dirname

PARTIALS_DIR = "partials"


def split_uses_row_index(data: DataConfig, role: str) -> bool:
    """Whether a row's split depends on its position among all rows (so partitions need their start row):
    random and tail splits, and group splits, whose rows without a key are placed by their index."""
    return role == "train" and data.split.val_ratio > 0 and data.split.mode in ("random", "tail", "group")


def die_with_parent() -> None:
    """Pool workers end when the build's process dies, however it dies: a SIGTERM or SIGKILL sent to
    `ctrpipe shard` left them running (idle, holding memory) under init. Linux only (prctl); elsewhere a
    no-op."""
    import ctypes
    import signal
    import sys

    # Ctrl-C reaches the whole process group: the build's process handles it and ends the pool; a worker that
    # took it too printed a traceback, and one that died of it could leave the pool waiting on it. The worker
    # started with SIGINT blocked (_QuietSpawnProcess): ignoring it drops one that came while it started.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)            # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:      # the parent died before the prctl: nobody would signal us
        os._exit(1)


class _QuietSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that starts with SIGINT blocked (a signal mask survives fork and exec): Ctrl-C while
    it imports polars and ctrpipe, before `die_with_parent` ignores the signal, printed its traceback."""

    def start(self) -> None:
        if not hasattr(signal, "pthread_sigmask"):
            super().start()
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _QuietSpawnContext(multiprocessing.context.SpawnContext):
    Process = _QuietSpawnProcess


def _end_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a local pool now: queued tasks cancelled, running workers terminated (their output is partial
    files that a resumed build redoes)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=10)


@contextmanager
def executor(workers: int, dask: str | None) -> Iterator[Executor]:
    """A local process pool of `workers` processes, or with `dask` the executor of a Dask distributed client:
    "local" starts a `LocalCluster` of `workers` processes on this machine, anything else is the address of a
    running scheduler (tcp://host:8786)."""
    if dask is None:
        # spawn, not fork: the parent may hold threads whose locks a forked child would inherit
        pool = ProcessPoolExecutor(workers, mp_context=_QuietSpawnContext(), initializer=die_with_parent)
        try:
            with one_arena_for_children():      # workers start as tasks come: the whole pool's life
                yield pool
        except BrokenProcessPool:
            _end_pool(pool)
            raise InputFormatError("a worker process of the build died (killed by a signal, e.g. out of memory, or "
                                   "it failed to start)",
                                   where="--workers",
                                   fix="run the same command again: it resumes, keeping the finished shards "
                                       "(with fewer --workers if memory is short)") from None
        except BaseException:
            _end_pool(pool)               # Ctrl-C or an error: no waiting for the workers' running tasks
            raise
        pool.shutdown(wait=True)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ConfigError("--dask needs Dask distributed, which is not installed", where="--dask",
                          fix='pip install "ctrpipe[dask]" (or pip install "dask[distributed]"), or drop --dask '
                              "to use a local process pool") from e
    cluster = None
    # a local cluster's workers start with one malloc arena, restarted ones too: the setting holds for its life
    with one_arena_for_children() if dask == "local" else nullcontext():
        try:
            if dask == "local":
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
                client = Client(cluster)
            else:
                client = Client(dask)       # waits distributed.comm.timeouts.connect (Dask's config) at most
        except OSError as e:        # includes timeouts: no scheduler listens there
            if cluster is not None:
                cluster.close()
            raise ConfigError(f"cannot reach the Dask scheduler at {dask}: {e}", where="--dask",
                              fix="start one (dask scheduler; dask worker ADDRESS on each machine) and pass its "
                                  "address, e.g. --dask tcp://host:8786, or --dask local") from e
        except ValueError as e:     # Dask parses the address first: no port, a port that is no number
            raise ConfigError(f"--dask {dask!r} is not a scheduler address ({e})", where="--dask",
                              fix="pass the scheduler's address with its port, e.g. --dask tcp://host:8786, or "
                                  "--dask local for a cluster on this machine") from e
        try:
            with client.get_executor(pure=False) as pool:
                yield pool
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def parallel_fit_pass(plan: Plan, inputs: Inputs, work: Path, workers: int, progress: bool, dask: str | None,
                      pool: Executor) -> Fitted:
    """The statistics `fit_pass` computes, mapped over the main input files on `pool` (the build's `workers`
    processes or Dask cluster, shared with the write pass; Dask workers must see the inputs and `work` at the
    same paths, a shared filesystem)."""
    data = plan.cfg
    paths = inputs.main
    part_dir = work / PARTIALS_DIR
    part_dir.mkdir(exist_ok=True)
    if split_uses_row_index(data, inputs.role):
        counts = [f.result() for f in [pool.submit(count_rows, data, [p]) for p in paths]]
        if data.split.mode == "tail":
            inputs.row_count = sum(counts)
    else:
        counts = [0] * len(paths)
    starts = list(np.cumsum([0, *counts[:-1]]).tolist())
    if progress:
        where = f"the Dask cluster at {dask}" if dask not in (None, "local") else \
            f"{min(workers, len(paths))} worker processes"
        console.print(f"fit statistics (pass 1) over {len(paths)} files on {where}", highlight=False)
    parts: dict[int, Path] = {}
    file_counts: list[FileCounts] = []
    todo = list(range(len(paths)))
    kept = sum((part_dir / _part_name(i, int(starts[i]))).is_file() for i in todo)
    if kept:
        console.print(f"resuming: {kept} of {len(paths)} files already fitted", highlight=False)
    while todo:
        jobs = {i: pool.submit(fit_partition, data, paths[0], paths[i], inputs.role, int(starts[i]),
                               inputs.row_count or 0, part_dir / _part_name(i, int(starts[i])))
                for i in todo}
        for i in todo:
            parts[i] = jobs[i].result()
            if not parts[i].is_file():
                raise ConfigError(f"a worker wrote the statistics of {paths[i]} to {parts[i]}, which this "
                                  "process does not see", where=str(work),
                                  fix="put --out on a filesystem every worker mounts at the same path")
        # true starts from the good rows each file held (fewer than counted where bad rows were skipped)
        file_counts = [_file_counts(parts[i]) for i in range(len(paths))]
        true_starts = np.cumsum([0, *(c.rows for c in file_counts[:-1])]).tolist() \
            if split_uses_row_index(data, inputs.role) else starts
        todo = [i for i in range(len(paths)) if int(true_starts[i]) != int(starts[i])]
        starts = true_starts
    fitted = merge_partitions(plan, [parts[i] for i in range(len(paths))])
    save_counts(work, [*file_counts, *[None] * len(inputs.gold)])     # the write pass's partition starts, exact
    shutil.rmtree(part_dir, ignore_errors=True)
    return fitted


def _file_counts(part: Path) -> FileCounts:
    """A fit partial's rows, physical rows seen and rows per stratification class."""
    with np.load(part) as z:
        return FileCounts(int(z["rows"]), int(z["seen"]), {int(c): int(n) for c, n in z["classes"]})


def _part_name(index: int, start: int) -> str:
    return f"part_{index:05d}_{start}.npz"


def fit_partition(data: DataConfig, first: Path, path: Path, role: str, start: int, row_count: int | None,
                  out: Path) -> Path:
    """Worker: partial statistics of one input file's train rows, saved to `out` (kept when already there)."""
    if out.is_file():
        return out
    if not out.parent.is_dir():
        raise ConfigError(f"this worker does not see the shard directory {out.parent}", where=str(out.parent),
                          fix="put --out on a filesystem every worker mounts at the same path")
    if not path.is_file():
        raise ConfigError(f"this worker cannot read the input {path}", where=str(path),
                          fix="put the inputs on a filesystem every worker mounts at the same path")
    keep_freed_memory()     # as in the parent build: each chunk's arrays reuse the last one's pages
    plan = resolve_plan(data, [first], role)      # columns are resolved against the first input, as in one process
    num = data.numeric
    splitter = _Splitter(plan, Inputs(main=[path], gold=[], role=role, input_bytes=0, row_count=row_count))
    nacc = NumericAccumulator(plan.numeric, need_median=num.impute == "median")
    mom = MomentAccumulator(len(plan.numeric)) if num.standardize else None
    vocab = {c: KeyCounter() for c in plan.categorical} if data.categorical.mode == "vocab" else {}
    covisit = {cv.name: CovisitCounter() for cv in plan.covisit}
    f = len(plan.numeric)
    sums: list[np.ndarray] = []
    if mom is not None:
        mom.partials = []           # each chunk's moments: the merge adds them in input order
    train_rows = 0
    file_counts = _FileCounter(plan, role)
    with small_pages():
        for chunk, ft in train_frames(plan, [path], splitter, start):
            file_counts.add(chunk)
            train_rows += ft.height
            tokens = ChunkTokens(plan, ft, str(chunk.source))
            for cv in plan.covisit:
                _count_covisit(plan, ft, cv, covisit[cv.name], tokens)
            for c, k in vocab.items():
                _count_vocab(plan, ft, c, k, tokens)
            if plan.numeric:
                # each chunk's float sums alone (0 + s == s exactly): the merge adds them in input order
                nacc.sum_raw = np.zeros(f)
                _accumulate_numeric(plan, ft, nacc, mom)
                sums.append(nacc.sum_raw)
    counts = file_counts.result()
    arrays: dict[str, Any] = {
        "rows": np.int64(counts.rows), "seen": np.int64(counts.seen),
        "classes": np.array(sorted(counts.classes.items()), dtype=np.int64).reshape(-1, 2),
        "train_rows": np.int64(train_rows), "n": np.int64(nacc.n),
        "n_valid": nacc.n_valid, "sums": np.asarray(sums, dtype=np.float64).reshape(-1, f)}
    if nacc.need_median:
        arrays["hist"], arrays["bin_min"] = nacc.hist, nacc.bin_min
    if mom is not None:
        arrays["m_missing"], arrays["m_valid"] = mom.n_missing, mom.n_valid
        assert mom.partials is not None
        for j, name in enumerate(("m_n", "m_shift", "m_s1", "m_s2")):
            arrays[name] = np.asarray([part[j] for part in mom.partials]).reshape(-1, f)
    for j, k in enumerate(vocab.values()):
        arrays[f"vocab{j}_keys"], arrays[f"vocab{j}_counts"] = k.keys, k.counts
    for j, cc in enumerate(covisit.values()):
        arrays[f"pairs{j}_keys"], arrays[f"pairs{j}_counts"] = cc.pairs.keys, cc.pairs.counts
        arrays[f"ctx{j}_keys"], arrays[f"ctx{j}_counts"] = cc.ctx.keys, cc.ctx.counts
    tmp = out.with_name(out.name + f".incomplete-{os.getpid()}")    # a killed worker's never matches part_*.npz
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(out)
    return out


def merge_partitions(plan: Plan, parts: list[Path]) -> Fitted:
    """Reduce: the partial statistics of `parts` (in input order) into the fitted statistics."""
    data = plan.cfg
    num = data.numeric
    nacc = NumericAccumulator(plan.numeric, need_median=num.impute == "median")
    mom = MomentAccumulator(len(plan.numeric)) if num.standardize else None
    vocab = {c: KeyCounter() for c in plan.categorical} if data.categorical.mode == "vocab" else {}
    covisit = {cv.name: CovisitCounter() for cv in plan.covisit}
    train_rows = 0
    for path in parts:
        with np.load(path) as z:
            train_rows += int(z["train_rows"])
            nacc.n += int(z["n"])
            nacc.n_valid += z["n_valid"]
            for s in z["sums"]:
                nacc.sum_raw += s
            if nacc.need_median:
                nacc.hist += z["hist"]
                np.minimum(nacc.bin_min, z["bin_min"], out=nacc.bin_min)
            if mom is not None:
                mom.n_missing += z["m_missing"]
                mom.n_valid += z["m_valid"]
                for part in zip(z["m_n"], z["m_shift"], z["m_s1"], z["m_s2"], strict=True):
                    mom.add(*part)
            for j, k in enumerate(vocab.values()):
                k.merge(z[f"vocab{j}_keys"], z[f"vocab{j}_counts"])
            for j, cc in enumerate(covisit.values()):
                cc.pairs.merge(z[f"pairs{j}_keys"], z[f"pairs{j}_counts"])
                cc.ctx.merge(z[f"ctx{j}_keys"], z[f"ctx{j}_counts"])
    return fitted_from(plan, nacc, mom, vocab, covisit, train_rows)


# ------------------------------------------------------------------------------------------ write pass

WRITE_DIR = "partitions"
COUNTS_FILE = "partitions.json"
RESULT_FILE = "result.json"
TALLIES_FILE = "tallies.npz"


@dataclass(frozen=True)
class FileCounts:
    """What a partition's file holds that later partitions' rows depend on: good rows (row index: splits,
    plain folds, shard boundaries), physical positions incl. skipped bad rows (positional ids) and rows per
    stratified-fold class (the running class ranks of stratified folds)."""

    rows: int
    seen: int
    classes: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "seen": self.seen, "classes": {str(k): v for k, v in self.classes.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FileCounts:
        return cls(int(d["rows"]), int(d["seen"]), {int(k): int(v) for k, v in d["classes"].items()})


@dataclass(frozen=True)
class WriteTask:
    """One partition of the write pass: a file and where its rows start among all inputs' rows."""

    index: int
    path: Path
    gold: bool
    start: int                  # global index of its first good row
    position: int               # physical position of its first row (positional ids)
    classes: dict[int, int]     # stratified folds: rows per class in the files before it
    out: Path                   # its folder under WORK/partitions (written under a temporary name first)


def stratified(data: DataConfig, role: str) -> bool:
    return role == "train" and data.folds.n_splits > 0 and data.folds.mode == "stratified"


def chunk_classes(plan: Plan, frame: pl.DataFrame, into: dict[int, int]) -> None:
    """Add a chunk's rows per stratified-fold class to `into` (the classes `FoldAssigner` ranks rows in)."""
    y = labels_matrix(frame, plan.labels)[:, plan.fold_label]
    cls, n = np.unique(FoldAssigner.classes(y), return_counts=True)
    for c, k in zip(cls.tolist(), n.tolist(), strict=True):
        into[c] = into.get(c, 0) + k


def save_counts(work: Path, counts: list[FileCounts | None]) -> None:
    """Record the files' counts (exact ones only) in the incomplete folder, for the write pass and resumes."""
    with atomic_open(work / COUNTS_FILE) as fh:
        json.dump([c.to_json() if c is not None else None for c in counts], fh)


def _load_counts(work: Path, n: int) -> list[FileCounts | None]:
    try:
        raw = json.loads((work / COUNTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return [None] * n
    if not isinstance(raw, list) or len(raw) != n:
        return [None] * n
    return [FileCounts.from_json(d) if d is not None else None for d in raw]


def scan_file(data: DataConfig, first: Path, path: Path, role: str) -> FileCounts:
    """Worker: the counts of one file from a parse of the columns that decide which rows are good."""
    plan = resolve_plan(data, [first], role)
    counter = _FileCounter(plan, role)
    for chunk in _chunks(plan, [path], require_labels=role == "train", columns=fit_columns(plan)):
        counter.add(chunk)
    return counter.result()


class _FileCounter:
    """One file's `FileCounts`, chunk by chunk: good rows, physical rows seen (bad ones included) and, for
    stratified folds, good rows per class."""

    def __init__(self, plan: Plan, role: str) -> None:
        self.plan = plan
        self.stratified = stratified(plan.cfg, role)
        self.positions = _Positions(plan.cfg.format)
        self.rows = 0
        self.classes: dict[int, int] = {}

    def add(self, chunk: Any) -> None:
        self.rows += chunk.frame.height
        self.positions(chunk)
        if self.stratified:
            chunk_classes(self.plan, chunk.frame, self.classes)

    def result(self) -> FileCounts:
        return FileCounts(self.rows, self.positions.base + self.positions.seen, dict(self.classes))


def _task_name(index: int, start: int, position: int, classes: dict[int, int]) -> str:
    cls = hashlib.sha256(json.dumps(sorted(classes.items())).encode()).hexdigest()[:12] if classes else "0"
    return f"p{index:05d}_{start}_{position}_{cls}"


def _tasks(files: list[tuple[Path, bool]], counts: list[FileCounts], part_dir: Path) -> list[WriteTask]:
    tasks = []
    start = position = 0
    classes: dict[int, int] = {}
    for i, ((path, gold), c) in enumerate(zip(files, counts, strict=True)):
        before = dict(sorted(classes.items())) if not gold else {}
        tasks.append(WriteTask(i, path, gold, start, position, before,
                               part_dir / _task_name(i, start, position, before)))
        start += c.rows
        position += c.seen
        for k, v in c.classes.items():
            classes[k] = classes.get(k, 0) + v
    return tasks


_FITTED: dict[str, Fitted] = {}


def _load_fitted(source: tuple[Path, dict[str, Any] | None] | None) -> Fitted:
    """The fitted statistics a worker transforms with, loaded once per worker process."""
    if source is None:
        return Fitted()
    key = f"{source[0]}|{json.dumps(source[1], sort_keys=True)}"
    if key not in _FITTED:
        _FITTED.clear()
        _FITTED[key] = Fitted.load(*source)
    return _FITTED[key]


def write_partition(data: DataConfig, first: Path, role: str, row_count: int | None,
                    fitted_source: tuple[Path, dict[str, Any] | None] | None, loo: bool,
                    period_starts: pl.Series | None, task: WriteTask) -> Path:
    """Worker: transform one file's rows (numbered from the task's start row, position and class counts) and
    write them to `task.out`: shards wholly inside them as shard_XXXXX/, the parts of shards shared with the
    neighbouring files as frag_XXXXX/, their tallies (tallies.npz) and result.json. Built under a temporary
    name and renamed, so a folder under its final name is complete (and kept when already there)."""
    out = task.out
    if (out / RESULT_FILE).is_file():
        return out
    if not out.parent.is_dir():
        raise ConfigError(f"this worker does not see the shard directory {out.parent}", where=str(out.parent),
                          fix="put --out on a filesystem every worker mounts at the same path")
    if not task.path.is_file():
        raise ConfigError(f"this worker cannot read the input {task.path}", where=str(task.path),
                          fix="put the inputs on a filesystem every worker mounts at the same path")
    keep_freed_memory()
    plan = resolve_plan(data, [first], role)      # columns are resolved against the first input, as in one process
    inputs = Inputs(main=[] if task.gold else [task.path], gold=[task.path] if task.gold else [], role=role,
                    input_bytes=0, row_count=row_count)
    folds = FoldAssigner(data.folds) if role == "train" else FoldAssigner(type(data.folds)())
    folds.period_starts = period_starts
    folds.class_counts = dict(task.classes)
    tallies = WriteTallies(plan, folds.cfg.n_splits, per_chunk=True)
    tmp = out.with_name(out.name + f".incomplete-{os.getpid()}")    # a killed worker's is never taken as done
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = ShardWriter(tmp, data.shard_rows, first_row=task.start, fragments=True)
    stream = StreamWriter(plan, inputs, _load_fitted(fitted_source), loo, folds, tallies, writer,
                          row=task.start, position_base=task.position)
    with writer, small_pages():
        stream.run([(task.gold, [task.path])], None)
        writer.close()
    classes = {c: n - task.classes.get(c, 0) for c, n in folds.class_counts.items() if n != task.classes.get(c, 0)}
    counts = FileCounts(tallies.rows, stream.positions.base + stream.positions.seen - task.position, classes)
    with open(tmp / TALLIES_FILE, "wb") as fh:
        np.savez(fh, **tallies.save())
    result = {"counts": counts.to_json(), "has_labels": tallies.has_labels, "id_width": tallies.id_width,
              "parsed_bytes": tallies.parsed_bytes, "bad_rows": tallies.bad.to_dict(),
              "shards": [dataclasses.asdict(s) for s in writer.shards],
              "fragments": [dataclasses.asdict(s) for s in writer.fragments]}
    (tmp / RESULT_FILE).write_text(json.dumps(result))
    try:
        tmp.rename(out)
    except OSError:             # the same task finished elsewhere meanwhile (a retried Dask task)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / RESULT_FILE).is_file():
            raise
    return out


def parallel_write_pass(plan: Plan, inputs: Inputs, fitted_source: tuple[Path, dict[str, Any] | None] | None,
                        loo: bool, work: Path, done: set[int], on_shard: Callable[[ShardInfo], None],
                        workers: int, progress: bool, dask: str | None, pool: Executor) -> WriteResult:
    """The write pass (`write_pass`'s shards, tallies and result) mapped over the main then gold input files on
    `pool` (the build's `workers` processes or Dask cluster); `fitted_source` is where workers load the
    fitted statistics from ((folder, manifest entry) or None for none)."""
    t0 = time.perf_counter()
    data = plan.cfg
    role = inputs.role
    folds = fold_assigner(plan, inputs)             # time folds: the periods pre-pass, here in one process
    files = [(p, False) for p in inputs.main] + [(p, True) for p in inputs.gold]
    part_dir = work / WRITE_DIR
    part_dir.mkdir(exist_ok=True)
    known = _load_counts(work, len(files))
    n_proc = min(workers, len(files))
    if inputs.row_count is None and role == "train" and data.split.mode == "tail" and data.split.val_ratio > 0:
        inputs.row_count = sum(f.result() for f in [pool.submit(count_rows, data, [p]) for p in inputs.main])
    guess: dict[int, Future[Any]] = {}
    for i, (path, gold) in enumerate(files):
        if known[i] is None:
            guess[i] = pool.submit(scan_file, data, inputs.main[0], path, role) \
                if stratified(data, role) and not gold else pool.submit(count_rows, data, [path])
    counts = [known[i] if i not in guess else
              (r if isinstance(r := guess[i].result(), FileCounts) else FileCounts(r, r, {}))
              for i in range(len(files))]
    if progress:
        where = f"the Dask cluster at {dask}" if dask not in (None, "local") else f"{n_proc} worker processes"
        console.print(f"write shards over {len(files)} files on {where}", highlight=False)
    tasks = _tasks(files, counts, part_dir)
    kept = sum((t.out / RESULT_FILE).is_file() for t in tasks)
    if kept:
        console.print(f"resuming: {kept} of {len(files)} files already written", highlight=False)
    todo = list(range(len(files)))
    results: dict[int, dict[str, Any]] = {}
    while todo:
        jobs = {i: pool.submit(write_partition, data, inputs.main[0], role, inputs.row_count, fitted_source,
                               loo, folds.period_starts, tasks[i]) for i in todo}
        for i in todo:
            out = jobs[i].result()
            if not (out / RESULT_FILE).is_file():
                raise ConfigError(f"a worker wrote the shards of {files[i][0]} to {out}, which this process "
                                  "does not see", where=str(work),
                                  fix="put --out on a filesystem every worker mounts at the same path")
            results[i] = json.loads((out / RESULT_FILE).read_text())
        # the files' true counts (fewer rows than counted where bad rows were skipped): later files whose
        # start was guessed wrong are written again from their true start
        counts = [FileCounts.from_json(results[i]["counts"]) for i in range(len(files))]
        save_counts(work, list(counts))
        true = _tasks(files, counts, part_dir)
        todo = [i for i in range(len(files)) if true[i] != tasks[i]]
        for i in todo:
            shutil.rmtree(tasks[i].out, ignore_errors=True)
        tasks = true
    shards = _place_shards(plan, tasks, results, work, done, on_shard)
    tallies = WriteTallies(plan, folds.cfg.n_splits)
    for t in tasks:
        r = results[t.index]
        if r["has_labels"] is not None and tallies.has_labels is not None and r["has_labels"] != tallies.has_labels:
            raise InputFormatError("some inputs have label columns and others do not", where=str(t.path),
                                   fix="shard labelled and unlabelled files separately")
        with np.load(t.out / TALLIES_FILE) as z:
            tallies.merge(z, r["bad_rows"], r["has_labels"], int(r["id_width"]), int(r["counts"]["rows"]),
                          int(r["parsed_bytes"]))
    output_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for s in shards for a in s.files.values())
    return tallies.result(plan, inputs, folds, shards, output_bytes, time.perf_counter() - t0)


def _place_shards(plan: Plan, tasks: list[WriteTask], results: dict[int, dict[str, Any]], work: Path,
                  done: set[int], on_shard: Callable[[ShardInfo], None]) -> list[ShardInfo]:
    """Move the partitions' whole shards into `work` (renames) and join the shards that span files from their
    fragments, in shard order; shards in `done` (a resumed build) are left as they are."""
    shard_rows = plan.cfg.shard_rows
    whole: dict[int, tuple[Path, ShardInfo]] = {}
    frags: dict[int, list[tuple[Path, ShardInfo]]] = {}
    for t in tasks:
        for d in results[t.index]["shards"]:
            whole[int(d["index"])] = (t.out, ShardInfo.from_dict(d))
        for d in results[t.index]["fragments"]:
            frags.setdefault(int(d["index"]), []).append((t.out, ShardInfo.from_dict(d)))
    infos: list[ShardInfo] = []
    for k in range(len(whole) + len(frags)):
        dst = work / shard_dirname(k)
        if k in whole:
            src, info = whole[k][0] / shard_dirname(k), whole[k][1]
        elif k in frags and len(frags[k]) == 1 and frags[k][0][1].row_start == k * shard_rows:
            src, info = frags[k][0][0] / fragment_dirname(k), frags[k][0][1]   # the last shard, in one file
        elif k in frags:
            resumed = k in done and dst.is_dir()        # joined before an interruption: its info, no rewrite
            infos.append(_joined_info(k, shard_rows, frags[k]) if resumed
                         else _join(work, k, shard_rows, plan.cfg.chunk_rows, frags[k], on_shard))
            continue
        else:
            raise ManifestMismatchError(f"no partition wrote shard {k}", where=str(work / WRITE_DIR),
                                        fix="rerun with --force to rebuild the cache")
        if not (k in done and dst.is_dir()):
            if src.is_dir():
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(src, dst)
            elif not dst.is_dir():      # neither moved before an interruption nor in its partition
                raise ManifestMismatchError(f"shard {k} is missing from {src.parent}", where=str(src.parent),
                                            fix="rerun with --force to rebuild the cache")
            on_shard(info)
        infos.append(info)
    return infos


def _joined_info(index: int, shard_rows: int, parts: list[tuple[Path, ShardInfo]]) -> ShardInfo:
    """The info of the shard joined from `parts` (a unicode group's width is its longest value's)."""
    rows = sum(p.rows for _, p in parts)
    files = {}
    for g, a in parts[0][1].files.items():
        dtypes = [np.dtype(p.files[g].dtype) for _, p in parts]
        dt = max(dtypes, key=lambda d: d.itemsize) if dtypes[0].kind == "U" else dtypes[0]
        files[g] = ArrayInfo(a.file, (rows, *a.shape[1:]), str(dt))
    return ShardInfo(index, rows, index * shard_rows, files)


def _join(work: Path, index: int, shard_rows: int, chunk_rows: int, parts: list[tuple[Path, ShardInfo]],
          on_shard: Callable[[ShardInfo], None]) -> ShardInfo:
    """Write shard `index` from its fragments, streamed (memory-mapped) through the shard writer: the same
    bytes as the single-process build, whose writer saw the same rows."""
    with ShardWriter(work, shard_rows, on_shard=on_shard, first_row=index * shard_rows) as writer:
        for folder, info in parts:
            arrays = {g: np.load(folder / fragment_dirname(index) / f"{g}.npy", mmap_mode="r") for g in info.files}
            for a in range(0, info.rows, chunk_rows):
                writer.add({g: arr[a: a + chunk_rows] for g, arr in arrays.items()})
        shards = writer.close()
    assert len(shards) == 1 and shards[0].index == index, "fragments of one shard make one shard"
    return shards[0]
