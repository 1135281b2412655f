"""Model name -> (config dataclass, builder). Each model file registers itself with `@register`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.features import FeatureSpec

# modules that hold models; imported lazily so `ctrpipe synth` does not pay for the zoo
_MODEL_MODULES = ("dnn", "deepfm", "dcn", "dcnv2", "autoint", "ft_transformer")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type
    builder: Callable[..., nn.Module]   # builder(spec, cfg, sparse=bool) -> nn.Module
    requires: tuple[str, ...] = ()      # feature kinds that must be present: "numeric", "sequence", ...


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, config_cls: type, requires: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Class decorator: `@register("dcnv2", DCNv2Config)` on a model whose __init__ is (spec, cfg, sparse)."""

    def deco(builder: Any) -> Any:
        _REGISTRY[name] = ModelEntry(name, config_cls, builder, requires)
        return builder

    return deco


def _load_all() -> None:
    for mod in _MODEL_MODULES:
        try:
            importlib.import_module(f"ctrpipe.models.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"ctrpipe.models.{mod}":
                raise


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


def build_model(name: str, cfg: Any, spec: FeatureSpec, sparse: bool = False) -> nn.Module:
    """Build a registered model; refuses when the data lacks a feature kind the model needs."""
    entry = _entry(name)
    have = {"numeric": spec.n_numeric > 0, "categorical": bool(spec.categorical),
            "multihot": bool(spec.multihot), "sequence": bool(spec.sequence)}
    for kind in entry.requires:
        if not have.get(kind, False):
            raise SchemaError(f"model {name!r} needs {kind} features, and the shards have none",
                              where="model.name",
                              fix=f"shard data with {kind} columns, or pick another model")
    return entry.builder(spec, cfg, sparse=sparse)
