"""`infer:` section: ensembling, calibration and submission format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferConfig:
    method: str = "logit_mean"
    id_header: str = "ID"
    pred_header: str = "clicked"
