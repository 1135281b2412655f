"""The one shard reader: the module docstring's example, bounded lazy maps, and one verdict per damaged file
(inspect records as a failure exactly what the loader raises, with the one rebuild fix)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from raw_inputs import write_parquet

from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.inspect import inspect_cache
from ctrpipe.shard.manifest import MANIFEST_NAME, read_manifest
from ctrpipe.shard.reader import ShardArrays, open_cache
from tests.shard.helpers import parquet_cfg


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    src = write_parquet(tmp_path / "p.parquet", 80)
    build_shards(parquet_cfg(), [src], tmp_path / "c", progress=False)
    return tmp_path / "c"


def test_docstring_example(cache: Path) -> None:
    c = open_cache(cache)
    m = c.manifest
    x = c.shard(0)["numeric"]
    assert x.shape == (m.shards[0].rows, len(m.columns_of("numeric", "missing_indicator", "covisit")))
    assert x.dtype == np.float32 and not x.flags.writeable
    split = c.concat("split")
    assert split.shape == (m.total_rows,) and split.dtype == np.int8
    rows = np.array([0, m.shards[0].rows, m.total_rows - 1])
    shard, local = c.locate(rows)
    assert shard.tolist() == [0, 1, len(m.shards) - 1]
    assert local.tolist() == [0, 0, m.shards[-1].rows - 1]
    np.testing.assert_array_equal(c.shard(int(shard[2]))["split"][local[2]], split[-1])


def test_take_gathers_ascending_rows_across_shards(cache: Path) -> None:
    c = open_cache(cache, groups=("ids", "numeric"))
    assert len(c.manifest.shards) > 1
    rows = np.array([1, 2, c.manifest.shards[0].rows, c.manifest.total_rows - 1])
    for group in ("ids", "numeric"):
        np.testing.assert_array_equal(c.take(group, rows), c.concat(group)[rows])
    assert c.take("ids", rows[:0]).shape == (0,)


def test_maps_are_lazy_bounded_and_shared_between_threads(cache: Path) -> None:
    arrays = ShardArrays(cache, read_manifest(cache), ("numeric", "split"), max_open=2)
    first = arrays.shard(0)
    assert arrays.shard(0) is first                       # cached while among the 2 most recent
    arrays.shard(1)
    arrays.shard(2)
    assert arrays.shard(0) is not first                   # dropped, mapped again
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(arrays.shard(3)["split"])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(np.array_equal(g, got[0]) for g in got)


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 10)
    elif how == "dtype":
        np.save(path, np.load(path).astype(np.float64))
    else:
        path.write_bytes(b"not an npy file at all" * 10)


@pytest.mark.parametrize(("how", "words"), [("truncate", "file is truncated"), ("dtype", "the manifest says"),
                                            ("garbage", "not a readable .npy file")])
def test_inspect_records_what_the_loader_raises(cache: Path, how: str, words: str) -> None:
    path = cache / "shard_00001" / "numeric.npy"
    _damage(path, how)
    _, checks, _ = inspect_cache(cache)                   # records the problem and goes on
    assert checks["files"].failures and checks["files"].done == sum(
        len(s.files) for s in read_manifest(cache).shards)
    [failure] = checks["files"].failures
    with pytest.raises(ManifestMismatchError) as err:
        ShardLoader(cache, RowView.train(), 8, shuffle=False, seed=0)
    assert words in err.value.what and err.value.where == str(path) and err.value.fix == REBUILD_CACHE_FIX
    assert failure == f"shard_00001/numeric.npy: {err.value.what}"
    with pytest.raises(ManifestMismatchError) as err2:
        open_cache(cache)
    assert err2.value.what == err.value.what


def test_a_file_damaged_after_opening_fails_when_mapped(cache: Path) -> None:
    c = open_cache(cache, groups=("ids",))
    path = cache / "shard_00002" / "ids.npy"
    _damage(path, "truncate")
    c.shard(0)
    with pytest.raises(ManifestMismatchError, match="truncated") as err:
        c.shard(2)
    assert err.value.where == str(path) and err.value.fix == REBUILD_CACHE_FIX


def test_an_unreadable_manifest_has_the_same_rebuild_fix(cache: Path) -> None:
    (cache / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestMismatchError) as err:
        open_cache(cache)
    assert err.value.fix == REBUILD_CACHE_FIX and "--force" in str(err.value)


def test_running_out_of_file_descriptors_is_not_blamed_on_the_cache(cache: Path) -> None:
    """EMFILE while reading a header or mapping said 'rebuild the cache'; the cache is fine."""
    import subprocess
    import sys

    code = ("import resource, tempfile\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "from pathlib import Path\n"
            "from ctrpipe.errors import ManifestMismatchError\n"
            "from ctrpipe.shard.manifest import read_manifest\n"
            "from ctrpipe.shard.reader import check_array\n"
            f"cache = Path({str(cache)!r})\n"
            "shard = read_manifest(cache).shards[0]\n"
            "held = []\n"
            "try:\n"
            "    while True:\n"
            "        held.append(tempfile.TemporaryFile())\n"
            "except OSError:\n"
            "    pass\n"
            "try:\n"
            "    check_array(cache, shard, 'numeric')\n"
            "except ManifestMismatchError as exc:\n"
            "    print(exc.what, '|', exc.fix)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "too many open files" in out.stdout and "ulimit -n" in out.stdout, out.stdout + out.stderr
