"""Model name -> (config dataclass, builder). Each model file registers itself with `@register`.

Model files are found, not listed: every module directly in `ctrpipe/models/` except the shared ones
(`base`, `heads`, `registry`) is imported on first use, so adding a model is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctrpipe.errors import ConfigError, SchemaError, human_bytes
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import available_bytes
from ctrpipe.models.base import SHARD_A_HISTORY

# modules of ctrpipe/models/ that hold no model; the rest are imported lazily (`ctrpipe synth` does not pay
# for the zoo)
_SHARED_MODULES = frozenset({"base", "heads", "registry"})


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type
    builder: Callable[..., nn.Module]   # builder(spec, cfg, sparse=bool) -> nn.Module
    requires: tuple[str, ...] = ()      # feature kinds that must be present: "numeric", "sequence", ...
    min_labels: int = 1                 # label columns the cache must have (multi-task models: 2)
    max_labels: int | None = None       # None: any number


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type, requires: tuple[str, ...] = (), min_labels: int = 1,
             max_labels: int | None = None) -> Callable[[Any], Any]:
    """Class decorator: `@register("dcnv2", DCNv2Config)` on a model whose __init__ is (spec, cfg, sparse)."""

    def deco(builder: Any) -> Any:
        _REGISTRY[name] = ModelEntry(name, config_cls, builder, requires, min_labels, max_labels)
        return builder

    return deco


def _load_all() -> None:
    import ctrpipe.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.ispkg and info.name not in _SHARED_MODULES and not info.name.startswith("_"):
            importlib.import_module(f"ctrpipe.models.{info.name}")


def model_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _entry(name: str) -> ModelEntry:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}", where="model.name",
                          fix=f"valid models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def config_class(name: str) -> type:
    return _entry(name).config_cls


def label_range(name: str) -> tuple[int, int | None]:
    """(fewest, most) label columns a model accepts (most None: any number)."""
    entry = _entry(name)
    return entry.min_labels, entry.max_labels


def required_features(name: str) -> tuple[str, ...]:
    """Feature kinds a model refuses to run without (e.g. ("sequence",) for history readers)."""
    return _entry(name).requires


# the config key that makes `ctrpipe shard` write each feature kind a model may require
_SHARD_KEY = {
    "sequence": f"a behaviour history: {SHARD_A_HISTORY}",
    "multihot": "data.multihot: [{column: <tags column>, separator: '|'}]",
    "categorical": "data.categorical columns",
    "numeric": "data.numeric columns",
}


def build_model(name: str, cfg: Any, spec: FeatureSpec, sparse: bool = False) -> nn.Module:
    """Build a registered model; refuses when the data lacks a feature kind the model needs."""
    entry = _entry(name)
    have = {"numeric": spec.n_numeric > 0, "categorical": bool(spec.categorical),
            "multihot": bool(spec.multihot), "sequence": bool(spec.sequence)}
    for kind in entry.requires:
        if not have.get(kind, False):
            raise SchemaError(f"model {name!r} needs {kind} features, and the shards have none",
                              where="model.name",
                              fix=f"shard again with {_SHARD_KEY.get(kind, f'{kind} columns')}, or pick another "
                                  "model (e.g. dnn)")
    n = spec.n_tasks
    if n < entry.min_labels or (entry.max_labels is not None and n > entry.max_labels):
        want = (f"exactly {entry.min_labels}" if entry.max_labels == entry.min_labels else
                f"at least {entry.min_labels}" if entry.max_labels is None else
                f"{entry.min_labels} to {entry.max_labels}")
        raise SchemaError(f"model {name!r} predicts {want} labels, the cache has {n} ({', '.join(spec.labels)})",
                          where="model.name",
                          fix="shard data with more label columns (data.labels: [clicked, converted]), "
                              "or pick a single-task model such as dnn" if n < entry.min_labels else
                              "pick the labels it needs when sharding (data.labels), or another model")
    if torch.get_default_device().type != "meta":
        _check_host_memory(name, entry, spec, cfg, sparse)
    return entry.builder(spec, cfg, sparse=sparse)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a meta-device model's too: nothing is allocated)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def largest_tensor(model: nn.Module) -> str:
    """'its largest tensor, NAME (SHAPE), is SIZE': the size to lower first when a model outgrows memory."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    name, big = max(tensors, key=lambda nt: nt[1].numel() * nt[1].element_size())
    shape = " x ".join(f"{d:,}" for d in big.shape)
    return f"its largest tensor, {name} ({shape}), is {human_bytes(big.numel() * big.element_size())}"


def _check_host_memory(name: str, entry: ModelEntry, spec: FeatureSpec, cfg: Any, sparse: bool) -> None:
    """Refuse a model whose weights alone outgrow the host's available memory before allocating it: the
    allocator's own failure is a traceback that names no setting, and a run stopped by it left a folder that
    blocked the retry. Built once on the meta device (no memory, the caller's RNG untouched) to size it."""
    available = available_bytes()
    if available is None:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = entry.builder(spec, cfg, sparse=sparse)
    total = weight_bytes(model)
    if total <= available:
        return
    raise ConfigError(f"model {name!r} holds {human_bytes(total)} of weights, more than the "
                      f"{human_bytes(available)} of memory available to this process (the host's, or its "
                      f"cgroup's limit); {largest_tensor(model)}",
                      where="model", fix="lower the model section's sizes (embedding dims, hidden units, ranks, "
                                         "heads); `ctrpipe plan` estimates the memory a config needs")
