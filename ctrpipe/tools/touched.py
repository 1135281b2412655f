"""`ctrpipe plan`: which embedding rows a run's gradients reach, and on how many memory pages they lie.

Both decide real memory: checkpoints store the rows a gradient reached (train/tables.py), and `lazy_adam`'s
moments on CPU are lazily mapped zeros, so only the pages holding such rows become resident: 4 KiB pages,
because train/tables.zeros_like_lazily maps them with MADV_NOHUGEPAGE (with 2 MiB pages a batch of hashed ids
would reach nearly every page of a table's moments in its first steps). Counted on
the rows the run reads first (the training loader's own order: seed, shuffle and batch size of the config);
a run reading more rows than `SAMPLE_ROWS` is extrapolated from the sample with a power law fitted on its two
halves (distinct ids grow sub-linearly with rows read), capped at the table's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ctrpipe.config import RunConfig
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView

SAMPLE_ROWS = 1 << 18
PAGE = 4096


def resident_page() -> int:
    """The unit in which lazy_adam's lazily mapped moments become resident: the 4 KiB base page (they are
    mapped with MADV_NOHUGEPAGE, see train/tables.zeros_like_lazily)."""
    return PAGE


@dataclass(frozen=True)
class TableUse:
    """One embedding table: its shape and what a run's gradients reach of it."""

    name: str              # state_dict name, e.g. inputs.embedding.groups.0.cat_table.weight
    rows: int
    dim: int
    touched_rows: int      # distinct rows with a gradient by the end of the run
    touched_pages: int     # pages (of `page` bytes) of a row-major float32 (rows, dim) array holding them
    exact: bool            # counted on every row the run reads (else extrapolated from a sample)
    page: int = PAGE

    @property
    def pages(self) -> int:
        return math.ceil(self.rows * self.dim * 4 / self.page)


def read_sample(shards: Path, cfg: RunConfig, rows: int) -> Batch:
    """The first `rows` training rows in the order the run reads them (one CPU Batch)."""
    loader = ShardLoader.from_config(shards, RowView.train(), cfg.loader, seed=cfg.seed, device="cpu", train=True)
    loader.drop_last = False
    parts: list[Batch] = []
    have = 0
    for batch in loader:
        parts.append(batch.head(min(len(batch), rows - have))._map(lambda t: t.clone()))
        have += len(parts[-1])
        if have >= rows:
            break
    return _concat(parts)


def _concat(parts: list[Batch]) -> Batch:
    import torch

    first = parts[0]

    def cat(get):  # noqa: ANN001, ANN202 - a field getter
        vals = [get(p) for p in parts]
        return None if vals[0] is None else torch.cat(vals)

    def cat_tuple(name: str) -> tuple:
        n = len(getattr(first, name))
        return tuple(cat(lambda p, i=i: getattr(p, name)[i]) for i in range(n))

    return Batch(numeric=cat(lambda p: p.numeric), categorical=cat(lambda p: p.categorical),
                 labels=cat(lambda p: p.labels), row_index=cat(lambda p: p.row_index),
                 multihot=cat_tuple("multihot"), multihot_len=cat_tuple("multihot_len"),
                 multihot_weights=cat_tuple("multihot_weights"), sequence=cat_tuple("sequence"),
                 sequence_len=cat_tuple("sequence_len"))


def table_use(model: nn.Module, spec: FeatureSpec, sample: Batch, rows_read: int) -> list[TableUse]:
    """Per embedding table of `model` (built on the meta device is enough), the rows and pages a run that
    reads `rows_read` distinct rows reaches; `sample` holds the first of those rows."""
    from ctrpipe.models.layers.embedding import FieldEmbedding, named_tables
    from ctrpipe.models.layers.sequence import DareEncoder

    name_of = {id(p): name for name, p in named_tables(model).items()}
    cat_index = {f.name: i for i, f in enumerate(spec.categorical)}
    out: list[TableUse] = []
    for fe in (m for m in model.modules() if isinstance(m, FieldEmbedding)):
        for group in fe.groups:
            if group.cat_table is not None:
                cols = [cat_index[n] for n in group.cat_names]
                ids = _global_cat_rows(spec, sample, cols)
                # bag fields in a categorical field's id space read that field's rows of this table
                ids += _bag_rows(sample, [b for b in group.bags if b.shared])
                out.append(_use(name_of[id(group.cat_table.weight)], group.cat_table.weight.shape, ids,
                                rows_read))
            if group.bag_table is not None:
                ids = _bag_rows(sample, [b for b in group.bags if not b.shared])
                out.append(_use(name_of[id(group.bag_table.weight)], group.bag_table.weight.shape, ids,
                                rows_read))
    for enc in (m for m in model.modules() if isinstance(m, DareEncoder)):   # DARE's attention table
        tok = sample.sequence[enc.history.index].numpy().astype(np.int64)
        ids = [np.where(tok > 0, tok, -1)]
        if enc.query_col >= 0:
            assert sample.categorical is not None
            ids.append(sample.categorical[:, enc.query_col].numpy().astype(np.int64)[:, None])
        weight = enc.table.table.weight
        out.append(_use(name_of[id(weight)], weight.shape, ids, rows_read))
    return out


def _global_cat_rows(spec: FeatureSpec, sample: Batch, cols: list[int]) -> list[np.ndarray]:
    """Per sampled row block: table rows of the fields `cols` (local id + the field's offset in the table)."""
    assert sample.categorical is not None, "a categorical table needs categorical columns"
    cat = sample.categorical.numpy()
    offsets = np.cumsum([0] + [spec.categorical[c].bins for c in cols[:-1]], dtype=np.int64)
    return [cat[:, cols].astype(np.int64) + offsets]          # (N, len(cols))


def _bag_rows(sample: Batch, bags: list) -> list[np.ndarray]:
    """Table rows of every non-padding token of the bag fields (row = field offset + token)."""
    out = []
    for f in bags:
        tok = (sample.multihot if f.source == "multihot" else sample.sequence)[f.index].numpy().astype(np.int64)
        out.append(np.where(tok > 0, tok + f.offset, -1))    # (N, L); -1 = padding, no gradient
    return out


def _use(name: str, shape: tuple[int, ...], ids: list[np.ndarray], rows_read: int) -> TableUse:
    rows, dim = int(shape[0]), int(shape[1])
    n = ids[0].shape[0]
    page = resident_page()
    total_pages = math.ceil(rows * dim * 4 / page)

    def distinct(upto: int) -> tuple[int, int]:
        flat = np.concatenate([a[:upto].ravel() for a in ids])
        flat = np.unique(flat[flat >= 0])
        return flat.size, np.unique(flat * (dim * 4) // page).size

    r_all, p_all = distinct(n)
    if rows_read <= n or n < 2:
        return TableUse(name, rows, dim, r_all, p_all, exact=rows_read <= n, page=page)
    r_half, p_half = distinct(n // 2)
    scale = rows_read / n

    def grow(full: int, half: int, cap: int) -> int:
        beta = math.log(max(full, 1) / max(half, 1)) / math.log(n / (n // 2)) if half else 1.0
        return min(cap, round(full * scale ** min(max(beta, 0.0), 1.0)))

    return TableUse(name, rows, dim, grow(r_all, r_half, rows), grow(p_all, p_half, total_pages), exact=False,
                    page=page)
