"""Stage 5 -> 6 contract: what a checkpoint holds, how it is written atomically and how a model is rebuilt.

`Checkpoint` is the typed form; on disk it is the plain dict of `to_saved()` (loadable with
`torch.load(weights_only=True)`), format 2::

    format               2
    config               to_dict(RunConfig): the full resolved run config; config["model"]["name"] names
                         the model (stored once)
    feature_spec         dataclasses.asdict(FeatureSpec) of the training cache
    schema_fingerprint   Manifest.schema_fingerprint() of the training cache
    manifest_fingerprint Manifest.fingerprint of the training cache
    shards               path of the training cache (for messages only)
    fold                 fold index, -1 for a single run
    init_seed            torch seed the model was built with: rebuilding from it restores every row that
                         training did not change
    weights              evaluation weights (EMA weights when train.ema > 0), packed (train/tables.py):
                         dense parameters whole, embedding tables as their changed rows only
    val_metrics          metrics of these weights on the validation view ({} when there is none)
    epoch, step          position when saved (epoch = completed epochs)
    train_state          None in ckpt_best.pt / ckpt_fold{k}.pt; in ckpt_last.pt what --resume needs
                         (`TrainState.to_saved`)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctrpipe.atomic import atomic_open
from ctrpipe.errors import CheckpointError, ManifestMismatchError
from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.models.heads import heads_of
from ctrpipe.shard.manifest import Manifest
from ctrpipe.train.config import TrainConfig
from ctrpipe.train.objective import Task, build_tasks
from ctrpipe.train.tables import PackedState, load_packed

FORMAT = 2


@dataclass
class RunPosition:
    """Where a run stands; survives --resume."""

    step: int = 0                     # optimiser steps done
    epoch: int = 0                    # epochs completed
    batch_in_epoch: int = 0           # batches of the current epoch done
    samples: int = 0
    train_seconds: float = 0.0
    last_eval_step: int = -1


@dataclass
class TrainState:
    """Everything `--resume` needs beyond the evaluation weights (only in ckpt_last.pt)."""

    position: RunPosition
    optimizers: list[dict[str, Any]]       # packed optimizer state dicts (tables: changed rows only)
    changed_rows: dict[str, torch.Tensor]  # table name -> (U,) rows with a gradient so far
    scaler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    early_stopping: dict[str, Any]
    raw_weights: PackedState | None = None  # training weights when EMA is on (`weights` then holds the EMA)
    ema_updates: int = 0
    finished: bool = False
    # processes of the run (torchrun's WORLD_SIZE): rng holds "torch.rank{r}" per rank r > 0 beside rank 0's
    #   "torch", so --resume needs the same number (train/distributed.py)
    world_size: int = 1
    # the loss and model diagnostics summed since the last train_log.csv row (a torchrun job's rank r > 0's
    # under "rank{r}"): the resumed run's next row averages the same steps as an uninterrupted run's
    log_sums: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_saved(self) -> dict[str, Any]:
        # shallow on purpose: dataclasses.asdict would deep-copy every tensor
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["position"] = dataclasses.asdict(self.position)
        return d

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{**d, "position": RunPosition(**d["position"])})


_ADDED_LATER = {"sampling_rate"}      # fields a checkpoint of an earlier ctrpipe lacks: their defaults apply


@dataclass
class Checkpoint:
    config: dict[str, Any]
    feature_spec: FeatureSpec
    schema_fingerprint: str
    manifest_fingerprint: str
    shards: str
    fold: int
    init_seed: int
    weights: PackedState
    val_metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    train_state: TrainState | None = None
    # the rate balanced batches' logit shift used (a K-fold model: its training view's), None: the spec's
    sampling_rate: float | None = None

    @property
    def model_name(self) -> str:
        return str(self.config["model"]["name"])

    @property
    def labels(self) -> tuple[str, ...]:
        return self.feature_spec.labels

    def to_saved(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["format"] = FORMAT
        d["feature_spec"] = dataclasses.asdict(self.feature_spec)
        d["train_state"] = self.train_state.to_saved() if self.train_state is not None else None
        return d

    @classmethod
    def from_saved(cls, d: dict[str, Any], where: str) -> Checkpoint:
        names = [f.name for f in dataclasses.fields(cls) if f.name in d or f.name not in _ADDED_LATER]
        missing = [k for k in names if k not in d]
        if missing:
            raise CheckpointError(f"checkpoint lacks keys {missing}", where=where,
                                  fix="retrain with this ctrpipe version")
        values = {k: d[k] for k in names}
        values["feature_spec"] = feature_spec_from_dict(d["feature_spec"])
        ts = d["train_state"]
        values["train_state"] = TrainState.from_saved(ts) if ts is not None else None
        return cls(**values)


def save_checkpoint(path: Path | str, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically: a crash leaves the old file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = ckpt.to_saved()
    with atomic_open(path, "wb", size_hint=_tensor_bytes(saved)) as fh:
        torch.save(saved, fh)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list (what a full disk message says the file needs)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read and check a checkpoint written by `save_checkpoint` (tensors land on the CPU)."""
    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".incomplete").exists()
        what = f"checkpoint {path} does not exist"
        if partial:
            what += " (only an interrupted .incomplete write)"
        raise CheckpointError(what, where=str(path),
                              fix="train first with `ctrpipe train --cfg CFG --shards DIR`, or check --run")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        # torch's own advice (load it with weights_only=False) would run whatever code a foreign file holds:
        # only its unpickler's reason is kept
        text = str(exc)
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
        reason = f"not plain tensors and values: {unpickler.group(1).strip()}" if unpickler else \
            text.split("Re-running `torch.load`")[0].strip()
        raise CheckpointError(f"cannot read checkpoint ({type(exc).__name__}: {reason[:200]})",
                              where=str(path),
                              fix=_damaged_fix(path)) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        got = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"checkpoint format {got!r}, this ctrpipe reads format {FORMAT}",
                              where=str(path), fix="retrain with this ctrpipe version")
    return Checkpoint.from_saved(saved, str(path))


def _damaged_fix(path: Path) -> str:
    """What to do about a checkpoint that cannot be read: train the run again. --resume mends neither a
    ckpt_last.pt (what it resumes from) nor a best or fold checkpoint (a finished run resumes nothing, and an
    unfinished one rewrites its best only when an evaluation improves on it)."""
    unreadable = "the file is damaged or not a ctrpipe checkpoint"
    if path.name.startswith("ckpt_last"):
        unreadable += ", so this run cannot resume"
    return (f"{unreadable}: train it again without --resume, with --set exp_name=NEW (or after moving this run's "
            "folder away)")


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
        label_pair_rates=tuple((str(a), str(b), float(r)) for a, b, r in d.get("label_pair_rates", ())),
    )


def build_initial_model(config: dict[str, Any], spec: FeatureSpec, seed: int, sparse: bool = False) -> nn.Module:
    """The model of `config["model"]` exactly as training built it from `seed` (the caller's RNG is untouched)."""
    from ctrpipe.config import build_model_section
    from ctrpipe.models.registry import build_model

    section = build_model_section(dict(config["model"]), origin="checkpoint")
    with torch.random.fork_rng(devices=[]):         # models are built on the CPU: only its generator is used
        torch.default_generator.manual_seed(seed)   # (torch.manual_seed would reseed the GPUs too, for good)
        return build_model(section.name, section.params, spec, sparse=sparse)


def checkpoint_tasks(ckpt: Checkpoint, train_cfg: TrainConfig) -> tuple[Task, ...]:
    """The heads the checkpoint's model predicts, with `train_cfg.tasks` applied (no weights are built)."""
    with torch.device("meta"):
        model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    return build_tasks(heads_of(model, ckpt.feature_spec), ckpt.feature_spec, train_cfg)


def model_from_checkpoint(ckpt: Checkpoint, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its (evaluation) weights, in eval mode."""
    # sparse=True only changes the gradient type; inference builds the dense variant with the same weights
    model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed, sparse=False)
    try:
        load_packed(model, ckpt.weights)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit model {ckpt.model_name!r}: {str(exc)[:300]}",
                              where=f"checkpoint of {ckpt.model_name}",
                              fix="the model code or config changed since training: retrain") from None
    return model.to(device).eval()


def check_compatible(ckpt: Checkpoint, manifest: Manifest, cache_dir: Path | str | None = None,
                     ckpt_path: Path | str | None = None) -> None:
    """Refuse a cache whose feature layout or hashing differs from the one the checkpoint was trained on."""
    have = manifest.schema_fingerprint()
    want = ckpt.schema_fingerprint
    if have == want:
        return
    trained_on = ckpt.shards or "?"
    raise ManifestMismatchError(
        f"checkpoint was trained on shards {trained_on} (schema {want[:12]}), but the cache "
        f"{cache_dir or '?'} has schema {have[:12]}: columns, hashing or fitted statistics differ",
        where=str(ckpt_path or "checkpoint"),
        fix=f"shard this data with the training run's data config (test data: `ctrpipe shard --test "
            f"--stats-from {trained_on} ...`), or use a run trained on {cache_dir or 'this cache'}")
