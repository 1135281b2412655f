"""Small helpers shared by the shard tests (configs with tiny shards, loading a cache into memory)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ctrpipe.config import RunConfig, load_config
from ctrpipe.shard.reader import open_cache

REPO = Path(__file__).resolve().parents[2]
CRITEO_CFG = REPO / "cfgs" / "criteo.yaml"
PARQUET_CFG = REPO / "cfgs" / "parquet_example.yaml"


def criteo_cfg(*overrides: str) -> RunConfig:
    return load_config(CRITEO_CFG, ["data.shard_rows=16", "data.chunk_rows=1000", "data.hash_bins=1000",
                                    *overrides])


def parquet_cfg(*overrides: str) -> RunConfig:
    return load_config(PARQUET_CFG, ["data.shard_rows=16", "data.chunk_rows=1000", *overrides])


def load_all(cache: Path) -> dict[str, np.ndarray]:
    """Every group of a cache concatenated over shards (tiny caches only)."""
    c = open_cache(cache)
    return {g: c.concat(g) for g in c.groups}


def npy_bytes(cache: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every .npy under a cache (shards and fitted statistics)."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(Path(cache).rglob("*.npy"))}


def cache_contents(cache: Path) -> dict[str, object]:
    """Every .npy's bytes plus the manifest less its timing fields: what two builds of one cache must share."""
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    manifest.pop("build", None)
    assert not list(Path(cache).glob(".incomplete-*"))
    return {"npy": npy_bytes(cache), "manifest": manifest}


# vocabularies, mean imputation and standardisation (a statistics pass), in small chunks
CRITEO_FIT = ("data.categorical.mode=vocab", "data.categorical.min_count=2", "data.numeric.impute=mean",
              "data.numeric.standardize=true", "data.numeric.missing_indicator=true", "data.chunk_rows=37")
