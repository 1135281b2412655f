"""log1p modes, token columns -> padded ids, column resolution, and --input expansion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import xxhash

from ctrpipe.data.config import CategoricalConfig, DataConfig, DerivedLabelConfig, NumericConfig, TokenColumnConfig
from ctrpipe.data.hashing import hash_ids, xxh64_strings
from ctrpipe.data.schema import resolve_columns
from ctrpipe.data.sources import expand_inputs
from ctrpipe.data.transforms import log1p_transform, tokens_hashes, tokens_to_ids
from ctrpipe.errors import ConfigError, InputFormatError, SchemaError


def _id(tok: str, seed: int = 3, bins: int = 1000) -> int:
    return 1 + xxhash.xxh64_intdigest(tok.encode(), seed=seed) % (bins - 1)


# ------------------------------------------------------------------------------------------ log1p

def test_log1p_modes_with_negatives_and_nan() -> None:
    x = np.array([[-3.0, 0.0, 2.0, np.nan, 1e9]])
    signed = log1p_transform(x, "signed")
    assert signed.dtype == np.float32 and signed.shape == x.shape
    want = [-np.log1p(3), 0, np.log1p(2), np.log1p(1e9)]
    np.testing.assert_allclose(signed[0, [0, 1, 2, 4]], want, rtol=1e-6)
    assert np.isnan(signed[0, 3])
    np.testing.assert_allclose(log1p_transform(x, "clip")[0, [0, 1, 2]], [0, 0, np.log1p(2)], rtol=1e-6)
    none = log1p_transform(x, "none")
    assert none.dtype == np.float32 and none[0, 0] == -3.0
    assert np.all(np.diff(log1p_transform(np.array([-5.0, -1.0, 0.0, 1.0, 5.0]), "signed")) > 0)


# ------------------------------------------------------------------------------------------ tokens

def test_sequence_keeps_most_recent_left_aligned() -> None:
    s = pl.Series("seq", ["a|b|c|d", "x", None, "", "p||q|"])
    tokens, lengths, weights = tokens_to_ids(s, "|", 3, 3, 1000, False, "last")
    assert weights is None and tokens.dtype == np.int32 and lengths.dtype == np.int32
    assert lengths.tolist() == [3, 1, 0, 0, 2]
    assert tokens.tolist() == [[_id("b"), _id("c"), _id("d")], [_id("x"), 0, 0], [0, 0, 0], [0, 0, 0],
                               [_id("p"), _id("q"), 0]]


def test_multihot_keeps_first() -> None:
    tokens, lengths, _ = tokens_to_ids(pl.Series(["a|b|c|d"]), "|", 2, 3, 1000, False, "first")
    assert tokens.tolist() == [[_id("a"), _id("b")]] and lengths.tolist() == [2]


def test_token_ids_follow_categorical_convention() -> None:
    s = pl.Series(["u1,u2", "u3"])
    tokens, _, _ = tokens_to_ids(s, ",", 2, 11, 50, False, "last")
    assert tokens[0].tolist() == hash_ids(pl.Series(["u1", "u2"]), 11, 50).tolist()


def test_weighted_tokens() -> None:
    s = pl.Series("tags_w", ["a:0.5|b:2", None, "c:1e-3|d:-1|e:4", "x:y:3"])
    tokens, lengths, weights = tokens_to_ids(s, "|", 2, 3, 1000, True, "first")
    assert weights is not None and weights.dtype == np.float32
    assert tokens.tolist() == [[_id("a"), _id("b")], [0, 0], [_id("c"), _id("d")], [_id("x:y"), 0]]
    np.testing.assert_allclose(weights, [[0.5, 2], [0, 0], [1e-3, -1], [3, 0]])
    assert lengths.tolist() == [2, 0, 2, 1]


@pytest.mark.parametrize("value,reason", [("a:0.5|b:zz", "bad weight in token 'b:zz'"),
                                          ("a:0.5|b", "token 'b' has no ':weight'"),
                                          ("a:inf", "bad weight in token 'a:inf'"),
                                          (":1", "no name before ':'"),
                                          # (a review) stored as inf, with numpy's overflow warning
                                          ("a:1e40", "the weight of token 'a:1e40' is beyond float32")])
def test_bad_weight_names_column_and_value(value: str, reason: str) -> None:
    import warnings

    from ctrpipe.data.transforms import first_bad_weight

    with pytest.raises(InputFormatError) as err, warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens_to_ids(pl.Series("tags_w", ["a:1", value]), "|", 4, 0, 100, True, "first")
    msg = str(err.value)
    assert "column tags_w" in msg and reason in msg and repr(value) in msg and "name:weight" in msg
    with warnings.catch_warnings():                 # the readers' check, which names the line
        warnings.simplefilter("error")
        assert first_bad_weight(pl.Series("tags_w", ["a:1", value]), "|") == (1, err.value.what.split(": ", 1)[1]
                                                                               .rsplit(" in ", 1)[0])


def test_token_hashes_match_kept_tokens() -> None:
    s = pl.Series(["a|b|c", None, "d", "e:1|f:2"])
    flat, lengths = tokens_hashes(s, "|", "last", 2, 9)
    assert lengths.tolist() == [2, 0, 1, 2]
    assert flat.tolist() == xxh64_strings(pl.Series(["b", "c", "d", "e:1", "f:2"]), 9).tolist()
    flat_w, _ = tokens_hashes(s.slice(3, 1), "|", "first", 2, 9, weighted=True)
    assert flat_w.tolist() == xxh64_strings(pl.Series(["e", "f"]), 9).tolist()


# ------------------------------------------------------------------------------------------ columns

def test_resolve_criteo_columns() -> None:
    rc = resolve_columns(DataConfig(), None)
    assert rc.labels == ("label",) and len(rc.numeric) == 13 and len(rc.categorical) == 26 and rc.id is None
    assert rc.raw_columns()[:3] == ["label", "I1", "I2"]
    cfg = DataConfig(numeric=NumericConfig(columns=("I13",), pattern="^I[1-3]$"),
                     categorical=CategoricalConfig(columns=("C2", "C1")))
    rc = resolve_columns(cfg, None)
    assert rc.numeric == ("I13", "I1", "I2", "I3") and rc.categorical == ("C2", "C1")
    with pytest.raises(SchemaError) as err:
        resolve_columns(DataConfig(numeric=NumericConfig(columns=("I14",))), None)
    msg = str(err.value)
    assert "'I14'" in msg and "not a Criteo column" in msg and "did you mean" in msg


def test_resolve_parquet_columns_errors() -> None:
    schema = {"y": pl.Int8, "f_1": pl.Float64, "f_2": pl.Float64, "c": pl.String, "tags": pl.String}
    base = DataConfig(format="parquet", labels=("y",), numeric=NumericConfig(pattern="^f_"),
                      categorical=CategoricalConfig(columns=("c",)),
                      multihot=(TokenColumnConfig(column="tags"),))
    rc = resolve_columns(base, schema)
    assert rc.numeric == ("f_1", "f_2") and rc.raw_columns() == ["y", "f_1", "f_2", "c", "tags"]
    both = dataclasses.replace(base, categorical=CategoricalConfig(columns=("f_1",)))
    with pytest.raises(SchemaError, match="'f_1' is selected by both data.numeric and data.categorical"):
        resolve_columns(both, schema)
    with pytest.raises(SchemaError, match="matches no column"):
        resolve_columns(dataclasses.replace(base, numeric=NumericConfig(pattern="^zz")), schema)
    with pytest.raises(ConfigError, match="bad regex"):
        resolve_columns(dataclasses.replace(base, numeric=NumericConfig(pattern="([")), schema)
    with pytest.raises(ConfigError, match=r"bad regex '\^\(Married' for 'data.derived_labels\[m\].pattern': "
                                          r"unclosed group\n"):
        DerivedLabelConfig(name="m", column="s", pattern="^(Married")        # not the first line, "regex error:"
    wide = dataclasses.replace(base, numeric=NumericConfig(pattern="."), categorical=CategoricalConfig())
    assert resolve_columns(wide, schema).numeric == ("f_1", "f_2", "c")   # never labels or token columns


# ------------------------------------------------------------------------------------------ inputs

def test_expand_inputs(tmp_path: Path) -> None:
    d = tmp_path / "days"
    d.mkdir()
    for name in ("day_2.tsv", "day_10.tsv", "day_1.tsv", "part-1.parquet", "part-0.parquet"):
        (d / name).write_text("x\n")
    (d / ".hidden").write_text("x\n")
    assert [p.name for p in expand_inputs([d], "parquet")] == ["part-0.parquet", "part-1.parquet"]
    # numbers in names as numbers: as text, day_10 came before day_2, and a tail split (the last rows are the
    # newest) validated on older days than some it trained on (helper's shard sweep)
    assert [p.name for p in expand_inputs([str(d / "day_*.tsv")], "criteo")] == \
        ["day_1.tsv", "day_2.tsv", "day_10.tsv"]
    assert [p.name for p in expand_inputs([d], "criteo")] == \
        ["day_1.tsv", "day_2.tsv", "day_10.tsv", "part-0.parquet", "part-1.parquet"]
    one = d / "day_2.tsv"
    assert expand_inputs([one, d / "day_1.tsv"], "criteo") == [one, d / "day_1.tsv"]   # argument order kept
    with pytest.raises(InputFormatError, match="given twice"):
        expand_inputs([one, str(d / "day_*.tsv")], "criteo")
    with pytest.raises(InputFormatError) as err:
        expand_inputs([str(tmp_path / "nope_*.tsv")], "criteo")
    assert "nope_*.tsv" in str(err.value) and "matches no criteo file" in str(err.value)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputFormatError, match="holds no \\*.parquet files"):
        expand_inputs([empty_dir], "parquet")
    # a partitioned folder: its files are in subfolders, which a glob reads (the fix said nothing of them)
    (empty_dir / "day=1").mkdir()
    (empty_dir / "day=1" / "part-0.parquet").write_text("x\n")
    with pytest.raises(InputFormatError) as err:
        expand_inputs([empty_dir], "parquet")
    glob_ = str(empty_dir / "**" / "*.parquet")
    assert "of its own (its subfolders do)" in str(err.value) and f"--input '{glob_}'" in str(err.value)
    assert [p.name for p in expand_inputs([glob_], "parquet")] == ["part-0.parquet"]
    with pytest.raises(InputFormatError) as err:
        expand_inputs([tmp_path / "missing.tsv"], "criteo")
    assert f"{tmp_path / 'missing.tsv'}: input file not found" in str(err.value) and "fix:" in str(err.value)
    (d / "zero.tsv").write_bytes(b"")
    with pytest.raises(InputFormatError, match="zero.tsv: input file is empty"):
        expand_inputs([d / "zero.tsv"], "criteo")
