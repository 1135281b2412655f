"""The real Criteo rows in ../shared/data/criteo (skipped when absent): train, test with --stats-from, and the
malformed 'trailing empty fields stripped' variant (an error naming the line, or skipped and counted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctrpipe.errors import InputFormatError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.inspect import run_inspect
from tests.shard.helpers import REPO, criteo_cfg, load_all

DATA = REPO.parent / "shared" / "data" / "criteo"
pytestmark = pytest.mark.skipif(not (DATA / "train_sample.tsv").is_file(), reason="../shared/data absent")


def test_train_then_test_sample(tmp_path: Path) -> None:
    tr = build_shards(criteo_cfg("data.shard_rows=2048"), [DATA / "train_sample.tsv"], tmp_path / "train",
                      progress=False).manifest
    assert tr.total_rows == 6626 and tr.bad_rows["skipped"] == 0
    assert abs(tr.label_rates["label"]["train"] - 0.235) < 0.01
    assert 0.4 < tr.column("I1").stats["missing_rate"] < 0.5            # README: I1 is 44% missing
    assert run_inspect(tmp_path / "train")
    cfg = criteo_cfg("data.shard_rows=2048", "data.id_offset=60000000")
    te = build_shards(cfg, [DATA / "test_sample.tsv"], tmp_path / "test", role="test",
                      stats_from=tmp_path / "train", progress=False).manifest
    a = load_all(tmp_path / "test")
    assert te.rows["test"] == 1999 and "labels" not in a
    assert a["ids"][0] == 60_000_000 and a["ids"][-1] == 60_000_000 + 1998
    assert te.schema_fingerprint() == tr.schema_fingerprint()
    assert run_inspect(tmp_path / "test")


def test_stripped_trailing_fields_error_names_the_line(tmp_path: Path) -> None:
    src = DATA / "variants" / "trailing_empty_fields_stripped.tsv"
    with pytest.raises(InputFormatError) as err:
        build_shards(criteo_cfg(), [src], tmp_path / "c", progress=False)
    msg = str(err.value)
    assert "trailing_empty_fields_stripped.tsv, line" in msg and "--bad-rows skip" in msg
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_stripped_trailing_fields_skipped_and_counted(tmp_path: Path) -> None:
    src = DATA / "variants" / "trailing_empty_fields_stripped.tsv"
    m = build_shards(criteo_cfg("data.bad_rows=skip"), [src], tmp_path / "c", progress=False).manifest
    lines = len(src.read_text().splitlines())
    assert m.total_rows + m.bad_rows["skipped"] == lines and m.bad_rows["skipped"] > 0
    ex = m.bad_rows["examples"][0]
    assert ex["file"].endswith("trailing_empty_fields_stripped.tsv") and ex["line"] >= 1
    a = load_all(tmp_path / "c")
    # positional ids keep counting skipped lines, so ids are the 0-based line positions of kept rows
    assert len(np.unique(a["ids"])) == m.total_rows and a["ids"].max() < lines
    assert run_inspect(tmp_path / "c")
