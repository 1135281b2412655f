"""`infer:` section: rows to predict, how fold models are ensembled, calibration, submission format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ctrpipe.errors import ConfigError

# Kept in sync with `ctrpipe.infer.ensemble.METHODS` (a test checks); duplicated here so that loading a
# config does not import numpy-heavy inference code.
EnsembleMethod = Literal["logit_mean", "mean", "geom_mean", "median", "trim_mean", "rank_avg", "weighted"]
CalibrationMethod = Literal["none", "temperature", "bias", "temperature_bias"]
CalibrationTarget = Literal["logloss", "wll"]
InferView = Literal["auto", "test", "val", "gold", "train", "all"]


@dataclass(frozen=True)
class CalibrationConfig:
    """`infer.calibration`: fitted after training on validation / out-of-fold logits, applied by infer.

    method: none | temperature (p = sigmoid(z / T)) | bias (p = sigmoid(z + b)) | temperature_bias (both).
      A head whose validation rows hold fewer than 20 positives or 20 negatives is left uncalibrated, with a
      warning.
    target: the metric the fit minimises; `wll` (class-balanced logloss) wants another shift than `logloss`.
    keep_rate: negative-downsampling keep rate used when training (1.0 = none). With w < 1 a fixed logit
      shift log(w), added to what the method fitted on the (sampled) validation rows, maps predictions back
      to the un-sampled click rate (see `ctrpipe.infer.calibrate`); not with target wll, which negative
      downsampling leaves unchanged.
    """

    method: CalibrationMethod = "temperature"
    target: CalibrationTarget = "logloss"
    keep_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_rate <= 1.0:
            raise ConfigError(f"bad value {self.keep_rate} for 'infer.calibration.keep_rate'",
                              fix="use the keep rate in (0, 1], e.g. infer.calibration.keep_rate=0.25")


def check_trim_ratio(value: float, key: str, models: int | None = None) -> None:
    """trim_mean cuts this share from each end of a row: below half, or nothing would be left. Given the number
    of models, it must also cut one at least (floor(models * share) >= 1), or trim_mean is a plain mean."""
    eq = "=" if key.startswith("infer.") else " "
    if not 0.0 <= value < 0.5:
        raise ConfigError(f"bad value {value} for '{key}'", where=key,
                          fix=f"use a share in [0, 0.5), e.g. {key}{eq}0.1")
    if models is not None and int(models * value + 1e-9) == 0:
        least = 1.0 / models
        raise ConfigError(f"trim_mean with {key} {value} trims nothing from {models} models (it cuts "
                          f"floor({models} x {value}) = 0 from each end): it would be a plain mean", where=key,
                          fix=f"use {key}{eq}{least + 1e-3:.3f} or more to cut one model from each end, or the "
                              "mean method" if least + 1e-3 < 0.5 else
                              f"{models} models are too few to cut one from each end: use the median or mean method")


@dataclass(frozen=True)
class InferConfig:
    method: EnsembleMethod = "logit_mean"       # how fold models (and blended files) are combined
    weights: tuple[float, ...] = ()             # explicit per-fold weights; () -> from val scores
    weight_metric: str = "auc"                  # fold val metric that scores folds when weights are derived;
    #                                             several heads: the primary one, auc.<head> for a head's own
    weight_temperature: float = 0.01            # softmax(scores / T): an AUC gap of 0.01 -> weight ratio e
    trim_ratio: float = 0.1                     # trim_mean: share of models cut from each end, per row; it must
                                                #   cut one at least (ratio x models >= 1: 0.2 for 5 folds)
    view: InferView = "auto"                    # auto: the test split if the cache has one, else every row
    task: str = ""                              # head written to the submission ("" -> the first head; ESMM's
                                                #   heads are ctr, ctcvr, cvr); its column is named pred_header
    batch_size: int = 0                         # 0 -> loader.eval_batch_size
    save_fold_preds: bool = False               # also keep <submission>.folds.npz (per-fold logits)
    id_header: str = "ID"
    pred_header: str = "clicked"                # the prediction column's name, whatever the task
    write_chunk_rows: int = 1_000_000           # CSV rows formatted per chunk (bounds writer memory)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        check_trim_ratio(self.trim_ratio, "infer.trim_ratio")
        if self.weight_temperature <= 0:
            raise ConfigError(f"bad value {self.weight_temperature} for 'infer.weight_temperature'",
                              fix="use a positive number, e.g. infer.weight_temperature=0.01")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"bad value {list(self.weights)} for 'infer.weights'",
                              fix="use non-negative weights with a positive sum, e.g. infer.weights=[1,1,2]")
        if self.batch_size < 0 or self.write_chunk_rows < 1:
            raise ConfigError("'infer.batch_size' must be >= 0 and 'infer.write_chunk_rows' >= 1",
                              fix="e.g. infer.batch_size=0 (use loader.eval_batch_size), "
                                  "infer.write_chunk_rows=1000000")
        for key, name in (("infer.id_header", self.id_header), ("infer.pred_header", self.pred_header)):
            odd = [ch for ch in (",", '"', "\n", "\r") if ch in name]
            if odd:     # the header row is written as it is: a comma would make it one column too many
                raise ConfigError(f"submission header {name!r} holds {odd[0]!r}", where=key,
                                  fix="use a name without commas, quotes or line breaks, e.g. clicked")
        if not self.id_header or not self.pred_header or self.id_header == self.pred_header:
            raise ConfigError(f"bad submission headers {self.id_header!r}, {self.pred_header!r}",
                              fix="use two different non-empty names, e.g. infer.id_header=ID "
                                  "infer.pred_header=clicked")
