"""`loader:` section: batch formation from memory-mapped shards."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from ctrpipe.errors import ConfigError


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 4096
    eval_batch_size: int = 16384
    shuffle: bool = True
    block_rows: int = 256            # shuffle unit inside a shard (rows stay contiguous within a block)
    prefetch: int = 2                # batches prepared ahead by the background thread
    pin_memory: bool = True          # only used when the device is CUDA
    # block: permute blocks of block_rows rows (near memcpy speed); gather: permute single rows (i.i.d.
    # batches, random reads; see ctrpipe/loader/sampler.py and benchmarks/bench_loader.py for the trade-off)
    shuffle_strategy: Literal["block", "gather"] = "block"
    # block strategy: blocks are permuted within windows of this many shards (shard order is random too);
    # 0 = one global permutation over all shards. Use e.g. 4 when the cache is much larger than RAM.
    window_shards: int = 0
    # The label whose rows training samples ("" = the cache's first label). Training views only: evaluation and
    # inference never sample. Sampling shifts the label's prior by a factor the features don't affect, so
    # evaluation and `ctrpipe infer` add log(factor) to its head's logits: metrics and submissions stay on the
    # true scale (ctrpipe/loader/sampling.py). Models with heads of their own (ESMM) refuse sampling.
    sample_label: str = ""
    # < 1: keep each negative of sample_label with this probability, all positives. Which rows are kept is fixed
    # for the run by (seed, row): epochs keep one length. Logits of that label's head get + log(neg_keep_prob).
    neg_keep_prob: float = 1.0
    # > 0: every training batch holds exactly round(f * batch_size) positives of sample_label, the rest negatives
    # undersampled afresh each epoch, rows gathered whatever shuffle_strategy (f must exceed the label's rate;
    # 0 = off). Logits get + logit(rate) - logit(positives per batch / batch_size), rate = the label's rate in the
    # rows drawn from: the train split's, or a K-fold model's training view's (its checkpoint records it).
    balance_pos_fraction: float = 0.0

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "block_rows", "prefetch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bad value {getattr(self, key)} for 'loader.{key}'",
                                  fix=f"use a positive integer, e.g. loader.{key}={_DEFAULTS[key]} (the default)")
        if self.shuffle_strategy not in ("block", "gather"):
            raise ConfigError(f"bad value {self.shuffle_strategy!r} for 'loader.shuffle_strategy'",
                              fix="use loader.shuffle_strategy=block or loader.shuffle_strategy=gather")
        if self.window_shards < 0:
            raise ConfigError(f"bad value {self.window_shards} for 'loader.window_shards'",
                              fix="use 0 (all shards) or a number of shards, e.g. loader.window_shards=4")
        self._check_sampling()

    def _check_sampling(self) -> None:
        if not 0.0 < self.neg_keep_prob <= 1.0:
            raise ConfigError(f"bad value {self.neg_keep_prob} for 'loader.neg_keep_prob'",
                              fix="use a keep probability in (0, 1], e.g. loader.neg_keep_prob=0.1 (1.0 = off)")
        f = self.balance_pos_fraction
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"bad value {f} for 'loader.balance_pos_fraction'",
                              fix="use a positive fraction below 1, e.g. loader.balance_pos_fraction=0.25 (0 = off)")
        if f == 0.0:
            return
        if self.neg_keep_prob < 1.0:
            # balancing already undersamples the negatives; two samplers of one label would compound unclearly
            raise ConfigError("loader.neg_keep_prob and loader.balance_pos_fraction are both set",
                              where="loader.balance_pos_fraction",
                              fix="use one: loader.neg_keep_prob=1.0 with balanced batches, or "
                                  "loader.balance_pos_fraction=0 with downsampling")
        if not self.shuffle:
            raise ConfigError("loader.balance_pos_fraction draws rows at random, but loader.shuffle is false",
                              where="loader.balance_pos_fraction",
                              fix="set loader.shuffle=true, or loader.balance_pos_fraction=0")
        if not 1 <= round(f * self.batch_size) < self.batch_size:
            raise ConfigError(f"loader.balance_pos_fraction={f} gives {round(f * self.batch_size)} positives in a "
                              f"batch of {self.batch_size}", where="loader.balance_pos_fraction",
                              fix="use a fraction that leaves at least one positive and one negative per batch")


_DEFAULTS = {f.name: f.default for f in fields(LoaderConfig)}     # examples in the messages above
