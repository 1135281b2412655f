"""Serving: `Predictor.load(RUN).predict(rows)`: raw rows -> calibrated probabilities per task.

Every step is the code `ctrpipe shard --test --stats-from TRAIN` + `ctrpipe infer` runs, called on rows in
memory instead of files: the reader of the run's input format (`serve.rows`), the shard build's
`ChunkTransformer` with the training cache's fitted statistics (hashing seeds and bins, vocabularies,
imputation, log1p, standardisation, token truncation, co-visitation), the loader's `HostBuffers` to form the
`Batch`, `train.evaluate.predict` (with the sampling logit shift), and infer's calibration and fold ensembling.
So its probabilities are bit-identical to those of shard + infer on the same rows (with the same batch size).

The run must reach its training cache (the path in its checkpoints), or `cache=` names where it moved to:
the fitted statistics are read from there once, at load (vocabularies and co-visitation tables can be large,
so they are not copied into the run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrpipe.config import RunConfig
from ctrpipe.data.chunks import RawChunk
from ctrpipe.data.fitted import Fitted
from ctrpipe.data.schema import resolve_columns
from ctrpipe.data.splits import SPLIT_TEST
from ctrpipe.device import predict_amp
from ctrpipe.errors import CheckpointError, ConfigError, ManifestMismatchError
from ctrpipe.infer.calibrate import Calibration
from ctrpipe.infer.config import check_trim_ratio
from ctrpipe.infer.predict import (
    checkpoint_logit_shift,
    ensemble_logits,
    fold_weights,
    load_calibrations,
    load_run_checkpoints,
    resolve_config,
)
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.buffers import HostBuffers, Layout, layout_of
from ctrpipe.serve.rows import Rows, rows_chunk
from ctrpipe.shard.manifest import Manifest, read_manifest
from ctrpipe.shard.transform import ChunkTransformer, Plan, SeparatorCheck, make_plan
from ctrpipe.train.checkpoint import check_compatible, checkpoint_tasks, model_from_checkpoint
from ctrpipe.train.evaluate import predict
from ctrpipe.train.objective import Task

# infer keys about a cache's rows and its one-head submission file, which scoring raw rows has no use for
SUBMISSION_ONLY = ("infer.view", "infer.task", "infer.id_header", "infer.pred_header", "infer.save_fold_preds")


def method_source(overrides: Sequence[str]) -> str:
    """Where infer.method came from, for messages: a --set, or the run's config."""
    return "--set infer.method" if any(o.split("=", 1)[0].strip() == "infer.method" for o in overrides) \
        else "infer.method (the run's config)"


def plan_from_manifest(cfg: RunConfig, manifest: Manifest) -> Plan:
    """The shard build's plan, resolved against the training cache's own columns (in storage order, so
    regex selections come out as they did), so serving needs no input file to resolve column patterns."""
    cols = manifest.columns
    names = [c.source for c in cols if c.kind == "label"] + \
        [c.source for c in cols if c.kind in ("numeric", "categorical", "multihot", "sequence")]
    data = cfg.data
    if data.id_column:
        names.append(data.id_column)
    schema = dict.fromkeys(names) if data.format != "criteo" else None
    # the training files' value types: rows stored otherwise (the integer 7 for the text "07") get other ids
    columns = dataclasses.replace(resolve_columns(data, schema), value_types=manifest.value_types(),
                                  value_types_from="the run's training data")
    plan = make_plan(data, columns)
    got = [n for n, *_ in plan.numeric_layout()] + list(plan.categorical) + [t.column for t in plan.tokens]
    want = [c.name for c in cols if c.kind not in ("label", "id")]
    if got != want:
        raise ManifestMismatchError(f"the run's data config resolves to columns {got[:6]}..., its training "
                                    f"cache stores {want[:6]}...", where="manifest.json of the training cache",
                                    fix="serve with the cache the run was trained on (Predictor.load(RUN, cache=))")
    return plan


@dataclass
class _Model:
    net: nn.Module
    shift: tuple[float, ...]


class Predictor:
    """A trained run (one checkpoint or K folds) ready to score raw rows; see the module docstring."""

    def __init__(self, run: Path, cfg: RunConfig, models: list[_Model], tasks: tuple[Task, ...],
                 plan: Plan, fitted: Fitted, layout: Layout, calibrations: list[Calibration],
                 weights: tuple[float, ...] | None, cache_dir: Path, manifest: Manifest,
                 separators: SeparatorCheck = "off") -> None:
        self.cache_dir, self.manifest = cache_dir, manifest      # the training cache
        self.run, self.cfg, self.models, self.tasks = run, cfg, models, tasks
        self.plan, self.layout, self.calibrations, self.weights = plan, layout, calibrations, weights
        # loo_fitted=False: as a test cache built with --stats-from (no row of these was counted)
        self.transformer = ChunkTransformer(plan, fitted, loo_fitted=False, check_separators=separators)
        self.batch_size = cfg.infer.batch_size or cfg.loader.eval_batch_size

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @classmethod
    def load(cls, run: Path | str, cache: Path | str | None = None, overrides: Sequence[str] = (),
             refuse: Callable[[RunConfig], None] | None = None, quiet: bool = True,
             separators: SeparatorCheck = "off") -> Predictor:
        """Checkpoints, calibration and the training cache's manifest + fitted statistics of `run`.

        `cache`: the training shard cache, when it is no longer where the run recorded it. `overrides`:
        inference-only `--set` values, as `ctrpipe infer` takes them (e.g. "infer.method=logit_mean").
        `refuse`: the caller's own check of the resolved config (export: the methods it can combine), run
        first, so a method the caller cannot use is not told how to fix its settings. `quiet=False` warns
        when the configured calibration cannot be fitted (a run without validation predictions), as infer does.
        `separators="run"`: refuse rows whose histories are split by another separator than the run's (they
        would score as one unknown token each); a whole file has the rows to tell, a request batch may not.
        """
        run = Path(run)
        for text in overrides:
            key = text.split("=", 1)[0].strip()
            if key in SUBMISSION_ONLY:
                raise ConfigError(f"--set {text}: {key} shapes `ctrpipe infer`'s submission of a cache's rows; "
                                  "a Predictor scores raw rows with every head (ctrpipe predict writes the id "
                                  "column and one column per head)", where="--set",
                                  fix=f"drop --set {key} (choose heads with Predictor.predict(rows, tasks=[...])), "
                                      "or write a submission with ctrpipe infer on a cache of these rows")
            value = text.split("=", 1)[1].strip() if "=" in text else ""
            if key == "train.device" and value not in ("cpu", "auto"):
                raise ConfigError(f"--set {text}: a Predictor (ctrpipe predict, export) scores rows on the CPU, so "
                                  "the setting would be ignored", where="--set",
                                  fix=f"drop --set {key}; `ctrpipe infer` scores a shard cache of the rows on a GPU")
        paths, ckpts = load_run_checkpoints(run)
        cfg = resolve_config(ckpts[0], overrides)
        if refuse is not None:
            refuse(cfg)
        if cfg.infer.method == "rank_avg":
            raise ConfigError("infer.method=rank_avg ranks each row among a whole test set; rows served a few "
                              "at a time (or in chunks of a file) would be ranked among their neighbours only",
                              where=method_source(overrides),
                              fix="serve with a per-row method: --set infer.method=logit_mean (or mean, "
                                  "geom_mean, weighted); `ctrpipe infer` ranks a whole test cache")
        if cfg.infer.method == "trim_mean":       # as infer: a trim that cuts nothing is a plain mean
            check_trim_ratio(cfg.infer.trim_ratio, "infer.trim_ratio", len(ckpts))
        cache_dir = Path(cache) if cache is not None else Path(ckpts[0].shards)
        if not (cache_dir / "manifest.json").is_file():
            raise CheckpointError(f"the run's training cache {cache_dir} is not there: serving needs its "
                                  "manifest and fitted statistics (vocabularies, imputation, co-visitation)",
                                  where=str(paths[0]),
                                  fix="pass the training cache's new place: --cache DIR (ctrpipe predict / "
                                      "export), or Predictor.load(RUN, cache=DIR)")
        manifest = read_manifest(cache_dir)
        for ckpt, path in zip(ckpts, paths, strict=True):
            check_compatible(ckpt, manifest, cache_dir, path)
        # raw rows are prepared as the shards were built: the cache's data section, whatever the run recorded
        cfg = dataclasses.replace(cfg, data=manifest.data_config(str(cache_dir / "manifest.json")))
        tasks = checkpoint_tasks(ckpts[0], cfg.train)
        cals = [load_calibrations(run, cfg, t, tasks[t].name, quiet=quiet or t > 0)[0] for t in range(len(tasks))]
        models = [_Model(model_from_checkpoint(c, "cpu"), checkpoint_logit_shift(c, tasks)) for c in ckpts]
        layout = layout_of(cache_dir, manifest, with_labels=False)
        try:
            fitted = Fitted.load(cache_dir, manifest.fitted)
        except ManifestMismatchError:
            if manifest.role != "test":
                raise
            # a test cache records its train cache's statistics but keeps none of their tables
            raise CheckpointError(f"{cache_dir} is a test cache (shard --test): serving prepares rows with the "
                                  "training cache's fitted statistics (vocabularies, co-visitation), which it "
                                  "does not hold", where=str(cache_dir),
                                  fix=f"pass the cache the run trained on ({ckpts[0].shards}), or its new place, "
                                      "as --cache") from None
        return cls(run, cfg, models, tasks, plan_from_manifest(cfg, manifest), fitted, layout, cals,
                   fold_weights(cfg, ckpts), cache_dir, manifest, separators)

    # ------------------------------------------------------------------------------------------ predict
    def batch(self, rows: Rows) -> Batch:
        """The model input for `rows` (all of them, one Batch), as the loader would serve it."""
        return self.chunk_batch(rows_chunk(self.plan.cfg, self.plan.columns, rows))

    def chunk_batch(self, chunk: RawChunk) -> Batch:
        """The model input for a RawChunk from one of the shard build's readers (a file read in chunks)."""
        n = chunk.frame.height
        arrays, _ = self.transformer.transform(chunk.frame, np.full(n, SPLIT_TEST, dtype=np.int8),
                                               str(chunk.source))
        buf = HostBuffers(self.layout, n, pinned=False)
        for group, out in buf.targets:
            np.copyto(out, arrays[group])
        buf.row_index[:] = np.arange(n, dtype=np.int64)
        return buf.batch(n)

    def logits(self, rows: Rows) -> np.ndarray:
        """(K, N, H) float32 logits per checkpoint, sampling shift applied, uncalibrated."""
        return self.batch_logits(self.batch(rows))

    def batch_logits(self, batch: Batch) -> np.ndarray:
        """(K, N, H) float32 logits of a Batch (from `batch`, or a loader over a shard cache)."""
        n = len(batch)
        out = np.empty((len(self.models), n, len(self.tasks)), dtype=np.float32)
        # batches of infer's size: the same row groups go through the model as in `ctrpipe infer`
        parts = [_slice(batch, a, min(n, a + self.batch_size)) for a in range(0, n, self.batch_size)]
        for k, m in enumerate(self.models):
            out[k] = predict(m.net, parts, n, self.tasks, torch.device("cpu"), predict_amp(self.cfg.train.amp),
                             with_labels=False, logit_shift=m.shift).logits
        return out

    def predict(self, rows: Rows, tasks: str | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{head: (N,) float64 probability}: calibrated per checkpoint, then combined over folds as
        `ctrpipe infer` does (infer.method / infer.weights of the run's config). `tasks`: heads, or one head's
        name (which read as a list of its letters)."""
        names = [tasks] if isinstance(tasks, str) else list(tasks) if tasks is not None else list(self.heads)
        for t in names:
            if t not in self.heads:
                raise ConfigError(f"unknown task {t!r}", where="tasks", fix=f"use one of {list(self.heads)}")
        return self.probabilities(self.logits(rows), names)

    def probabilities(self, logits: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """(K, N, H) logits -> {head: (N,) float64}, calibrated and fold-combined as `ctrpipe infer`."""
        ic = self.cfg.infer
        out = {}
        for t in names:
            j = self.heads.index(t)
            k = len(self.models)
            out[t] = ensemble_logits(np.ascontiguousarray(logits[:, :, j]), [self.calibrations[j]] * k,
                                     ic.method, self.weights, ic.trim_ratio, ic.write_chunk_rows)
        return out


def _slice(batch: Batch, a: int, b: int) -> Batch:
    """Rows a..b of a batch (views)."""
    return batch._map(lambda t: t[a:b])
