"""Shared id spaces (data.sequence[].share_ids_with): the candidate item and the history items get the same id
for the same raw value, in hash and vocab mode, in a train cache and in a test cache built from its statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrpipe.data.config import TokenColumnConfig
from ctrpipe.errors import ConfigError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.shard.transform import check_separator
from tests.cli_helpers import run_cli, sets
from tests.shard.helpers import PARQUET_CFG, load_all, parquet_cfg

# a rare item seen once as a candidate and once in a history: 2 occurrences together, 1 in either column
RARE = "rare_item"


def _write(path: Path, rows: int, seed: int, rare: bool) -> Path:
    """A Parquet log whose `seq` histories and `item_id` candidates draw from one item vocabulary."""
    rng = np.random.default_rng(seed)
    items = [f"i{k}" for k in range(30)]
    seq, cand = [], []
    for r in range(rows):
        hist = [items[int(k)] for k in rng.integers(0, 30, int(rng.integers(0, 9)))]
        item = None if r % 17 == 0 else items[int(rng.integers(0, 30))]
        if rare and r == 3:
            hist.append(RARE)
        if rare and r == 5:
            item = RARE
        seq.append(",".join(hist))
        cand.append(item)
    table = pa.table({
        "ID": [f"r{r}" for r in range(rows)],
        "clicked": pa.array((rng.random(rows) < 0.3).astype(np.int8)),
        "converted": pa.array(np.zeros(rows, np.int8)),
        "inventory_id": [f"inv{int(k)}" for k in rng.integers(0, 5, rows)],
        "item_id": pa.array(cand, pa.string()),
        "feat_a_1": rng.random(rows),
        "seq": seq,
        "tags": ["" for _ in range(rows)],
    })
    pq.write_table(table, path)
    return path


def _overrides(mode: str) -> list[str]:
    return ["data.categorical.columns=[inventory_id, item_id]", "data.categorical.pattern=''",
            f"data.categorical.mode={mode}", "data.multihot=[{column: tags, separator: '|', max_len: 4}]",
            "data.split.val_ratio=0", "data.folds.n_splits=0", "data.shard_rows=50", "data.chunk_rows=37",
            "data.covisit=[{target: inventory_id, context: seq}]", "data.hash_bins=1000"]


def _id_maps(cache: Path, data_file: Path) -> tuple[dict[str, int], dict[str, int]]:
    """raw value -> id, once from the item_id column and once from the seq tokens (asserting one id each)."""
    arrays = load_all(cache)
    m = read_manifest(cache)
    cand_ids = arrays["categorical"][:, m.column("item_id").index]
    tok, ln = arrays["seq.tokens"], arrays["seq.len"]
    t = pq.read_table(data_file).to_pydict()
    cand: dict[str, int] = {}
    hist: dict[str, int] = {}
    for r, (item, s) in enumerate(zip(t["item_id"], t["seq"], strict=True)):
        if item is not None:
            assert cand.setdefault(item, int(cand_ids[r])) == int(cand_ids[r])
        toks = s.split(",")[-tok.shape[1]:] if s else []
        assert int(ln[r]) == len(toks)
        for j, v in enumerate(toks):                  # left-aligned, most recent last
            assert hist.setdefault(v, int(tok[r, j])) == int(tok[r, j])
        assert not tok[r, len(toks):].any()
    return cand, hist


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_candidate_and_history_ids_agree_in_train_and_test_caches(tmp_path: Path, mode: str) -> None:
    train = _write(tmp_path / "train.parquet", 200, 0, rare=True)
    test = _write(tmp_path / "test.parquet", 80, 1, rare=False)
    s = sets(_overrides(mode))
    run_cli("shard", "--cfg", str(PARQUET_CFG), "--input", str(train), "--out", str(tmp_path / "tr"), "-q", *s)
    run_cli("shard", "--cfg", str(PARQUET_CFG), "--input", str(test), "--out", str(tmp_path / "te"), "--test",
            "--stats-from", str(tmp_path / "tr"), "-q", *s)
    for cache, data in ((tmp_path / "tr", train), (tmp_path / "te", test)):
        cand, hist = _id_maps(cache, data)
        common = set(cand) & set(hist)
        assert len(common) >= 25
        assert all(cand[v] == hist[v] for v in common)
        assert len({cand[v] for v in common}) > 20             # real ids, not everything OOV
        m = read_manifest(cache)
        item, seq = m.column("item_id"), m.column("seq")
        assert item.id_space == seq.id_space == "item_id" and item.bins == seq.bins
        assert m.column("inventory_id").id_space == "" and m.column("tags").id_space == ""
        spec = m.feature_spec()
        assert spec.sequence[0].id_space == "item_id" and spec.sequence[0].bins == item.bins
        assert max(cand.values()) < item.bins and max(hist.values()) < item.bins
    tr = read_manifest(tmp_path / "tr")
    if mode == "vocab":
        # one vocabulary over both columns: 30 items + the rare one, counted together (min_count 2 reaches it)
        assert tr.column("item_id").bins == 2 + 31
        cand, hist = _id_maps(tmp_path / "tr", train)
        assert cand[RARE] == hist[RARE] > 1
        assert "vocab of item_id" in tr.column("seq").transform
    else:
        assert tr.column("item_id").bins == 1000
    assert tr.schema_fingerprint() == read_manifest(tmp_path / "te").schema_fingerprint()


def test_shared_space_is_in_the_schema_fingerprint(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.parquet", 60, 0, rare=False)
    fps = []
    for share in ("item_id", ""):
        cfg = parquet_cfg(*_overrides("hash"),
                          f"data.sequence=[{{column: seq, separator: ',', max_len: 50, share_ids_with: '{share}'}}]")
        fps.append(build_shards(cfg, [train], tmp_path / f"c{share}", progress=False).manifest.schema_fingerprint())
    assert fps[0] != fps[1]


@pytest.mark.parametrize(("seq", "where", "fix"), [
    ("{column: seq, separator: ',', share_ids_with: itemid}", "data.sequence[0].share_ids_with",
     "['inventory_id', 'item_id']"),
    ("{column: seq, separator: ',', share_ids_with: feat_a_1}", "data.sequence[0].share_ids_with",
     "add 'feat_a_1' to data.categorical.columns"),
    ("{column: seq, separator: ',', bins: 500, share_ids_with: item_id}", "data.sequence[0].bins",
     "remove bins"),
])
def test_bad_share_ids_with_names_the_key_and_the_fix(tmp_path: Path, seq: str, where: str, fix: str) -> None:
    train = _write(tmp_path / "train.parquet", 40, 0, rare=False)
    cfg = parquet_cfg(*_overrides("hash"), f"data.sequence=[{seq}]")
    with pytest.raises(ConfigError) as err:
        build_shards(cfg, [train], tmp_path / "c", progress=False)
    msg = str(err.value)
    assert where in msg and fix in msg and "fix:" in msg
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_multihot_can_share_too_and_bins_may_repeat_the_shared_size(tmp_path: Path) -> None:
    train = _write(tmp_path / "train.parquet", 60, 0, rare=False)
    cfg = parquet_cfg(*_overrides("hash"), "data.categorical.bins={item_id: 777}",
                      "data.multihot=[{column: seq, separator: ',', max_len: 8, bins: 777, share_ids_with: item_id}]",
                      "data.sequence=[]", "data.covisit=[]")
    m = build_shards(cfg, [train], tmp_path / "c", progress=False).manifest
    assert m.column("seq").kind == "multihot" and m.column("seq").bins == 777 == m.column("item_id").bins
    assert m.column("seq").id_space == "item_id"


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_a_separator_that_splits_nothing_is_refused(tmp_path: Path, mode: str) -> None:
    """The default '|' on comma-separated histories made every history one token, silently (all OOV in
    vocab mode; ids that never matched the candidate's)."""
    train = _write(tmp_path / "t.parquet", 200, 0, rare=False)
    keys = [k for k in _overrides(mode) if not k.startswith("data.covisit")]
    cfg = parquet_cfg(*keys, "data.sequence=[{column: seq, max_len: 8, share_ids_with: item_id}]")
    with pytest.raises(ConfigError, match="contain ',' and not the separator '|'") as e:
        build_shards(cfg, [train], tmp_path / "c", progress=False)
    assert "separator: ','" in e.value.fix and "'seq'" in e.value.what and e.value.where == str(train)
    ok = parquet_cfg(*keys, "data.sequence=[{column: seq, separator: ',', max_len: 8, share_ids_with: item_id}]")
    assert build_shards(ok, [train], tmp_path / "ok", progress=False).manifest.total_rows == 200


@pytest.mark.parametrize(("values", "separator", "refused"), [
    (["1 2 3"] * 40, ",", "contain ' ' and not the separator ','"),
    (["1|2|3"] * 39 + ["1,2"], ",", "contain '|'"),            # one stray row switched the check off
    (["1|2|3", "4,5,6"] * 20, ",", "contain '|'"),             # two separators in one column
    (["a, b, c"] * 40, ",", "followed by a space"),            # tokens kept the space: ' b' != 'b'
    (["new york|paris", "los angeles"] * 20, "|", None),       # multi-word tokens, half the rows single
    (["video games"] * 38 + ["video games|board games"] * 2, "|", None),    # a review: multi-word single tags
    (["Paris, France"] * 10 + ["Paris, France|Rome, Italy"] * 30, "|", None),   # commas inside tokens
    (["a;b"] * 10 + ["c|d"] * 30, "|", None),
    # a second review: most histories one item, the rest split by another character (each a single token)
    (["17"] * 24 + ["3,9,27", "5,8"] * 8, "|", "contain ','"),
    (["17"] * 24 + ["3 9 27", "5 8"] * 8, "|", "contain ' '"),
    (["Paris, France"] * 24 + ["Paris, France|Rome, Italy"] * 16, "|", None),   # commas inside, most single
    (["rhythm and blues", "drum and bass", "rock n roll"] * 14, "|", None),   # 3-word single tags
    (["1,2", "3"] * 20, ",", None),
    (["a, b, c"] * 40, ", ", None),
])
def test_token_columns_split_by_another_character_are_refused(tmp_path: Path, values: list[str], separator: str,
                                                             refused: str | None) -> None:
    """A helper's sweep: space-separated histories, histories with one stray comma row among '|' rows, mixed
    separators and 'a, b' lists split on ',' were each sharded silently (one token per row, or tokens keeping
    their space). Each is refused naming the file; genuine tokens with spaces are not."""
    tc = TokenColumnConfig(column="seq", separator=separator, max_len=8)
    if refused is None:
        check_separator(tc, pl.Series(values), "f.parquet")
        return
    with pytest.raises(ConfigError, match=refused) as e:
        check_separator(tc, pl.Series(values), "f.parquet")
    assert e.value.where == "f.parquet" and "set separator:" in e.value.fix
    train = _write(tmp_path / "t.parquet", 40, 0, rare=False)       # and from a build, naming its file
    table = pq.read_table(train)
    pq.write_table(table.set_column(table.schema.get_field_index("seq"), "seq", pa.array(values)), train)
    keys = [k for k in _overrides("hash") if not k.startswith("data.covisit")]
    cfg = parquet_cfg(*keys, f"data.sequence=[{{column: seq, separator: '{separator}', max_len: 8}}]")
    with pytest.raises(ConfigError, match=refused) as e:
        build_shards(cfg, [train], tmp_path / "c", progress=False)
    assert e.value.where == str(train)


def test_a_repeated_covisit_entry_is_refused(tmp_path: Path) -> None:
    """Two entries of one name wrote two numeric columns of one name."""
    train = _write(tmp_path / "t.parquet", 40, 0, rare=False)
    cv = "{target: inventory_id, context: seq}"
    cfg = parquet_cfg(*_overrides("hash"), f"data.covisit=[{cv}, {cv}]",
                      "data.sequence=[{column: seq, separator: ',', max_len: 8}]")
    with pytest.raises(ConfigError, match="two co-visitation entries are named 'inventory_id_x_seq'") as e:
        build_shards(cfg, [train], tmp_path / "c", progress=False)
    assert e.value.where == "data.covisit[1]"
