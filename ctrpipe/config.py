"""Typed configs: YAML files in `cfgs/` + dotted `--set` overrides -> frozen dataclasses.

Every stage owns its section dataclass (`data/config.py`, `loader/config.py`, ...); this module
only knows how to build them strictly: an unknown key is an error that names the closest valid
key, a bad value names the key and an example. `RunConfig` composes the sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml

from ctrpipe.data.config import DataConfig
from ctrpipe.errors import ConfigError
from ctrpipe.infer.config import InferConfig
from ctrpipe.loader.config import LoaderConfig
from ctrpipe.train.config import CVConfig, TrainConfig

T = TypeVar("T")
_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_MISSING = object()


@dataclass(frozen=True)
class ModelSection:
    """`model.name` picks the architecture; the remaining `model.*` keys build that model's own config."""

    name: str = "dnn"
    params: Any = None  # the model's own frozen config dataclass, resolved through the registry


@dataclass(frozen=True)
class RunConfig:
    exp_name: str = "default"
    seed: int = 2026
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    # where each leaf value came from: "default", a YAML path or "--set"; not part of the fingerprint
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # sections of the pipelines users port from that live elsewhere here (named in the unknown-key error)
    MOVED_KEYS: ClassVar[Mapping[str, str]] = {"sequence": "model.sequence"}

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2 ** 62:
            # torch seeds are 64-bit, and each fold and rank adds to the run's seed
            raise ConfigError(f"bad value {self.seed} for 'seed'", where=self.sources.get("seed", "seed"),
                              fix="use a whole number from 0 to 2**62, e.g. seed=2026")
        keep = self.infer.calibration.keep_rate
        if self.loader.neg_keep_prob < 1.0 and keep != 1.0:     # each adds log(rate): corrected twice
            raise ConfigError(f"loader.neg_keep_prob={self.loader.neg_keep_prob} and infer.calibration.keep_rate="
                              f"{keep} both correct for negative downsampling; ctrpipe already shifts the "
                              "logits of a run that downsampled them itself", where="infer.calibration.keep_rate",
                              fix="keep keep_rate at 1.0 (it is for caches built from logs downsampled "
                                  "before ctrpipe saw them)")


def check_calibration_fit(cfg: RunConfig) -> None:
    """Refuse a calibration that cannot reach its target on this run's logits. The loader shifts a sampling
    run's logits to the un-sampled click rate; the WLL optimum wants another shift, which a temperature alone
    cannot give (its fit scaled the logits ~8x instead). Checked where a config is given (load_config) and
    where infer, predict and export resolve a run's config with their --set, not when a saved config is
    read back: a run trained so can still be served, with the fix below."""
    cal = cfg.infer.calibration
    sampled = "loader.neg_keep_prob" if cfg.loader.neg_keep_prob < 1.0 else \
        "loader.balance_pos_fraction" if cfg.loader.balance_pos_fraction > 0.0 else ""
    if sampled and cal.target == "wll" and cal.method == "temperature":
        raise ConfigError(f"infer.calibration.target=wll with method=temperature cannot undo the logit shift "
                          f"that {sampled} puts on this run's predictions", where="infer.calibration.method",
                          fix="set infer.calibration.method=temperature_bias (or bias): a fitted bias "
                              "takes the shift the WLL optimum needs")


# ----------------------------------------------------------------------------------------------- loading

def load_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML file, following an optional `extends: other.yaml` (relative to the file)."""
    merged: dict[str, Any] = {}
    for _, data in yaml_layers(path):
        deep_merge(merged, data)
    return merged


def yaml_layers(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its own mapping) for a YAML file and every file it `extends`, the most basic first."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"the configs extend each other in a cycle: {chain}", where=f"{_seen[-1]}: extends",
                          fix="break the cycle: a base config must not extend the files built on it")
    if not path.is_file():
        what = f"{path} is a folder, not a config file" if path.is_dir() else f"config file {path} does not exist"
        raise ConfigError(what, fix="pass --cfg with a file from cfgs/, e.g. --cfg cfgs/criteo.yaml")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"the file is not UTF-8 text (byte {raw[exc.start]:#04x})", where=f"{path}, line {line}",
                          fix="save the config as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse YAML: {exc}", where=str(path), fix="check indentation and colons") from None
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", where=str(path),
                          fix="start the file with e.g. 'data:' or 'model:'")
    base = data.pop("extends", None)
    if base is not None and not (path.parent / str(base)).is_file():
        raise ConfigError(f"'extends: {base}' names {path.parent / str(base)}, which does not exist",
                          where=f"{path}: extends", fix="give the base file's path relative to this file, "
                                                        "e.g. extends: criteo.yaml")
    return [*(yaml_layers(path.parent / str(base), (*_seen, path.resolve())) if base is not None else []),
            (path, data)]


def deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into `into`: mappings merge, everything else replaces, and an empty mapping
    replaces too -- `--set train.tasks={}` (or `tasks: {}` in a file that extends another) clears the
    inherited entries instead of silently keeping them."""
    for key, value in update.items():
        if isinstance(value, Mapping) and value and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


class OverrideText(str):
    """A `--set` value as typed, with `parsed`, what YAML reads in it. A text setting takes the text as typed
    (`infer.pred_header=007` stays '007', not 7; `data.csv.comment_prefix=|` stays '|', not YAML's empty
    block scalar; `data.csv.missing=?` is ('?',)); every other setting takes the YAML value."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any) -> OverrideText:
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj

    @property
    def is_null(self) -> bool:
        """YAML's null spelled out (`#x` is read as None too: a comment, which a text setting keeps)."""
        return self.strip() in ("null", "Null", "NULL", "~")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is parsed as YAML (a scalar or a list keeps its
    text too: `OverrideText`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '='", where="--set", fix="write --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key", where="--set", fix="write --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads '3e-4' as a string
    if not (isinstance(value, Mapping) and raw.strip().startswith("{")):    # a section stays one to merge
        value = OverrideText(raw.strip() or raw, value)      # a separator may be a space or a tab
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def flatten_dotted(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"train.lr": 3e-4, ...}: the dotted keys `--set`, config sources, resume checks and
    cache diffs all name settings by. An empty section stays one key (its value `{}`), so it is not lost.

    Example::

        >>> flatten_dotted({"train": {"lr": 0.1, "sched": {}}, "seed": 1}, prefix="run.")
        {'run.train.lr': 0.1, 'run.train.sched': {}, 'run.seed': 1}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_dotted(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load_config(path: Path | None, overrides: Sequence[str] = (), *, resolve_model: bool = True) -> RunConfig:
    """Build the whole `RunConfig` from a YAML file (or defaults when None) and `--set` overrides.

    `resolve_model=False` leaves `model.params` unbuilt (None): stages that never build a model (`shard`)
    then start without importing torch and the model zoo.
    """
    layers: list[tuple[str, dict[str, Any]]] = [(str(p), d) for p, d in yaml_layers(path)] if path else []
    if resolve_model:                 # all --set are one source: naming a key twice (two names) is an error
        _canonical_model_keys([*layers, ("--set", apply_overrides({}, overrides))])
    # one layer per --set, in order: `--set x={}` clears the file's section x, and a later `--set x.k=v` adds
    # to the cleared section (in one layer, the two made {k: v}, which merged into the file's x)
    layers += [("--set", apply_overrides({}, [text])) for text in overrides]
    renamed: list[dict[str, str]] = [{} for _ in layers]
    if resolve_model:                 # another name for a key is that key, so a later layer's value wins
        layers = _canonical_model_keys(layers, renamed)
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    typed: dict[str, str] = {}       # a key set under another name -> that name, for errors about the key
    for (where, layer), names in zip(layers, renamed, strict=True):
        deep_merge(data, layer)
        for k in flatten_dotted(layer):
            sources[k] = where
            typed.pop(k, None)
            typed.update({c: t for c, t in names.items() if k == c or k.startswith(c + ".")})
    present = flatten_dotted(data)           # a later `{}` may have cleared what an earlier source set
    sources = {k: v for k, v in sources.items() if k in present}
    cfg = config_from_dict(data, sources=sources, origin=str(path) if path else "defaults",
                           resolve_model=resolve_model, typed=typed)
    check_calibration_fit(cfg)
    return cfg


def _canonical_model_keys(layers: list[tuple[str, dict[str, Any]]],
                          renamed: list[dict[str, str]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Each layer's `model` section with the model config's other key names (`KEY_ALIASES`) renamed;
    `renamed[i]` collects layer i's renames (dotted canonical key -> the key as written)."""
    from ctrpipe.models.registry import config_class, model_names  # lazy: pulls in torch

    name = ModelSection.name
    for _, layer in layers:                 # the model the merged config builds, as deep_merge will see it
        if "model" not in layer:
            continue
        model = layer["model"]
        if not isinstance(model, Mapping) or not model:
            name = ModelSection.name          # `model: {}` / `model: null` replace the inherited section
        elif "name" in model:
            name = _name_text(model["name"])
    if name not in model_names():
        return layers                  # build_model_section reports the unknown model
    # a backbone's params (ESMM) are that model's keys: an alias there is renamed too, so a later layer's
    # `backbone_params.emb_dim` replaces an earlier `embedding_dim` instead of clashing with it
    cls = config_class(name)
    backbone = next((f.default for f in fields(cls) if f.name == "backbone"), None) if is_dataclass(cls) else None
    for _, layer in layers:
        model = layer.get("model")
        if isinstance(model, Mapping) and "backbone" in model:
            backbone = _name_text(model["backbone"])
    out = []
    for i, (where, layer) in enumerate(layers):
        model = layer.get("model")
        names = renamed[i] if renamed is not None else None
        if isinstance(model, Mapping):
            model = canonical_keys(cls, model, "model.", where, renamed=names)
            params = model.get("backbone_params")
            if isinstance(params, Mapping) and isinstance(backbone, str) and backbone in model_names():
                model["backbone_params"] = canonical_keys(config_class(backbone), params,
                                                          "model.backbone_params.", where, renamed=names)
            layer = {**layer, "model": model}
        out.append((where, layer))
    return out


def _nested_keys(cls: type, prefix: str = "", depth: int = 3) -> list[tuple[str, str, int]]:
    """(dotted path under cls, key name, depth) of every key of the sections nested in `cls`, aliases too."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str, int]] = []
    for f in fields(cls):
        sub_cls = hints.get(f.name)
        if not f.init or not dataclasses.is_dataclass(sub_cls) or depth == 0:
            continue
        assert isinstance(sub_cls, type)
        path = f"{prefix}{f.name}."
        names = [g.name for g in fields(sub_cls) if g.init and g.name != "sources"]
        out += [(f"{path}{n}", n, 4 - depth) for n in [*names, *getattr(sub_cls, "KEY_ALIASES", {})]]
        out += _nested_keys(sub_cls, path, depth - 1)
    return out


def _nested_key(cls: type, key: str, exact: bool) -> list[str]:
    """['qnn_alpha.mlp_hidden'] for `mlp_hidden` written a section too high (the DARE + QNN-alpha head's keys
    sit under model.qnn_alpha, a split's under data.split): `exact`, the nested keys of that name, the
    shallowest first; else the closest nested key's path, or []."""
    nested = _nested_keys(cls)
    if exact:
        found = [(d, p) for p, n, d in nested if n == key]
        return [p for d, p in found if d == min(d for d, _ in found)]
    close = difflib.get_close_matches(key, [n for _, n, _ in nested], n=1, cutoff=0.7)
    return [next(p for p, n, _ in nested if n == close[0])] if close else []


def _other_models_key(cls: type, key: str, prefix: str = "model.") -> ConfigError | None:
    """A model key that is another model's (a file written for din, `--set model.name=dare_qnn`): said so,
    where a spelling suggestion pointed at an unrelated key of this model."""
    from ctrpipe.models.registry import config_class, model_names  # lazy: pulls in torch

    names = model_names()
    this = next((n for n in names if config_class(n) is cls), None)
    users = [n for n in names if n != this and key in {f.name for f in fields(config_class(n))}]
    if this is None or not users:
        return None
    what, section, name_key = ("model", "model", "model.name") if prefix == "model." else \
        ("backbone", "model.backbone_params", "model.backbone")
    own, close = _nested_key(cls, key, exact=True), _nested_key(cls, key, exact=False)
    mine = (f"{this}'s own is " + " or ".join(f"'{prefix}{p}'" for p in own[:2]) + "; or " if own else
            f"did you mean {this}'s '{prefix}{close[0]}'? or " if close else "")
    return ConfigError(f"'{prefix}{key}' is a key of {', '.join(users[:4])}{' ...' if len(users) > 4 else ''}, "
                       f"not of {what} {this!r}", where=f"{prefix}{key}",
                       fix=mine
                       + f"drop it; to switch a config file's {what}, clear its section first: "
                         f"--set '{section}={{}}' --set {name_key}={this}")


def canonical_keys(cls: type, data: Mapping[str, Any], prefix: str, where: str,
                   nested: bool = True, renamed: dict[str, str] | None = None) -> dict[str, Any]:
    """`data` (one source's mapping for `cls`) with other names of keys (`KEY_ALIASES`) renamed, in nested
    sections too unless `nested` is False; one source setting a key under two names is an error. `renamed`
    collects each rename: dotted key -> the key as written."""
    aliases: Mapping[str, str] = getattr(cls, "KEY_ALIASES", {})
    hints = typing.get_type_hints(cls) if is_dataclass(cls) else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(str(key), str(key))
        if name in out:
            other = next(k for k in data if aliases.get(str(k), str(k)) == name and k != key)
            raise ConfigError(f"'{prefix}{key}' and '{prefix}{other}' name the same setting, and both are set",
                              where=where, fix=f"keep only '{prefix}{name}'")
        sub = hints.get(name)
        if renamed is not None and name != key:         # the section as written (itself renamed?), then the key
            parent = prefix[:-1]
            renamed[f"{prefix}{name}"] = (f"{renamed.get(parent, parent)}." if prefix else "") + str(key)
        if nested and isinstance(value, Mapping) and is_dataclass(sub) and isinstance(sub, type):
            value = canonical_keys(sub, value, f"{prefix}{name}.", where, renamed=renamed)
        out[name] = value
    return out


def config_from_dict(data: Mapping[str, Any], sources: Mapping[str, str] | None = None,
                     origin: str = "config", resolve_model: bool = True,
                     typed: Mapping[str, str] | None = None) -> RunConfig:
    """Build a `RunConfig` from a plain mapping, e.g. the resolved config stored in a manifest or checkpoint;
    `typed` maps a key set under another name (an alias) to that name, for the place an error names."""
    data = dict(data)
    origin = Origin(origin, sources, typed)
    model_raw = data.pop("model", {}) or {}
    data.pop("sources", None)
    if not isinstance(model_raw, Mapping):
        raise ConfigError("'model' must be a mapping", where=f"{origin}: model", fix="model: {name: dnn}")
    run = build_dataclass(RunConfig, data, "", origin)
    if resolve_model:
        model = build_model_section(model_raw, origin)
    else:
        model = ModelSection(name=_name_text(model_raw.get("name", ModelSection.name)), params=None)
    return dataclasses.replace(run, model=model, sources=dict(sources or {}))


def build_model_section(raw: Mapping[str, Any], origin: str = "config") -> ModelSection:
    from ctrpipe.models.registry import config_class, model_names  # lazy: pulls in torch

    raw = dict(raw)
    name = _name_text(raw.pop("name", ModelSection.name))
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = _where(origin, "model.name") if isinstance(origin, Origin) else f"{origin}: model.name"
        raise ConfigError(f"unknown model {name!r}", where=where,
                          fix=f"{hint}valid models: {', '.join(model_names())}")
    params = build_dataclass(config_class(name), raw, "model.", origin)
    return ModelSection(name=name, params=params)


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain JSON-able structures (tuples become lists); the inverse of `config_from_dict`."""
    if isinstance(obj, ModelSection):
        params = to_dict(obj.params) if obj.params is not None else {}
        return {"name": obj.name, **params}
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if f.compare}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------- strict dataclass build

class Origin(str):
    """Where a config came from (its file), knowing which keys an override or another file set, so an error
    about a key names the place that key was written."""

    sources: dict[str, str]
    typed: dict[str, str]

    def __new__(cls, default: str, sources: Mapping[str, str] | None = None,
                typed: Mapping[str, str] | None = None) -> Origin:
        obj = super().__new__(cls, default)
        obj.sources = dict(sources or {})
        obj.typed = dict(typed or {})
        return obj

    def of(self, key: str) -> str:
        """`--set model.x` or the file that set `key` (or a section above or below it); else the default."""
        key = re.sub(r"\[\d*\]", "", key)                 # list items are recorded by their list's key
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            set_key = ".".join(parts[:n])
            if set_key in self.sources:
                return self._place(set_key)
        below = next((k for k in self.sources if k.startswith(key + ".")), None)
        return self._place(below) if below is not None else str(self)

    def _place(self, set_key: str) -> str:
        found = self.sources[set_key]
        written = self.typed.get(set_key)
        if found == "--set":
            return f"--set {written or set_key}"
        return f"{found} ({written})" if written else found


def _where(origin: str, key: str) -> str:
    return origin.of(key) if isinstance(origin, Origin) else origin


def build_dataclass(cls: type[T], data: Mapping[str, Any] | None, prefix: str, origin: str) -> T:
    """Build `cls` from a mapping, recursing into nested dataclasses; unknown keys are errors.

    A config class may accept other names for its keys (`KEY_ALIASES`, e.g. the names a model's original
    code uses) and keys that ctrpipe fixes to one value (`FIXED_KEYS`: key -> (value, why)); the built
    config, and so every recorded config, holds only the canonical keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init and f.name != "sources"]
    aliases: Mapping[str, str] = getattr(cls, "KEY_ALIASES", {})
    fixed: Mapping[str, tuple[Any, str]] = getattr(cls, "FIXED_KEYS", {})
    kwargs: dict[str, Any] = {}
    # nested sections are renamed when _coerce builds them
    for key, value in canonical_keys(cls, data, prefix, _where(origin, prefix.rstrip(".")), nested=False).items():
        where = _where(origin, f"{prefix}{key}")
        if key in fixed:
            only, why = fixed[key]
            value = value.parsed if isinstance(value, OverrideText) else value
            if type(value) is not type(only) or value != only:     # `false` and `0.0` are not 0
                raise ConfigError(f"'{prefix}{key}' can only be {only!r} in ctrpipe, not {value!r}: {why}",
                                  where=where, fix=f"drop '{prefix}{key}' or set it to {only!r}")
            continue
        if key not in names:
            moved = getattr(cls, "MOVED_KEYS", {}).get(key)
            if moved is not None:
                raise ConfigError(f"unknown config key '{prefix}{key}': ctrpipe keeps these settings in "
                                  f"'{moved}'", where=where,
                                  fix=f"move the section under {moved}" + (
                                      f" (e.g. {moved}.{next(iter(value))})" if value else "")
                                  if isinstance(value, Mapping) else f"write it as {moved}")
            other = _other_models_key(cls, key, prefix) if prefix in ("model.", "model.backbone_params.") else None
            if other is not None:
                raise other
            # a key written a section too high (data.val_ratio for data.split.val_ratio) before a spelling
            # match of this section's own, which would be a guess (data.separator)
            nested = _nested_key(cls, key, exact=True)
            close = [] if nested else [aliases.get(c, c) for c in difflib.get_close_matches(
                key, [*names, *aliases], n=1, cutoff=0.5)] or _nested_key(cls, key, exact=False)
            hint = ("did you mean " + " or ".join(f"'{prefix}{p}'" for p in nested[:2]) + "?" if nested else
                    f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}")
            raise ConfigError(f"unknown config key '{prefix}{key}'", where=where, fix=hint)
        kwargs[key] = _coerce(hints[key], _onto_field_default(cls, key, value, data), f"{prefix}{key}", origin,
                              _field_default(cls, key))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.where and prefix and re.fullmatch(re.escape(prefix) + r"[\w.]+", exc.where):
            # a class's own check names its key as the place (model.x): here, who set it (a list item's key,
            # data.sequence[0].weighted, says more than its list's source would)
            raise ConfigError(exc.what, where=_where(origin, exc.where), fix=exc.fix) from None
        if exc.where:
            raise
        # a class's own check knows the key (in its message) but not who set it: the file or the --set; a
        # section kept per name (train.tasks.<head>) names its key with a placeholder: here, that name
        parent = prefix.rstrip(".").rpartition(".")[0]
        what = re.sub(r"'" + re.escape(parent) + r"\.<\w+>\.", f"'{prefix}", exc.what) if parent else exc.what
        named = re.search(r"'(" + re.escape(prefix) + r"[\w.\[\]]+)'", what) if prefix else None
        where = _where(origin, named.group(1) if named else prefix.rstrip("."))
        raise ConfigError(what, where=where, fix=exc.fix) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid values in '{prefix.rstrip('.') or 'config'}': {exc}", where=origin) from None


def _onto_field_default(cls: type, key: str, value: Any, siblings: Mapping[str, Any]) -> Any:
    """A partly given section keeps what its field's default sets beyond the section class's own defaults
    (`data.numeric: {impute: mean}` keeps the Criteo columns I1-I13), except keys replaced together with a
    given one (`REPLACED_TOGETHER`: a column selection by `columns` or `pattern` is one setting). An empty
    section (`{}`) clears, as in `deep_merge`; a class may limit the defaults to some settings of its own
    (`keeps_field_defaults`: the Criteo columns are no default for Parquet or CSV)."""
    f = next((f for f in fields(cls) if f.name == key), None)
    if f is None or f.default_factory is MISSING or not isinstance(value, Mapping) or not value:
        return value
    keeps = getattr(cls, "keeps_field_defaults", None)
    if keeps is not None and not keeps(_plain(siblings)):
        return value
    default = f.default_factory()
    if not is_dataclass(default) or isinstance(default, type):
        return value
    bare = type(default)()
    together: tuple[str, ...] = getattr(type(default), "REPLACED_TOGETHER", ())
    replaced = set(together) if any(k in value for k in together) else set()
    kept = {g.name: getattr(default, g.name) for g in fields(default)
            if g.init and g.name not in replaced and getattr(default, g.name) != getattr(bare, g.name)}
    return {**kept, **value}


def _example(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if tp is bool:
        return "true"
    if tp is int:
        return "8192"
    if tp is float:
        return "0.001"
    if tp is str:
        return "'text'"
    if origin in (tuple, list, Sequence):
        # items typed as the setting reads them: '[a, b]' was refused as an example of itself, and a list
        # of pairs (train.pos_weight_clip) needs its nesting shown
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(tp):       # fixed size: one of each
            return f"[{', '.join(_example(a) for a in args)}]"
        first = args[0] if args else int
        item = repr(get_args(first)[0]) if get_origin(first) is Literal else _example(first)
        return f"[{item}]" if item.startswith("[") else f"[{item}, {item}]"
    return getattr(tp, "__name__", str(tp))


def _field_default(cls: type, key: str) -> Any:
    for f in fields(cls):
        if f.name == key and f.default is not MISSING:
            return f.default
    return None


def _bad(tp: Any, value: Any, key: str, origin: str, default: Any = None) -> ConfigError:
    """`default`: an int setting's own default, a valid example where the type's one example fits few
    settings (model.qnn_alpha.heads=8192 suggested a value its checks refuse)."""
    if tp is str and isinstance(value, (bool, int, float)):
        # YAML typed an unquoted word or number: yes/no/on/off are booleans, 007 is 7, 1.50 is 1.5
        return ConfigError(f"bad value {value!r} for '{key}': YAML read an unquoted {type(value).__name__}, "
                           "text is wanted", where=_where(origin, key),
                           fix="write it in quotes, spelt as in the data (e.g. '1.50', not 1.50; 'yes', not yes): "
                               "YAML reads unquoted numbers and yes/no/on/off as numbers and booleans")
    last = key.rsplit(".", 1)[-1]
    if value is None and ":" in last:
        # {item_id:32} is YAML's mapping of the key 'item_id:32' to nothing: a flow mapping's ':' needs a space
        name, _, given = last.rpartition(":")
        return ConfigError(f"bad value None for '{key}': YAML read '{last}' as one key without a value",
                           where=_where(origin, key),
                           fix=f"put a space after the colon: {{{name}: {given}}} (or --set {key[:-len(last)]}{name}"
                               f"={given})")
    parent = key[:key.rindex("[")] if key.endswith("]") else ""
    shown, what = _example(tp), "e.g."
    if tp is int and type(default) is int:
        shown = str(default)
    if tp is int and isinstance(value, float) and math.isfinite(value):
        # the number meant, made whole: the type's one example fits few int settings (top_k=8192, rank=8192)
        shown, what = str(math.floor(value)), "a whole number, e.g."
    items = [a for a in get_args(tp) if a is not Ellipsis] if get_origin(tp) in (tuple, list, Sequence) else []
    if items and is_dataclass(items[0]):
        # a list of sections (data.sequence, data.covisit ...) has no one-line example
        return ConfigError(f"bad value {value!r} for '{key}': a list of mappings is wanted", where=_where(origin, key),
                           fix=f"write {key.rsplit('.', 1)[-1]}: as a YAML list of mappings in the config file "
                               "(docs/config.md lists their keys)")
    if get_origin(tp) in (dict, Mapping) or tp in (dict, Mapping):
        # a mapping has no one-line value: each entry is a key of its own
        return ConfigError(f"bad value {value!r} for '{key}': a mapping is wanted", where=_where(origin, key),
                           fix=f"set its entries, e.g. --set {key}.<name>=<value>, or write a mapping under "
                               f"{key.rsplit('.', 1)[-1]}: in the YAML file")
    example = f"{parent}=[{shown}]" if parent else f"{key}={shown}"
    return ConfigError(f"bad value {value!r} for '{key}'", where=_where(origin, key), fix=f"use {what} {example}")


def _tuple_fix(key: str, args: tuple[Any, ...]) -> str:
    """'write each item as [8192, 0.001], e.g. train.pos_weight_clip=[[8192, 0.001]]' (--set has no [i] keys)."""
    item = f"[{', '.join(_example(a) for a in args)}]"
    parent = key[:key.rindex("[")] if key.endswith("]") else ""
    return f"write each item as {item}, e.g. {parent}=[{item}]" if parent else f"write {item}, e.g. {key}={item}"


_ITEM = re.compile(r"""\s*('[^']*'|"[^"]*"|[^,]*?)\s*(?:,|$)""")


def _as_typed(tp: Any, value: OverrideText) -> Any:
    """The text as typed for a text setting, or for a list of texts (`[?, -999.00]`, `a, b`: items split on
    commas outside quotes, quotes stripped), else what YAML reads. Quoted text and a list YAML reads as
    texts are taken as YAML reads them; null is None for a text, a text in a list (NULL as a missing marker)."""
    org = get_origin(tp)
    text = str(value)
    # quoted: YAML took the quotes off (a text it could not read stays as typed, quotes and all)
    quoted = isinstance(value.parsed, str) and value.parsed != text and len(text) >= 2 and text[0] == text[-1] \
        and text[0] in "'\""
    if tp is str or tp is Path or (org is Literal and all(isinstance(a, str) for a in get_args(tp))):
        if quoted:
            return value.parsed                      # YAML's reading is what was meant ('' is empty)
        return None if value.is_null else text
    if org in (tuple, list, Sequence) and get_args(tp)[:1] == (str,) and (len(get_args(tp)) == 1 or
                                                                         get_args(tp)[1] is Ellipsis):
        parsed = value.parsed
        if quoted or (isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)):
            return parsed                            # a lone NULL or ~ is a text here (a missing marker)
        if text.startswith("[") and text.endswith("]") and not any(c in text[1:-1] for c in "[]{}"):
            text = text[1:-1]
        elif text.startswith(("[", "{")):
            return parsed
        items = [m.group(1) for m in _ITEM.finditer(text) if m.group(1)]
        return [v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v for v in items]
    return _plain(value)


def _name_text(value: Any) -> str:
    """A model name as given (a --set one as a text setting: `'dcn'` is dcn), lower case."""
    return str(_as_typed(str, value) if isinstance(value, OverrideText) else value).lower()


def _plain(value: Any) -> Any:
    """`value` with every OverrideText in it as YAML reads it: for settings whose type is open (a backbone's
    own keys under `dict[str, Any]`), which are built, stored and reloaded as plain values."""
    if isinstance(value, OverrideText):
        return _plain(value.parsed)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _number_text(tp: Any, text: str) -> Any:
    """An item of a comma-separated list as an int when the list holds ints (floats read text already);
    other text unchanged (a label named `1` stays the string it is)."""
    return int(text) if tp is int and _INT_TEXT.fullmatch(text) else text


def _one_number_list(tp: Any, value: Any) -> Any:
    """`--set model.hidden_units=64` as (64,): a lone number given for a list of numbers is that list's one
    item (what `64,` or `[64]` would say). Only for --set text and lists of one number type, so a number for a
    list of settings (data.sequence=3) is still refused with its example."""
    org, args = get_origin(tp), get_args(tp)
    homogeneous = org is list or (org is tuple and len(args) == 2 and args[1] is Ellipsis)
    if homogeneous and args[0] in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _coerce(tp: Any, value: Any, key: str, origin: str, default: Any = None) -> Any:  # noqa: C901 - one branch per type form
    org = get_origin(tp)
    if isinstance(value, OverrideText) and org not in (typing.Union, types.UnionType):
        value = _one_number_list(tp, _as_typed(tp, value))
    if tp is Any:
        return _plain(value)
    if org in (typing.Union, types.UnionType):
        args = get_args(tp)
        if (value.is_null if isinstance(value, OverrideText) else value is None) and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, origin, default)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else _bad(tp, value, key, origin)
    if org is Literal:
        if value in get_args(tp):
            return value
        raise _bad(tp, value, key, origin)
    if is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{key}' must be a mapping", where=_where(origin, key), fix=f"write {key}: {{...}}")
        return build_dataclass(tp, value, key + ".", origin)
    if org in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str):      # `--set model.hidden_units=64,64`: numbers where the items are numbers
            item = (get_args(tp) or (Any,))[0]
            value = [_number_text(item, v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(tp, value, key, origin)
        args = get_args(tp)
        if org is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):                  # a pair given 1 or 3 values: not cut or indexed later
                raise ConfigError(f"bad value {value!r} for '{key}': {len(args)} values expected, "
                                  f"{len(value)} given", where=_where(origin, key),
                                  fix=_tuple_fix(key, args))
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, f"{key}[{i}]", origin) for i, (a, v) in pairs)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]", origin) for i, v in enumerate(value))
    if org in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(tp, value, key, origin)
        kt, vt = get_args(tp) or (Any, Any)
        return {str(k): _coerce(vt, v, f"{key}.{k}", origin) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(tp, value, key, origin)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise _bad(tp, value, key, origin, default)
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise _bad(tp, value, key, origin)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _bad(tp, value, key, origin) from None
        if math.isnan(number):                   # passes every `x < 0` check, then poisons training silently
            raise ConfigError(f"NaN is no value for '{key}'", where=_where(origin, key),
                              fix=f"use a number, e.g. {key}={_example(tp)}")
        return number
    if tp is str:
        # an integer reads back as written (2024); a float need not (1.50 -> '1.5', -999.00 -> '-999.0'), and
        # text compared with the data's text must match it
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
        raise _bad(tp, value, key, origin)
    if tp is Path:
        return Path(str(value))
    return value
