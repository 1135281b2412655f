"""`loader:` section: batch formation from memory-mapped shards."""

from __future__ import annotations

from dataclasses import dataclass
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

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "block_rows", "prefetch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bad value {getattr(self, key)} for 'loader.{key}'",
                                  fix=f"use a positive integer, e.g. loader.{key}=4096")
        if self.shuffle_strategy not in ("block", "gather"):
            raise ConfigError(f"bad value {self.shuffle_strategy!r} for 'loader.shuffle_strategy'",
                              fix="use loader.shuffle_strategy=block or loader.shuffle_strategy=gather")
        if self.window_shards < 0:
            raise ConfigError(f"bad value {self.window_shards} for 'loader.window_shards'",
                              fix="use 0 (all shards) or a number of shards, e.g. loader.window_shards=4")
