"""The compiled token / string / hash-index kernels give exactly what the polars + numpy paths give."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pytest

from ctrpipe.data.chunks import column_hashes
from ctrpipe.data.fitted import CountTable, KeyCounter, VocabTable, lookup_counts
from ctrpipe.data.hashindex import HashIndex
from ctrpipe.data.hashing import xxh64_strings
from ctrpipe.data.token_kernel import kept_tokens, weights_all_plain
from ctrpipe.data.transforms import first_bad_weight, tokens_hashes, tokens_to_ids
from ctrpipe.errors import InputFormatError
from ctrpipe.native import native_built

needs_kernel = pytest.mark.skipif(not native_built(), reason="the optional compiled kernels are not built")


def _random_tokens(rng: random.Random, n: int, sep: str) -> list[str | None]:
    alphabet = ["a", "b", "7", "42", "ü", "日本", "x y", ":", "", "::", "item_123456789012345678901234567890"]
    rows: list[str | None] = []
    for _ in range(n):
        if rng.random() < 0.1:
            rows.append(None)
            continue
        toks = []
        for _ in range(rng.randrange(0, 12)):
            toks.append(rng.choice(alphabet) + rng.choice(alphabet))
        rows.append(sep.join(toks) + (sep if rng.random() < 0.1 else ""))
    return rows


@needs_kernel
@pytest.mark.parametrize("sep", [",", "|", "::", ", "])
@pytest.mark.parametrize("keep", ["first", "last"])
@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_kernel_tokens_equal_the_polars_path(monkeypatch: pytest.MonkeyPatch, sep: str, keep: str,
                                             max_len: int) -> None:
    rng = random.Random(hash((sep, keep, max_len)) % 1000)
    s = pl.Series("t", _random_tokens(rng, 400, sep))
    fast_ids = tokens_to_ids(s, sep, max_len, 11, 1000, False, keep)
    fast_h = tokens_hashes(s, sep, keep, max_len, 11)
    assert kept_tokens(s, sep, keep, max_len, 11, False) is not None      # the kernel did take it
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow_ids = tokens_to_ids(s, sep, max_len, 11, 1000, False, keep)
    slow_h = tokens_hashes(s, sep, keep, max_len, 11)
    for a, b in zip(fast_ids[:2], slow_ids[:2], strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert fast_ids[2] is None and slow_ids[2] is None
    assert np.array_equal(fast_h[0], slow_h[0]) and np.array_equal(fast_h[1], slow_h[1])


@needs_kernel
@pytest.mark.parametrize("sep", [",", "\xe9"])      # one byte, and two (UTF-8 é: the memchr path)
def test_kernel_finds_separators_at_every_offset_of_a_word(monkeypatch: pytest.MonkeyPatch, sep: str) -> None:
    """The kernel scans eight bytes at a time: separators at every offset within and across words, runs of
    separators (empty tokens) and rows shorter than a word must split as polars splits them."""
    rows: list[str | None] = []
    for first in range(0, 18):
        for second in range(0, 11):
            rows.append("a" * first + sep + "b" * second + sep + sep + "c" * (first % 5) + "\u00fc" * (second % 3))
    rows += ["", sep, sep * 9, "x" * 8, "x" * 8 + sep, sep + "y" * 16 + sep]
    s = pl.Series("t", rows)
    assert kept_tokens(s, sep, "last", 50, 5, False) is not None
    fast = tokens_hashes(s, sep, "last", 50, 5)
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow = tokens_hashes(s, sep, "last", 50, 5)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


@needs_kernel
@pytest.mark.parametrize("keep", ["first", "last"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_second_seed_hashes_the_same_tokens(keep: str, weighted: bool) -> None:
    rng = random.Random(7)
    rows = _random_tokens(rng, 300, "|")
    if weighted:
        rows = ["|".join(f"{t}:0.5" for t in r.split("|") if t) if r is not None else None for r in rows]
    s = pl.Series("t", rows)
    both = kept_tokens(s, "|", keep, 3, 11, weighted, seed2=12)
    one, two = kept_tokens(s, "|", keep, 3, 11, weighted), kept_tokens(s, "|", keep, 3, 12, weighted)
    assert both is not None and one is not None and two is not None and both.hashes2 is not None
    assert np.array_equal(both.hashes, one.hashes) and np.array_equal(both.hashes2, two.hashes)
    assert np.array_equal(both.lengths, two.lengths) and not np.array_equal(both.hashes, both.hashes2)
    if weighted:
        assert both.weights is not None and two.weights is not None
        assert np.array_equal(both.second().weights, two.weights)


@needs_kernel
@pytest.mark.parametrize("keep", ["first", "last"])
def test_kernel_weighted_tokens_equal_the_polars_path(monkeypatch: pytest.MonkeyPatch, keep: str) -> None:
    rows = ["a:0.5|b:1|c:-2.25", "x:y:007|:::0.01", None, "", "|d:3.14159||", "f:2|g:-0|h:0.1000",
            "i:123456789012345|j:0.00000000000001", "long_name_" * 5 + ":0.125"]
    s = pl.Series("w", rows)
    assert kept_tokens(s, "|", keep, 2, 5, True) is not None               # the kernel did take it
    fast = tokens_to_ids(s, "|", 2, 5, 77, True, keep)
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow = tokens_to_ids(s, "|", 2, 5, 77, True, keep)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@needs_kernel
def test_kernel_declines_what_it_does_not_parse_and_polars_reports_it() -> None:
    assert weights_all_plain(pl.Series(["a:0.5|b:-1", None, ""]), "|")
    for odd in ["a:1e3", "a: 1", "a:.5", "a:1.", "a:+1", "a:inf", ":1", "a", "a:1234567890123456"]:
        s = pl.Series([odd])
        assert not weights_all_plain(s, "|"), odd
        assert kept_tokens(s, "|", "first", 4, 0, True) is None, odd
    assert first_bad_weight(pl.Series(["a:1|b"]), "|") == (0, "token 'b' has no ':weight'")
    with pytest.raises(InputFormatError, match="no name before"):
        tokens_to_ids(pl.Series(["a:1|:2"]), "|", 4, 0, 100, True, "first")


@needs_kernel
def test_kernel_string_hashes_equal_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    s = pl.Series("c", ["", None, "a", "ü" * 40, "12345678", "x" * 300] * 50)
    frame = s.to_frame()
    fast_h, fast_m = column_hashes(frame, "c", 3)
    assert np.array_equal(fast_h, np.where(fast_m, 0, xxh64_strings(s, 3)))
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow_h, slow_m = column_hashes(frame, "c", 3)
    assert np.array_equal(fast_h, slow_h) and np.array_equal(fast_m, slow_m)


@pytest.mark.parametrize("native_on", ["1", "0"])
@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_hash_index_equals_a_binary_search(monkeypatch: pytest.MonkeyPatch, native_on: str, n: int) -> None:
    monkeypatch.setenv("CTRPIPE_NATIVE", native_on)
    rng = np.random.default_rng(n)
    # keys crowded into few home slots (low bits equal) make long probe chains; key 0 is legal
    keys = np.unique(np.concatenate([rng.integers(0, 64, n).astype(np.uint64) << np.uint64(40),
                                     np.zeros(min(n, 1), dtype=np.uint64)]))
    counts = rng.integers(1, 10**12, len(keys))
    queries = np.concatenate([keys, rng.integers(0, 64, 3000).astype(np.uint64) << np.uint64(40),
                              rng.integers(0, 2**63, 3000).astype(np.uint64), np.zeros(3, np.uint64)])
    want = lookup_counts(keys, counts, queries)
    assert np.array_equal(HashIndex(keys, counts).lookup(queries), want)
    many = np.tile(queries, 40)                               # more than one block of the numpy path
    assert np.array_equal(HashIndex(keys, counts).lookup(many), np.tile(want, 40))
    assert np.array_equal(CountTable(keys, counts).index.lookup(queries), want)
    ids = (2 + np.arange(len(keys))).astype(np.int32)
    vocab = VocabTable(keys, ids, len(keys) + 2)
    missing = np.zeros(len(queries), dtype=bool)
    missing[::5] = True
    got = vocab.lookup(queries, missing)
    ref = np.ones(len(queries), dtype=np.int32)
    if len(keys):
        pos = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
        ref = np.where(keys[pos] == queries, ids[pos], 1)
    ref[missing] = 0
    assert got.dtype == np.int32 and np.array_equal(got, ref)


@needs_kernel
def test_kernel_reads_sliced_and_multi_chunk_series(monkeypatch: pytest.MonkeyPatch) -> None:
    a = pl.Series("t", ["a,bb", None, "long_token_number_one,x" * 3])
    b = pl.Series("t", ["", "c,,d", "another_long_token_abcdefgh"])
    s = pl.concat([a, b], rechunk=False).slice(1)
    assert s.n_chunks() == 2
    fast = tokens_to_ids(s, ",", 4, 9, 500, False, "last"), column_hashes(s.to_frame(), "t", 9)
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow = tokens_to_ids(s, ",", 4, 9, 500, False, "last"), column_hashes(s.to_frame(), "t", 9)
    for x, y in zip([*fast[0][:2], *fast[1]], [*slow[0][:2], *slow[1]], strict=True):
        assert np.array_equal(x, y)


@needs_kernel
def test_hash_counter_counts_like_the_sort_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    chunks = [rng.integers(0, 5000, 20_000).astype(np.uint64) * np.uint64(2**40) for _ in range(4)]
    chunks[1][:7] = 0                                         # key 0 is a key like any other
    fast = KeyCounter()                                        # grows from 1,024 slots to fit 5,000 keys
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    slow = KeyCounter()
    for i, c in enumerate(chunks):
        fast.add(c)
        slow.add(c)
        if i == 1:                                             # reading in between does not lose counts
            assert np.array_equal(fast.keys, slow.keys) and np.array_equal(fast.counts, slow.counts)
    assert np.array_equal(fast.keys, slow.keys) and np.array_equal(fast.counts, slow.counts)
    zeros = sum(int((c == 0).sum()) for c in chunks)
    assert fast.counts.dtype == np.int64 and fast.keys[0] == 0 and fast.counts[0] == zeros >= 7
