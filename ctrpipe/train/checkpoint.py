"""Stage 5 -> 6 contract: what a checkpoint holds, how it is written atomically and how a model is rebuilt.

A checkpoint is a plain dict saved with `torch.save` (loadable with `weights_only=True`)::

    format               1
    model_name           "dnn"
    model_params         to_dict(cfg.model): {"name": "dnn", "hidden": [...], ...}
    state_dict           model weights for evaluation (the EMA weights when train.ema > 0)
    feature_spec         dataclasses.asdict(FeatureSpec) of the training cache
    schema_fingerprint   Manifest.schema_fingerprint() of the training cache
    manifest_fingerprint Manifest.fingerprint of the training cache
    shards               path of the training cache (for messages only)
    config               to_dict(RunConfig): the full resolved run config
    fold                 fold index, -1 for a single run
    val_metrics          metrics of these weights on the validation view ({} when there is none)
    epoch, step          position when saved (epoch = completed epochs)

`ckpt_last.pt` files also hold the training state that `--resume` needs: "raw_state_dict" (training
weights when EMA is on, else None), "optimizers", "scaler", "scheduler", "rng", "ema_updates",
"early_stopping", "batch_in_epoch", "samples", "train_seconds", "last_eval_step", "finished".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrpipe.atomic import atomic_open
from ctrpipe.errors import CheckpointError, ManifestMismatchError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.shard.manifest import Manifest

FORMAT = 1
REQUIRED_KEYS = ("format", "model_name", "model_params", "state_dict", "feature_spec", "schema_fingerprint",
                 "manifest_fingerprint", "config", "fold", "val_metrics", "epoch", "step")


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a crash leaves the old file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".incomplete").exists()
        what = f"checkpoint {path} does not exist"
        if partial:
            what += " (only an interrupted .incomplete write)"
        raise CheckpointError(what, where=str(path),
                              fix="train first with `ctrpipe train --cfg CFG --shards DIR`, or check --run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint ({type(exc).__name__}: {str(exc)[:200]})",
                              where=str(path),
                              fix="the file is damaged or not a ctrpipe checkpoint: retrain, or --resume "
                                  "from ckpt_last.pt") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint format {got!r}, this ctrpipe reads format {FORMAT}",
                              where=str(path),
                              fix="retrain with this ctrpipe version")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks keys {missing}", where=str(path),
                              fix="retrain with this ctrpipe version")
    return ckpt


def feature_spec_from_dict(d: dict[str, Any]) -> FeatureSpec:
    """Inverse of `dataclasses.asdict(FeatureSpec)`, restoring tuples and nested FieldSpecs."""

    def fields_of(key: str) -> tuple[FieldSpec, ...]:
        return tuple(f if isinstance(f, FieldSpec) else FieldSpec(**f) for f in d.get(key, ()))

    return FeatureSpec(
        numeric=tuple(d.get("numeric", ())),
        categorical=fields_of("categorical"),
        multihot=fields_of("multihot"),
        sequence=fields_of("sequence"),
        labels=tuple(d.get("labels", ("label",))),
        label_rates=tuple(float(r) for r in d.get("label_rates", (0.5,))),
    )


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its (evaluation) weights, in eval mode."""
    from ctrpipe.config import build_model_section
    from ctrpipe.models.registry import build_model

    params = dict(ckpt["model_params"])
    params.setdefault("name", ckpt["model_name"])
    section = build_model_section(params, origin="checkpoint")
    spec = feature_spec_from_dict(ckpt["feature_spec"])
    # sparse=True only changes the gradient type; inference builds the dense variant with the same weights
    model = build_model(section.name, section.params, spec, sparse=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit model {section.name!r}: {str(exc)[:300]}",
                              where=f"checkpoint of {ckpt['model_name']}",
                              fix="the model code or config changed since training: retrain") from None
    return model.to(device).eval()


def check_compatible(ckpt: dict[str, Any], manifest: Manifest, cache_dir: Path | str | None = None,
                     ckpt_path: Path | str | None = None) -> None:
    """Refuse a cache whose feature layout or hashing differs from the one the checkpoint was trained on."""
    have = manifest.schema_fingerprint()
    want = ckpt["schema_fingerprint"]
    if have == want:
        return
    trained_on = ckpt.get("shards", "?")
    raise ManifestMismatchError(
        f"checkpoint was trained on shards {trained_on} (schema {want[:12]}), but the cache "
        f"{cache_dir or '?'} has schema {have[:12]}: columns, hashing or fitted statistics differ",
        where=str(ckpt_path or "checkpoint"),
        fix=f"shard this data with the training run's data config (test data: `ctrpipe shard --test "
            f"--stats-from {trained_on} ...`), or use a run trained on {cache_dir or 'this cache'}")


def feature_spec_dict(spec: FeatureSpec) -> dict[str, Any]:
    """`dataclasses.asdict` of a FeatureSpec (what checkpoints store)."""
    return dataclasses.asdict(spec)
