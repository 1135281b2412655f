"""Parquet reader: typed chunks independent of chunk size; schema and value errors name file, column, fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrpipe.config import load_config
from ctrpipe.data.config import DataConfig, TokenColumnConfig
from ctrpipe.data.parquet import row_group_slices
from ctrpipe.data.reader import iter_raw_chunks, resolve_inputs_columns
from ctrpipe.errors import InputFormatError, SchemaError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg() -> DataConfig:
    return load_config(REPO / "cfgs" / "parquet_example.yaml", []).data


def read_all(cfg: DataConfig, paths: list[Path], rows: int = 1000, **kw: object) -> pl.DataFrame:
    return pl.concat([c.frame for c in iter_raw_chunks(cfg, paths, rows, **kw)])


def rewrite(src: Path, dst: Path, **columns: pa.Array | None) -> Path:
    """Copy a Parquet file replacing (array) or dropping (None) columns."""
    table = pq.read_table(src)
    for name, arr in columns.items():
        i = table.schema.get_field_index(name)
        table = table.remove_column(i) if arr is None else table.set_column(i, name, arr)
    pq.write_table(table, dst, row_group_size=20)
    return dst


def test_columns_types_and_order(cfg: DataConfig, parquet_file: Path) -> None:
    rc = resolve_inputs_columns(cfg, [parquet_file])
    assert rc.numeric == ("feat_a_1", "feat_a_2", "history_a_1")           # pattern, file order
    assert rc.categorical[:6] == ("gender", "age_group", "inventory_id", "day_of_week", "hour", "item_id")
    assert rc.categorical[6:] == ("l_feat_1", "l_feat_2")
    frame = read_all(cfg, [parquet_file])
    assert frame.columns == rc.raw_columns()
    assert frame.schema["clicked"] == pl.Float32 and frame.schema["ID"] == pl.String
    assert frame.schema["feat_a_1"] == pl.Float64 and frame.schema["gender"] == pl.String
    assert frame.schema["seq"] == pl.String and frame.height == 64
    src = pq.read_table(parquet_file)
    assert frame["feat_a_2"].to_list() == src["feat_a_2"].to_pylist()
    assert frame["tags_w"].to_list() == src["tags_w"].to_pylist()


@pytest.mark.parametrize("rows", [1, 7, 20, 64, 1000])
def test_chunks_identical_for_any_chunk_rows(cfg: DataConfig, tmp_path: Path, parquet_file: Path,
                                             rows: int) -> None:
    small_groups = rewrite(parquet_file, tmp_path / "rg.parquet")            # row groups of 20
    want = read_all(cfg, [parquet_file])
    chunks = list(iter_raw_chunks(cfg, [small_groups], rows))
    assert all(c.frame.height <= rows for c in chunks)
    starts = np.cumsum([0] + [c.frame.height for c in chunks[:-1]])
    assert [c.first_line for c in chunks] == starts.tolist()                  # 0-based row in the file
    assert pl.concat([c.frame for c in chunks]).equals(want)


def test_chunks_end_at_row_group_boundaries() -> None:
    """Whole row groups per chunk while they fit (no page decompressed twice), a large one in equal parts."""
    assert list(row_group_slices([98_304] * 3 + [5_000], 100_000)) == [
        (0, 98_304), (98_304, 98_304), (196_608, 98_304), (294_912, 5_000)]
    assert list(row_group_slices([30, 30, 30, 30, 5], 70)) == [(0, 60), (60, 65)]
    assert list(row_group_slices([250, 10, 10], 100)) == [(0, 83), (83, 83), (166, 84), (250, 20)]
    assert list(row_group_slices([0, 40, 0], 10)) == [(0, 10), (10, 10), (20, 10), (30, 10)]
    assert list(row_group_slices([], 10)) == []


def test_several_files_in_order(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    b = rewrite(parquet_file, tmp_path / "b.parquet")
    frame = read_all(cfg, [parquet_file, b], 25)
    one = read_all(cfg, [parquet_file])
    assert frame.equals(pl.concat([one, one]))


def test_integer_categorical_hashes_as_text_and_list_tokens(cfg: DataConfig, tmp_path: Path,
                                                             parquet_file: Path) -> None:
    n = pq.read_metadata(parquet_file).num_rows
    seq = pa.array([[1, 2, 3], [], None] + [[7]] * (n - 3), pa.list_(pa.int64()))
    gender = pa.array([1, None] + [2] * (n - 2), pa.int32())
    path = rewrite(parquet_file, tmp_path / "ints.parquet", gender=gender, seq=seq)
    frame = read_all(cfg, [path])
    assert frame["gender"].to_list()[:3] == ["1", None, "2"]
    assert frame["seq"].to_list()[:4] == ["1,2,3", "", None, "7"]


def test_list_elements_holding_the_separator_name_row(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    """Lists are joined with the separator and split again: 'Books, Fiction' became two tokens, silently."""
    n = pq.read_metadata(parquet_file).num_rows
    seq = pa.array([["a", "b"], [], None, ["Books, Fiction", "Toys"]] + [["c"]] * (n - 4), pa.list_(pa.string()))
    path = rewrite(parquet_file, tmp_path / "lists.parquet", seq=seq)
    with pytest.raises(SchemaError) as err:
        read_all(cfg, [path])
    assert f"{path}, row 3, column seq" in str(err.value) and "holds the separator ','" in str(err.value)
    ok = rewrite(parquet_file, tmp_path / "ok.parquet", seq=pa.array([["a", "b"]] * n, pa.list_(pa.string())))
    assert read_all(cfg, [ok])["seq"].to_list()[0] == "a,b"


def test_unlabelled_file(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    path = rewrite(parquet_file, tmp_path / "test.parquet", clicked=None, converted=None)
    chunks = list(iter_raw_chunks(cfg, [path], 30, require_labels=False))
    assert not any(c.has_labels for c in chunks) and "clicked" not in chunks[0].frame.columns
    with pytest.raises(SchemaError) as err:
        list(iter_raw_chunks(cfg, [path], 30))
    msg = str(err.value)
    assert str(path) in msg and "label column 'clicked'" in msg and "--test" in msg


@pytest.mark.parametrize("placeholder", [pa.nulls, lambda n: pa.array([None] * n, pa.float64())])
def test_a_test_files_empty_label_columns_are_no_labels(cfg: DataConfig, tmp_path: Path, parquet_file: Path,
                                                         placeholder) -> None:  # noqa: ANN001
    """A test file with label columns that hold no value (null type, or all null): its rows were bad labels,
    and the fix offered (--bad-rows skip) then refused a build with every row skipped."""
    n = pq.read_metadata(parquet_file).num_rows
    path = rewrite(parquet_file, tmp_path / "t.parquet", clicked=placeholder(n), converted=placeholder(n))
    chunks = list(iter_raw_chunks(cfg, [path], 30, require_labels=False))
    assert not any(c.has_labels for c in chunks) and sum(c.frame.height for c in chunks) == n
    with pytest.raises(InputFormatError, match="the label is missing"):          # a training file: labels needed
        list(iter_raw_chunks(cfg, [path], 30))
    # some labels missing: the test file's fix is to drop them, not to skip rows (which the submission lacks)
    some = pq.read_table(parquet_file)["clicked"].to_pylist()
    some[3] = None
    partly = rewrite(parquet_file, tmp_path / "p.parquet", clicked=pa.array(some))
    with pytest.raises(InputFormatError) as err:
        list(iter_raw_chunks(cfg, [partly], 30, require_labels=False))
    assert "drop the label columns" in str(err.value) and "--bad-rows" not in str(err.value)
    with pytest.raises(InputFormatError, match="--bad-rows skip"):
        list(iter_raw_chunks(cfg, [partly], 30))


# ------------------------------------------------------------------------------------------ errors

def test_missing_column_names_closest(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    table = pq.read_table(parquet_file).rename_columns(
        [("inventory_ids" if c == "inventory_id" else c) for c in pq.read_schema(parquet_file).names])
    path = tmp_path / "renamed.parquet"
    pq.write_table(table, path)
    for paths in ([path], [parquet_file, path]):          # first file (resolve) or a later file (reader)
        with pytest.raises(SchemaError) as err:
            read_all(cfg, paths)
        msg = str(err.value)
        assert str(path) in msg and "'inventory_id'" in msg and "did you mean 'inventory_ids'" in msg


def test_wrong_types(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    n = pq.read_metadata(parquet_file).num_rows
    import datetime

    cases = {
        "clicked": (pa.array(["yes"] * n), "label column has type string", "0/1 integers"),
        "gender": (pa.array([0.5] * n), "categorical column has type double", "cast floats"),
        "feat_a_1": (pa.array([[1.0]] * n), "numeric column has type list<element: double>", "to a number"),
        "tags": (pa.array([1.5] * n), "token column has type double", "separated string"),
        # the fix fits what the column holds: no "cast floats" for a date or a list
        "age_group": (pa.array([datetime.date(2024, 1, 31)] * n), "categorical column has type date32",
                       "cast it to text (e.g. '2024-01-31')"),
        "day_of_week": (pa.array([["a", "b"]] * n), "categorical column has type list<",
                   "under data.multihot"),
        # no "list it under data.categorical" for a timestamp (categorical refuses it too), no "cast floats"
        # for bytes, no "a list column" for a list view, no "corrupt file" for a decimal polars cannot read
        "feat_a_2": (pa.array([datetime.datetime(2024, 1, 31)] * n, pa.timestamp("us", tz="UTC")),
                     "numeric column has type timestamp", "cast it to a number (e.g. seconds since 1970)"),
        "inventory_id": (pa.array([b"ab"] * n, pa.binary()), "categorical column has type binary",
                         "decode it to text"),
        "seq": (pa.ListViewArray.from_arrays(pa.array(np.arange(n, dtype=np.int32)),
                                             pa.array(np.ones(n, dtype=np.int32)), pa.array(["a"] * n)),
                "token column has type list_view", "cast it to a plain list"),
        "history_a_1": (pa.array([1] * n, pa.decimal256(50, 0)), "numeric column has type decimal256(50, 0)",
                        "precision 38 or less"),
    }
    for col, (arr, what, fix) in cases.items():
        path = rewrite(parquet_file, tmp_path / f"{col}.parquet", **{col: arr})
        with pytest.raises(SchemaError) as err:
            read_all(cfg, [path])
        msg = str(err.value)
        assert f"{path}, column {col}: {what}" in msg and ", expected" in msg and fix in msg.split("fix:")[1]
        assert "data.categorical" not in msg.split("fix:")[1] or col != "feat_a_2"


def test_duplicate_column_names_are_named(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    """polars refuses a file with two columns of one name: it read as "corrupt or truncated" (an unused
    column), or a KeyError traceback (a used one)."""
    table = pq.read_table(parquet_file)
    for col in ("gender", "unused"):
        path = tmp_path / f"dup_{col}.parquet"
        extra = table["gender"] if col == "gender" else table["clicked"]
        t = table.append_column(col, extra)
        if col == "unused":
            t = t.append_column(col, extra)
        pq.write_table(t, path)
        with pytest.raises(SchemaError) as err:
            read_all(cfg, [path])
        msg = str(err.value)
        assert f"{path}: the file has 2 columns named {col!r}" in msg and "its own name" in msg


def test_uint64_and_dictionary_ids(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    """An id above int64's range failed in a strict cast (a polars traceback); dictionary-encoded text ids
    (pandas' category) were refused though every other kind takes dictionaries."""
    n = pq.read_metadata(parquet_file).num_rows
    small = rewrite(parquet_file, tmp_path / "u.parquet", ID=pa.array(np.arange(n, dtype=np.uint64)))
    assert read_all(cfg, [small])["ID"].to_list() == list(range(n))
    ids = np.arange(n, dtype=np.uint64)
    ids[5] = np.uint64(2**63)
    big = rewrite(parquet_file, tmp_path / "big.parquet", ID=pa.array(ids))
    with pytest.raises(SchemaError) as err:
        read_all(cfg, [big])
    assert f"{big}, row 5, column ID" in str(err.value) and "as text" in str(err.value)
    text = [f"r{i}" for i in range(n)]
    cat = rewrite(parquet_file, tmp_path / "cat.parquet", ID=pa.array(text).dictionary_encode())
    assert read_all(cfg, [cat])["ID"].to_list() == text


def test_integer_lists_with_a_separator_their_text_holds(cfg: DataConfig, tmp_path: Path,
                                                         parquet_file: Path) -> None:
    """[-1, 2] joined with '-' and split again was the tokens '1' and '2': -1 became 1, silently."""
    n = pq.read_metadata(parquet_file).num_rows
    path = rewrite(parquet_file, tmp_path / "neg.parquet", seq=pa.array([[3, 2]] * 4 + [[-1, 2]] * (n - 4)))
    dash = dataclasses.replace(cfg, sequence=tuple(dataclasses.replace(t, separator="-") for t in cfg.sequence))
    with pytest.raises(SchemaError) as err:
        read_all(dash, [path])
    assert f"{path}, row 4, column seq" in str(err.value) and "holds the separator '-'" in str(err.value)
    assert read_all(cfg, [path])["seq"].to_list()[4] == "-1,2"        # ',' cannot occur in an integer


def test_numeric_text_column(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    n = pq.read_metadata(parquet_file).num_rows
    vals = [f"{i}.5" for i in range(n)]
    vals[1] = ""
    ok = rewrite(parquet_file, tmp_path / "ok.parquet", feat_a_1=pa.array(vals))
    got = read_all(cfg, [ok])["feat_a_1"].to_list()
    assert got[0] == 0.5 and got[1] is None and got[2] == 2.5
    vals[37] = "n/a"
    bad = rewrite(parquet_file, tmp_path / "bad.parquet", feat_a_1=pa.array(vals))
    with pytest.raises(SchemaError) as err:
        read_all(cfg, [bad], 16)
    msg = str(err.value)
    assert f"{bad}, row 37, column feat_a_1: numeric column stored as text holds 'n/a'" in msg
    chunks = list(iter_raw_chunks(cfg, [bad], 16, bad_rows="skip"))
    assert [(b.row, b.reason) for c in chunks for b in c.bad_rows] == [(37, "not a number")]
    assert sum(c.frame.height for c in chunks) == n - 1
    (holder,) = [c for c in chunks if c.line_numbers is not None]          # the chunk the bad row was in
    assert 37 not in holder.line_numbers.tolist() and {36, 38} & set(holder.line_numbers.tolist())


def test_bad_label_value(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    n = pq.read_metadata(parquet_file).num_rows
    y = [0] * n
    y[5], y[40] = 2, None
    path = rewrite(parquet_file, tmp_path / "y.parquet", converted=pa.array(y, pa.int8()))
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [path])
    assert f"{path}, row 5, column converted: label 2 is not 0 or 1" in str(err.value)
    chunks = list(iter_raw_chunks(cfg, [path], 1000, bad_rows="skip"))
    assert [(b.row, b.reason) for b in chunks[0].bad_rows] == [(5, "bad label"), (40, "bad label")]
    assert chunks[0].frame.height == n - 2
    y[5] = 0                        # a null label was "label None is not 0 or 1" (Python's None, not a value)
    path = rewrite(parquet_file, tmp_path / "y2.parquet", converted=pa.array(y, pa.int8()))
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [path])
    assert f"{path}, row 40, column converted: the label is missing" in str(err.value)


def test_missing_id_names_row(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    """A null ID was written into the submission as an empty ID, which blending then refused."""
    ids = pq.read_table(parquet_file)["ID"].to_pylist()
    ids[9] = None
    path = rewrite(parquet_file, tmp_path / "id.parquet", ID=pa.array(ids, pa.string()))
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [path])
    assert f"{path}, row 9, column ID: the ID is missing" in str(err.value)
    chunks = list(iter_raw_chunks(cfg, [path], 1000, bad_rows="skip"))
    assert [(b.row, b.reason) for b in chunks[0].bad_rows] == [(9, "missing ID")]
    assert chunks[0].frame.height == len(ids) - 1


def test_bad_weight_names_row(cfg: DataConfig, tmp_path: Path, parquet_file: Path) -> None:
    vals = pq.read_table(parquet_file)["tags_w"].to_pylist()
    vals[11] = "t1:0.5|t2:abc"
    path = rewrite(parquet_file, tmp_path / "w.parquet", tags_w=pa.array(vals))
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [path])
    msg = str(err.value)
    assert f"{path}, row 11, column tags_w" in msg and "'t2:abc'" in msg and "name:weight" in msg
    chunks = list(iter_raw_chunks(cfg, [path], 1000, bad_rows="skip"))
    assert [(b.row, b.reason) for b in chunks[0].bad_rows] == [(11, "bad weight")]


def test_not_a_parquet_file(cfg: DataConfig, tmp_path: Path, criteo_tsv: Path) -> None:
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [criteo_tsv])
    assert str(criteo_tsv) in str(err.value) and "--set data.format=criteo" in str(err.value)


def test_token_column_config_absent(cfg: DataConfig, parquet_file: Path) -> None:
    bad = dataclasses.replace(cfg, sequence=(TokenColumnConfig(column="sequence"),))
    with pytest.raises(SchemaError, match="did you mean 'seq'"):
        read_all(bad, [parquet_file])


def test_text_given_as_parquet_points_to_data_format(cfg: DataConfig, tmp_path: Path, criteo_tsv: Path) -> None:
    """The fix named a --format flag, which only synth has."""
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [criteo_tsv])
    assert "not a readable Parquet file" in str(err.value) and "--set data.format=criteo" in err.value.fix
    assert "--format" not in err.value.fix


def test_every_bad_weight_of_a_chunk_is_flagged_in_one_pass(cfg: DataConfig, tmp_path: Path,
                                                             parquet_file: Path) -> None:
    """Skipping bad weights re-read the whole column once per bad row (quadratic in them): every bad row is
    now found in one pass, each flagged once even where an earlier check already flagged it."""
    vals = pq.read_table(parquet_file)["tags_w"].to_pylist()
    for i in (3, 12, 13, 40):
        vals[i] = "t1:0.5|t2:abc" if i != 13 else ":1|t3:inf"
    path = rewrite(parquet_file, tmp_path / "w.parquet", tags_w=pa.array(vals))
    with pytest.raises(InputFormatError) as err:
        read_all(cfg, [path])
    assert f"{path}, row 3, column tags_w" in str(err.value) and "'t2:abc'" in str(err.value)
    labels = pq.read_table(parquet_file)["clicked"].to_pylist()
    labels[12] = None                                       # row 12 is bad twice: flagged once, for its label
    path = rewrite(parquet_file, tmp_path / "wl.parquet", tags_w=pa.array(vals), clicked=pa.array(labels))
    chunks = list(iter_raw_chunks(cfg, [path], 1000, bad_rows="skip"))
    assert sorted((b.row, b.column) for b in chunks[0].bad_rows) == [
        (3, "tags_w"), (12, "clicked"), (13, "tags_w"), (40, "tags_w")]
    assert chunks[0].frame.height == len(vals) - 4


def test_a_missing_column_is_not_told_to_be_another_configured_one() -> None:
    """A helper's sweep: data.numeric.columns [x1, x2] on a file without x2 asked "did you mean 'x1'?"."""
    from ctrpipe.data.schema import _check_exists

    with pytest.raises(SchemaError) as err:
        _check_exists(["x1", "x2"], ["ID", "clicked", "x1", "x_2"], "data.numeric.columns", "f.parquet", False)
    assert "did you mean 'x_2'" in err.value.fix
    with pytest.raises(SchemaError) as err:
        _check_exists(["x1", "x2"], ["ID", "clicked", "x1"], "data.numeric.columns", "f.parquet", False)
    assert "'x1'?" not in err.value.fix and "existing columns include" in err.value.fix
