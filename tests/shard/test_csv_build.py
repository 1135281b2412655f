"""Shard caches from CSV input: byte-identical whatever data.chunk_rows, missing values imputed / id 0,
positional ids over data rows (not lines), unlabelled test caches, bad rows through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.config import RunConfig, load_config
from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.inspect import run_inspect
from ctrpipe.shard.manifest import read_manifest
from tests.shard.helpers import load_all, npy_bytes

CFG = """
data:
  format: csv
  csv: {separator: ", ", missing: ["?"], comment_prefix: "#"}
  labels: [clicked]
  derived_labels: [{name: married, column: status, pattern: "^Married"}]
  numeric: {columns: [age, fee], impute: median, missing_indicator: true, standardize: true}
  categorical: {pattern: ".", mode: vocab}
  split: {mode: random, val_ratio: 0.2}
  folds: {n_splits: 3, mode: stratified, label: married}
  shard_rows: 16
"""
HEADER = "age, fee, city, note, status, clicked"


def write_rows(path: Path, n: int, seed: int = 0, labels: bool = True, head: str = "",
               multiline: bool = True) -> Path:
    """Rows with '?' in age (every 7th), fee (every 5th) and city; quoted cities hold ', ' or a line break."""
    rng = np.random.default_rng(seed)
    cities = ["Paris", '"New York, NY"', "?", "Rome", '"two\nlines"' if multiline else "Oslo"]
    lines = [head + (HEADER if labels else HEADER.rsplit(", ", 2)[0])]
    for i in range(n):
        age = "?" if i % 7 == 3 else str(int(rng.integers(18, 90)))
        fee = f"{rng.normal(100, 30):.2f}" if i % 5 else "?"
        fields = [age, fee, cities[int(rng.integers(0, 5))], f"n{int(rng.integers(0, 4))}"]
        if labels:
            fields += [str(rng.choice(["Married-civ", "Never", "Divorced"])), str(int(rng.integers(0, 2)))]
        lines.append(", ".join(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    p = tmp_path / "csv.yaml"
    p.write_text(CFG)
    return load_config(p, list(overrides), resolve_model=False)


def test_shards_byte_identical_for_any_chunk_rows(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 90, head="# exported by hand\n\n")
    gold = write_rows(tmp_path / "gold.csv", 30, seed=1)
    caches = {}
    for rows in (1, 7, 100_000):
        out = tmp_path / f"c{rows}"
        m = build_shards(cfg(tmp_path, f"data.chunk_rows={rows}"), [train], out, gold=[gold],
                         progress=False).manifest
        caches[rows] = (npy_bytes(out), m)
    (a, ma), (b, mb), (c, mc) = caches.values()
    assert a == b == c and len(a) > 10
    assert ma.fingerprint == mb.fingerprint == mc.fingerprint and ma.label_rates == mc.label_rates
    assert ma.rows["total"] == 120 and ma.rows["gold"] == 30 and len(ma.shards) == 8
    assert run_inspect(tmp_path / "c7")


def test_missing_values_imputed_and_id_zero(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 60, multiline=False)
    m = build_shards(cfg(tmp_path), [train], tmp_path / "c", progress=False).manifest
    a = load_all(tmp_path / "c")
    names = [c.name for c in m.columns_of("categorical")]
    assert names == ["city", "note"]                         # status is a label source, never a feature
    assert [c.name for c in m.columns_of("label")] == ["clicked", "married"]
    city = a["categorical"][:, names.index("city")]
    text = [ln.split(", ")[2] for ln in train.read_text().splitlines()[1:]]
    assert (city == 0).sum() == text.count("?") > 0           # '?' -> missing -> id 0
    num = [c.name for c in sorted(m.columns_of("numeric", "missing_indicator"), key=lambda c: c.index)]
    age_missing = a["numeric"][:, num.index("age_missing")]
    assert age_missing.sum() == sum(i % 7 == 3 for i in range(60))
    age = a["numeric"][:, num.index("age")]
    assert np.isfinite(age).all() and len(np.unique(age[age_missing == 1])) == 1     # one fill value
    assert m.column("age").stats["missing_rate"] > 0


def test_positional_ids_count_data_rows_and_skipped_rows(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 20, head="# a comment\n", multiline=False)
    lines = train.read_text().split("\n")
    lines[5] = "1, 2, 3"                                         # a bad row: data row 3 (0-based)
    train.write_text("\n".join(lines))
    c = cfg(tmp_path, "data.bad_rows=skip", "data.id_offset=1000", "data.folds.n_splits=0")
    m = build_shards(c, [train], tmp_path / "c", progress=False).manifest
    ids = load_all(tmp_path / "c")["ids"]
    assert m.bad_rows["skipped"] == 1 and m.bad_rows["examples"][0]["line"] == 6
    assert ids.tolist() == [1000 + i for i in range(20) if i != 3]


def test_tail_split_counts_rows_not_lines(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 50, head="# x\n# y\n")
    m = build_shards(cfg(tmp_path, "data.split.mode=tail", "data.split.val_ratio=0.2"), [train],
                     tmp_path / "c", progress=False).manifest
    split = load_all(tmp_path / "c")["split"]
    assert m.rows["val"] == 10 and split[-10:].tolist() == [1] * 10 and (split[:40] == 0).all()


def test_unlabelled_test_cache_reuses_train_statistics(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 60)
    test = write_rows(tmp_path / "test.csv", 25, seed=4, labels=False)
    tr = build_shards(cfg(tmp_path), [train], tmp_path / "tr", progress=False).manifest
    te = build_shards(cfg(tmp_path), [test], tmp_path / "te", role="test", stats_from=tmp_path / "tr",
                      progress=False).manifest
    a = load_all(tmp_path / "te")
    assert "labels" not in a and te.rows["test"] == 25 and not te.columns_of("label")
    assert te.schema_fingerprint() == tr.schema_fingerprint()
    assert a["ids"].tolist() == list(range(25))
    assert run_inspect(tmp_path / "te")


def test_cli_bad_rows_error_then_skip(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", 30, multiline=False)
    lines = train.read_text().split("\n")
    lines[4] = lines[4].replace("Never", "?").replace("Divorced", "?").replace("Married-civ", "?")
    train.write_text("\n".join(lines))
    p = tmp_path / "csv.yaml"
    p.write_text(CFG)
    args = ["shard", "--cfg", str(p), "--input", str(train), "--out", str(tmp_path / "c"), "--quiet"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert f"{train}, line 5, column status: the source of label" in res.output and "--bad-rows skip" in res.output
    res = runner.invoke(app, [*args, "--bad-rows", "skip"])
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "c")
    assert m.total_rows == 29 and m.bad_rows["skipped"] == 1
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["config"]["csv"]["separator"] == ", "
    res = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert res.exit_code == 0 and "csv: 1 file" in res.output and "matches '^Married'" in res.output


@pytest.mark.parametrize("change, key", [("data.csv.missing=[]", "data.csv.missing"),
                                         ("data.derived_labels=[]", "data.derived_labels")])
def test_changed_csv_settings_refuse_the_old_cache(tmp_path: Path, change: str, key: str) -> None:
    train = write_rows(tmp_path / "train.csv", 20)
    build_shards(cfg(tmp_path), [train], tmp_path / "c", progress=False)
    with pytest.raises(ManifestMismatchError, match=key):
        build_shards(cfg(tmp_path, change, "data.folds.n_splits=0"), [train], tmp_path / "c", progress=False)
