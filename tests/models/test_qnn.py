"""QNN-α: the quadratic layer and the self-ensemble loss against hand computations, one pass at inference,
config errors, and real training through the CLI on tiny shards (1 and 2 labels, loss falling, exact
resume, infer reproducing the validation metrics)."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli, sets

from ctrpipe.config import build_model_section
from ctrpipe.errors import ConfigError
from ctrpipe.infer.predict import run_infer
from ctrpipe.models.heads import as_output
from ctrpipe.models.layers.qnn import (
    QuadraticInteraction,
    QuadraticLayer,
    consistency_loss,
    mean_probability_logit,
    self_ensemble,
)
from ctrpipe.models.registry import build_model
from ctrpipe.train.checkpoint import build_initial_model, load_checkpoint
from ctrpipe.train.tables import load_packed

REPO = Path(__file__).resolve().parents[2]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def layer(n_fields: int, dim: int, rank: int, heads: int, weight: torch.Tensor, bias: torch.Tensor,
          **kw: object) -> QuadraticLayer:
    lay = QuadraticLayer(n_fields, dim, rank, heads, **kw)   # type: ignore[arg-type]
    with torch.no_grad():
        lay.linear.weight.copy_(weight)
        lay.linear.bias.copy_(bias)
    return lay


def test_layer_by_hand_two_rows_two_heads() -> None:
    # F=2, d=2 (D=4), R=2, H=2, W=0: h = relu(b) = [1,0,3,4 | 5,6,7,8] read as (head, row, 2)
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    lay = layer(2, 2, 2, 2, torch.zeros(8, 4), torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
    # head 0: g0 = [1,0] + [3,4] = [4,4] on the first dim of each field x[:, 0] = [1,3] -> [4, 12]
    # head 1: g1 = [5,6] + [7,8] = [12,14] on x[:, 1] = [2,4] -> [24, 56]
    # head-major [4, 12, 24, 56] read as (F, d), plus x
    torch.testing.assert_close(lay(x), torch.tensor([[[5.0, 14.0], [27.0, 60.0]]]))
    no_res = layer(2, 2, 2, 2, torch.zeros(8, 4), torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
                   use_residual=False)
    torch.testing.assert_close(no_res(x), torch.tensor([[[4.0, 12.0], [24.0, 56.0]]]))


def reference_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rank: int, heads: int) -> torch.Tensor:
    """The layer written element by element from its definition (slow on purpose)."""
    b, f, d = x.shape
    dim, hd = f * d, d // heads
    h = torch.relu(x.reshape(b, dim) @ weight.T + bias)                        # (B, R*D)
    out = torch.zeros(b, dim)
    for n in range(b):
        for k in range(heads):
            for m in range(dim // heads):                  # position m of head k: field m // hd, dim m % hd
                xv = x[n, m // hd, k * hd + m % hd]
                g = sum(h[n, k * rank * (dim // heads) + r * (dim // heads) + m] for r in range(rank))
                out[n, k * (dim // heads) + m] = xv * g
    return out.view(b, f, d) + x


@pytest.mark.parametrize(("rank", "heads"), [(2, 2), (3, 1), (1, 4)])
def test_layer_matches_its_definition(rank: int, heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 4, generator=g)
    w, b = torch.randn(rank * 12, 12, generator=g), torch.randn(rank * 12, generator=g)
    torch.testing.assert_close(layer(3, 4, rank, heads, w, b)(x), reference_layer(x, w, b, rank, heads))


def test_interaction_stack_shapes_and_norms() -> None:
    x = torch.randn(5, 6, 8)
    for norm in ("none", "batch", "layer"):
        qnn = QuadraticInteraction(6, 8, num_layers=3, rank=2, heads=4, dropout=0.1, norm=norm)
        out = qnn(x)
        assert out.shape == (5, 48) and qnn.out_dim == 48 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="must divide"):
        QuadraticLayer(2, 6, heads=4)


def test_self_ensemble_loss_by_hand() -> None:
    z1 = torch.tensor([[0.0, 3.0], [2.0, -1.0]], requires_grad=True)   # (B=2, H=2)
    z2 = torch.tensor([[1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    calls = iter([z1, z2])
    out = self_ensemble(lambda: next(calls), weight=0.5, active=True)
    pbar = [[(sigmoid(a) + sigmoid(b)) / 2 for a, b in zip(r1, r2, strict=True)]
            for r1, r2 in zip(z1.tolist(), z2.tolist(), strict=True)]
    want_logit = [[math.log(p / (1 - p)) for p in row] for row in pbar]
    torch.testing.assert_close(out.logits, torch.tensor(want_logit))

    def bce(z: float, t: float) -> float:
        return -(t * math.log(sigmoid(z)) + (1 - t) * math.log(1 - sigmoid(z)))

    def entropy(t: float) -> float:
        return -(t * math.log(t) + (1 - t) * math.log(1 - t))

    # the reference's BCE against the detached mean, less its entropy (KL: same gradient)
    per_head = [sum(bce(z[i][k], pbar[i][k]) - entropy(pbar[i][k]) for z in (z1.tolist(), z2.tolist())
                    for i in range(2)) / 2 for k in range(2)]
    want_aux = 0.5 * sum(per_head) / 2
    assert out.aux_losses["self_ensemble"].item() == pytest.approx(want_aux, rel=1e-6)
    gap = sum(abs(sigmoid(a) - sigmoid(b)) for r1, r2 in zip(z1.tolist(), z2.tolist(), strict=True)
              for a, b in zip(r1, r2, strict=True)) / 4
    assert out.diagnostics["self_ensemble.gap"].item() == pytest.approx(gap, rel=1e-6)
    # the target p̄ is detached: d aux / d z1 = weight * (σ(z1) - p̄) / (B * H)
    out.aux_losses["self_ensemble"].backward()
    want_grad = [[0.5 * (sigmoid(z) - p) / 4 for z, p in zip(zr, pr, strict=True)]
                 for zr, pr in zip(z1.tolist(), pbar, strict=True)]
    torch.testing.assert_close(z1.grad, torch.tensor(want_grad))


def test_mean_logit_is_finite_at_saturation() -> None:
    z1 = torch.tensor([[200.0], [-200.0], [200.0], [-30.0]])
    z2 = torch.tensor([[300.0], [-300.0], [-200.0], [-30.0]])
    m = mean_probability_logit(z1, z2)
    assert torch.isfinite(m).all()
    # σ(200) + σ(300) = 2 - e^-200 - e^-300: logit(p̄) ~ log(2 / (e^-200 + e^-300)) ~ 200 + log 2
    assert m[0].item() == pytest.approx(200 + math.log(2), abs=1e-4)
    assert m[1].item() == pytest.approx(-200 - math.log(2), abs=1e-4)
    assert m[2].item() == pytest.approx(0.0, abs=1e-4)                 # p̄ = 1/2
    assert m[3].item() == pytest.approx(-30.0, abs=1e-4)               # equal logits: their own logit
    assert torch.isfinite(consistency_loss(z1, z2, m))
    assert consistency_loss(z1[3:], z2[3:], m[3:]).item() == pytest.approx(0.0, abs=1e-6)   # passes agree


def build(spec, **keys: object) -> torch.nn.Module:
    section = build_model_section({"name": "qnn_alpha", "embedding_dim": 8, **keys})
    return build_model(section.name, section.params, spec)


def test_training_runs_the_layers_twice_inference_once(spec_factory, batch_factory) -> None:
    torch.manual_seed(0)
    spec = spec_factory(2)
    batch = batch_factory(spec, rows=32)
    model = build(spec, dropout=0.2)
    calls = []
    model.qnn.register_forward_hook(lambda *_: calls.append(1))
    out = as_output(model(batch))
    assert len(calls) == 2 and out.logits.shape == (32, 2)
    assert out.diagnostics["self_ensemble.gap"] > 0                      # two dropout draws
    assert out.aux_losses["self_ensemble"].ndim == 0
    model.eval()
    calls.clear()
    with torch.no_grad():
        a, b = as_output(model(batch)), as_output(model(batch))
    assert len(calls) == 2 and not a.aux_losses and not a.diagnostics   # one pass per call
    assert torch.equal(a.logits, b.logits)
    # without dropout both passes would be identical: one pass in training too
    model = build(spec, dropout=0.0)
    model.qnn.register_forward_hook(lambda *_: calls.append(1))
    calls.clear()
    assert not as_output(model(batch)).aux_losses and len(calls) == 1
    plain = build(spec, self_ensemble=False)
    assert not as_output(plain(batch)).aux_losses


@pytest.mark.parametrize("name", ["qnn_alpha", "dare_qnn"])
def test_batch_norm_counts_one_batch_per_step_under_the_self_ensemble(spec_factory, batch_factory,
                                                                      name: str) -> None:
    """The two passes see one batch: running statistics move as after a single pass (the first), and the
    batch count grows by one."""
    spec = spec_factory(2)
    batch = batch_factory(spec, rows=32)
    params = {"qnn_alpha": {"norm": "batch", "dropout": 0.3},
              "dare_qnn": {"attention_dim": 4, "sequence": {"top_k": 3},
                           "qnn_alpha": {"feature_embed_dim": 8, "mlp_hidden": [8], "dropout": 0.3,
                                         "norm": "batch"}}}[name]
    section = build_model_section({"name": name, "embedding_dim": 8, **params})
    torch.manual_seed(0)
    two = build_model(section.name, section.params, spec)
    one = copy.deepcopy(two)
    one.ensemble = False
    norms = [n for n, m in two.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms
    for model in (two, one):
        torch.manual_seed(5)                          # the first pass draws what the single pass draws
        model(batch)
    for (n, a), (_, b) in zip(two.named_buffers(), one.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
    assert all(dict(two.named_buffers())[f"{n}.num_batches_tracked"].item() == 1 for n in norms)


def test_dare_qnn_self_ensemble_by_hand(spec_factory, batch_factory) -> None:
    """dare_qnn (models/dare_qnn.py) trains on two dropout draws of its tower over one set of fields, and
    infers with one deterministic pass: both reproduced from its own modules with the same RNG seed."""
    torch.manual_seed(0)
    spec = spec_factory(2)
    batch = batch_factory(spec, rows=16)
    section = build_model_section({"name": "dare_qnn", "embedding_dim": 8, "attention_dim": 4,
                                   "sequence": {"top_k": 3},
                                   "qnn_alpha": {"feature_embed_dim": 8, "mlp_hidden": [8], "dropout": 0.3,
                                                 "self_ensemble_weight": 0.5}})
    model = build_model(section.name, section.params, spec)
    with torch.no_grad():
        model.head.linear.weight.mul_(30.0)       # spread the logits, so the checks below tell the combinations apart
    towers, encoders = [], []
    model.qnn.register_forward_hook(lambda *_: towers.append(1))
    model.encoder.register_forward_hook(lambda *_: encoders.append(1))

    def passes(n: int) -> list[torch.Tensor]:
        x, _ = model.fields(batch)                                         # the same RNG draws, in order
        return [model.head(model.mlp(model.qnn(x))) for _ in range(n)]

    torch.manual_seed(1)
    out = as_output(model(batch))
    assert len(towers) == 2 and len(encoders) == 1                       # fields once, the tower twice
    torch.manual_seed(1)
    with torch.no_grad():
        z1, z2 = (z.double() for z in passes(2))
    assert not torch.allclose(z1, z2, atol=1e-2)                           # two different dropout draws
    p1, p2 = torch.sigmoid(z1), torch.sigmoid(z2)
    pbar = (p1 + p2) / 2
    want = torch.log(pbar / (1 - pbar))
    # logit of the mean probability, not the mean logit nor one pass (they differ here by more than the tolerance)
    assert (want - (z1 + z2) / 2).abs().max() > 1e-2 and (want - z1).abs().max() > 1e-2
    torch.testing.assert_close(out.logits.double(), want, rtol=1e-5, atol=1e-5)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))

    # weight * (KL(p̄ || σ(z1)) + KL(p̄ || σ(z2))), mean over rows, then over the 2 heads
    want_aux = 0.5 * (kl(pbar, p1) + kl(pbar, p2)).mean(0).mean()
    assert set(out.aux_losses) == {"self_ensemble"}
    assert out.aux_losses["self_ensemble"].item() == pytest.approx(want_aux.item(), rel=1e-4)
    assert out.diagnostics["self_ensemble.gap"].item() == pytest.approx((p1 - p2).abs().mean().item(), rel=1e-4)

    model.eval()
    towers.clear()
    with torch.no_grad():
        torch.manual_seed(2)
        a = as_output(model(batch))
        torch.manual_seed(3)
        b = as_output(model(batch))
        (single,) = passes(1)
    assert len(towers) == 3 and not a.aux_losses and not a.diagnostics     # one pass per call
    assert torch.equal(a.logits, b.logits)
    torch.testing.assert_close(a.logits, single)


@pytest.mark.parametrize(("keys", "key"), [
    ({"heads": 3}, "model.heads"),
    ({"numeric": "concat"}, "model.numeric"),
    ({"norm": "group"}, "model.norm"),
    ({"rank": 0}, "model.rank"),
    ({"self_ensemble_weight": -1.0}, "model.self_ensemble_weight"),
])
def test_config_errors_name_the_key(keys: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_model_section({"name": "qnn_alpha", "embedding_dim": 8, **keys}, "cfgs/x.yaml")


def test_heads_must_divide_field_dims_given_per_field(spec_factory) -> None:
    spec = spec_factory(numeric=False, multihot=False, sequence=False)
    with pytest.raises(ConfigError, match="model.heads"):
        build(spec, heads=2, field_dims={"C1": 3, "C2": 3, "C3": 3})


# --- real training through the CLI -------------------------------------------------------------------------

FAST = ["loader.batch_size=64", "loader.eval_batch_size=256", "train.log_every=1", "train.min_steps=0",
        "train.evals_per_epoch=1", "train.early_stopping.patience=0", "infer.calibration.method=none",
        "model.embedding_dim=4", "model.num_layers=2", "model.rank=2", "train.lr=0.01"]


@pytest.fixture(scope="module")
def criteo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qnn_criteo")
    run_cli("synth", "--format", "criteo", "--rows", "800", "--test-rows", "200", "--seed", "0", "--out",
            str(root / "data"), "-q")
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(root / "data" / "train.tsv"),
            "--out", str(root / "shards"), "-q",
            *sets(["data.hash_bins=64", "data.shard_rows=256", "data.split.val_ratio=0.2",
                   "data.folds.n_splits=0"]))
    return root / "shards"


def train(cache: Path, runs: Path, cfg: str, *extra: str) -> Path:
    run_cli("train", "--cfg", str(REPO / "cfgs" / cfg), "--shards", str(cache), "--runs", str(runs), "-q",
            *sets([*FAST, *extra]))
    return next(p for p in runs.iterdir() if p.is_dir())


def losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run / "train_log.csv").open()) if r["loss"]]


def test_criteo_trains_and_infer_reproduces_val_metrics(criteo_cache: Path, tmp_path: Path) -> None:
    run = train(criteo_cache, tmp_path / "runs", "criteo_qnn_alpha.yaml", "train.epochs=4")
    curve = losses(run)
    assert all(math.isfinite(v) for v in curve)
    k = max(len(curve) // 4, 1)
    assert sum(curve[-k:]) / k < 0.9 * sum(curve[:k]) / k, curve       # first vs last quarter of the run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["auc"] > 0.5
    # inference is one deterministic pass: infer on the val rows gives the metrics training reported
    rep = run_infer(run, criteo_cache, tmp_path / "val.csv", ["infer.view=val", "infer.calibration.method=none"],
                    quiet=True)
    assert rep.metrics is not None
    for key in ("auc", "logloss"):
        assert rep.metrics[key] == pytest.approx(metrics["val"][key], rel=1e-5, abs=1e-6), key


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint (no EMA here: its weights are the training weights), BN stats included."""
    ckpt = load_checkpoint(path)
    model = build_initial_model(ckpt.config, ckpt.feature_spec, ckpt.init_seed)
    load_packed(model, ckpt.weights)
    return model.state_dict()


def test_resume_equals_uninterrupted(criteo_cache: Path, tmp_path: Path) -> None:
    # dropout draws of both passes and batch-norm statistics must come back exactly
    args = ("train.epochs=2", "model.dropout=0.3", "model.norm=batch", "train.eval_every=4")
    a = train(criteo_cache, tmp_path / "a", "criteo_qnn_alpha.yaml", *args)
    run_cli("train", "--cfg", str(REPO / "cfgs" / "criteo_qnn_alpha.yaml"), "--shards", str(criteo_cache),
            "--runs", str(tmp_path / "b"), "-q", *sets([*FAST, *args, "train.stop_after_steps=7"]))
    run_cli("train", "--cfg", str(REPO / "cfgs" / "criteo_qnn_alpha.yaml"), "--shards", str(criteo_cache),
            "--runs", str(tmp_path / "b"), "-q", "--resume", *sets([*FAST, *args]))
    b = tmp_path / "b" / a.name
    assert load_checkpoint(b / "ckpt_last.pt").step == load_checkpoint(a / "ckpt_last.pt").step
    wa, wb = weights(a / "ckpt_last.pt"), weights(b / "ckpt_last.pt")
    assert wa.keys() == wb.keys() and any("running_mean" in k for k in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["val"] == mb["val"]


def test_two_labels_with_a_masked_head(tmp_path: Path) -> None:
    run_cli("synth", "--format", "parquet", "--rows", "1500", "--test-rows", "10", "--seed", "1", "--out",
            str(tmp_path / "data"), "-q")
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
            str(tmp_path / "data" / "train.parquet"), "--out", str(tmp_path / "shards"), "-q",
            *sets(["data.hash_bins=1000", "data.folds.n_splits=0"]))
    run = train(tmp_path / "shards", tmp_path / "runs", "parquet_example.yaml", "model.name=qnn_alpha",
                "train.epochs=2", "train.tasks.converted.mask=clicked", "loader.batch_size=128")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["heads"] == ["clicked", "converted"]
    for head in ("clicked", "converted"):
        assert math.isfinite(metrics["val"][f"auc.{head}"]), metrics["val"]
    curve = losses(run)
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0]
    rep = run_infer(run, tmp_path / "shards", tmp_path / "val.csv",
                    ["infer.view=val", "infer.calibration.method=none"], quiet=True)
    assert rep.metrics is not None
