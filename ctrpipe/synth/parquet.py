"""Synthetic Toss-style Parquet logs: categoricals, heavy-tailed floats, a behaviour sequence, a candidate item
from the sequence's item vocabulary, multi-hot tags, and two labels (click, then conversion given click,
ESMM-style) drawn from a hidden model of the seed.

The click model holds a candidate x history interaction ("target" below) that only a model reading the history
against the candidate can recover: a recency-weighted match of the candidate's hidden topic against the
history items' topics (weight exp(-k / TARGET_TAU) for the item k places from the end), and an exact-repeat
effect (the candidate is among the last SEQ_RECENT items). Mean pooling blurs both: it weighs every position
alike, and one repeated item is a 1/L sliver of the pooled vector.

The column names and types in `SCHEMA` are a contract: cfgs/parquet_example.yaml is written against them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctrpipe.synth.common import (
    BLOCK_ROWS,
    LabelStats,
    Stream,
    atomic_path,
    block_ranges,
    block_rng,
    calibrate,
    int_strings,
    joined_tokens,
    model_rng,
    normal_cdf_approx,
    normalise_components,
    roc_auc,
    sigmoid,
    zipf_ranks,
)

CLICK_RATE, CLICK_AUC = 0.25, 0.79
CVR_RATE, CVR_AUC = 0.15, 0.75        # conversion given click
CALIB_BLOCKS = 4
EMB_DIM = 4
_MODEL_PART = 2
N_TOPICS = 16                         # hidden item topics; ITEM_VOCAB items, ITEM_VOCAB / N_TOPICS per topic
ITEM_VOCAB = 50_000
SEQ_MAX, SEQ_RECENT = 120, 10
TARGET_TAU = 4.0                      # recency decay (positions from the end) of the target interaction
# the candidate item: a repeat of one of the last SEQ_RECENT history items, else from the user's favourite
# topic, else by popularity
CAND_REPEAT, CAND_TOPIC = 0.15, 0.40
TAG_VOCAB, TAG_MAX = 1000, 6


@dataclass(frozen=True)
class CatSpec:
    """A string column: values from `probs` (small ordered fields) or Zipf(`zipf`) over `vocab`; optionally
    tied to a row latent with correlation `rho`; `weight` = size of its first-order click effect."""

    name: str
    vocab: int
    weight: float
    zipf: float = 1.0
    probs: tuple[float, ...] = ()
    missing: float = 0.0
    group: int = -1
    latent: int = 0
    rho: float = 0.0


@dataclass(frozen=True)
class NumSpec:
    """A float column: `kind` shapes a latent-correlated normal z into counts, rates or heavy tails."""

    name: str
    kind: Literal["count", "lognormal", "signed", "rate", "pareto", "linear"]
    mu: float
    sd: float
    load: tuple[float, float]
    weight: float = 1.0
    missing: float = 0.0
    group: int = -1


_HOUR_P = tuple(float(x) for x in (1 + 0.7 * np.sin(2 * np.pi * (np.arange(24) - 9) / 24)) / 24)
CATS: tuple[CatSpec, ...] = (
    CatSpec("gender", 3, 0.6, probs=(0.48, 0.44, 0.08), missing=0.03, group=0, latent=1, rho=0.3),
    CatSpec("age_group", 8, 0.8, probs=(0.05, 0.15, 0.22, 0.2, 0.15, 0.11, 0.08, 0.04), missing=0.02, group=1,
            latent=1, rho=0.6),
    CatSpec("inventory_id", 50, 1.5, zipf=1.1),
    CatSpec("day_of_week", 7, 0.3, probs=(1 / 7,) * 7),
    CatSpec("hour", 24, 0.5, probs=_HOUR_P, latent=0, rho=0.2),
    *(CatSpec(f"l_feat_{i + 1}", v, w, zipf=s, missing=m, group=2 + i if m else -1)
      for i, (v, s, w, m) in enumerate(((10, 1.5, 1.0, 0.0), (30, 1.4, 0.8, 0.01), (100, 1.3, 0.8, 0.03),
                                        (500, 1.2, 0.6, 0.1), (2000, 1.2, 0.6, 0.02), (10_000, 1.1, 0.5, 0.2),
                                        (50_000, 1.1, 0.4, 0.3), (200_000, 1.05, 0.4, 0.05),
                                        (500_000, 1.05, 0.3, 0.4), (1_000_000, 1.02, 0.3, 0.1)))),
)
NUMS: tuple[NumSpec, ...] = (
    NumSpec("feat_a_1", "count", 1.5, 1.2, (0.5, 0.0), missing=0.02, group=12),
    NumSpec("feat_a_2", "lognormal", 0.5, 1.0, (0.2, 0.3), missing=0.05, group=13),
    NumSpec("feat_a_3", "signed", 0.0, 1.0, (0.0, 0.4), missing=0.10, group=14),
    NumSpec("feat_a_4", "rate", -1.0, 1.0, (0.3, 0.0)),
    NumSpec("feat_a_5", "count", 3.0, 1.8, (0.4, 0.2), missing=0.30, group=15),
    NumSpec("feat_a_6", "signed", -0.5, 2.0, (-0.3, 0.0), missing=0.15, group=16),
    NumSpec("feat_a_7", "pareto", 0.0, 1.5, (0.2, 0.2), missing=0.05, group=17),
    NumSpec("feat_a_8", "lognormal", 3.0, 0.5, (0.0, -0.3), 0.5, missing=0.60, group=18),
    # history_a_*: the user's past behaviour; all missing together for new users
    NumSpec("history_a_1", "rate", -2.0, 1.3, (0.9, 0.0), 2.0, missing=0.08, group=19),
    NumSpec("history_a_2", "count", 2.0, 1.1, (0.85, 0.0), 1.0, missing=0.08, group=19),
    NumSpec("history_a_3", "rate", -1.0, 1.0, (0.0, 0.8), 1.0, missing=0.08, group=19),
    NumSpec("history_a_4", "linear", -0.2, 1.0, (0.7, 0.2), 1.0, missing=0.08, group=19),
)
N_GROUPS = 20
N_CAT, N_NUM = len(CATS), len(NUMS)
_CI = {s.name: i for i, s in enumerate(CATS)}
_NI = {s.name: i for i, s in enumerate(NUMS)}
PAIRS = tuple((_CI[a], _CI[b]) for a, b in (
    ("inventory_id", "age_group"), ("inventory_id", "hour"), ("gender", "l_feat_2"),
    ("l_feat_1", "day_of_week"), ("age_group", "l_feat_3"), ("inventory_id", "l_feat_5"),
    ("gender", "inventory_id")))
NUM_CAT = tuple((_NI[a], _CI[b]) for a, b in (("history_a_1", "inventory_id"), ("feat_a_3", "age_group"),
                                               ("feat_a_1", "hour")))
# click logit variance shares: first-order cats (and the candidate item), numeric, cat pairs, numeric x cat,
# sequence (inventory topic vs history), tags, target (candidate vs recency-weighted history)
SHARES = np.array([0.24, 0.21, 0.14, 0.07, 0.10, 0.06, 0.18])
TARGET_PART = 6                          # the candidate x history component's index in SHARES
CV_SHARES = np.array([0.30, 0.45, 0.25])   # conversion: click's first-order part, own cats, own numerics

SCHEMA = pa.schema(
    [("ID", pa.string()), ("clicked", pa.int8()), ("converted", pa.int8())]
    + [(s.name, pa.string()) for s in CATS] + [(s.name, pa.float64()) for s in NUMS]
    + [("seq", pa.string()), ("tags", pa.string()), ("tags_w", pa.string()), ("item_id", pa.string())])

# value strings of the small fields (l_feat_* values are written as decimal codes rank + 1)
_INVENTORY_CODES = np.sort(np.random.default_rng(2024).choice(np.arange(2, 100), 50, replace=False))
_VALUES = {
    "gender": pa.array(["1", "2", "3"]),
    "age_group": pa.array([str(i) for i in range(1, 9)]),
    "inventory_id": pa.array([str(c) for c in _INVENTORY_CODES]),
    "day_of_week": pa.array([str(i) for i in range(1, 8)]),
    "hour": pa.array([f"{h:02d}" for h in range(24)]),
}


@dataclass(frozen=True)
class Raw:
    """One block's features. Field-major (fields, n); token columns are flat with per-row lengths."""

    cat: np.ndarray          # (N_CAT, n) value index
    cat_miss: np.ndarray     # (N_CAT, n)
    num: np.ndarray          # (N_NUM, n) float64
    num_miss: np.ndarray     # (N_NUM, n)
    seq_len: np.ndarray      # (n,) tokens per row, most recent last
    seq_item: np.ndarray     # (sum seq_len,) hidden item index; topic = item % N_TOPICS
    tag_len: np.ndarray      # (n,)
    tag_tok: np.ndarray      # (sum tag_len,)
    tagw_len: np.ndarray     # (n,)
    tagw_tok: np.ndarray     # (sum tagw_len,)
    tagw_q: np.ndarray       # (sum tagw_len,) weight in hundredths, 1..100
    cand_item: np.ndarray    # (n,) hidden item index of the candidate (same item space as seq_item)

    def head(self, rows: int) -> Raw:
        """The first `rows` rows."""
        s, t, w = (int(x[:rows].sum()) for x in (self.seq_len, self.tag_len, self.tagw_len))
        return Raw(self.cat[:, :rows], self.cat_miss[:, :rows], self.num[:, :rows], self.num_miss[:, :rows],
                   self.seq_len[:rows], self.seq_item[:s], self.tag_len[:rows], self.tag_tok[:t],
                   self.tagw_len[:rows], self.tagw_tok[:w], self.tagw_q[:w], self.cand_item[:rows])


def _tokens(rng: np.random.Generator, n: int, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """0..TAG_MAX distinct Zipf tags per row: (lengths, flat tokens sorted in row, flat weights 1..100)."""
    k = np.minimum(rng.poisson(lam, n), TAG_MAX)
    tok = zipf_ranks(rng.random(int(k.sum())), TAG_VOCAB, 1.1)
    q = rng.integers(1, 101, tok.size)
    key, first = np.unique(np.repeat(np.arange(n), k) * TAG_VOCAB + tok, return_index=True)  # drop repeats
    return np.bincount(key // TAG_VOCAB, minlength=n), key % TAG_VOCAB, q[first]


def draw_raw(rng: np.random.Generator) -> Raw:
    """Draw one full block of features; the draw order is part of the data format."""
    n = BLOCK_ROWS
    latent = rng.standard_normal((2, n))                 # (2, n) engagement, demographics
    group_u = rng.random((N_GROUPS, n))
    cat_u = rng.random((N_CAT, n))
    cat_z = rng.standard_normal((N_CAT, n))
    cat = np.empty((N_CAT, n), dtype=np.int64)
    cat_miss = np.zeros((N_CAT, n), dtype=bool)
    for f, s in enumerate(CATS):
        u = cat_u[f]
        if s.rho:
            u = normal_cdf_approx(s.rho * latent[s.latent] + np.sqrt(1 - s.rho**2) * cat_z[f])
        if s.probs:
            cat[f] = np.minimum(np.searchsorted(np.cumsum(s.probs), u, side="right"), s.vocab - 1)
        else:
            cat[f] = zipf_ranks(u, s.vocab, s.zipf)
        if s.group >= 0:
            cat_miss[f] = group_u[s.group] < s.missing
    eps = rng.standard_normal((N_NUM, n))
    eps2 = rng.standard_normal((N_NUM, n))
    num = np.empty((N_NUM, n))
    num_miss = np.zeros((N_NUM, n), dtype=bool)
    for j, s in enumerate(NUMS):
        resid = np.sqrt(max(1.0 - s.load[0] ** 2 - s.load[1] ** 2, 0.05))
        z = s.load[0] * latent[0] + s.load[1] * latent[1] + resid * eps[j]
        num[j] = _shape(s, z, eps2[j])
        if s.group >= 0:
            num_miss[j] = group_u[s.group] < s.missing
    # behaviour sequence: a share of items come from the user's favourite (hidden) topic
    seq_len = np.clip(np.floor(np.expm1(2.6 + 0.6 * latent[0] + 0.8 * rng.standard_normal(n))), 0, SEQ_MAX)
    seq_len = seq_len.astype(np.int64)
    user_topic = zipf_ranks(rng.random(n), N_TOPICS, 0.8)
    total = int(seq_len.sum())
    from_topic = rng.random(total) < 0.6
    in_topic = zipf_ranks(rng.random(total), ITEM_VOCAB // N_TOPICS, 1.05) * N_TOPICS
    anywhere = zipf_ranks(rng.random(total), ITEM_VOCAB, 1.0)
    seq_item = np.where(from_topic, in_topic + np.repeat(user_topic, seq_len), anywhere)
    tag_len, tag_tok, _ = _tokens(rng, n, 1.8)
    tagw_len, tagw_tok, tagw_q = _tokens(rng, n, 2.2)
    cand = _candidates(rng, seq_len, seq_item, user_topic)     # drawn last: the columns above keep their values
    return Raw(cat, cat_miss, num, num_miss, seq_len, seq_item, tag_len, tag_tok, tagw_len, tagw_tok, tagw_q,
               cand)


def _candidates(rng: np.random.Generator, seq_len: np.ndarray, seq_item: np.ndarray,
                user_topic: np.ndarray) -> np.ndarray:
    """(n,) candidate items: a repeat of a recent history item (CAND_REPEAT, rows with a history), else one of
    the favourite topic (CAND_TOPIC), else a popular item from anywhere."""
    n = len(seq_len)
    u = rng.random(n)
    back = rng.integers(0, SEQ_RECENT, n) % np.maximum(np.minimum(seq_len, SEQ_RECENT), 1)   # 0 = last item
    in_topic = zipf_ranks(rng.random(n), ITEM_VOCAB // N_TOPICS, 1.05) * N_TOPICS + user_topic
    anywhere = zipf_ranks(rng.random(n), ITEM_VOCAB, 1.0)
    ends = np.cumsum(seq_len)
    recent = seq_item[np.maximum(ends - 1 - back, 0)] if seq_item.size else np.zeros(n, dtype=np.int64)
    repeat = (u < CAND_REPEAT) & (seq_len > 0)
    return np.where(repeat, recent, np.where(u < CAND_REPEAT + CAND_TOPIC, in_topic, anywhere))


def _shape(s: NumSpec, z: np.ndarray, eps2: np.ndarray) -> np.ndarray:
    if s.kind == "count":
        return np.floor(np.expm1(np.clip(s.mu + s.sd * z, 0.0, 25.0)))
    if s.kind == "lognormal":
        return np.exp(s.mu + s.sd * z)
    if s.kind == "signed":                # heavier tails than normal on both sides
        return (s.mu + s.sd * z) * np.exp(0.5 * eps2)
    if s.kind == "rate":
        return sigmoid(s.mu + s.sd * z)
    if s.kind == "pareto":
        return np.exp(s.mu) * ((1.0 - normal_cdf_approx(z) * 0.999) ** (-1.0 / s.sd) - 1.0)
    return s.mu + s.sd * z                # linear


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclass(frozen=True)
class ParquetModel:
    """The hidden click and conversion models: a function of the seed (weights) and calibration rows."""

    cat_w: tuple[np.ndarray, ...]      # per CATS field (V+1,), index V = missing
    cv_cat_w: tuple[np.ndarray, ...]
    emb: dict[int, np.ndarray]         # field -> (V+1, EMB_DIM), missing row 0
    num_w: np.ndarray                  # (N_NUM, 4): linear, tanh step size, step knot, missing
    cv_num_w: np.ndarray               # (N_NUM, 2): linear, missing
    num_cat: tuple[np.ndarray, ...]    # per NUM_CAT pair (V+1,) slope
    inv_topic: np.ndarray              # (50,) topic of each inventory value
    seq_w: np.ndarray                  # (4,) recent match, last item match, all-items match, log length
    item_w: np.ndarray                 # (ITEM_VOCAB,) first-order effect of the candidate item
    target_w: np.ndarray               # (3,) recency-weighted topic match, exact recent repeat, their product
    tag_w: np.ndarray                  # (TAG_VOCAB,)
    tagw_w: np.ndarray                 # (TAG_VOCAB,)
    t_loc: np.ndarray                  # (N_NUM,) standardisation of signed log1p(x)
    t_scale: np.ndarray
    comp_w: np.ndarray
    cv_comp_w: np.ndarray
    scale: float = 1.0
    bias: float = 0.0
    cv_scale: float = 1.0
    cv_bias: float = 0.0


def build_model(seed: int) -> ParquetModel:
    """Draw the hidden models from `seed` alone, then calibrate them on calibration rows."""
    rng = model_rng(seed, _MODEL_PART)
    cat_w = tuple(rng.standard_normal(s.vocab + 1, dtype=np.float32) * s.weight for s in CATS)
    cv_cat_w = tuple(rng.standard_normal(s.vocab + 1, dtype=np.float32) * s.weight for s in CATS)
    emb = {}
    for f in sorted({f for pair in PAIRS for f in pair}):
        emb[f] = rng.standard_normal((CATS[f].vocab + 1, EMB_DIM))
        emb[f][-1] = 0.0
    num_w = np.stack([rng.standard_normal(N_NUM), rng.normal(0, 0.7, N_NUM), rng.uniform(-1, 1, N_NUM),
                      rng.normal(0, 0.5, N_NUM)], axis=1) * np.array([[s.weight] for s in NUMS])
    cv_num_w = rng.standard_normal((N_NUM, 2))
    raws = [draw_raw(block_rng(seed, Stream.CALIB, b)) for b in range(CALIB_BLOCKS)]
    t = np.concatenate([np.where(r.num_miss, np.nan, _signed_log(r.num)) for r in raws], axis=1)
    model = ParquetModel(
        cat_w=cat_w, cv_cat_w=cv_cat_w, emb=emb, num_w=num_w, cv_num_w=cv_num_w,
        num_cat=tuple(rng.standard_normal(CATS[c].vocab + 1) for _, c in NUM_CAT),
        inv_topic=rng.integers(0, N_TOPICS, CATS[_CI["inventory_id"]].vocab),
        seq_w=np.array([2.0, 1.0, 1.0, -0.3]) * rng.uniform(0.7, 1.3, 4),   # long histories: fewer clicks
        item_w=rng.standard_normal(ITEM_VOCAB) * 0.5,
        target_w=np.array([2.0, 1.0, 1.0]) * rng.uniform(0.8, 1.2, 3),
        tag_w=rng.standard_normal(TAG_VOCAB), tagw_w=rng.standard_normal(TAG_VOCAB),
        t_loc=np.nanmean(t, axis=1), t_scale=np.nanstd(t, axis=1) + 1e-9,
        comp_w=np.ones(len(SHARES)), cv_comp_w=np.ones(len(CV_SHARES)))
    comps = np.concatenate([_components(model, r) for r in raws])
    comp_w = normalise_components(comps, SHARES)
    scale, bias = calibrate(comps @ comp_w, CLICK_RATE, CLICK_AUC)
    model = dataclasses.replace(model, comp_w=comp_w, scale=scale, bias=bias)
    cv = np.concatenate([_cv_components(model, r) for r in raws])
    cv_comp_w = normalise_components(cv, CV_SHARES)
    cv_scale, cv_bias = calibrate(cv @ cv_comp_w, CVR_RATE, CVR_AUC)
    return dataclasses.replace(model, cv_comp_w=cv_comp_w, cv_scale=cv_scale, cv_bias=cv_bias)


def _idx(raw: Raw) -> np.ndarray:
    return np.where(raw.cat_miss, np.array([s.vocab for s in CATS])[:, None], raw.cat)   # (N_CAT, n)


def _components(model: ParquetModel, raw: Raw) -> np.ndarray:
    """(n, 7) raw click-logit components (see SHARES)."""
    n = raw.cat.shape[1]
    idx = _idx(raw)
    first = sum((model.cat_w[f][idx[f]] for f in range(N_CAT)), model.item_w[raw.cand_item])
    t = (_signed_log(raw.num) - model.t_loc[:, None]) / model.t_scale[:, None]          # (N_NUM, n)
    w = model.num_w
    eff = w[:, :1] * t + w[:, 1:2] * np.tanh(2.0 * (t - w[:, 2:3]))
    numeric = np.where(raw.num_miss, w[:, 3:4], eff).sum(0)
    pair = sum((np.einsum("dn,dn->n", model.emb[a][idx[a]].T, model.emb[b][idx[b]].T) for a, b in PAIRS),
               np.zeros(n))
    t0 = np.where(raw.num_miss, 0.0, np.clip(t, -4, 4))
    mixed = sum((t0[i] * model.num_cat[k][idx[c]] for k, (i, c) in enumerate(NUM_CAT)), np.zeros(n))
    # sequence: does the user's recent history share the hidden topic of this inventory?
    row = np.repeat(np.arange(n), raw.seq_len)
    pos = np.arange(row.size) - np.repeat(np.cumsum(raw.seq_len) - raw.seq_len, raw.seq_len)
    match = (raw.seq_item % N_TOPICS) == model.inv_topic[raw.cat[_CI["inventory_id"]]][row]
    recent = pos >= (raw.seq_len[row] - SEQ_RECENT)
    n_recent = np.maximum(np.minimum(raw.seq_len, SEQ_RECENT), 1)
    seq = np.stack([np.bincount(row, match & recent, n) / n_recent,
                    np.bincount(row, match & (pos == raw.seq_len[row] - 1), n),
                    np.bincount(row, match, n) / np.maximum(raw.seq_len, 1),
                    np.log1p(raw.seq_len)]).T @ model.seq_w
    tag_row, tagw_row = np.repeat(np.arange(n), raw.tag_len), np.repeat(np.arange(n), raw.tagw_len)
    tags = (np.bincount(tag_row, model.tag_w[raw.tag_tok], n)
            + np.bincount(tagw_row, model.tagw_w[raw.tagw_tok] * raw.tagw_q / 100, n))
    return np.stack([first, numeric, pair, mixed, seq, tags, target_interaction(model, raw)], axis=1)


def target_interaction(model: ParquetModel, raw: Raw) -> np.ndarray:
    """(n,) the candidate x history part of the click logit (before its SHARES weight), see the module
    docstring: recency-weighted topic match in [0, 1], the exact recent repeat, and their product (a repeat
    of an item of the topic the user is on now counts more)."""
    n = raw.cat.shape[1]
    row = np.repeat(np.arange(n), raw.seq_len)
    from_end = np.repeat(np.cumsum(raw.seq_len), raw.seq_len) - 1 - np.arange(row.size)   # 0 = most recent
    decay = np.exp(-from_end / TARGET_TAU)
    cand = raw.cand_item[row]
    match = (raw.seq_item % N_TOPICS) == (cand % N_TOPICS)
    topic = np.bincount(row, decay * match, n) / np.maximum(np.bincount(row, decay, n), 1e-12)
    repeat = np.bincount(row, (raw.seq_item == cand) & (from_end < SEQ_RECENT), n) > 0
    return np.stack([topic, repeat, topic * repeat]).T @ model.target_w


def _cv_components(model: ParquetModel, raw: Raw) -> np.ndarray:
    """(n, 3) raw conversion-logit components: click's first-order part, own categorical, own numeric."""
    n = raw.cat.shape[1]
    idx = _idx(raw)
    click_first = sum((model.cat_w[f][idx[f]] for f in range(N_CAT)), np.zeros(n))
    own = sum((model.cv_cat_w[f][idx[f]] for f in range(N_CAT)), np.zeros(n))
    t = (_signed_log(raw.num) - model.t_loc[:, None]) / model.t_scale[:, None]
    numeric = np.where(raw.num_miss, model.cv_num_w[:, 1:2], model.cv_num_w[:, :1] * t).sum(0)
    return np.stack([click_first, own, numeric], axis=1)


@dataclass(frozen=True)
class ParquetBlock:
    raw: Raw
    clicked: np.ndarray      # (n,) int8
    converted: np.ndarray    # (n,) int8, 1 only where clicked
    truth: np.ndarray        # (n, 2) P(click), P(click and conversion)
    # (n,) the true click logit without its candidate x history term: what is left to a model that does not
    # read the history against the candidate (an AUC of it shows the term's headroom)
    logit_without_target: np.ndarray


def make_block(model: ParquetModel, seed: int, stream: Stream, block: int,
               rows: int = BLOCK_ROWS) -> ParquetBlock:
    """Block `block` of `stream`, drawn whole then cut to `rows` (shorter files are prefixes of longer)."""
    rng = block_rng(seed, stream, block)
    raw = draw_raw(rng)
    comps = _components(model, raw)
    z = comps @ model.comp_w
    p_click = sigmoid(model.bias + model.scale * z)
    p_cv = sigmoid(model.cv_bias + model.cv_scale * (_cv_components(model, raw) @ model.cv_comp_w))
    clicked = rng.random(BLOCK_ROWS) < p_click
    converted = clicked & (rng.random(BLOCK_ROWS) < p_cv)
    truth = np.stack([p_click, p_click * p_cv], axis=1)
    without = z - comps[:, TARGET_PART] * model.comp_w[TARGET_PART]
    return ParquetBlock(raw.head(rows), clicked[:rows].astype(np.int8), converted[:rows].astype(np.int8),
                        truth[:rows], without[:rows].astype(np.float32))


def _cat(raw: Raw, f: int, miss: np.ndarray) -> pa.Array:
    s = CATS[f]
    if s.name in _VALUES:
        return pc.take(_VALUES[s.name], pa.array(raw.cat[f], mask=miss))
    return int_strings(raw.cat[f] + 1, miss)


def _item_tokens(item: np.ndarray) -> np.ndarray:
    """Hidden item index -> the token written (a bijection, so topics stay hidden); seq and item_id share it."""
    return (item * 7919 + 12345) % ITEM_VOCAB


def block_table(blocks: list[ParquetBlock], prefix: str, start: int) -> pa.Table:
    """Blocks -> an arrow table with exactly `SCHEMA`; IDs are prefix + 7-digit row number from `start`."""
    raw = Raw(*(np.concatenate([getattr(b.raw, f.name) for b in blocks], axis=-1)
                for f in dataclasses.fields(Raw)))
    n = raw.cat.shape[1]
    ids = pc.utf8_lpad(int_strings(np.arange(start, start + n)), width=7, padding="0")
    cents = pc.utf8_lpad(int_strings(raw.tagw_q % 100), width=2, padding="0")
    weight = pc.binary_join_element_wise(int_strings(raw.tagw_q // 100), cents, ".")   # 1 -> '0.01'
    tagw = pc.binary_join_element_wise(int_strings(raw.tagw_tok), weight, ":")
    item_token = _item_tokens(raw.seq_item)
    cols = [pc.binary_join_element_wise(pa.scalar(prefix), ids, ""),
            pa.array(np.concatenate([b.clicked for b in blocks])),
            pa.array(np.concatenate([b.converted for b in blocks]))]
    cols += [_cat(raw, f, raw.cat_miss[f]) for f in range(N_CAT)]
    cols += [pa.array(raw.num[j], mask=raw.num_miss[j]) for j in range(N_NUM)]
    cols += [joined_tokens(int_strings(item_token), raw.seq_len, ","),
             joined_tokens(int_strings(raw.tag_tok), raw.tag_len, "|"),
             joined_tokens(tagw, raw.tagw_len, "|"), int_strings(_item_tokens(raw.cand_item))]
    return pa.Table.from_arrays(cols, schema=SCHEMA)


def write_parquet(path: Path, truth_path: Path, model: ParquetModel, seed: int, stream: Stream, rows: int,
                  prefix: str, group_blocks: int,
                  on_rows: Callable[[int], None] | None = None) -> tuple[LabelStats, LabelStats, float]:
    """Write `rows` rows of `stream` (one row group per `group_blocks` blocks) and their (rows, 2) truth;
    returns click and conversion label stats, and the click oracle's AUC without its candidate x history term."""
    labels = np.empty((rows, 2), dtype=np.int8)
    without = np.empty(rows, dtype=np.float32)
    ranges = list(block_ranges(rows))
    with atomic_path(path) as tmp, atomic_path(truth_path) as tmp_truth:
        truth = np.lib.format.open_memmap(tmp_truth, mode="w+", dtype=np.float32, shape=(rows, 2))
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for c in range(0, len(ranges), group_blocks):
                blocks = [make_block(model, seed, stream, b, n) for b, n in ranges[c:c + group_blocks]]
                start = ranges[c][0] * BLOCK_ROWS
                table = block_table(blocks, prefix, start)
                writer.write_table(table, row_group_size=table.num_rows)
                stop = start + table.num_rows
                labels[start:stop, 0] = np.concatenate([b.clicked for b in blocks])
                labels[start:stop, 1] = np.concatenate([b.converted for b in blocks])
                truth[start:stop] = np.concatenate([b.truth for b in blocks])
                without[start:stop] = np.concatenate([b.logit_without_target for b in blocks])
                if on_rows is not None:
                    on_rows(table.num_rows)
        truth.flush()
        t = np.asarray(truth)
        stats = LabelStats.of(labels[:, 0], t[:, 0]), LabelStats.of(labels[:, 1], t[:, 1])
        del truth, t
    return (*stats, roc_auc(labels[:, 0], without))
