"""Calibration: fits lower logloss on a miscalibrated model, keep-rate shift matches the closed form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ctrpipe.config import load_config
from ctrpipe.errors import CheckpointError
from ctrpipe.infer.calibrate import (
    Calibration,
    _loss,
    _row_weights,
    bound_warning,
    calibrate_run,
    fit_affine,
    fit_calibration,
    read_calibration,
)
from ctrpipe.infer.config import CalibrationConfig
from ctrpipe.train.metrics import logloss, weighted_logloss


def _sig(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _data(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from sigmoid(true logits); positive rate about 0.15."""
    rng = np.random.default_rng(seed)
    t = rng.normal(-2.0, 1.2, n)
    y = (rng.random(n) < _sig(t)).astype(np.float32)
    return t, y


@pytest.mark.parametrize("method", ["temperature", "bias", "temperature_bias"])
def test_calibration_lowers_logloss_of_miscalibrated_model(method: str) -> None:
    t, y = _data()
    z = 3.0 * t + 1.0                                    # overconfident and shifted
    cal = fit_calibration(z, y, CalibrationConfig(method=method))
    before, after = logloss(y, _sig(z)), logloss(y, _sig(cal.apply(z)))
    assert after < before - 0.01, (before, after)
    if method == "temperature_bias":
        # p = sigmoid(z / T + b) should recover the true map t = (z - 1) / 3
        assert cal.temperature == pytest.approx(3.0, rel=0.1)
        assert cal.bias == pytest.approx(-1.0 / 3.0, abs=0.1)
        assert after == pytest.approx(logloss(y, _sig(t)), abs=2e-3)


def test_fit_is_deterministic() -> None:
    t, y = _data(5000)
    a = fit_calibration(3 * t, y, CalibrationConfig(method="temperature_bias"))
    b = fit_calibration(3 * t, y, CalibrationConfig(method="temperature_bias"))
    assert a == b


def test_keep_rate_shift_matches_closed_form() -> None:
    w = 0.25
    cal = fit_calibration(np.zeros(4), np.array([0, 1, 0, 1]), CalibrationConfig(method="bias", keep_rate=w))
    assert cal.bias == pytest.approx(0.0, abs=1e-6) and cal.shift == pytest.approx(math.log(w), abs=1e-6)
    p_s = np.array([0.01, 0.2, 0.5, 0.9])
    z_s = np.log(p_s / (1 - p_s))
    p_true = _sig(cal.apply(z_s))
    np.testing.assert_allclose(p_true, p_s * w / (p_s * w + 1 - p_s), rtol=1e-12)


def test_bias_is_fitted_on_sampled_rows_then_shifted_by_the_keep_rate() -> None:
    """method=bias with keep_rate < 1 fitted nothing (bias 0, as if the model were calibrated on the sampled
    rows): a model 0.7 over in logit kept its error, while temperature_bias fitted it."""
    t, y = _data(40_000, seed=2)
    w = 0.5
    cal = fit_calibration(t + 0.7, y, CalibrationConfig(method="bias", keep_rate=w))
    both = fit_calibration(t + 0.7, y, CalibrationConfig(method="temperature_bias", keep_rate=w))
    assert cal.bias == pytest.approx(-0.7, abs=0.05) and cal.bias == pytest.approx(both.bias, abs=0.05)
    assert cal.shift == pytest.approx(cal.bias + math.log(w))


def test_fitted_bias_recovers_log_keep_rate_of_a_downsampled_model() -> None:
    # A model trained on negatives kept at rate w learns logit_s = t - log(w); fitting a bias on
    # un-sampled rows must find about log(w), the same shift the closed form applies.
    t, y = _data(60_000, seed=1)
    w = 0.2
    cal = fit_calibration(t - math.log(w), y, CalibrationConfig(method="bias"))
    assert cal.bias == pytest.approx(math.log(w), abs=0.05)


def test_wll_target_gives_a_different_shift() -> None:
    t, y = _data()
    ll = fit_calibration(t, y, CalibrationConfig(method="bias", target="logloss"))
    wl = fit_calibration(t, y, CalibrationConfig(method="bias", target="wll"))
    assert abs(ll.bias) < 0.05                          # already calibrated for logloss
    assert wl.bias > 1.0                                # class-balanced optimum pushes rare positives up
    assert weighted_logloss(y, _sig(wl.apply(t))) < weighted_logloss(y, _sig(ll.apply(t)))
    assert logloss(y, _sig(ll.apply(t))) < logloss(y, _sig(wl.apply(t)))


@pytest.mark.parametrize("method", ["bias", "temperature_bias"])
def test_wll_calibration_of_a_downsampled_model_holds_on_unsampled_rows(method: str) -> None:
    """WLL weighs each class by its own mean, which random negative downsampling leaves as it was: the WLL fit
    on sampled validation rows is already right for un-sampled test rows, with no log(keep_rate) shift (which
    took test WLL from about the best to far worse, and `bias` was not fitted at all)."""
    t, y = _data(200_000, seed=2)
    w = 0.25
    rng = np.random.default_rng(3)
    kept = (y > 0.5) | (rng.random(len(y)) < w)                  # validation rows sampled like training
    half = np.arange(len(y)) % 2 == 0
    val, test = kept & half, ~half                                  # test rows: every row, as served
    z = t - math.log(w)                                             # what a model trained on sampled rows outputs
    cal = fit_calibration(z[val], y[val], CalibrationConfig(method=method, target="wll", keep_rate=w))
    got = weighted_logloss(y[test], _sig(cal.apply(z[test])))
    best = fit_calibration(z[test], y[test], CalibrationConfig(method=method, target="wll"))
    floor = weighted_logloss(y[test], _sig(best.apply(z[test])))
    assert got <= floor + 0.002, (got, floor)
    assert cal.shift == pytest.approx(cal.bias)                       # no keep-rate term


def test_one_class_keeps_identity() -> None:
    cal = fit_calibration(np.array([1.0, 2.0]), np.array([1, 1]), CalibrationConfig(method="temperature"))
    assert cal.method == "none"
    np.testing.assert_allclose(cal.apply(np.array([1.0, 2.0])), [1.0, 2.0])


def test_json_round_trip_and_float32() -> None:
    cal = Calibration("temperature_bias", "wll", 1.7, -0.3, 0.5)
    assert Calibration.from_json(cal.to_json()) == cal
    z = np.array([0.5, -1.0], dtype=np.float32)
    assert cal.apply(z).dtype == np.float32


def _write_preds(path: Path, z: np.ndarray, y: np.ndarray) -> None:
    np.savez(path, row_index=np.arange(len(z), dtype=np.int64), logits=z[:, None].astype(np.float32),
             labels=y[:, None].astype(np.float32))


@pytest.mark.parametrize("target", ["logloss", "wll"])
def test_flat_offset_logits_get_the_optimum_not_a_clipped_bias(target: str) -> None:
    """A weak model's logits barely vary around an offset (sd 0.012 about -1.1, as toss.sh's small runs gave):
    the optimum scales them by ~40 and shifts by ~+45. The bias was clipped at +30 with no word, a worse fit
    (helper's audit). The logits are centred now: the returned (a, b) is a stationary point of the loss."""
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.25).astype(np.float64)
    z = -1.1 + 0.012 * (rng.standard_normal(y.size) + 0.5 * y)
    a, b = fit_affine(z, y, target, fit_scale=True, fit_bias=True)
    assert b > 30.0
    w = _row_weights(y, target)
    r = w * (_sig(a * z + b) - y)
    grad = np.array([np.sum(r * z), np.sum(r)]) / np.sum(w)
    assert np.abs(grad).max() < 1e-6
    assert _loss(a, b, z, y, w) < _loss(a, 30.0, z, y, w)
    # the bias alone is fitted as before (no centring): the shift of the offset logits
    a1, b1 = fit_affine(z, y, target, fit_scale=False, fit_bias=True)
    assert a1 == 1.0 and -5.0 < b1 < 5.0


def test_a_temperature_at_the_end_of_its_range_is_a_warning() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(20_000) < 0.25).astype(np.float64)
    z = 0.001 * (rng.standard_normal(y.size) + y)                # the optimum wants T ~ 1e-3 < 0.01
    cal = fit_calibration(z, y, CalibrationConfig(method="temperature"))
    assert cal.temperature == pytest.approx(0.01)
    note = bound_warning(cal, "clicked")
    assert note is not None and "clicked" in note and "T=0.01" in note and "loader.batch_size" in note
    t, y2 = _data(4000)
    assert bound_warning(fit_calibration(3 * t, y2, CalibrationConfig(method="temperature")), "c") is None


def test_calibrate_run_writes_json_and_prefers_oof(tmp_path: Path) -> None:
    t, y = _data(4000)
    _write_preds(tmp_path / "val_predictions.npz", 3 * t, y)
    _write_preds(tmp_path / "oof.npz", t, y)            # already calibrated
    cfg = load_config(None, ["infer.calibration.method=temperature"])
    report = calibrate_run(tmp_path, cfg, quiet=True)
    assert report is not None and report.source == "oof.npz"
    cals, requested = read_calibration(tmp_path / "calibration.json")
    assert requested == cfg.infer.calibration
    assert cals[0].temperature == pytest.approx(1.0, abs=0.1)
    assert not list(tmp_path.glob("*.incomplete"))
    (tmp_path / "oof.npz").unlink()
    report = calibrate_run(tmp_path, cfg, quiet=True)
    assert report is not None and report.source == "val_predictions.npz"
    assert report.tasks[0].calibration.temperature == pytest.approx(3.0, rel=0.1)
    assert report.tasks[0].logloss_after < report.tasks[0].logloss_before
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert doc["source"] == "val_predictions.npz" and doc["tasks"][0]["label"] == "task0"


def test_a_format_1_bias_file_with_keep_rate_is_refitted(tmp_path: Path) -> None:
    """Format 1 files of method=bias with keep_rate < 1 hold bias 0 (that version fitted none): infer refits
    them in memory and says why; other format 1 files are used as written."""
    from ctrpipe.infer.predict import load_calibrations

    t, y = _data(20_000, seed=3)
    _write_preds(tmp_path / "val_predictions.npz", t + 0.7, y)
    cfg = load_config(None, ["infer.calibration.method=bias", "infer.calibration.keep_rate=0.5"])
    calibrate_run(tmp_path, cfg, quiet=True)
    path = tmp_path / "calibration.json"
    doc = json.loads(path.read_text())
    assert doc["format"] == "ctrpipe.calibration/2"
    fitted = doc["tasks"][0]["bias"]
    assert fitted == pytest.approx(-0.7, abs=0.05)
    doc["format"], doc["tasks"][0]["bias"] = "ctrpipe.calibration/1", 0.0        # as the older fit wrote it
    path.write_text(json.dumps(doc))
    cal, note = load_calibrations(tmp_path, cfg, 0, "label", quiet=True)
    assert cal.bias == pytest.approx(fitted, abs=1e-9) and "fitted no bias" in note
    other = load_config(None, ["infer.calibration.method=temperature"])
    calibrate_run(tmp_path, other, quiet=True)
    doc = json.loads(path.read_text())
    doc["format"] = "ctrpipe.calibration/1"
    path.write_text(json.dumps(doc))
    cal, note = load_calibrations(tmp_path, other, 0, "label", quiet=True)
    assert note == "calibration.json" and cal.temperature == doc["tasks"][0]["temperature"]


def test_calibrate_run_none_returns_none(tmp_path: Path) -> None:
    cfg = load_config(None, ["infer.calibration.method=none"])
    assert calibrate_run(tmp_path, cfg) is None
    assert not (tmp_path / "calibration.json").exists()


def test_calibrate_run_without_predictions_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        calibrate_run(tmp_path, load_config(None, []), quiet=True)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "val_predictions.npz" in msg and "infer.calibration.method=none" in msg


def test_damaged_prediction_files_are_named_not_tracebacks(tmp_path: Path) -> None:
    """A cut val_predictions.npz / oof.npz raised zipfile.BadZipFile out of infer, report and K-fold loading."""
    from ctrpipe.errors import ReportError
    from ctrpipe.infer.calibrate import load_val_predictions
    from ctrpipe.report.rundata import _read_predictions
    from ctrpipe.train.evaluate import Predictions

    path = tmp_path / "val_predictions.npz"
    np.savez(path, logits=np.zeros((50, 1)), labels=np.ones((50, 1)), row_index=np.arange(50))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        load_val_predictions(tmp_path)
    assert err.value.where == str(path) and "damaged" in err.value.fix
    with pytest.raises(CheckpointError, match="cannot read val_predictions.npz"):
        Predictions.load(path)
    with pytest.raises(ReportError, match="cannot read predictions"):
        _read_predictions(path, ("clicked",))


def test_a_handful_of_validation_rows_fits_no_calibration_and_says_so(tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """(helper's infer sweep) 8 validation rows fitted T at its lower end and a logit shift of +94, which
    took test logloss from 0.57 to 3.4, with one warning about the range. Below MIN_CLASS_ROWS of a class the
    run keeps its predictions uncalibrated and says why, under --quiet too; at the threshold it fits."""
    from ctrpipe.infer.calibrate import MIN_CLASS_ROWS

    t, y = _data(2000, seed=4)
    few = np.r_[np.flatnonzero(y > 0.5)[:MIN_CLASS_ROWS - 1], np.flatnonzero(y < 0.5)[:200]]
    cfg = load_config(None, ["infer.calibration.method=temperature_bias"])
    _write_preds(tmp_path / "val_predictions.npz", t[few] * 0.2, y[few])
    capfd.readouterr()
    report = calibrate_run(tmp_path, cfg, quiet=True)
    assert report is not None and report.tasks[0].calibration.method == "none"
    said = " ".join("".join(capfd.readouterr()).split())
    assert f"task0's calibration (temperature_bias) is not fitted: its 219 validation rows hold " \
           f"{MIN_CLASS_ROWS - 1} positives and 200 negatives, and a fit needs {MIN_CLASS_ROWS} of each" in said, said
    enough = np.r_[few, np.flatnonzero(y > 0.5)[MIN_CLASS_ROWS - 1:MIN_CLASS_ROWS]]
    _write_preds(tmp_path / "val_predictions.npz", t[enough] * 0.2, y[enough])
    report = calibrate_run(tmp_path, cfg, quiet=True)
    assert report is not None and report.tasks[0].calibration.method == "temperature_bias"
    assert "not fitted" not in "".join(capfd.readouterr())
