"""Constants shared by the training tests (a unique module name: several test folders have a conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRITEO_CFG = REPO / "cfgs" / "criteo.yaml"
K_FOLDS = 3
# small, fast models and batches for every training test
# (criteo.yaml's small-data settings -- min_steps, 4 evaluations per epoch, early stopping -- are switched off
# here: each test sets the steps and evaluations it checks; tests/train/test_plan.py covers those settings)
FAST = ["loader.batch_size=64", "loader.eval_batch_size=128", "model.hidden_units=[16]",
        "model.embedding_dim=4", "train.log_every=2", "infer.calibration.method=none", "train.min_steps=0",
        "train.evals_per_epoch=1", "train.early_stopping.patience=0"]


def build_cache(out: Path, synth: Path, overrides: list[str], gold: bool) -> Path:
    """A shard cache of the synthetic Criteo rows in `synth` (criteo.yaml, 256-row shards, 20% validation)."""
    from ctrpipe.config import load_config
    from ctrpipe.shard.build import build_shards

    cfg = load_config(CRITEO_CFG, ["data.shard_rows=256", "data.split.val_ratio=0.2", *overrides])
    build_shards(cfg, [synth / "train.tsv"], out, gold=[synth / "test.tsv"] if gold else (), progress=False)
    return out


def packed_weights(path: Path) -> dict:
    """Every tensor of a checkpoint's weights: dense ones, and each table's changed rows and their values."""
    from ctrpipe.train.checkpoint import load_checkpoint

    w = load_checkpoint(path).weights
    out = dict(w["dense"])
    for name, t in w["tables"].items():
        out[f"{name}.rows"], out[f"{name}.values"] = t["rows"], t["values"]
    return out
