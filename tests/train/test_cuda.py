"""The CUDA paths against the CPU's, on a GPU only (skipped elsewhere; benchmarks/gpu_check.sh runs them on a
lent GPU): LazyAdam's device step, training and resuming on the GPU, prediction through device stages, and
`ctrpipe train` + `ctrpipe infer` on the GPU against the same run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import sets
from torch import nn
from train_setup import CRITEO_CFG, FAST, packed_weights
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from ctrpipe.train.evaluate import predict
from ctrpipe.train.optim import LazyAdam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32: compared with the CPU's weights to float tolerance (criteo.yaml's amp auto would pick bf16 on the GPU)
GPU = ["train.device=cuda", "train.amp=off", "model.dropout=0.0", "train.warmup_steps=0", "train.max_steps=8"]


def _train(cache: Path, runs: Path, exp: str, extra: list[str], *flags: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(runs),
                                   "-q", *sets([*FAST, *GPU, *extra, f"exp_name={exp}"]), *flags])
    return res.exit_code, res.output


@pytest.mark.parametrize("scaled", [False, True])
def test_lazy_adam_on_the_gpu_equals_the_cpu_step(scaled: bool) -> None:
    """The device path (no data-dependent sizes, step count and bias corrections on the device; under fp16's
    GradScaler the scale and inf flag as tensors) against the CPU path, to float tolerance."""
    torch.manual_seed(0)
    tables = {d: nn.Embedding(200, 8, sparse=True).to(d) for d in ("cpu", "cuda")}
    tables["cuda"].weight.data.copy_(tables["cpu"].weight.data.cuda())
    opts = {d: LazyAdam(t.parameters(), lr=0.01) for d, t in tables.items()}
    scalers = {d: torch.amp.GradScaler(d, init_scale=2.0 ** 8, enabled=scaled) for d in tables}
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        ids = torch.randint(0, 120, (64, 6), generator=gen)                  # rows 120.. never touched
        target = torch.randn(64, 6, 8, generator=gen)
        for d, table in tables.items():
            opts[d].zero_grad(set_to_none=True)
            loss = ((table(ids.to(d)) - target.to(d)) ** 2).mean()
            if scaled and step == 3:
                loss = loss * float("inf")                                  # an overflowed step: skipped
            scalers[d].scale(loss).backward()
            scalers[d].step(opts[d])
            scalers[d].update()
    torch.testing.assert_close(tables["cuda"].weight.detach().cpu(), tables["cpu"].weight.detach(),
                               rtol=1e-4, atol=1e-5)


def test_training_and_resuming_on_the_gpu(cache: Path, tmp_path: Path) -> None:
    """An uninterrupted GPU run and one stopped and resumed end with the same weights (CUDA's atomics may
    reorder sums: to float tolerance), and close to the same run on the CPU."""
    code, out = _train(cache, tmp_path, "whole", [])
    assert code == 0, out
    code, out = _train(cache, tmp_path, "resumed", ["train.stop_after_steps=3"])
    assert code == 0, out
    code, out = _train(cache, tmp_path, "resumed", [], "--resume")
    assert code == 0, out
    code, out = _train(cache, tmp_path, "cpu", ["train.device=cpu"])
    assert code == 0, out
    whole, resumed, cpu = (packed_weights(tmp_path / d / "ckpt_last.pt") for d in ("whole", "resumed", "cpu"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(cpu[key], whole[key], rtol=1e-3, atol=1e-4, msg=key)
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["peak_device_memory_bytes"] > 0


@pytest.mark.parametrize("stage_rows", [50, 1 << 20])
def test_prediction_through_device_stages_equals_the_cpu(cache: Path, tmp_path: Path, stage_rows: int) -> None:
    code, out = _train(cache, tmp_path, "run", [])
    assert code == 0, out
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt_best.pt")
    loader = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0)
    cpu_preds = predict(model_from_checkpoint(ckpt, "cpu"), loader, loader.num_rows, 1, torch.device("cpu"))
    gpu_loader = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0, device="cuda")
    gpu_preds = predict(model_from_checkpoint(ckpt, "cuda"), gpu_loader, gpu_loader.num_rows, 1,
                        torch.device("cuda"), stage_rows=stage_rows)
    assert np.array_equal(gpu_preds.row_index, cpu_preds.row_index)
    np.testing.assert_array_equal(gpu_preds.labels, cpu_preds.labels)
    np.testing.assert_allclose(gpu_preds.logits, cpu_preds.logits, rtol=1e-4, atol=1e-5)


def test_train_and_infer_on_the_gpu_in_bf16(cache: Path, tmp_path: Path) -> None:
    """`ctrpipe train` + `ctrpipe infer` of DNN and DCN v2 on the GPU with bf16 autocast: finished runs, a
    submission of every gold row, and an AUC near the fp32 CPU run's."""
    for model in ("dnn", "dcnv2"):
        code, out = _train(cache, tmp_path, model, [f"model.name={model}", "train.amp=bf16"])
        assert code == 0, out
        res = CliRunner().invoke(app, ["infer", "--run", str(tmp_path / model), "--shards", str(cache),
                                       "--out", str(tmp_path / f"{model}.csv"), "-q", "--set", "infer.view=gold",
                                       "--set", "train.device=cuda"])
        assert res.exit_code == 0, res.output
        rows = (tmp_path / f"{model}.csv").read_text().splitlines()
        assert len(rows) - 1 == ShardLoader(cache, RowView.gold(), 128, shuffle=False, seed=0).num_rows
        code, out = _train(cache, tmp_path, f"{model}_cpu", [f"model.name={model}", "train.device=cpu"])
        assert code == 0, out
        gpu, cpu = (json.loads((tmp_path / d / "metrics.json").read_text())["val"]["auc"]
                    for d in (model, f"{model}_cpu"))
        assert abs(gpu - cpu) < 0.02, (model, gpu, cpu)


def test_building_a_checkpoints_model_leaves_the_gpus_generator_alone(cache: Path, tmp_path: Path) -> None:
    """build_initial_model seeds the CPU generator it builds with, inside fork_rng: torch.manual_seed reseeded
    the GPUs as well, and fork_rng(devices=[]) did not restore them."""
    code, out = _train(cache, tmp_path, "run", [])
    assert code == 0, out
    torch.cuda.manual_seed(12345)
    before, cpu_before = torch.cuda.get_rng_state(), torch.get_rng_state()
    model_from_checkpoint(load_checkpoint(tmp_path / "run" / "ckpt_best.pt"), "cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before) and torch.equal(torch.get_rng_state(), cpu_before)
