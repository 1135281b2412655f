"""The readers on real Criteo rows (../shared/data/criteo), including two real-world malformed variants."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import polars as pl
import pytest
from reader_helpers import SHARED_CRITEO, reference_frame

from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig
from ctrpipe.data.hashing import field_seed, hash_ids
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.errors import InputFormatError

pytestmark = pytest.mark.skipif(not SHARED_CRITEO.is_dir(), reason="../shared/data/criteo is absent")
CFG = DataConfig()


def _read(path: Path, rows: int, cfg: DataConfig = CFG, **kw: object) -> tuple[pl.DataFrame, list]:
    chunks = list(iter_raw_chunks(cfg, [path], rows, **kw))
    return pl.concat([c.frame for c in chunks]), [b for c in chunks for b in c.bad_rows]


def test_train_sample_matches_reference_for_any_chunking() -> None:
    path = SHARED_CRITEO / "train_sample.tsv"
    want = reference_frame(path)
    assert want.height == 6626
    for rows in (997, 6626, 100_000):
        got, bad = _read(path, rows)
        assert not bad and got.equals(want)
    assert 0.2 < float(want["label"].mean()) < 0.27          # README: positive rate 0.235
    ids = hash_ids(want["C1"], field_seed("C1", 0), 1_000_000)
    assert (ids[want["C1"].is_null().to_numpy()] == 0).all() and ids.max() < 1_000_000


def test_test_sample_has_39_fields() -> None:
    path = SHARED_CRITEO / "test_sample.tsv"
    got, _ = _read(path, 500, require_labels=False)
    assert got.height == 1999 and got.columns == [*CRITEO_INT, *CRITEO_CAT]
    with pytest.raises(InputFormatError, match="--test"):
        _read(path, 500)


def test_stripped_trailing_fields_error_then_skip() -> None:
    path = SHARED_CRITEO / "variants" / "trailing_empty_fields_stripped.tsv"
    lines = path.read_text().splitlines()
    short = [i + 1 for i, ln in enumerate(lines) if ln.count("\t") + 1 != 40]
    assert short
    with pytest.raises(InputFormatError) as err:
        _read(path, 200)
    msg = str(err.value)
    assert f"{path}, line {short[0]}:" in msg and "expected 40" in msg and "stripped" in msg
    got, bad = _read(path, 200, bad_rows="skip")
    assert [b.line for b in bad] == short and {b.reason for b in bad} == {"field count"}
    assert got.height == len(lines) - len(short)


def test_header_csv_with_float_integers() -> None:
    path = SHARED_CRITEO / "variants" / "header_csv_floats.csv"
    with pytest.raises(InputFormatError) as err:
        _read(path, 100, cfg=dataclasses.replace(CFG, separator=","))
    msg = str(err.value)
    assert f"{path}, line 1: the first line looks like a header" in msg and "remove the header line" in msg
    with pytest.raises(InputFormatError) as err:                   # default tab separator: hint at ','
        _read(path, 100)
    assert "data.separator=','" in str(err.value)


def test_header_csv_without_header_parses(tmp_path: Path) -> None:
    src = SHARED_CRITEO / "variants" / "header_csv_floats.csv"
    body = tmp_path / "body.csv"
    body.write_text("".join(src.read_text().splitlines(keepends=True)[1:]))
    got, bad = _read(body, 64, cfg=dataclasses.replace(CFG, separator=","))
    assert got.height == 200 and not bad
    assert got["I3"][0] == 260.0 and got["C1"][0] == "05db9164"
