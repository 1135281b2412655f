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


def test_missing_fitted_statistics_fail(tmp_path: Path) -> None:
    import shutil

    src = write_parquet(tmp_path / "p.parquet", 80)
    build_shards(parquet_cfg("data.categorical.mode=vocab"), [src], tmp_path / "v", progress=False)
    assert run_inspect(tmp_path / "v")
    shutil.rmtree(tmp_path / "v" / "fitted")
    assert _failed(tmp_path / "v") == {"fitted"}
