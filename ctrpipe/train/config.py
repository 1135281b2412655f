"""`train:` and `cv:` sections."""

from __future__ import annotations

from dataclasses import dataclass

from ctrpipe.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3
    device: str = "auto"             # auto | cpu | cuda | cuda:1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"bad value {self.epochs} for 'train.epochs'", fix="use e.g. train.epochs=1")


@dataclass(frozen=True)
class CVConfig:
    n_splits: int = 0                # >0: train one model per stored fold
