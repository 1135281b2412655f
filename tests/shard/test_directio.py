"""Shard files written past the page cache (O_DIRECT) hold exactly the bytes of ordinary writes: whole
blocks through the staging buffer, the tail at close, headers rewritten for a short last shard."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import npy_bytes, parquet_cfg
from raw_inputs import write_parquet

from ctrpipe.shard.build import build_shards
from ctrpipe.shard.directio import ALIGN, ShardFile, Staging
from ctrpipe.shard.writer import ShardWriter


def _direct_available(folder: Path) -> bool:
    """Whether this filesystem takes O_DIRECT and an aligned block write (tmpfs before Linux 6.6 does not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o666)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    staging = Staging(ALIGN)
    try:
        os.write(fd, staging.view)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        staging.release()
        probe.unlink()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_pieces_of_every_size_land_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 direct: str) -> None:
    monkeypatch.setenv("CTRPIPE_DIRECT_IO", direct)
    rng = np.random.default_rng(0)
    sizes = [0, 1, ALIGN - 1, 1, ALIGN, 3 * ALIGN + 5, 40_000, 2, 5 * ALIGN, 123_457, ALIGN - 3, 7]
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    staging = Staging(4 * ALIGN)                  # smaller than some pieces: the buffer fills mid-piece
    f = ShardFile(tmp_path / "f.bin", staging)
    expect_direct = direct == "1" and _direct_available(tmp_path)
    assert f.direct == expect_direct
    for p in pieces:
        f.write(p)
    assert f.direct == expect_direct                 # whole blocks went out directly, not by the fallback
    f.close()
    staging.release()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_direct_writes_refused_mid_file_fall_back_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that takes O_DIRECT at open but refuses its writes (EINVAL): the file falls back to
    ordinary writes, and the bytes held back for the next whole block still come before the next piece."""
    import fcntl

    if not _direct_available(tmp_path):
        pytest.skip("this filesystem takes no O_DIRECT")
    real_write = os.write

    def refusing(fd: int, data: object) -> int:       # what such a filesystem's write does
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)                   # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", refusing)
    rng = np.random.default_rng(2)
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (5000, 5240, 3 * ALIGN + 1, 17)]
    staging = Staging(2 * ALIGN)
    f = ShardFile(tmp_path / "f.bin", staging)
    assert f.direct
    for p in pieces:
        f.write(p)
    assert not f.direct
    f.close()
    staging.release()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_a_failed_direct_write_is_the_error_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A direct write failing for any reason (here EIO on the third block): that OSError leaves the writer,
    not a BufferError from unmapping the staging buffer that the error's traceback still references."""
    import fcntl

    if not _direct_available(tmp_path):
        pytest.skip("this filesystem takes no O_DIRECT")
    real_write = os.write
    direct_writes = 0

    def failing(fd: int, data: object) -> int:
        nonlocal direct_writes
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes += 1
            if direct_writes == 3:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)                   # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", failing)
    rows = np.zeros((300_000, 8), np.float32)
    with pytest.raises(OSError) as exc:
        with ShardWriter(tmp_path, shard_rows=100_000) as w:
            for s in range(0, len(rows), 50_000):
                w.add({"numeric": rows[s: s + 50_000]})
            w.close()
    assert exc.value.errno == errno.EIO
    # shard 0 (two direct writes) was finished before; the failed shard is neither renamed nor left behind
    assert (tmp_path / "shard_00000").is_dir() and not (tmp_path / "shard_00001").exists()
    assert not list(tmp_path.glob("shard_*.incomplete"))


def test_a_file_size_limit_is_one_clear_error(tmp_path: Path) -> None:
    """Past `ulimit -f` (EFBIG), with and without O_DIRECT: one error naming the limit and the fix. With
    O_DIRECT the staging buffer, still referenced by the failed write's traceback, could not be unmapped,
    and that BufferError replaced the real error."""
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("ctrpipe")
    if not exe.is_file() or shutil.which("sh") is None:
        pytest.skip("needs the ctrpipe script and a POSIX shell")
    src = write_parquet(tmp_path / "p.parquet", 3000)
    cfg = Path(__file__).resolve().parents[2] / "cfgs" / "parquet_example.yaml"
    blocks = 391                # ulimit -f counts 512-byte blocks: 200 kB; the sequence tokens of a shard need more
    for direct in ("1", "0"):
        # the limit is set by a shell that then becomes ctrpipe (no preexec_fn in a process with threads)
        res = subprocess.run(["sh", "-c", f'ulimit -f {blocks} && exec "$0" "$@"', str(exe), "shard", "--cfg",
                              str(cfg), "--input", str(src), "--out", str(tmp_path / f"out{direct}"), "-q"],
                             capture_output=True, text=True,
                             env={**os.environ, "CTRPIPE_DIRECT_IO": direct, "COLUMNS": "400"}, timeout=300)
        out = " ".join((res.stdout + res.stderr).split())
        assert res.returncode == 1, out
        assert "File too large" in out and "ulimit -f" in out and "data.shard_rows" in out, out
        assert "Traceback" not in out and "BufferError" not in out, out
        assert not (tmp_path / f"out{direct}" / "manifest.json").exists()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failed_shard_end_closes_its_files_and_leaves_no_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at a file's tail, while the shard is being finished: the other files of that shard stayed
    open (raw descriptors, never closed) and its .incomplete folder stayed on the full disk."""
    import fcntl

    if not _direct_available(tmp_path) or not Path("/proc/self/fd").is_dir():
        pytest.skip("needs O_DIRECT and /proc")
    real_write = os.write

    def full_at_tails(fd: int, data: object) -> int:      # direct blocks land; the first tail finds no room
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)                   # type: ignore[arg-type]

    rows = np.arange(3 * 3001, dtype=np.float32).reshape(3001, 3)
    for background in (True, False):
        root = tmp_path / str(background)
        before = _open_fds()
        monkeypatch.setattr(os, "write", full_at_tails)
        with pytest.raises(OSError) as exc:
            with ShardWriter(root, shard_rows=5000, background=background) as w:
                w.add({"a": rows, "b": rows + 1, "c": rows + 2})
                w.close()
        monkeypatch.setattr(os, "write", real_write)
        assert exc.value.errno == errno.ENOSPC
        assert _open_fds() == before and list(root.iterdir()) == []


def test_slow_direct_writes_give_way_to_ordinary_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage slower than MIN_DIRECT_RATE (here: every device, the rate asked being absurd): after the probe
    the file goes on with ordinary writes, later files open without O_DIRECT, and the bytes are the same."""
    from ctrpipe.shard import directio

    if not _direct_available(tmp_path):
        pytest.skip("this filesystem takes no O_DIRECT")
    monkeypatch.setattr(directio, "MIN_DIRECT_RATE", 1e18)
    monkeypatch.setattr(directio, "PROBE_BYTES", 2 * ALIGN)
    data = np.random.default_rng(4).integers(0, 256, 10 * ALIGN + 7, dtype=np.uint8).tobytes()
    staging = Staging(ALIGN)
    f = ShardFile(tmp_path / "a.bin", staging)
    assert f.direct
    f.write(data)
    assert not f.direct and not staging.direct
    f.close()
    g = ShardFile(tmp_path / "b.bin", staging)
    assert not g.direct
    g.write(data)
    g.close()
    staging.release()
    assert (tmp_path / "a.bin").read_bytes() == data == (tmp_path / "b.bin").read_bytes()


def test_abort_closes_without_the_tail(tmp_path: Path) -> None:
    staging = Staging(ALIGN)
    f = ShardFile(tmp_path / "f.bin", staging)
    f.write(b"x" * (ALIGN + 10))
    f.abort()
    f.abort()                                      # twice: a no-op
    assert (tmp_path / "f.bin").stat().st_size in (ALIGN, ALIGN + 10)   # whole blocks (direct) or all bytes
    staging.release()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_megabyte_shards_equal_np_save_of_each_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     direct: str) -> None:
    """Shards of MBs (many whole blocks, a partial one), a short last shard whose headers are rewritten, and
    unicode ids written whole at the shard's end."""
    monkeypatch.setenv("CTRPIPE_DIRECT_IO", direct)
    rng = np.random.default_rng(1)
    n, shard_rows = 250_003, 100_000
    whole = {"numeric": rng.standard_normal((n, 13)).astype(np.float32),
             "categorical": rng.integers(0, 1 << 30, size=(26, n), dtype=np.int32).T,     # column-major chunks
             "seq": rng.integers(0, 1000, size=(n, 3, 5), dtype=np.int64),
             "ids": np.array([f"r{i}" for i in range(n)]),
             "split": rng.integers(0, 3, n, dtype=np.int8)}
    with ShardWriter(tmp_path, shard_rows=shard_rows) as w:
        for s in range(0, n, 37_000):
            w.add({g: a[s: s + 37_000] for g, a in whole.items()})
        shards = w.close()
    assert [s.rows for s in shards] == [100_000, 100_000, 50_003]
    for s in shards:
        for g, info in s.files.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(whole[g][s.row_start: s.row_start + s.rows].astype(info.dtype)))
            assert (tmp_path / info.file).read_bytes() == buf.getvalue(), (s.index, g)


def test_build_writes_the_same_cache_with_and_without_direct_io(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_parquet(tmp_path / "p.parquet", 3000)
    caches = {}
    for direct in ("0", "1"):
        monkeypatch.setenv("CTRPIPE_DIRECT_IO", direct)
        build_shards(parquet_cfg("data.shard_rows=1100", "data.chunk_rows=700"), [src], tmp_path / direct,
                     progress=False)
        caches[direct] = npy_bytes(tmp_path / direct)
    assert caches["1"].keys() == caches["0"].keys() and len(caches["1"]) > 10
    assert [k for k in caches["0"] if caches["1"][k] != caches["0"][k]] == []
