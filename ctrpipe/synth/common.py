"""Synthetic data, shared parts: per-block RNG streams, Zipf sampling, bijective scrambles, string building,
bias/scale calibration, metrics and atomic files. Both generators (Criteo text, Parquet) build on these.

synth imports nothing from the rest of ctrpipe, on purpose: its oracle (the true probability of every row)
is an independent check of the pipeline, and its files must not change when pipeline code does. So `mix64`
and `sigmoid` here are deliberate copies of `ctrpipe.data.splits.mix64` / `ctrpipe.train.metrics.sigmoid`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Rows per RNG stream. Output depends on (seed, stream, block index) only, never on how many blocks are
# generated or written at once; changing this constant changes every file, so it is versioned with the data.
BLOCK_ROWS = 1 << 14
GENERATOR_VERSION = 2         # 2: Parquet gains item_id and the candidate x history click term
_TAG = 0x5EED_C7F  # keeps synth's streams apart from any other use of the same user seed
_M32 = np.uint64(0xFFFF_FFFF)


class Stream(IntEnum):
    """Independent random streams drawn from one seed."""

    TRAIN = 0
    TEST = 1
    CALIB = 2   # rows used only to calibrate the hidden model's bias and scale
    MODEL = 3   # the hidden model's weights


def block_rng(seed: int, stream: Stream, block: int) -> np.random.Generator:
    """The generator for one block of rows: a pure function of (seed, stream, block)."""
    return np.random.default_rng([_TAG, seed, int(stream), block])


def model_rng(seed: int, part: int) -> np.random.Generator:
    """The generator for one part of a hidden model (part numbers keep formats apart)."""
    return np.random.default_rng([_TAG, seed, int(Stream.MODEL), part])


def block_ranges(rows: int) -> Iterator[tuple[int, int]]:
    """(block index, rows kept from that block) covering `rows`; the last block is cut, never redrawn."""
    for b in range((rows + BLOCK_ROWS - 1) // BLOCK_ROWS):
        yield b, min(BLOCK_ROWS, rows - b * BLOCK_ROWS)


def zipf_ranks(u: np.ndarray, vocab: int, s: float) -> np.ndarray:
    """Map uniforms in [0, 1) to ranks 0..vocab-1 with P(rank k) roughly (k+1)^-s (power-law inverse CDF).

    Closed form, so a 3M vocabulary needs no table; rank 0 is the most frequent value."""
    a = 1.0 - s
    if abs(a) < 1e-9:
        x = np.exp(u * np.log(vocab + 1.0))
    else:
        x = (1.0 + u * ((vocab + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(x.astype(np.int64), vocab) - 1


def mix64(x: np.ndarray, key: int = 0) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic): a fixed pseudo-random function of x and key.

    Kept apart from `ctrpipe.data.splits.mix64` on purpose (see the module docstring): generated data is
    versioned by GENERATOR_VERSION, not by the pipeline's hashing code."""
    z = x.astype(np.uint64) ^ np.uint64(key & 0xFFFF_FFFF_FFFF_FFFF)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def scramble32(x: np.ndarray, key: int) -> np.ndarray:
    """A bijection of [0, 2^32) keyed per field: value index -> random-looking 32-bit id (no collisions)."""
    z = (x.astype(np.uint64) ^ np.uint64(key & 0xFFFF_FFFF)) & _M32
    z = (z * np.uint64(0x9E3779B1)) & _M32          # odd multiplier: invertible mod 2^32
    z ^= z >> np.uint64(15)
    z = (z * np.uint64(0x85EBCA77)) & _M32
    z ^= z >> np.uint64(13)
    z = (z * np.uint64(0xC2B2AE3D)) & _M32
    z ^= z >> np.uint64(16)
    return z.astype(np.uint32)


# byte -> its two lowercase hex digits, packed little-endian so a uint16 view yields them in reading order
_HEX_PAIRS = np.array([ord(f"{b:02x}"[0]) | (ord(f"{b:02x}"[1]) << 8) for b in range(256)], dtype="<u2")


def hex8_strings(x: np.ndarray, missing: np.ndarray) -> pa.StringArray:
    """uint32 ids -> 8-digit lowercase hex strings ('0a1b2c3d'); missing rows -> null."""
    be = x.astype(">u4").view(np.uint8).reshape(-1, 4)            # (n, 4) most significant byte first
    chars = _HEX_PAIRS[be].view(np.uint8).reshape(-1, 8)           # (n, 8) ascii
    return fixed_width_strings(chars, ~missing)


def fixed_width_strings(chars: np.ndarray, valid: np.ndarray) -> pa.StringArray:
    """(n, w) ascii bytes -> arrow strings of width w, null where not valid, built from buffers (no copies
    per row)."""
    n, w = chars.shape
    data = np.ascontiguousarray(chars[valid]).ravel()
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(valid.astype(np.int32) * w, out=offsets[1:])
    null_count = int(n - valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if null_count else None
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data), bitmap, null_count)


def int_strings(x: np.ndarray, missing: np.ndarray | None = None) -> pa.Array:
    """Integers -> decimal strings (null where missing)."""
    return pc.cast(pa.array(x, mask=missing), pa.string())


def joined_tokens(tokens: pa.Array, lengths: np.ndarray, sep: str) -> pa.Array:
    """Flat token strings + per-row lengths -> one 'a<sep>b<sep>c' string per row ('' for length 0)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), tokens)
    return pc.binary_join(lists, sep)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The hidden model's link; kept apart from `ctrpipe.train.metrics.sigmoid` on purpose (module docstring)."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40.0, 40.0)))


def normal_cdf_approx(x: np.ndarray) -> np.ndarray:
    """Logistic approximation of the normal CDF (max error 0.01): turns correlated normals into uniforms."""
    return sigmoid(1.702 * x)


def calibrate(z: np.ndarray, target_rate: float, target_auc: float) -> tuple[float, float]:
    """Scale and bias so that p = sigmoid(bias + scale * z) has mean `target_rate` and the AUC of p against
    labels drawn from p is `target_auc` in expectation (both measured on the calibration rows `z`)."""
    zs = np.sort(z.astype(np.float64))

    def bias_for(scale: float) -> float:
        b = float(np.log(target_rate / (1.0 - target_rate)))
        for _ in range(50):
            p = sigmoid(b + scale * zs)
            step = (p.mean() - target_rate) / max(float((p * (1.0 - p)).mean()), 1e-12)
            b -= float(np.clip(step, -5.0, 5.0))
            if abs(step) < 1e-10:
                break
        return b

    def expected_auc(scale: float, b: float) -> float:
        p = sigmoid(b + scale * zs)        # ascending, as zs is
        q = 1.0 - p
        below = np.cumsum(q) - q           # expected negatives ranked below each row
        return float((p * below).sum() / (p.sum() * q.sum() - (p * q).sum()))

    lo, hi = -6.0, 4.0                     # log scale
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        s = float(np.exp(mid))
        if expected_auc(s, bias_for(s)) < target_auc:
            lo = mid
        else:
            hi = mid
    scale = float(np.exp(0.5 * (lo + hi)))
    return scale, bias_for(scale)


def normalise_components(comps: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Per-component weights giving each logit component a variance equal to its share (calibration rows)."""
    std = comps.std(axis=0)
    return np.where(std > 0, np.sqrt(shares) / np.maximum(std, 1e-12), 0.0)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC with ties counted half (average ranks); NaN when only one class is present."""
    y = np.asarray(y).astype(bool).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inv, counts = np.unique(np.asarray(score).ravel(), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0           # 1-based average rank of each tie group
    pos_per_value = np.bincount(inv, weights=y, minlength=uniq.size)
    rank_sum = float(pos_per_value @ avg_rank)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


@dataclass(frozen=True)
class LabelStats:
    """How one label column of one written file looks against its true probabilities."""

    positive_rate: float
    mean_truth: float
    oracle_auc: float
    oracle_logloss: float

    @staticmethod
    def of(y: np.ndarray, p: np.ndarray) -> LabelStats:
        return LabelStats(float(np.mean(y)), float(np.mean(p)), roc_auc(y, p), _logloss(y, p))


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp name beside `final`; rename onto `final` only if the block finishes, else delete it."""
    tmp = final.with_name(f".{final.name}.incomplete")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BackgroundWriter:
    """Writes byte chunks to `sink` on a thread, so gzip compression and disk writes overlap the generation of
    the next chunk (zlib and file writes release the GIL). At most `depth` chunks wait; a write error is
    re-raised in the caller on the next `write` or on `close`."""

    def __init__(self, sink: BinaryIO, depth: int = 2) -> None:
        self._sink = sink
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="synth-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink.write(chunk)
                except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, chunk: bytes) -> None:
        self._raise()
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait until every queued chunk is written."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
