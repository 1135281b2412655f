"""`ctrpipe synth`: write a train (and optional test) file, the truth beside each, and DIR/synth.json.

Library entry points `synth_criteo` / `synth_parquet` do the work quietly; `run_synth` adds option checks,
a progress bar and the summary table for the CLI.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from rich.table import Table

from ctrpipe.console import console, human_rate, make_progress
from ctrpipe.errors import ConfigError
from ctrpipe.synth import criteo, parquet
from ctrpipe.synth.common import BLOCK_ROWS, GENERATOR_VERSION, LabelStats, Stream, atomic_path

Format = Literal["criteo", "parquet"]
RowsCallback = Callable[[str, int], None]   # (split name, rows just written)
META_NAME = "synth.json"
# Every name synth may write; ones this run does not write are removed so no stale file looks current.
_ALL_OUTPUTS = ("train.tsv", "train.tsv.gz", "test.tsv", "test.tsv.gz", "train.parquet", "test.parquet",
                "train.truth.npy", "test.truth.npy")


@dataclass(frozen=True)
class SplitResult:
    """One written file: where it is, how many rows, and its labels against the truth."""

    name: str                                      # train | test
    data: Path
    truth: Path
    rows: int
    labels: tuple[tuple[str, LabelStats], ...]     # ("click", ...) and, for parquet, ("conversion", ...)
    # parquet: the click oracle's AUC without its candidate x history term (the rest of the true logit), so
    # oracle_auc minus it is what reading the history against the candidate can add
    oracle_auc_without_target: float | None = None


@dataclass(frozen=True)
class SynthResult:
    fmt: Format
    out: Path
    seed: int
    splits: tuple[SplitResult, ...]
    meta: Path
    seconds: float

    @property
    def train(self) -> SplitResult:
        return self.splits[0]

    @property
    def positive_rate(self) -> float:
        return self.train.labels[0][1].positive_rate

    @property
    def oracle_auc(self) -> float:
        return self.train.labels[0][1].oracle_auc

    @property
    def rows_per_s(self) -> float:
        return sum(s.rows for s in self.splits) / max(self.seconds, 1e-9)


@lru_cache(maxsize=2)
def _criteo_model(seed: int) -> criteo.CriteoModel:
    return criteo.build_model(seed)


@lru_cache(maxsize=2)
def _parquet_model(seed: int) -> parquet.ParquetModel:
    return parquet.build_model(seed)


def _check(rows: int, test_rows: int, seed: int, out: Path, chunk_blocks: int) -> None:
    if rows < 1:
        raise ConfigError(f"bad value {rows} for the number of training rows", where="--rows",
                          fix="use a positive integer, e.g. --rows 100000")
    if test_rows < 0:
        raise ConfigError(f"bad value {test_rows} for the number of test rows", where="--test-rows",
                          fix="use 0 (no test file) or a positive integer, e.g. --test-rows 10000")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"bad seed {seed}", where="--seed", fix="use a non-negative integer, e.g. --seed 0")
    if chunk_blocks < 1:
        raise ConfigError(f"bad chunk_blocks {chunk_blocks}", where="chunk_blocks",
                          fix="use a positive integer such as 32")
    if out.exists() and not out.is_dir():
        raise ConfigError("the output path exists and is not a folder", where=str(out),
                          fix="pass --out with a new or existing folder, e.g. --out data/synth")


INCOMPLETE_NAME = ".synth-incomplete"   # marks a folder a synth run is writing (removed with synth.json's arrival)


def _prepare(out: Path, written: set[str]) -> None:
    """Create `out`; drop synth.json first (a crash leaves no finished-looking folder) and stale outputs.

    Only a folder of an earlier synth run (synth.json, or the marker of an interrupted one) is cleared: the
    outputs' names are the usual ones of real data (train.parquet, test.parquet), which are never removed."""
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / META_NAME).is_file() or (out / INCOMPLETE_NAME).is_file()
    foreign = [name for name in _ALL_OUTPUTS if (out / name).exists()]
    if foreign and not ours:
        raise ConfigError(f"{out} holds {foreign[0]}, which no ctrpipe synth run wrote (no {META_NAME})",
                          where="--out", fix="pass an empty or new folder, e.g. --out data/synth")
    (out / INCOMPLETE_NAME).touch()
    (out / META_NAME).unlink(missing_ok=True)
    for name in _ALL_OUTPUTS:
        if name not in written:
            (out / name).unlink(missing_ok=True)


_CRITEO_PARTS = ("first_order_categorical", "numeric", "categorical_pairs", "other_interactions")
_PARQUET_PARTS = ("first_order_categorical", "numeric", "categorical_pairs", "numeric_x_categorical",
                  "sequence", "tags", "candidate_x_history")


def _splits(rows: int, test_rows: int) -> list[tuple[str, Stream, int]]:
    return [("train", Stream.TRAIN, rows)] + ([("test", Stream.TEST, test_rows)] if test_rows else [])


def synth_criteo(out: Path, rows: int, seed: int = 0, test_rows: int = 0, gz: bool = False,
                 chunk_blocks: int = 16, on_rows: RowsCallback | None = None) -> SynthResult:
    """Write Criteo text: DIR/train.tsv[.gz] (+ test.tsv[.gz]), <split>.truth.npy (float32, (N,)), synth.json.

    `chunk_blocks` blocks of BLOCK_ROWS rows are built and written at a time (memory); files do not depend
    on it."""
    out = Path(out)
    _check(rows, test_rows, seed, out, chunk_blocks)
    t0 = time.perf_counter()
    model = _criteo_model(seed)
    ext = "tsv.gz" if gz else "tsv"
    plan = _splits(rows, test_rows)
    _prepare(out, {f"{name}.{ext}" for name, _, _ in plan} | {f"{name}.truth.npy" for name, _, _ in plan})
    results = []
    for name, stream, n in plan:
        data, truth = out / f"{name}.{ext}", out / f"{name}.truth.npy"
        cb = (lambda k, _name=name: on_rows(_name, k)) if on_rows else None
        stats = criteo.write_tsv(data, truth, model, seed, stream, n, gz, chunk_blocks, cb)
        results.append(SplitResult(name, data, truth, n, (("click", stats),)))
    info = {"target_positive_rate": criteo.TARGET_RATE, "target_auc": criteo.TARGET_AUC, "bias": model.bias,
            "scale": model.scale,
            "logit_variance_shares": dict(zip(_CRITEO_PARTS, criteo.SHARES.tolist(), strict=True))}
    return _finish("criteo", out, seed, gz, results, ["click"], info, t0)


def synth_parquet(out: Path, rows: int, seed: int = 0, test_rows: int = 0, group_blocks: int = 6,
                  on_rows: RowsCallback | None = None) -> SynthResult:
    """Write Toss-style Parquet: DIR/train.parquet (+ test.parquet), <split>.truth.npy (float32, (N, 2):
    P(click), P(click and conversion)) and synth.json. Row groups hold `group_blocks` * BLOCK_ROWS rows."""
    out = Path(out)
    _check(rows, test_rows, seed, out, group_blocks)
    t0 = time.perf_counter()
    model = _parquet_model(seed)
    plan = _splits(rows, test_rows)
    _prepare(out, {f"{name}.parquet" for name, _, _ in plan} | {f"{name}.truth.npy" for name, _, _ in plan})
    results = []
    for name, stream, n in plan:
        data, truth = out / f"{name}.parquet", out / f"{name}.truth.npy"
        cb = (lambda k, _name=name: on_rows(_name, k)) if on_rows else None
        click, conv, without = parquet.write_parquet(data, truth, model, seed, stream, n, f"{name.upper()}_",
                                                     group_blocks, cb)
        results.append(SplitResult(name, data, truth, n, (("click", click), ("conversion", conv)), without))
    info = {"target_positive_rate": parquet.CLICK_RATE, "target_auc": parquet.CLICK_AUC, "bias": model.bias,
            "scale": model.scale, "target_conversion_given_click": parquet.CVR_RATE,
            "target_conversion_given_click_auc": parquet.CVR_AUC, "conversion_bias": model.cv_bias,
            "conversion_scale": model.cv_scale,
            "logit_variance_shares": dict(zip(_PARQUET_PARTS, parquet.SHARES.tolist(), strict=True))}
    return _finish("parquet", out, seed, False, results, ["click", "click_and_conversion"], info, t0)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _finish(fmt: Format, out: Path, seed: int, gz: bool, results: list[SplitResult], truth_columns: list[str],
            info: dict[str, object], t0: float) -> SynthResult:
    """Write synth.json last (deterministic: no timings), so its presence means every file is complete."""
    splits = {}
    for s in results:
        splits[s.name] = {"file": s.data.name, "truth": s.truth.name, "rows": s.rows,
                          "labels": {k: {f: _num(v) for f, v in vars(st).items()} for k, st in s.labels}}
        if s.oracle_auc_without_target is not None:
            splits[s.name]["labels"]["click"]["oracle_auc_without_candidate_x_history"] = _num(
                s.oracle_auc_without_target)
    train = results[0].labels[0][1]
    meta = {"generator": "ctrpipe.synth", "generator_version": GENERATOR_VERSION, "block_rows": BLOCK_ROWS,
            "format": fmt, "rows": results[0].rows, "test_rows": results[1].rows if len(results) > 1 else 0,
            "seed": seed, "gzip": gz, "positive_rate": _num(train.positive_rate),
            "oracle_auc": _num(train.oracle_auc), "oracle_logloss": _num(train.oracle_logloss),
            "truth_columns": truth_columns, "splits": splits,
            "model": {k: (_num(v) if isinstance(v, float) else v) for k, v in info.items()}}
    path = out / META_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    (out / INCOMPLETE_NAME).unlink(missing_ok=True)
    return SynthResult(fmt, out, seed, tuple(results), path, time.perf_counter() - t0)


def run_synth(fmt: str, rows: int, test_rows: int, seed: int, out: Path, gz: bool = False,
              quiet: bool = False) -> SynthResult:
    """The `ctrpipe synth` command: check options, generate with a progress bar, print a summary table."""
    if fmt not in ("criteo", "parquet"):
        raise ConfigError(f"unknown format {fmt!r}", where="--format",
                          fix="use --format criteo (Kaggle text) or --format parquet (Toss-style)")
    if gz and fmt != "criteo":
        raise ConfigError("--gzip applies to Criteo text only (Parquet is compressed with zstd already)",
                          where="--gzip", fix="drop --gzip, or use --format criteo")
    _check(rows, test_rows, seed, Path(out), 1)
    with make_progress(quiet) as progress:
        tasks = {name: progress.add_task(f"synth {name}", total=n) for name, _, n in _splits(rows, test_rows)}
        t0 = time.perf_counter()
        done = [0]

        def on_rows(name: str, k: int) -> None:
            done[0] += k
            rate = human_rate(done[0] / max(time.perf_counter() - t0, 1e-9), "rows/s")
            progress.update(tasks[name], advance=k, rate_text=rate)

        if fmt == "criteo":
            result = synth_criteo(Path(out), rows, seed, test_rows, gz, on_rows=on_rows)
        else:
            result = synth_parquet(Path(out), rows, seed, test_rows, on_rows=on_rows)
    _report(result, quiet)
    return result


def _report(r: SynthResult, quiet: bool) -> None:
    rate = human_rate(r.rows_per_s, "rows/s")
    if quiet:
        console.print(f"synth {r.fmt}: {', '.join(f'{s.rows:,} {s.name}' for s in r.splits)} rows -> {r.out} "
                      f"in {r.seconds:.1f}s ({rate}); positive rate {r.positive_rate:.3f}, "
                      f"oracle AUC {r.oracle_auc:.4f}", highlight=False)
        return
    table = Table(title=f"synth {r.fmt}, seed {r.seed} -> {r.out}", caption=f"{r.seconds:.1f}s, {rate}")
    for col in ("file", "rows", "label", "positive rate", "oracle AUC", "oracle logloss"):
        table.add_column(col, justify="left" if col in ("file", "label") else "right")
    for s in r.splits:
        for label, st in s.labels:
            table.add_row(s.data.name, f"{s.rows:,}", label, f"{st.positive_rate:.4f}",
                          f"{st.oracle_auc:.4f}", f"{st.oracle_logloss:.4f}")
    console.print(table)
    without = [f"{s.name} {s.oracle_auc_without_target:.4f}" for s in r.splits
               if s.oracle_auc_without_target is not None]
    if without:
        console.print("click oracle AUC without its candidate x history term (what reading the history against "
                      f"the candidate can add is the difference): {', '.join(without)}", highlight=False)
