"""Stage 1: a uint64 -> int64 hash index over a fitted (sorted keys, values) table, for the write pass's
lookups (vocabulary ids, co-visitation counts).

Why not `np.searchsorted` on the sorted keys: the write pass looks up millions of keys per chunk, and a binary
search of a table larger than the CPU cache misses it on most of its ~20 steps. An open-addressing table
(linear probing from `key & (cap - 1)`) answers with about one cache miss per query. Keys are xxh64 or
splitmix outputs, so their low bits are already uniform. Slot key 0 marks an empty slot; a real key 0 is kept
beside the table. The compiled kernels (`_native.hash_build` / `hash_lookup`) build and probe it; without
them numpy does the same in vectorised rounds (one round per probe step, over the queries still probing).
Either way a lookup returns exactly what a binary search of the sorted table would.

Memory: `cap` is the power of two at or above keys / 0.7, so the index costs 16 bytes x 1.4 to 2.9 slots per
key beside the table it indexes, whatever the number of rows looked up.
"""

from __future__ import annotations

import numpy as np

from ctrpipe.native import native

_MAX_LOAD = 0.7      # linear probing stays short (about 2 probes for a hit, 4 for a miss) below this load
_LOOKUP_BLOCK = 1 << 18     # queries probed together by the numpy path (bounds its temporaries)


class HashIndex:
    """Exact lookups of uint64 keys in a table of distinct keys with int64 values."""

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        values = np.ascontiguousarray(values, dtype=np.int64)
        if keys.shape != values.shape or keys.ndim != 1:
            raise ValueError(f"keys {keys.shape} and values {values.shape} must be matching 1-D arrays")
        zero = keys == 0
        self.zero_value: int | None = int(values[zero][0]) if zero.any() else None
        if self.zero_value is not None:
            keys, values = keys[~zero], values[~zero]
        cap = 8
        while cap * _MAX_LOAD < len(keys):
            cap *= 2
        self.mask = np.uint64(cap - 1)
        self.table = np.zeros((cap, 2), dtype=np.uint64)       # (cap, 2): key, value bits
        kernel = native()
        if kernel is not None:
            kernel.hash_build(keys, values, self.table)
        else:
            self._build(keys, values)

    def _build(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Vectorised linear probing: in round r every key not yet placed tries slot home + r; of the keys
        that find the same free slot one is stored (keys are distinct, so reading the slot back tells which).
        A key placed at home + r saw slots home .. home + r - 1 taken (before or in earlier rounds), which is
        all a lookup needs."""
        table, mask = self.table, self.mask
        home = keys & mask
        pending = np.arange(len(keys))
        probe = np.uint64(0)
        while len(pending):
            slot = (home[pending] + probe) & mask
            free = table[slot, 0] == 0
            cand, cand_slot = pending[free], slot[free]
            table[cand_slot, 0] = keys[cand]
            won = table[cand_slot, 0] == keys[cand]
            table[cand_slot[won], 1] = values[cand[won]].view(np.uint64)
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[won]] = True
            pending = pending[~placed]
            probe += np.uint64(1)

    def lookup(self, queries: np.ndarray, default: int = 0) -> np.ndarray:
        """(N,) int64: the value of each query key, `default` where the table lacks it."""
        q = np.ascontiguousarray(queries, dtype=np.uint64)
        out = np.empty(len(q), dtype=np.int64)
        kernel = native()
        if kernel is not None:
            kernel.hash_lookup(self.table, q, int(default), out)
        else:
            self._lookup(q, int(default), out)
        if self.zero_value is not None:
            out[q == 0] = self.zero_value
        return out

    def _lookup(self, q: np.ndarray, default: int, out: np.ndarray) -> None:
        """Vectorised probing: each round checks one slot for every query still probing; a query stops at its
        key (found) or at an empty slot (absent). In blocks, so the temporaries stay small."""
        out[:] = default
        table, mask = self.table, self.mask
        for start in range(0, len(q), _LOOKUP_BLOCK):
            pending = start + np.flatnonzero(q[start: start + _LOOKUP_BLOCK] != 0)
            keys = q[pending]
            slot = keys & mask
            while len(pending):
                at = table[slot, 0]
                hit = at == keys
                out[pending[hit]] = table[slot[hit], 1].view(np.int64)
                go_on = ~hit & (at != 0)
                pending, keys, slot = pending[go_on], keys[go_on], (slot[go_on] + np.uint64(1)) & mask

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)


class HashCounter:
    """Counts of uint64 keys in an open-addressing table (the compiled `_native.hash_count`, so callers
    check `native()` first): each chunk's keys are counted in one pass over them, with no sort, and memory follows
    the number of distinct keys, never rows. `sorted()` gives the (keys, counts) table a sort-and-merge
    count would (counts are exact integers, so the order keys arrived in does not matter)."""

    def __init__(self) -> None:
        kernel = native()
        if kernel is None:
            raise RuntimeError("HashCounter needs the compiled kernels (ctrpipe._native)")
        self.kernel = kernel
        self.table = np.zeros((1024, 2), dtype=np.uint64)      # (cap, 2): key, count
        self.used = 0
        self.zeros = 0                                          # key 0 marks empty slots: counted apart

    def add(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        while True:
            max_used = int(len(self.table) * _MAX_LOAD)
            consumed, self.used, zeros = self.kernel.hash_count(self.table, keys, self.used, max_used)
            self.zeros += zeros
            if consumed == len(keys):
                return
            keys = keys[consumed:]
            self._grow()

    def _grow(self) -> None:
        keys, counts = self._entries()
        self.table = np.zeros((len(self.table) * 2, 2), dtype=np.uint64)
        self.kernel.hash_build(keys, counts, self.table)

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.table[:, 0] != 0
        return self.table[used, 0], self.table[used, 1].view(np.int64)

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted distinct keys, int64 counts)."""
        # sort the keys alone (a sort beats an argsort and two gathers by far) and read their counts back from
        # the table, one probe each
        slots = self.table[:, 0]
        keys = np.sort(slots[slots != 0])
        counts = np.empty(len(keys), dtype=np.int64)
        self.kernel.hash_lookup(self.table, keys, 0, counts)
        if self.zeros:
            keys = np.concatenate([np.zeros(1, dtype=np.uint64), keys])
            counts = np.concatenate([np.array([self.zeros], dtype=np.int64), counts])
        return keys, counts
