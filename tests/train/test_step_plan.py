"""The run's step plan (train/plan.py): small data gets a run that can learn, big data is left alone."""

from __future__ import annotations

from ctrpipe.train.config import TrainConfig
from ctrpipe.train.plan import TOO_FEW_STEPS, plan_steps

CRITEO = TrainConfig(epochs=1, warmup_steps=200, evals_per_epoch=4, min_steps=300)


def test_full_criteo_epoch_is_left_alone_and_evaluated_four_times():
    plan = plan_steps(CRITEO, rows=41_256_555, batch_size=4096, per_epoch=10_072)
    assert (plan.total_steps, plan.epochs, plan.warmup_steps, plan.eval_every) == (10_072, 1, 200, 0)
    assert plan.eval_points == {2518, 5036, 7554, 10_072}
    assert plan.notes == ()
    assert [s for s in range(1, 10_073) if plan.evaluates_at(s, s)] == [2518, 5036, 7554, 10_072]


def test_a_small_sample_repeats_epochs_up_to_min_steps_and_says_so():
    # the real Criteo sample: 5,945 training rows are one 4096-row step per epoch
    plan = plan_steps(CRITEO, rows=5945, batch_size=4096, per_epoch=1)
    assert (plan.total_steps, plan.epochs) == (300, 300)
    assert plan.eval_every == 3                     # at most 100 evaluations, not one per one-step epoch
    assert plan.warmup_steps == 30                  # a tenth of the run, not 200 of its 300 steps
    assert any("train.min_steps" in n for n in plan.notes)
    assert any("warm-up shortened from 200 to 30" in n for n in plan.notes)
    assert not any(n.startswith("warning") for n in plan.notes)


def test_max_steps_caps_the_stretched_run():
    plan = plan_steps(TrainConfig(min_steps=300, max_steps=40), rows=5945, batch_size=4096, per_epoch=1)
    assert plan.total_steps == 40 and plan.evaluates_at(40, 1)
    # the warning named the epochs and rows as if they made the run short, and suggested min_steps
    warning = next(n for n in plan.notes if n.startswith("warning"))
    assert "train.max_steps=40 stops the run after 40 optimiser step(s) of the 300 planned" in warning
    assert "min_steps" not in warning


def test_max_steps_above_the_plan_says_it_adds_no_steps():
    """train.max_steps=100 on a 14-step run trained 14 steps and said nothing (helper's training sweep)."""
    plan = plan_steps(TrainConfig(epochs=2, max_steps=100), rows=3500, batch_size=500, per_epoch=7)
    assert plan.total_steps == 14
    assert any("train.max_steps=100 caps the run and adds no steps: it trains 14" in n and "min_steps=100" in n
               for n in plan.notes)
    assert not any("caps the run" in n for n in plan_steps(TrainConfig(epochs=2, max_steps=14), rows=3500,
                                                             batch_size=500, per_epoch=7).notes)
    stretched = plan_steps(TrainConfig(epochs=1, min_steps=20, max_steps=100), rows=3500, batch_size=500,
                           per_epoch=7)
    assert any("it trains 20 (train.epochs=1 of 7 step(s), stretched to train.min_steps=20)" in n
               for n in stretched.notes)


def test_a_short_run_stretched_by_min_steps_names_the_epochs_it_makes():
    """min_steps=40 over 3 epochs of 14 steps warned of '1 epoch(s)' (train.epochs) and to 'set' min_steps."""
    plan = plan_steps(TrainConfig(epochs=1, min_steps=40), rows=17936, batch_size=1024, per_epoch=18)
    warning = next(n for n in plan.notes if n.startswith("warning"))
    assert "only 40 optimiser step(s) (17,936 rows, batch 1024, 3 epoch(s))" in warning, warning
    assert "raise train.min_steps, e.g. train.min_steps=300" in warning


def test_a_run_too_short_to_learn_warns_with_the_settings_to_change():
    plan = plan_steps(TrainConfig(epochs=1, warmup_steps=200), rows=5945, batch_size=4096, per_epoch=1)
    assert plan.total_steps == 1 < TOO_FEW_STEPS
    warning = next(n for n in plan.notes if n.startswith("warning"))
    assert "only 1 optimiser step" in warning and "5,945 rows" in warning
    assert "train.min_steps=300" in warning and "loader.batch_size (e.g. 256)" in warning
    assert plan.warmup_steps == 0
    # the suggested batch is below the current one (it repeated it: 128 for a batch of 128)
    small = plan_steps(TrainConfig(epochs=1), rows=3000, batch_size=128, per_epoch=24)
    warning = next(n for n in small.notes if n.startswith("warning"))
    assert "loader.batch_size (e.g. 64)" in warning
    tiny = plan_steps(TrainConfig(epochs=1), rows=30, batch_size=1, per_epoch=30)
    assert "loader.batch_size" not in next(n for n in tiny.notes if n.startswith("warning"))


def test_eval_every_wins_over_evals_per_epoch():
    plan = plan_steps(TrainConfig(epochs=2, eval_every=7, evals_per_epoch=4), rows=10_000, batch_size=100,
                      per_epoch=100)
    assert [s for s in range(1, 201) if plan.evaluates_at(s, (s - 1) % 100 + 1)][:3] == [7, 14, 21]
    assert plan.evaluates_at(200, 100)


def test_a_focal_term_scheduled_past_the_run_warns() -> None:
    """cfgs/deepfm_mmoe_esmm.yaml's focal_start 2000 never came in a short run, without a word (helper's sweep)."""
    from ctrpipe.train.config import TaskConfig

    cfg = TrainConfig(epochs=1, tasks={"ctr": TaskConfig(focal_weight=0.1, focal_start=2000)})
    plan = plan_steps(cfg, rows=100_000, batch_size=1000, per_epoch=100)
    assert any("train.tasks.ctr.focal_start=2000 is past this run's last step (100)" in n for n in plan.notes)
    on_time = TrainConfig(epochs=30, tasks={"ctr": TaskConfig(focal_weight=0.1, focal_start=2000)})
    assert not any("focal_start" in n for n in plan_steps(on_time, rows=100_000, batch_size=1000, per_epoch=100).notes)
