"""Tiny, deterministic raw inputs (a Criteo TSV with blanks and odd values, and a Parquet file with the synth
schema: multi-hot, weighted multi-hot, a sequence sharing the candidate item's ids, two labels).

Written by a small writer here rather than `ctrpipe synth`, so each file's quirks are visible in one place.
A module of its own (not conftest.py): test modules import it by name, and several test folders have a
conftest.py, so `from conftest import ...` would find whichever was imported first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_criteo_tsv(path: Path, rows: int, seed: int = 0, labels: bool = True) -> Path:
    """Criteo text: label, I1..I13 (ints, negatives, blanks, large), C1..C26 (hex8 strings, blanks)."""
    rng = np.random.default_rng(seed)
    lines = []
    for r in range(rows):
        fields = [str(int(rng.random() < 0.3))] if labels else []
        for i in range(13):
            u = rng.random()
            if u < 0.15:
                fields.append("")                                  # missing
            elif u < 0.2:
                fields.append(str(-int(rng.integers(1, 4))))       # Criteo I2 has small negatives
            elif u < 0.22:
                fields.append(str(int(rng.integers(10**6, 10**9))))
            else:
                fields.append(str(int(rng.geometric(0.2 + 0.05 * i))))
        for j in range(26):
            if rng.random() < 0.1:
                fields.append("")
            else:
                v = int(rng.zipf(1.5)) % (5 + 10 * j)
                fields.append(f"{(v * 2654435761 + j) & 0xFFFFFFFF:08x}")
        lines.append("\t".join(fields) + "\n")
        del r
    path.write_text("".join(lines))
    return path


def write_parquet(path: Path, rows: int, seed: int = 0, labels: bool = True) -> Path:
    """The synth Parquet schema in miniature."""
    rng = np.random.default_rng(seed)

    def cat(vocab: list[str], miss: float = 0.0) -> pa.Array:
        vals = [vocab[int(i)] for i in rng.integers(0, len(vocab), rows)]
        return pa.array([None if rng.random() < miss else v for v in vals], pa.string())

    def num(miss: float, scale: float, signed: bool = False) -> pa.Array:
        x = rng.exponential(scale, rows) * (rng.choice([-1, 1], rows) if signed else 1)
        return pa.array([None if rng.random() < miss else float(v) for v in x], pa.float64())

    def seq(vocab: int, max_len: int, sep: str, weighted: bool = False) -> pa.Array:
        out = []
        for _ in range(rows):
            n = int(rng.integers(0, max_len + 1))
            toks = [f"t{int(t)}" for t in rng.integers(0, vocab, n)]
            if weighted:
                toks = [f"{t}:{rng.random():.3f}" for t in toks]
            out.append(None if n == 0 and rng.random() < 0.5 else sep.join(toks))
        return pa.array(out, pa.string())

    cols: dict[str, pa.Array] = {"ID": pa.array([f"id{r:05d}" for r in range(rows)])}
    if labels:
        clicked = (rng.random(rows) < 0.3).astype(np.int8)
        cols["clicked"] = pa.array(clicked)
        cols["converted"] = pa.array((clicked * (rng.random(rows) < 0.4)).astype(np.int8))
    cols.update({
        "gender": cat(["1", "2", "3"], 0.05), "age_group": cat([str(i) for i in range(1, 9)]),
        "inventory_id": cat([f"inv{i}" for i in range(12)]),
        "day_of_week": cat([str(i) for i in range(1, 8)]),
        "hour": cat([f"{h:02d}" for h in range(24)]), "l_feat_1": cat([f"a{i}" for i in range(30)], 0.2),
        "l_feat_2": cat([f"b{i}" for i in range(5)]),
        "feat_a_1": num(0.1, 3.0), "feat_a_2": num(0.0, 100.0, signed=True), "history_a_1": num(0.3, 0.5),
        "seq": seq(40, 70, ","), "tags": seq(15, 5, "|"), "tags_w": seq(15, 4, "|", weighted=True),
    })
    # the candidate item, from the same tokens as seq (drawn last, so the columns above keep their values)
    cols["item_id"] = cat([f"t{i}" for i in range(40)], 0.05)
    pq.write_table(pa.table(cols), path)
    return path
