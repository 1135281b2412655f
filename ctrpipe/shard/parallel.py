"""Stage 2: the fit pass as a map/reduce over input files on a local process pool (`ctrpipe shard --workers N`)
or on Dask distributed workers (`--dask ADDRESS`; they must see the inputs and the shard directory at the same
paths, a shared filesystem, since partial statistics are files there).

map: every main input file is one partition. A worker process reads it chunk by chunk -- the very chunks the
single-process pass reads, since chunks never span files -- and saves its partial statistics to
WORK/partials/ (written to a temporary name, then renamed): integer counts, per-column histogram minima, the
sorted (key, count) tables of vocabularies and co-visitation, and the float sums of every chunk separately.
reduce: the parent merges the partitions in input order. Counts, minima and key tables merge exactly; the float
sums are added chunk by chunk in input order, the same additions in the same order as one process makes, so
the fitted statistics (and so every shard) are byte-identical to the single-process build for any N.

Row positions: the split of a row may depend on its index among all good rows (random and tail splits). Each
partition starts at the physical row count of the files before it (a cheap count, run on the pool); when a
file had skipped bad rows, the partitions after it are fitted again at their true start.

Resume: a partition whose file is present is not redone after a crash (its name holds its start row, the
incomplete folder's name the inputs' and config's fingerprint). Per worker, memory is one chunk plus the
partition's distinct keys, as in the single-process pass.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ctrpipe.console import console
from ctrpipe.data.config import DataConfig
from ctrpipe.data.covisit import CovisitCounter
from ctrpipe.data.fitted import Fitted, KeyCounter, MomentAccumulator, NumericAccumulator
from ctrpipe.errors import ConfigError
from ctrpipe.hostmem import keep_freed_memory
from ctrpipe.shard.passes import (
    Inputs,
    _accumulate_numeric,
    _count_covisit,
    _count_vocab,
    _Splitter,
    count_rows,
    fitted_from,
    resolve_plan,
    small_pages,
    train_frames,
)
from ctrpipe.shard.transform import Plan

PARTIALS_DIR = "partials"


def split_uses_row_index(data: DataConfig, role: str) -> bool:
    """Whether a row's split depends on its position among all rows (so partitions need their start row)."""
    return role == "train" and data.split.val_ratio > 0 and data.split.mode in ("random", "tail")


@contextmanager
def executor(workers: int, dask: str | None) -> Iterator[Executor]:
    """A local process pool of `workers` processes, or with `dask` the executor of a Dask distributed client:
    "local" starts a `LocalCluster` of `workers` processes on this machine, anything else is the address of a
    running scheduler (tcp://host:8786)."""
    if dask is None:
        # spawn, not fork: the parent may hold threads whose locks a forked child would inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield pool
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ConfigError("--dask needs Dask distributed, which is not installed", where="--dask",
                          fix='pip install "ctrpipe[dask]" (or pip install "dask[distributed]"), or drop --dask '
                              "to use a local process pool") from e
    cluster = None
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
    try:
        with client.get_executor(pure=False) as pool:
            yield pool
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def parallel_fit_pass(plan: Plan, inputs: Inputs, work: Path, workers: int, progress: bool,
                      dask: str | None = None) -> Fitted:
    """The statistics `fit_pass` computes, mapped over the main input files on `workers` processes (or the
    workers of a Dask cluster: they must see the inputs and `work` at the same paths, a shared filesystem)."""
    data = plan.cfg
    paths = inputs.main
    part_dir = work / PARTIALS_DIR
    part_dir.mkdir(exist_ok=True)
    with executor(min(workers, len(paths)), dask) as pool:
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
            good = [int(np.load(parts[i])["rows"]) for i in range(len(paths))]
            true_starts = np.cumsum([0, *good[:-1]]).tolist() if split_uses_row_index(data, inputs.role) \
                else starts
            todo = [i for i in range(len(paths)) if int(true_starts[i]) != int(starts[i])]
            starts = true_starts
    fitted = merge_partitions(plan, [parts[i] for i in range(len(paths))])
    shutil.rmtree(part_dir, ignore_errors=True)
    return fitted


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
    s1: list[np.ndarray] = []
    s2: list[np.ndarray] = []
    rows = train_rows = 0
    with small_pages():
        for chunk, ft in train_frames(plan, [path], splitter, start):
            rows += chunk.frame.height
            train_rows += ft.height
            for cv in plan.covisit:
                _count_covisit(plan, ft, cv, covisit[cv.name])
            for c, k in vocab.items():
                _count_vocab(plan, ft, c, k)
            if plan.numeric:
                # each chunk's float sums alone (0 + s == s exactly): the merge adds them in input order
                nacc.sum_raw = np.zeros(f)
                if mom is not None:
                    mom.s1, mom.s2 = np.zeros(f), np.zeros(f)
                _accumulate_numeric(plan, ft, nacc, mom)
                sums.append(nacc.sum_raw)
                if mom is not None:
                    s1.append(mom.s1)
                    s2.append(mom.s2)
    arrays: dict[str, Any] = {
        "rows": np.int64(rows), "train_rows": np.int64(train_rows), "n": np.int64(nacc.n),
        "n_valid": nacc.n_valid, "sums": np.asarray(sums, dtype=np.float64).reshape(-1, f)}
    if nacc.need_median:
        arrays["hist"], arrays["bin_min"] = nacc.hist, nacc.bin_min
    if mom is not None:
        arrays["m_missing"], arrays["m_valid"] = mom.n_missing, mom.n_valid
        arrays["s1"] = np.asarray(s1, dtype=np.float64).reshape(-1, f)
        arrays["s2"] = np.asarray(s2, dtype=np.float64).reshape(-1, f)
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
                for a, b in zip(z["s1"], z["s2"], strict=True):
                    mom.s1 += a
                    mom.s2 += b
            for j, k in enumerate(vocab.values()):
                k.merge(z[f"vocab{j}_keys"], z[f"vocab{j}_counts"])
            for j, cc in enumerate(covisit.values()):
                cc.pairs.merge(z[f"pairs{j}_keys"], z[f"pairs{j}_counts"])
                cc.ctx.merge(z[f"ctx{j}_keys"], z[f"ctx{j}_counts"])
    return fitted_from(plan, nacc, mom, vocab, covisit, train_rows)
