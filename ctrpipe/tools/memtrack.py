"""`ctrpipe plan`: measure what one training step and one evaluation batch allocate, on small real batches.

The model is built with every id space cut to `MEASURE_BINS` rows, so measuring allocates no real table: what
a step allocates besides its parameters and optimiser state (activations kept for backward, attention maps,
Q/K/V, FFN hidden layers, sparse gradients, temporaries) does not depend on how many rows a table has.
It does depend on the batch, linearly: each quantity is measured at two batch sizes and extrapolated, so
`per_row * B + fixed` -- simpler and sturdier than a formula per layer type, and it follows whatever the
model, autocast and the optimiser really do.

On CPU, live bytes are counted by `LiveBytes`, a dispatch mode that sees every tensor torch creates and the
moment its storage is freed; on CUDA, torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ctrpipe.config import RunConfig
from ctrpipe.device import autocast
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.models.heads import as_output, heads_of
from ctrpipe.models.registry import build_model
from ctrpipe.tools.heap import ALLOC, FREE, FREE_CARRIED, AllocTrace
from ctrpipe.train.config import TrainConfig

MEASURE_BINS = 1024      # id space of every field in the measuring model (its tables stay a few MB)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created under this mode and still alive (`now`), and their maximum (`peak`).

    A storage is counted once however many views share it (keyed by identity; torch keeps one Python object
    per live storage) and uncounted when it is freed. Tensors made outside (parameters, numpy-backed
    optimiser state) are not seen; what is measured is the difference a piece of code makes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self.owner = ""                          # set by `attribute`: the top-level module running now
        self.by_owner: dict[str, int] = {}       # live bytes per owner ("" outside any module's forward)
        self._refs: dict[int, weakref.ref] = {}
        self._trace: tuple[list[tuple[int, int]], list[int]] | None = None   # (events, sizes) being recorded
        self._last: dict[str, tuple[list[tuple[int, int]], list[int]]] = {}   # the last trace of each kind
        self._previous: tuple[list[tuple[int, int]], list[int]] | None = None

    def start_trace(self, kind: str) -> None:
        """Record every allocation and free from now on (heap.AllocTrace's events), and the frees of what the
        last trace of the same `kind` left alive (a step frees the previous step's gradients)."""
        self._trace = ([], [])
        self._previous = self._last.get(kind)
        self._last[kind] = self._trace

    def stop_trace(self) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """(events, sizes) since start_trace."""
        assert self._trace is not None, "start_trace first"
        events, sizes = self._trace
        self._trace = self._previous = None
        return tuple(events), tuple(sizes)

    def reset_peak(self) -> None:
        self.peak = self.now

    def _count(self, t: object) -> None:
        if not isinstance(t, Tensor):
            return
        if t.is_sparse:                       # COO gradients of sparse embeddings: indices + values
            self._count(t._indices())
            self._count(t._values())
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):    # tensors without storage (e.g. some wrappers)
            return
        key = id(storage)
        if key in self._refs:
            return
        nbytes, owner = storage.nbytes(), self.owner
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        self.by_owner[owner] = self.by_owner.get(owner, 0) + nbytes
        trace, n = self._trace, -1
        if trace is not None:
            n = len(trace[1])
            trace[0].append((ALLOC, n))
            trace[1].append(nbytes)

        def freed(_ref: weakref.ref, key: int = key, nbytes: int = nbytes, owner: str = owner) -> None:
            self._refs.pop(key, None)
            self.now -= nbytes
            self.by_owner[owner] -= nbytes
            if trace is None or self._trace is None:
                return
            if trace is self._trace:                 # freed while the trace it began in runs
                trace[0].append((FREE, n))
            elif trace is self._previous:            # made by the last trace of this kind
                self._trace[0].append((FREE_CARRIED, n))

        self._refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._count(t)
        return out

    def attribute(self, model: nn.Module, depth: int = 3) -> Callable[[], None]:
        """Count what each submodule of `model` (up to `depth` names deep) allocates while its forward runs,
        under its name with indices as `*` (blocks.0.ffn and blocks.1.ffn are both blocks.*.ffn); returns the
        function that removes the hooks."""
        handles, stack = [], []

        def enter(label: str) -> Callable[..., None]:
            def hook(*_: object) -> None:
                stack.append(self.owner)
                self.owner = label
            return hook

        def leave(*_: object) -> None:
            self.owner = stack.pop() if stack else ""

        for name, module in model.named_modules():
            if name and name.count(".") < depth:
                label = ".".join("*" if part.isdigit() else part for part in name.split("."))
                handles.append(module.register_forward_pre_hook(enter(label)))
                handles.append(module.register_forward_hook(leave))

        def remove() -> None:
            for h in handles:
                h.remove()
        return remove


@dataclass(frozen=True)
class Linear:
    """bytes = per_row * B + fixed, from two measurements (clamped at 0 for batches in between)."""

    per_row: float
    fixed: float

    def at(self, rows: int) -> int:
        return max(0, round(self.per_row * rows + self.fixed))

    @classmethod
    def fit(cls, points: list[tuple[int, int]]) -> Linear:
        (b1, m1), (b2, m2) = points[0], points[-1]
        if b2 == b1:
            return cls(m2 / max(b2, 1), 0.0)
        per_row = max(0.0, (m2 - m1) / (b2 - b1))
        return cls(per_row, m1 - per_row * b1)


@dataclass(frozen=True)
class StepMemory:
    """What a batch costs beyond parameters, optimiser state and dense gradients.

    step: the peak of a training step (forward, backward, optimiser) over the memory before it; eval: the
        peak of a no-grad forward; sparse_grads: the sparse table gradients a step leaves on the parameters
        (alive until the next step's zero_grad, so at evaluations and checkpoints too); forward: what each
        submodule of the model holds when the forward returns (kept for backward), CPU only;
        step_trace, eval_trace: the allocations in order, for heap.working_set (CPU only).
    """

    step: Linear
    eval: Linear
    sparse_grads: Linear
    forward: dict[str, Linear]
    amp: str
    device: str
    sizes: tuple[int, ...]
    step_trace: AllocTrace | None = None    # every allocation of a step / an evaluation forward (CPU only)
    eval_trace: AllocTrace | None = None


def small_spec(spec: FeatureSpec) -> FeatureSpec:
    """`spec` with every id space cut to MEASURE_BINS (same fields, widths and labels)."""
    def cut(fields: tuple) -> tuple:
        return tuple(dataclasses.replace(f, bins=min(f.bins, MEASURE_BINS)) for f in fields)
    return dataclasses.replace(spec, categorical=cut(spec.categorical), multihot=cut(spec.multihot),
                               sequence=cut(spec.sequence))


def fold_ids(batch: Batch) -> Batch:
    """Real rows with ids folded into [0, MEASURE_BINS): 0 stays 0 (missing / padding), others 1 + (id-1) % (n-1)."""
    def fold(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return torch.where(t > 0, 1 + (t - 1) % (MEASURE_BINS - 1), t)
    return dataclasses.replace(batch, categorical=fold(batch.categorical),
                               multihot=tuple(fold(t) for t in batch.multihot),
                               sequence=tuple(fold(t) for t in batch.sequence))


def measure_step_memory(cfg: RunConfig, spec: FeatureSpec, rows: Batch, sizes: tuple[int, ...],
                        device: torch.device, amp: str | None = None, eval_amp: str | None = None) -> StepMemory:
    """Measure a training step and an evaluation forward at each batch size in `sizes` (rows are cut from
    `rows`, a CPU batch of real cache rows) and fit the linear cost per row.

    `eval_amp`: the evaluation forward's precision when it differs from the steps' (`train.amp=auto` trains in
    bf16 where that is faster but predicts in fp32, whose activations are twice as large)."""
    from ctrpipe.train.loop import train_step
    from ctrpipe.train.objective import Objective, build_tasks
    from ctrpipe.train.optim import build_optimizers

    amp = cfg.train.amp if amp is None else amp
    eval_amp = amp if eval_amp is None else eval_amp
    train_cfg = dataclasses.replace(cfg.train, amp=amp, grad_diagnostics_every=0)
    sspec = small_spec(spec)
    with torch.random.fork_rng(devices=[]):       # built on the CPU: only its generator, restored after
        torch.default_generator.manual_seed(0)
        model = build_model(cfg.model.name, cfg.model.params, sspec, sparse=train_cfg.sparse_embeddings).to(device)
    tasks = build_tasks(heads_of(model, sspec), sspec, train_cfg)
    objective = Objective(tasks, device, train_cfg.pos_weight_clip, train_cfg.pos_weight_clip_mode)
    optimizers = build_optimizers(model, train_cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    folded = fold_ids(rows)
    steps, evals, grads, parts, step_traces, eval_traces = [], [], [], [], [], []
    with _Meter(device) as meter:
        for b in sizes:
            batch = folded.head(b).to(device)

            def one_step(batch: Batch = batch) -> None:
                model.train()
                train_step(model, batch, objective, optimizers, scaler, train_cfg, device)

            def one_eval(batch: Batch = batch) -> None:
                model.eval()
                with torch.no_grad(), autocast(device, eval_amp):
                    as_output(model(batch)).logits.float().cpu()

            one_step()                    # optimiser state and the gradients a step leaves exist from here on
            # a step like the measured one, whose gradients the measured step frees (FREE_CARRIED events, numbered
            # as the measured step's own allocations)
            meter.excess(one_step, kind="step")
            steps.append((b, meter.excess(one_step, kind="step", traces=step_traces, rows=b)))
            parts.append((b, meter.forward_parts(model, batch, train_cfg)))
            evals.append((b, meter.excess(one_eval, kind="eval", traces=eval_traces, rows=b)))
            grads.append((b, _sparse_grad_bytes(model)))
    names = sorted({k for _, d in parts for k in d})
    forward = {k: Linear.fit([(b, d.get(k, 0)) for b, d in parts]) for k in names}
    return StepMemory(Linear.fit(steps), Linear.fit(evals), Linear.fit(grads), forward, amp, device.type,
                      tuple(sizes), AllocTrace.fit(step_traces) if step_traces else None,
                      AllocTrace.fit(eval_traces) if eval_traces else None)


class _Meter:
    """Peak bytes a piece of code allocates over what was allocated before it: LiveBytes on CPU (entered once,
    so the gradients one step leaves are seen being freed by the next), the caching allocator's counters on
    CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.live = LiveBytes() if device.type != "cuda" else None

    def __enter__(self) -> _Meter:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def forward_parts(self, model: nn.Module, batch: Batch, cfg: TrainConfig) -> dict[str, int]:
        """Bytes each submodule of `model` holds when a training forward returns (CPU only; else {})."""
        if self.live is None:
            return {}
        before = dict(self.live.by_owner)
        remove = self.live.attribute(model)
        try:
            model.train()
            with autocast(self.device, cfg.amp):
                out = as_output(model(batch))
            held = {k: v - before.get(k, 0) for k, v in self.live.by_owner.items() if k}
        finally:
            remove()
        del out
        return {k: v for k, v in held.items() if v > 0}

    def excess(self, fn: Callable[[], None], kind: str = "", traces: list | None = None, rows: int = 0) -> int:
        """Peak bytes over before; on CPU, also appends (rows, events, sizes) of what `fn` allocated to
        `traces`."""
        if self.live is not None:
            before = self.live.now
            self.live.reset_peak()
            self.live.start_trace(kind)
            fn()
            if traces is not None:
                traces.append((rows, *self.live.stop_trace()))
            else:
                self.live.stop_trace()
            return self.live.peak - before
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before


def _sparse_grad_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        g = p.grad
        if g is not None and g.is_sparse:
            total += g._indices().nbytes + g._values().nbytes
    return total


def numpy_peak(fn: Callable[[], object]) -> int:
    """Peak bytes numpy allocates while `fn` runs (numpy reports its buffers to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def metric_bytes_per_row(n_tasks: int, rows: int = 20_000) -> float:
    """Host bytes per validation row that computing the metrics takes at its peak (sorts, float64 copies)."""
    from ctrpipe.train.metrics import metrics_from_logits

    rng = np.random.default_rng(0)
    labels = (rng.random((rows, n_tasks)) < 0.3).astype(np.float32)
    logits = rng.normal(size=(rows, n_tasks)).astype(np.float32)
    return numpy_peak(lambda: metrics_from_logits(labels, logits)) / rows
