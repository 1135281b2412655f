"""`ctrpipe plan`: what a training run will hold in memory, estimated before any of it is allocated.

Parameters are counted exactly on a model built on the meta device; optimiser state, gradients, masks and
scratch follow from what `train/` allocates for each table and dense layer (below); the activations of a
step and of an evaluation batch are measured on small real batches and scaled linearly to the configured
batches (tools/memtrack.py); touched table rows and pages come from the rows the run reads
(tools/touched.py). Each line belongs to a phase, and the peak is

    resident + working set + rest of eval + checkpoint   (host RAM: the working set is the peak RSS that
        replaying the recorded allocations of a few steps and an evaluation forward through a model of glibc's
        malloc as hostmem.py tunes it gives: kept heap + live mmaps, the free heap released before each
        evaluation as the training loop does, tools/heap.py; a checkpoint's table copies are fresh mappings)
    resident + max(step, eval) + checkpoint             (host RAM when no allocations were recorded)
    resident + max(step, eval, checkpoint)              (CUDA device memory: one caching allocator pool)

What training allocates, per embedding table of R rows x D floats:
  weights R*D*4 (all pages written at init); ChangedRows mask R bytes; with embedding_optimizer
  adam: dense gradient R*D*4 + two moments 2*R*D*4 (all written every step); sparse_adam: two moments;
  adagrad: one accumulator; sgd: nothing; lazy_adam: two moments that on CPU are lazily mapped zeros (only
  pages holding touched rows become resident) plus an int32 scratch of R*4; on CUDA plain zeros (2*R*D*4).
Dense layers: weights, gradients, two AdamW moments (x4). EMA: one more copy of every parameter.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ctrpipe.config import RunConfig
from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import cgroup_room, meminfo
from ctrpipe.loader.buffers import layout_of
from ctrpipe.shard.manifest import Manifest
from ctrpipe.tools import heap
from ctrpipe.tools.memtrack import StepMemory
from ctrpipe.tools.touched import PAGE, TableUse
from ctrpipe.train.optim import TABLE_MOMENTS

Phase = Literal["resident", "step", "eval", "checkpoint"]
Where = Literal["device", "host"]
PHASES: tuple[Phase, ...] = ("resident", "step", "eval", "checkpoint")
MOMENTS = TABLE_MOMENTS


@dataclass(frozen=True)
class Line:
    """One row of the plan: `nbytes` of `item` (a part of `part`), alive in `phase`, on `where`."""

    part: str
    item: str
    nbytes: int
    phase: Phase = "resident"
    where: Where = "device"
    note: str = ""
    tables: bool = False     # scales with the tables' id spaces (what fewer bins would shrink)
    replayed: bool = False   # covered by the CPU working set (a step's activations, evaluation's forward)


@dataclass(frozen=True)
class Setting:
    """What the plan depends on, and what a suggestion changes."""

    batch: int
    eval_batch: int
    amp: str
    embedding_optimizer: str
    bins_scale: float = 1.0  # fraction of the id spaces kept (suggestions: fewer hash bins)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    device: str                       # "cpu" or "cuda"
    setting: Setting
    lines: tuple[Line, ...]
    tables: tuple[TableUse, ...]
    params: dict[str, int]            # "tables" / "dense" parameter counts (exact)
    disk: dict[str, int]              # checkpoint and prediction file sizes
    steps: int
    rows_read: int
    available: int | None             # bytes the peak is compared with (None: unknown)
    available_what: str
    measured: str                     # how the activations were measured
    suggestions: tuple[str, ...] = ()
    working: int | None = None        # CPU: peak RSS of steps + evaluation forwards (heap.working_set)

    def phase_bytes(self, phase: Phase, where: Where) -> int:
        return sum(line.nbytes for line in self.lines if line.phase == phase and line.where == where)

    def peak(self, where: Where = "device") -> int:
        """Peak bytes on the training device (`device`) or, for a CUDA run, in host RAM (`host`)."""
        if self.device != "cuda":          # one memory: device and host lines add up
            r, s, e, c = (self.phase_bytes(p, "device") + self.phase_bytes(p, "host") for p in PHASES)
            if self.working is None:
                return r + max(s, e) + c
            rest = sum(line.nbytes for line in self.lines if line.phase == "eval" and not line.replayed)
            return r + self.working + rest + c
        r, s, e, c = (self.phase_bytes(p, where) for p in PHASES)
        return r + max(s, e, c) if where == "device" else r + e + c

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak() <= self.available


@dataclass(frozen=True)
class Inputs:
    """Everything the lines are computed from (so suggestions can recompute them with other settings)."""

    cfg: RunConfig
    manifest: Manifest
    shards: Path
    spec: FeatureSpec
    device: str
    tables: tuple[TableUse, ...]
    dense: dict[str, int]             # top-level module -> dense parameter count
    step_memory: dict[str, StepMemory]  # by amp
    metric_bytes_per_row: float
    val_rows: int
    n_tasks: int
    train_rows: int = 0               # rows of the training view (a K-fold run: all but one fold)
    n_folds: int = 0                  # a K-fold run trains K models, one after another
    cv_rows: int = 0                  # rows in any fold (K-fold: the out-of-fold predictions)
    process_bytes: int = 0            # host memory of Python, torch and the libraries (`process_resident`)


def plan_lines(inp: Inputs, st: Setting) -> list[Line]:
    """Every line of the plan for setting `st`."""
    lines: list[Line] = [Line("process", "Python, torch and libraries (this process, before planning)",
                              inp.process_bytes, where="host")]
    lines += _parameter_lines(inp, st)
    lines += _optimizer_lines(inp, st)
    lines += _activation_lines(inp, st)
    lines += _loader_lines(inp, st)
    lines += _eval_lines(inp, st)
    lines += _checkpoint_lines(inp, st)
    return [line for line in lines if line.nbytes > 0]


def process_resident() -> int:
    """Resident bytes of this process when it first planned (Linux; 0 elsewhere). Read before the plan builds
    anything, it is what a `ctrpipe train` process holds before its model: the interpreter, torch, numpy,
    polars (hundreds of MB, and it was missing from the plan, which then said 'fits' for a run that did
    not). Once per process, so every plan of one process (a suggestion's too) counts the same."""
    global _PROCESS
    if _PROCESS is None:
        try:
            _PROCESS = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            _PROCESS = 0
    return _PROCESS


_PROCESS: int | None = None


def _scaled(t: TableUse, s: float) -> TableUse:
    if s == 1.0:
        return t
    rows = max(1, int(t.rows * s))
    return dataclasses.replace(t, rows=rows, touched_rows=min(t.touched_rows, rows),
                               touched_pages=min(t.touched_pages, math.ceil(rows * t.dim * 4 / t.page)))


def _short(name: str) -> str:
    return name.removesuffix(".weight").replace("embedding.groups.", "g")


def _parameter_lines(inp: Inputs, st: Setting) -> list[Line]:
    lines = []
    ema = inp.cfg.train.ema > 0
    for t in (_scaled(t, st.bins_scale) for t in inp.tables):
        lines.append(Line("parameters", f"table {_short(t.name)}: {t.rows:,} x {t.dim}", t.rows * t.dim * 4,
                          tables=True))
        if ema:
            lines.append(Line("parameters", f"EMA copy of {_short(t.name)}", t.rows * t.dim * 4, tables=True))
    for name, n in inp.dense.items():
        lines.append(Line("parameters", f"dense {name}: {n:,} params", n * 4))
    dense = sum(inp.dense.values()) * 4
    if ema:
        lines.append(Line("parameters", "EMA copy of the dense parameters", dense))
    lines.append(Line("gradients", "dense parameters (kept until the next step)", dense))
    return lines


def _optimizer_lines(inp: Inputs, st: Setting) -> list[Line]:
    opt, cuda = st.embedding_optimizer, inp.device == "cuda"
    lines = [Line("optimizer", "AdamW moments of the dense parameters (2 x fp32)", 2 * sum(inp.dense.values()) * 4)]
    for t in (_scaled(t, st.bins_scale) for t in inp.tables):
        full, short = t.rows * t.dim * 4, _short(t.name)
        n = MOMENTS[opt]
        if opt == "lazy_adam" and not cuda:
            unit = "huge pages" if t.page > PAGE else "pages"
            lines.append(Line("optimizer", f"lazy_adam moments of {short}: {t.touched_pages:,} of {t.pages:,} "
                                           f"{unit} touched", min(2 * t.touched_pages * t.page, 2 * full),
                              tables=True, note="lazily mapped: only pages holding touched rows are resident"))
            lines.append(Line("optimizer", f"lazy_adam int32 scratch of {short}", t.rows * 4, tables=True))
        elif n:
            lines.append(Line("optimizer", f"{opt} state of {short} ({n} x the table)", n * full, tables=True))
        if opt == "adam":
            lines.append(Line("gradients", f"dense gradient of {short} (embedding_optimizer=adam)", full,
                              tables=True))
        lines.append(Line("optimizer", f"changed-rows mask of {short} (1 byte a row)", t.rows, tables=True))
    return lines


def _step(inp: Inputs, st: Setting) -> StepMemory:
    return inp.step_memory.get(st.amp) or inp.step_memory[inp.cfg.train.amp]


def step_rows(inp: Inputs, st: Setting) -> int:
    """Rows of the largest training step: a batch, or the whole training view when it is smaller (the loader's
    buffers still hold a full batch)."""
    return min(st.batch, inp.train_rows) if inp.train_rows else st.batch


def _activation_lines(inp: Inputs, st: Setting) -> list[Line]:
    sm = _step(inp, st)
    lines = []
    rows = step_rows(inp, st)
    if st.embedding_optimizer != "adam":
        grads = sm.sparse_grads.at(rows) if inp.cfg.train.sparse_embeddings else _sparse_grad_guess(inp, st)
        lines.append(Line("gradients", f"sparse table gradients of one batch ({rows:,} rows)", grads))
    step = sm.step.at(rows)
    held = {k: v.at(rows) for k, v in sm.forward.items()}
    # the forward parts are shown inside the step's peak; whatever the peak holds beyond them is backward's
    for name, b in sorted(held.items(), key=lambda kv: -kv[1]):
        lines.append(Line("activations", f"  forward {name}", b, phase="step", note="part of the step peak",
                          replayed=True))
    rest = step - sum(held.values()) if held else step
    label = "backward + optimizer step beyond the forward" if held else "forward + backward + optimizer step"
    lines.append(Line("activations", f"{label} (batch {rows:,}, amp {sm.amp})", rest, phase="step",
                      replayed=True))
    return lines


def working_set(inp: Inputs, st: Setting) -> int | None:
    """CPU: peak RSS that steps and evaluation forwards add (tools/heap.py); None on CUDA or unrecorded."""
    sm = _step(inp, st)
    if inp.device == "cuda" or sm.step_trace is None:
        return None
    evaluation = sm.eval_trace if inp.val_rows else None
    return heap.working_set(sm.step_trace, step_rows(inp, st), evaluation, min(st.eval_batch, inp.val_rows or 1))


def _sparse_grad_guess(inp: Inputs, st: Setting) -> int:
    """Sparse gradients of a model measured with dense ones (suggesting lazy_adam): one (D floats + an int64
    id) per looked-up id."""
    ids = len(inp.spec.categorical) + sum(f.width for f in (*inp.spec.multihot, *inp.spec.sequence))
    dim = max((t.dim for t in inp.tables), default=0)
    return step_rows(inp, st) * ids * (dim * 4 + 8)


def _row_bytes(inp: Inputs) -> int:
    layout = layout_of(inp.shards, inp.manifest, with_labels=True)
    arrays = [layout.numeric, layout.categorical, layout.labels, *layout.multihot, *layout.multihot_len,
              *layout.multihot_weights, *layout.sequence, *layout.sequence_len]
    return 8 + sum(int(np.prod(a.row_shape, dtype=np.int64)) * a.dtype.itemsize for a in arrays if a is not None)


def _loader_lines(inp: Inputs, st: Setting) -> list[Line]:
    """Training batches: prefetch + 2 buffer sets (the consumer's, the queue's, the one being filled)."""
    sets = inp.cfg.loader.prefetch + 2
    nbytes = sets * st.batch * _row_bytes(inp)
    lc = inp.cfg.loader
    # per-row arrays of the view: its int32 row index, a gather shuffle's int64 permutation each epoch,
    # balanced batches' int64 positive / negative rows and their per-epoch draws
    per_row = 4 + (8 if lc.shuffle and lc.shuffle_strategy == "gather" else 0) + \
        (16 if lc.balance_pos_fraction else 0)
    index = [Line("loader", "row index of the training view (and its shuffles)", inp.train_rows * per_row,
                  where="host")]
    if inp.device != "cuda":
        return [Line("loader", f"{sets} host batch buffers", nbytes, where="host"), *index]
    pinned = "pinned " if inp.cfg.loader.pin_memory else ""
    return [Line("loader", f"{sets} {pinned}host batch buffers", nbytes, where="host"), *index,
            Line("loader", f"{sets} batches copied to the device", nbytes)]


def _eval_lines(inp: Inputs, st: Setting) -> list[Line]:
    if not inp.val_rows:
        return []
    b = min(st.eval_batch, inp.val_rows)
    sm = _step(inp, st)
    sets = inp.cfg.loader.prefetch + 2
    # host buffers are np.empty on CPU, resident only where rows are written: a validation set shorter than
    # the buffer sets fills only its own rows; CUDA's pinned ring is page-locked whole
    rows = sets * b if inp.device == "cuda" else min(sets * b, inp.val_rows)
    held = f"{sets} evaluation batch buffers" + ("" if rows == sets * b else f" ({rows:,} rows written)")
    lines = [Line("evaluation", f"no-grad forward (batch {b:,})", sm.eval.at(b), phase="eval", replayed=True),
             Line("evaluation", held, rows * _row_bytes(inp), phase="eval", where="host"),
             Line("evaluation", f"predictions of {inp.val_rows:,} validation rows",
                  inp.val_rows * (8 + 8 * inp.n_tasks), phase="eval", where="host"),
             Line("evaluation", "metric computation (sorts, float64 copies)",
                  int(inp.val_rows * inp.metric_bytes_per_row), phase="eval", where="host")]
    if inp.device == "cuda":
        lines.append(Line("evaluation", f"{sets} evaluation batches on the device", sets * b * _row_bytes(inp),
                          phase="eval"))
        # predictions gather on the device before one copy to the host
        lines.append(Line("evaluation", f"predictions of {inp.val_rows:,} validation rows on the device",
                          inp.val_rows * (8 + 8 * inp.n_tasks), phase="eval"))
    return lines


def _packed(inp: Inputs, st: Setting) -> tuple[int, int, int]:
    """(weights, optimiser state, largest single table copy) bytes of a checkpoint: dense tensors whole, tables
    as their touched rows (values + int64 row ids), see train/tables.py."""
    tables = [_scaled(t, st.bins_scale) for t in inp.tables]
    rows = [t.touched_rows * (t.dim * 4 + 8) for t in tables]
    dense = sum(inp.dense.values()) * 4
    weights = dense + sum(rows)
    optimizer = 2 * dense + MOMENTS[st.embedding_optimizer] * sum(rows) + sum(t.touched_rows * 8 for t in tables)
    return weights, optimizer, max(rows, default=0)


def _checkpoint_lines(inp: Inputs, st: Setting) -> list[Line]:
    weights, optimizer, largest = _packed(inp, st)
    ema = 2 if inp.cfg.train.ema > 0 else 1      # ckpt_last keeps the raw weights beside the EMA ones
    lines = [Line("checkpoint", "ckpt_last.pt: weights, touched rows of the tables", ema * weights,
                  phase="checkpoint", where="host"),
             Line("checkpoint", "ckpt_last.pt: optimiser state of the touched rows", optimizer,
                  phase="checkpoint", where="host")]
    if inp.device == "cuda":
        lines.append(Line("checkpoint", "largest table's touched rows, gathered on the device", largest,
                          phase="checkpoint"))
    return lines


def disk_sizes(inp: Inputs, st: Setting) -> dict[str, int]:
    weights, optimizer, _ = _packed(inp, st)
    ema = 2 if inp.cfg.train.ema > 0 else 1
    per_row = 8 + 8 * inp.n_tasks
    k = inp.n_folds
    if k:       # every fold keeps its best weights, its last state and its validation predictions
        return {f"ckpt_fold*.pt x{k}": k * weights, f"fold*/ckpt_last.pt x{k}": k * (ema * weights + optimizer),
                f"fold*/val_predictions.npz x{k}": inp.cv_rows * per_row, "oof.npz": inp.cv_rows * per_row}
    out = {"ckpt_best.pt": weights, "ckpt_last.pt": ema * weights + optimizer}
    if inp.val_rows:
        out["val_predictions.npz"] = inp.val_rows * per_row
    return out


PLAN_ERROR = 1.2      # measured peaks are 0.84-1.16x the plan's (bench_plan.py): below this much room, say so


def suggestions(inp: Inputs, base: Setting, available: int, peak_of: Callable[[Setting], int]) -> list[str]:
    """Settings that bring the peak under `available`, each with the peak it gives: the first that does so
    with the plan's margin (PLAN_ERROR), else one that fits only within it, marked so (a suggested batch that
    "would fit" at 843 MB of 900 was called narrow by the plan of it, and did not fit when trained)."""
    from ctrpipe.errors import human_bytes

    def verdict(peak: int) -> str:
        return "" if peak * PLAN_ERROR <= available else \
            " (narrowly: within the plan's error)" if peak <= available else " (not enough alone)"

    def first_fitting(settings: list[tuple[str, Setting]]) -> str | None:
        narrow = None
        for text, st in settings:
            peak = peak_of(st)
            if not verdict(peak):
                return f"{text}  -> {human_bytes(peak)}"
            if narrow is None and peak <= available:
                narrow = f"{text}  -> {human_bytes(peak)}{verdict(peak)}"
        return narrow

    out: list[str] = []
    batches, b, e = [], base.batch, base.eval_batch
    while b > 64:
        b, e = b // 2, max(b // 2, e // 2)
        batches.append((f"--set loader.batch_size={b} --set loader.eval_batch_size={e}",
                        dataclasses.replace(base, batch=b, eval_batch=e)))
    if (tip := first_fitting(batches)) is not None:
        out.append(tip)
    if base.amp == "off" and "bf16" in inp.step_memory:
        peak = peak_of(dataclasses.replace(base, amp="bf16"))
        out.append(f"--set train.amp=bf16  -> {human_bytes(peak)}{verdict(peak)}")
    if base.embedding_optimizer != "lazy_adam" and inp.tables:
        peak = peak_of(dataclasses.replace(base, embedding_optimizer="lazy_adam"))
        out.append(f"--set train.embedding_optimizer=lazy_adam  -> {human_bytes(peak)}{verdict(peak)}")
    hashed = [c for c in inp.manifest.columns if c.kind == "categorical" and c.transform == "hash"]
    if hashed and inp.tables:
        bins = max(c.bins for c in hashed)
        tip = first_fitting([(f"fewer bins: rebuild the cache with --set data.hash_bins={int(bins * scale)}",
                              dataclasses.replace(base, bins_scale=scale)) for scale in (0.5, 0.25, 0.1, 0.05, 0.01)])
        if tip is not None:
            out.append(tip)
    return out


def check_device(name: str) -> str:
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}", where="--device", fix="use --device cpu or --device cuda")
    return name


def device_memory(device: str) -> tuple[int | None, str]:
    """(bytes available, what they are) for the plan's device."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None, "GPU memory unknown (no CUDA device here): pass --memory, e.g. --memory 80GB"
        free, total = torch.cuda.mem_get_info()
        return free, f"free GPU memory of {torch.cuda.get_device_name()} ({total / 1e9:.1f} GB in all)"
    info = meminfo()
    room = cgroup_room()
    if room is not None and room < info.get("MemAvailable", room + 1):
        return room, "memory this process's cgroup (container or job limit) still allows"
    if "MemAvailable" in info:
        return info["MemAvailable"], f"available host RAM ({info['MemTotal'] / 1e9:.1f} GB in all)"
    return None, "host RAM unknown: pass --memory, e.g. --memory 16GB"
