"""The fast paths of the Parquet build (polars slices of the file, the compiled token / hash-index kernels)
write exactly the caches of the polars + numpy path, for any chunk size and row-group layout."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import npy_bytes, parquet_cfg
from raw_inputs import write_parquet

from ctrpipe.native import native_built
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.manifest import read_manifest


def _build(tmp_path: Path, name: str, src: Path, monkeypatch: pytest.MonkeyPatch, native_on: bool,
           *overrides: str) -> dict[str, bytes]:
    monkeypatch.setenv("CTRPIPE_NATIVE", "1" if native_on else "0")
    build_shards(parquet_cfg(*overrides), [src], tmp_path / name, progress=False)
    return npy_bytes(tmp_path / name)


@pytest.mark.skipif(not native_built(), reason="the optional compiled kernels are not built")
def test_kernel_and_polars_paths_write_the_same_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_parquet(tmp_path / "p.parquet", 300)
    # many small row groups: chunks start and end inside them
    table = pq.read_table(src)
    pq.write_table(table, tmp_path / "rg.parquet", row_group_size=23)
    want = _build(tmp_path, "slow", src, monkeypatch, False)
    assert any(k.startswith("fitted/covisit") for k in want) and any(k.endswith("seq.tokens.npy") for k in want)
    for name, path, chunk in (("fast", src, 1000), ("fast7", src, 7), ("fast_rg", tmp_path / "rg.parquet", 50)):
        got = _build(tmp_path, name, path, monkeypatch, True, f"data.chunk_rows={chunk}")
        assert got.keys() == want.keys()
        assert [k for k in want if got[k] != want[k]] == []


@pytest.mark.skipif(not native_built(), reason="the optional compiled kernels are not built")
def test_bad_weights_are_skipped_alike_on_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_parquet(tmp_path / "p.parquet", 120)
    table = pq.read_table(src)
    tags_w = table.column("tags_w").to_pylist()
    tags_w[5], tags_w[77] = "t1:0.5|t2", "t3:1e-2|t4: 2"       # a missing weight; odd but valid weights
    bad = pa.array(tags_w, pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("tags_w"), "tags_w", bad), src)
    want = _build(tmp_path, "slow", src, monkeypatch, False, "data.bad_rows=skip")
    got = _build(tmp_path, "fast", src, monkeypatch, True, "data.bad_rows=skip", "data.chunk_rows=16")
    assert [k for k in want if got[k] != want[k]] == [] and got.keys() == want.keys()
    assert read_manifest(tmp_path / "fast").bad_rows["skipped"] == 1        # row 5; row 77 parses


def test_threads_do_not_change_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctrpipe.shard.passes as passes

    src = write_parquet(tmp_path / "p.parquet", 200)
    want = _build(tmp_path, "threads", src, monkeypatch, native_built(), "data.chunk_rows=30")
    monkeypatch.setattr(passes, "FIT_THREADS", 1)
    monkeypatch.setattr(passes, "TRANSFORM_AHEAD", 1)
    got = _build(tmp_path, "one", src, monkeypatch, native_built(), "data.chunk_rows=30")
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


def test_fit_pass_reads_the_id_only_when_it_is_the_split_key(tmp_path: Path) -> None:
    from ctrpipe.shard.passes import fit_columns, resolve_plan

    src = write_parquet(tmp_path / "p.parquet", 100)
    plain = fit_columns(resolve_plan(parquet_cfg().data, [src]))
    assert plain.id is None and [t.column for t in plain.multihot] == []      # bad_rows=error: no row skipped
    assert [t.column for t in plain.sequence] == ["seq"]                             # covisit context
    skip = fit_columns(resolve_plan(parquet_cfg("data.bad_rows=skip").data, [src]))
    assert [t.column for t in skip.multihot] == ["tags_w"]        # its weights decide which rows are skipped
    assert skip.id == "ID"                                        # and so does a missing ID
    by_id = parquet_cfg("data.split.mode=group", "data.split.key=ID", "data.split.val_ratio=0.3")
    assert fit_columns(resolve_plan(by_id.data, [src])).id == "ID"
    m = build_shards(by_id, [src], tmp_path / "c", progress=False).manifest
    assert 0 < m.rows["val"] < 100 and m.rows["train"] + m.rows["val"] == 100


def test_a_bad_weight_unread_by_the_fit_pass_still_stops_the_build(tmp_path: Path) -> None:
    from ctrpipe.errors import InputFormatError

    src = write_parquet(tmp_path / "p.parquet", 60)
    table = pq.read_table(src)
    tags_w = table.column("tags_w").to_pylist()
    tags_w[41] = "t1:0.5|t2"                                   # no weight: with bad_rows=error, an error
    col = table.schema.get_field_index("tags_w")
    pq.write_table(table.set_column(col, "tags_w", pa.array(tags_w, pa.string())), src)
    with pytest.raises(InputFormatError) as err:
        build_shards(parquet_cfg("data.chunk_rows=16"), [src], tmp_path / "c", progress=False)
    assert "tags_w" in str(err.value) and "row 41" in str(err.value)


def test_parquet_path_is_read_literally(tmp_path: Path) -> None:
    from ctrpipe.data.reader import iter_raw_chunks

    folder = tmp_path / "day=3"                       # a hive-style folder name adds no column
    folder.mkdir()
    src = write_parquet(folder / "part[1].parquet", 40)   # '[' is not a glob
    cfg = parquet_cfg().data
    frames = [c.frame for c in iter_raw_chunks(cfg, [src], 15)]
    assert sum(f.height for f in frames) == 40 and max(f.height for f in frames) <= 15
    assert "day" not in frames[0].columns


@pytest.mark.parametrize("values", [["TRAIN_0000001", "TRAIN_0000002"], ["a", "", "abc", None, "zz"], ["", None],
                                    ["a\x00", "b"], ["x\x00y", "q"], ["ü", "a"], ["\x7f~", " "]])
def test_string_ids_equal_numpy_of_the_python_strings(tmp_path: Path, values: list[str | None]) -> None:
    import numpy as np
    import polars as pl

    from ctrpipe.shard.passes import resolve_plan
    from ctrpipe.shard.transform import id_array

    plan = resolve_plan(parquet_cfg().data, [write_parquet(tmp_path / "p.parquet", 4)])
    frame = pl.DataFrame({"ID": pl.Series(values, dtype=pl.String)})
    frame = pl.concat([frame.slice(0, 1), frame.slice(1)], rechunk=False)          # two chunks
    want = np.asarray(frame["ID"].fill_null("").to_numpy(), dtype=np.str_)
    got = id_array(frame, plan, np.arange(len(values)))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_rows_skipped_for_a_missing_id_count_nowhere(tmp_path: Path) -> None:
    """With bad_rows=skip the fit pass did not read the ID, so rows the write pass skipped for a missing ID
    were counted in the statistics (vocabularies, medians, co-visitation) and shifted every later row's split:
    the cache must equal the one built from the file without those rows."""
    src = write_parquet(tmp_path / "p.parquet", 300)
    table = pq.read_table(src)
    dropped = [3, 40, 41, 150]
    ids = [None if i in dropped else v for i, v in enumerate(table.column("ID").to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("ID"), "ID", pa.array(ids, pa.string())),
                   tmp_path / "nulls.parquet")
    pq.write_table(table.filter(pa.array([i not in dropped for i in range(300)])), tmp_path / "clean.parquet")
    cfg = parquet_cfg("data.bad_rows=skip", "data.chunk_rows=64")
    build_shards(cfg, [tmp_path / "nulls.parquet"], tmp_path / "a", progress=False)
    build_shards(cfg, [tmp_path / "clean.parquet"], tmp_path / "b", progress=False)
    a, b = npy_bytes(tmp_path / "a"), npy_bytes(tmp_path / "b")
    assert read_manifest(tmp_path / "a").bad_rows["skipped"] == 4
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
