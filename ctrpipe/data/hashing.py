"""Stage 1: exact xxh64 of string columns, vectorised in numpy over Arrow buffers (no Python loop per row).

Ids convention: id = 1 + xxh64(utf8 value, seed=field_seed) % (bins - 1); 0 = missing (null or empty string).

Why numpy rather than `xxhash` per distinct value: see `benchmarks/bench_hash.py` (figures in benchmarks/RESULTS.md).
Values of at most 12 bytes sit inline in an Arrow string view, so Criteo's 8-byte values are hashed straight
from polars' buffers with no copy; the arithmetic runs in cache-sized blocks with in-place ufuncs.
Strings longer than `_MAX_VECTOR_LEN` bytes are rare and go through `xxhash` one by one (still exact).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

P1 = np.uint64(0x9E3779B185EBCA87)
P2 = np.uint64(0xC2B2AE3D27D4EB4F)
P3 = np.uint64(0x165667B19E3779F9)
P4 = np.uint64(0x85EBCA77C2B2AE63)
P5 = np.uint64(0x27D4EB2F165667C5)
_MASK32 = np.uint64(0xFFFFFFFF)
_MAX_VECTOR_LEN = 256   # longer strings: per-value xxhash (a by-length loop would cost O(L^2) numpy calls)
_BLOCK = 32768          # rows per arithmetic block: 3 uint64 temporaries of this size stay in L2 cache

WordFn = Callable[[int, slice], np.ndarray]   # (word index j, row slice) -> bytes [8j, 8j+8) as uint64 LE


def field_seed(field: str, hash_seed: int) -> int:
    """Per-field seed so equal values in different fields get unrelated ids."""
    return xxhash.xxh64_intdigest(field.encode("utf-8"), seed=hash_seed)


def _wrap(x: int) -> np.uint64:
    return np.uint64(x % 2**64)


def _rotl_(x: np.ndarray, r: int, tmp: np.ndarray) -> None:
    """x = rotl(x, r) in place."""
    np.right_shift(x, np.uint64(64 - r), out=tmp)
    np.left_shift(x, np.uint64(r), out=x)
    np.bitwise_or(x, tmp, out=x)


def _round_(acc: np.ndarray, lane: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray) -> None:
    """acc = rotl(acc + lane * P2, 31) * P1 in place."""
    np.multiply(lane, P2, out=tmp2)
    np.add(acc, tmp2, out=acc)
    _rotl_(acc, 31, tmp)
    np.multiply(acc, P1, out=acc)


def _xxh64_block(word: WordFn, sl: slice, m: int, length: int, seed: int, out: np.ndarray) -> None:
    """xxh64 of m strings of `length` bytes whose words `word(j, sl)` gives; result into out (m,)."""
    tmp, tmp2 = np.empty(m, np.uint64), np.empty(m, np.uint64)
    h = out
    pos = 0
    if length >= 32:
        acc = [np.full(m, _wrap(s), np.uint64) for s in (seed + int(P1) + int(P2), seed + int(P2), seed,
                                                           seed - int(P1))]
        while pos + 32 <= length:
            for i, v in enumerate(acc):
                _round_(v, word(pos // 8 + i, sl), tmp, tmp2)
            pos += 32
        h[:] = 0
        for v, r in zip(acc, (1, 7, 12, 18), strict=True):
            tmp2[:] = v
            _rotl_(tmp2, r, tmp)
            np.add(h, tmp2, out=h)
        zero = np.empty(m, np.uint64)
        for v in acc:
            zero[:] = 0
            _round_(zero, v, tmp, tmp2)
            np.bitwise_xor(h, zero, out=h)
            np.multiply(h, P1, out=h)
            np.add(h, P4, out=h)
        np.add(h, np.uint64(length), out=h)
    first = length < 32         # h is still the constant seed + P5 + length: the first word xors into it
    while pos + 8 <= length:
        np.multiply(word(pos // 8, sl), P2, out=tmp2)        # k1 = round(0, lane)
        _rotl_(tmp2, 31, tmp)
        np.multiply(tmp2, P1, out=tmp2)
        if first:
            np.bitwise_xor(tmp2, _wrap(seed + int(P5) + length), out=h)
            first = False
        else:
            np.bitwise_xor(h, tmp2, out=h)
        _rotl_(h, 27, tmp)
        np.multiply(h, P1, out=h)
        np.add(h, P4, out=h)
        pos += 8
    if first:                               # 4..7 bytes: no 8-byte word was mixed in
        h[:] = _wrap(seed + int(P5) + length)
    if pos + 4 <= length:
        np.bitwise_and(word(pos // 8, sl), _MASK32, out=tmp2)
        np.multiply(tmp2, P1, out=tmp2)
        np.bitwise_xor(h, tmp2, out=h)
        _rotl_(h, 23, tmp)
        np.multiply(h, P2, out=h)
        np.add(h, P3, out=h)
        pos += 4
    while pos < length:
        np.right_shift(word(pos // 8, sl), np.uint64(8 * (pos % 8)), out=tmp2)
        np.bitwise_and(tmp2, np.uint64(0xFF), out=tmp2)
        np.multiply(tmp2, P5, out=tmp2)
        np.bitwise_xor(h, tmp2, out=h)
        _rotl_(h, 11, tmp)
        np.multiply(h, P1, out=h)
        pos += 1
    for shift, prime in ((33, P2), (29, P3), (32, None)):
        np.right_shift(h, np.uint64(shift), out=tmp)
        np.bitwise_xor(h, tmp, out=h)
        if prime is not None:
            np.multiply(h, prime, out=h)


def _id_dtype(bins: int) -> type[np.signedinteger]:
    return np.int32 if bins < 2**31 else np.int64


def _xxh64_rows(word: WordFn, n: int, length: int, seed: int, bins: int | None) -> np.ndarray:
    """Blocked driver: hash n strings of one length, _BLOCK rows at a time. With `bins`, return ids
    1 + h % (bins - 1) instead, computed in the same block while the hashes are still in cache."""
    if bins is None:
        out = np.empty(n, np.uint64)
        for start in range(0, n, _BLOCK):
            stop = min(n, start + _BLOCK)
            _xxh64_block(word, slice(start, stop), stop - start, length, seed, out[start:stop])
        return out
    ids = np.empty(n, _id_dtype(bins))
    h = np.empty(min(n, _BLOCK), np.uint64)
    q = np.empty_like(h)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        hb = h[: stop - start]
        _xxh64_block(word, slice(start, stop), stop - start, length, seed, hb)
        _ids_(hb, bins, q[: stop - start], ids[start:stop])
    return ids


def _ids_(h: np.ndarray, bins: int, q: np.ndarray, out: np.ndarray) -> None:
    """out = 1 + h % (bins - 1), with h as scratch. Division by a scalar uses numpy's multiply-shift divider
    (`remainder` issues a hardware division per element, which is much slower); the + 1 is fused
    with the int32/int64 store."""
    mod = np.uint64(bins - 1)
    np.floor_divide(h, mod, out=q)
    np.multiply(q, mod, out=q)
    np.subtract(h, q, out=h)
    np.add(h, np.uint64(1), out=out, casting="unsafe")


def _gathered_words(data: np.ndarray, starts: np.ndarray, length: int) -> WordFn:
    """Words of strings data[starts[i] : starts[i] + length], gathered into a zero-padded (m, W) uint64."""
    width = -(-length // 8) * 8
    mat = np.zeros((len(starts), width), np.uint8)
    mat[:, :length] = data[starts[:, None] + np.arange(length)]
    words = mat.view("<u8")
    return lambda j, sl: words[sl, j]


def _inline_words(views: np.ndarray) -> WordFn:
    """Words of string-view rows stored inline (<= 12 bytes): a view is [len:4][data:12] (16 bytes, LE).

    Word 0 (data bytes 0..7) is read in place as an unaligned strided uint64 at byte 4 of each view: no copy.
    """
    views = np.ascontiguousarray(views)                   # (n, 2) uint64
    raw = views.view(np.uint8).reshape(-1)
    w0 = np.ndarray(shape=(len(views),), dtype="<u8", buffer=raw, offset=4, strides=(16,))
    w1 = views[:, 1]

    def word(j: int, sl: slice) -> np.ndarray:
        return w0[sl] if j == 0 else w1[sl] >> np.uint64(32)
    return word


def _hash_groups(lengths: np.ndarray, seed: int, words_for: Callable[[np.ndarray | None, int], WordFn | None],
                 long_bytes: Callable[[int], bytes], bins: int | None, nulls: np.ndarray | None) -> np.ndarray:
    """Hash every row, one pass per distinct length. The largest group is hashed over all rows at once (no
    gather), which is right for its rows; the other groups then overwrite theirs. Rows in `nulls` get 0,
    and so do empty strings in ids mode (both written once, at the end)."""
    n = len(lengths)
    if n == 0:
        return np.empty(0, np.uint64 if bins is None else _id_dtype(bins))
    lengths = np.ascontiguousarray(lengths)     # string views give a strided view: one copy, cheaper passes
    zero = lengths == 0
    n_zero = int(np.count_nonzero(zero))
    longest = int(lengths.max())
    if longest <= _MAX_VECTOR_LEN and (longest == 0 or np.count_nonzero(lengths == longest) + n_zero == n):
        capped = lengths                       # common case (Criteo): one length plus empty/missing values
        order = [longest, 0] if longest else [0]
    else:
        capped = np.minimum(lengths, _MAX_VECTOR_LEN + 1)
        counts = np.bincount(capped)
        order = [int(x) for x in np.argsort(-counts, kind="stable") if counts[x] > 0]
    all_rows = words_for(None, order[0]) if 0 < order[0] <= _MAX_VECTOR_LEN else None
    if all_rows is not None:
        out = _xxh64_rows(all_rows, n, order[0], seed, bins)
        order = order[1:]
    else:
        out = np.empty(n, np.uint64 if bins is None else _id_dtype(bins))
    for length in order:
        if length > _MAX_VECTOR_LEN:
            rows = np.flatnonzero(capped == length)
            h = np.array([xxhash.xxh64_intdigest(long_bytes(i), seed=seed) for i in rows.tolist()], np.uint64)
            out[rows] = h if bins is None else h % np.uint64(bins - 1) + np.uint64(1)
        elif length == 0:   # empty string: its real hash in hash mode; missing (id 0) in ids mode, below
            if bins is None and n_zero:
                out[zero] = xxhash.xxh64_intdigest(b"", seed=seed)
        else:
            rows = np.flatnonzero(capped == length)
            out[rows] = _xxh64_rows(words_for(rows, length), len(rows), length, seed, bins)
    if bins is not None and (n_zero or nulls is not None):
        out[zero if nulls is None else zero | nulls] = 0
    elif nulls is not None:
        out[nulls] = 0
    return out


def _hash_string_view(arr: pa.Array, seed: int, bins: int | None, nulls: np.ndarray | None) -> np.ndarray:
    """Hashes (or ids) of a string_view array; values <= 12 bytes are read inline, zero-copy."""
    n = len(arr)
    bufs = arr.buffers()
    views = np.frombuffer(bufs[1], np.uint64).reshape(-1, 2)[arr.offset: arr.offset + n]   # (n, 2)
    lengths = np.frombuffer(bufs[1], np.uint32).reshape(-1, 4)[arr.offset: arr.offset + n, 0]
    data = [np.frombuffer(b, np.uint8) if b is not None else np.zeros(0, np.uint8) for b in bufs[2:]]
    ref = np.frombuffer(bufs[1], np.uint32).reshape(-1, 4)[arr.offset: arr.offset + n, 2:]  # (buffer, offset)

    def words_for(rows: np.ndarray | None, length: int) -> WordFn | None:
        if length <= 12:
            return _inline_words(views if rows is None else views[rows])
        if rows is None:
            return None
        bi, off = ref[rows, 0].astype(np.int64), ref[rows, 1].astype(np.int64)
        mat = np.zeros((len(rows), -(-length // 8)), np.uint64)
        for b in np.unique(bi).tolist():
            sel = bi == b
            gathered = _gathered_words(data[b], off[sel], length)
            mat[sel] = np.stack([gathered(j, slice(None)) for j in range(mat.shape[1])], axis=1)
        return lambda j, sl: mat[sl, j]

    def long_bytes(i: int) -> bytes:
        b, off = int(ref[i, 0]), int(ref[i, 1])
        return data[b][off: off + int(lengths[i])].tobytes()

    return _hash_groups(lengths, seed, words_for, long_bytes, bins, nulls)


def _hash_offsets(arr: pa.Array, seed: int, bins: int | None, nulls: np.ndarray | None) -> np.ndarray:
    if not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.large_string())
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], np.int64)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    nonempty = lengths[lengths > 0]
    contiguous = len(nonempty) > 0 and bool((nonempty == nonempty[0]).all())

    def words_for(rows: np.ndarray | None, length: int) -> WordFn | None:
        if rows is None:
            if not contiguous or length % 8:
                return None
            # all non-empty values have this length: the data buffer is already (m, L); spread to n rows
            body = data[offsets[0]: offsets[-1]].view("<u8").reshape(-1, length // 8)
            pos = np.maximum(np.cumsum(lengths > 0) - 1, 0)
            return lambda j, sl: body[pos[sl], j]
        return _gathered_words(data, offsets[rows], length)

    def long_bytes(i: int) -> bytes:
        return data[offsets[i]: offsets[i + 1]].tobytes()

    return _hash_groups(lengths, seed, words_for, long_bytes, bins, nulls)


def _arrow_chunks(values: pa.Array | pa.ChunkedArray | pl.Series) -> list[pa.Array]:
    if isinstance(values, pl.Series):
        if values.dtype != pl.String:
            values = values.cast(pl.String)
        values = values.to_arrow(compat_level=pl.CompatLevel.newest())   # string_view: zero-copy
    if isinstance(values, pa.ChunkedArray):
        return list(values.chunks)
    return [values]


def _null_mask(arr: pa.Array) -> np.ndarray:
    """(n,) bool from the validity bitmap (cheaper than is_null().to_numpy())."""
    validity = arr.buffers()[0]
    if validity is None:
        return arr.is_null().to_numpy(zero_copy_only=False)
    bits = np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")
    return bits[arr.offset: arr.offset + len(arr)] == 0


def _hash_chunk(arr: pa.Array, seed: int, bins: int | None) -> np.ndarray:
    """Hashes (bins=None) or ids of one Arrow array; null -> 0."""
    view = pa.types.is_string_view(arr.type)
    if not (view or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return _hash_chunk(pc.cast(arr, pa.string()), seed, bins)
    nulls = _null_mask(arr) if arr.null_count else None
    return (_hash_string_view if view else _hash_offsets)(arr, seed, bins, nulls)


def _hash_all(values: pa.Array | pa.ChunkedArray | pl.Series, seed: int, bins: int | None) -> np.ndarray:
    parts = [_hash_chunk(a, seed, bins) for a in _arrow_chunks(values)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros(0, np.uint64 if bins is None else _id_dtype(bins))
    return np.concatenate(parts)


def xxh64_strings(values: pa.Array | pa.ChunkedArray | pl.Series, seed: int) -> np.ndarray:
    """Exact xxh64 (uint64) of each value's UTF-8 bytes, as `xxhash.xxh64_intdigest`; null -> 0.

    Non-string input is cast to its decimal/text form first (integer categorical columns hash their text).
    """
    return _hash_all(values, seed, None)


def ids_from_hashes(h: np.ndarray, missing: np.ndarray, bins: int) -> np.ndarray:
    """Map full hashes to [1, bins) and missing rows to 0; int32 when bins fits, else int64.

    Cache-sized blocks and `_ids_` (numpy's divide-by-scalar) instead of `%`, which is slower."""
    n = len(h)
    ids = np.empty(n, _id_dtype(bins))
    tmp, q = np.empty(min(n, _BLOCK), np.uint64), np.empty(min(n, _BLOCK), np.uint64)
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        hb = tmp[: stop - start]
        hb[:] = h[start:stop]
        _ids_(hb, bins, q[: stop - start], ids[start:stop])
    ids[missing] = 0
    return ids


def hash_ids(values: pl.Series | pa.Array | pa.ChunkedArray, seed: int, bins: int) -> np.ndarray:
    """Categorical ids per the ids convention: null or empty string -> 0, else 1 + xxh64 % (bins - 1).

    int32 when bins < 2**31, else int64. Integer-typed input is hashed as its decimal text.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return _hash_all(values, seed, bins)


def xxh64_strings_unique(values: pa.Array | pa.ChunkedArray | pl.Series, seed: int) -> np.ndarray:
    """Same result as `xxh64_strings`, by hashing distinct values with Python `xxhash` and joining back.

    Kept as the baseline that `benchmarks/bench_hash.py` compares against (and as a cross-check in tests).
    """
    if isinstance(values, pl.Series):
        values = values.cast(pl.String).to_arrow()
    enc = pc.dictionary_encode(values)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    uniq = enc.dictionary.to_pylist()
    table = np.array([xxhash.xxh64_intdigest(v.encode("utf-8"), seed=seed) for v in uniq], dtype=np.uint64)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    valid = ~enc.indices.is_null().to_numpy(zero_copy_only=False)
    out = np.zeros(len(enc), dtype=np.uint64)
    out[valid] = table[idx[valid].astype(np.int64)]
    return out
