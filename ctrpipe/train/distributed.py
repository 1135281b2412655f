"""Stage 5 over several processes: data-parallel training under torchrun, with the results of one process.

`torchrun --nproc_per_node N -m ctrpipe.cli train ...` starts N copies of the command. Each finds its place in
torchrun's environment (`rank_info`) and joins one process group (NCCL on GPUs, gloo on CPUs) with a timeout.
`loader.batch_size` stays the global batch, so a config means the same run on any number of processes:

* every rank reads its contiguous share of each global batch, planned as one process plans it (ShardLoader's
  `rank`/`world_size`): disjoint rows, each row once per epoch across the ranks;
* DistributedDataParallel averages the dense parameters' gradients; it is told to leave the tables alone;
* embedding tables are replicated; after backward `RowExchange` gives each the same gradient on every rank:
  each rank's touched rows (ids + gradient rows summed per id) go to every rank in one all_gather, and every
  rank adds them per id in rank order and divides by the number of ranks -- DDP's average, bit for bit the
  same everywhere. The optimiser (lazy_adam, adam, ...) then takes the same step on every rank, so the
  replicas stay identical; `check_replicas` compares checksums of every parameter to prove it;
* rank 0 alone writes the run directory, logs and checkpoints; evaluation runs on every rank's share of the
  validation batches and rank 0 puts the predictions back in one-process order (exact whole-set metrics).

Why rows and not a dense all-reduce of the tables: NCCL has no sparse all-reduce, a dense one moves the whole
table every step (1.7 GB for 26M x 16 fp32), while a batch touches at most batch x fields rows
(benchmarks/bench_ddp.py measures both). Every collective runs inside `Distributed.guard`: a rank that died,
hangs past `train.distributed.timeout_s`, or cannot be reached ends the run with a TrainingError on the others.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ctrpipe.errors import ConfigError, CtrpipeError, TrainingError
from ctrpipe.train.evaluate import Predictions

T = TypeVar("T")
E = TypeVar("E", bound=CtrpipeError)

LAUNCH_FIX = ("launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, e.g. "
              "torchrun --nproc_per_node 2 -m ctrpipe.cli train ...; or unset WORLD_SIZE for one process")
LOST_FIX = ("find the first rank that failed in the job's output (torchrun names it) and fix that; a rank that "
            "hung without an error is waited for train.distributed.timeout_s seconds. Then run the same "
            "command with --resume to continue from the last checkpoint")
# what gloo and NCCL say when a peer is gone or late (not, say, a shape mistake in a collective's arguments)
_COMM_MARKERS = ("connection", "timed out", "timeout", "socket", "by peer", "broken pipe", "remote process")
_CHECKSUM_CHUNK = 1 << 20       # elements per slice of a checksum: bounds its temporary int64 copy to 8 MB


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun job."""

    rank: int                 # 0 .. world_size - 1 over every node
    world_size: int
    local_rank: int           # index on this node: picks the GPU


def rank_info(env: Mapping[str, str] = os.environ) -> RankInfo | None:
    """This process's place in a torchrun job, or None when it runs alone (no WORLD_SIZE, or 1)."""
    raw = env.get("WORLD_SIZE", "").strip()
    if raw in ("", "1"):
        return None
    try:
        world, rank = int(raw), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", str(rank)))
    except (KeyError, ValueError):
        raise TrainingError(f"WORLD_SIZE={raw!r} is set, but RANK={env.get('RANK')!r} and "
                            f"LOCAL_RANK={env.get('LOCAL_RANK')!r} do not give this process's place",
                            where="environment", fix=LAUNCH_FIX) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise TrainingError(f"RANK={rank} is not a rank of WORLD_SIZE={world}", where="environment",
                            fix=LAUNCH_FIX)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise TrainingError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not: the ranks cannot find "
                            "each other", where="environment", fix=LAUNCH_FIX)
    return RankInfo(rank, world, local)


# torch 2.13 renamed the gather and DDP's buffer setting; GPU images may carry an older torch (2.11 has only the
# older names), so both are taken from whichever torch is installed
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def raised_alike(group: Distributed | None, exc: E) -> E:
    """`exc` as every rank of `group` raises it (Distributed.alike), or as it is without a torchrun job."""
    return group.alike(exc) if group is not None else exc


def no_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's keyword that turns off broadcasting buffers from rank 0, in this torch."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _is_comm_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed (a peer gone, a timeout), not a bug in ctrpipe's own code."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMM_MARKERS)


def batch_norm_settings(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The `model.*` settings of a model section that turn batch norm on, each with the value that turns it off:
    `batch_norm: true` (MLP models, an ESMM backbone's `backbone_params`) or `norm: batch` (QNN-alpha layers)."""
    out: dict[str, str] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            elif (k == "batch_norm" and v is True) or (k == "norm" and v == "batch"):
                out[f"{prefix}{k}"] = "false" if k == "batch_norm" else "layer"
    walk(model_config, "model.")
    return out


class Distributed:
    """Membership of a torchrun job: the process group and every collective data-parallel training makes.

    Collectives must be entered by every rank in the same order, so each method here is called by all ranks
    at the same point of the run (the loop's steps are the same on every rank).
    """

    def __init__(self, info: RankInfo, device: torch.device, timeout_s: float) -> None:
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.timeout_s = timeout_s
        self.step = -1                            # the loop's position, for messages
        with self.guard("joining the other ranks"):
            dist.init_process_group(self.backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ failures
    def where(self) -> str:
        at = f", step {self.step}" if self.step >= 0 else ""
        return f"rank {self.rank} of {self.world_size}{at}"

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failed collective inside the block into a TrainingError saying what this rank was doing."""
        try:
            yield
        except RuntimeError as exc:
            if not _is_comm_failure(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:300]     # gloo's "[.../pair.cc:537] " source prefix
            raise TrainingError(f"{what} failed: another rank stopped, hangs, or cannot be reached ({first})",
                                where=self.where(), fix=LOST_FIX) from None

    def agree(self, error: CtrpipeError | None, what: str) -> None:
        """After a stage every rank runs: if any rank failed, every rank stops -- the failed one with its own
        error, the others with one naming it (no rank goes on to wait for a peer that has left)."""
        mine = None if error is None else (error.what, error.where, error.fix)
        with self.guard(what):
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
        # the first rank of each node prints; the others print only an error of their own that rank 0 lacks
        # (rank 0 prints either the same error or this view of the first failed rank's)
        if error is not None:
            error.shown_by_peer = self.local_rank != 0 and gathered[0] == mine
            raise error
        for r, theirs in enumerate(gathered):
            if theirs is not None:
                their_what, their_where, their_fix = theirs
                at = f" ({their_where})" if their_where else ""
                raise self.alike(TrainingError(f"rank {r} failed {what}: {their_what}{at}", where=self.where(),
                                               fix=their_fix or f"see rank {r}'s message"))

    def alike(self, exc: E) -> E:
        """`exc`, which every rank raises alike (a check of what all ranks share, or its view of another rank's
        failure): each machine's first rank prints it, the others exit quietly."""
        exc.shown_by_peer = self.local_rank != 0
        return exc

    def check(self, fn: Callable[[], None], what: str) -> None:
        """A check every rank makes alike (e.g. of its share of the batches): its error stops every rank, and
        is printed once per node (`agree`)."""
        try:
            fn()
        except CtrpipeError as exc:
            self.agree(exc, what)
        self.agree(None, what)

    def differing_ranks(self, value: object, what: str) -> list[int]:
        """The ranks whose `value` differs from rank 0's (every rank gets the same answer)."""
        gathered: list[Any] = [None] * self.world_size
        with self.guard(what):
            dist.all_gather_object(gathered, value)
        return [r for r, v in enumerate(gathered) if v != gathered[0]]

    def from_main(self, fn: Callable[[], T], what: str) -> T:
        """Rank 0 calls `fn` (e.g. reads ckpt_last.pt); its result, or its failure, reaches every rank."""
        result: T | None = None
        error: CtrpipeError | None = None
        if self.is_main:
            try:
                result = fn()
            except CtrpipeError as exc:
                error = exc
        self.agree(error, what)
        return self.broadcast(result, what)  # type: ignore[return-value]  # rank 0 returned a T

    def broadcast(self, obj: T, what: str) -> T:
        """Rank 0's `obj` on every rank (pickled: small objects, checkpoints)."""
        box = [obj]
        with self.guard(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ tensors
    def all_gather(self, t: Tensor, what: str) -> Tensor:
        """(world_size, *t.shape): every rank's `t`, in rank order."""
        out = t.new_empty(self.world_size * t.numel())
        with self.guard(what):
            _all_gather_single(out, t.contiguous().reshape(-1))
        return out.view(self.world_size, *t.shape)

    def mean_(self, t: Tensor, what: str) -> Tensor:
        """`t` <- its mean over the ranks, in place."""
        with self.guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.div_(self.world_size)

    def earliest_(self, first: Tensor, what: str) -> Tensor:
        """A step index (-1: none) -> the smallest one any rank holds, -1 if none does."""
        none = torch.iinfo(torch.int64).max
        t = torch.where(first < 0, none, first)
        with self.guard(what):
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return torch.where(t == none, -1, t)

    def gather_objects(self, obj: T, what: str) -> list[T] | None:
        """Every rank's `obj` on rank 0, in rank order; None on the other ranks."""
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self.guard(what):
            dist.gather_object(obj, out, dst=0)
        return out

    def gather_predictions(self, preds: Predictions, rank_rows: np.ndarray) -> Predictions | None:
        """Every rank's predictions of its shares of the evaluation batches -> rank 0, in the order one process
        predicts them (batch by batch, each batch's shares in rank order); None on the other ranks.

        `rank_rows` (K, W): rows rank r predicted of batch k (ShardLoader.rank_rows).
        """
        parts = self.gather_objects((preds.row_index, preds.logits, preds.labels), "gathering predictions")
        if parts is None:
            return None
        k = np.arange(rank_rows.shape[0], dtype=np.int64) * self.world_size
        key = np.concatenate([np.repeat(k + r, rank_rows[:, r]) for r in range(self.world_size)])
        order = np.argsort(key, kind="stable")            # (N,) stable: a share keeps its own order
        row_index, logits, labels = (np.concatenate([p[i] for p in parts])[order] for i in range(3))
        return Predictions(row_index, logits, labels)

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module, tables: Mapping[str, nn.Parameter],
             model_config: Mapping[str, Any] | None = None) -> nn.Module:
        """`model` under DDP for its dense parameters (the tables are RowExchange's); BatchNorm made SyncBatchNorm.

        Returns the module to call in training steps; `model` itself stays what checkpoints and evaluation use.
        `model_config` (the run's `model` section) names the settings that turn batch norm on in a refusal.
        """
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and self.device.type != "cuda":
            keys = batch_norm_settings(model_config or {})
            off = ", ".join(f"{k}={v}" for k, v in keys.items()) or "a model config without batch norm"
            raise self.alike(ConfigError(
                "the model has BatchNorm layers: over several processes their batch statistics must be "
                "synchronised (SyncBatchNorm), which torch runs on GPUs only", where=", ".join(keys) or "model",
                fix=f"train on GPUs, in one process, or without batch norm ({off})"))
        if has_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = {id(p) for p in tables.values()}
        if not any(p.requires_grad and id(p) not in ids for p in model.parameters()):
            return model                                    # tables only: nothing for DDP to average
        ignore = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        with self.guard("wrapping the model in DistributedDataParallel"):
            # buffers are not broadcast each step: they are equal on every rank by construction (and checked)
            return DistributedDataParallel(model, device_ids=None, gradient_as_bucket_view=True,
                                           **no_buffer_sync())

    def rank_seed(self, seed: int) -> int:
        """A torch seed of this rank's own random stream (dropout masks, gate noise) for a run seeded `seed`."""
        state = np.random.SeedSequence([int(seed) & (2**64 - 1), self.rank]).generate_state(2, np.uint64)
        return int(state[0] >> np.uint64(1))

    @torch.no_grad()
    def check_replicas(self, model: nn.Module) -> None:
        """Stop with a TrainingError unless every parameter and buffer is bit-identical on every rank."""
        state = model.state_dict()
        local = torch.stack([checksum(t) for t in state.values()]) if state else torch.zeros(0, dtype=torch.int64)
        sums = self.all_gather(local.to(self.device), "comparing the model across ranks").cpu()   # (W, P)
        differs = (sums != sums[0]).any(dim=0)
        if bool(differs.any()):
            names = [n for n, d in zip(state, differs.tolist(), strict=True) if d]
            ranks = [r for r in range(self.world_size) if bool((sums[r] != sums[0]).any())]
            raise self.alike(TrainingError(
                f"the model's copies differ between ranks: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                f" on rank(s) {ranks} differ from rank 0", where=self.where(),
                fix="this is a bug in ctrpipe or a faulty device: report it with the config; run the same command "
                    "with --resume to continue from the last checkpoint (rank 0's weights)"))


def checksum(t: Tensor) -> Tensor:
    """An exact, order-independent fingerprint of a tensor's bits: int64 sum of its elements read as integers.

    Integer addition is associative, so the result does not depend on how a reduction is split over threads:
    equal tensors give equal sums on any rank, and a changed bit almost surely changes it.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    ints = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for a in range(0, ints.numel(), _CHECKSUM_CHUNK):
        total += ints[a:a + _CHECKSUM_CHUNK].sum(dtype=torch.int64)
    return total


# ----------------------------------------------------------------------------------------------- tables

def touched_rows(p: nn.Parameter) -> tuple[Tensor, Tensor]:
    """(U,) distinct rows of table `p` this rank's batch touched, ascending, and (U, D) their summed gradients."""
    g = p.grad
    dim = p.shape[1]
    if g is None:
        return torch.zeros(0, dtype=torch.int64, device=p.device), p.new_zeros((0, dim))
    assert g.is_sparse, "distributed runs build tables with sparse gradients"
    if g.is_coalesced():
        return g.indices()[0], g.values().reshape(-1, dim)
    ids = g._indices()[0]
    values = g._values().reshape(ids.shape[0], dim)
    rows, inverse = torch.unique(ids, return_inverse=True)            # sorted: the same on every device
    return rows, values.new_zeros((rows.shape[0], dim)).index_add_(0, inverse, values)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


class RowExchange:
    """After backward, every table's gradient becomes the average over ranks of their gradients, the same bits
    on every rank, as a coalesced sparse gradient (or a dense one with `dense=True`: embedding_optimizer=adam).

    Per step: one all_gather of the touched-row counts (T int64 per rank), then one of a byte payload per rank
    holding, per table, its ids (int64) and gradient rows, padded to the largest count among the ranks. Every
    rank then sums the ranks' rows per id in rank order; within one rank's block the ids are distinct, so each
    `index_add_` writes every row once and the sum does not depend on thread or kernel scheduling.
    `bytes_sent` counts this rank's payloads (what each rank puts on the wire per step, before the collective's
    own fan-out). On a GPU, reading the counts and torch.unique's output sizes are host syncs, as in lazy_adam's
    GPU path: rows of variable number need their number on the host.
    """

    def __init__(self, group: Distributed, tables: Mapping[str, nn.Parameter], dense: bool) -> None:
        self.group, self.tables, self.dense = group, dict(tables), dense
        self.bytes_sent = 0
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        group, world = self.group, self.group.world_size
        params = list(self.tables.values())
        local = [touched_rows(p) for p in params]
        counts = torch.tensor([ids.shape[0] for ids, _ in local], dtype=torch.int64)
        all_counts = group.all_gather(counts.to(group.device), "exchanging embedding-gradient row counts").cpu()
        pad = all_counts.max(dim=0).values.tolist()                       # (T,) rows per table in a payload
        layout, size = self._layout(params, pad)
        payload = torch.empty(size, dtype=torch.uint8, device=group.device)
        for (ids, rows), (at_ids, at_rows), n in zip(local, layout, counts.tolist(), strict=True):
            payload[at_ids:at_ids + n * 8].view(torch.int64).copy_(ids)
            payload[at_rows:at_rows + rows.numel() * rows.element_size()].view(rows.dtype).copy_(rows.reshape(-1))
        gathered = group.all_gather(payload, "exchanging embedding-gradient rows")      # (W, size)
        for t, p in enumerate(params):
            dim, at_ids, at_rows = p.shape[1], *layout[t]
            ns = all_counts[:, t].tolist()
            ids = torch.cat([gathered[r, at_ids:at_ids + ns[r] * 8].view(torch.int64) for r in range(world)])
            rows, inverse = torch.unique(ids, return_inverse=True)       # (U,) ascending, (sum ns,)
            total = p.new_zeros((rows.shape[0], dim))
            start = 0
            for r in range(world):                                       # rank order: a fixed summation order
                nbytes = ns[r] * dim * p.element_size()
                block = gathered[r, at_rows:at_rows + nbytes].view(p.dtype).view(ns[r], dim)
                total.index_add_(0, inverse[start:start + ns[r]], block)
                start += ns[r]
            total.div_(world)                                            # DDP's average
            if self.dense:
                p.grad = torch.zeros_like(p).index_copy_(0, rows, total)
            else:
                p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), total, p.shape, is_coalesced=True,
                                                 check_invariants=False)   # rows: ascending, distinct
        self.bytes_sent += size + counts.numel() * 8
        self.steps += 1

    @staticmethod
    def _layout(params: list[nn.Parameter], pad: list[int]) -> tuple[list[tuple[int, int]], int]:
        """Byte offsets of each table's ids and rows in a payload, every part 8-byte aligned; payload size."""
        out, at = [], 0
        for p, n in zip(params, pad, strict=True):
            at_ids = at
            at_rows = at_ids + n * 8
            at = at_rows + _aligned(n * p.shape[1] * p.element_size())
            out.append((at_ids, at_rows))
        return out, at

    def dense_bytes(self) -> int:
        """Bytes of the tables' gradients: what a dense all-reduce would move per rank and step (about 2x that
        for a ring over many ranks)."""
        return sum(p.numel() * p.element_size() for p in self.tables.values())
