"""Stage 1: per-chunk column transforms: log1p for numeric columns, token columns -> padded id matrices.

Token layout (multihot and sequence), one row per input row, L = max_len::

    'a|b|c' with max_len 2, keep='last'  (sequence: the most recent tokens)  -> tokens [id(b), id(c)], len 2
    'a|b|c' with max_len 2, keep='first' (multihot)                           -> tokens [id(a), id(b)], len 2
    'a'     with max_len 2                                                    -> tokens [id(a), 0],     len 1
    'a:0.5|b:2' weighted                                                      -> weights [0.5, 2.0]

Valid tokens are left-aligned, in input order (most recent last within the valid prefix), 0 pads the rest.
Empty tokens ('a||b', a trailing separator) carry no token and are dropped.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl

from ctrpipe.data.fitted import VocabTable
from ctrpipe.data.hashing import hash_ids, xxh64_strings
from ctrpipe.data.token_kernel import kept_tokens
from ctrpipe.errors import InputFormatError, location

Keep = Literal["first", "last"]


def log1p_transform(x: np.ndarray, mode: Literal["signed", "clip", "none"],
                    out: np.ndarray | None = None) -> np.ndarray:
    """float32, same shape. signed: sign(x) * log1p(|x|) keeps negatives ordered; clip: log1p(max(x, 0));
    none: x as is. NaN stays NaN (imputation happens before or after, by the caller's choice).
    `out` (float32, x's shape, not overlapping x) receives the result without temporaries."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "none":
        if out is None:
            return x.copy()
        np.copyto(out, x)
        return out
    if mode == "clip":
        t = np.maximum(x, np.float32(0), out=out)
        return np.log1p(t, out=t)
    if mode == "signed":
        t = np.abs(x, out=out)
        np.log1p(t, out=t)
        return np.copysign(t, x, out=t)
    raise ValueError(f"unknown log1p mode {mode!r}")


def weight_error(column: str, example: str, reason: str, where: str = "") -> InputFormatError:
    """The one message for a malformed weighted token, used by readers (which know the line) and here."""
    return InputFormatError(
        f"weighted token column {column!r}: {reason} in {example[:80]!r}",
        where=where or location(column=column),
        fix="write every token as name:weight with a finite number within float32 (e.g. 'a:0.5|b:2'), or set "
            "weighted: false for this column")


def first_bad_weight(values: pl.Series, separator: str) -> tuple[int, str] | None:
    """(row index, reason) of the first row whose tokens are not all 'name:weight' with a finite weight."""
    found = BadWeights(values, separator)
    return (int(found.rows[0]), found.reason(int(found.rows[0]))) if len(found.rows) else None


class BadWeights:
    """Every row whose tokens are not all 'name:weight' with a finite weight, found in one pass over the
    column (a reader skipping bad rows flags them all at once, not one pass per bad row)."""

    def __init__(self, values: pl.Series, separator: str) -> None:
        flat, row, weights, names = _explode(values, separator, weighted=True, strict=False, as_float32=False)
        self._at = np.flatnonzero(_bad_weights(names, weights))          # bad tokens, in row order
        self._row, self._flat, self._names, self._weights = row[self._at], flat, names, weights
        self.rows: np.ndarray = np.unique(self._row)                       # sorted row indices

    def reason(self, row: int) -> str:
        """Why `row` (one of `rows`) is bad: its first bad token."""
        i = int(self._at[np.searchsorted(self._row, row)])
        return _weight_reason(self._flat, self._names, i, self._weights)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bad_weights(names: pl.Series, weights: np.ndarray) -> np.ndarray:
    """A token needs a non-empty name and a finite weight within float32, as the cache stores it (nulls ->
    NaN in `weights`; 1e40 would be stored as inf)."""
    with np.errstate(invalid="ignore"):
        beyond = np.abs(weights) > FLOAT32_MAX
    return (names.str.len_bytes().fill_null(0) == 0).to_numpy() | ~np.isfinite(weights) | beyond


def _weight_reason(flat: pl.Series, names: pl.Series, i: int, weights: np.ndarray | None = None) -> str:
    if names[i] is None:
        return f"token {flat[i]!r} has no ':weight'"
    if names[i] == "":
        return f"token {flat[i]!r} has no name before ':'"
    if weights is not None and np.isfinite(weights[i]) and abs(weights[i]) > FLOAT32_MAX:
        return f"the weight of token {flat[i]!r} is beyond float32 (at most {FLOAT32_MAX:.3g} either way)"
    return f"bad weight in token {flat[i]!r}"


def _explode(values: pl.Series, separator: str, weighted: bool, strict: bool = True, as_float32: bool = True,
             ) -> tuple[pl.Series, np.ndarray, np.ndarray, pl.Series]:
    """Non-empty tokens of every row, flattened in row order: (raw tokens, row index, weights, names).

    weights are 1.0 and names = raw tokens when not weighted; weighted tokens split at their LAST ':'.
    """
    s = values.cast(pl.String).fill_null("")
    lists = s.str.split(separator, inclusive=False)
    counts = lists.list.len().to_numpy().astype(np.int64)
    flat = lists.explode()
    row = np.repeat(np.arange(len(s), dtype=np.int64), counts)
    nonempty = (flat.str.len_bytes() > 0).fill_null(False).to_numpy()
    if not nonempty.all():
        flat = flat.filter(pl.Series(nonempty))
        row = row[nonempty]
    if not weighted:
        return flat, row, np.ones(len(flat), dtype=np.float32), flat
    parts = flat.str.extract_groups(r"^(.*):([^:]*)$")
    names = parts.struct.field("1")
    weights = parts.struct.field("2").str.strip_chars().cast(pl.Float64, strict=False).to_numpy()
    if strict:
        bad = _bad_weights(names, weights)
        if bad.any():
            i = int(np.argmax(bad))
            raise weight_error(str(values.name), str(values[int(row[i])]), _weight_reason(flat, names, i, weights))
    if not as_float32:
        return flat, row, weights, names
    with np.errstate(over="ignore"):        # not strict: a weight beyond float32 is inf, as the caller checks
        return flat, row, weights.astype(np.float32), names


def _select(row: np.ndarray, n: int, max_len: int, keep: Keep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which flat tokens to keep and where: (keep mask, slot in the row, (n,) lengths)."""
    counts = np.bincount(row, minlength=n).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(len(row), dtype=np.int64) - starts[row]              # position within its row
    lengths = np.minimum(counts, max_len)
    if keep == "first":
        mask = pos < max_len
        slot = pos
    else:
        drop = counts - lengths                                           # oldest tokens dropped
        mask = pos >= drop[row]
        slot = pos - drop[row]
    return mask, slot[mask], lengths.astype(np.int32)


def tokens_to_ids(values: pl.Series, separator: str, max_len: int, seed: int, bins: int, weighted: bool,
                  keep: Keep, vocab: VocabTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(N, max_len) int32 ids (0 = padding), (N,) int32 lengths, (N, max_len) float32 weights or None.

    Ids follow the categorical convention 1 + xxh64(token) % (bins - 1), or, with `vocab` (a token column
    sharing a vocabulary-mode categorical column's id space), that vocabulary's ids of xxh64(token), 1 for
    tokens it lacks. keep='last' for sequences (most recent tokens), 'first' for multihot. A malformed weight
    raises InputFormatError naming the column.
    """
    fast = kept_tokens(values, separator, keep, max_len, seed, weighted)     # the compiled kernel, or None
    if fast is not None:
        return fast.padded(max_len, bins, vocab)
    return polars_tokens_to_ids(values, separator, max_len, seed, bins, weighted, keep, vocab)


def polars_tokens_to_ids(values: pl.Series, separator: str, max_len: int, seed: int, bins: int, weighted: bool,
                         keep: Keep, vocab: VocabTable | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`tokens_to_ids` without trying the compiled kernel (for a caller that already learned it declines)."""
    n = len(values)
    flat, row, w, names = _explode(values, separator, weighted)
    mask, slot, lengths = _select(row, n, max_len, keep)
    dtype = np.int32 if bins < 2**31 else np.int64
    tokens = np.zeros((n, max_len), dtype=dtype)
    weights = np.zeros((n, max_len), dtype=np.float32) if weighted else None
    if len(flat):
        kept = names.filter(pl.Series(mask)) if not mask.all() else names
        if vocab is None:
            tokens[row[mask], slot] = hash_ids(kept, seed, bins)
        else:
            tokens[row[mask], slot] = vocab.lookup(xxh64_strings(kept, seed), np.zeros(len(kept), dtype=bool))
        if weights is not None:
            weights[row[mask], slot] = w[mask]
    return tokens, lengths, weights


def tokens_hashes(values: pl.Series, separator: str, keep: Keep, max_len: int, seed: int,
                  weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Full 64-bit hashes of the kept tokens, flattened in row order, and (N,) int64 lengths.

    Pre-modulo, so co-visitation counts on full-precision token identities; the same tokens, in the same
    order, as `tokens_to_ids` keeps. Pass weighted=True for 'name:weight' columns so names are hashed.
    """
    fast = kept_tokens(values, separator, keep, max_len, seed, weighted)     # the compiled kernel, or None
    if fast is not None:
        return fast.hashes, fast.lengths
    return polars_tokens_hashes(values, separator, keep, max_len, seed, weighted)


def polars_tokens_hashes(values: pl.Series, separator: str, keep: Keep, max_len: int, seed: int,
                         weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`tokens_hashes` without trying the compiled kernel (for a caller that already learned it declines)."""
    n = len(values)
    flat, row, _, names = _explode(values, separator, weighted)
    mask, _, lengths = _select(row, n, max_len, keep)
    kept = names.filter(pl.Series(mask)) if len(mask) and not mask.all() else names
    return xxh64_strings(kept, seed), lengths.astype(np.int64)
