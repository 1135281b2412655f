"""Stage 3: training-time sampling by one label (negative downsampling, balanced batches) and the logit shift
that puts a model trained on the sampled stream back on the data's scale.

Both keep a row with a rate that depends on its label only (positives at rate a, negatives at rate b), never
on its features, so a head trained on the stream learns the data's log-odds + log(a / b); adding
shift = log(b / a) to its logits undoes that (the prior correction for case-control sampling). Evaluation and
inference views are never sampled. The shift depends on the config and the FeatureSpec only
(`training_sampling`), so training's evaluations and `ctrpipe infer`, which rebuilds both from a checkpoint,
add the same number.

* Downsampling (`loader.neg_keep_prob` = q): a negative row is kept when u(seed, global row) < q, with u a
  splitmix64 hash of the row mapped to [0, 1); positives and rows whose label is missing (NaN) are kept. The
  kept set is decided once per run, not per epoch: every epoch then has the same length, which the step plan
  and exact --resume rely on, and the loader's guarantee holds for the kept rows (each once per epoch, in
  either shuffle strategy). shift = log q.
* Balanced batches (`loader.balance_pos_fraction` = f): every batch holds exactly P = round(f * B) positives and
  B - P negatives (sorted by row within the batch, gathered like the `gather` strategy). Per (seed, epoch) the
  positives are permuted and cut into n_pos // P batches (the n_pos mod P left over sit that epoch out, a
  different few each epoch) and the negatives are a fresh uniform draw without replacement, so no row comes
  twice in an epoch. Negatives are undersampled rather than positives oversampled: a CTR label is rare, and
  repeating each positive dozens of times per epoch overfits it. Rows with a missing label are not served.
  shift = logit(p) - logit(P / B), p = the label's rate in the rows drawn from: the train split's from the
  manifest, or for a K-fold model its training view's (time or group folds of a drifting rate differ from the
  split's), which its checkpoint records (`Checkpoint.sampling_rate`) for infer, predict and export.

Example: q = 0.1 on a 2% label keeps ~17% of the rows with a 17% positive rate; a head predicting 0.17 gets
logit(0.17) + log(0.1) = logit(0.02).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ctrpipe.errors import ConfigError
from ctrpipe.features import FeatureSpec
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.loader.sampler import Piece, gather_pieces
from ctrpipe.loader.view import ViewIndex
from ctrpipe.shard.manifest import Manifest
from ctrpipe.shard.reader import map_array

_MASK64 = 2**64 - 1


@dataclass(frozen=True)
class Sampling:
    """How the training stream samples rows by one label column; at most one of the two samplers is on."""

    label: int                   # column in the cache's labels (FeatureSpec.labels order)
    name: str                    # that label's name, for messages
    neg_keep_prob: float = 1.0   # < 1: downsample negatives
    pos_fraction: float = 0.0    # > 0: balanced batches of round(pos_fraction * batch_size) positives
    shift: float = 0.0           # log(negatives' keep rate / positives'): added to this label's logits


def stream_spec(spec: FeatureSpec, shifts: Sequence[float]) -> FeatureSpec:
    """`spec` with each label's rate as the sampled training stream shows it, so every head starts at the prior
    it will see: rate' = sigmoid(logit(rate) - shift). Sampling is only allowed with one head per label
    (`fit._check_sampling`), so `shifts` follow the labels' order. Build the model from it for training only: the
    checkpoint keeps the cache's spec, whose rates fix the balanced sampler's shift at inference."""
    if not any(shifts):
        return spec
    if len(shifts) != len(spec.label_rates):
        raise ValueError(f"{len(shifts)} logit shifts for {len(spec.label_rates)} labels")
    rates = tuple(1.0 / (1.0 + math.exp(s - _logit(min(max(float(p), 1e-7), 1 - 1e-7))))
                  for p, s in zip(spec.label_rates, shifts, strict=True))
    # the pairs' rates shift with rows no per-label shift describes: heads fall back to the marginal rates
    return replace(spec, label_rates=rates, label_pair_rates=())


def positives_per_batch(pos_fraction: float, batch_size: int) -> int:
    return round(pos_fraction * batch_size)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def training_sampling(cfg: LoaderConfig, spec: FeatureSpec, rate: float | None = None) -> Sampling | None:
    """The sampling `cfg` asks of a training loader over this cache (None when off), with its shift. `rate`: the
    sampled label's rate in the rows balanced batches draw from, where it is not the train split's (a K-fold
    training view: `fit.fold_sampling_rate`)."""
    if cfg.sample_label and spec.labels and cfg.sample_label not in spec.labels:     # a typo, sampling on or off
        raise ConfigError(f"loader.sample_label names {cfg.sample_label!r}; the cache's labels are "
                          f"{list(spec.labels)}", where="loader.sample_label",
                          fix=f"use one of {', '.join(spec.labels)} (\"\" = the first)")
    if cfg.neg_keep_prob >= 1.0 and cfg.balance_pos_fraction == 0.0:
        return None
    if not spec.labels:
        raise ConfigError("loader sampling needs labels, and this cache has none", where="loader.sample_label",
                          fix="train on a labelled cache, or set loader.neg_keep_prob=1.0 and "
                              "loader.balance_pos_fraction=0")
    name = cfg.sample_label or spec.labels[0]
    if name not in spec.labels:
        raise ConfigError(f"loader.sample_label names {name!r}; the cache's labels are {list(spec.labels)}",
                          where="loader.sample_label", fix=f"use one of {', '.join(spec.labels)} (\"\" = the first)")
    j = spec.labels.index(name)
    if cfg.neg_keep_prob < 1.0:
        return Sampling(j, name, neg_keep_prob=cfg.neg_keep_prob, shift=math.log(cfg.neg_keep_prob))
    target = positives_per_batch(cfg.balance_pos_fraction, cfg.batch_size) / cfg.batch_size
    p = float(spec.label_rates[j]) if rate is None else float(rate)
    if not 0.0 < p < target:
        # below the label's own rate the target would need fewer positives, i.e. dropping positives
        raise ConfigError(f"loader.balance_pos_fraction={cfg.balance_pos_fraction} ({target:.4f} of a batch) is "
                          f"not above label {name!r}'s train-split rate {p:.4f}; balancing undersamples "
                          "negatives, so it can only raise the positive fraction", where="loader.balance_pos_fraction",
                          fix=f"use a fraction above {p:.4f} (e.g. {min(0.5, max(2 * p, 0.05)):.2f}), or 0 (off)")
    return Sampling(j, name, pos_fraction=cfg.balance_pos_fraction, shift=_logit(p) - _logit(target))


# ----------------------------------------------------------------------------------------------- per row

def view_labels(cache_dir: Path, manifest: Manifest, index: ViewIndex, column: int) -> np.ndarray:
    """(num_rows,) float32 label `column` of the view's rows, in view order, read once through the reader."""
    parts = [np.zeros(0, dtype=np.float32)]
    for shard, rows in zip(manifest.shards, index.rows, strict=True):
        if len(rows):   # an empty shard has no array to map
            parts.append(np.asarray(map_array(cache_dir, shard, "labels")[rows, column], dtype=np.float32))
    return np.concatenate(parts)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, a bijection on uint64 (arrays wrap on overflow, as the algorithm wants)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(global_rows: np.ndarray, seed: int) -> np.ndarray:
    """(N,) float64 in [0, 1) from (seed, global row): the same whichever view, epoch or worker asks."""
    key = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
    h = _splitmix64(global_rows.astype(np.uint64) ^ key)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53       # top 53 bits: exact in float64


def downsample(index: ViewIndex, labels: np.ndarray, keep_prob: float, seed: int) -> ViewIndex:
    """The view without the negatives whose hash is >= keep_prob (positives and missing labels stay)."""
    negative = labels < 0.5                                            # NaN compares False: kept
    keep = ~negative | (row_uniforms(index.global_rows(), seed) < keep_prob)
    return index.subset(keep)


# ----------------------------------------------------------------------------------------------- balanced

class BalancedPlan:
    """Batch k of one balanced epoch: positives `pos[k]` and negatives `neg[k]` (view positions)."""

    def __init__(self, index: ViewIndex, pos: np.ndarray, neg: np.ndarray) -> None:
        self.index = index
        self.pos, self.neg = pos, neg                                  # (nb, P), (nb, B - P)
        self.num_batches = len(pos)

    def pieces(self, k: int) -> list[Piece]:
        return gather_pieces(self.index, np.sort(np.concatenate([self.pos[k], self.neg[k]])))


class BalancedRows:
    """A view's positives and negatives of one label, found once; `plan(rng)` draws one epoch's batches."""

    def __init__(self, index: ViewIndex, labels: np.ndarray, batch_size: int, sampling: Sampling) -> None:
        self.index = index
        self.pos = np.flatnonzero(labels >= 0.5)                       # view positions; NaN is neither
        self.neg = np.flatnonzero(labels < 0.5)
        self.n_pos = positives_per_batch(sampling.pos_fraction, batch_size)
        self.n_neg = batch_size - self.n_pos
        if not 1 <= self.n_pos < batch_size:
            raise ConfigError(f"balanced batches of {batch_size} rows with {self.n_pos} positives",
                              where="loader.balance_pos_fraction",
                              fix="use a fraction that leaves at least one positive and one negative per batch")
        self.num_batches = len(self.pos) // self.n_pos
        where, name = "loader.balance_pos_fraction", sampling.name
        if self.num_batches == 0:
            raise ConfigError(f"the training view has {len(self.pos)} positives of label {name!r}, fewer than "
                              f"the {self.n_pos} of one balanced batch", where=where,
                              fix="use a smaller loader.batch_size or loader.balance_pos_fraction, or 0 (off)")
        need = self.num_batches * self.n_neg
        if need > len(self.neg):
            rate = len(self.pos) / max(len(self.pos) + len(self.neg), 1)
            raise ConfigError(f"balanced batches need {need} negatives of label {name!r} per epoch, the "
                              f"training view has {len(self.neg)} (its positive rate is {rate:.4f})", where=where,
                              fix=f"use loader.balance_pos_fraction above {rate:.4f}, or 0 (off)")

    @property
    def num_rows(self) -> int:
        """Rows served per epoch."""
        return self.num_batches * (self.n_pos + self.n_neg)

    def plan(self, rng: np.random.Generator) -> BalancedPlan:
        nb = self.num_batches
        pos = rng.permutation(self.pos)[:nb * self.n_pos].reshape(nb, self.n_pos)
        neg = rng.choice(self.neg, size=nb * self.n_neg, replace=False).reshape(nb, self.n_neg)
        return BalancedPlan(self.index, pos, neg)


def apply_sampling(cache_dir: Path, manifest: Manifest, index: ViewIndex, sampling: Sampling, batch_size: int,
                   seed: int) -> tuple[ViewIndex, BalancedRows | None]:
    """A training loader's rows under `sampling`: the downsampled view, or the view and its balanced rows."""
    labels = view_labels(cache_dir, manifest, index, sampling.label)
    if sampling.pos_fraction > 0.0:
        return index, BalancedRows(index, labels, batch_size, sampling)
    return downsample(index, labels, sampling.neg_keep_prob, seed), None
