"""`Batch`: one mini-batch of every feature kind a cache holds, as tensors, ready for `Model.forward`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    """Tensors for B rows. Tuples follow the order of the matching `FeatureSpec` fields.

    numeric:       (B, Fn) float32, or None when the cache has no numeric columns
    categorical:   (B, Fc) int32/int64 local ids per field (models add their own field offsets)
    multihot:      per multihot field (B, L) int32 tokens, 0 = padding
    multihot_len:  per multihot field (B,) int32
    multihot_weights: per multihot field (B, L) float32, or None when that field is unweighted
    sequence:      per sequence field (B, L) int32 tokens, most recent last, 0 = padding
    sequence_len:  per sequence field (B,) int32
    labels:        (B, T) float32, or None for unlabelled (test) caches
    row_index:     (B,) int64 global row index in the cache (OOF predictions, ids for submissions)

    Token layout (multihot and sequence, as the shards store it): left-aligned, padded on the RIGHT with 0;
    positions [0, len) are valid, in input order, so a sequence's most recent token sits at len - 1 (not at
    L - 1). A history a, b, c (c most recent) with max_len L = 5 is [a, b, c, 0, 0] with len 3; a history
    longer than L keeps its most recent L tokens (a..g with L = 5 -> [c, d, e, f, g], len 5). A row with no
    history is all 0 with len 0. Multihot fields keep their first L tokens instead.
    """

    numeric: Tensor | None
    categorical: Tensor | None
    labels: Tensor | None
    row_index: Tensor
    multihot: tuple[Tensor, ...] = ()
    multihot_len: tuple[Tensor, ...] = ()
    multihot_weights: tuple[Tensor | None, ...] = ()
    sequence: tuple[Tensor, ...] = ()
    sequence_len: tuple[Tensor, ...] = ()

    def __len__(self) -> int:
        return int(self.row_index.shape[0])

    def _map(self, fn) -> Batch:  # noqa: ANN001 - fn: Tensor -> Tensor
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = fn(v)
            elif isinstance(v, tuple):
                out[f.name] = tuple(fn(t) if isinstance(t, Tensor) else t for t in v)
            else:
                out[f.name] = v
        return replace(self, **out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())

    def head(self, n: int) -> Batch:
        """The first n rows (views, no copy): a partial last batch cut from full-size reused buffers."""
        return self._map(lambda t: t[:n])

    def record_stream(self, stream: torch.cuda.Stream) -> Batch:
        """Mark every tensor as used on `stream`, so the caching allocator does not hand its memory to another
        stream while kernels queued there may still read it (needed for tensors made on a side stream)."""
        self._map(lambda t: t.record_stream(stream) or t)
        return self
