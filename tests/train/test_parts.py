"""Training building blocks on their own: LR schedule, early stopping, EMA swap, checkpoint files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ctrpipe.errors import CheckpointError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ctrpipe.train.config import EarlyStoppingConfig, TrainConfig
from ctrpipe.train.ema import ModelEMA
from ctrpipe.train.optim import lr_factor
from ctrpipe.train.stopping import EarlyStopping


def test_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    total = 14
    # warm-up: (step + 1) / 4
    assert [lr_factor(s, total, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine over steps 4..13: starts at 1, halfway (step 4 + 4.5) at 0.55, last step at min_lr_ratio
    assert lr_factor(4, total, cfg) == pytest.approx(1.0)
    assert lr_factor(13, total, cfg) == pytest.approx(0.1)
    assert lr_factor(4 + 4.5, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)


def test_step_and_constant_schedules():
    step = TrainConfig(schedule="step", step_every=3, step_gamma=0.5)
    assert [lr_factor(s, 100, step) for s in (0, 2, 3, 6, 9)] == pytest.approx([1, 1, 0.5, 0.25, 0.125])
    assert lr_factor(57, 100, TrainConfig(schedule="constant")) == 1.0


def test_early_stopping_modes_and_patience():
    es = EarlyStopping(EarlyStoppingConfig(metric="logloss", patience=2))
    assert es.mode == "min"                                  # auto: lower logloss is better
    assert es.update({"logloss": 0.5}, 10, 0)
    assert not es.update({"logloss": 0.6}, 20, 1)
    assert not es.should_stop
    assert not es.update({"logloss": float("nan")}, 30, 2)   # NaN never improves
    assert es.should_stop and es.best_step == 10
    auc = EarlyStopping(EarlyStoppingConfig(metric="auc"))
    assert auc.mode == "max" and auc.patience == 0
    auc.update({"auc": 0.7}, 1, 0)
    restored = EarlyStopping(EarlyStoppingConfig(metric="auc"))
    restored.load_state_dict(auc.state_dict())
    assert restored.best == 0.7 and restored.best_step == 1


def test_ema_swaps_averaged_weights_in_and_out():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()                     # first update: decay min(0.5, 2/11) = 0.1818 -> mostly the new weights
    d = 2 / 11
    expected = d * start + (1 - d) * (start + 1.0)
    with ema.applied():
        assert torch.allclose(model.weight, expected)
    assert torch.equal(model.weight, start + 1.0)
    assert torch.allclose(ema.state_dict(model)["weight"], expected)


def test_checkpoint_roundtrip_is_atomic(tmp_path: Path):
    path = tmp_path / "ckpt.pt"
    spec = FeatureSpec(numeric=("I1",), categorical=(FieldSpec("C1", "categorical", 10),), labels=("click",),
                       label_rates=(0.25,))
    weights = {"dense": {"w": torch.arange(3.0)},
               "tables": {"t": {"rows": torch.tensor([1, 4]), "values": torch.ones(2, 3)}}}
    ckpt = Checkpoint(config={"model": {"name": "dnn"}}, feature_spec=spec, schema_fingerprint="a",
                      manifest_fingerprint="b", shards="s", fold=-1, init_seed=7, weights=weights,
                      val_metrics={"auc": 0.7}, epoch=1, step=5)
    save_checkpoint(path, ckpt)
    assert not (tmp_path / "ckpt.pt.incomplete").exists()
    back = load_checkpoint(path)
    assert (back.schema_fingerprint, back.model_name, back.init_seed, back.step) == ("a", "dnn", 7, 5)
    assert back.feature_spec == spec and back.labels == ("click",) and back.train_state is None
    assert torch.equal(back.weights["tables"]["t"]["rows"], torch.tensor([1, 4]))
    assert torch.equal(back.weights["dense"]["w"], torch.arange(3.0))


def test_checkpoint_errors_name_file_and_fix(tmp_path: Path):
    with pytest.raises(CheckpointError) as missing:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(missing.value) and "fix: train first" in str(missing.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as corrupt:
        load_checkpoint(bad)
    assert "bad.pt" in str(corrupt.value) and "fix:" in str(corrupt.value)
    old = tmp_path / "old.pt"
    torch.save({"format": 1, "state_dict": {}}, old)     # a checkpoint of the format with whole tables
    with pytest.raises(CheckpointError, match="format 1"):
        load_checkpoint(old)


def test_train_config_checks():
    from ctrpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="train.ema"):
        TrainConfig(ema=1.0)
    with pytest.raises(ConfigError, match="train.pos_weight"):
        TrainConfig(pos_weight=(1.0, -1.0))
    assert TrainConfig(embedding_optimizer="adagrad").sparse_embeddings
    assert not TrainConfig(embedding_optimizer="adam").sparse_embeddings
    assert math.isclose(TrainConfig().lr, 1e-3)


def test_amp_off_survives_yaml():
    # YAML 1.1 reads a bare `off` as false; the config turns it back into "off"
    from ctrpipe.config import apply_overrides, build_dataclass

    data = apply_overrides({}, ["train.amp=off"])["train"]
    assert data["amp"].parsed is False and data["amp"] == "off"          # the YAML value and the text
    assert build_dataclass(TrainConfig, data, "train.", "--set").amp == "off"


def test_deterministic_flag_holds_only_while_training() -> None:
    """train.deterministic turns on torch's deterministic algorithms for the run (on every device, GPUs being
    where it matters) and gives the caller's setting back afterwards."""
    import torch

    from ctrpipe.config import load_config
    from ctrpipe.train.fit import _reproducible

    before = torch.are_deterministic_algorithms_enabled()
    with _reproducible(load_config(None, ["train.deterministic=true", "train.device=cpu"])):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with _reproducible(load_config(None, ["train.deterministic=false"])):
        assert torch.are_deterministic_algorithms_enabled() == before
