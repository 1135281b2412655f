"""`--workers N` / `--dask`: the write pass mapped over input files (main then gold) writes the cache of the
single-process build byte for byte -- shards that span files joined from per-file fragments, splits, folds
(stratified, plain, time), positional and unicode ids, co-visitation leave-one-out, skipped bad rows and the
manifest's tallies -- and resumes after kill -9 without rewriting the files that were finished."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raw_inputs import write_criteo_tsv, write_parquet

from ctrpipe.errors import ConfigError, InputFormatError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.parallel import WriteTask, write_partition
from tests.shard.helpers import CRITEO_CFG, CRITEO_FIT, cache_contents, criteo_cfg, parquet_cfg


def _spoil_lines(path: Path, at: list[int]) -> None:
    lines = path.read_text().splitlines(keepends=True)
    for i in at:
        lines[i] = "not\ta\tcriteo\tline\n"
    path.write_text("".join(lines))


def _same_for_1_2_3_workers(tmp_path: Path, name: str, cfg: object, parts: list[Path], gold: list[Path]) -> None:
    want = None
    for workers in (1, 2, 3):
        out = tmp_path / f"{name}{workers}"
        build_shards(cfg, parts, out, gold=gold, progress=False, workers=workers)     # type: ignore[arg-type]
        got = cache_contents(out)
        if want is None:
            want = got
            assert sum(k.endswith("/fold.npy") for k in got["npy"]) > 3  # type: ignore[union-attr]         # shards span several files
        else:
            assert got == want, f"{name}: --workers {workers} differs from one process"


def test_criteo_files_and_gold_give_the_same_cache(tmp_path: Path) -> None:
    # 16-row shards over files of 150, 90, 1, 3 and 210 rows: most shards span two or three files
    parts = [write_criteo_tsv(tmp_path / f"day_{i}.tsv", n, seed=i) for i, n in enumerate([150, 90, 1, 3, 210])]
    _spoil_lines(parts[0], [10, 11, 148])
    _spoil_lines(parts[3], [1])
    gold = [write_criteo_tsv(tmp_path / "gold.tsv", 40, seed=7)]
    skip = ("data.bad_rows=skip", "data.chunk_rows=37")
    # no statistics pass: stratified folds' class counts come from a scan of each file
    _same_for_1_2_3_workers(tmp_path, "hash", criteo_cfg(*skip), parts, gold)
    # vocabularies, mean imputation, standardisation; plain folds by row index
    _same_for_1_2_3_workers(tmp_path, "vocab", criteo_cfg(*skip, *CRITEO_FIT, "data.folds.mode=plain"), parts,
                            gold)
    # no statistics pass, no folds: starts are guessed from line counts, wrong after the skipped lines, and the
    # files after them are written again from their true start
    _same_for_1_2_3_workers(tmp_path, "guess", criteo_cfg(*skip, "data.folds.n_splits=0", "data.split.mode=tail",
                                                          "data.split.val_ratio=0.2"), parts, gold)


def test_test_role_with_stats_from_gives_the_same_cache(tmp_path: Path) -> None:
    # unlabelled test files: positional ids from id_offset, statistics loaded by the workers from the train cache
    cfg = criteo_cfg("data.categorical.mode=vocab", "data.numeric.impute=mean", "data.id_offset=1000")
    train = [write_criteo_tsv(tmp_path / f"day_{i}.tsv", 60, seed=i) for i in range(2)]
    build_shards(cfg, train, tmp_path / "train", progress=False)
    test = [write_criteo_tsv(tmp_path / f"test_{i}.tsv", n, seed=10 + i, labels=False)
            for i, n in enumerate([30, 7, 41])]
    for workers in (1, 2):
        build_shards(cfg, test, tmp_path / f"test{workers}", stats_from=tmp_path / "train", role="test",
                     progress=False, workers=workers)
    assert cache_contents(tmp_path / "test2") == cache_contents(tmp_path / "test1")


def _varied_ids(path: Path) -> Path:
    """String ids of 2..14 characters, so unicode widths differ from shard to shard."""
    t = pq.read_table(path)
    ids = [("x" * (r % 13)) + f"{r}" for r in range(t.num_rows)]
    pq.write_table(t.set_column(0, "ID", pa.array(ids)), path)
    return path


def _bad_labels(path: Path, rows: list[int]) -> Path:
    t = pq.read_table(path)
    clicked = t.column("clicked").to_pylist()
    for r in rows:
        clicked[r] = 2                  # not 0 or 1: a bad row, skipped
    pq.write_table(t.set_column(t.schema.get_field_index("clicked"), "clicked", pa.array(clicked, pa.int8())), path)
    return path


@pytest.mark.parametrize("folds", ["stratified", "time"])
def test_parquet_parts_and_gold_give_the_same_cache(tmp_path: Path, folds: str) -> None:
    # vocabularies shared with a sequence, co-visitation (leave-one-out on train rows), median imputation
    parts = [write_parquet(tmp_path / f"part-{i}.parquet", n, seed=i) for i, n in enumerate([80, 130, 5, 45])]
    _bad_labels(parts[0], [3, 40])
    _varied_ids(parts[1])
    gold = [write_parquet(tmp_path / "gold.parquet", 30, seed=9)]
    extra = ("data.folds.mode=time", "data.folds.time_key=feat_a_2", "data.folds.label=") if folds == "time" else ()
    cfg = parquet_cfg("data.chunk_rows=29", "data.bad_rows=skip", *extra)
    _same_for_1_2_3_workers(tmp_path, folds, cfg, parts, gold)
    m = json.loads((tmp_path / f"{folds}3" / "manifest.json").read_text())
    assert m["bad_rows"]["skipped"] == 2 and m["rows"]["gold"] == 30
    assert m["folds"]["mode"] == folds


def test_a_failing_write_worker_names_the_file_and_line(tmp_path: Path) -> None:
    # no statistics pass and no stratified folds: the write pass is the first to parse the files
    parts = [write_criteo_tsv(tmp_path / f"day_{i}.tsv", n, seed=i) for i, n in enumerate([50, 60, 70])]
    lines = parts[2].read_text().splitlines(keepends=True)
    lines[6] = "x\ty\n"
    parts[2].write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(InputFormatError) as err:
        build_shards(criteo_cfg("data.folds.n_splits=0"), parts, out, progress=False, workers=2)
    assert "day_2.tsv" in str(err.value) and "line 7" in str(err.value)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shard_*"))


def test_kill_9_in_the_write_pass_resumes_without_rewriting_finished_files(tmp_path: Path) -> None:
    # three small files, then a large one whose partition is still being written when the build is killed
    parts = [write_criteo_tsv(tmp_path / f"day_{i}.tsv", 2500, seed=i) for i in range(3)] + [tmp_path / "day_3.tsv"]
    parts[3].write_text(write_criteo_tsv(tmp_path / "seed.tsv", 4000, seed=9).read_text() * 40)
    sets = ["--set=data.shard_rows=1000", "--set=data.chunk_rows=2000"]

    def shard(dest: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", str(CRITEO_CFG), "--out", str(dest),
                "--workers", str(workers), *sets, "--input", *map(str, parts)]

    out = tmp_path / "out"
    proc = subprocess.Popen(shard(out, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list(out.glob(".incomplete-*/partitions/p0000[012]_*/result.json"))) < 3:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "no partition finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)             # the build and its worker processes
    proc.wait()
    assert not (out / "manifest.json").exists() and not list(out.glob("shard_*"))
    folders = [p for p in out.glob(".incomplete-*/partitions/*") if p.is_dir()]
    # a folder under a final name is complete; the killed worker's has a temporary name
    assert all((p / "result.json").is_file() for p in folders if re.fullmatch(r"p\d{5}_\d+_\d+_\w+", p.name))
    done = [p for p in folders if (p / "result.json").is_file()]
    written = {p.relative_to(p.parent.parent): (p.stat().st_ino, p.stat().st_mtime_ns)
               for d in done for p in d.glob("shard_*/*.npy")}
    assert written                                  # the small files held whole shards
    rerun = subprocess.run(shard(out, 2), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming: {len(done)} of 4 files already written" in rerun.stdout + rerun.stderr
    for rel, (ino, mtime) in written.items():      # moved into place, never rewritten
        st = (out / rel).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), rel
    one = subprocess.run(shard(tmp_path / "one", 1), capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    assert cache_contents(out) == cache_contents(tmp_path / "one")


def test_dask_local_cluster_writes_the_same_cache(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    parts = [write_criteo_tsv(tmp_path / f"day_{i}.tsv", n, seed=i) for i, n in enumerate([90, 60, 120])]
    gold = [write_criteo_tsv(tmp_path / "gold.tsv", 20, seed=5)]
    build_shards(criteo_cfg(), parts, tmp_path / "one", gold=gold, progress=False)
    build_shards(criteo_cfg(), parts, tmp_path / "dask", gold=gold, progress=False, workers=2, dask="local")
    assert cache_contents(tmp_path / "dask") == cache_contents(tmp_path / "one")


def test_a_write_worker_without_the_shard_directory_says_so(tmp_path: Path) -> None:
    part = write_criteo_tsv(tmp_path / "day_0.tsv", 20)
    task = WriteTask(0, part, False, 0, 0, {}, tmp_path / "elsewhere" / "partitions" / "p00000_0_0_0")
    with pytest.raises(ConfigError, match="does not see the shard directory"):
        write_partition(criteo_cfg().data, part, "train", None, None, False, None, task)


def test_a_file_whose_rows_are_all_skipped_builds(tmp_path: Path) -> None:
    """A chunk left with no rows after skipping bad ones adds nothing to the column tallies (it used to fail
    reshaping a zero-row array), in one process and on workers alike."""
    parts = [write_parquet(tmp_path / f"part-{i}.parquet", n, seed=i) for i, n in enumerate([60, 7, 40])]
    _bad_labels(parts[1], list(range(7)))
    cfg = parquet_cfg("data.chunk_rows=29", "data.bad_rows=skip")
    _same_for_1_2_3_workers(tmp_path, "allbad", cfg, parts, [])
    m = json.loads((tmp_path / "allbad1" / "manifest.json").read_text())
    assert m["bad_rows"]["skipped"] == 7 and m["rows"]["total"] == 100
