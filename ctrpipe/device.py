"""Where models run and in which precision: one home for `train` and `infer` (both import it directly).

`train.device` / `train.amp` are the only two settings; inference reads them from the run's config (and lets
`--set` change them), so a run trained on a GPU predicts on a CPU-only machine with `--set train.device=cpu`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from ctrpipe.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device that is absent is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available", where="train.device",
                          fix="use train.device=auto or train.device=cpu")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 needs a GradScaler and CUDA kernels; refuse it elsewhere before any work is done."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs a CUDA device, the run uses {device}", where="train.amp",
                          fix="use train.amp=bf16 (works on CPU) or train.amp=off")


def autocast(device: torch.device, amp: str) -> AbstractContextManager[object]:
    """bf16/fp16 autocast for `amp`, a no-op context for 'off'."""
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
