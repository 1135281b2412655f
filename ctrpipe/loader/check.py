"""Stage 3: values a batch must hold for training to mean anything, checked where they are cheap to check.

`ctrpipe shard` writes only 0/1 labels and ids inside each field's table, and `ctrpipe inspect` checks a whole
cache for both. A cache changed after its build (arrays edited, or shard folders copied in from another
build) can break either: a label of 2 trains silently (binary cross-entropy takes it), an id beyond its table
stops the first embedding lookup with torch's bare "index out of range". So:

- labels are checked in every batch the loader fills: (B, T) comparisons, nothing beside the copy;
- ids are checked only after a lookup failed (`bad_id_error`): a max over every id of every batch would cost
  the loader's thread far more than the labels, for a cache that the build never writes.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError, location
from ctrpipe.loader.batch import Batch
from ctrpipe.shard.manifest import ColumnSpec, Manifest

CHANGED_CACHE_FIX = ("the shards were changed after the build (or copied in from another build): "
                     "`ctrpipe inspect DIR` lists every such value; " + REBUILD_CACHE_FIX)


def _where(manifest: Manifest, cache_label: str, global_row: int, group: str, column: str) -> str:
    """'CACHE/shard_00003/labels.npy, row 17, column clicked' for a global row of the cache."""
    starts = np.fromiter((s.row_start for s in manifest.shards), dtype=np.int64, count=len(manifest.shards))
    shard = manifest.shards[int(np.searchsorted(starts, global_row, side="right")) - 1]
    return location(f"{cache_label}/{shard.files[group].file}", row=global_row - shard.row_start, column=column)


def check_labels(labels: np.ndarray, row_index: np.ndarray, manifest: Manifest, cache_label: str) -> None:
    """Raise ManifestMismatchError when a label of the (n, T) host array is not 0 or 1 (NaN included)."""
    bad = (labels != 0) & (labels != 1)
    if not bad.any():
        return
    i, t = (int(x) for x in np.argwhere(bad)[0])
    col = next(c for c in manifest.columns_of("label") if c.index == t)
    raise ManifestMismatchError(f"label {col.name!r} is {float(labels[i, t])}, not 0 or 1",
                                where=_where(manifest, cache_label, int(row_index[i]), col.group, col.name),
                                fix=CHANGED_CACHE_FIX)


def _id_fields(manifest: Manifest, batch: Batch) -> list[tuple[ColumnSpec, torch.Tensor]]:
    """(column, its (B, width) ids) of every id-valued field of the batch."""
    out: list[tuple[ColumnSpec, torch.Tensor]] = []
    if batch.categorical is not None:
        out += [(c, batch.categorical[:, c.index].reshape(-1, 1)) for c in manifest.columns_of("categorical")]
    out += list(zip(manifest.columns_of("multihot"), batch.multihot, strict=True))
    out += list(zip(manifest.columns_of("sequence"), batch.sequence, strict=True))
    return out


def bad_id_error(batch: Batch, manifest: Manifest, cache_label: str) -> ManifestMismatchError | None:
    """The first id of `batch` outside its field's table [0, bins), as an error naming the shard file, row and
    column; None when every id is inside (the lookup failed for another reason)."""
    for col, ids in _id_fields(manifest, batch):
        v = ids.detach().cpu().numpy()
        bad = (v < 0) | (v >= col.bins)
        if bad.any():
            i, j = (int(x) for x in np.argwhere(bad)[0])
            at = f" (position {j} of its {v.shape[1]})" if col.kind != "categorical" else ""
            return ManifestMismatchError(
                f"{col.kind} column {col.name!r} holds id {int(v[i, j])}{at}, outside its table of {col.bins:,} "
                f"rows [0, {col.bins:,})",
                where=_where(manifest, cache_label, int(batch.row_index[i]), col.group, col.name),
                fix=CHANGED_CACHE_FIX)
    return None
