"""Where models run and in which precision: one home for `train` and `infer` (both import it directly).

`train.device` / `train.amp` are the only two settings; inference reads them from the run's config (and lets
`--set` change them), so a run trained on a GPU predicts on a CPU-only machine with `--set train.device=cpu`.

`train.amp=auto` (the default) trains in bf16 autocast where the hardware runs it natively and the model's
step was measured faster than fp32 there, and in fp32 elsewhere; predictions under `auto` (evaluation, gold
scoring, infer, serving) stay fp32, so infer, the Predictor and an exported module agree with the run's own
metrics.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ctrpipe.errors import ConfigError

Precision = Literal["off", "bf16", "fp16"]

# Per CPU bf16 instruction set, the model families whose bf16 training step was measured faster than fp32
# (benchmarks/bench_amp.py, bench_quality.py --amp both, bench_sequence.py --amp both; figures in
# benchmarks/RESULTS.md); `auto` trains any other model in fp32 there. avx512_bf16: an AMD EPYC without AMX,
# every family listed; DARE is not, because its whole bf16 runs were not faster than fp32 (its small
# dot-product search gains little and pays the casts). amx_bf16 (Intel
# Sapphire Rapids and later, which also have avx512_bf16): DNN and DCN v2 were measured faster and the other
# dense families share their layers; attention over fields was measured slower there with the SDPA kernel it
# used then, and neither its current bf16 path nor the sequence models have been measured on AMX yet.
_DENSE = frozenset({"dnn", "deepfm", "dcn", "dcnv2", "shared_bottom", "mmoe", "ple", "deepfm_mmoe"})
CPU_BF16_FASTER: dict[str, frozenset[str]] = {
    "amx_bf16": _DENSE,
    "avx512_bf16": _DENSE | {"autoint", "ft_transformer", "din", "qnn_alpha", "dare_qnn"},
}


@dataclass(frozen=True)
class AmpChoice:
    """The precision a run's training steps use, and why (recorded in metrics.json and printed)."""

    precision: Precision
    reason: str


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device that is absent is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"bad value {name!r} for 'train.device'", where="train.device",
                          fix="use auto, cpu, cuda or cuda:1") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device={name}: ctrpipe runs on the CPU or CUDA", where="train.device",
                          fix="use train.device=auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available", where="train.device",
                          fix="use train.device=auto or train.device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)",
                          where="train.device", fix="use train.device=cuda (the first device) or a smaller index")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 needs a GradScaler and CUDA kernels; refuse it elsewhere before any work is done."""
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp=fp16 needs a CUDA device, the run uses {device}", where="train.amp",
                          fix="use train.amp=bf16 (works on CPU) or train.amp=off")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere, which keeps `auto` at fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows, e.g. 'AMD EPYC'."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_isa(flags: Collection[str]) -> str | None:
    """The CPU's native bf16 matrix instructions ('amx_bf16', else 'avx512_bf16'), or None.

    Without them oneDNN converts bf16 to fp32 around fp32 kernels, so bf16 is no faster (often slower); with
    them a bf16 GEMM runs several times faster than fp32. Only x86 sets are listed: they are the measured ones.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return next((isa for isa in CPU_BF16_FASTER if isa in flags), None)


def resolve_amp(amp: str, device: torch.device, model: str, flags: Collection[str] | None = None) -> AmpChoice:
    """The precision of the training steps: `amp` as set, or for 'auto' what this device runs fastest.

    `model` is the model family (`model.name`, or an ESMM's backbone); `flags` the CPU's feature flags
    (default: this machine's). GPUs: bf16 from compute capability 8.0 (Ampere) on, where it has tensor
    cores and needs no loss scaling; fp32 on older GPUs (fp16 would need a GradScaler and can overflow).
    """
    if amp != "auto":
        return AmpChoice(amp, "train.amp=" + amp)   # type: ignore[arg-type]  # TrainConfig checked the name
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return AmpChoice("bf16", f"auto: the GPU (compute capability {major}.{minor}) runs bf16 natively")
        return AmpChoice("off", f"auto: the GPU (compute capability {major}.{minor}) has no native bf16")
    if device.type != "cpu":
        return AmpChoice("off", f"auto: fp32 on {device.type} (bf16 measured only on CPUs and CUDA GPUs)")
    isa = cpu_bf16_isa(cpu_flags() if flags is None else flags)
    if isa is None:
        return AmpChoice("off", "auto: the CPU has no native bf16 instructions (amx_bf16 / avx512_bf16), "
                                "so bf16 would be emulated")
    if model not in CPU_BF16_FASTER[isa]:
        return AmpChoice("off", f"auto: the CPU has {isa}, but {model}'s bf16 step is not measured faster "
                                "than fp32 on it")
    return AmpChoice("bf16", f"auto: the CPU has {isa} and {model}'s bf16 step was measured faster than fp32")


def model_family(name: str, params: object) -> str:
    """The name `resolve_amp` looks a model up by: `model.name`, or for ESMM its backbone (whose speed it has)."""
    return str(getattr(params, "backbone", name))


def predict_amp(amp: str) -> Precision:
    """The precision predictions use: fp32 under 'auto' (see the module docstring), else `amp` as set."""
    return "off" if amp == "auto" else amp   # type: ignore[return-value]  # TrainConfig checked the name


def autocast(device: torch.device, amp: str) -> AbstractContextManager[object]:
    """bf16/fp16 autocast for `amp`, a no-op context for 'off' ('auto' must be resolved first)."""
    assert amp != "auto", "resolve train.amp=auto with resolve_amp or predict_amp first"
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
