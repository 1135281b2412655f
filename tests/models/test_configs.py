"""Model configs: a YAML file per model; bad values and names fail with the key and a fix; feature kinds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from ctrpipe.config import build_model_section, load_config, to_dict
from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.models import registry
from ctrpipe.models.dnn import DNN, DNNConfig
from ctrpipe.models.registry import build_model, config_class, label_range, model_names

CFGS = Path(__file__).resolve().parents[2] / "cfgs"


def test_every_model_has_a_shipped_config() -> None:
    shipped = {yaml.safe_load(p.read_text()).get("model", {}).get("name") for p in CFGS.glob("*.yaml")}
    assert set(model_names()) <= shipped, set(model_names()) - shipped


# single-task models that run on Criteo (history readers need a sequence: their configs are parquet_*.yaml)
@pytest.mark.parametrize("name", [n for n in model_names() if label_range(n)[0] == 1
                                  and "sequence" not in registry.required_features(n)])
def test_criteo_config_per_model(name: str) -> None:
    path = CFGS / f"criteo_{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["extends"] == "criteo.yaml" and raw["exp_name"] == f"criteo_{name}"
    section = build_model_section(raw["model"], str(path))
    assert section.name == name and isinstance(section.params, config_class(name))
    if (CFGS / "criteo.yaml").is_file():   # written by the data stage; the whole file must resolve
        cfg = load_config(path, [f"model.dropout={0.0}"] if name != "ft_transformer" else [])
        assert cfg.model.name == name and cfg.exp_name == f"criteo_{name}"
        assert build_model_section(to_dict(cfg.model)).params == cfg.model.params   # round trip


@pytest.mark.parametrize(("name", "key", "value", "fix"), [
    ("dnn", "embedding_dim", 0, "model.embedding_dim=16"),
    ("dnn", "dropout", 1.5, "model.dropout=0.1"),
    ("dnn", "hidden_units", [400, -1], "model.hidden_units=[400,400,400]"),
    ("dcn", "cross_layers", 0, "model.cross_layers=3"),
    ("dcnv2", "n_experts", 0, "model.n_experts=4"),
    ("autoint", "numeric", "concat", "model.numeric=token"),
    ("ft_transformer", "n_heads", 3, "model.n_heads=2"),      # a divisor of embedding_dim 32
    ("ft_transformer", "attention_dropout", 1.0, "model.attention_dropout=0.1"),
    # (a helper's sweep) infinite gate settings: uniform gates, or a NaN loss blamed on the learning rate
    ("mmoe", "gate_temperature", float("inf"), "model.gate_temperature=1.0"),
    ("mmoe", "gate_temperature", 1e-40, "model.gate_temperature=1.0"),
    ("ple", "gate_noise", float("inf"), "model.gate_noise=0.001"),
    ("mmoe", "gate_balance", float("inf"), "model.gate_balance=0.001"),
])
def test_bad_value_names_key_and_fix(name: str, key: str, value: Any, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_model_section({"name": name, key: value}, "cfgs/x.yaml")
    text = str(err.value)
    assert f"model.{key}" in text and f"fix: use e.g. {fix}" in text and repr(value) in text


def test_bad_choice_from_yaml_and_from_python() -> None:
    with pytest.raises(ConfigError, match="model.cross_kind") as err:
        build_model_section({"name": "dcnv2", "cross_kind": "diagonal"}, "cfgs/x.yaml")
    assert "'full'" in str(err.value)
    with pytest.raises(ConfigError, match="model.structure"):
        config_class("dcn")(structure="sideways")


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError, match="model.hidden_units"):
        build_model_section({"name": "dnn", "hiden_units": [8]}, "cfgs/x.yaml")


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_model_section({"name": "dcnv3"})
    assert "model.name" in str(err.value)
    for name in model_names():
        assert name in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_class("widedeep")
    assert all(name in str(err.value) for name in model_names())


def test_interaction_model_refuses_unequal_dims(spec_factory) -> None:
    section = build_model_section({"name": "deepfm", "field_dims": {"C1": 4}})
    with pytest.raises(ConfigError, match="model.field_dims") as err:
        build_model(section.name, section.params, spec_factory())
    assert "fix:" in str(err.value)


def test_transformer_heads_must_divide_the_field_dim_field_dims_give(spec_factory) -> None:
    """field_dims giving every field 6 passed the config's embedding_dim check (32 % 4) and crashed in the
    first forward with a shape error; refused when built, as QNN-alpha's heads are."""
    section = build_model_section({"name": "ft_transformer", "n_heads": 4,
                                   "field_dims": {"C1": 6, "C2": 6, "C3": 6}})
    with pytest.raises(ConfigError, match="model.n_heads") as err:
        build_model(section.name, section.params, spec_factory(multihot=False, sequence=False, numeric=False))
    assert "field dim (6" in str(err.value) and "fix:" in str(err.value)


def test_field_dims_must_name_real_fields(spec_factory) -> None:
    section = build_model_section({"name": "dnn", "field_dims": {"C99": 4}})
    with pytest.raises(ConfigError, match="model.field_dims") as err:
        build_model(section.name, section.params, spec_factory())
    assert "C1" in str(err.value)


def test_missing_feature_kind_is_a_schema_error(spec_factory, batch_factory) -> None:
    registry.register("needs_sequence", DNNConfig, requires=("sequence",))(DNN)
    try:
        with pytest.raises(SchemaError) as err:
            build_model("needs_sequence", DNNConfig(), spec_factory(sequence=False))
        assert "sequence" in str(err.value) and "model.name" in str(err.value) and "fix:" in str(err.value)
        # the fix names the shard key that writes a history and ties it to its candidate
        assert "data.sequence" in err.value.fix and "share_ids_with" in err.value.fix
        # with the kind present: the registered class, shaped by the config it was given
        spec = spec_factory(n_tasks=2)
        model = build_model("needs_sequence", DNNConfig(embedding_dim=3, hidden_units=(8, 4)), spec)
        assert type(model) is DNN
        fields = len(spec.categorical) + len(spec.multihot) + len(spec.sequence)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        # MLP over (fields x embedding_dim + raw numerics), then a head with one logit per task
        assert [(m.in_features, m.out_features) for m in linears] == \
            [(fields * 3 + spec.n_numeric, 8), (8, 4), (4, 2)]
        assert model(batch_factory(spec, rows=5)).shape == (5, 2)
    finally:
        registry._REGISTRY.pop("needs_sequence")


def test_configs_are_hashable_and_comparable() -> None:
    a = build_model_section({"name": "dnn", "field_dims": {"C1": 8}}).params
    b = build_model_section({"name": "dnn", "field_dims": {"C1": 8}}).params
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("name", ["dare", "dare_qnn"])
def test_dare_attention_vectors_are_at_most_the_representation_width(name: str, spec_factory) -> None:
    """Checked against the history's own representation width, which field_dims can change (the history reads
    its candidate's rows, `item` in the spec), not against embedding_dim alone."""
    def build(**keys: Any) -> nn.Module:
        section = build_model_section({"name": name, "embedding_dim": 8, **keys})
        return build_model(section.name, section.params, spec_factory())

    assert build(attention_dim=8).encoder.table.table.embedding_dim == 8
    for keys, width in (({"attention_dim": 16}, 8), ({"attention_dim": 6, "field_dims": {"item": 4, "hist": 4}}, 4)):
        with pytest.raises(ConfigError, match=f"wider than the {width}-d representation vectors") as err:
            build(**keys)
        assert err.value.where == "model.attention_dim" and f"use at most {width}" in err.value.fix


@pytest.mark.parametrize(("name", "params", "key"), [
    ("ft_transformer", {"embedding_dim": 6, "n_heads": 4}, ("n_heads",)),
    ("qnn_alpha", {"embedding_dim": 6, "heads": 4}, ("heads",)),
    ("dare_qnn", {"embedding_dim": 8, "attention_dim": 6, "sequence": {"top_k": 3, "transformer_block": True,
                                                                      "tfm": {"n_heads": 4}}},
     ("sequence", "tfm", "n_heads")),
])
def test_a_head_count_that_does_not_divide_gets_a_fix_that_builds(spec_factory, name: str, params: dict,
                                                                   key: tuple[str, ...]) -> None:
    """The example in the fix divides the width (a fixed '4' or 'e.g. 2 for attention_dim 8' did not)."""
    import re

    spec = spec_factory(1)
    with pytest.raises(ConfigError) as err:
        section = build_model_section({"name": name, **params})
        build_model(section.name, section.params, spec)
    fixed = int(re.search(r"use e\.g\. model\.[\w.]+=(\d+)", str(err.value)).group(1))  # type: ignore[union-attr]
    inner = params
    for k in key[:-1]:
        inner = inner[k]
    inner[key[-1]] = fixed
    section = build_model_section({"name": name, **params})
    assert build_model(section.name, section.params, spec) is not None


@pytest.mark.parametrize(("override", "message"), [
    ("model.backbone=mmeo", r"^--set model.backbone: unknown backbone 'mmeo'(?s:.*)did you mean 'mmoe'"),
    ("model.backbone_params.n_expert=4", r"unknown config key 'model.backbone_params.n_expert'"),
    ("model.backbone_params.dropout=2", r"^--set model.backbone_params.dropout: (?s:.*)fix: use e.g. "
                                        r"model.backbone_params.dropout=0.1"),
])
def test_esmm_backbone_settings_are_checked_when_the_config_loads(override: str, message: str) -> None:
    """They were only built with the model, and the backbone's checks named its keys model.<key> (whose fix,
    model.dropout=0.1, is an unknown key for ESMM)."""
    with pytest.raises(ConfigError, match=message):
        load_config(CFGS / "parquet_esmm.yaml", [override])
