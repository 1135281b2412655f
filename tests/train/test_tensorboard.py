"""TensorBoard events of a run, read back with tensorboard's own reader: every scalar of train_log.csv and
diagnostics.csv (loss, lr, samples/s, each metric overall and per head, gate usage) at the same steps and
values, for a single-task Criteo run and a multi-task MMoE run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from train_setup import CRITEO_CFG, FAST, REPO
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.errors import TrainingError
from ctrpipe.train.metrics import METRIC_NAMES
from ctrpipe.train.rundir import RunLog

runner = CliRunner()


def cli(*args: str) -> None:
    res = runner.invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output


def sets(*values: str) -> list[str]:
    return [x for s in values for x in ("--set", s)]


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every scalar event under run/tb."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})   # 0: keep every event
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def csv_scalars(run: Path) -> dict[str, dict[int, float]]:
    """The same tag -> {step: value} map, built from train_log.csv and diagnostics.csv."""
    out: dict[str, dict[int, float]] = {}
    for row in csv.DictReader((run / "train_log.csv").open()):
        step = int(row["step"])
        for col, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("samples_per_s", "train/samples_per_s"),
                         *((f"val_{m}", f"val/{m}") for m in METRIC_NAMES)]:
            if row[col]:
                out.setdefault(tag, {})[step] = float(row[col])
    for row in csv.DictReader((run / "diagnostics.csv").open()):
        out.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return out


def assert_same(events: dict[str, dict[int, float]], logged: dict[str, dict[int, float]]) -> None:
    assert sorted(events) == sorted(logged)
    for tag, by_step in logged.items():
        assert sorted(events[tag]) == sorted(by_step), tag
        for step, value in by_step.items():
            # the CSVs round (lr: 6 significant digits, loss and metrics: 6 decimals, samples/s: 1 decimal);
            # events hold fp32
            abs_tol = 0.051 if tag == "train/samples_per_s" else 1e-6
            assert events[tag][step] == pytest.approx(value, rel=1e-5, abs=abs_tol), (tag, step)


def test_single_task_events_match_the_csv_log(cache: Path, tmp_path: Path) -> None:
    cli("train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(tmp_path), "-q",
        *sets(*FAST, "train.epochs=2", "train.evals_per_epoch=2"))
    run = tmp_path / "criteo"
    events = scalars(run)
    assert_same(events, csv_scalars(run))
    for tag in ("train/loss", "train/lr", "train/samples_per_s", *(f"val/{m}" for m in METRIC_NAMES)):
        assert tag in events, tag
    assert len(events["val/auc"]) == 4                    # 2 epochs x 2 evaluations
    assert len(events["train/loss"]) >= 4 and all(v > 0 for v in events["train/samples_per_s"].values())


def test_multitask_events_have_every_head_metric_and_gate_usage(tmp_path: Path) -> None:
    data, shards = tmp_path / "data", tmp_path / "shards"
    cli("synth", "--format", "parquet", "--rows", "1500", "--seed", "1", "--out", str(data), "-q")
    cli("shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input", str(data / "train.parquet"),
        "--out", str(shards), "-q", *sets("data.hash_bins=1000", "data.folds.n_splits=0"))
    cli("train", "--cfg", str(REPO / "cfgs" / "parquet_mmoe.yaml"), "--shards", str(shards), "--runs",
        str(tmp_path / "runs"), "-q",
        *sets("loader.batch_size=128", "loader.eval_batch_size=512", "train.log_every=3", "train.epochs=1",
              "infer.calibration.method=none", "model.hidden_units=[16]", "model.tower_units=[8]"))
    run = tmp_path / "runs" / "parquet_mmoe"
    events = scalars(run)
    assert_same(events, csv_scalars(run))
    heads = ("clicked", "converted")
    for m in METRIC_NAMES:
        assert {f"val/{m}", *(f"val/{m}.{h}" for h in heads)} <= events.keys(), m
    for h in heads:
        usage = [events[f"train/gate.{h}.e{k}"] for k in range(4)]    # 4 experts (parquet_mmoe.yaml)
        for step in usage[0]:
            assert sum(u[step] for u in usage) == pytest.approx(1.0, abs=1e-4), (h, step)
        assert f"train/gate_entropy.{h}" in events


def test_an_event_writer_that_cannot_be_created_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "tb").write_text("not a folder")
    with pytest.raises(TrainingError) as err:
        RunLog(tmp_path, append=False)
    assert str(tmp_path / "tb") in str(err.value) and "fix:" in str(err.value)


def test_a_resumed_log_replaces_the_events_after_its_checkpoint(tmp_path: Path) -> None:
    """A run killed at step 10 and resumed from its step-5 checkpoint logs steps 6.. again: the events hold
    each step once, the resumed run's values after step 5 (as train_log.csv does), in any reader."""
    first = RunLog(tmp_path, append=False)
    for step in range(1, 11):
        first.train(step, 0, 0.1, loss=float(step), samples_per_s=1.0)
    first.close()
    (old,) = (tmp_path / "tb").iterdir()
    with old.open("ab") as fh:          # a record torn by the kill
        fh.write(b"\x40\x00\x00")
    resumed = RunLog(tmp_path, append=True, through_step=5)
    for step in range(6, 9):
        resumed.train(step, 0, 0.1, loss=100.0 + step, samples_per_s=1.0)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "train_log.csv").open())] == list(range(1, 9))
    assert len(list((tmp_path / "tb").iterdir())) == 2              # no temp file left
    records = list(RawEventFileLoader(str(old)).Load())
    assert old.stat().st_size == sum(len(r) + 16 for r in records)    # no torn tail: the file is whole records
