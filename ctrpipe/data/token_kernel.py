"""Stage 1: token columns through the compiled kernels (`_native.token_counts` / `token_hashes`), and
string columns through `_native.hash_strings`.

`transforms.tokens_to_ids` / `tokens_hashes` and `chunks.column_hashes` ask here first (strings go to the
kernels as polars holds them, Arrow string views, with no copy) and take their polars + numpy path when this
returns None: the extension is not built (or CTRPIPE_NATIVE=0), or a weighted column holds a weight the
kernel does not parse itself (anything but a plain decimal such as '0.25' or '-3'; the polars path then
parses or reports it). Results are the same bytes either way: the kernel splits on the
separator as polars' str.split does, drops empty tokens, keeps the first or last max_len, hashes with the same
xxh64 and parses plain decimals exactly (tests compare both paths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ctrpipe.data.hashing import ids_from_hashes
from ctrpipe.native import native

Keep = Literal["first", "last"]
_NO_WEIGHTS = np.empty(0, dtype=np.float32)


@dataclass(frozen=True)
class KeptTokens:
    """The kept tokens of N rows, flattened in row order (row i owns the next lengths[i])."""

    hashes: np.ndarray              # (M,) uint64 xxh64 of each token (of its name, when weighted)
    lengths: np.ndarray             # (N,) int64, at most max_len
    weights: np.ndarray | None      # (M,) float32 when weighted
    hashes2: np.ndarray | None = None   # (M,) uint64 xxh64 of the same tokens with `kept_tokens`' seed2

    def second(self) -> KeptTokens:
        """The same tokens with the second seed's hashes."""
        assert self.hashes2 is not None
        return KeptTokens(self.hashes2, self.lengths, self.weights)

    def padded(self, max_len: int, bins: int, vocab: Any | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The `tokens_to_ids` triple: (N, max_len) ids (0 pads), (N,) int32 lengths, (N, max_len) weights.

        Ids are 1 + h % (bins - 1), or `vocab.lookup` of the hashes (a shared vocabulary's ids)."""
        none = np.zeros(len(self.hashes), dtype=bool)
        ids = ids_from_hashes(self.hashes, none, bins) if vocab is None else vocab.lookup(self.hashes, none)
        tokens = _pad(ids.astype(np.int32 if bins < 2**31 else np.int64, copy=False), self.lengths, max_len)
        weights = None if self.weights is None else _pad(self.weights, self.lengths, max_len)
        return tokens, self.lengths.astype(np.int32), weights


def _pad(flat: np.ndarray, lengths: np.ndarray, max_len: int) -> np.ndarray:
    """(N, max_len) rows holding the next lengths[i] items of `flat` each, left-aligned, 0 after."""
    out = np.zeros((len(lengths), max_len), dtype=flat.dtype)
    kernel = native()
    if kernel is not None and flat.dtype.itemsize == 4:
        kernel.pad_rows(np.ascontiguousarray(flat), np.ascontiguousarray(lengths, dtype=np.int64), max_len, out)
    else:   # row-major boolean assignment fills each row's first lengths[i] slots in flat order
        out[np.arange(max_len) < lengths[:, None]] = flat
    return out


def string_views(values: pl.Series) -> tuple[np.ndarray, tuple[Any, ...], np.ndarray | None] | None:
    """((N, 16) uint8 Arrow string views, their data buffers, (N,) null mask or None): polars' own layout,
    exported without a copy. Null rows get an all-zero view (an empty string), so kernels never follow
    whatever a null slot holds. None where this polars / pyarrow cannot give string views."""
    if values.dtype != pl.String:
        values = values.cast(pl.String)
    if values.n_chunks() > 1:
        values = values.rechunk()              # views only: the data buffers are shared, not copied
    arr = values.to_arrow(compat_level=pl.CompatLevel.newest())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_string_view(arr.type):
        try:
            arr = pc.cast(arr, pa.string_view())
        except (pa.ArrowNotImplementedError, AttributeError):    # pyarrow < 16 has no string views
            return None
    bufs = arr.buffers()
    views = np.frombuffer(bufs[1], dtype=np.uint8).reshape(-1, 16)[arr.offset: arr.offset + len(arr)]
    nulls = None
    if arr.null_count:
        nulls = arr.is_null().to_numpy(zero_copy_only=False)
        views = views.copy()
        views[nulls] = 0
    return views, tuple(b for b in bufs[2:] if b is not None), nulls


def kept_tokens(values: pl.Series, separator: str, keep: Keep, max_len: int, seed: int,
                weighted: bool, seed2: int | None = None) -> KeptTokens | None:
    """The kept tokens of a token column per the layout of `transforms`, or None (see the module docstring).
    Null rows hold no tokens, as the polars path reads them as ''. With `seed2`, `hashes2` holds the same
    tokens hashed with it too (a column read in two id spaces is split once)."""
    kernel = native()
    if kernel is None or not separator:
        return None
    got = string_views(values)
    if got is None:
        return None
    views, buffers, _ = got
    sep = separator.encode("utf-8")
    # room for every kept token: a row of L bytes holds at most (L + s) // (1 + s) non-empty tokens
    row_bytes = views.view(np.uint32)[:, 0].astype(np.int64)
    room = int(np.minimum((row_bytes + len(sep)) // (1 + len(sep)), max_len).sum())
    hashes = np.empty(room, dtype=np.uint64)
    weights = np.empty(room, dtype=np.float32) if weighted else _NO_WEIGHTS
    lengths = np.empty(len(views), dtype=np.int64)
    extra: tuple[Any, ...] = ()
    hashes2 = None
    if seed2 is not None:
        hashes2 = np.empty(room, dtype=np.uint64)
        extra = (seed2 & 0xFFFFFFFFFFFFFFFF, hashes2)
    k = kernel.token_hashes(views, buffers, sep, seed & 0xFFFFFFFFFFFFFFFF, weighted, keep == "last", max_len,
                            lengths, hashes, weights, *extra)
    if k < 0:
        return None                              # a weight the kernel does not parse: polars decides
    return KeptTokens(hashes[:k], lengths, weights[:k] if weighted else None,
                      None if hashes2 is None else hashes2[:k])


def weights_all_plain(values: pl.Series, separator: str) -> bool:
    """True when every token of a weighted column is 'name:weight' with a plain decimal weight (so no row is
    bad); False when some token is not, or the kernel is unavailable: then the exact check has to run."""
    kernel = native()
    if kernel is None or not separator:
        return False
    got = string_views(values)
    if got is None:
        return False
    views, buffers, _ = got
    counts = np.empty(len(views), dtype=np.int64)
    return bool(kernel.token_counts(views, buffers, separator.encode("utf-8"), True, counts) < 0)


def string_hashes(values: pl.Series, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """((N,) uint64 xxh64 of each value's UTF-8 text, (N,) bool null or empty) as `hashing.xxh64_strings` and
    `chunks.string_missing` give them (except that null rows hash as ''); None without the kernel."""
    kernel = native()
    if kernel is None or values.dtype != pl.String:
        return None
    got = string_views(values)
    if got is None:
        return None
    views, buffers, _ = got
    out = np.empty(len(views), dtype=np.uint64)
    kernel.hash_strings(views, buffers, seed & 0xFFFFFFFFFFFFFFFF, out)
    empty = views.view(np.uint32)[:, 0] == 0           # a view's length; null rows have all-zero views
    return out, empty
