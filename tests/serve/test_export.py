"""`ctrpipe export --format torchscript|onnx`: the traced module and the ONNX graph run by onnxruntime (dynamic
batch size) give ctrpipe's calibrated, fold-combined probabilities to 1e-5 on real shard rows, for every model
family; model.json lists the inputs. A missing onnx extra and a failed export are clear errors that leave no
model file behind.

Two shared caches: synthetic Criteo text (single-label families) and synthetic Parquet with two labels,
sequences, multi-hot and co-visitation (multi-task families). Tiny models, a few steps each, each family
trained once for both formats."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import run_cli as _cli
from cli_helpers import sets as _sets

REPO = Path(__file__).resolve().parents[2]
FAST = ["loader.batch_size=64", "loader.eval_batch_size=128", "train.log_every=5",
        "train.min_steps=0", "train.evals_per_epoch=1", "train.early_stopping.patience=0", "train.epochs=1",
        "train.max_steps=4", "train.device=cpu", "infer.calibration.method=temperature"]
CRITEO_DATA = ["data.hash_bins=200", "data.shard_rows=500", "data.split.val_ratio=0.2"]
PARQUET_DATA = ["data.hash_bins=1000", "data.shard_rows=500", "data.folds.n_splits=0"]
MLP = ["model.embedding_dim=4", "model.hidden_units=[16]"]
# family -> (cache, config, extra --set values)
FAMILIES: dict[str, tuple[str, str, list[str]]] = {
    "dnn": ("criteo", "criteo_dnn", MLP),
    "deepfm": ("criteo", "criteo_deepfm", MLP),
    "dcn": ("criteo", "criteo_dcn", MLP),
    "dcnv2_full": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=full"]),
    "dcnv2_lowrank": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=lowrank", "model.low_rank=4",
                                                 "model.structure=stacked"]),
    "dcnv2_mixture": ("criteo", "criteo_dcnv2", [*MLP, "model.cross_kind=mixture", "model.low_rank=4"]),
    "autoint": ("criteo", "criteo_autoint", [*MLP, "model.attention_layers=1", "model.attention_dim=8"]),
    "ft_transformer": ("criteo", "criteo_ft_transformer", ["model.n_blocks=1", "model.n_heads=2",
                                                           "model.embedding_dim=8"]),
    "shared_bottom": ("parquet", "parquet_shared_bottom", [*MLP, "model.tower_units=[8]"]),
    "mmoe": ("parquet", "parquet_mmoe", [*MLP, "model.tower_units=[8]", "model.n_experts=2"]),
    "ple": ("parquet", "parquet_ple", [*MLP, "model.tower_units=[8]"]),
    "esmm": ("parquet", "parquet_esmm", ["model.backbone_params.embedding_dim=4",
                                         "model.backbone_params.hidden_units=[16]",
                                         "model.backbone_params.tower_units=[8]"]),
    "deepfm_mmoe": ("parquet", "parquet_deepfm_mmoe", [*MLP, "model.composer_width=8", "model.adapter_units=[8]",
                                                       "model.n_experts=2", "model.expert_units=[8]",
                                                       "model.tower_units=[8]"]),
    "qnn_alpha": ("criteo", "criteo_qnn_alpha", ["model.embedding_dim=4", "model.num_layers=1"]),
    "din": ("parquet", "parquet_din", [*MLP, "data.labels=[clicked,converted]"]),
    "dare": ("parquet", "parquet_dare", [*MLP, "data.labels=[clicked,converted]", "model.attention_dim=4",
                                         "model.sequence.search=soft", "model.aux_loss_weight=0.2"]),
    "dare_qnn": ("parquet", "dare_qnn", ["model.embedding_dim=4", "data.labels=[clicked,converted]",
                                        "model.attention_dim=4", "model.qnn_alpha.feature_embed_dim=4",
                                        "model.qnn_alpha.mlp_hidden=[8]", "model.sequence.transformer_block=true"]),
}


def test_every_model_has_an_export_family() -> None:
    """docs/serving.md says every model family exports in both formats, which the tests below check per entry
    of FAMILIES: a model added to the registry without an entry (README, "Adding a model") went unchecked."""
    from ctrpipe.config import load_config
    from ctrpipe.models.registry import model_names

    # as the fixture trains them: the config file (with its `extends:`) and the family's overrides
    covered = {load_config(REPO / "cfgs" / f"{cfg}.yaml", extra).model.name for _, cfg, extra in FAMILIES.values()}
    assert covered == set(model_names()), sorted(set(model_names()) ^ covered)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("serve_export")
    _cli("synth", "--format", "criteo", "--rows", "1000", "--out", str(root / "d"), "-q")
    _cli("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(root / "d" / "train.tsv"),
         "--out", str(root / "criteo"), "-q", *_sets(CRITEO_DATA + ["data.folds.n_splits=2"]))
    _cli("synth", "--format", "parquet", "--rows", "1000", "--seed", "1", "--out", str(root / "p"), "-q")
    _cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
         str(root / "p" / "train.parquet"), "--out", str(root / "parquet"), "-q", *_sets(PARQUET_DATA))
    return {"criteo": (root / "criteo", CRITEO_DATA), "parquet": (root / "parquet", PARQUET_DATA)}


@pytest.fixture(scope="module")
def runs(caches: dict[str, tuple[Path, list[str]]],
         tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> its run folder, trained on first use (the TorchScript and ONNX tests share it)."""
    root = tmp_path_factory.mktemp("serve_runs")
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            kind, cfg, extra = FAMILIES[family]
            cache, data = caches[kind]
            kfold = ["--kfold", "2"] if family == "dnn" else []      # fold ensembling once
            _cli("train", "--cfg", str(REPO / "cfgs" / f"{cfg}.yaml"), "--shards", str(cache), "--runs",
                 str(root), "-q", *kfold, *_sets(data + FAST + extra + [f"exp_name={family}"]))
            done[family] = root / family
        return done[family]

    return get


def _onnxruntime() -> Any:
    """onnxruntime, or a failure (not a skip: the test environment has the extra, and a silent skip would
    hide an install that lost it)."""
    try:
        import onnxruntime
    except ImportError:
        pytest.fail("onnxruntime is missing: pip install -e '.[onnx]' (scripts/setup_env.sh installs it)")
    return onnxruntime


def _check_doc(doc: dict, kind: str, fmt: str) -> None:
    assert doc["format"] == fmt and doc["file"] in doc["files"]
    groups = [i["group"] for i in doc["inputs"]]
    if kind == "criteo":
        assert groups == ["numeric", "categorical"]
    else:
        assert groups[:2] == ["numeric", "categorical"] and len(groups) > 2     # multi-hot, sequence inputs
    assert all(i["shape"][0] == "B" for i in doc["inputs"])
    tables = doc["embedding_tables"]
    assert tables["tables"] and tables["total_bytes"] == sum(t["bytes"] for t in tables["tables"])
    assert all(0 < t["rows_touched_by_training"] <= t["rows"] and t["bytes"] == t["rows"] * t["dim"] * 4
               for t in tables["tables"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torchscript_parity(runs: Callable[[str], Path], family: str, tmp_path: Path) -> None:
    from ctrpipe.serve.export import cache_batch, example_inputs
    from ctrpipe.serve.predictor import Predictor

    run = runs(family)
    out = tmp_path / "export"
    _cli("export", "--run", str(run), "--format", "torchscript", "--out", str(out))
    doc = json.loads((out / "model.json").read_text())
    _check_doc(doc, FAMILIES[family][0], "torchscript")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt"]
    model = torch.jit.load(str(out / "model.pt"))
    p = Predictor.load(run)
    assert doc["outputs"]["heads"] == list(p.heads)
    for n in (1, 37, 300):           # traced on 8 rows: the batch dimension is dynamic
        batch = cache_batch(p, n)
        want = p.probabilities(p.batch_logits(batch), p.heads)
        got = model(example_inputs(p, batch)).numpy()     # as model.json says to call it: no torch.no_grad()
        assert got.shape == (n, len(p.heads))
        for j, head in enumerate(p.heads):
            np.testing.assert_allclose(got[:, j], want[head], rtol=0, atol=1e-5, err_msg=f"{family} {head}")
    # (a helper's sweep) a request batch of no rows: DeepFM's traced reshape(B, -1) failed on it
    empty = tuple(t[:0] for t in example_inputs(p, cache_batch(p, 2)))
    assert tuple(model(empty).shape) == (0, len(p.heads))


def test_confident_folds_combine_as_infer_combines_them(runs: Callable[[str], Path]) -> None:
    """combine() takes each fold's logit of its probability clipped to [1e-7, 1 - 1e-7] (at most 16.1); the
    exported module averaged the raw logits, so a fold at 18 among four at 0 gave 0.961 where infer gave 0.947."""
    from torch import nn

    from ctrpipe.serve.export import ServingModule, cache_batch, example_inputs
    from ctrpipe.serve.predictor import Predictor

    class Fixed(nn.Module):
        def __init__(self, logits: np.ndarray) -> None:
            super().__init__()
            self.logits = torch.tensor(logits)

        def forward(self, batch: Any) -> torch.Tensor:
            return self.logits.reshape(-1, 1)

    p = Predictor.load(runs("dnn"))                               # 2 folds, logit_mean
    z = np.array([[18.0, -17.0, 3.0, 40.0], [0.0, 0.0, -2.0, 30.0]], dtype=np.float32)     # (K, N)
    module = ServingModule(p).eval()
    module.shift.zero_()
    module.nets = nn.ModuleList([Fixed(z[k]) for k in range(len(z))])
    with torch.no_grad():
        got = module(example_inputs(p, cache_batch(p, 4))).numpy()[:, 0]
    np.testing.assert_allclose(got, p.probabilities(z[:, :, None], ["label"])["label"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_parity(runs: Callable[[str], Path], family: str, tmp_path: Path) -> None:
    """onnxruntime on model.onnx == Predictor (shift, calibration, fold combination) on the same shard rows."""
    ort = _onnxruntime()
    from ctrpipe.serve.export import cache_batch, example_inputs
    from ctrpipe.serve.predictor import Predictor

    run = runs(family)
    out = tmp_path / "export"
    _cli("export", "--run", str(run), "--format", "onnx", "--out", str(out))
    doc = json.loads((out / "model.json").read_text())
    _check_doc(doc, FAMILIES[family][0], "onnx")
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx"]     # no temp folder left
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    assert [i.name for i in graph_inputs] == [i["name"] for i in doc["inputs"]]
    assert all(g.shape[0] == "B" and g.shape[1:] == i["shape"][1:]
               for g, i in zip(graph_inputs, doc["inputs"], strict=True))
    assert session.get_outputs()[0].name == doc["outputs"]["name"]
    p = Predictor.load(run)
    assert doc["outputs"]["heads"] == list(p.heads)
    for n in (1, 37, 300):           # exported from 8 rows: the batch dimension is symbolic
        batch = cache_batch(p, n)
        want = p.probabilities(p.batch_logits(batch), p.heads)
        feeds = {i["name"]: t.numpy() for i, t in zip(doc["inputs"], example_inputs(p, batch), strict=True)}
        assert all(str(feeds[i["name"]].dtype) == i["dtype"] for i in doc["inputs"])
        got = session.run([doc["outputs"]["name"]], feeds)[0]
        assert got.shape == (n, len(p.heads)) and got.dtype == np.float64
        for j, head in enumerate(p.heads):
            np.testing.assert_allclose(got[:, j], want[head], rtol=0, atol=1e-5, err_msg=f"{family} {head}")


def test_onnx_missing_extra(runs: Callable[[str], Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without onnxscript (an extra), the export says which package and how to install it; nothing written."""
    from ctrpipe.errors import ConfigError
    from ctrpipe.serve.export import export_model

    monkeypatch.setitem(sys.modules, "onnxscript", None)       # `import onnxscript` raises ImportError
    with pytest.raises(ConfigError, match="onnxscript") as info:
        export_model(runs("dnn"), tmp_path / "export", "onnx")
    assert "ctrpipe[onnx]" in info.value.fix
    assert not (tmp_path / "export").exists()


def test_failed_export_leaves_no_model(runs: Callable[[str], Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An export that fails its onnxruntime check after the graph is written leaves neither model.onnx nor
    model.json nor its temporary folder, and an earlier export in the folder stays as it was; the next export
    removes the working folder of one that was killed."""
    _onnxruntime()
    from ctrpipe.errors import ConfigError
    from ctrpipe.serve import export

    out = tmp_path / "export"
    (out / ".export-killed").mkdir(parents=True)            # what an export killed mid-way leaves behind
    (out / ".export-killed" / "model.pt").write_bytes(b"half")
    export.export_model(runs("dnn"), out, "torchscript")
    assert list(json.loads((out / "model.json").read_text())["exports"]) == ["torchscript"]
    assert not (out / ".export-killed").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "ONNX_TOL", -1.0)              # no difference passes: the check must fail
    with pytest.raises(ConfigError, match="does not reproduce it"):
        export.export_model(runs("dnn"), out, "onnx")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_second_export_into_a_busy_folder_is_refused(runs: Callable[[str], Path], tmp_path: Path) -> None:
    """Two exports into one folder at once: the second removed the first's working folder as a killed
    export's, and the first failed with an error blaming its model. The folder is locked while one writes
    (here held by another process, as a running export holds it)."""
    import subprocess
    import sys

    from ctrpipe.errors import BusyError
    from ctrpipe.serve.export import export_model

    out = tmp_path / "export"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); sys.stdin.readline()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        (out / ".export-running").mkdir()                   # the working folder of the export in progress
        with pytest.raises(BusyError, match="another `ctrpipe export` is writing into"):
            export_model(runs("dnn"), out, "torchscript")
        assert (out / ".export-running").is_dir() and not (out / "model.json").exists()
    finally:
        holder.communicate("\n", timeout=30)
    export_model(runs("dnn"), out, "torchscript")              # once it is done, the folder is free
    assert (out / "model.pt").is_file() and not (out / ".export-running").exists()


def test_both_formats_in_one_folder(runs: Callable[[str], Path], tmp_path: Path) -> None:
    """model.json lists both exports of the same checkpoints in one folder; a retrained run drops the other."""
    _onnxruntime()
    from ctrpipe.serve.export import export_model

    out = tmp_path / "export"
    export_model(runs("dnn"), out, "torchscript")
    export_model(runs("dnn"), out, "onnx")
    doc = json.loads((out / "model.json").read_text())
    assert doc["format"] == "onnx" and doc["exports"]["onnx"]["files"] == ["model.onnx"]
    assert doc["exports"]["torchscript"]["file"] == "model.pt" and (out / "model.pt").is_file()
    ckpt = next(runs("dnn").glob("*.pt"))
    ckpt.touch()           # as a new training would leave it: the model.pt above is no longer of these weights
    export_model(runs("dnn"), out, "onnx")
    assert list(json.loads((out / "model.json").read_text())["exports"]) == ["onnx"]
    # and the old weights' model.pt goes: beside a model.json of other weights it read as their TorchScript twin
    assert not (out / "model.pt").exists() and (out / "model.onnx").is_file()


def test_exports_with_other_infer_settings_are_not_listed_together(runs: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    """model.json listed a model.pt exported with other infer settings (calibration, fold weights) beside a
    model.onnx as if both computed the same: its source named the checkpoints only (helper's export sweep)."""
    _onnxruntime()
    from ctrpipe.serve.export import export_model

    out = tmp_path / "export"
    export_model(runs("dnn"), out, "torchscript", overrides=["infer.calibration.method=none"])
    export_model(runs("dnn"), out, "onnx")
    doc = json.loads((out / "model.json").read_text())
    assert list(doc["exports"]) == ["onnx"] and doc["calibration"][0]["method"] != "none"
    assert not (out / "model.pt").exists()                 # the uncalibrated model is not left beside it
    export_model(runs("dnn"), out, "torchscript")
    assert sorted(json.loads((out / "model.json").read_text())["exports"]) == ["onnx", "torchscript"]


def test_an_export_into_the_training_cache_is_refused(runs: Callable[[str], Path], tmp_path: Path) -> None:
    """A helper's sweep: export --out inside the run's training cache wrote model.pt and model.json among the
    shards (infer and predict refuse such an --out)."""
    from ctrpipe.errors import ConfigError
    from ctrpipe.serve import export
    from ctrpipe.train.checkpoint import load_checkpoint

    run = runs("dnn")
    cache = Path(load_checkpoint(run / "ckpt_fold0.pt").shards)
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(ConfigError, match="inside the training cache"):
        export.export_model(run, cache / "export", "torchscript")
    assert sorted(p.name for p in cache.iterdir()) == before


def test_one_heads_export_is_told_the_export_holds_every_head(runs: Callable[[str], Path], tmp_path: Path) -> None:
    """(a helper's export sweep) --set infer.task=... was refused with a fix for predict (choose heads with
    Predictor.predict): an export outputs every head, in model.json's order."""
    from ctrpipe.errors import ConfigError
    from ctrpipe.serve import export

    with pytest.raises(ConfigError) as e:
        export.export_model(runs("dnn"), tmp_path / "export", "torchscript", overrides=["infer.task=label"])
    assert "an export outputs every head" in e.value.what and "outputs.heads" in e.value.fix
    assert "Predictor.predict" not in e.value.fix and not (tmp_path / "export").exists()
