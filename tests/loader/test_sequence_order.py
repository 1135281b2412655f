"""The token layout `Batch` documents, checked through the real pipeline (Parquet -> shard -> ShardLoader):
sequences are left-aligned with the most recent token last and 0s on the right, and a history longer than
max_len keeps its most recent max_len tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ctrpipe.config import load_config
from ctrpipe.data.hashing import field_seed
from ctrpipe.data.splits import SPLIT_CODES
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.build import build_shards

REPO = Path(__file__).resolve().parents[2]
MAX_LEN, BINS = 5, 1000
HISTORIES = ["a,b,c", "", "a,b,c,d,e,f,g", "x", "p,q,r,s,t", None, "a,,b"]


def _id(token: str) -> int:
    return 1 + xxhash.xxh64_intdigest(token.encode(), seed=field_seed("seq", 0)) % (BINS - 1)


def test_sequence_tokens_come_out_left_aligned_most_recent_last(tmp_path: Path) -> None:
    rows = len(HISTORIES) * 3
    hist = [HISTORIES[r % len(HISTORIES)] for r in range(rows)]
    pq.write_table(pa.table({"clicked": pa.array(np.arange(rows) % 2, pa.int8()),
                             "item": [f"i{r % 4}" for r in range(rows)],
                             "seq": pa.array(hist, pa.string())}), tmp_path / "t.parquet")
    cfg = load_config(REPO / "cfgs" / "parquet_example.yaml", [
        "data.labels=[clicked]", "data.id_column=''", "data.numeric.pattern=''", "data.categorical.columns=[item]",
        "data.categorical.pattern=''", "data.categorical.mode=hash", "data.multihot=[]", "data.covisit=[]",
        f"data.sequence=[{{column: seq, separator: ',', max_len: {MAX_LEN}}}]", f"data.hash_bins={BINS}",
        "data.folds.n_splits=0", "data.shard_rows=4"])
    build_shards(cfg, [tmp_path / "t.parquet"], tmp_path / "c", progress=False)
    loader = ShardLoader(tmp_path / "c", RowView(tuple(SPLIT_CODES)), 5, shuffle=False, seed=0)
    seen, by_row = 0, {}
    for batch in loader:
        tokens, lengths = batch.sequence[0].numpy(), batch.sequence_len[0].numpy()
        assert tokens.shape[1] == MAX_LEN
        for b, r in enumerate(batch.row_index.numpy().tolist()):
            kept = [t for t in (hist[r] or "").split(",") if t][-MAX_LEN:]     # the most recent MAX_LEN
            want = [_id(t) for t in kept] + [0] * (MAX_LEN - len(kept))
            assert tokens[b].tolist() == want, (hist[r], tokens[b])
            assert int(lengths[b]) == len(kept)
            by_row[r] = (tokens[b].tolist(), int(lengths[b]))
            seen += 1
    assert seen == rows
    # the documented examples: a,b,c with max_len 5 -> [a, b, c, 0, 0], len 3; a..g -> [c, d, e, f, g], len 5
    assert by_row[0] == ([_id("a"), _id("b"), _id("c"), 0, 0], 3)
    assert by_row[2] == ([_id(t) for t in "cdefg"], 5)
    assert by_row[1] == ([0] * 5, 0)
