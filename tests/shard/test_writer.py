"""ShardWriter: exact shard sizes and byte-identical files whatever the chunking."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctrpipe.shard.writer import ShardWriter


def _arrays(start: int, stop: int) -> dict[str, np.ndarray]:
    idx = np.arange(start, stop)
    return {"numeric": np.stack([idx, idx * 2], axis=1).astype(np.float32),
            "ids": np.array([f"r{i}" for i in idx.tolist()]),
            "split": (idx % 3 == 0).astype(np.int8)}


def _write(root: Path, n: int, chunk: int) -> list:
    w = ShardWriter(root, shard_rows=40)
    for s in range(0, n, chunk):
        w.add(_arrays(s, min(s + chunk, n)))
    return w.close()


def test_shard_sizes_and_bytes_independent_of_chunks(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", 130, 7)
    b = _write(tmp_path / "b", 130, 1000)
    assert [s.rows for s in a] == [40, 40, 40, 10] and a == b
    assert [s.row_start for s in a] == [0, 40, 80, 120]
    for s in a:
        for info in s.files.values():
            assert (tmp_path / "a" / info.file).read_bytes() == (tmp_path / "b" / info.file).read_bytes()
    # unicode width is per shard: shard 0 holds r0..r39 (<U3), shard 3 holds r120..r129 (<U4)
    assert a[0].files["ids"].dtype == "<U3" and a[3].files["ids"].dtype == "<U4"
    assert not list((tmp_path / "a").glob("*.incomplete"))


def test_done_shards_are_not_rewritten(tmp_path: Path) -> None:
    _write(tmp_path, 100, 50)
    f = tmp_path / "shard_00000" / "numeric.npy"
    before = f.stat().st_mtime_ns
    w = ShardWriter(tmp_path, shard_rows=40, done={0}, background=False)
    w.add(_arrays(0, 100))
    w.close()
    assert f.stat().st_mtime_ns == before


def test_streamed_files_equal_np_save_of_the_whole_shard(tmp_path: Path) -> None:
    import io

    shards = _write(tmp_path, 130, 7)                     # last shard short: its headers are rewritten
    whole = _arrays(0, 130)
    for s in shards:
        for g, info in s.files.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(whole[g][s.row_start: s.row_start + s.rows].astype(info.dtype)))
            assert (tmp_path / info.file).read_bytes() == buf.getvalue(), (s.index, g)


def test_chunk_with_another_dtype_is_refused(tmp_path: Path) -> None:
    import pytest

    with ShardWriter(tmp_path, shard_rows=40) as w:
        w.add({"numeric": np.zeros((5, 2), np.float32)})
        with pytest.raises(ValueError, match="numeric"):
            w.add({"numeric": np.zeros((5, 2), np.float64)})


def test_column_major_chunks_are_written_in_row_order(tmp_path: Path) -> None:
    import io

    from ctrpipe.shard import writer as writer_mod

    rng = np.random.default_rng(0)
    cat = rng.integers(0, 1 << 30, size=(26, 5000), dtype=np.int32)        # (F, N) memory, used as (N, F)
    num = rng.standard_normal((13, 5000)).astype(np.float32)
    w = ShardWriter(tmp_path, shard_rows=3000, background=False)
    old = writer_mod.SCRATCH_BYTES
    writer_mod.SCRATCH_BYTES = 4096                      # many transpose slices, one of them partial
    try:
        for s in range(0, 5000, 1700):
            w.add({"categorical": cat.T[s: s + 1700], "numeric": num.T[s: s + 1700]})
        shards = w.close()
    finally:
        writer_mod.SCRATCH_BYTES = old
    for s in shards:
        for g, whole in (("categorical", cat.T), ("numeric", num.T)):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(whole[s.row_start: s.row_start + s.rows]))
            assert (tmp_path / s.files[g].file).read_bytes() == buf.getvalue(), (s.index, g)


def test_fit_unicode_matches_the_longest_value() -> None:
    from ctrpipe.shard.writer import _fit_unicode

    for a in (np.array(["a", "bcd", ""], dtype="<U9"), np.array(["", ""], dtype="<U3"), np.array([], dtype="<U4"),
              np.array(["x\x00y", "ü日本"], dtype="<U7"), np.array(["ab"], dtype=">U5")):
        width = int(np.char.str_len(a).max()) if len(a) else 1
        want = a.astype(f"<U{max(width, 1)}")
        got = _fit_unicode(a)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
