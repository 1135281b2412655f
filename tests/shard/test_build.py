"""`build_shards` end to end on real tiny files: every feature kind, hashing, splits, folds, determinism."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import xxhash
from raw_inputs import write_criteo_tsv, write_parquet

from ctrpipe.data.hashing import field_seed
from ctrpipe.errors import ConfigError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.manifest import read_manifest
from tests.shard.helpers import criteo_cfg, load_all, npy_bytes, parquet_cfg


def test_criteo_end_to_end(tmp_path: Path, criteo_tsv: Path) -> None:
    res = build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    m = res.manifest
    assert m.total_rows == 64 and [s.rows for s in m.shards] == [16, 16, 16, 16]
    a = load_all(tmp_path / "c")
    assert a["numeric"].shape == (64, 13) and a["numeric"].dtype == np.float32
    assert a["categorical"].shape == (64, 26) and a["categorical"].dtype == np.int32
    assert a["labels"].shape == (64, 1) and set(np.unique(a["labels"])) <= {0.0, 1.0}
    assert a["ids"].dtype == np.int64 and a["ids"].tolist() == list(range(64))
    # hashing follows the ids convention, pinned against python xxhash on the raw text
    raw = [line.split("\t") for line in criteo_tsv.read_text().splitlines()]
    for r in (0, 5, 63):
        for j in (0, 7, 25):
            v = raw[r][14 + j]
            h = xxhash.xxh64_intdigest(v.encode(), seed=field_seed(f"C{j + 1}", 0))
            want = 0 if v == "" else 1 + h % 999
            assert a["categorical"][r, j] == want
        # numeric: zero impute + signed log1p
        x = raw[r][1]
        want_x = 0.0 if x == "" else np.sign(float(x)) * np.log1p(abs(float(x)))
        assert a["numeric"][r, 0] == pytest.approx(want_x, rel=1e-6)
    assert m.column("C1").bins == 1000 and m.column("I1").kind == "numeric"
    assert 0 < m.column("I1").stats["missing_rate"] < 0.5
    assert sum(m.folds["sizes"]) == m.rows["train"] + m.rows["val"] == 64


def test_parquet_every_feature_kind(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "p.parquet", 200)
    res = build_shards(parquet_cfg(), [src], tmp_path / "c", progress=False)
    m = res.manifest
    a = load_all(tmp_path / "c")
    df = pl.read_parquet(src)
    split = a["split"]
    train = split == 0
    spec = m.feature_spec()
    assert spec.numeric == ("feat_a_1", "feat_a_2", "history_a_1", "feat_a_1_missing", "feat_a_2_missing",
                            "history_a_1_missing", "inventory_id_x_seq_max", "inventory_id_x_seq_mean")
    assert [f.name for f in spec.categorical] == ["gender", "age_group", "inventory_id", "day_of_week",
                                                  "hour", "item_id", "l_feat_1", "l_feat_2"]
    assert spec.labels == ("clicked", "converted") and a["labels"].shape == (200, 2)
    assert a["ids"].tolist() == df["ID"].to_list()
    # numeric: median impute (train split), signed log1p, standardised with train mean/std
    x = a["numeric"]
    raw = df["history_a_1"].to_numpy()
    miss = np.isnan(raw)
    assert (x[:, 5] == miss).all()                                   # history_a_1_missing
    obs = np.sort(raw[train & ~miss])
    fill = obs[(len(obs) + 1) // 2 - 1]
    assert m.fitted["numeric"]["history_a_1"]["fill"] == pytest.approx(fill, rel=1e-6)
    assert abs(x[train, 2].mean()) < 1e-3 and abs(x[train, 2].std() - 1) < 1e-3
    # covisit features are ratios in [0, 1]
    assert (x[:, 6:] >= 0).all() and (x[:, 6:] <= 1).all() and x[:, 6].max() > 0
    # vocab: ids by descending train frequency, 0 missing, 1 OOV (min_count=2)
    g = a["categorical"][:, 0]
    assert (g[df["gender"].is_null().to_numpy()] == 0).all()
    counts = df.filter(pl.Series(train))["l_feat_1"].drop_nulls().value_counts()
    top = counts.sort(["count", "l_feat_1"], descending=[True, False])["l_feat_1"][0]
    lf = a["categorical"][:, 6]
    assert (lf[(df["l_feat_1"] == top).fill_null(False).to_numpy()] == 2).all() or counts["count"].max() == 1
    rare = set(counts.filter(pl.col("count") < 2)["l_feat_1"].to_list())
    assert (lf[df["l_feat_1"].is_in(list(rare)).fill_null(False).to_numpy()] == 1).all()
    assert m.column("l_feat_1").bins == 2 + int((counts["count"] >= 2).sum())
    # tokens: (N, L) int32 with lengths; sequence keeps the most recent max_len tokens
    seq, seq_len = a["seq.tokens"], a["seq.len"]
    assert seq.shape == (200, 50) and seq.dtype == np.int32 and seq_len.max() <= 50
    assert ((seq > 0).sum(axis=1) == seq_len).all()
    long_row = int(np.flatnonzero(df["seq"].str.split(",").list.len().fill_null(0).to_numpy() > 50)[0])
    last = df["seq"][long_row].split(",")[-1]
    # seq shares item_id's vocabulary (share_ids_with): its last token has the id item_id gives that value
    item_ids = a["categorical"][:, 5][(df["item_id"] == last).fill_null(False).to_numpy()]
    assert len(item_ids) and (item_ids == seq[long_row, seq_len[long_row] - 1]).all()
    assert m.column("seq").bins == m.column("item_id").bins and m.column("seq").id_space == "item_id"
    assert a["tags_w.weights"].shape == (200, 8) and "tags.weights" not in a
    assert m.column("tags_w").weighted and m.column("seq").kind == "sequence"


def test_shards_identical_for_any_chunk_size(tmp_path: Path) -> None:
    tsv = write_criteo_tsv(tmp_path / "c.tsv", 100)
    pq = write_parquet(tmp_path / "p.parquet", 100)
    for name, src, cfg in (("criteo", tsv, criteo_cfg), ("parquet", pq, parquet_cfg)):
        build_shards(cfg("data.chunk_rows=7"), [src], tmp_path / f"{name}7", progress=False)
        build_shards(cfg("data.chunk_rows=1000"), [src], tmp_path / f"{name}1000", progress=False)
        a, b = npy_bytes(tmp_path / f"{name}7"), npy_bytes(tmp_path / f"{name}1000")
        assert a.keys() == b.keys() and len(a) > 10
        assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
        # chunk_rows is not part of the identity: the same cache is reused
        m7, m1000 = read_manifest(tmp_path / f"{name}7"), read_manifest(tmp_path / f"{name}1000")
        assert m7.fingerprint == m1000.fingerprint


@pytest.mark.parametrize("mode,key", [("random", ""), ("tail", ""), ("group", "l_feat_2")])
def test_split_modes_disjoint_and_covering(tmp_path: Path, mode: str, key: str) -> None:
    src = write_parquet(tmp_path / "p.parquet", 300)
    cfg = parquet_cfg(f"data.split.mode={mode}", f"data.split.key={key}", "data.split.val_ratio=0.3")
    m = build_shards(cfg, [src], tmp_path / "c", progress=False).manifest
    a = load_all(tmp_path / "c")
    split = a["split"]
    assert set(np.unique(split).tolist()) == {0, 1}
    assert m.rows["train"] + m.rows["val"] == m.rows["total"] == 300
    if mode == "tail":
        assert (split[:210] == 0).all() and (split[210:] == 1).all()
    if mode == "group":
        vals = pl.read_parquet(src)["l_feat_2"].to_numpy()
        assert not set(vals[split == 0]) & set(vals[split == 1])


@pytest.mark.parametrize("mode,key", [("plain", ""), ("stratified", ""), ("group", "hour")])
def test_fold_modes_cover_train_and_val(tmp_path: Path, mode: str, key: str) -> None:
    src = write_parquet(tmp_path / "p.parquet", 400)
    cfg = parquet_cfg(f"data.folds.mode={mode}", f"data.folds.key={key}", "data.folds.n_splits=4")
    m = build_shards(cfg, [src], tmp_path / "c", progress=False).manifest
    a = load_all(tmp_path / "c")
    fold = a["fold"]
    assert fold.min() >= 0 and set(np.unique(fold).tolist()) == {0, 1, 2, 3}
    assert m.folds["sizes"] == np.bincount(fold, minlength=4).tolist()
    if mode == "stratified":
        y = a["labels"][:, 0]
        rates = [y[fold == f].mean() for f in range(4)]
        assert max(rates) - min(rates) < 0.03
        pos = [int(y[fold == f].sum()) for f in range(4)]
        assert max(pos) - min(pos) <= 1
    if mode == "group":
        hours = pl.read_parquet(src)["hour"].to_numpy()
        for f in range(4):
            assert not set(hours[fold == f]) & set(hours[fold != f])


def test_gold_rows_are_split_2_and_never_fitted(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", 120, seed=1)
    gold_df = pl.read_parquet(write_parquet(tmp_path / "g0.parquet", 30, seed=2))
    gold_df = gold_df.with_columns(pl.lit("only_in_gold").alias("l_feat_2"))
    gold = tmp_path / "gold.parquet"
    gold_df.write_parquet(gold)
    m = build_shards(parquet_cfg(), [train], tmp_path / "c", gold=[gold], progress=False).manifest
    a = load_all(tmp_path / "c")
    assert (a["split"][120:] == 2).all() and (a["split"][:120] <= 1).all()
    assert (a["fold"][120:] == -1).all() and (a["fold"][:120] >= 0).all()
    assert m.rows["gold"] == 30 and m.gold_sources == 1
    lf2 = m.column("l_feat_2").index
    assert (a["categorical"][120:, lf2] == 1).all()        # a value seen only in gold rows is OOV
    with pytest.raises(ConfigError, match="given as --input and as --gold"):   # gold scored on training rows
        build_shards(parquet_cfg(), [train], tmp_path / "d", gold=[tmp_path / "." / "train.parquet"],
                     progress=False)
    assert "gold" in m.label_rates["clicked"]


def test_a_tail_split_counts_the_rows_of_gzip_text_whatever_its_suffix(tmp_path: Path, criteo_tsv: Path) -> None:
    """(a review) the row count a tail split cuts at found gzip by a lower-case .gz suffix, while the reader
    knows it by its magic bytes: a .GZ file's compressed bytes were counted, and val took far more rows."""
    upper = tmp_path / "TRAIN.TSV.GZ"
    with open(criteo_tsv, "rb") as src, gzip.open(upper, "wb") as dst:
        shutil.copyfileobj(src, dst)
    sets = ("data.split.mode=tail", "data.split.val_ratio=0.1")
    plain = build_shards(criteo_cfg(*sets), [criteo_tsv], tmp_path / "plain", progress=False).manifest
    packed = build_shards(criteo_cfg(*sets), [upper], tmp_path / "gz", progress=False).manifest
    assert packed.rows == plain.rows and plain.rows["val"] == round(0.1 * plain.rows["total"])
    # (a second review) a cut file ended in a bare "Aborted." there, where the reader names it
    cut = tmp_path / "CUT.TSV.GZ"
    cut.write_bytes(upper.read_bytes()[: upper.stat().st_size // 2])
    from ctrpipe.errors import InputFormatError

    with pytest.raises(InputFormatError, match="corrupt or truncated gzip data") as err:
        build_shards(criteo_cfg(*sets), [cut], tmp_path / "cut", progress=False)
    assert err.value.where == str(cut) and "gunzip -t" in err.value.fix


def test_gzip_input_gives_the_same_shards(tmp_path: Path, criteo_tsv: Path) -> None:
    gz = tmp_path / "train.tsv.gz"
    with open(criteo_tsv, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "plain", progress=False)
    build_shards(criteo_cfg(), [gz], tmp_path / "gz", progress=False)
    assert npy_bytes(tmp_path / "plain") == npy_bytes(tmp_path / "gz")


def test_multiple_inputs_keep_order(tmp_path: Path) -> None:
    a_ = write_criteo_tsv(tmp_path / "a.tsv", 20, seed=1)
    b_ = write_criteo_tsv(tmp_path / "b.tsv", 30, seed=2)
    both = tmp_path / "both.tsv"
    both.write_text(a_.read_text() + b_.read_text())
    build_shards(criteo_cfg(), [a_, b_], tmp_path / "two", progress=False)
    build_shards(criteo_cfg(), [both], tmp_path / "one", progress=False)
    assert npy_bytes(tmp_path / "two") == npy_bytes(tmp_path / "one")


@pytest.mark.parametrize("impute", ["zero", "mean", "median"])
def test_impute_modes_use_train_rows_only(tmp_path: Path, impute: str) -> None:
    src = write_parquet(tmp_path / "p.parquet", 120)
    cfg = parquet_cfg(f"data.numeric.impute={impute}", "data.numeric.standardize=false",
                      "data.numeric.log1p=none", "data.split.val_ratio=0.4")
    m = build_shards(cfg, [src], tmp_path / "c", progress=False).manifest
    a = load_all(tmp_path / "c")
    raw = pl.read_parquet(src)["feat_a_1"].to_numpy().astype(np.float32)
    miss = np.isnan(raw)
    obs = raw[(a["split"] == 0) & ~miss].astype(np.float64)
    want = {"zero": 0.0, "mean": obs.mean(), "median": np.sort(obs)[(len(obs) + 1) // 2 - 1]}[impute]
    assert m.fitted["numeric"].get("feat_a_1", {"fill": 0.0})["fill"] == pytest.approx(want, rel=1e-6)
    assert np.allclose(a["numeric"][miss, 0], want, rtol=1e-6)
    assert np.array_equal(a["numeric"][~miss, 0], raw[~miss])        # log1p=none keeps observed values


def test_covisit_with_a_categorical_context(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "p.parquet", 200)
    cfg = parquet_cfg("data.covisit=[{target: inventory_id, context: l_feat_2, name: inv_lf2}]")
    m = build_shards(cfg, [src], tmp_path / "c", progress=False).manifest
    a = load_all(tmp_path / "c")
    j = m.column("inv_lf2_max").index
    assert m.column("inv_lf2_mean").kind == "covisit"
    x = a["numeric"][:, j]
    df = pl.read_parquet(src)
    train = a["split"] == 0
    # one context token per row: max == mean == leave-one-out share of this target among the context's rows
    assert np.array_equal(x, a["numeric"][:, j + 1])
    r = int(np.flatnonzero(~train)[0])
    t, c = df["inventory_id"][r], df["l_feat_2"][r]
    tr = df.filter(pl.Series(train))
    n_c = int((tr["l_feat_2"] == c).sum())
    n_tc = int(((tr["l_feat_2"] == c) & (tr["inventory_id"] == t)).sum())
    assert x[r] == pytest.approx(n_tc / (n_c + 1.0), rel=1e-6)


def test_a_cache_another_process_is_building_is_refused(tmp_path: Path) -> None:
    """Two builds into one --out shared the work folder: one 'resumed' the other's running build and a
    manifest was left over a missing shard. The folder is locked while a build runs (here another open file
    description holds it, as another process would)."""
    from ctrpipe.atomic import folder_lock

    src = write_criteo_tsv(tmp_path / "train.tsv", 200)
    out = tmp_path / "cache"
    out.mkdir()
    with folder_lock(out, lambda: AssertionError("unexpected")), \
            pytest.raises(ConfigError, match="another `ctrpipe shard` is building into"):
        build_shards(criteo_cfg(), [src], out, progress=False)
    assert not list(out.iterdir())
    assert build_shards(criteo_cfg(), [src], out, progress=False).manifest.total_rows == 200


def test_a_later_input_with_an_extra_pattern_column_is_refused(tmp_path: Path) -> None:
    """A column a pattern picks in the second file but not in the first was left out without a word (the
    other order stopped the build on the missing column): both orders now stop, naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrpipe.errors import SchemaError

    a = write_parquet(tmp_path / "a.parquet", 200, seed=1)
    b = write_parquet(tmp_path / "b.parquet", 200, seed=2)
    table = pq.read_table(b)
    extra = tmp_path / "b_extra.parquet"
    pq.write_table(table.append_column("feat_a_9", pa.array(np.ones(200))), extra)
    build_shards(parquet_cfg(), [a, b], tmp_path / "same", progress=False)       # same columns: fine
    for order, name in (([a, extra], "first_a"), ([extra, a], "first_extra")):
        with pytest.raises(SchemaError) as exc:
            build_shards(parquet_cfg(), order, tmp_path / name, progress=False)
        assert "feat_a_9" in exc.value.render()
        assert not (tmp_path / name / "manifest.json").exists()
    with pytest.raises(SchemaError) as exc:
        build_shards(parquet_cfg(), [a, extra], tmp_path / "again", progress=False)
    assert exc.value.where == str(extra) and "data.numeric.pattern" in exc.value.render()
    with pytest.raises(SchemaError) as exc:                 # a gold input is checked alike
        build_shards(parquet_cfg(), [a], tmp_path / "gold", gold=[extra], progress=False)
    assert exc.value.where == str(extra)
