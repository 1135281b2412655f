"""`ctrpipe inspect`: a fresh cache passes; corrupted shards fail the matching check."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from raw_inputs import write_parquet

from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.inspect import inspect_cache, run_inspect
from ctrpipe.shard.manifest import read_manifest
from tests.shard.helpers import criteo_cfg, parquet_cfg


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    src = write_parquet(tmp_path / "p.parquet", 80)
    build_shards(parquet_cfg(), [src], tmp_path / "c", progress=False)
    return tmp_path / "c"


def _failed(cache: Path) -> set[str]:
    _, checks, _ = inspect_cache(cache)
    return {name for name, c in checks.items() if not c.ok}


def test_fresh_caches_pass(cache: Path, tmp_path: Path, criteo_tsv: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run_inspect(cache)
    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "crit", progress=False)
    capsys.readouterr()
    assert run_inspect(tmp_path / "crit")
    got = capsys.readouterr()
    # Criteo has no token columns: that check examined nothing, and says so (it read 'ok, 0 examined')
    assert re.search(r"tokens\s+\S\s+skipped", got.out + got.err), got.out + got.err
    # each passed check says what it counted: the per-column checks counted a column once per shard, and said
    # only '<n> examined' (shards for 'rows', columns times shards for 'numeric finite')
    n_shards = len(read_manifest(tmp_path / "crit").shards)
    said = got.out + got.err
    assert n_shards > 1 and f"13 columns in {n_shards} shards" in said, said
    assert re.search(rf"rows\s+\S\s+ok\s+\S\s+{n_shards} shards", said) and "1 cache" in said, said
    # label rates are counted apart from columns (a review: 'statistics ok, 50 columns' with 41 and 9 rates)
    assert re.search(r"statistics\s+\S\s+ok\s+\S\s+39 columns and \d label rates", said), said


def test_id_out_of_range_fails(cache: Path) -> None:
    path = cache / "shard_00001" / "categorical.npy"
    cat = np.load(path)
    bins = read_manifest(cache).column("inventory_id").bins
    assert read_manifest(cache).column("inventory_id").index == 2
    cat[3, 2] = bins + 5
    np.save(path, cat)
    assert _failed(cache) == {"categorical ids"}
    assert not run_inspect(cache)


def test_nan_numeric_and_bad_label_fail(cache: Path) -> None:
    x = np.load(cache / "shard_00000" / "numeric.npy")
    x[0, 1] = np.nan
    np.save(cache / "shard_00000" / "numeric.npy", x)
    y = np.load(cache / "shard_00002" / "labels.npy")
    y[1, 0] = 0.5
    np.save(cache / "shard_00002" / "labels.npy", y)
    assert _failed(cache) == {"numeric finite", "labels"}
    _, checks, _ = inspect_cache(cache)      # where: the shard and the cache row (a value named neither)
    row = read_manifest(cache).shards[2].row_start + 1
    assert checks["labels"].failures[0].endswith(f"in shard 2 (first at row {row:,} of the cache)")
    assert checks["numeric finite"].failures[0].endswith("in shard 0 (first at row 0 of the cache)")


def test_a_failed_inspect_prints_the_fix_and_whole_details(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It ended in 'some checks failed' with no fix, and cut the missing file's name at the terminal's edge."""
    (cache / "fitted" / "vocab.inventory_id.ids.npy").unlink()
    assert not run_inspect(cache)
    got = capsys.readouterr()
    out = " ".join((got.out + got.err).split())
    assert "fix: build it again" in out and "--force" in out
    assert "skipped" not in out             # this cache has every kind of column
    assert "vocab.inventory_id.ids.npy" in re.sub(r"[\s\u2502]", "", out)       # folded inside the table


def test_token_length_and_shape_fail(cache: Path) -> None:
    ln = np.load(cache / "shard_00000" / "seq.len.npy")
    ln[0] = 99
    np.save(cache / "shard_00000" / "seq.len.npy", ln)
    assert "tokens" in _failed(cache)
    np.save(cache / "shard_00001" / "fold.npy", np.zeros(3, dtype=np.int8))
    assert {"tokens", "files"} <= _failed(cache)


def test_split_counts_must_match(cache: Path) -> None:
    s = np.load(cache / "shard_00000" / "split.npy")
    s[:] = 1
    np.save(cache / "shard_00000" / "split.npy", s)
    assert "splits" in _failed(cache)


def test_missing_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError) as err:
        run_inspect(tmp_path)
    assert "manifest.json" in str(err.value) and "fix:" in str(err.value)


def test_data_changed_after_the_build_fails(cache: Path) -> None:
    """Overwritten or swapped shard data (same shape, readable) passed every check: the values are now held
    against the min/max/mean the build recorded; bytes appended to an .npy and a missing fitted/ fail too."""

    cat = np.load(cache / "shard_00001" / "categorical.npy")
    np.save(cache / "shard_00001" / "categorical.npy", np.zeros_like(cat))       # every id 'missing'
    assert _failed(cache) == {"statistics"}
    np.save(cache / "shard_00001" / "categorical.npy", cat)
    assert not _failed(cache)
    y = np.load(cache / "shard_00001" / "labels.npy")
    np.save(cache / "shard_00001" / "labels.npy", np.zeros_like(y))            # labels overwritten
    assert _failed(cache) == {"statistics"}
    np.save(cache / "shard_00001" / "labels.npy", y)
    with open(cache / "shard_00002" / "categorical.npy", "ab") as fh:
        fh.write(b"\0" * 100)
    # the unreadable file's rows are missing from every total: 'files' names it, the statistics were also
    # said to have changed after the build (helper's inspect sweep)
    assert _failed(cache) == {"files"}


def test_labels_moved_between_rows_after_the_build_fail_on_their_pair_rate(cache: Path) -> None:
    """(a review) the rate of both labels positive, which masked heads start from, was not checked: one label
    moved between rows of a split keeps every label's rate and changes only the pair's."""
    m = read_manifest(cache)
    assert set(m.label_pair_rates["clicked"]["converted"]) <= {"train", "val"}
    paths = [cache / s.files["labels"].file for s in m.shards]
    y = np.concatenate([np.load(p) for p in paths])
    split = np.concatenate([np.load(cache / s.files["split"].file) for s in m.shards])
    rows = np.flatnonzero(split == 0)
    moved = y.copy()
    moved[rows, 1] = np.roll(y[rows, 1], 1)          # each train row gets another train row's converted
    assert (moved[:, 1].sum(), (moved[:, 0] * moved[:, 1]).sum()) != (y[:, 1].sum(), (y[:, 0] * y[:, 1]).sum()) \
        and moved[:, 1].sum() == y[:, 1].sum()
    start = 0
    for p in paths:
        n = len(np.load(p))
        np.save(p, moved[start:start + n])
        start += n
    _, checks, _ = inspect_cache(cache)
    assert not checks["statistics"].ok and "clicked and converted: rate of both positive" in \
        " ".join(checks["statistics"].failures), checks["statistics"]


def test_missing_fitted_statistics_fail(tmp_path: Path) -> None:
    import shutil

    src = write_parquet(tmp_path / "p.parquet", 80)
    build_shards(parquet_cfg("data.categorical.mode=vocab"), [src], tmp_path / "v", progress=False)
    assert run_inspect(tmp_path / "v")
    shutil.rmtree(tmp_path / "v" / "fitted")
    assert _failed(tmp_path / "v") == {"fitted"}


def test_columns_a_model_can_learn_nothing_from_are_warned_of(tmp_path: Path) -> None:
    """An all-null categorical column built silently (an all-null numeric one is an error), and so did a
    column of one value, one whose every value was rarer than min_count, and a history column split by the
    wrong separator into nothing: each is said when the cache is built and by `inspect`; a healthy cache says
    nothing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from ctrpipe.cli import app
    from ctrpipe.shard.manifest import read_manifest
    from tests.shard.helpers import PARQUET_CFG

    n = 400
    rng = np.random.default_rng(0)
    table = {"ID": [f"r{i}" for i in range(n)], "clicked": pa.array(rng.random(n) < 0.3, pa.int8()),
             "never": pa.array([0] * n, pa.int8()),
             "x": rng.random(n), "flat": [2.5] * n, "flag": [1.0 if i % 2 else None for i in range(n)],
             "user": [f"u{i % 7}" for i in range(n)],
             "gone": pa.nulls(n, pa.string()), "same": ["a"] * n, "unique": [f"v{i}" for i in range(n)],
             "seq": pa.nulls(n, pa.string())}
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table(table), src)
    base = ["data.labels=[clicked]", "data.id_column=ID", "data.numeric.pattern=''", "data.categorical.pattern=''",
            "data.categorical.mode=vocab", "data.categorical.min_count=2", "data.multihot=[]", "data.covisit=[]",
            "data.sequence=[{column: seq, separator: ',', max_len: 5}]"]
    # 'flag' (one value or missing) varies in its missing indicator: a review's false alarm, not repeated
    sick = ["data.numeric.columns=[x, flat, flag]", "data.categorical.columns=[user, gone, same, unique]",
            "data.numeric.missing_indicator=true", "data.labels=[clicked, never]"]
    res = CliRunner().invoke(app, ["shard", "--cfg", str(PARQUET_CFG), "-i", str(src), "-o", str(tmp_path / "sick"),
                                   "-q", *[a for s in [*base, *sick] for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    problems = read_manifest(tmp_path / "sick").column_problems()
    expected = ["'gone' is missing in every row", "'same' has one id in every row (one value", "'unique' has one id "
                "in every row: every value is out of the vocabulary (seen fewer than data.categorical.min_count=2",
                "numeric column 'flat' holds one value in every row after its transform",
                "sequence column 'seq' is empty in every row: a sequence model reads no history",
                "label 'never' is 0 in every row: its head has one class"]
    assert len(problems) == len(expected) and all(any(e in p for p in problems) for e in expected), problems
    said = " ".join(res.output.split())
    assert said.count("warning") == len(expected) and all(e in said for e in expected), res.output
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "sick")])
    assert out.exit_code == 0 and all(e in " ".join(out.output.split()) for e in expected), out.output
    # training on it: the head of the constant label is said to be constant in train too, not short of rows
    res = CliRunner().invoke(app, ["train", "--cfg", str(PARQUET_CFG), "--shards", str(tmp_path / "sick"), "--runs",
                                   str(tmp_path / "runs"), "-q", "--set", "model.name=mmoe", "--set",
                                   "train.max_steps=2", "--set", "train.early_stopping.metric=logloss"])
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and "its label 'never' is 0 in every train row too" in said, res.output

    table["seq"] = [",".join(f"v{j}" for j in range(i % 4)) for i in range(n)]
    pq.write_table(pa.table(table), src)
    fine = ["data.numeric.columns=[x]", "data.categorical.columns=[user]"]
    res = CliRunner().invoke(app, ["shard", "--cfg", str(PARQUET_CFG), "-i", str(src), "-o", str(tmp_path / "fine"),
                                   "-q", *[a for s in [*base, *fine] for a in ("--set", s)]])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    assert read_manifest(tmp_path / "fine").column_problems() == []
