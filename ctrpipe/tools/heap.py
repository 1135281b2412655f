"""`ctrpipe plan` on CPU: what glibc's malloc, as tuned by hostmem.py, makes of the tensors a step and an
evaluation allocate -- host RSS, not live bytes.

Measured on FT-Transformer (benchmarks/RESULTS.md, "Memory plan"): the heap is never trimmed below 1 GiB of
free top, so once a step has grown it, later requests of any size -- the 32 MiB+ ones too -- are carved from
its free chunks and top; only a request no free chunk can hold becomes a fresh mmap (evaluation's 335 MB FFN
activations at batch 16384), and is returned when freed. So between evaluations RSS = heap extent (it only
grows) + live mmaps, and the heap grows past the live peak wherever the sizes of a phase do not fit the holes
the last one left; the training loop releases the free heap before each evaluation (malloc_trim).
This module replays recorded allocation sequences through a small model of that allocator. It sees only the
tensors torch returns, so it misses fragmentation from other allocations: FT-Transformer's real heap holds
~1.7x its step's live peak, the replay about 1x (RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ctrpipe.hostmem import MMAP_THRESHOLD, TOP_PAD, TRIM_THRESHOLD

ALLOC, FREE, FREE_CARRIED = 0, 1, 2   # trace events: allocation n made, freed, or the previous run's n freed
ALIGN = 64                # torch's CPU allocator aligns to 64 bytes (posix_memalign); + malloc's 16-byte header


@dataclass(frozen=True)
class AllocTrace:
    """What a piece of code allocated and freed, in order: (ALLOC, n) allocates `sizes[n]` bytes (as a
    function of the batch: per_row * B + fixed), (FREE, n) frees allocation n, (FREE_CARRIED, n) frees
    allocation n of the previous run of the same code, which outlived it (a step's gradients live until the
    next step's zero_grad).

    Example: a (B, 8) float tensor made, a (B,) one made, the first freed -> events ((ALLOC, 0), (ALLOC, 1),
    (FREE, 0)), sizes ((32.0, 0.0), (4.0, 0.0)).
    """

    events: tuple[tuple[int, int], ...]
    sizes: tuple[tuple[float, float], ...]

    def at(self, rows: int) -> list[int]:
        """Byte size of each allocation at batch `rows`."""
        return [max(0, round(per_row * rows + fixed)) for per_row, fixed in self.sizes]

    @classmethod
    def fit(cls, points: Sequence[tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]]]) -> AllocTrace:
        """From (batch, events, sizes) recorded at two batch sizes: each allocation's size is linear in the
        batch. When the sequences differ (data-dependent code paths), the larger batch's sequence is kept and
        every size scaled in proportion to the batch."""
        (b1, ev1, s1), (b2, ev2, s2) = points[0], points[-1]
        if ev1 != ev2 or b1 == b2:
            return cls(tuple(ev2), tuple((s / b2, 0.0) for s in s2))
        sizes = []
        for m1, m2 in zip(s1, s2, strict=True):
            per_row = max(0.0, (m2 - m1) / (b2 - b1))
            sizes.append((per_row, m1 - per_row * b1))
        return cls(tuple(ev1), tuple(sizes))


class Heap:
    """glibc's main arena, reduced to what decides RSS: best-fit reuse of free chunks (coalesced with their
    neighbours), the top chunk, requests of `mmap_threshold` or more that nothing free can hold as mmaps, and
    trimming the top when more than `trim_threshold` of it is free. `rss` = heap bytes in use + the free heap
    bytes that were written since the last `trim` (freed pages stay resident) + live mmaps.

    `trim` is malloc_trim(0) (hostmem.release_free_heap, called before each CPU evaluation): the pages of
    every free chunk and of the top go back to the OS, and come back only as allocations write them again.
    Pages are tracked per free chunk as a count of written ("dirty") bytes; when a chunk is split, its
    remainder keeps its share of them.
    """

    def __init__(self, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                 top_pad: int = TOP_PAD) -> None:
        self.mmap_threshold, self.trim_threshold, self.top_pad = mmap_threshold, trim_threshold, top_pad
        self.free_at: dict[int, tuple[int, int]] = {}   # start -> (size, dirty bytes) of free chunks below the top
        self.free_end: dict[int, int] = {}     # end -> start of the same chunks
        self.top = 0                           # start of the free top chunk
        self.end = 0                           # end of the heap (sbrk)
        self.in_use = 0                        # heap bytes handed out and not freed
        self.dirty_free = 0                    # written bytes of the free chunks below the top
        self.top_dirty = 0                     # written bytes at the start of the top chunk
        self.mmapped = 0
        self.peak = 0

    @property
    def written(self) -> int:
        """Resident heap bytes."""
        return self.in_use + self.dirty_free + self.top_dirty

    @property
    def rss(self) -> int:
        return self.written + self.mmapped

    def malloc(self, nbytes: int) -> tuple[int, int]:
        """Returns (address, size); address -1 for an mmap."""
        n = -(-(nbytes + 16) // ALIGN) * ALIGN
        fits = [start for start, (size, _) in self.free_at.items() if size >= n]
        if fits:
            start = min(fits, key=lambda s: (self.free_at[s][0], s))
            size, dirty = self._take(start)
            if size > n:
                self._put(start + n, size - n, dirty * (size - n) // size)
            self.in_use += n
        elif self.end - self.top >= n or n < self.mmap_threshold:
            if self.end - self.top < n:
                self.end = self.top + n + self.top_pad
            start, self.top = self.top, self.top + n
            self.top_dirty = max(0, self.top_dirty - n)   # the block is written: counted in use from now
            self.in_use += n
        else:
            self.mmapped += n
            start = -1
        self.peak = max(self.peak, self.rss)
        return start, n

    def free(self, start: int, n: int) -> None:
        if start < 0:
            self.mmapped -= n
            return
        self.in_use -= n
        dirty = n                                           # a block in use was written
        if start + n in self.free_at:                       # merge with the next free chunk
            size, d = self._take(start + n)
            n, dirty = n + size, dirty + d
        if start in self.free_end:                          # and with the previous one
            prev = self.free_end[start]
            size, d = self._take(prev)
            n, dirty, start = n + size, dirty + d, prev
        if start + n == self.top:
            self.top = start
            self.top_dirty += dirty
            if self.end - self.top > self.trim_threshold:
                self.end = self.top + self.top_pad
                self.top_dirty = min(self.top_dirty, self.top_pad)
        else:
            self._put(start, n, dirty)

    def trim(self) -> None:
        """malloc_trim(0): every free page goes back to the OS, the top is cut to the last chunk in use."""
        for start, (size, _) in list(self.free_at.items()):
            self.free_at[start] = (size, 0)
        self.dirty_free = self.top_dirty = 0
        self.end = self.top

    def _put(self, start: int, size: int, dirty: int) -> None:
        self.free_at[start] = (size, dirty)
        self.free_end[start + size] = start
        self.dirty_free += dirty

    def _take(self, start: int) -> tuple[int, int]:
        size, dirty = self.free_at.pop(start)
        del self.free_end[start + size]
        self.dirty_free -= dirty
        return size, dirty


def replay(phases: Iterable[tuple[AllocTrace | None, int]], heap: Heap | None = None) -> Heap:
    """Run each (trace, batch) through `heap` in order; a (None, _) phase is a `Heap.trim`. Returns the heap
    (its `peak` is the peak RSS). What a run leaves alive is freed by the next run of the same trace
    (FREE_CARRIED) or, if it is not, then."""
    heap = heap or Heap()
    carried: dict[int, dict[int, tuple[int, int]]] = {}
    for trace, rows in phases:
        if trace is None:
            heap.trim()
            continue
        sizes = trace.at(rows)
        before = carried.pop(id(trace), {})
        live: dict[int, tuple[int, int]] = {}
        for op, n in trace.events:
            if op == ALLOC:
                live[n] = heap.malloc(sizes[n])
            elif op == FREE and n in live:
                heap.free(*live.pop(n))
            elif op == FREE_CARRIED and n in before:
                heap.free(*before.pop(n))
        for block in before.values():
            heap.free(*block)
        carried[id(trace)] = live
    for left in carried.values():
        for block in left.values():
            heap.free(*block)
    return heap


def working_set(step: AllocTrace, batch: int, evaluation: AllocTrace | None, eval_batch: int,
                steps_per_eval: int = 4, rounds: int = 3) -> int:
    """Peak host RSS that training's steps and evaluations add over what was resident before them:
    `rounds` x (`steps_per_eval` steps, one evaluation), replayed through Heap, the free heap released before
    each evaluation as the training loop does (hostmem.release_free_heap)."""
    phases: list[tuple[AllocTrace | None, int]] = []
    for _ in range(rounds):
        phases += [(step, batch)] * steps_per_eval
        if evaluation is not None:
            phases += [(None, 0), (evaluation, eval_batch)]
    return replay(phases).peak
