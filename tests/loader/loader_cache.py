"""Tiny real shard caches for loader tests: real .npy files + a real manifest written by write_manifest.

Every stored value is a function of the row's global index, so a test can check any batch field against
`row_index` without knowing the order the loader chose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctrpipe.data.splits import SPLIT_CODES
from ctrpipe.shard.manifest import ArrayInfo, ColumnSpec, Manifest, ShardInfo, write_manifest

N_NUMERIC = 3
N_CAT = 2
MH_LEN = 4
SEQ_LEN = 5
K_FOLDS = 4


def split_of(rows: np.ndarray) -> np.ndarray:
    """Split code per global row: a fixed pseudo-random pattern, mostly train."""
    h = (rows * 2654435761) % 97
    return np.select([h < 60, h < 75, h < 85], [0, 1, 2], 3).astype(np.int8)


def fold_of(rows: np.ndarray) -> np.ndarray:
    """Fold per global row for train/val rows, -1 for gold/test rows."""
    split = split_of(rows)
    return np.where(split <= 1, (rows * 40503 // 7) % K_FOLDS, -1).astype(np.int8)


def expected_fields(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The values a cache written by `write_cache` stores for global `rows`."""
    r = rows.astype(np.int64)
    lens = (r % (MH_LEN + 1)).astype(np.int32)
    col = np.arange(MH_LEN)
    tags = np.where(col < lens[:, None], (r[:, None] * 7 + col + 1) % 1000 + 1, 0).astype(np.int32)
    seq_lens = (r % (SEQ_LEN + 1)).astype(np.int32)
    scol = np.arange(SEQ_LEN)
    # the shard convention (Batch docstring): tokens left-aligned, most recent last, padding 0 on the right
    hist = np.where(scol < seq_lens[:, None], (r[:, None] + scol) % 500 + 1, 0).astype(np.int32)
    return {
        "numeric": (r[:, None] + np.arange(N_NUMERIC) / 10).astype(np.float32),
        "categorical": np.stack([r % 2_000_000_000, (r * 3) % 11], axis=1).astype(np.int32),
        "labels": (r % 3 == 0).astype(np.float32)[:, None],
        "ids": r + 1_000_000,
        "split": split_of(r),
        "fold": fold_of(r),
        "tags.tokens": tags,
        "tags.len": lens,
        "tags.weights": (tags > 0) * np.float32(0.5),
        "hist.tokens": hist,
        "hist.len": seq_lens,
    }


def _columns(labels: bool, tokens: bool) -> tuple[ColumnSpec, ...]:
    cols = [ColumnSpec(f"I{i}", "numeric", "numeric", "float32", index=i) for i in range(N_NUMERIC)]
    cols += [ColumnSpec(f"C{i}", "categorical", "categorical", "int32", index=i, bins=2_000_000_000)
             for i in range(N_CAT)]
    if tokens:
        cols.append(ColumnSpec("tags", "multihot", "tags.tokens", "int32", width=MH_LEN, bins=1001,
                               weighted=True))
        cols.append(ColumnSpec("hist", "sequence", "hist.tokens", "int32", width=SEQ_LEN, bins=501))
    if labels:
        cols.append(ColumnSpec("label", "label", "labels", "float32"))
    cols.append(ColumnSpec("id", "id", "ids", "int64"))
    return tuple(cols)


def write_cache(out: Path, shard_rows: tuple[int, ...], *, labels: bool = True, tokens: bool = True) -> Path:
    """Write a complete cache of len(shard_rows) shards to `out` and return `out`."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    start = 0
    for s, n in enumerate(shard_rows):
        d = out / f"shard_{s:05d}"
        d.mkdir()
        files = {}
        for group, arr in expected_fields(np.arange(start, start + n)).items():
            if group == "labels" and not labels or "." in group and not tokens:
                continue
            np.save(d / f"{group}.npy", arr)
            files[group] = ArrayInfo(f"{d.name}/{group}.npy", tuple(arr.shape), str(arr.dtype))
        shards.append(ShardInfo(index=s, rows=n, row_start=start, files=files))
        start += n
    all_rows = np.arange(start)
    split = split_of(all_rows)
    rows = {"total": start, **{name: int((split == code).sum()) for name, code in SPLIT_CODES.items()}}
    manifest = Manifest(
        fingerprint="test" + str(shard_rows), config={"hash_seed": 0}, config_sources={}, role="train",
        sources=(), columns=_columns(labels, tokens), shards=tuple(shards), rows=rows,
        folds={"n_splits": K_FOLDS, "mode": "random", "key": "", "sizes": []},
        label_rates={"label": {"train": 0.33}} if labels else {}, bad_rows={}, fitted={})
    write_manifest(out, manifest)
    return out
