"""Multi-task models (shared-bottom, MMoE, PLE, ESMM) and the objective that trains them."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ctrpipe.config import build_model_section
from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.models.heads import as_output, heads_of, log1mexp
from ctrpipe.models.layers.experts import Gate, GateOptions, balance_kl, gate_entropy
from ctrpipe.models.registry import build_model, label_range, model_names
from ctrpipe.train.config import TaskConfig, TrainConfig
from ctrpipe.train.metrics import compute_metrics
from ctrpipe.train.objective import Objective, build_tasks, clip_at, masked_targets, targets

SMALL = {"embedding_dim": 8, "hidden_units": [16], "tower_units": [8]}
MULTI: list[tuple[str, dict]] = [
    ("shared_bottom", SMALL),
    ("mmoe", {**SMALL, "n_experts": 3, "gate_noise": 0.1, "gate_entropy": 0.01, "gate_balance": 0.01}),
    ("ple", {**SMALL, "levels": 2, "shared_experts": 2, "task_experts": 1, "gate_temperature": 1.5}),
    ("ple", {**SMALL, "levels": 1}),                                             # CGC
    ("esmm", {"backbone": "shared_bottom", "backbone_params": SMALL}),
    ("esmm", {"backbone": "mmoe", "backbone_params": {**SMALL, "n_experts": 2, "gate_entropy": 0.01}}),
    ("esmm", {"backbone": "dnn", "backbone_params": {"embedding_dim": 8, "hidden_units": [16]}}),
    ("deepfm_mmoe", {**SMALL, "composer_width": 8, "adapter_units": [8], "expert_units": [8], "n_experts": 2}),
    ("esmm", {"backbone": "deepfm_mmoe",
              "backbone_params": {**SMALL, "composer_width": 8, "adapter_units": [8], "expert_units": [8],
                                  "gate_noise": 0.05, "gate_entropy": 0.001, "wide_heads": ["ctr"]}}),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(MULTI)]


def build(spec, name: str, keys: dict, sparse: bool = False) -> torch.nn.Module:
    section = build_model_section({"name": name, **keys})
    return build_model(section.name, section.params, spec, sparse=sparse)


def nested_spec(spec_factory):
    """Two labels that nest like click and conversion: y1 = 1 only where y0 = 1."""
    return dataclasses.replace(spec_factory(2), labels=("click", "conv"), label_rates=(0.3, 0.06))


def nested_batch(spec, batch_factory, rows: int = 64):
    b = batch_factory(spec, rows=rows)
    y0 = b.labels[:, 0]
    y1 = y0 * b.labels[:, 1]
    return dataclasses.replace(b, labels=torch.stack([y0, y1], dim=1))


def test_every_multi_task_model_is_covered() -> None:
    multi = {n for n in model_names() if label_range(n)[0] > 1}
    # a new multi-task model needs only its MULTI entry (README, "Adding a model"); none of these may vanish
    assert {n for n, _ in MULTI} == multi >= {"shared_bottom", "mmoe", "ple", "esmm", "deepfm_mmoe"}


@pytest.mark.parametrize(("name", "keys"), MULTI, ids=IDS)
def test_shapes_priors_and_learning(name: str, keys: dict, spec_factory, batch_factory) -> None:
    torch.manual_seed(0)
    spec = nested_spec(spec_factory)
    model = build(spec, name, keys)
    batch = nested_batch(spec, batch_factory)
    heads = heads_of(model, spec)
    tasks = build_tasks(heads, spec, TrainConfig())
    objective = Objective(tasks, torch.device("cpu"))
    out = as_output(model(batch))
    assert out.logits.shape == (64, len(heads)) and out.logits.dtype == torch.float32
    # each head starts at its own prior: mean predicted rate near the head's train rate
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(as_output(model(batch)).logits).mean(dim=0)
    want = {"click": 0.3, "conv": 0.06, "ctr": 0.3, "ctcvr": 0.06, "cvr": 0.2}
    for h, got in zip(heads, p.tolist(), strict=True):
        assert abs(got - want[h.name]) < 0.05, (h.name, got)
    before = objective(as_output(model(batch)), batch.labels).item()
    assert math.isfinite(before)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        objective(as_output(model(batch)), batch.labels).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = objective(as_output(model(batch)), batch.labels).item()
    assert after < 0.8 * before, (before, after)


def test_gated_models_return_regularisers_and_gate_usage(spec_factory, batch_factory) -> None:
    spec = nested_spec(spec_factory)
    model = build(spec, "mmoe", {**SMALL, "n_experts": 3, "gate_entropy": 0.01, "gate_balance": 0.01})
    out = model(nested_batch(spec, batch_factory))
    assert set(out.aux_losses) == {"gate_reg.click", "gate_reg.conv"}
    assert all(v.item() >= 0 for v in out.aux_losses.values())
    usage = [out.diagnostics[f"gate.click.e{e}"].item() for e in range(3)]
    assert abs(sum(usage) - 1) < 1e-5 and "gate_entropy.conv" in out.diagnostics
    ple = build(spec, "ple", {**SMALL, "levels": 2})(nested_batch(spec, batch_factory))
    assert "gate.l0.shared.e0" in ple.diagnostics and "gate.l1.conv.e0" in ple.diagnostics
    assert not ple.aux_losses                                     # regularisers off by default


def test_gate_regularisers_on_hand_worked_gates() -> None:
    uniform = torch.full((4, 2), 0.5)
    one_hot_mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])       # each row sure, experts used equally
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])           # every row on expert 0
    assert gate_entropy(uniform).item() == pytest.approx(math.log(2))
    assert gate_entropy(one_hot_mixed).item() == pytest.approx(0.0, abs=1e-9)
    assert balance_kl(uniform).item() == pytest.approx(0.0, abs=1e-9)
    assert balance_kl(one_hot_mixed).item() == pytest.approx(0.0, abs=1e-9)
    assert balance_kl(collapsed).item() == pytest.approx(math.log(2))
    gate = Gate(3, 2, GateOptions(entropy_weight=0.5, balance_weight=2.0))
    assert gate.regulariser(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert gate.regulariser(collapsed).item() == pytest.approx(0.5 * math.log(2) + 2.0 * math.log(2))
    assert Gate(3, 2, GateOptions()).regulariser(collapsed) is None


def test_gate_noise_only_in_training() -> None:
    torch.manual_seed(0)
    gate = Gate(3, 4, GateOptions(noise_std=1.0, temperature=2.0))
    x = torch.randn(5, 3)
    gate.eval()
    assert torch.equal(gate(x), gate(x))
    torch.testing.assert_close(gate(x), torch.softmax(gate.linear(x) / 2.0, dim=1))
    gate.train()
    assert not torch.equal(gate(x), gate(x))


def test_esmm_log_space_loss_matches_naive_and_stays_finite(spec_factory, batch_factory) -> None:
    spec = nested_spec(spec_factory)
    model = build(spec, "esmm", {"backbone": "dnn", "backbone_params": {"embedding_dim": 8, "hidden_units": [8]}})
    tasks = build_tasks(heads_of(model, spec), spec, TrainConfig(pos_weight=(1.0, 3.0, 1.0)))
    assert [t.name for t in tasks] == ["ctr", "ctcvr", "cvr"] and tasks[2].weight == 0.0
    objective = Objective(tasks, torch.device("cpu"))
    batch = nested_batch(spec, batch_factory)
    out = model(batch)
    y = batch.labels[:, 0] * batch.labels[:, 1]                  # click AND conversion
    p_ctcvr = torch.sigmoid(out.logits[:, 0]) * torch.sigmoid(out.logits[:, 2])
    naive = -(3.0 * y * torch.log(p_ctcvr) + (1 - y) * torch.log(1 - p_ctcvr)).mean()
    torch.testing.assert_close(objective.per_head(out, batch.labels)[1], naive, rtol=1e-5, atol=1e-6)
    # far in the tail the naive product underflows to 0 in float32 (log 0 = -inf); log space does not
    z = torch.tensor([[-60.0, -60.0]])
    log_ctcvr = torch.nn.functional.logsigmoid(z).sum(dim=1)
    assert torch.log(torch.sigmoid(z[:, 0]) * torch.sigmoid(z[:, 1])).isinf().all()
    assert torch.isfinite(log_ctcvr).all() and log_ctcvr.item() == pytest.approx(-120.0)
    assert torch.isfinite(log1mexp(log_ctcvr)).all()
    one = dataclasses.replace(out, logits=torch.tensor([[-60.0, 0.0, -60.0]]),
                              log_probs=torch.stack([torch.tensor([-60.0]), log_ctcvr,
                                                     torch.tensor([-60.0])], dim=1))
    loss = objective(one, torch.tensor([[1.0, 1.0]]))
    assert torch.isfinite(loss) and loss.item() > 100


def test_a_masked_heads_loss_over_ranks_equals_one_process_with_one_kept_row(spec_factory) -> None:
    """Two ranks whose global batch keeps one row of a masked head: the ranks' mean count 0.5 was clamped to 1,
    halving that head's loss (and gradient) against one process (helper's distributed sweep)."""
    spec = dataclasses.replace(spec_factory(2), labels=("click", "conv"))
    tasks = build_tasks(heads_of(object(), spec), spec, TrainConfig(tasks={"conv": TaskConfig(mask="click")}))
    logits = torch.tensor([[0.5, 2.0], [-1.0, -3.0], [0.2, 1.0], [0.3, -0.4]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])     # one clicked row: row 0
    one = Objective(tasks, torch.device("cpu")).per_head(as_output(logits), labels)
    shares = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    counts = [targets(y, tasks)[1].sum(dim=0) for _, y in shares]
    ranks = []
    for x, y in shares:          # DDP averages the ranks' gradients: their losses' mean is the loss
        obj = Objective(tasks, torch.device("cpu"))
        obj.count_over_ranks(lambda c: (counts[0] + counts[1]) / 2, 2)
        ranks.append(obj.per_head(as_output(x), y))
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, one)


def test_masks_exclude_rows_from_loss_and_metrics(spec_factory) -> None:
    spec = dataclasses.replace(spec_factory(2), labels=("click", "conv"))
    cfg = TrainConfig(tasks={"conv": TaskConfig(mask="click")})
    tasks = build_tasks(heads_of(object(), spec), spec, cfg)
    objective = Objective(tasks, torch.device("cpu"))
    out = as_output(torch.tensor([[0.5, 2.0], [-1.0, -3.0], [0.2, 1.0]]))
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    flipped = labels.clone()
    flipped[1, 1] = 1.0                                           # row 1 is not clicked: its conv is masked
    torch.testing.assert_close(objective(out, labels), objective(out, flipped))
    unmasked = Objective(build_tasks(heads_of(object(), spec), spec, TrainConfig()), torch.device("cpu"))
    assert not torch.equal(unmasked(out, labels), unmasked(out, flipped))
    y = masked_targets(labels, tasks).numpy()
    assert np.isnan(y[1, 1]) and not np.isnan(y[:, 0]).any()
    p = torch.sigmoid(out.logits).numpy()
    m = compute_metrics(y, p, ["click", "conv"])
    assert m["pos_rate.conv"] == pytest.approx(0.5)              # 2 clicked rows, one converted
    assert m["auc.conv"] == pytest.approx(1.0)


def test_clear_errors(spec_factory) -> None:
    with pytest.raises(SchemaError, match="at least 2 labels"):
        build(spec_factory(1), "mmoe", SMALL)
    spec = dataclasses.replace(spec_factory(2), labels=("click", "conv"))
    heads = heads_of(object(), spec)
    with pytest.raises(ConfigError, match=r"train.tasks names \['clik'\]") as err:
        build_tasks(heads, spec, TrainConfig(tasks={"clik": TaskConfig(weight=1.0)}))
    assert "click, conv" in str(err.value)
    with pytest.raises(ConfigError, match="mask names label 'clicked'"):
        build_tasks(heads, spec, TrainConfig(tasks={"conv": TaskConfig(mask="clicked")}))
    with pytest.raises(SchemaError, match="needs label 'nope'"):
        build(spec, "esmm", {"conversion_label": "nope", "backbone_params": SMALL})
    for name in ("mmoe", "ple"):       # experts of no layer are the identity: the gates mixed copies of the input
        with pytest.raises(ConfigError, match="every expert passes its input through unchanged"):
            build(spec, name, {**SMALL, "hidden_units": []})
    # one label as click and conversion made a cvr head of all positives, without a word
    for keys in ({"click_label": "conv", "conversion_label": "conv"},
                 {"click_label": "click", "conversion_label": "click"}):
        with pytest.raises(ConfigError, match="set as both the click and the conversion label"):
            build(spec, "esmm", {**keys, "backbone_params": SMALL})
    alone = build(spec, "esmm", {"click_label": "conv", "backbone_params": SMALL})     # the other label converts
    assert [h.labels for h in alone.heads] == [("conv",), ("conv", "click"), ("click",)]
    with pytest.raises(ConfigError, match="weight 0"):
        build_tasks(heads, spec, TrainConfig(tasks={"click": TaskConfig(weight=0.0),
                                                    "conv": TaskConfig(weight=0.0)}))
    for key in ("weight", "pos_weight", "metric_weight", "focal_weight", "focal_gamma"):   # inf: a NaN loss or metric
        with pytest.raises(ConfigError, match=rf"train.tasks.<head>.{key}"):
            TaskConfig(**{key: math.inf})


def test_wide_logits_reach_only_the_named_heads(spec_factory, batch_factory) -> None:
    spec = nested_spec(spec_factory)
    keys = {**SMALL, "composer_width": 8, "adapter_units": [8], "expert_units": [8], "wide_heads": ["click"]}
    model = build(spec, "deepfm_mmoe", keys)
    assert model.wide_mask.tolist() == [1.0, 0.0]
    batch = nested_batch(spec, batch_factory)
    model.eval()
    with torch.no_grad():
        before = model(batch).logits
        model.fm_scale.add_(5.0)                                   # moves the FM term of every head ...
        after = model(batch).logits
    assert not torch.allclose(before[:, 0], after[:, 0])
    torch.testing.assert_close(before[:, 1], after[:, 1])        # ... but only click's logit carries it
    with pytest.raises(ConfigError, match="wide_heads"):
        build(spec, "deepfm_mmoe", {**keys, "wide_heads": ["ctr"]})


def test_pos_weight_clip_schedule_at_its_milestones() -> None:
    ms = ((0, 300.0), (8000, 30.0))
    assert [clip_at(s, ms, "piecewise") for s in (0, 7999, 8000, 10**6)] == [300.0, 300.0, 30.0, 30.0]
    assert clip_at(4000, ms, "linear") == pytest.approx(165.0)
    assert clip_at(9000, ms, "linear") == 30.0 and clip_at(5, (), "linear") == math.inf
    assert clip_at(5, ((10, 3.0),), "piecewise") == math.inf          # no clip before the first milestone
    spec = dataclasses.replace(make_two_labels(), labels=("click", "conv"))
    tasks = build_tasks(heads_of(object(), spec), spec, TrainConfig(pos_weight=(24.7, 4800.0)))
    obj = Objective(tasks, torch.device("cpu"), ms, "piecewise")
    for step, want in ((0, [24.7, 300.0]), (7999, [24.7, 300.0]), (8000, [24.7, 30.0])):
        obj.at_step(step)
        torch.testing.assert_close(obj.pos_weight, torch.tensor(want))
    ramp = Objective(tasks, torch.device("cpu"), ms, "linear")
    for step, want in ((0, [24.7, 300.0]), (4000, [24.7, 165.0]), (6000, [24.7, 97.5]), (10**6, [24.7, 30.0])):
        ramp.at_step(step)      # the ramp's clip, computed on the tensor's device each step it moves
        assert ramp.pos_weight.tolist() == [float(torch.tensor(w, dtype=torch.float32)) for w in want]


def test_focal_term_starts_at_its_step_and_matches_the_formula() -> None:
    spec = make_two_labels()
    cfg = TrainConfig(tasks={"y1": TaskConfig(focal_weight=0.5, focal_gamma=2.0, focal_start=3)})
    obj = Objective(build_tasks(heads_of(object(), spec), spec, cfg), torch.device("cpu"))
    logits = torch.tensor([[0.3, 1.0], [-0.2, -2.0], [0.1, 0.5]], requires_grad=True)
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    out = as_output(logits)
    obj.at_step(2)
    plain = obj(out, labels)
    obj.at_step(3)
    with_focal = obj(out, labels)
    p = torch.sigmoid(logits[:, 1].detach())
    p_t = torch.where(labels[:, 1] > 0.5, p, 1 - p)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1].detach(), labels[:, 1],
                                                               reduction="none")
    torch.testing.assert_close(with_focal - plain, 0.5 * ((1 - p_t) ** 2 * bce).mean())


def make_two_labels():
    from ctrpipe.features import FeatureSpec, FieldSpec

    return FeatureSpec(numeric=("I1",), categorical=(FieldSpec("C1", "categorical", 5),), labels=("y0", "y1"),
                       label_rates=(0.3, 0.1))
