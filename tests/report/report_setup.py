"""Types shared by the report tests (a unique module name: several test folders have a conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Runs:
    root: Path
    criteo: tuple[Path, ...]      # dnn, deepfm, dcnv2 on one cache
    kfold: Path                   # dnn, 2 folds, same cache
    mmoe: Path                    # another cache (Parquet, two labels)
