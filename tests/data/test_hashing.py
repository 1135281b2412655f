"""Hashing: the vectorised xxh64 equals the `xxhash` package on every length, layout and seed."""

from __future__ import annotations

import random

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import xxhash

from ctrpipe.data.hashing import field_seed, hash_ids, ids_from_hashes, xxh64_strings, xxh64_strings_unique

SEEDS = (0, 1, 2**64 - 1, field_seed("C1", 0))
ARROW_TYPES = (pa.string(), pa.large_string(), pa.string_view())


def _expected(values: list[str | None], seed: int) -> list[int]:
    return [0 if v is None else xxhash.xxh64_intdigest(v.encode("utf-8"), seed=seed) for v in values]


def _mixed_values() -> list[str | None]:
    rng = random.Random(7)
    alphabet = "abcé中x0\t "
    lengths = list(range(0, 41)) * 2 + [64, 100, 255, 256, 257, 300, 1000]
    vals: list[str | None] = ["".join(rng.choice(alphabet) for _ in range(n)) for n in lengths]
    vals += [None, "", "68fd1e64"]
    rng.shuffle(vals)
    return vals


def test_pinned_values() -> None:
    # literal values computed once with the xxhash package; they pin the ids convention itself
    assert xxh64_strings(pa.array(["68fd1e64"]), 0).tolist() == [6718470718629228516]
    assert field_seed("C1", 0) == 1953052475120754509
    assert xxh64_strings(pl.Series(["68fd1e64"]), field_seed("C1", 0)).tolist() == [6601481875315734487]
    assert xxh64_strings(pa.array(["", None]), 0).tolist() == [17241709254077376921, 0]
    assert xxh64_strings(pa.array(["héllo 中文"]), 0).tolist() == [17497039435755758431]
    assert hash_ids(pl.Series(["68fd1e64"]), field_seed("C1", 0), 1_000_000).tolist() == [211292]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("typ", ARROW_TYPES)
def test_every_length_matches_xxhash(seed: int, typ: pa.DataType) -> None:
    vals = _mixed_values()
    arr = pa.array(vals, type=typ)
    assert xxh64_strings(arr, seed).tolist() == _expected(vals, seed)
    assert xxh64_strings(arr[5:60], seed).tolist() == _expected(vals[5:60], seed)     # sliced arrays
    assert xxh64_strings_unique(arr, seed).tolist() == _expected(vals, seed)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_polars_series_and_chunked(seed: int) -> None:
    vals = _mixed_values()
    s = pl.Series(vals)
    assert xxh64_strings(s, seed).tolist() == _expected(vals, seed)
    assert xxh64_strings(s.slice(3, 40), seed).tolist() == _expected(vals[3:43], seed)
    chunked = pa.chunked_array([pa.array(vals[:10]), pa.array(vals[10:])])
    assert xxh64_strings(chunked, seed).tolist() == _expected(vals, seed)


def test_mostly_fixed_length_fast_path() -> None:
    rng = random.Random(3)
    vals = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.2 else rng.choice([None, "", "abc", "x" * 20])
            for _ in range(5000)]
    for typ in ARROW_TYPES:
        assert xxh64_strings(pa.array(vals, type=typ), 5).tolist() == _expected(vals, 5)
    only8 = [v for v in vals if v and len(v) == 8]
    assert xxh64_strings(pl.Series(only8), 5).tolist() == _expected(only8, 5)


def test_integer_columns_hash_their_decimal_text() -> None:
    ints = pl.Series([1, None, -5, 123456789012])
    assert xxh64_strings(ints, 9).tolist() == _expected(["1", None, "-5", "123456789012"], 9)


@pytest.mark.parametrize("bins", [2, 10, 1_000_003, 2**31 - 1, 2**31, 2**40])
def test_hash_ids_convention(bins: int) -> None:
    vals = _mixed_values()
    for typ in ARROW_TYPES:
        got = hash_ids(pa.array(vals, type=typ), 77, bins)
        want = [0 if not v else 1 + xxhash.xxh64_intdigest(v.encode(), seed=77) % (bins - 1) for v in vals]
        assert got.dtype == (np.int32 if bins < 2**31 else np.int64)
        assert got.tolist() == want
    h = xxh64_strings(pa.array(vals), 77)
    missing = np.array([not v for v in vals])
    assert ids_from_hashes(h, missing, bins).tolist() == hash_ids(pl.Series(vals), 77, bins).tolist()


def test_empty_input() -> None:
    assert xxh64_strings(pl.Series([], dtype=pl.String), 0).shape == (0,)
    assert hash_ids(pl.Series([], dtype=pl.String), 0, 10).dtype == np.int32
    assert hash_ids(pl.Series([None, None], dtype=pl.String), 0, 10).tolist() == [0, 0]
