"""train.amp=auto end to end: the run says which precision its steps used and why; predictions stay fp32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from test_train import train

from ctrpipe.device import resolve_amp
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.train.checkpoint import load_checkpoint, model_from_checkpoint
from ctrpipe.train.evaluate import predict


def test_auto_records_the_precision_and_predicts_in_fp32(cache: Path, tmp_path: Path):
    code, out = train(cache, tmp_path, "--set", "model.name=dcnv2", "--set", "train.max_steps=4")
    assert code == 0, out
    run = tmp_path / "criteo"
    metrics = json.loads((run / "metrics.json").read_text())
    want = resolve_amp("auto", torch.device("cpu"), "dcnv2")      # this machine's answer, bf16 or fp32
    assert metrics["config"]["train"]["amp"] == "auto"
    assert metrics["precision"] == {"train": want.precision, "predict": "off", "reason": want.reason}
    assert ("(bf16 steps)" if want.precision == "bf16" else "(fp32)") in out
    # the saved validation predictions are fp32 predictions of the best weights, whatever the steps ran in
    val = ShardLoader(cache, RowView.val(), 128, shuffle=False, seed=0)
    again = predict(model_from_checkpoint(load_checkpoint(run / "ckpt_best.pt")), val, val.num_rows, 1,
                    torch.device("cpu"))
    with np.load(run / "val_predictions.npz") as z:
        assert np.array_equal(again.logits, z["logits"])


def test_bf16_steps_train_every_fused_path(cache: Path, tmp_path: Path):
    """bf16 on the CPU through the hand-written paths (cross tower, parts, FM, attention): finite, learning."""
    for model in ("dcnv2", "deepfm", "autoint"):
        code, out = train(cache, tmp_path / model, "--set", f"model.name={model}", "--set", "train.amp=bf16",
                          "--set", "train.max_steps=6")
        assert code == 0, out
        metrics = json.loads((tmp_path / model / "criteo" / "metrics.json").read_text())
        assert metrics["precision"]["train"] == "bf16" and metrics["precision"]["predict"] == "bf16"
        assert np.isfinite(metrics["val"]["logloss"]), model
