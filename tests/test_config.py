"""Config loading: YAML + extends + --set overrides, strict keys, value checks, round trip."""

from __future__ import annotations

import doctest
from pathlib import Path
from typing import Any

import pytest

from ctrpipe import config
from ctrpipe.config import config_from_dict, flatten_dotted, load_config, load_yaml, parse_override, to_dict
from ctrpipe.errors import ConfigError

CFGS = Path(__file__).resolve().parents[1] / "cfgs"


def _same(want: Any, got: Any) -> bool:
    """YAML value vs the value the loaded config holds (as `to_dict` writes it): mappings and list items
    compare on the keys the YAML sets, and YAML 1.1 spellings match their typed values ('3e-4' is 0.0003)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _same(v, got[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(want) == len(got) and all(map(_same, want, got))
    if isinstance(want, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return float(want) == got
    if want is False and got == "off":      # YAML 1.1 reads `amp: off` as False; TrainConfig maps it back
        return True
    return bool(want == got)


@pytest.mark.parametrize("path", sorted(CFGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads_every_value_it_sets(path: Path) -> None:
    """Each value a shipped YAML sets (after `extends`) reaches the RunConfig unchanged, and the run lands
    in runs/<file stem>, as the README's commands (cfgs/criteo_dcnv2.yaml -> runs/criteo_dcnv2) assume."""
    from ctrpipe.models.registry import config_class

    cfg = load_config(path)
    assert cfg.exp_name == path.stem
    assert type(cfg.model.params) is config_class(cfg.model.name)
    got = flatten_dotted(to_dict(cfg))
    wrong = {k: (v, got.get(k, "<absent>")) for k, v in flatten_dotted(load_yaml(path)).items()
             if not _same(v, got.get(k, _ABSENT))}
    assert not wrong, wrong


_ABSENT = object()


def test_extends_and_overrides(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("exp_name: base\ndata:\n  hash_bins: 1000\n  split: {val_ratio: 0.2}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nexp_name: child\nmodel: {name: dnn}\n")
    cfg = load_config(child, ["data.hash_bins=5000", "data.split.seed=7", "loader.batch_size=64"])
    assert cfg.exp_name == "child"
    assert cfg.data.hash_bins == 5000
    assert cfg.data.split.val_ratio == 0.2 and cfg.data.split.seed == 7
    assert cfg.loader.batch_size == 64
    assert cfg.sources["data.hash_bins"] == "--set"
    assert cfg.sources["data.split.val_ratio"] == str(base)         # the file that wrote it, not the one read
    assert cfg.sources["exp_name"] == str(child)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="'extends: gone.yaml' names") as e:   # it named gone.yaml alone
        load_config(orphan)
    assert str(orphan) in e.value.where
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")       # a RecursionError traceback before
    with pytest.raises(ConfigError, match="extend each other in a cycle") as e:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(e.value) and "b.yaml -> " in str(e.value)


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.hash_binz=10"])
    msg = str(err.value)
    assert "data.hash_binz" in msg and "data.hash_bins" in msg


def test_unknown_nested_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  split:\n    val_ratoi: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "data.split.val_ratoi" in str(err.value) and "data.split.val_ratio" in str(err.value)
    assert str(cfg) in str(err.value)


def test_an_error_names_where_the_key_was_written(tmp_path: Path) -> None:
    """A bad key from --set is blamed on --set, not on the file beside it; a file's own key on the file."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: dnn\n  hidden_unitz: [8]\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert err.value.where == str(cfg)
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: dnn}\n")
    with pytest.raises(ConfigError) as err:
        load_config(good, ["model.hidden_unitz=[8]"])
    assert err.value.where == "--set model.hidden_unitz"
    with pytest.raises(ConfigError) as err:
        load_config(good, ["data.sequence=[{column: seq, max_len: 5, lenght: 3}]"])
    assert err.value.where == "--set data.sequence" and "data.sequence[0].lenght" in err.value.what


def test_dare_qnn_accepts_its_pipeline_key_names() -> None:
    """emb_dim / cat_embedding_dims / sequence.pad_id, as the DARE + QNN-alpha pipeline's users write them,
    build the same config as ctrpipe's own keys, and the recorded config holds only ctrpipe's names."""
    theirs = load_config(CFGS / "dare_qnn.yaml", ["model.emb_dim=24", "model.cat_embedding_dims={gender: 8}",
                                                  "model.sequence.pad_id=0"])
    ours = load_config(CFGS / "dare_qnn.yaml", ["model.embedding_dim=24", "model.field_dims={gender: 8}"])
    assert theirs.model == ours.model
    assert theirs.model.params.embedding_dim == 24 and theirs.model.params.field_dims == {"gender": 8}
    recorded = flatten_dotted(to_dict(theirs))
    assert not any(k.endswith(("emb_dim", "cat_embedding_dims", "pad_id")) for k in recorded)


def test_an_alias_and_its_key_from_one_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", ["model.emb_dim=8", "model.embedding_dim=8"])
    assert "name the same setting" in err.value.what and err.value.where == "--set"
    assert "keep only 'model.embedding_dim'" in err.value.fix
    both = tmp_path / "both.yaml"
    both.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nmodel: {{emb_dim: 8, embedding_dim: 8}}\n")
    with pytest.raises(ConfigError) as err:                # an override of one name does not hide that
        load_config(both, ["model.emb_dim=4"])
    assert err.value.where == str(both)


def test_a_cleared_model_section_takes_no_aliases_of_the_model_it_replaced(tmp_path: Path) -> None:
    clear = tmp_path / "clear.yaml"
    clear.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nmodel: {{}}\n")
    cfg = load_config(clear)
    assert cfg.model.name == "dnn" and not any(k.startswith("model.") for k in cfg.sources)
    with pytest.raises(ConfigError, match="unknown config key 'model.emb_dim'"):   # dnn has no such alias
        load_config(clear, ["model.emb_dim=8"])


def test_a_later_source_wins_whichever_name_it_uses(tmp_path: Path) -> None:
    """An alias is another spelling of its key: as for any key, a file that extends another, and --set, win."""
    child = tmp_path / "child.yaml"                       # dare_qnn.yaml sets embedding_dim: 16
    child.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nmodel: {{emb_dim: 32}}\n")
    cfg = load_config(child)
    assert cfg.model.params.embedding_dim == 32 and cfg.sources["model.embedding_dim"] == str(child)
    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nmodel: {{emb_dim: 24}}\n")
    child2 = tmp_path / "child2.yaml"
    child2.write_text("extends: base.yaml\nmodel: {embedding_dim: 16}\n")
    assert load_config(child2).model.params.embedding_dim == 16
    assert load_config(child2, ["model.emb_dim=64"]).model.params.embedding_dim == 64
    assert load_config(CFGS / "dare_qnn.yaml", ["model.emb_dim=32"]).model.params.embedding_dim == 32


def test_a_models_own_check_names_the_place_and_the_name_the_key_was_written_under(tmp_path: Path) -> None:
    """A model config's own check (embedding_dim >= 1) named 'model.embedding_dim' as the place even when a
    --set wrote it, and as `emb_dim`: the place is the --set or the file, under the name the user wrote."""
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", ["model.emb_dim=0"])
    assert err.value.where == "--set model.emb_dim" and "model.embedding_dim" in err.value.fix
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", ["model.qnn_alpha.feature_embed_dim=0"])
    assert err.value.where == "--set model.qnn_alpha.feature_embed_dim"
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nmodel: {{emb_dim: 0}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(child)
    assert err.value.where == f"{child} (model.emb_dim)"
    with pytest.raises(ConfigError) as err:      # a later source's own name replaces the earlier one's
        load_config(child, ["model.embedding_dim=0"])
    assert err.value.where == "--set model.embedding_dim"


@pytest.mark.parametrize("pad", [1, -1, "false", "0.0"])
def test_a_pad_id_other_than_0_is_refused(pad: int | str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", [f"model.sequence.pad_id={pad}"])
    assert "can only be 0" in err.value.what and "Batch" in err.value.what
    assert err.value.where == "--set model.sequence.pad_id"


def test_the_ported_pipelines_sequence_section_points_to_model_sequence(tmp_path: Path) -> None:
    """The original pipeline's top-level `sequence:` got "did you mean 'seed'?"."""
    port = tmp_path / "port.yaml"
    port.write_text(f"extends: {CFGS / 'dare_qnn.yaml'}\nsequence: {{max_len: 30, pad_id: 0}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(port)
    assert "'model.sequence'" in err.value.what and "model.sequence.max_len" in err.value.fix
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", ["sequence.top_k=4"])
    assert err.value.where == "--set sequence.top_k" and "model.sequence.top_k" in err.value.fix


def test_a_close_alias_suggests_the_canonical_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", ["model.embdim=8"])
    assert "did you mean 'model.embedding_dim'?" in err.value.fix


@pytest.mark.parametrize(
    ("override", "key", "example"),
    [
        ("data.hash_bins=lots", "data.hash_bins", "data.hash_bins=1000000"),     # the key's default
        ("loader.batch_size=512.5", "loader.batch_size", "a whole number, e.g. loader.batch_size=512"),
        ("data.format=tsv", "data.format", "'criteo'"),
        ("data.split.val_ratio=1.5", "data.split.val_ratio", "0.1"),
        ("loader.batch_size=0", "loader.batch_size", "4096"),
    ],
)
def test_bad_value_names_key_and_example(override: str, key: str, example: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)
    assert example in str(err.value)


@pytest.mark.parametrize("key", ["model.qnn_alpha.heads", "model.qnn_alpha.rank", "model.sequence.top_k",
                                 "model.sequence.tfm.n_layers"])
def test_a_bad_whole_number_is_shown_a_value_the_key_accepts(key: str) -> None:
    """Every integer key was shown `=8192`, which most of them then refused (heads must divide the
    embedding size, top_k must not exceed max_len): the example is the key's own default."""
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml", [f"{key}=abc"])
    example = err.value.fix.removeprefix(f"use e.g. {key}=")
    assert example != err.value.fix and example != "8192", err.value.fix
    load_config(CFGS / "dare_qnn.yaml", [f"{key}={example}"])


def test_covisit_smoothing_must_be_positive_and_a_sequence_cannot_be_weighted() -> None:
    """smoothing 0 wrote NaN features (0 / (0 + 0) for a context token no train row holds); a weighted
    sequence stored weights no model reads."""
    with pytest.raises(ConfigError, match="must be above 0"):
        load_config(CFGS / "dare_qnn.yaml", ["data.covisit=[{target: inventory_id, context: seq, smoothing: 0}]"])
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "dare_qnn.yaml",
                    ["data.sequence=[{column: seq, separator: ',', max_len: 50, weighted: true}]"])
    assert err.value.where.endswith("data.sequence[0].weighted") and "data.multihot" in err.value.fix


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name=dcnv3"])
    msg = str(err.value)
    assert "dcnv3" in msg and "dcnv2" in msg and "deepfm" in msg


def test_override_parsing() -> None:
    key, value = parse_override("train.lr=3e-4")
    assert key == ["train", "lr"] and value.parsed == 3e-4 and value == "3e-4"      # the YAML value and the text
    assert parse_override("data.labels=[clicked, converted]")[1].parsed == ["clicked", "converted"]
    assert parse_override("data.numeric={impute: mean}")[1] == {"impute": "mean"}  # a section, to merge
    with pytest.raises(ConfigError, match="no '='"):
        parse_override("train.lr")


def test_round_trip_through_dict() -> None:
    cfg = load_config(CFGS / "criteo_dcnv2.yaml", ["train.lr=0.01"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)
    latin = tmp_path / "latin1.yaml"                       # a UnicodeDecodeError traceback
    latin.write_bytes(b"data:\n  format: csv  # caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(latin)
    assert err.value.where == f"{latin}, line 2" and "UTF-8" in err.value.fix


def test_shard_side_loading_skips_the_model_zoo() -> None:
    cfg = load_config(CFGS / "criteo_dcnv2.yaml", ["data.hash_bins=77"], resolve_model=False)
    assert cfg.data.hash_bins == 77
    assert cfg.model.name == "dcnv2" and cfg.model.params is None


def test_docstring_examples() -> None:
    """`flatten_dotted`'s example: the one dotted-key flattener (config sources, resume checks, cache diffs)."""
    assert doctest.testmod(config).failed == 0


def test_an_empty_mapping_clears_what_a_file_set() -> None:
    cfg = load_config(CFGS / "parquet_mmoe.yaml", ["train.tasks={}"])
    assert cfg.train.tasks == {}
    kept = load_config(CFGS / "parquet_mmoe.yaml", ["train.tasks.clicked.weight=2"])
    assert kept.train.tasks["converted"].mask == "clicked" and kept.train.tasks["clicked"].weight == 2
    esmm = load_config(CFGS / "parquet_esmm.yaml",
                       ["model.backbone=shared_bottom", "model.backbone_params={}"])
    assert esmm.model.params.backbone == "shared_bottom" and esmm.model.params.backbone_params == {}
    # then a key of the cleared section: both --set sat in one layer, {embedding_dim: 8}, which merged into
    # the file's backbone_params (n_experts, unknown to dnn) (helper's training sweep)
    dnn = load_config(CFGS / "parquet_esmm.yaml", ["model.backbone=dnn", "model.backbone_params={}",
                                                   "model.backbone_params.embedding_dim=8"])
    assert dnn.model.params.backbone_params == {"embedding_dim": 8}
    assert dnn.sources["model.backbone_params.embedding_dim"] == "--set"


def test_two_downsampling_corrections_are_refused() -> None:
    """loader.neg_keep_prob shifts logits by log(rate) already; keep_rate would add a second shift."""
    with pytest.raises(ConfigError, match="both correct for negative downsampling") as e:
        load_config(None, ["loader.neg_keep_prob=0.5", "infer.calibration.keep_rate=0.5"])
    assert e.value.where == "infer.calibration.keep_rate"
    assert load_config(None, ["infer.calibration.keep_rate=0.5"]).infer.calibration.keep_rate == 0.5


@pytest.mark.parametrize(("bad", "fix"), [
    ("train.pos_weight_clip=2", "train.pos_weight_clip=[[8192, 0.001]]"),
    ("train.pos_weight_clip=[0,300]", "train.pos_weight_clip=[[8192, 0.001]]"),
    ("infer.weights=true", "infer.weights=[0.001, 0.001]"),      # (a lone number is a one-item list)
    ("train.tasks=3", "--set train.tasks.<name>=<value>"),
    ("data.sequence=3", "write sequence: as a YAML list of mappings"),      # was [SequenceConfig, ...]
])
def test_a_bad_values_example_is_one_the_key_takes(bad: str, fix: str) -> None:
    """The example in a bad value's fix was '[a, b]' for every list (itself refused: 'a' is no number; and
    pairs need '[[...]]') and 'dict' for a mapping."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [bad], resolve_model=False)
    assert fix in e.value.fix, e.value.fix
    if "=" in fix and "<name>" not in fix:             # the example itself loads
        load_config(None, [fix.split("e.g. ")[-1] if "e.g. " in fix else fix], resolve_model=False)


@pytest.mark.parametrize(("bad", "fix"), [
    ("train.lr=.inf", "train.lr=0.001"), ("train.weight_decay=.inf", "train.weight_decay=0"),
    ("train.grad_clip=.inf", "train.grad_clip=0"), ("train.early_stopping.min_delta=.inf", "min_delta=0"),
    ("train.min_lr_ratio=5", "train.min_lr_ratio=0.1"), ("seed=18446744073709551621", "seed=2026"),
    ("seed=-1", "seed=2026"),
])
def test_values_that_only_break_training_later_are_refused(bad: str, fix: str) -> None:
    """(a helper's sweep) .inf passed the checks of lr, weight decay, grad_clip and min_delta (NaN weights,
    or no evaluation ever better); a min_lr_ratio of 5 made the cosine "decay" climb to 5x the rate; a seed
    past 64 bits ended in torch's overflow traceback."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [bad], resolve_model=False)
    assert fix in e.value.fix, e.value.fix


@pytest.mark.parametrize("sampling", ["loader.neg_keep_prob=0.05", "loader.balance_pos_fraction=0.5"])
def test_a_wll_temperature_fit_of_a_sampling_run_is_refused(sampling: str) -> None:
    """The loader shifts a sampling run's logits to the un-sampled rate; a WLL fit needs another shift, which a
    temperature cannot give: its fit scaled the logits instead and left WLL far from what a bias reaches."""
    import numpy as np

    from ctrpipe.infer.calibrate import fit_calibration
    from ctrpipe.infer.config import CalibrationConfig
    from ctrpipe.train.metrics import sigmoid, weighted_logloss

    with pytest.raises(ConfigError, match="cannot undo the logit shift") as e:
        load_config(None, [sampling, "infer.calibration.target=wll"])
    assert e.value.where == "infer.calibration.method" and "temperature_bias" in e.value.fix
    fixed = load_config(None, [sampling, "infer.calibration.target=wll", "infer.calibration.method=temperature_bias"])
    saved = to_dict(fixed)                     # a run trained so before the refusal is read back, to be served
    saved["infer"]["calibration"]["method"] = "temperature"
    assert config_from_dict(saved).infer.calibration.method == "temperature"
    rng = np.random.default_rng(0)                  # why: logits shifted by log(0.05), as the loader leaves them
    t = rng.normal(-4.0, 1.5, 200_000)
    y = (rng.random(t.size) < sigmoid(t)).astype(np.float64)
    shifted = t + np.log(0.05)
    wll = {m: weighted_logloss(y, sigmoid(fit_calibration(shifted, y, CalibrationConfig(m, "wll")).apply(shifted)))
           for m in ("temperature", "temperature_bias")}
    assert wll["temperature"] > wll["temperature_bias"] + 0.02, wll


def test_a_partly_given_column_section_keeps_the_criteo_columns(tmp_path: Path) -> None:
    """`data.numeric.impute=mean` alone kept no numeric column (the section was built from its class's
    defaults, not from the Criteo layout DataConfig gives it); a selection by `pattern` replaces `columns`."""
    from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT

    cfg = load_config(None, ["data.numeric.impute=mean", "data.categorical.mode=vocab"], resolve_model=False)
    assert cfg.data.numeric.columns == CRITEO_INT and cfg.data.numeric.impute == "mean"
    assert cfg.data.categorical.columns == CRITEO_CAT and cfg.data.categorical.mode == "vocab"
    path = tmp_path / "part.yaml"
    path.write_text("data:\n  numeric: {standardize: true}\n")
    assert load_config(path, [], resolve_model=False).data.numeric.columns == CRITEO_INT
    by_pattern = load_config(None, ["data.numeric.pattern=^f_"], resolve_model=False).data.numeric
    assert by_pattern.columns == () and by_pattern.pattern == "^f_"
    assert load_config(None, ["data.numeric.columns=[I2]"], resolve_model=False).data.numeric.columns == ("I2",)


def test_a_text_setting_takes_the_text_as_typed() -> None:
    """YAML reads `007` as 7, `12:30` as 750, `|` and `>` as empty block scalars, `?` as a mapping and `#x` as a
    comment; a text setting given by --set keeps what was typed, every other setting the YAML value."""
    cfg = load_config(CFGS / "adult.yaml", [
        "data.csv.comment_prefix=|", "data.csv.missing=[?, -999.00]", "infer.pred_header=007", "exp_name=12:30",
        "infer.id_header=#id", "data.csv.quote_char='", "train.lr=3e-4", "loader.batch_size=1024", "train.amp=off"],
        resolve_model=False)
    assert cfg.data.csv.comment_prefix == "|" and cfg.data.csv.missing == ("?", "-999.00")
    assert (cfg.infer.pred_header, cfg.exp_name, cfg.infer.id_header) == ("007", "12:30", "#id")
    assert cfg.data.csv.quote_char == "'" and cfg.train.amp == "off"
    assert cfg.train.lr == 3e-4 and cfg.loader.batch_size == 1024
    assert load_config(None, ["data.csv.missing=?"], resolve_model=False).data.csv.missing == ("?",)
    assert load_config(None, ["infer.pred_header='a b'"], resolve_model=False).infer.pred_header == "a b"
    assert load_config(None, ["data.separator=\t"], resolve_model=False).data.separator == "\t"
    assert load_config(CFGS / "dare_qnn.yaml", ["model.sequence.pad_id=0"]).model.params is not None  # a fixed key


@pytest.mark.parametrize("override", ["infer.pred_header=a,b", 'infer.id_header=I"D'])
def test_a_submission_header_that_would_break_its_csv_is_refused(override: str) -> None:
    """A comma in a header wrote `ID,a,b` over two-field rows."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], resolve_model=False)
    assert override.split("=")[0] in err.value.where and "without commas, quotes" in err.value.fix


@pytest.mark.parametrize(("override", "message"), [
    ("train.pos_weight_clip=[[0, 300, 5]]", r"2 values expected, 3 given(?s:.*)train.pos_weight_clip=\[\["),
    ("train.pos_weight_clip=[[0]]", "2 values expected, 1 given"),
    ("loader.batch_size=.inf", "bad value inf for 'loader.batch_size'"),
    ("loader.batch_size=.nan", "bad value nan for 'loader.batch_size'"),
    ("train.weight_decay=.nan", "NaN is no value for 'train.weight_decay'"),
    ("train.grad_clip=.nan", "NaN is no value for 'train.grad_clip'"),
    ("train.device=cuda0", "bad value 'cuda0' for 'train.device'"),
    ("train.device=mps", "bad value 'mps' for 'train.device'"),
    ("data.id_offset=9223372036854775807", "bad value 9223372036854775807 for 'data.id_offset'"),   # wrapped
    ("data.id_offset=-1", "bad value -1 for 'data.id_offset'"),
])
def test_values_that_crashed_later_are_config_errors(override: str, message: str) -> None:
    """An extra or missing value of a pair was cut or crashed with an IndexError; inf/NaN counts an
    OverflowError; a NaN float passed every `x < 0` check; cuda0 and mps reached torch.device."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_unknown_model_from_set_is_blamed_on_the_set() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "demo.yaml", ["model.name=deepfn"])
    assert str(err.value).startswith("--set model.name: unknown model 'deepfn'")


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("data:\n  csv: {missing: [-999.00]}\n", r"bad value -999.0 for 'data.csv.missing\[0\]': YAML read an unquoted "
                                              r"float(?s:.*)write it in quotes, spelt as in the data"),
    ("data:\n  labels: [yes]\n", r"bad value True for 'data.labels\[0\]': YAML read an unquoted bool"),
    ("data:\n  format: csv\n  labels: []\n  derived_labels: [{name: good, column: grade, positive: [1.50]}]\n",
     r"YAML read an unquoted float"),
])
def test_text_written_as_a_yaml_number_is_refused_not_rewritten(tmp_path: Path, yaml_text: str,
                                                                 message: str) -> None:
    """-999.00 became '-999.0' and 1.50 '1.5', which the file's text never matches: the missing marker and
    the positive value went unrecognised with no error."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [], resolve_model=False)
    quoted = path.read_text().replace("-999.00", "'-999.00'").replace("1.50", "'1.50'").replace("[yes]", "['yes']")
    path.write_text(quoted)
    load_config(path, [], resolve_model=False)


def test_a_class_check_names_who_set_the_key(tmp_path: Path) -> None:
    """Checks in a config class's __post_init__ knew the key but printed no `where` (file or --set)."""
    with pytest.raises(ConfigError) as err:
        load_config(CFGS / "demo.yaml", ["loader.batch_size=0"])
    assert str(err.value).startswith("--set loader.batch_size: bad value 0")
    path = tmp_path / "c.yaml"
    path.write_text("extends: " + str(CFGS / "demo.yaml") + "\ntrain:\n  ema: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert err.value.where == str(path) and "train.ema" in err.value.what


def test_set_forms_that_must_keep_their_meaning() -> None:
    """Review of the text-as-typed --set: a nested backbone key reloads from the stored JSON, a quoted model
    name is the name, a quoted empty list item list is empty, quoted items keep their commas, null stays
    null, and an empty section clears it (a partly given one keeps the Criteo columns only for Criteo)."""
    import json

    cfg = load_config(CFGS / "deepfm_mmoe_esmm.yaml", ["model.backbone_params.field_dims.C3=32"])
    stored = json.loads(json.dumps(to_dict(cfg)))
    assert config_from_dict(stored).model.params.backbone_params["field_dims"] == {"C3": 32}
    assert load_config(CFGS / "demo.yaml", ["model.name='dcn'"]).model.name == "dcn"
    assert load_config(None, ["data.numeric.columns=''"], resolve_model=False).data.numeric.columns == ()
    assert load_config(None, ["data.csv.missing=['?', 'a,b']"], resolve_model=False).data.csv.missing == ("?", "a,b")
    # a lone NULL is a missing marker here, not YAML's null; a whole list in quotes loses its quotes
    assert load_config(None, ["data.csv.missing=NULL"], resolve_model=False).data.csv.missing == ("NULL",)
    assert load_config(None, ["data.csv.missing='x', 'y'"], resolve_model=False).data.csv.missing == ("x", "y")
    assert load_config(CFGS / "adult.yaml", ["data.numeric={}"], resolve_model=False).data.numeric.columns == ()
    parquet = load_config(None, ["data.format=parquet", "data.numeric={impute: mean}"], resolve_model=False)
    assert parquet.data.numeric.columns == () and parquet.data.numeric.impute == "mean"


def test_a_comma_list_of_ints_reads_as_ints() -> None:
    """`--set model.hidden_units=64,64` was refused as "bad value '64'": the pieces stayed text. Lists of
    text keep their pieces as text, numbers included."""
    cfg = load_config(None, ["model.name=dnn", "model.hidden_units=64,32"])
    assert cfg.model.params.hidden_units == (64, 32)
    assert load_config(None, ["data.labels=clicked,1"]).data.labels == ("clicked", "1")
    with pytest.raises(ConfigError, match=r"model.hidden_units\[1\]"):
        load_config(None, ["model.name=dnn", "model.hidden_units=64,x"])
    with pytest.raises(ConfigError, match=r"model.hidden_units\[0\]"):       # ASCII digits only
        load_config(None, ["model.name=dnn", "model.hidden_units=\u0663,2"])


def test_a_lone_number_for_a_number_list_is_its_one_item() -> None:
    """`--set model.hidden_units=64` was refused with an example of two items; lists of settings still
    refuse a number."""
    assert load_config(None, ["model.name=dnn", "model.hidden_units=64"]).model.params.hidden_units == (64,)
    assert load_config(None, ["infer.weights=0.5"]).infer.weights == (0.5,)
    with pytest.raises(ConfigError, match="a list of mappings is wanted"):
        load_config(None, ["data.sequence=3"], resolve_model=False)
    with pytest.raises(ConfigError, match=r"model.hidden_units"):
        load_config(None, ["model.name=dnn", "model.hidden_units=true"])


def test_an_alias_in_a_backbones_params_replaces_the_files_key(tmp_path: Path) -> None:
    """ESMM's backbone_params.emb_dim from --set clashed with the file's backbone_params.embedding_dim ('both are
    set'), while at the top level the later name wins (helper's sweep)."""
    cfg_path = tmp_path / "esmm.yaml"
    cfg_path.write_text("model: {name: esmm, backbone: dare_qnn, backbone_params: {embedding_dim: 16}}\n")
    cfg = load_config(cfg_path, ["model.backbone_params.emb_dim=8"])
    assert cfg.model.params.backbone_params == {"embedding_dim": 8}
    with pytest.raises(ConfigError, match="name the same setting"):           # one source, both names
        load_config(cfg_path, ["model.backbone_params.emb_dim=8", "model.backbone_params.embedding_dim=4"])


def test_a_key_of_another_model_is_named_as_such() -> None:
    """Switching a file's model with --set model.name suggested an unrelated key ('did you mean
    model.embedding_init_std?' for din's hidden_units under dare_qnn); the fix given works."""
    with pytest.raises(ConfigError, match=r"'model.hidden_units' is a key of .*, not of model 'dare_qnn'") as e:
        load_config(CFGS / "parquet_din.yaml", ["model.name=dare_qnn"])
    assert "did you mean" not in e.value.fix
    fix = e.value.fix.split(": ", 1)[1]
    sets = [part.strip().strip("'") for part in fix.split("--set") if part.strip()]
    assert load_config(CFGS / "parquet_din.yaml", sets).model.name == "dare_qnn"
    with pytest.raises(ConfigError, match="did you mean 'model.hidden_units'"):       # a typo stays a typo
        load_config(None, ["model.name=dnn", "model.hiden_units=[8]"])


def test_a_key_written_one_section_too_high_names_its_section() -> None:
    """(a helper's sweep) the DARE + QNN-alpha head's keys sit under model.qnn_alpha: `model.mlp_hidden` listed
    the top-level keys, and `model.aux_loss_weight` / `model.dropout` (other models' keys) only said to drop
    them. Each now names the key this model has; a flow mapping without a space after its colon is said so."""
    # a key of that name a section or two down wins over a spelling guess at this level (a review:
    # data.val_ratio got "did you mean 'data.separator'", model.n_layers qnn_alpha's num_layers)
    for key, want in (("model.mlp_hidden=[64]", "model.qnn_alpha.mlp_hidden"),
                      ("model.top_k=3", "model.sequence.top_k"), ("model.n_layers=2", "model.sequence.tfm.n_layers"),
                      ("data.val_ratio=0.1", "data.split.val_ratio"),
                      ("train.metric=auc", "train.early_stopping.metric")):
        with pytest.raises(ConfigError) as e:
            load_config(CFGS / "dare_qnn.yaml", [key])
        assert e.value.fix == f"did you mean '{want}'?", e.value.fix
    for key, own in (("model.n_heads=2", "own is 'model.sequence.tfm.n_heads'"),
                     ("model.dropout=0.1", "own is 'model.qnn_alpha.dropout'"),
                     ("model.aux_loss_weight=0.3", "did you mean dare_qnn's 'model.qnn_alpha.aux_head_weight'?")):
        with pytest.raises(ConfigError, match="is a key of") as e:
            load_config(CFGS / "dare_qnn.yaml", [key])
        assert own in e.value.fix and "or drop it" in e.value.fix, e.value.fix
    with pytest.raises(ConfigError, match="YAML read 'item_id:32' as one key without a value") as e:
        load_config(CFGS / "parquet_din.yaml", ["model.field_dims={item_id:32}"])
    assert e.value.fix == "put a space after the colon: {item_id: 32} (or --set model.field_dims.item_id=32)"
    with pytest.raises(ConfigError) as e:         # the value follows the last colon (a review: 'ad:slot')
        load_config(CFGS / "parquet_din.yaml", ["model.field_dims={ad:slot:32}"])
    assert e.value.fix.startswith("put a space after the colon: {ad:slot: 32}"), e.value.fix
    assert load_config(CFGS / "parquet_din.yaml", ["model.field_dims={item_id: 32}"]).model.params.field_dims \
        == {"item_id": 32}


def test_a_heads_setting_error_names_the_head(tmp_path: Path) -> None:
    """'bad value -3.0 for train.tasks.<head>.weight' left a file's author to guess the head; the focal keys
    came as one tuple (helper's sweep)."""
    path = tmp_path / "tasks.yaml"
    path.write_text("train: {tasks: {clicked: {focal_weight: 0.1, focal_gamma: -1}}}\n")
    with pytest.raises(ConfigError, match=r"bad value -1.0 for 'train.tasks.clicked.focal_gamma'") as err:
        load_config(path, [], resolve_model=False)
    assert err.value.where.endswith("tasks.yaml")          # a file source: the key is in the message
    with pytest.raises(ConfigError, match=r"'train.tasks.converted.weight'"):
        load_config(None, ["train.tasks.converted.weight=inf"], resolve_model=False)
    with pytest.raises(ConfigError, match=r"'train.pos_weight'"):
        load_config(None, ["train.pos_weight=1e400"], resolve_model=False)


def test_switching_an_esmm_backbone_says_how() -> None:
    """'did you mean model.backbone_params.task_experts?' for mmoe's n_experts under a ple backbone."""
    with pytest.raises(ConfigError, match=r"'model.backbone_params.n_experts' is a key of .*mmoe.*not of "
                                          r"backbone 'ple'") as err:
        load_config(CFGS / "parquet_esmm.yaml", ["model.backbone=ple"])
    assert "--set 'model.backbone_params={}' --set model.backbone=ple" in err.value.fix
    assert load_config(CFGS / "parquet_esmm.yaml", ["model.backbone_params={}", "model.backbone=ple"]
                       ).model.params.backbone == "ple"


def test_a_loader_size_error_suggests_its_own_default() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["loader.prefetch=0"])
    assert "loader.prefetch=2" in exc.value.fix and "4096" not in exc.value.fix
