"""Synthetic Criteo display-ads logs: the hidden click model and the tab-separated writer.

Rows look like Kaggle `train.txt` (label, I1..I13 counts, C1..C26 8-hex-digit ids, empty = missing) and
their labels come from a known model, so every file ships with the true click probability of each row.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ctrpipe.synth.common import (
    BLOCK_ROWS,
    BackgroundWriter,
    LabelStats,
    Stream,
    atomic_path,
    block_ranges,
    block_rng,
    calibrate,
    hex8_strings,
    mix64,
    model_rng,
    normal_cdf_approx,
    normalise_components,
    scramble32,
    sigmoid,
    zipf_ranks,
)

TARGET_RATE = 0.25      # Criteo's positive rate is ~0.25
TARGET_AUC = 0.79       # oracle AUC: leaves room between logistic regression and interaction models
CALIB_BLOCKS = 4        # calibration rows = CALIB_BLOCKS * BLOCK_ROWS
EMB_DIM = 4             # hidden embedding size of the pairwise interactions
_MODEL_PART = 1         # model_rng part number of this format


@dataclass(frozen=True)
class IntSpec:
    """An I-column: lognormal count with this median and 90th percentile, missing when its group's draw is
    below `missing` (columns of a group go missing together, as in real Criteo), `neg` share of -1..-3."""

    median: float
    p90: float
    missing: float
    group: int
    neg: float = 0.0


@dataclass(frozen=True)
class CatSpec:
    """A C-column: Zipf(`zipf`) over `vocab` values, `weight` = size of its first-order effect."""

    vocab: int
    zipf: float
    weight: float
    missing: float = 0.0
    group: int = -1


# Medians, tails, missing rates and missing groups follow a 6.6k-row sample of the real data.
INT_SPECS: tuple[IntSpec, ...] = (
    IntSpec(1, 9, 0.44, 0), IntSpec(2, 180, 0.0, -1, neg=0.13), IntSpec(6, 47, 0.22, 1),
    IntSpec(4, 19, 0.24, 2), IntSpec(2648, 32270, 0.04, 3), IntSpec(35, 317, 0.24, 2),
    IntSpec(3, 32, 0.04, 3), IntSpec(7, 35, 0.01, 5), IntSpec(42, 302, 0.04, 3),
    IntSpec(0, 1, 0.44, 0), IntSpec(1, 6, 0.04, 3), IntSpec(0, 2, 0.77, 4), IntSpec(4, 23, 0.24, 2),
)
# Vocabularies follow the real per-field cardinalities (capped at 3M); exponents match the sample's
# distinct-value ratio (large fields) or top-value share (small fields).
CAT_SPECS: tuple[CatSpec, ...] = (
    CatSpec(1460, 1.98, 1.0), CatSpec(583, 1.04, 1.2), CatSpec(3_000_000, 0.99, 0.5, 0.034, 7),
    CatSpec(2_200_000, 1.07, 0.5, 0.034, 7), CatSpec(305, 2.65, 0.0), CatSpec(24, 1.83, 1.0, 0.14, 8),
    CatSpec(12517, 0.95, 0.8), CatSpec(633, 2.31, 1.0), CatSpec(3, 4.05, 1.5), CatSpec(93145, 1.09, 0.7),
    CatSpec(5683, 1.03, 0.0), CatSpec(3_000_000, 1.00, 0.4, 0.034, 7), CatSpec(3194, 1.01, 0.8),
    CatSpec(27, 1.45, 1.2), CatSpec(14992, 1.13, 0.8), CatSpec(2_500_000, 1.03, 0.4, 0.034, 7),
    CatSpec(10, 1.62, 1.0), CatSpec(5652, 1.25, 0.9), CatSpec(2173, 1.24, 1.0, 0.46, 9),
    CatSpec(4, 0.65, 0.0, 0.46, 9), CatSpec(2_000_000, 1.01, 0.5, 0.034, 7), CatSpec(18, 2.25, 1.0, 0.77, 4),
    CatSpec(15, 1.63, 1.2), CatSpec(286_181, 1.15, 0.6, 0.034, 7), CatSpec(105, 1.27, 1.0, 0.46, 9),
    CatSpec(142_572, 1.05, 0.6, 0.46, 9),
)
N_GROUPS = 10
N_INT, N_CAT = len(INT_SPECS), len(CAT_SPECS)
COLUMNS = ("label", *(f"I{i}" for i in range(1, N_INT + 1)), *(f"C{i}" for i in range(1, N_CAT + 1)))


def _c(name: str) -> int:
    return int(name[1:]) - 1


# Child fields copy a hashed function of a parent's value most of the time (ids that imply other ids).
CHILDREN: tuple[tuple[int, int, float], ...] = ((_c("C12"), _c("C3"), 0.8), (_c("C16"), _c("C3"), 0.7),
                                               (_c("C21"), _c("C4"), 0.7))
# Fields whose value depends on a latent (user activity / context): field -> (latent, correlation).
COPULA: tuple[tuple[int, int, float], ...] = ((_c("C1"), 0, 0.5), (_c("C2"), 1, 0.4), (_c("C6"), 0, 0.4),
                                              (_c("C14"), 1, 0.3), (_c("C17"), 0, 0.3))
# Hidden interactions: dot products of field embeddings, numeric x categorical, numeric x numeric, one 3-way.
# They live on fields of up to a few thousand values, whose Zipf heads recur often enough to be learnt, so
# interaction models have something to find that logistic regression cannot; C5 acts only through a pair.
PAIRS = tuple((_c(a), _c(b)) for a, b in (
    ("C1", "C2"), ("C1", "C14"), ("C2", "C8"), ("C6", "C9"), ("C5", "C13"), ("C8", "C17"), ("C14", "C23"),
    ("C19", "C25"), ("C22", "C6"), ("C13", "C2"), ("C20", "C1"), ("C23", "C17")))
NUM_CAT = tuple((_c(a), _c(b)) for a, b in (("I5", "C2"), ("I3", "C6"), ("I9", "C14"), ("I13", "C8"),
                                            ("I1", "C17")))
NUM_NUM = tuple((_c(a), _c(b)) for a, b in (("I1", "I6"), ("I7", "I11"), ("I2", "I13")))
TRIPLE = (_c("C6"), _c("C9"), _c("C17"))
# Share of the logit's variance: first-order categorical, numeric, categorical pairs, other interactions.
SHARES = np.array([0.35, 0.20, 0.30, 0.15])
_FIELD_KEYS = tuple(int(k) for k in mix64(np.arange(N_CAT, dtype=np.uint64), 0xC17E0) & np.uint64(0xFFFFFFFF))


@dataclass(frozen=True)
class CriteoModel:
    """The hidden ground truth: feature distributions and the logit's weights, a function of the seed."""

    int_load: np.ndarray        # (13, 2) loading of each count on the two row latents
    w_lin: np.ndarray           # (13,) numeric effects on t = standardised log1p(count)
    w_nl: np.ndarray            # (13,) size of a tanh step at `knots`
    knots: np.ndarray           # (13,)
    w_miss: np.ndarray          # (13,) effect of a missing count
    w_neg: float                # effect of a negative I2
    cat_w: tuple[np.ndarray, ...]    # 26 x (V+1,) first-order weights, index V = missing
    emb: dict[int, np.ndarray]       # field -> (V+1, EMB_DIM), missing row = 0
    num_cat: tuple[np.ndarray, ...]  # per NUM_CAT pair: (V+1,) slope of the count per categorical value
    num_num: np.ndarray              # (len(NUM_NUM),)
    triple: np.ndarray               # (V6+1, V9+1, V17+1)
    comp_w: np.ndarray               # (4,) per-component weights from calibration
    scale: float = 1.0
    bias: float = 0.0


_MU = np.array([np.log1p(s.median) for s in INT_SPECS])
_SD = np.array([(np.log1p(s.p90) - np.log1p(s.median)) / 1.2816 for s in INT_SPECS])


def build_model(seed: int) -> CriteoModel:
    """Draw the hidden model from `seed` alone, then calibrate its bias and scale on calibration rows."""
    rng = model_rng(seed, _MODEL_PART)
    load = rng.uniform(-0.6, 0.6, (N_INT, 2))
    cat_w = tuple((rng.standard_normal(s.vocab + 1, dtype=np.float32) * s.weight) for s in CAT_SPECS)
    emb = {}
    for f in sorted({f for pair in PAIRS for f in pair}):
        e = rng.standard_normal((CAT_SPECS[f].vocab + 1, EMB_DIM), dtype=np.float32)
        e[-1] = 0.0
        emb[f] = e
    model = CriteoModel(
        int_load=load, w_lin=rng.standard_normal(N_INT), w_nl=rng.normal(0, 0.7, N_INT),
        knots=rng.uniform(-1, 1, N_INT), w_miss=rng.normal(0, 0.5, N_INT), w_neg=float(rng.standard_normal()),
        cat_w=cat_w, emb=emb,
        num_cat=tuple(rng.standard_normal(CAT_SPECS[c].vocab + 1) for _, c in NUM_CAT),
        num_num=rng.standard_normal(len(NUM_NUM)),
        triple=rng.standard_normal(tuple(CAT_SPECS[f].vocab + 1 for f in TRIPLE)),
        comp_w=np.ones(len(SHARES)))
    comps = np.concatenate([_features(model, block_rng(seed, Stream.CALIB, b))[4]
                            for b in range(CALIB_BLOCKS)])
    comp_w = normalise_components(comps, SHARES)
    scale, bias = calibrate(comps @ comp_w, TARGET_RATE, TARGET_AUC)
    return dataclasses.replace(model, comp_w=comp_w, scale=scale, bias=bias)


def _features(model: CriteoModel, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """One block of features and logit components; the draw order is part of the data format.

    Arrays are field-major, (fields, n), so each column is contiguous."""
    n = BLOCK_ROWS
    latent = rng.standard_normal((2, n))                                     # (2, n)
    group_u = rng.random((N_GROUPS, n))                                      # (G, n) shared missingness
    # counts: lognormal around each column's median, correlated through the latents
    resid = np.sqrt(np.clip(1.0 - (model.int_load**2).sum(1), 0.05, 1.0))[:, None]
    z = model.int_load @ latent + rng.standard_normal((N_INT, n)) * resid    # (13, n)
    ints = np.floor(np.expm1(np.clip(_MU[:, None] + _SD[:, None] * z, 0.0, 20.0))).astype(np.int64)
    neg_u = rng.random(n)
    int_miss = np.zeros((N_INT, n), dtype=bool)
    for j, s in enumerate(INT_SPECS):
        if s.neg:
            ints[j] = np.where(neg_u < s.neg * 0.85, -1,
                               np.where(neg_u < s.neg * 0.97, -2, np.where(neg_u < s.neg, -3, ints[j])))
        if s.group >= 0:
            int_miss[j] = group_u[s.group] < s.missing
    # categorical ranks: Zipf, some driven by a latent, some copying a parent field
    cat_u = rng.random((N_CAT, n))
    cop = rng.standard_normal((len(COPULA), n))
    for k, (f, lat, rho) in enumerate(COPULA):
        cat_u[f] = normal_cdf_approx(rho * latent[lat] + np.sqrt(1 - rho**2) * cop[k])
    ranks = np.empty((N_CAT, n), dtype=np.int64)
    for f, s in enumerate(CAT_SPECS):
        ranks[f] = zipf_ranks(cat_u[f], s.vocab, s.zipf)
    child_u = rng.random((len(CHILDREN), n))
    for k, (child, parent, p) in enumerate(CHILDREN):
        derived = (mix64(ranks[parent], child + 1) % np.uint64(CAT_SPECS[child].vocab)).astype(np.int64)
        ranks[child] = np.where(child_u[k] < p, derived, ranks[child])
    cat_miss = np.zeros((N_CAT, n), dtype=bool)
    for f, s in enumerate(CAT_SPECS):
        if s.group >= 0:
            cat_miss[f] = group_u[s.group] < s.missing
    return ints, int_miss, ranks, cat_miss, _components(model, ints, int_miss, ranks, cat_miss)


def _components(model: CriteoModel, ints: np.ndarray, int_miss: np.ndarray, ranks: np.ndarray,
                cat_miss: np.ndarray) -> np.ndarray:
    """(n, 4) raw logit components: first-order categorical, numeric, categorical pairs, other pairs."""
    n = ints.shape[1]
    idx = np.where(cat_miss, np.array([s.vocab for s in CAT_SPECS])[:, None], ranks)   # (26, n), V = missing
    first = np.zeros(n)
    for f in range(N_CAT):
        first += model.cat_w[f][idx[f]]
    t = (np.log1p(np.maximum(ints, 0)) - _MU[:, None]) / _SD[:, None]                  # (13, n)
    num_eff = model.w_lin[:, None] * t + model.w_nl[:, None] * np.tanh(2.0 * (t - model.knots[:, None]))
    num_eff = np.where(int_miss, model.w_miss[:, None], num_eff)
    numeric = num_eff.sum(0) + model.w_neg * (ints[1] < 0)
    t0 = np.where(int_miss, 0.0, t)
    pair = np.zeros(n)
    for a, b in PAIRS:
        pair += np.einsum("nd,nd->n", model.emb[a][idx[a]], model.emb[b][idx[b]])
    mixed = model.triple[idx[TRIPLE[0]], idx[TRIPLE[1]], idx[TRIPLE[2]]]
    for k, (i, c) in enumerate(NUM_CAT):
        mixed = mixed + t0[i] * model.num_cat[k][idx[c]]
    for k, (i, j) in enumerate(NUM_NUM):
        mixed = mixed + model.num_num[k] * t0[i] * t0[j]
    return np.stack([first, numeric, pair, mixed], axis=1)


@dataclass(frozen=True)
class CriteoBlock:
    """Rows of one block: raw features, true click probability and the drawn label."""

    label: np.ndarray      # (n,) int8
    truth: np.ndarray      # (n,) float64
    ints: np.ndarray       # (13, n) int64
    int_miss: np.ndarray   # (13, n) bool
    ranks: np.ndarray      # (26, n) int64 value index, 0 = most frequent
    cat_miss: np.ndarray   # (26, n) bool


def make_block(model: CriteoModel, seed: int, stream: Stream, block: int,
               rows: int = BLOCK_ROWS) -> CriteoBlock:
    """Block `block` of `stream`; always drawn whole then cut to `rows`, so shorter files are prefixes."""
    rng = block_rng(seed, stream, block)
    ints, int_miss, ranks, cat_miss, comps = _features(model, rng)
    p = sigmoid(model.bias + model.scale * (comps @ model.comp_w))
    label = (rng.random(BLOCK_ROWS) < p).astype(np.int8)
    return CriteoBlock(label[:rows], p[:rows], ints[:, :rows], int_miss[:, :rows], ranks[:, :rows],
                       cat_miss[:, :rows])


def block_table(blocks: list[CriteoBlock]) -> pa.Table:
    """Blocks -> one arrow table with Criteo's 40 columns (ints null when missing, ids as hex)."""
    label = np.concatenate([b.label for b in blocks])
    ints = np.concatenate([b.ints for b in blocks], axis=1)
    int_miss = np.concatenate([b.int_miss for b in blocks], axis=1)
    ranks = np.concatenate([b.ranks for b in blocks], axis=1)
    cat_miss = np.concatenate([b.cat_miss for b in blocks], axis=1)
    cols = [pa.array(label)]
    cols += [pa.array(ints[j], mask=int_miss[j]) for j in range(N_INT)]
    cols += [hex8_strings(scramble32(ranks[f], _FIELD_KEYS[f]), cat_miss[f]) for f in range(N_CAT)]
    return pa.table(cols, names=list(COLUMNS))


def write_tsv(path: Path, truth_path: Path, model: CriteoModel, seed: int, stream: Stream, rows: int,
              gz: bool, chunk_blocks: int, on_rows: Callable[[int], None] | None = None) -> LabelStats:
    """Write `rows` rows of `stream` as Criteo text (atomically), their truth as .npy, return label stats."""
    labels = np.empty(rows, dtype=np.int8)
    ranges = list(block_ranges(rows))
    with atomic_path(path) as tmp, atomic_path(truth_path) as tmp_truth:
        truth = np.lib.format.open_memmap(tmp_truth, mode="w+", dtype=np.float32, shape=(rows,))
        with open(tmp, "wb") as raw:
            # mtime=0 and no file name: gzip output is byte-identical across runs. Level 1: the random hex
            # ids compress almost as well as at level 6, which is much slower.
            sink = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) if gz else raw
            writer = BackgroundWriter(sink)
            try:
                _write_chunks(writer, labels, truth, model, seed, stream, ranges, chunk_blocks, on_rows)
            finally:
                writer.close()
            if gz:
                sink.close()
        truth.flush()
        stats = LabelStats.of(labels, np.asarray(truth))
        del truth
    return stats


def _write_chunks(writer: BackgroundWriter, labels: np.ndarray, truth: np.ndarray, model: CriteoModel,
                  seed: int, stream: Stream, ranges: list[tuple[int, int]], chunk_blocks: int,
                  on_rows: Callable[[int], None] | None) -> None:
    opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    for c in range(0, len(ranges), chunk_blocks):
        blocks = [make_block(model, seed, stream, b, n) for b, n in ranges[c:c + chunk_blocks]]
        start = ranges[c][0] * BLOCK_ROWS
        n_chunk = sum(len(b.label) for b in blocks)
        buf = io.BytesIO()
        pacsv.write_csv(block_table(blocks), buf, opts)
        writer.write(buf.getvalue())
        labels[start:start + n_chunk] = np.concatenate([b.label for b in blocks])
        truth[start:start + n_chunk] = np.concatenate([b.truth for b in blocks])
        if on_rows is not None:
            on_rows(n_chunk)
