"""UCI Adult in ../shared/data/adult (skipped when absent), sharded raw with the shipped cfgs/adult.yaml: two
derived labels (income, married) with their UCI rates, the test file as a gold split, and the files as UCI
ships them (a comment first line in adult.test, a blank last line) giving the same shards at any chunk size."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctrpipe.config import load_config
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.inspect import run_inspect
from tests.shard.helpers import REPO, load_all, npy_bytes

DATA = REPO.parent / "shared" / "data" / "adult"
ADULT_CFG = REPO / "cfgs" / "adult.yaml"
pytestmark = pytest.mark.skipif(not (DATA / "uci_adult.data").is_file() or not (DATA / "uci_adult.test").is_file(),
                                reason="../shared/data/adult absent")


def test_adult_train_and_gold(tmp_path: Path) -> None:
    cfg = load_config(ADULT_CFG, [], resolve_model=False)
    m = build_shards(cfg, [DATA / "uci_adult.data"], tmp_path / "adult", gold=[DATA / "uci_adult.test"],
                     progress=False).manifest
    assert m.rows["total"] == 32_561 + 16_281 and m.rows["gold"] == 16_281 and m.bad_rows["skipped"] == 0
    assert abs(m.rows["val"] / 32_561 - 0.1) < 0.01
    assert m.label_names == ("income", "married")
    assert abs(m.label_rates["income"]["train"] - 0.24) < 0.01          # 7,841 of 32,561 earn >50K
    assert abs(m.label_rates["married"]["train"] - 0.47) < 0.01
    assert abs(m.label_rates["income"]["gold"] - 0.236) < 0.01           # '>50K.' counts as positive
    features = {c.name for c in m.columns_of("numeric", "categorical")}
    assert "income" not in features and "marital-status" not in features and len(features) == 13
    assert 0.05 < m.column("workclass").stats["missing_rate"] < 0.06      # '?' -> id 0
    assert run_inspect(tmp_path / "adult")


def test_adult_as_uci_ships_it_gives_the_same_shards(tmp_path: Path) -> None:
    data = tmp_path / "adult.data"
    test = tmp_path / "adult.test"
    data.write_bytes((DATA / "uci_adult.data").read_bytes().rstrip(b"\n") + b"\n\n")
    test.write_bytes(b"|1x3 Cross validator\n" + (DATA / "uci_adult.test").read_bytes())
    ref = load_config(ADULT_CFG, [], resolve_model=False)
    build_shards(ref, [DATA / "uci_adult.data"], tmp_path / "ref", gold=[DATA / "uci_adult.test"], progress=False)
    small = load_config(ADULT_CFG, ["data.chunk_rows=7000"], resolve_model=False)
    m = build_shards(small, [data], tmp_path / "uci", gold=[test], progress=False).manifest
    assert m.rows["gold"] == 16_281 and m.bad_rows["skipped"] == 0
    assert npy_bytes(tmp_path / "uci") == npy_bytes(tmp_path / "ref")
    ids = load_all(tmp_path / "uci")["ids"]
    assert ids[0] == 0 and ids[-1] == 32_561 + 16_281 - 1               # data rows, not lines


def test_adult_unlabelled_test_file_shards_with_the_train_statistics(tmp_path: Path) -> None:
    """adult.test without its income field (an unlabelled test file) keeps marital-status, the source of the
    derived `married` label: the shipped headerless config reads it as unlabelled test data."""
    cfg = load_config(ADULT_CFG, [], resolve_model=False)
    build_shards(cfg, [DATA / "uci_adult.data"], tmp_path / "train", progress=False)
    lines = (DATA / "uci_adult.test").read_text().splitlines()
    test = tmp_path / "adult_nolabel.csv"
    test.write_text("\n".join(ln.rsplit(", ", 1)[0] for ln in lines if ln.strip()) + "\n")
    m = build_shards(cfg, [test], tmp_path / "test", stats_from=tmp_path / "train", role="test",
                     progress=False).manifest
    assert m.rows["test"] == 16_281
    ref = build_shards(cfg, [DATA / "uci_adult.test"], tmp_path / "test_labelled", stats_from=tmp_path / "train",
                       role="test", progress=False).manifest
    assert ref.rows["test"] == 16_281
    got, want = load_all(tmp_path / "test"), load_all(tmp_path / "test_labelled")
    assert (got["categorical"] == want["categorical"]).all() and (got["numeric"] == want["numeric"]).all()
