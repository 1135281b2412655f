"""`ctrpipe report` end to end on real runs: the page and its figures, the leaderboard, reliability bins,
errors with what / where / fix, and the atomic replacement of an earlier report."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli
from cli_helpers import sets as _sets
from matplotlib.figure import Figure
from PIL import Image
from report_setup import Runs
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.report.leaderboard import COLUMNS, build_leaderboard
from ctrpipe.report.rundata import load_run
from ctrpipe.report.stats import reliability_bins
from ctrpipe.train.checkpoint import load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[2]
# small and fast, as the session's parquet_mmoe (conftest.py)
PARQUET_FAST = ["loader.batch_size=128", "loader.eval_batch_size=512", "train.log_every=2",
                "infer.calibration.method=none", "train.epochs=2", "train.evals_per_epoch=2"]


def report(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["report", *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


class Images(HTMLParser):
    """src, width and height of every <img> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append({k: v or "" for k, v in attrs})


def page_images(index: Path) -> list[dict[str, str]]:
    parser = Images()
    parser.feed(index.read_text())
    return parser.images


def col(key: str) -> int:
    return [c.key for c in COLUMNS].index(key)


def test_page_figures_and_leaderboard(runs: Runs, full_report: tuple[Path, str]) -> None:
    out, text = full_report
    assert "not ranked: parquet_mmoe" in text and "another cache" in text
    assert sorted(p.name for p in out.iterdir()) == ["figures", "index.html", "report.json"]
    assert not list(out.parent.glob(".report*"))                 # no temp or old folder left beside it

    images = page_images(out / "index.html")
    assert len(images) == len(list((out / "figures").iterdir()))
    for img in images:                                           # every figure is a whole PNG of the stated size
        with Image.open(out / img["src"]) as im:
            assert im.format == "PNG" and im.size == (int(img["width"]), int(img["height"])), img
            im.load()
    names = {img["src"].removeprefix("figures/") for img in images}
    for i in range(5):
        assert {f"run{i}_training.png", f"run{i}_validation.png", f"run{i}_reliability.png",
                f"run{i}_histograms.png"} <= names
    assert "all_runs.png" in names
    assert {n for n in names if "gates" in n} == {"run4_gates.png"}   # only the MMoE run has gates

    board = json.loads((out / "report.json").read_text())
    assert board["split"] == "gold" and board["baseline"] == "criteo_dnn"
    ranked = [r for r in board["runs"] if r["ranked"]]
    assert {r["name"] for r in ranked} == {"criteo_dnn", "criteo_deepfm", "criteo_dcnv2", "criteo_dnn_cv"}
    assert [r["auc"] for r in ranked] == sorted((r["auc"] for r in ranked), reverse=True)
    assert board["runs"][-1]["name"] == "parquet_mmoe" and "another cache" in board["runs"][-1]["reason"]
    best_auc = max(ranked, key=lambda r: r["auc"])
    assert "auc" in best_auc["best"]
    gold = {r.name: json.loads((r / "metrics.json").read_text())["gold"]["auc"] for r in runs.criteo}
    assert {r["name"]: r["auc"] for r in ranked if r["name"] in gold} == gold
    # costs come from metrics.json (wall_seconds; on CPU peak_host_anon_bytes: not the mapped cache's pages)
    assert all(r["peak_memory"] > 0 and r["wall_seconds"] > 0 for r in board["runs"])
    anon = {r.name: json.loads((r / "metrics.json").read_text())["peak_host_anon_bytes"] for r in runs.criteo}
    assert {r["name"]: r["peak_memory"] for r in ranked if r["name"] in anon} == anon


def test_leaderboard_deltas_best_and_parameters(runs: Runs) -> None:
    data = [load_run(p) for p in runs.criteo]
    board = build_leaderboard(data, baseline="criteo_deepfm")
    base = next(e for e in board.entries if e.run.name == "criteo_deepfm")
    for i, entry in enumerate(board.entries):
        if entry is base:
            assert board.delta(i, col("auc")) is None
            continue
        assert board.delta(i, col("auc")) == pytest.approx(entry.values[col("auc")] - base.values[col("auc")])
        assert board.delta(i, col("parameters")) == pytest.approx(
            entry.values[col("parameters")] / base.values[col("parameters")])
    calib = [abs(e.values[col("calibration")] - 1) for e in board.entries]
    assert board.best[col("calibration")] == {int(np.argmin(calib))}
    for run in data:   # the count of the rebuilt model, not of the stored (touched) embedding rows
        model = model_from_checkpoint(load_checkpoint(run.path / "ckpt_best.pt"))
        assert run.resources.parameters == sum(p.numel() for p in model.parameters())


def test_a_run_recorded_before_the_anonymous_peak_shows_its_rss_labelled(runs: Runs, tmp_path: Path) -> None:
    """Older metrics.json files hold only the peak RSS (mapped cache pages included): shown as "host RSS", not
    as the anonymous peak newer runs record."""
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    metrics = json.loads((run / "metrics.json").read_text())
    new = load_run(run).resources
    assert (new.peak_memory_bytes, new.peak_memory_where) == (metrics["peak_host_anon_bytes"], "host")
    del metrics["peak_host_anon_bytes"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    old = load_run(run).resources
    assert (old.peak_memory_bytes, old.peak_memory_where) == (metrics["peak_host_memory_bytes"], "host RSS")


def test_a_resumed_runs_partial_costs_are_not_ranked(runs: Runs, tmp_path: Path) -> None:
    """A resumed run records the wall time and peak memory of its last process only: the board ranked a
    run interrupted and resumed as faster than the same run in one go."""
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "resumed": True}))
    resumed = load_run(run)
    assert resumed.resources.wall_seconds is None and resumed.resources.peak_memory_bytes is None
    assert resumed.resources.train_seconds == metrics["train_seconds"] and "last process" in resumed.resources.partial
    board = build_leaderboard([load_run(runs.criteo[1]), resumed])
    entry = next(e for e in board.entries if e.run is resumed)
    assert entry.values[col("wall_seconds")] is None and entry.values[col("peak_memory")] is None


def test_report_json_names_out_of_fold_rows(runs: Runs) -> None:
    """K-fold runs on validation are ranked on their out-of-fold rows: report.json said "split": "val"."""
    from ctrpipe.report.build import _summary

    kfold = load_run(runs.kfold)
    board = build_leaderboard([dataclasses.replace(kfold, gold=None)])
    assert _summary(board)["split"] == "oof" and _summary(board)["rows"] == "out-of-fold rows"
    assert _summary(build_leaderboard([load_run(runs.criteo[0])]))["split"] == "gold"


def test_validation_split_when_a_run_lacks_gold(runs: Runs) -> None:
    dnn, deepfm, dcnv2 = (load_run(p) for p in runs.criteo)
    kfold = load_run(runs.kfold)
    board = build_leaderboard([dnn, dataclasses.replace(deepfm, gold=None), dcnv2, kfold])
    assert board.split == "val" and board.split_title == "validation split"
    unranked = [e for e in board.entries if not e.comparable]
    assert [e.run.name for e in unranked] == ["criteo_dnn_cv"] and "out-of-fold" in unranked[0].reason
    assert next(e for e in board.entries if e.run is dnn).values[col("auc")] == dnn.val["auc"]


@pytest.fixture(scope="module")
def mmoe_variants(runs: Runs) -> dict[str, Path]:
    """Runs on parquet_mmoe's cache (heads clicked and converted, converted on clicked rows only), by what
    their primary metric is: the same mean (shared_bottom: another model, the same train.tasks), other heads
    (ESMM: ctr, ctcvr, cvr), converted on every row, and clicked weighted 3 in the mean."""
    cache, out = runs.root / "shards" / "parquet", runs.root / "variant_runs"
    plans = {"same": ("parquet_shared_bottom.yaml", ["model.hidden_units=[32]", "model.tower_units=[8]"]),
             "heads": ("parquet_esmm.yaml", ["model.backbone_params.hidden_units=[32]"]),
             "mask": ("parquet_mmoe.yaml", ["model.hidden_units=[32]", "exp_name=parquet_mmoe_every_row",
                                            "train.tasks.converted.mask="]),
             "weight": ("parquet_mmoe.yaml", ["model.hidden_units=[32]", "exp_name=parquet_mmoe_click_weighted",
                                              "train.tasks.clicked.metric_weight=3"])}
    for cfg, extra in plans.values():
        run_cli("train", "--cfg", str(REPO / "cfgs" / cfg), "--shards", str(cache), "--runs", str(out), "-q",
                *_sets([*PARQUET_FAST, *extra]))
    names = {"same": "parquet_shared_bottom", "heads": "parquet_esmm", "mask": "parquet_mmoe_every_row",
             "weight": "parquet_mmoe_click_weighted"}
    return {k: out / n for k, n in names.items()}


def test_runs_with_other_heads_masks_or_metric_weights_are_not_ranked(runs: Runs, mmoe_variants: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    mmoe = load_run(runs.mmoe)
    variants = {k: load_run(p) for k, p in mmoe_variants.items()}
    assert len({r.manifest_fingerprint for r in [mmoe, *variants.values()]}) == 1      # one cache
    board = build_leaderboard([mmoe, *variants.values()])
    assert board.split == "gold"                  # every run has gold metrics
    entry = {e.run.name: e for e in board.entries}
    assert [e.run.name for e in board.entries if e.comparable] \
        == sorted(["parquet_mmoe", "parquet_shared_bottom"], key=lambda n: -entry[n].values[col("auc")])
    assert entry["parquet_esmm"].reason \
        == "other heads: ['ctr', 'ctcvr', 'cvr'], the baseline's ['clicked', 'converted']"
    assert entry["parquet_mmoe_every_row"].reason == ("other head settings: train.tasks.converted.mask none, "
                                                      "the baseline's clicked")
    assert entry["parquet_mmoe_click_weighted"].reason == ("other head settings: train.tasks.clicked.metric_weight "
                                                           "3, the baseline's 1")
    # weights are shares of the mean: (2, 2) weighs as (1, 1)
    from ctrpipe.report.rundata import HeadSettings
    doubled = dataclasses.replace(variants["same"], head_settings={
        h: HeadSettings(mask=v.mask, metric_weight=2 * (v.metric_weight or 0))
        for h, v in variants["same"].head_settings.items()})
    assert all(e.comparable for e in build_leaderboard([mmoe, doubled]).entries)
    # the other baseline: the reasons name its values
    flipped = {e.run.name: e for e in build_leaderboard([variants["mask"], mmoe]).entries}
    assert flipped["parquet_mmoe"].reason == ("other head settings: train.tasks.converted.mask clicked, the "
                                              "baseline's none")

    code, text = report(str(runs.mmoe), str(mmoe_variants["heads"]), str(mmoe_variants["weight"]), "--out",
                        str(tmp_path / "rep"), "--strict")
    assert code == 1 and "parquet_esmm (other heads:" in text and "train.tasks.clicked.metric_weight 3" in text
    assert str(mmoe_variants["heads"]) in text and "fix: train them like the baseline" in text
    assert not (tmp_path / "rep").exists()


def test_a_multi_task_runs_calibration_is_its_worst_heads(runs: Runs) -> None:
    """The board showed the all-heads ratio, which pools the heads' predictions and labels: an MMoE whose heads
    were 13% over and 13% under read 1.000 and got the best-value star."""
    mmoe = load_run(runs.mmoe)
    board = build_leaderboard([mmoe])
    heads = {h: mmoe.gold[f"calibration.{h}"] for h in mmoe.heads}          # type: ignore[index]
    worst = max(heads.values(), key=lambda v: abs(math.log(v)))
    column = [c.key for c in COLUMNS].index("calibration")
    assert board.entries[0].values[column] == worst != mmoe.gold["calibration"]    # type: ignore[index]


def test_strict_refuses_runs_of_another_cache(runs: Runs, tmp_path: Path) -> None:
    code, text = report(str(runs.criteo[0]), str(runs.mmoe), "--out", str(tmp_path / "rep"), "--strict")
    assert code == 1
    fp = load_run(runs.mmoe).manifest_fingerprint[:12]
    assert "parquet_mmoe" in text and fp in text and str(runs.mmoe) in text and "fix:" in text
    assert not (tmp_path / "rep").exists()


def test_reliability_bins(runs: Runs) -> None:
    b = reliability_bins([0.1, 0.2, 0.6, 0.8], [0, 1, 1, 1], n_bins=2, min_rows_per_bin=1)   # the docstring's
    assert b.count.tolist() == [2, 2] and np.allclose(b.mean_pred, [0.15, 0.7]) and b.pos_rate.tolist() == [0.5, 1]
    assert np.allclose(b.lo, [0.1, 0.6]) and np.allclose(b.hi, [0.2, 0.8])
    tied = reliability_bins(np.r_[np.full(90, 0.3), np.linspace(0.4, 0.9, 30)], np.zeros(120))
    assert tied.count.sum() == 120 and tied.count[0] == 90            # equal predictions share one bin

    run = load_run(runs.criteo[0])
    (head,) = run.predictions
    b = reliability_bins(head.probs, head.labels)
    assert b.count.sum() == head.probs.size and np.all(np.diff(b.mean_pred) > 0)
    # the bins add up to the run's own validation metrics
    assert np.sum(b.count * b.mean_pred) / b.count.sum() == pytest.approx(run.val["mean_pred"], rel=1e-5)
    assert np.sum(b.count * b.pos_rate) / b.count.sum() == pytest.approx(run.val["pos_rate"], rel=1e-9)


def test_errors_name_the_run_and_the_fix(runs: Runs, tmp_path: Path) -> None:
    out = str(tmp_path / "rep")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = report(str(empty), "--out", out)
    assert code == 1 and f"{empty}: {empty} is not a run directory (no config.json)" in text
    assert "fix: pass a folder written by `ctrpipe train`" in text

    code, text = report(str(tmp_path / "nowhere"), "--out", out)     # was 'is not a directory'
    assert code == 1 and "nowhere does not exist" in text

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs.criteo[0] / "config.json", unfinished / "config.json")
    code, text = report(str(unfinished), "--out", out)
    assert code == 1 and "has not finished: it has no metrics.json" in text and "--resume" in text

    code, text = report(str(runs.criteo[0]), "--out", out, "--baseline", "nope")
    assert code == 1 and "--baseline 'nope'" in text and "fix: pass one of: criteo_dnn" in text

    code, text = report(str(runs.criteo[0]), str(runs.criteo[0]), "--out", out)
    assert code == 1 and "is given twice" in text

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, text = report(str(runs.criteo[0]), "--out", str(foreign))
    assert code == 1 and "not a ctrpipe report" in text
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    code, text = report(str(runs.criteo[0]), "--out", str(foreign / "notes.txt" / "sub"))   # named a temp folder
    assert code == 1 and f"goes through {foreign / 'notes.txt'}, which is a file" in text and "incomplete" not in text
    if Path("/proc/self").is_dir():         # a folder no one may create entries in
        code, text = report(str(runs.criteo[0]), "--out", "/proc/ctrpipe-report")
        assert code == 1 and "cannot write in /proc, the folder of --out" in text and "incomplete" not in text
    assert not (tmp_path / "rep").exists()


def test_a_new_report_replaces_the_old_one_whole(runs: Runs, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rep"
    assert report(str(runs.criteo[0]), "--out", str(out))[0] == 0
    old_board = (out / "report.json").read_bytes()
    (out / "figures" / "stale.png").write_text("from the old report")

    # the disk fills while the third figure is written (matplotlib is the boundary patched, not ctrpipe)
    calls = {"n": 0}
    real_savefig = Figure.savefig

    def savefig(self: Figure, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    code, text = report(str(runs.criteo[2]), "--out", str(out))
    assert code == 1 and "No space left on device" in text and "an older report" in text
    assert (out / "report.json").read_bytes() == old_board and (out / "figures" / "stale.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]     # the temp folder is gone
    monkeypatch.undo()

    crashed = tmp_path / ".rep.incomplete-4194305"        # left by a report whose process died (no such pid)
    (crashed / "figures").mkdir(parents=True)
    assert report(str(runs.criteo[2]), "--out", str(out))[0] == 0
    assert not (out / "figures" / "stale.png").exists()
    assert json.loads((out / "report.json").read_text())["baseline"] == "criteo_dcnv2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_a_report_never_deletes_a_run_or_a_users_file_in_its_folder(runs: Runs, tmp_path: Path) -> None:
    """A run copied into an earlier report's folder, given to a new report to that folder, was deleted with
    the old report (checkpoints included), and so was any file of the user's beside it (helper's sweep)."""
    out = tmp_path / "rep"
    assert report(str(runs.criteo[0]), "--out", str(out))[0] == 0
    old_page = (out / "index.html").read_bytes()
    shutil.copytree(runs.criteo[0], out / "dnn_copy")
    code, text = report(str(out / "dnn_copy"), str(runs.criteo[1]), "--out", str(out))
    assert code == 1 and "is inside --out" in text, text
    assert (out / "dnn_copy" / "metrics.json").is_file() and (out / "index.html").read_bytes() == old_page
    code, text = report(str(runs.criteo[1]), "--out", str(out))
    assert code == 1 and "'dnn_copy'" in text and "move it out of the report folder" in text, text
    assert (out / "dnn_copy" / "metrics.json").is_file() and (out / "index.html").read_bytes() == old_page
    shutil.rmtree(out / "dnn_copy")
    (out / ".DS_Store").write_text("a file browser's")            # litter, not the user's: replaced with it
    assert report(str(runs.criteo[1]), "--out", str(out))[0] == 0
    (out / "notes.md").write_text("mine")
    code, text = report(str(runs.criteo[1]), "--out", str(out))
    assert code == 1 and "'notes.md'" in text and (out / "notes.md").read_text() == "mine"


def test_runs_of_one_name_in_folders_of_one_name_are_told_apart(runs: Runs, tmp_path: Path) -> None:
    """A/runs/dnn and B/runs/dnn were both 'runs/dnn': both rows linked to the second run's section and
    --baseline runs/dnn took the first without a word."""
    for side in ("A", "B"):
        shutil.copytree(runs.criteo[0], tmp_path / side / "runs" / "criteo_dnn")
    code, text = report(str(tmp_path / "A" / "runs" / "criteo_dnn"), str(tmp_path / "B" / "runs" / "criteo_dnn"),
                        "--out", str(tmp_path / "rep"))
    assert code == 0, text
    names = [r["name"] for r in json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]]
    assert names == ["A/runs/criteo_dnn", "B/runs/criteo_dnn"]
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("href='#run-0'") >= 1 and page.count("href='#run-1'") >= 1


def test_a_run_and_its_copy_in_one_folder_are_told_apart(runs: Runs, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """runs/dnn and its copy runs/dnn_2 share their exp_name and parent: both were named '//tmp/.../dnn' (the
    root's '/' joined in) and linked to one section; --out . crashed with a traceback (helper's report sweep)."""
    folder = tmp_path / "runs"
    for name in ("criteo_dnn", "criteo_dnn_2"):
        shutil.copytree(runs.criteo[0], folder / name)
    code, text = report(str(folder / "criteo_dnn"), str(folder / "criteo_dnn_2"), "--out", str(tmp_path / "rep"))
    assert code == 0, text
    names = [r["name"] for r in json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]]
    assert names == ["criteo_dnn", "criteo_dnn_2"]
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.count("href='#run-0'") >= 1 and page.count("href='#run-1'") >= 1
    monkeypatch.chdir(tmp_path / "rep")
    code, text = report(str(folder / "criteo_dnn"), "--out", ".")
    assert code == 1 and "is the current folder" in text and "Traceback" not in text, text
    assert (tmp_path / "rep" / "index.html").read_text() == page          # the old report stays


def test_damaged_predictions_are_a_clear_error(runs: Runs, tmp_path: Path) -> None:
    """NaN logits crashed the report in matplotlib with a traceback."""
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    with np.load(run / "val_predictions.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"][:5, 0] = np.nan
    np.savez(run / "val_predictions.npz", **arrays)
    code, text = report(str(run), "--out", str(tmp_path / "rep"))
    assert code == 1 and "5 predictions are not finite" in text and "retrain the run" in text


@pytest.mark.parametrize("log", ["train_log.csv", "diagnostics.csv"])
def test_an_emptied_log_is_a_clear_error(runs: Runs, tmp_path: Path, log: str) -> None:
    """An empty train_log.csv (a disk that filled, a truncating copy) ended the report in a polars traceback."""
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    (run / log).write_text("")
    code, text = report(str(run), "--out", str(tmp_path / "rep"))
    assert code == 1 and f"cannot read {log}" in text and "retrain it" in text, text
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(("log", "cut"), [("diagnostics.csv", "step,nam\n"), ("train_log.csv", 30),
                                         ("train_log.csv", -5)])
def test_a_log_cut_in_its_header_or_last_line_is_a_clear_error(runs: Runs, tmp_path: Path, log: str,
                                                                cut: str | int) -> None:
    """diagnostics.csv cut inside its header ended in a polars traceback; train_log.csv cut there or in its last
    line was read as it was, the validation figure silently gone (helper's report sweep)."""
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    text_now = (run / log).read_text()
    (run / log).write_text(cut if isinstance(cut, str) else text_now[:cut] + ("\n" if cut > 0 else ""))
    code, text = report(str(run), "--out", str(tmp_path / "rep"))
    assert code == 1 and f"cannot read {log}" in text and "retrain it" in text and "Traceback" not in text, text
    assert ("last line is cut short" if cut == -5 else "header lacks") in text


def test_a_run_without_a_numeric_auc_is_listed_unranked(runs: Runs, tmp_path: Path) -> None:
    """A NaN or text val auc in metrics.json was ranked (second, AUC 'n/a') without a word."""
    paths = []
    for name, value in (("nan_auc", float("nan")), ("text_auc", "0.61")):
        run = tmp_path / name
        shutil.copytree(runs.criteo[0], run)
        metrics = json.loads((run / "metrics.json").read_text())
        for split in ("val", "gold"):           # the board ranks on gold when every run has it
            metrics[split]["auc"] = value
        (run / "metrics.json").write_text(json.dumps(metrics))
        paths.append(str(run))
    code, text = report(str(runs.criteo[0]), *paths, "--out", str(tmp_path / "rep"))
    assert code == 0, text
    assert "not ranked: nan_auc: metrics.json's gold auc is nan" in text, text
    assert "not ranked: text_auc: metrics.json holds no gold auc" in text, text
    board = json.loads((tmp_path / "rep" / "report.json").read_text())
    ranked = [r["name"] for r in board["runs"] if r["ranked"]]
    assert ranked == ["criteo_dnn"], board["runs"]
    code, text = report(str(runs.criteo[0]), *paths, "--out", str(tmp_path / "rep2"), "--strict")
    assert code == 1 and "run nan_auc cannot be ranked: metrics.json's gold auc is nan" in text, text
    assert "train them like the baseline" not in text               # it was: the wrong fix
    code, text = report(*paths, str(runs.criteo[0]), "--out", str(tmp_path / "rep3"))      # nan_auc first
    assert code == 1 and "the baseline nan_auc cannot be ranked" in text and "--baseline" in text, text
    assert report(*paths, str(runs.criteo[0]), "--out", str(tmp_path / "rep3"), "--baseline", "criteo_dnn")[0] == 0


def test_pickled_predictions_are_not_met_with_numpys_advice(runs: Runs, tmp_path: Path) -> None:
    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    np.save(run / "val_predictions.npz", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (run / "val_predictions.npz.npy").rename(run / "val_predictions.npz")
    code, text = report(str(run), "--out", str(tmp_path / "rep"))
    assert code == 1 and "a pickled object, not arrays" in text and "allow_pickle" not in text, text


def test_a_curve_of_one_logged_point_is_drawn(runs: Runs, tmp_path: Path) -> None:
    """A short run logs its loss once; a line through one point drew nothing, and the figure looked empty."""
    from ctrpipe.report.figures import training_figure

    run = tmp_path / "criteo_dnn"
    shutil.copytree(runs.criteo[0], run)
    log = (run / "train_log.csv").read_text().splitlines()
    (run / "train_log.csv").write_text("\n".join([log[0], next(r for r in log[1:] if r.split(",")[3])]) + "\n")
    fig = training_figure(load_run(run))
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if len(ln.get_xdata()) == 1]
    assert lines and all(ln.get_marker() == "o" for ln in lines)


def test_runs_of_a_cache_whose_gold_split_has_one_class_rank_on_validation(runs: Runs, tmp_path: Path) -> None:
    """(a helper's sweep) a gold split of one class gives every run of the cache a gold AUC of null: the report
    refused the baseline, with a fix (another --baseline) that could not work, as every run had the same."""
    paths = []
    for src in runs.criteo[:2]:
        run = tmp_path / src.name
        shutil.copytree(src, run)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["gold"]["auc"] = None                      # as training writes a NaN AUC
        (run / "metrics.json").write_text(json.dumps(metrics))
        paths.append(str(run))
    code, text = report(*paths, "--out", str(tmp_path / "rep"))
    assert code == 0, text
    board = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert board["split"] == "val" and all(r["ranked"] for r in board["runs"]), board


@pytest.mark.parametrize(("key", "value", "said"), [
    ("cv", [3], "metrics.json's cv is [3], not a mapping holding n_splits"),
    ("cv", 3, "metrics.json's cv is 3, not a mapping holding n_splits"),
    ("cv", {"n_splits": "abc"}, "metrics.json's cv.n_splits is 'abc', not a number of folds"),
    ("heads", "label", "metrics.json's heads are 'label', not a list of head names"),
])
def test_a_damaged_metrics_json_is_named_not_a_traceback(runs: Runs, tmp_path: Path, key: str, value: object,
                                                         said: str) -> None:
    """(a helper's sweep) a list for cv or text for its n_splits ended in tracebacks; text for heads read as one
    head per character."""
    run = tmp_path / "run"
    shutil.copytree(runs.criteo[0], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics[key] = value
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, text = report(str(run), "--out", str(tmp_path / "rep"))
    text = " ".join(text.split())
    assert code == 1 and said in text and "the file is damaged" in text and "Traceback" not in text, text


def test_unreadable_costs_are_none_and_report_json_stays_json(runs: Runs, tmp_path: Path) -> None:
    """(a helper's sweep) an infinite samples/s went into report.json as Infinity (not JSON), and a peak of
    -5 bytes was ranked best."""
    run = tmp_path / "odd"
    shutil.copytree(runs.criteo[0], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.update(samples_per_s=float("inf"), peak_host_anon_bytes=-5, wall_seconds=float("nan"))
    (run / "metrics.json").write_text(json.dumps(metrics))
    resources = load_run(run).resources
    assert resources.samples_per_s is None and resources.wall_seconds is None
    assert resources.peak_memory_where == "host RSS"          # the anonymous peak is unreadable: the RSS instead
    code, text = report(str(runs.criteo[1]), str(run), "--out", str(tmp_path / "rep"))
    assert code == 0, text
    json.loads((tmp_path / "rep" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))


def test_a_gpu_runs_peak_is_not_ranked_against_a_host_peak(runs: Runs, tmp_path: Path) -> None:
    """(a helper's sweep) a GPU run's peak device memory was starred best over a CPU run's host peak, with a
    ratio between them."""
    gpu = tmp_path / "gpu_run"
    shutil.copytree(runs.criteo[1], gpu)
    metrics = json.loads((gpu / "metrics.json").read_text())
    metrics["peak_device_memory_bytes"] = 1000
    metrics["exp_name"] = "gpu_run"
    (gpu / "metrics.json").write_text(json.dumps(metrics))
    board = build_leaderboard([load_run(runs.criteo[0]), load_run(gpu), load_run(runs.criteo[2])])
    peak = col("peak_memory")
    i = next(k for k, e in enumerate(board.entries) if e.run.name == "gpu_run")
    assert board.entries[i].run.resources.peak_memory_where == "GPU"
    assert i not in board.best[peak] and board.delta(i, peak) is None
    assert board.best[peak]                 # the two host peaks are still compared
    # (a review) with the GPU run as the baseline, the host runs are still compared with each other
    board = build_leaderboard([load_run(gpu), load_run(runs.criteo[0]), load_run(runs.criteo[2])])
    hosts = {k for k, e in enumerate(board.entries) if e.run.resources.peak_memory_where == "host"}
    assert len(hosts) == 2 and board.best[peak] and board.best[peak] <= hosts
