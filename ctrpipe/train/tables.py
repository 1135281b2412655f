"""Stage 5: which embedding-table rows training changed, so checkpoints store those rows and nothing else.

A model's initial weights are a function of its seed (`torch.manual_seed(seed)` before `build_model`; the
tables draw from that generator, see models/layers/embedding.py), and a table row changes only after it
received a gradient: untouched rows get none, their optimiser moments stay at their initial value, and
embeddings carry no weight decay. So a checkpoint holds the dense parameters whole and, per table, the rows
with a gradient so far (`ChangedRows`) with their values; loading builds the model from the seed again and
writes those rows back. A 26M x 16 table trained on a few thousand rows saves a few MB instead of 1.7 GB
(plus 2 x 1.7 GB of Adam moments in `ckpt_last.pt`), and loads back bit for bit.

Packed form (plain dicts and tensors, loadable with `torch.load(weights_only=True)`)::

    {"dense": {state_dict name: tensor},                          # every non-table entry, whole
     "tables": {state_dict name: {"rows": (U,) int64 ascending, "values": (U, D)}}}

Optimiser state tensors shaped like a table are packed the same way, plus "fill": the value of the rows not
stored (0, or Adagrad's initial accumulator).
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctrpipe.errors import CheckpointError

PackedState = dict[str, Any]


def zeros_like_lazily(t: Tensor) -> Tensor:
    """Zeros shaped like `t`; on CPU an anonymous mapping with small pages, so only the pages of rows that
    are written ever become resident.

    Optimiser moments of a 26M-row table would otherwise be written in full (3.3 GB resident for Adam's two)
    when only the rows a run touches are ever read. Not `np.zeros`: numpy asks the kernel for 2 MiB pages on
    big arrays, and a batch of hashed ids lands on nearly every one of them.
    """
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() < (1 << 20) or \
            not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros_like(t, memory_format=torch.contiguous_format)
    nbytes = t.numel() * 4
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(tuple(t.shape)))


class ChangedRows:
    """Per embedding table, the rows that have received a gradient since the model was built.

    `mark()` after each backward: on CPU a numpy scatter into a bool mask (far cheaper there than torch's
    index_fill_), on a GPU an index_fill_ kernel (no host sync). Dense table gradients
    (embedding_optimizer=adam) mark their non-zero rows.
    """

    def __init__(self, model: nn.Module) -> None:
        from ctrpipe.models.layers.embedding import named_tables  # lazy: the zoo pulls in more torch code

        self.tables = named_tables(model)
        self.masks = {name: torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                      for name, p in self.tables.items()}
        self._np = {name: m.numpy() for name, m in self.masks.items() if m.device.type == "cpu"}

    @torch.no_grad()
    def mark(self) -> None:
        for name, p in self.tables.items():
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                ids = grad._indices()[0]
                if name in self._np:
                    self._np[name][ids.numpy()] = True
                else:
                    self.masks[name].index_fill_(0, ids, True)
            else:
                self.masks[name] |= grad.ne(0).any(dim=1)

    def rows(self, name: str) -> Tensor:
        """(U,) int64 ascending rows of table `name` changed so far (a host sync on GPU)."""
        return self.masks[name].nonzero().squeeze(1)

    def all_rows(self) -> dict[str, Tensor]:
        return {name: self.rows(name) for name in self.tables}

    def load(self, rows: dict[str, Tensor]) -> None:
        """Restore the masks from `all_rows()` as saved in a checkpoint."""
        for name, mask in self.masks.items():
            mask.zero_()
            r = rows.get(name)
            if r is not None and r.numel():
                mask.index_fill_(0, r.to(mask.device), True)


def pack(state: dict[str, Tensor], rows: dict[str, Tensor]) -> PackedState:
    """A state_dict -> packed form: tables named in `rows` keep only those rows. Copies, never views of `state`."""
    dense = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k not in rows}
    tables = {k: {"rows": r.cpu(), "values": state[k].detach().index_select(0, r.to(state[k].device)).cpu()}
              for k, r in rows.items()}
    return {"dense": dense, "tables": tables}


@torch.no_grad()
def load_packed(model: nn.Module, packed: PackedState) -> None:
    """Write packed weights into `model`, which must be freshly built from the checkpoint's seed."""
    tables = packed["tables"]
    missing, unexpected = model.load_state_dict(packed["dense"], strict=False)
    if sorted(missing) != sorted(tables) or unexpected:
        raise RuntimeError(f"state does not fit the model: missing {sorted(set(missing) - set(tables))}, "
                           f"unexpected {sorted(unexpected)}")
    for name, t in tables.items():
        weight = model.get_parameter(name)
        weight.index_copy_(0, t["rows"].to(weight.device), t["values"].to(weight.device, weight.dtype))


def unpack(packed: PackedState, base: dict[str, Tensor]) -> dict[str, Tensor]:
    """Packed form -> a full state_dict, tables starting from `base` (a state_dict of the freshly built model)."""
    out = dict(packed["dense"])
    for name, t in packed["tables"].items():
        full = base[name].detach().clone()
        full.index_copy_(0, t["rows"].to(full.device), t["values"].to(full.device, full.dtype))
        out[name] = full
    return out


def _optimizer_params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _fill(opt: torch.optim.Optimizer, key: str) -> float:
    """The value optimiser state `key` has in rows that never had a gradient."""
    if isinstance(opt, torch.optim.Adagrad) and key == "sum":
        return float(opt.param_groups[0]["initial_accumulator_value"])
    return 0.0


def pack_optimizer(opt: torch.optim.Optimizer, tables: dict[str, nn.Parameter],
                   rows: dict[str, Tensor]) -> dict[str, Any]:
    """`opt.state_dict()` with every table-shaped state tensor cut to the table's changed rows."""
    sd = opt.state_dict()
    name_of = {id(p): name for name, p in tables.items()}
    params = _optimizer_params(opt)
    state: dict[int, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        p = params[idx]
        name = name_of.get(id(p))
        packed: dict[str, Any] = {}
        for key, value in st.items():
            if name is not None and torch.is_tensor(value) and value.shape == p.shape and value.dim() >= 1:
                r = rows[name].to(value.device)
                packed[key] = {"rows": r.cpu(), "values": value.index_select(0, r).cpu(),
                               "fill": _fill(opt, key)}
            else:
                packed[key] = value.cpu() if torch.is_tensor(value) else value
        state[idx] = packed
    return {"state": state, "param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, packed: dict[str, Any]) -> None:
    """Inverse of `pack_optimizer`: rebuild full state tensors (fill + stored rows), then load them."""
    params = _optimizer_params(opt)
    state: dict[int, dict[str, Any]] = {}
    for idx, st in packed["state"].items():
        p = params[int(idx)]
        full: dict[str, Any] = {}
        for key, value in st.items():
            if isinstance(value, dict) and "rows" in value:
                t = zeros_like_lazily(p.detach())
                if value["fill"] != 0.0:
                    t.fill_(value["fill"])
                t.index_copy_(0, value["rows"].to(t.device), value["values"].to(t.device, t.dtype))
                full[key] = t
            else:
                full[key] = value
        state[int(idx)] = full
    have = [len(g["params"]) for g in opt.param_groups]
    saved = [len(g["params"]) for g in packed["param_groups"]]
    if have != saved:
        # parameters are grouped by code (which get weight decay): a run saved by a ctrpipe that grouped
        # them otherwise cannot continue its optimiser state
        raise CheckpointError(f"the saved optimiser state groups the parameters {saved}, this ctrpipe groups them "
                              f"{have}", where="ckpt_last.pt (optimiser state)",
                              fix="finish the run with the ctrpipe version that started it, or train it again "
                                  "without --resume")
    opt.load_state_dict({"state": state, "param_groups": packed["param_groups"]})
