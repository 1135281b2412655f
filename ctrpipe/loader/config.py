"""`loader:` section: batch formation from memory-mapped shards."""

from __future__ import annotations

from dataclasses import dataclass

from ctrpipe.errors import ConfigError


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 4096
    eval_batch_size: int = 16384
    shuffle: bool = True
    block_rows: int = 256            # shuffling granularity inside a shard (rows stay contiguous within a block)
    prefetch: int = 2                # batches prepared ahead by the background thread
    pin_memory: bool = True          # only used when the device is CUDA

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "block_rows", "prefetch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"bad value {getattr(self, key)} for 'loader.{key}'",
                                  fix=f"use a positive integer, e.g. loader.{key}=4096")
