"""The compiled Criteo kernel: exact xxh64, every decline case, and caches byte-identical to the polars path."""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import xxhash
from helpers import criteo_cfg, npy_bytes

from ctrpipe.data.chunks import hashed_name
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.native import native_built
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.manifest import read_manifest

_COMPILER = shutil.which(str(sysconfig.get_config_var("CC") or "cc").split()[0]) or shutil.which("gcc")
_HEADERS = (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()
pytestmark = pytest.mark.skipif(not native_built() and not (_COMPILER and _HEADERS),
                                reason="no C compiler or Python headers: ctrpipe runs without its optional kernel")


def kernel():
    from ctrpipe import _native

    return _native


def test_kernel_is_built_where_a_compiler_exists() -> None:
    # the extension is optional in pyproject.toml; this keeps a silently failed build from going unnoticed
    # where it could have been built (a compiler and Python.h are present)
    assert native_built(), "ctrpipe._native was not built although a C compiler is available"


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1, 1953052475120754509])
def test_kernel_xxh64_equals_the_xxhash_package(seed: int) -> None:
    rng = random.Random(seed % 1000)
    for n in [*range(0, 70), 95, 96, 97, 255, 256, 1000]:
        data = bytes(rng.randrange(256) for _ in range(n))
        assert kernel().xxh64(data, seed) == xxhash.xxh64_intdigest(data, seed=seed), n


def _run(text: str, n_lines: int, n_fields: int = 4, n_numeric: int = 2, n_labels: int = 1):
    seeds = np.array([7] * (n_fields - n_numeric), dtype=np.uint64)
    num = np.full((n_numeric, n_lines), -99.0)
    hashes = np.zeros((n_fields - n_numeric, n_lines), dtype=np.uint64)
    bad = kernel().criteo_block(text.encode(), n_lines, n_fields, n_numeric, n_labels, ord("\t"), seeds, num,
                                hashes)
    return bad, num, hashes


def test_kernel_parses_counts_and_hashes_fields() -> None:
    bad, num, hashes = _run("1\t-12\tab\t\n0\t\t\txyz\n1\t-0\tq\tr\n", 3)
    assert bad == -1
    assert num[0].tolist() == [1.0, 0.0, 1.0]
    assert num[1, 0] == -12.0 and np.isnan(num[1, 1]) and num[1, 2] == 0.0 and np.signbit(num[1, 2])
    h = lambda s: xxhash.xxh64_intdigest(s.encode(), seed=7)  # noqa: E731
    assert hashes.tolist() == [[h("ab"), 0, h("q")], [0, h("xyz"), h("r")]]


@pytest.mark.parametrize(("text", "n_lines", "expected"), [
    ("1\t2\ta\tb\n0\t3\tc\n", 2, 1),              # a short line
    ("1\t2\ta\tb\n0\t3\tc\td\te\n", 2, 1),        # a long line
    ("1\t2\ta\tb\n\t3\tc\td\n", 2, 1),            # an empty label
    ("1\t2\ta\tb\n0\t1.5\tc\td\n", 2, 1),         # not a plain integer: polars parses it
    ("1\t2\ta\tb\n0\t+3\tc\td\n", 2, 1),
    ("1\t2\ta\tb\n0\t1234567890123456\tc\td\n", 2, 1),   # 16 digits: beyond the exact range kept
    ("1\t2\ta\tb\n0\t 3\tc\td\n", 2, 1),
    ("1\t2\ta\tb\n", 2, 0),                        # fewer lines than announced
    ("1\t2\ta\tb\n0\t3\tc\td\n", 1, 1),           # more data than announced
    ("1\t2\ta\tb", 1, 0),                          # no final newline
    ("", 1, 0),
])
def test_kernel_declines_what_it_does_not_handle(text: str, n_lines: int, expected: int) -> None:
    assert _run(text, n_lines)[0] == expected


def test_kernel_checks_its_buffers() -> None:
    with pytest.raises(ValueError, match="numeric buffer"):
        kernel().criteo_block(b"1\t2\ta\tb\n", 1, 4, 2, 1, 9, np.zeros(2, np.uint64), np.zeros(1),
                              np.zeros(2, np.uint64))


def _tricky_rows(n: int, seed: int = 3) -> list[str]:
    """Criteo lines with negatives, -0, blanks, long and non-ASCII values, and a few non-integer counts."""
    rng = random.Random(seed)
    words = ["68fd1e64", "", "a" * 40, "héllo", "中文字", "x", "0", "-", "b" * 33]
    out = []
    for i in range(n):
        ints = [rng.choice(["", "0", "-0", "-3", str(rng.randrange(10**6)), "007", "123456789012345"])
                for _ in range(13)]
        if i % 97 == 50:
            ints[4] = "2.5"                      # the kernel declines this block; polars parses it
        cats = [rng.choice(words) for _ in range(26)]
        out.append("\t".join([str(rng.randrange(2)), *ints, *cats]))
    return out


@pytest.mark.parametrize("extra", [[], ["data.categorical.mode=vocab", "data.categorical.min_count=2"],
                                   ["data.split.mode=group", "data.split.key=C3", "data.folds.n_splits=3",
                                    "data.folds.mode=group", "data.folds.key=C5"]])
def test_kernel_and_polars_paths_build_identical_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        extra: list[str]) -> None:
    rows = _tricky_rows(700)
    plain = tmp_path / "a.tsv"
    plain.write_text("\n".join(rows[:400]) + "\n", encoding="utf-8")
    crlf = tmp_path / "b.tsv"
    crlf_rows = rows[400:]
    crlf_rows[70] = crlf_rows[70].rsplit("\t", 1)[0] + "\tx\ry"                      # a lone CR in C26
    crlf_rows[100] += "\r"                                                          # "\r\r\n" at a line end
    crlf.write_bytes(("\r\n".join(crlf_rows) + "\r\n").encode("utf-8"))
    cfg = criteo_cfg("data.chunk_rows=64", *extra)
    built = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("CTRPIPE_NATIVE", flag)
        out = tmp_path / f"cache_{flag}"
        build_shards(cfg, [plain, crlf], out, progress=False)
        built[flag] = out
    assert npy_bytes(built["1"]) == npy_bytes(built["0"])
    m1, m0 = read_manifest(built["1"]), read_manifest(built["0"])
    assert m1.columns == m0.columns and m1.rows == m0.rows and m1.fitted == m0.fitted
    # both paths really ran: most blocks through the kernel, the ones holding "2.5" through polars
    monkeypatch.setenv("CTRPIPE_NATIVE", "1")
    kinds = [hashed_name("C1") in chunk.frame.columns
             for chunk in iter_raw_chunks(cfg.data, [plain, crlf], 64, hash_categoricals=True)]
    assert sum(kinds) >= 3 and not all(kinds)


def test_kernel_path_reports_bad_lines_like_polars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _tricky_rows(300)
    rows[200] = rows[200].replace("\t", "\tnot-a-number\t", 1).rsplit("\t", 1)[0]   # same field count
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = criteo_cfg("data.chunk_rows=64")
    messages = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CTRPIPE_NATIVE", flag)
        with pytest.raises(Exception) as info:
            build_shards(cfg, [path], tmp_path / f"cache_{flag}", progress=False)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "line 201" in messages[0] and "I1" in messages[0] and "not-a-number" in messages[0]


def test_covisit_rows_equal_the_numpy_scores_and_reduceat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernel's per-row max and mean are bit-identical to the numpy path's per-token scores reduced
    with reduceat (numpy sums pairwise: rows of 8+ and 129+ tokens take its other branches), with empty rows,
    missing targets and leave-one-out rows."""
    from ctrpipe.data.covisit import ContextTokens, CovisitCounter, covisit_features

    rng = np.random.default_rng(7)
    n = 3000
    lengths = rng.choice([0, 1, 5, 8, 9, 17, 50, 129, 300], size=n).astype(np.int64)
    m = int(lengths.sum())
    target = rng.integers(1, 30, n).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    target_missing = rng.random(n) < 0.05
    ctx = ContextTokens(rng.integers(1, 800, m).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9), lengths)
    counter = CovisitCounter()
    counter.update(target, target_missing, ctx, rng.random(n) < 0.7)
    pairs, ctx_table = counter.tables()
    loo = rng.random(n) < 0.5
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("CTRPIPE_NATIVE", flag)
        got[flag] = covisit_features(pairs, ctx_table, target, target_missing, ctx, 1.5, loo)
    assert got["1"].dtype == np.float32 and got["1"].shape == (n, 2)
    assert np.array_equal(got["1"].view(np.uint32), got["0"].view(np.uint32))
    assert (got["1"][lengths == 0] == 0).all() and (got["1"][target_missing] == 0).all()
    assert (got["1"][(lengths > 0) & ~target_missing, 0] > 0).any()
