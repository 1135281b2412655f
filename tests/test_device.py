"""device.py: how train.amp=auto picks a precision, and that predictions stay fp32 under it."""

from __future__ import annotations

import platform

import pytest
import torch

from ctrpipe.device import CPU_BF16_FASTER, autocast, cpu_bf16_isa, model_family, predict_amp, resolve_amp
from ctrpipe.errors import ConfigError
from ctrpipe.train.config import TrainConfig

CPU = torch.device("cpu")
x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 flags only")

SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512_bf16"}
SKYLAKE = {"avx2", "avx512f", "avx512bw"}


def test_auto_is_the_default_and_other_names_are_refused():
    assert TrainConfig().amp == "auto"
    assert TrainConfig(amp=False).amp == "off"          # YAML's bare `off`
    with pytest.raises(ConfigError, match="train.amp=auto, off, bf16 or fp16"):
        TrainConfig(amp="fp8")


@x86
def test_auto_on_cpus_by_instruction_set_and_model_family():
    assert cpu_bf16_isa(SAPPHIRE_RAPIDS) == "amx_bf16" and cpu_bf16_isa(ZEN4) == "avx512_bf16"
    assert cpu_bf16_isa(SKYLAKE) is None
    for flags in (SAPPHIRE_RAPIDS, ZEN4):
        choice = resolve_amp("auto", CPU, "dcnv2", flags)
        assert choice.precision == "bf16" and "measured faster" in choice.reason
    emulated = resolve_amp("auto", CPU, "dnn", SKYLAKE)
    assert emulated.precision == "off" and "emulated" in emulated.reason
    # a family not measured faster on an instruction set stays fp32 there, and says so
    for isa, flags in (("amx_bf16", SAPPHIRE_RAPIDS), ("avx512_bf16", ZEN4)):
        for family in ("autoint", "dare_qnn", "dare", "no_such_model"):
            choice = resolve_amp("auto", CPU, family, flags)
            assert (choice.precision == "bf16") == (family in CPU_BF16_FASTER[isa]), (isa, family)
            if choice.precision == "off":
                assert f"{family}'s bf16 step is not measured faster" in choice.reason


def test_explicit_settings_are_kept_and_predictions_stay_fp32_under_auto():
    for amp in ("off", "bf16", "fp16"):
        assert resolve_amp(amp, CPU, "dnn", SAPPHIRE_RAPIDS).precision == amp
        assert predict_amp(amp) == amp
    assert predict_amp("auto") == "off"
    with pytest.raises(AssertionError, match="resolve train.amp=auto"):
        autocast(CPU, "auto")


def test_esmm_is_measured_by_its_backbone():
    from ctrpipe.config import load_config

    cfg = load_config(None, ["model.name=esmm", "model.backbone=dcnv2"])
    assert model_family(cfg.model.name, cfg.model.params) == "dcnv2"
    cfg = load_config(None, ["model.name=dnn"])
    assert model_family(cfg.model.name, cfg.model.params) == "dnn"


def test_cpu_name_is_the_model_name_line_of_cpuinfo(tmp_path):
    import platform

    from ctrpipe.device import cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9454 48-Core Processor \n"
                    "flags\t\t: fpu avx512_bf16\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9454 48-Core Processor\n")
    assert cpu_name(info) == "AMD EPYC 9454 48-Core Processor"
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    info.write_text("processor\t: 0\nHardware\t: BCM2835\n")        # no model name line (some ARM kernels)
    assert cpu_name(info) == fallback
    assert cpu_name(tmp_path / "absent") == fallback
    assert cpu_name()
