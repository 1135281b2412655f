"""`--workers N`: the statistics pass mapped over input files on worker processes writes the cache of the
single-process build byte for byte (Criteo text over several files, Parquet part files, skipped bad rows,
tail splits), names the failing file and line, and resumes after kill -9 without refitting finished files."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raw_inputs import write_criteo_tsv, write_parquet

from ctrpipe.errors import ConfigError, InputFormatError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.parallel import fit_partition
from tests.shard.helpers import CRITEO_CFG, CRITEO_FIT, cache_contents, criteo_cfg, parquet_cfg


# vocabularies with min-count, mean imputation, standardisation: every float and count statistic is fitted
def _criteo_parts(tmp_path: Path, sizes: list[int]) -> list[Path]:
    return [write_criteo_tsv(tmp_path / f"day_{i}.tsv", n, seed=i) for i, n in enumerate(sizes)]


def test_criteo_files_give_the_same_cache_for_any_worker_count(tmp_path: Path) -> None:
    parts = _criteo_parts(tmp_path, [150, 90, 1, 210])
    want = None
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        build_shards(criteo_cfg(*CRITEO_FIT), parts, out, progress=False, workers=workers)
        got = cache_contents(out)
        assert not list(out.glob(".incomplete-*"))
        if want is None:
            want = got
            assert any(k.startswith("fitted/") for k in got["npy"])       # type: ignore[union-attr]
        else:
            assert got == want, f"--workers {workers} differs"


def test_parquet_parts_give_the_samecache_contents(tmp_path: Path) -> None:
    # vocabularies shared with a sequence, median imputation, standardisation and co-visitation
    parts = [write_parquet(tmp_path / f"part-{i}.parquet", n, seed=i) for i, n in enumerate([80, 130, 45])]
    overrides = ("data.chunk_rows=29",)
    build_shards(parquet_cfg(*overrides), parts, tmp_path / "one", progress=False)
    build_shards(parquet_cfg(*overrides), parts, tmp_path / "two", progress=False, workers=2)
    want = cache_contents(tmp_path / "one")
    assert any(k.startswith("fitted/covisit") for k in want["npy"])         # type: ignore[union-attr]
    assert cache_contents(tmp_path / "two") == want


def test_skipped_bad_rows_and_tail_split_shift_later_files(tmp_path: Path) -> None:
    # a bad line in the first file: later files start one good row earlier than the line count says
    parts = _criteo_parts(tmp_path, [120, 100, 140])
    lines = parts[0].read_text().splitlines(keepends=True)
    lines[10] = "not\ta\tcriteo\tline\n"
    parts[0].write_text("".join(lines))
    for mode in ("random", "tail"):
        cfg = criteo_cfg(*CRITEO_FIT, "data.bad_rows=skip", f"data.split.mode={mode}", "data.split.val_ratio=0.3")
        build_shards(cfg, parts, tmp_path / f"{mode}1", progress=False)
        build_shards(cfg, parts, tmp_path / f"{mode}2", progress=False, workers=2)
        assert cache_contents(tmp_path / f"{mode}2") == cache_contents(tmp_path / f"{mode}1"), mode


def test_a_failing_worker_names_the_file_and_line_and_leaves_no_manifest(tmp_path: Path) -> None:
    parts = _criteo_parts(tmp_path, [50, 60, 70])
    lines = parts[2].read_text().splitlines(keepends=True)
    lines[6] = "x\ty\n"
    parts[2].write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(InputFormatError) as err:
        build_shards(criteo_cfg(*CRITEO_FIT), parts, out, progress=False, workers=2)
    assert "day_2.tsv" in str(err.value) and "line 7" in str(err.value)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shard_*"))


def test_kill_9_resumes_without_refitting_finished_files(tmp_path: Path) -> None:
    # small files first, one large file last: its partition is still running when the build is killed
    parts = _criteo_parts(tmp_path, [40, 40, 40]) + [tmp_path / "day_3.tsv"]
    big = write_criteo_tsv(tmp_path / "seed.tsv", 4000, seed=9).read_text()
    parts[3].write_text(big * 40)
    out = tmp_path / "out"
    sets = [f"--set={s}" for s in (*CRITEO_FIT[:-1], "data.chunk_rows=2000", "data.shard_rows=50000")]

    def shard(dest: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", str(CRITEO_CFG), "--out", str(dest),
                "--workers", str(workers), *sets, "--input", *map(str, parts)]

    proc = subprocess.Popen(shard(out, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob(".incomplete-*/partials/part_0000[012]_*.npz"))) < 3:     # the pool may finish 2 before 1
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "no partition finished in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)             # the build and its worker processes
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in out.glob(".incomplete-*/partials/part_*.npz"))
    assert len(done) >= 3
    rerun = subprocess.run(shard(out, 2), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(done)} of 4 files already fitted" in rerun.stdout + rerun.stderr
    one = subprocess.run(shard(tmp_path / "one", 1), capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    assert cache_contents(out) == cache_contents(tmp_path / "one")


def test_dask_local_cluster_gives_the_samecache_contents(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    parts = _criteo_parts(tmp_path, [90, 60, 120])
    build_shards(criteo_cfg(*CRITEO_FIT), parts, tmp_path / "one", progress=False)
    build_shards(criteo_cfg(*CRITEO_FIT), parts, tmp_path / "dask", progress=False, workers=2, dask="local")
    assert cache_contents(tmp_path / "dask") == cache_contents(tmp_path / "one")


def test_dask_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _criteo_parts(tmp_path, [20, 20])
    if importlib.util.find_spec("distributed") is not None:
        import dask
        import distributed  # noqa: F401 - loads its config defaults, which config.set's exit would drop

        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
                pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
            build_shards(criteo_cfg(*CRITEO_FIT), parts, tmp_path / "a", progress=False,
                         dask="tcp://127.0.0.1:9")
        for typo in ("tcp://localhost", "scheduler:8786x"):      # a ValueError traceback before
            with pytest.raises(ConfigError, match="is not a scheduler address") as exc:
                build_shards(criteo_cfg(*CRITEO_FIT), parts, tmp_path / "a", progress=False, dask=typo)
            assert "tcp://host:8786" in exc.value.fix
    # a worker on a machine without the shared filesystem
    with pytest.raises(ConfigError, match="does not see the shard directory"):
        fit_partition(criteo_cfg(*CRITEO_FIT).data, parts[0], parts[1], "train", 20, 0,
                      tmp_path / "elsewhere" / "part_00001_20.npz")
    monkeypatch.setitem(sys.modules, "distributed", None)       # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"ctrpipe\[dask\]"):
        build_shards(criteo_cfg(*CRITEO_FIT), parts, tmp_path / "b", progress=False, dask="local")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_pool_workers_end_when_the_build_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL (or SIGTERM) of `ctrpipe shard --workers N` left its pool workers running under init."""
    pids = tmp_path / "pids"
    script = (
        "import os, sys, time\n"
        "from ctrpipe.shard.parallel import executor\n"
        "with executor(2, None) as pool:\n"
        "    futures = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "    time.sleep(0.5)\n"
        "    workers = [p.pid for p in pool._processes.values()]\n"
        f"    open({str(pids)!r}, 'w').write(' '.join(map(str, workers)))\n"
        "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not pids.exists() or not pids.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2 and all(Path(f"/proc/{p}").exists() for p in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in workers):
        assert time.monotonic() < deadline, "pool workers outlived the killed build"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc")
def test_ctrl_c_ends_the_pool_at_once_without_worker_tracebacks(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: workers took it too (KeyboardInterrupt tracebacks, and once a
    pool waiting forever on a dead worker); the build's process now ends the pool without running the rest."""
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"   # as in a terminal, whoever started us
        "from ctrpipe.shard.parallel import executor\n"
        "with executor(2, None) as pool:\n"
        "    futures = [pool.submit(time.sleep, 3) for _ in range(40)]\n"
        "    time.sleep(1.5)\n"
        "    print('ready', flush=True)\n"
        "    for f in futures:\n"
        "        f.result()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    # the build's thread sees Ctrl-C once its wait returns (a task ends): queued tasks are cancelled, not run
    assert time.monotonic() - started < 15                       # not the ~60 s the 40 queued tasks take
    assert err.count("KeyboardInterrupt") == 1, err              # the build's own, no worker's


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_ctrl_c_while_workers_start_prints_no_worker_traceback(tmp_path: Path) -> None:
    """A helper's sweep: Ctrl-C within a second of `shard --workers 2` printed two tracebacks, of workers still
    importing polars and ctrpipe (before their initializer ignores SIGINT). They start with SIGINT blocked."""
    script = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from ctrpipe.shard.parallel import executor\n"
        "with executor(2, None) as pool:\n"
        "    futures = [pool.submit(time.sleep, 1) for _ in range(4)]\n"   # both workers are spawned now
        "    print('ready', flush=True)\n"
        "    for f in futures:\n"
        "        f.result()\n")
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05)                                # the workers are importing their modules
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert err.count("Traceback") == 1 and err.count("KeyboardInterrupt") == 1, err   # the build's own


def test_a_dead_worker_is_a_clear_error(tmp_path: Path) -> None:
    """An out-of-memory kill of one worker surfaced as a BrokenProcessPool traceback."""
    from ctrpipe.errors import InputFormatError
    from ctrpipe.shard.parallel import executor

    with pytest.raises(InputFormatError, match=r"a worker process of the build died(?s:.*)resumes"):
        with executor(2, None) as pool:
            pool.submit(os.kill, 0, 0).result()                   # the pool is up
            victim = next(iter(pool._processes.values())).pid
            os.kill(victim, signal.SIGKILL)
            pool.submit(time.sleep, 0.1).result()
            time.sleep(1)
            pool.submit(time.sleep, 0.1).result()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_pool_workers_start_with_one_malloc_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker runs a task per file, each with new threads; with an arena per thread each kept its freed peak
    and a worker grew with its files (helper's sweep: 4 Parquet files, 953 MB per worker; one arena: 487 MB).
    The workers get MALLOC_ARENA_MAX=1 in their environment from the start; this process's is left as it was."""
    from ctrpipe.shard.parallel import executor

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("CTRPIPE_MALLOC_TUNING", raising=False)
    with executor(2, None) as pool:
        seen = {pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() for _ in range(4)}
    assert seen == {"1"} and "MALLOC_ARENA_MAX" not in os.environ
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")                       # the user's own setting stays
    with executor(1, None) as pool:
        assert pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() == "4"
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("CTRPIPE_MALLOC_TUNING", "0")                  # allocator tuning off: nothing set
    with executor(1, None) as pool:
        assert pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_dask_local_workers_keep_one_malloc_arena_after_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nanny restarts a worker that died or ran over its memory limit: the restarted one had lost the
    setting, which held only while the cluster was created (review of the change)."""
    pytest.importorskip("distributed")
    from ctrpipe.shard.parallel import executor

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("CTRPIPE_MALLOC_TUNING", raising=False)
    with executor(1, "local") as pool:
        assert pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() == "1"
        pool._client.restart()                                        # type: ignore[attr-defined]
        assert pool.submit(os.getenv, "MALLOC_ARENA_MAX").result() == "1"
    assert "MALLOC_ARENA_MAX" not in os.environ


def test_workers_or_dask_with_one_input_file_say_the_build_runs_here(tmp_path: Path) -> None:
    """--dask (an unreachable one too) or --workers with a single file was ignored without a word."""
    from typer.testing import CliRunner

    from ctrpipe.cli import app

    part = _criteo_parts(tmp_path, [40])[0]
    for flag in (["--dask", "tcp://127.0.0.1:9"], ["--workers", "2"]):
        res = CliRunner().invoke(app, ["shard", "--cfg", str(CRITEO_CFG), "--input", str(part),
                                       "--out", str(tmp_path / flag[0].strip("-")), "-q", *flag])
        assert res.exit_code == 0, res.output
        assert f"note: {' '.join(flag)} spreads the build's input files" in " ".join(res.output.split())
