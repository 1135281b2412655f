"""Stage 2: the passes over raw input that `build_shards` runs: an optional row count (tail split), the fit
pass over the train split (statistics), and the write pass (transform every chunk, feed the shard writer).

Reading, parsing and transforming overlap: blocks of text are cut on one thread, parsed (by the compiled
Criteo kernel or polars) one chunk ahead on another, and transformed here; the writer thread saves shards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from ctrpipe.console import human_rate, make_progress
from ctrpipe.data.chunks import SHARD_REMEDIES, Remedies, column_hashes, has_column
from ctrpipe.data.config import CovisitConfig, DataConfig
from ctrpipe.data.covisit import CovisitCounter
from ctrpipe.data.criteo import gzip_intact_lines, open_text
from ctrpipe.data.csv_reader import stray_quote_resync
from ctrpipe.data.csv_records import count_records
from ctrpipe.data.fitted import (
    Fitted,
    KeyCounter,
    MomentAccumulator,
    NumericAccumulator,
    NumericStats,
    VocabTable,
    round32,
)
from ctrpipe.data.reader import input_schema, iter_raw_chunks
from ctrpipe.data.schema import ResolvedColumns, resolve_columns
from ctrpipe.data.splits import SPLIT_GOLD, SPLIT_TEST, FoldAssigner, assign_split
from ctrpipe.data.transforms import log1p_transform
from ctrpipe.errors import ConfigError, InputFormatError, SchemaError, disk_full_as_error, human_bytes
from ctrpipe.native import native
from ctrpipe.prefetch import prefetch
from ctrpipe.shard.folds import fit_periods, fold_key_hash, fold_times, group_hashes, keyless_by_row
from ctrpipe.shard.manifest import ShardInfo
from ctrpipe.shard.tally import MAX_BAD_EXAMPLES, BadRowTally, GroupStats, SplitTally
from ctrpipe.shard.transform import (
    ChunkTokens,
    ChunkTransformer,
    Plan,
    context_tokens,
    id_array,
    labels_matrix,
    make_plan,
    numeric32,
    vocab_keys,
)
from ctrpipe.shard.writer import ShardWriter

PREFETCH_DEPTH = 1          # chunks parsed ahead; each costs about one chunk of memory
# Threads for a chunk's statistics (one task per accumulator) and chunks transformed at once in the write pass
# (each costs one chunk of arrays): the heavy steps (compiled kernels, numpy, polars) release the GIL, so two
# run side by side on two cores. Not more: each thread also keeps its own malloc arena of freed chunk-sized
# arrays, so peak memory grows with the thread count. Results are the same for any value.
FIT_THREADS = min(os.cpu_count() or 1, 2)
TRANSFORM_AHEAD = 2
RESUME_NOTE = "the build resumes, keeping the shards finished before the disk filled"


@dataclass
class Inputs:
    main: list[Path]
    gold: list[Path]
    role: str                # "train" | "test"
    input_bytes: int
    row_count: int | None = None   # main-input rows, counted only for tail splits


@contextmanager
def small_pages() -> Iterator[None]:
    """No transparent huge pages for numpy arrays while a pass runs (restored after).

    numpy asks for huge pages on every array of 4 MB or more; a pass allocates and frees many such arrays
    per chunk (token hashes, padded token matrices), and the kernel zeroes (and may first compact) 2 MB per
    fault of each fresh one, which costs more system time than the 4 kB faults it saves (see
    benchmarks/RESULTS.md). Process-wide while it lasts: threads started by the pass share it."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    toggle = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if toggle is None:
        yield
        return
    previous = toggle(False)
    try:
        yield
    finally:
        toggle(previous)


# ------------------------------------------------------------------------------------------ plan, schema

def resolve_plan(data: DataConfig, paths: list[Path], role: str = "train", gold: Sequence[Path] = (),
                 separator_fixed: bool = False) -> Plan:
    """Which raw columns become which stored columns (patterns are matched against the first input; a later
    input or a `gold` one holding another column a pattern matches is refused).

    Test Parquet and CSV files usually lack the label columns (CSV: the sources of derived labels too): then
    the plan has no labels. `separator_fixed`: a --stats-from build, whose CSV separator is the train cache's.
    """
    given = data
    schema = input_schema(data, paths[0])
    sources = (*data.labels, *(d.column for d in data.derived_labels))
    # a Parquet schema's `in` looks for fields, not names: a labelled test file lost its labels
    names = set(schema.names) if isinstance(schema, pa.Schema) else set(schema or ())
    if role == "test" and schema is not None and not any(lab in names for lab in sources):
        data = dataclasses.replace(data, labels=(), derived_labels=())
    rc = resolve_columns(data, schema, paths[0] if data.format != "criteo" else None, with_keys=role == "train",
                         to_predict=role == "test", separator_fixed=separator_fixed)
    _check_patterns_elsewhere(given, rc, [*paths, *gold])
    return make_plan(data, rc)


def _check_patterns_elsewhere(data: DataConfig, rc: ResolvedColumns, paths: list[Path]) -> None:
    """Refuse a later input holding a column that a pattern would have picked had that file come first: it
    was left out without a word, while the other order stopped the build on the first file's missing column."""
    patterns = [(key, sec.pattern, chosen) for key, sec, chosen in
                (("data.numeric", data.numeric, rc.numeric), ("data.categorical", data.categorical, rc.categorical))
                if sec.pattern]
    if data.format == "criteo" or not patterns or len(paths) < 2:
        return
    taken = {*rc.numeric, *rc.categorical, *data.labels, *rc.labels, *rc.keys, *(t.column for t in rc.tokens),
             *(d.column for d in data.derived_labels), *((rc.id,) if rc.id else ())}
    for path in paths[1:]:
        schema = input_schema(data, path)
        names = schema.names if isinstance(schema, pa.Schema) else list(schema or ())
        for key, pattern, chosen in patterns:
            rx = re.compile(pattern)
            extra = [n for n in names if rx.search(n) and n not in taken]
            if extra:
                raise SchemaError(f"{key}.pattern {pattern!r} matches column {extra[0]!r} in this file"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                                  + f", but not in the first input {paths[0].name}, whose columns the pattern "
                                  f"picked ({len(chosen)})", where=str(path),
                                  fix="give every input the same columns, or narrow the pattern (or list the "
                                      f"columns in {key}.columns)")


def check_plan(plan: Plan, role: str) -> None:
    """Checks that need both the config and the resolved columns, done before any pass starts."""
    f = plan.cfg.folds
    # a key is read only in group mode: one set without it (folds are plain by default) left groups split
    # without a word, and the manifest recorded the key as if they were kept. Refused when a train cache is
    # built, not where a recorded config is read: caches and runs built before still load
    for key, section in (("folds", f), ("split", plan.cfg.split)):
        if role == "train" and section.key and section.mode != "group":
            raise ConfigError(f"data.{key}.key needs data.{key}.mode=group (not {section.mode})",
                              where=f"data.{key}.key", fix=f"set data.{key}.mode=group (rows sharing the key "
                              + ("share a fold" if key == "folds" else "stay on one side")
                              + f"), or remove data.{key}.key")
    if role == "train" and f.n_splits and f.mode == "stratified" and f.label and f.label not in plan.labels:
        raise SchemaError(f"data.folds.label {f.label!r} is not one of the labels", where="data.folds.label",
                          fix=f"use one of {list(plan.labels)}")
    if role == "train" and f.n_splits and f.mode == "stratified" and not plan.labels:
        raise SchemaError("stratified folds need a label column", where="data.folds.mode",
                          fix="set data.labels, or use data.folds.mode=plain")
    tokens = {tc.column for tc in plan.tokens}
    if role == "train" and f.n_splits and f.time_key in tokens:    # its text is split into tokens, not ordered
        raise SchemaError(f"data.folds.time_key {f.time_key!r} is a sequence / multi-hot column",
                          where="data.folds.time_key",
                          fix="order folds by a numeric, timestamp or text column of the input")


# -------------------------------------------------------------------------------------------- chunking

# gold rows score the model, so they need labels (and --gold cannot be combined with --test)
GOLD_REMEDIES = Remedies(unlabelled="--gold inputs need the label columns (their rows score the model): pass a "
                                    "labelled file, or leave it out")


def _chunks(plan: Plan, paths: list[Path], require_labels: bool,
            columns: ResolvedColumns | None = None, gold: bool = False) -> Iterator[Any]:
    if not paths:
        return iter(())
    data = plan.cfg
    return prefetch(lambda: iter_raw_chunks(data, paths, data.chunk_rows, bad_rows=data.bad_rows,
                                            require_labels=require_labels, columns=columns or plan.columns,
                                            hash_categoricals=True,
                                            remedies=GOLD_REMEDIES if gold else SHARD_REMEDIES),
                    PREFETCH_DEPTH, "ctrpipe-parse")


def fit_columns(plan: Plan) -> ResolvedColumns:
    """The columns the fit pass reads. Parquet is read column by column, so it skips what statistics never
    look at: the id (unless it is the split key) and token columns that are neither a co-visitation context
    nor sharing a vocabulary. With bad_rows=skip it keeps the id and weighted tokens too: a missing id or a
    bad weight skips a row, which must not count in the statistics, and moves every later row's index.
    With bad_rows=error no row is ever skipped: a missing id or a bad weight stops the build in the write
    pass, with the same message. Text formats parse whole lines anyway."""
    rc = plan.columns
    if plan.cfg.format != "parquet":
        return rc
    split = plan.cfg.split
    used = {cv.context for cv in plan.covisit} | {tc.column for tc in rc.tokens if tc.share_ids_with}
    skip = plan.cfg.bad_rows == "skip"
    keep = [tc for tc in rc.tokens if (tc.weighted and skip) or tc.column in used]
    return dataclasses.replace(rc, id=rc.id if skip or (split.mode == "group" and split.key == rc.id) else None,
                               multihot=tuple(tc for tc in rc.multihot if tc in keep),
                               sequence=tuple(tc for tc in rc.sequence if tc in keep))


def count_rows(data: DataConfig, paths: list[Path], label_columns: tuple[str, ...] = ()) -> int:
    """Cheap row count for tail splits: Parquet metadata, CSV records (less the header; no values parsed), or
    newline count of the (decompressed) Criteo text.

    Counts physical rows, so skipped bad rows make the val tail slightly shorter than val_ratio.
    """
    total = 0
    for p in paths:
        if data.format == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(p).metadata.num_rows
            continue
        if data.format == "csv":
            skip = data.bad_rows == "skip"
            resync = stray_quote_resync(data, p, label_columns) if skip else frozenset()
            total += count_records(p, data.csv, resync_fields=resync)
            continue
        # as the reader opens it: gzip by its magic bytes, whatever the suffix (a .GZ file's compressed bytes
        # were counted, so a tail split took far more rows than val_ratio)
        fh, raw = open_text(p)
        last = b"\n"
        with raw, fh:
            try:
                while block := fh.read(1 << 24):
                    total += block.count(b"\n")
                    last = block[-1:]
            except (OSError, EOFError, zlib.error) as exc:      # as the reader says it (no bare "Aborted.")
                raise InputFormatError(f"corrupt or truncated gzip data ({exc}) after line "
                                       f"{gzip_intact_lines(p):,}", where=str(p),
                                       fix="re-download or re-copy the file; `gunzip -t FILE` checks it") from None
        total += last != b"\n"
    return total


class _Splitter:
    """Split code per main-input row from its global index (or key), for the configured mode."""

    def __init__(self, plan: Plan, inputs: Inputs) -> None:
        self.cfg = plan.cfg.split
        self.role = inputs.role
        tail = self.cfg.mode == "tail" and inputs.role == "train"
        if tail and inputs.row_count is None:
            # once per build, shared by both passes
            inputs.row_count = count_rows(plan.cfg, inputs.main, plan.columns.label_columns)
        self.n_rows = inputs.row_count if tail else None
        self.plan = plan

    def __call__(self, frame: pl.DataFrame, idx: np.ndarray) -> np.ndarray:
        if self.role == "test":
            return np.full(len(idx), SPLIT_TEST, dtype=np.int8)
        key = key_hash(self.plan, frame, self.cfg.key, idx) if self.cfg.mode == "group" else None
        return assign_split(idx, self.cfg, n_rows=self.n_rows, key_hash=key)


def key_hash(plan: Plan, frame: pl.DataFrame, key: str, rows: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of the group split's key column (any dtype, via its string form, with the column's
    field seed); a row without a key is its own group (`keyless_by_row`, from `rows`: global indices)."""
    if not has_column(frame, key):
        raise SchemaError(f"group key column {key!r} is not among the parsed columns",
                          where=f"data.split.key / data.folds.key = {key}",
                          fix=f"use one of {frame.columns[:10]} (the key must be a configured column)")
    h, missing = group_hashes(plan, frame, key)
    return keyless_by_row(h, missing, rows)


# ------------------------------------------------------------------------------------------- pass 1: fit

def fit_pass(plan: Plan, inputs: Inputs, progress: bool) -> Fitted:
    """Statistics over the train split of the main inputs: numeric fill/mean/std, vocabularies, covisit."""
    data = plan.cfg
    num = data.numeric
    splitter = _Splitter(plan, inputs)
    nacc = NumericAccumulator(plan.numeric, need_median=num.impute == "median")
    mom = MomentAccumulator(len(plan.numeric)) if num.standardize else None
    vocab = {c: KeyCounter() for c in plan.categorical} if data.categorical.mode == "vocab" else {}
    covisit = {cv.name: CovisitCounter() for cv in plan.covisit}
    train_rows = 0
    # without the compiled kernels each task makes chunk-sized temporaries (polars splits): one at a time
    threads = FIT_THREADS if native() is not None else 1
    with _Bar("fit statistics (pass 1)", inputs.input_bytes, progress) as bar, small_pages(), \
            ThreadPoolExecutor(threads, thread_name_prefix="ctrpipe-fit") as pool:
        for chunk, ft in train_frames(plan, inputs.main, splitter, 0):
            frame = chunk.frame
            train_rows += ft.height
            # one task per accumulator, so tasks share no accumulator and the result is that of one thread.
            # Co-visitation first (the heaviest: it splits the context column, for its readers in the other
            # tasks too), vocabularies shared with token columns last (they reuse that split).
            tokens = ChunkTokens(plan, ft, str(chunk.source))
            tasks = [partial(_count_covisit, plan, ft, cv, covisit[cv.name], tokens) for cv in plan.covisit]
            if plan.numeric:
                tasks.append(partial(_accumulate_numeric, plan, ft, nacc, mom))
            tasks += sorted((partial(_count_vocab, plan, ft, c, k, tokens) for c, k in vocab.items()),
                            key=lambda t: bool(plan.sharing(t.args[2])))
            for job in [pool.submit(t) for t in tasks]:
                job.result()
            del tasks, tokens       # the chunk's token hashes, not kept while the next chunk is read
            bar.advance(chunk, frame.height)
    return fitted_from(plan, nacc, mom, vocab, covisit, train_rows)


def train_frames(plan: Plan, paths: Sequence[Path], splitter: Callable[[pl.DataFrame, np.ndarray], np.ndarray],
                 start: int) -> Iterator[tuple[Any, pl.DataFrame]]:
    """(chunk, its train-split rows) of the fit pass's columns of `paths`, rows numbered from `start` (the
    split of a row may depend on its global position): one loop for the single-process and the partition fit."""
    row = start
    for chunk in _chunks(plan, list(paths), require_labels=True, columns=fit_columns(plan)):
        frame = chunk.frame
        idx = np.arange(row, row + frame.height, dtype=np.int64)
        row += frame.height
        train = splitter(frame, idx) == 0
        yield chunk, (frame.filter(pl.Series(train)) if not train.all() else frame)


def fitted_from(plan: Plan, nacc: NumericAccumulator, mom: MomentAccumulator | None,
                vocab: dict[str, KeyCounter], covisit: dict[str, CovisitCounter], train_rows: int) -> Fitted:
    """The statistics of finished accumulators (one pass's, or the merge of a map/reduce fit pass's)."""
    data = plan.cfg
    num = data.numeric
    empty = [c for c, n in zip(plan.numeric, nacc.n_valid, strict=True) if n == 0]
    if empty and train_rows and (num.impute != "zero" or num.standardize):
        # its fill and scale would be made up, and test rows that hold values would go through unscaled
        raise SchemaError(f"numeric column {empty[0]!r} has no value in any training row"
                          + (f" (nor {len(empty) - 1} more: {empty[1:4]})" if len(empty) > 1 else ""),
                          where=f"data.numeric: {empty[0]}",
                          fix="leave it out (data.numeric.columns / pattern), or fill it in the input")
    fills = nacc.fills(num.impute)
    if mom is not None:
        mean, std = mom.result(np.asarray(log1p_transform(fills.reshape(1, -1), num.log1p)).reshape(-1))
    else:
        mean, std = np.zeros(len(fills)), np.ones(len(fills))
    numeric = {c: NumericStats(round32(fills[j]), float(mean[j]), float(std[j]))
               for j, c in enumerate(plan.numeric)}
    # every table is sorted out of its own counter, so the counters are finished side by side (numpy's sorts
    # release the GIL): the largest first, the co-visitation pairs
    cat = data.categorical
    with ThreadPoolExecutor(FIT_THREADS, thread_name_prefix="ctrpipe-fitted") as pool:
        pairs = {k: pool.submit(v.tables) for k, v in covisit.items()}
        tables = {c: pool.submit(VocabTable.from_counts, k, cat.min_count, cat.bins.get(c, 0))
                  for c, k in sorted(vocab.items(), key=lambda ck: -ck[1].distinct)}
        return Fitted(numeric=numeric, vocab={c: tables[c].result() for c in vocab},
                      covisit={k: job.result() for k, job in pairs.items()}, train_rows=train_rows)


def _accumulate_numeric(plan: Plan, ft: pl.DataFrame, nacc: NumericAccumulator,
                        mom: MomentAccumulator | None) -> None:
    raw = numeric32(ft, plan.numeric).astype(np.float64)   # same values as pass 2
    nacc.update(raw)
    if mom is not None:
        valid = np.isfinite(raw)
        mom.update(np.asarray(log1p_transform(np.where(valid, raw, 0.0), plan.cfg.numeric.log1p)), valid)


def _count_vocab(plan: Plan, ft: pl.DataFrame, column: str, counter: KeyCounter,
                 tokens: ChunkTokens | None = None) -> None:
    counter.add(vocab_keys(plan, ft, column, tokens))      # values + tokens sharing the column's id space


def _count_covisit(plan: Plan, ft: pl.DataFrame, cv: CovisitConfig, counter: CovisitCounter,
                   tokens: ChunkTokens | None = None) -> None:
    h, missing = column_hashes(ft, cv.target, plan.seed(cv.target))
    counter.update(h, missing, context_tokens(plan, ft, cv.context, tokens), np.ones(ft.height, dtype=bool))


# ----------------------------------------------------------------------------------------- pass 2: write

@dataclass
class WriteResult:
    shards: list[ShardInfo]
    rows: int
    rows_dict: dict[str, int]
    folds: dict[str, Any]
    label_rates: dict[str, dict[str, float]]
    label_pair_rates: dict[str, dict[str, dict[str, float]]]
    bad_rows: dict[str, Any]
    column_stats: dict[str, dict[str, float]]
    id_dtype: str
    output_bytes: int
    parsed_bytes: int
    has_labels: bool               # whether shards hold labels.npy (unlabelled test text has no label field)
    seconds: float = 0.0


def fold_assigner(plan: Plan, inputs: Inputs) -> FoldAssigner:
    """The write pass's fold assigner; time folds get their periods from a pre-pass over the main inputs."""
    data = plan.cfg
    folds = FoldAssigner(data.folds) if inputs.role == "train" else FoldAssigner(type(data.folds)())
    if folds.enabled and folds.cfg.mode == "time":
        # a pre-pass over one column
        folds.period_starts, folds.period_labels = fit_periods(plan, inputs.main, folds.cfg.n_splits)
    return folds


class WriteTallies:
    """The write pass's running tallies that end up in the manifest (rows per split, label rates, fold sizes,
    bad rows, column stats, id width).

    `per_chunk` (a partition's worker) also keeps every chunk's float sums apart, as the fit partials do: a
    merge (`merge`) adds them chunk by chunk in input order, the additions one process makes, so the float
    tallies are bit-identical whatever the partitioning. Counts, minima and maxima merge exactly."""

    def __init__(self, plan: Plan, n_folds: int, per_chunk: bool = False) -> None:
        labels = plan.labels
        self.fold_label = plan.fold_label
        self.split = SplitTally(labels, n_folds, self.fold_label)
        self.bad = BadRowTally()
        self.num = GroupStats(tuple(n for n, *_ in plan.numeric_layout()))
        self.cat = GroupStats(plan.categorical)
        self.tok = {tc.column: GroupStats((tc.column,)) for tc in plan.tokens}
        self.lab = GroupStats(labels)
        self.has_labels: bool | None = None
        self.id_width = 0
        self.rows = 0
        self.parsed_bytes = 0
        self.chunk_sums: list[list[np.ndarray]] | None = [] if per_chunk else None

    def groups(self) -> list[GroupStats]:
        return [self.num, self.cat, self.lab, *self.tok.values()]

    def _floats(self) -> list[np.ndarray]:
        return [self.split.label_sum, self.split.fold_pos, *(g.total for g in self.groups()), self.split.pair_sum]

    def _set_floats(self, values: list[np.ndarray]) -> None:
        self.split.label_sum, self.split.fold_pos, self.split.pair_sum = values[0], values[1], values[-1]
        for g, v in zip(self.groups(), values[2:-1], strict=True):
            g.total = v

    def update(self, plan: Plan, arrays: dict[str, np.ndarray], missing: np.ndarray, y: np.ndarray | None,
               split: np.ndarray, fold: np.ndarray, bad_rows: list[Any]) -> None:
        """One chunk's tallies (its arrays before ids/labels/split/fold are added)."""
        if self.chunk_sums is not None:     # this chunk's sums alone: 0 + s == s exactly
            self._set_floats([np.zeros_like(v) for v in self._floats()])
        if "numeric" in arrays:
            self.num.update(arrays["numeric"], missing)
        if plan.categorical:
            self.cat.update(arrays["categorical"], np.count_nonzero(arrays["categorical"] == 0, axis=0))
        for tc in plan.tokens:
            ln = arrays[f"{_stem(tc.column)}.len"]
            self.tok[tc.column].update(ln, np.array([(ln == 0).sum()]))
        if y is not None:
            self.lab.update(np.nan_to_num(y), np.isnan(y).sum(axis=0))
        self.split.update(split, fold, y)
        self.bad.update(bad_rows)
        if self.chunk_sums is not None:
            self.chunk_sums.append([v.copy() for v in self._floats()])

    def save(self) -> dict[str, np.ndarray]:
        """A worker's tallies as arrays (with `per_chunk`): counts, minima, maxima and the per-chunk sums."""
        assert self.chunk_sums is not None
        s = self.split
        out: dict[str, np.ndarray] = {"split_rows": s.rows, "label_n": s.label_n, "fold_rows": s.fold_rows,
                                      "pair_n": s.pair_n}
        for j, g in enumerate(self.groups()):
            out[f"g{j}_n"], out[f"g{j}_lo"], out[f"g{j}_hi"] = np.int64(g.n), g.lo, g.hi
            out[f"g{j}_missing"] = g.missing
        for j, v in enumerate(self._floats()):
            out[f"sum{j}"] = np.asarray([c[j] for c in self.chunk_sums],
                                        dtype=np.float64).reshape(len(self.chunk_sums), *v.shape)
        return out

    def merge(self, z: Any, bad: dict[str, Any], has_labels: bool | None, id_width: int, rows: int,
              parsed_bytes: int) -> None:
        """Add a worker's tallies (`save`'s arrays `z`), partitions in input order."""
        s = self.split
        s.rows += z["split_rows"]
        s.label_n += z["label_n"]
        s.pair_n += z["pair_n"]
        s.fold_rows += z["fold_rows"]
        for j, g in enumerate(self.groups()):
            g.n += int(z[f"g{j}_n"])
            g.lo = np.minimum(g.lo, z[f"g{j}_lo"])
            g.hi = np.maximum(g.hi, z[f"g{j}_hi"])
            g.missing += z[f"g{j}_missing"]
        sums = [z[f"sum{j}"] for j in range(len(self._floats()))]
        for c in range(len(sums[0])):
            for acc, part in zip(self._floats(), sums, strict=True):
                acc += part[c]
        self.bad.skipped += int(bad["skipped"])
        self.bad.by_reason.update(bad["by_reason"])
        self.bad.examples.extend(bad["examples"][: MAX_BAD_EXAMPLES - len(self.bad.examples)])
        self.id_width = max(self.id_width, id_width)
        self.rows += rows
        self.parsed_bytes += parsed_bytes
        if has_labels is not None:
            self.has_labels = has_labels if self.has_labels is None else self.has_labels

    def result(self, plan: Plan, inputs: Inputs, folds: FoldAssigner, shards: list[ShardInfo],
               output_bytes: int, seconds: float) -> WriteResult:
        if self.rows == 0 and self.bad.skipped:     # every row was bad: say why, not that there were none
            first = self.bad.examples[0]
            place = f"{first['file']}, " + (f"line {first['line']}" if first["line"] is not None
                                            else f"row {first['row']}")
            reasons = ", ".join(f"{n:,} {r}" for r, n in self.bad.by_reason.most_common(3))
            raise InputFormatError(f"every row of the inputs was skipped as bad ({reasons})", where=place,
                                   fix="run without --bad-rows skip to see the first bad row's error and its fix "
                                       "(a wrong data.format, separator or schema makes every row bad)")
        if self.rows == 0:
            raise InputFormatError("the inputs hold no rows", where=", ".join(str(p) for p in inputs.main[:3]),
                                   fix="check the --input paths (a folder or glob may have matched empty files)")
        stats: dict[str, dict[str, float]] = {}
        for g in self.groups():
            stats.update(g.result())
        f = plan.cfg.folds
        labels = plan.labels
        tally = self.split
        return WriteResult(
            shards=shards, rows=self.rows, rows_dict=tally.rows_dict(),
            folds={**tally.folds_dict(f.mode, f.key, labels[self.fold_label] if labels else "", f.seed),
                   **folds.describe()} if inputs.role == "train" else {"n_splits": 0, "sizes": []},
            label_rates=tally.label_rates() if self.has_labels else {},
            label_pair_rates=tally.label_pair_rates() if self.has_labels else {}, bad_rows=self.bad.to_dict(),
            column_stats=stats, id_dtype=f"<U{max(self.id_width, 1)}" if self.id_width else "int64",
            output_bytes=output_bytes, parsed_bytes=self.parsed_bytes, has_labels=bool(self.has_labels),
            seconds=seconds)


class StreamWriter:
    """The write pass over input files in order: split, folds, labels and ids of every chunk, its transform on
    a small thread pool, then (in input order) tallies and rows into `writer`. The single-process pass runs it
    over all inputs from row 0; a partition's worker over one file from that file's start row, physical
    position and stratified-fold class counts (`parallel.py`): the same code, so the same values per row."""

    def __init__(self, plan: Plan, inputs: Inputs, fitted: Fitted, loo: bool, folds: FoldAssigner,
                 tallies: WriteTallies, writer: ShardWriter, row: int = 0, position_base: int = 0) -> None:
        self.plan, self.inputs, self.folds, self.tallies, self.writer = plan, inputs, folds, tallies, writer
        self.transformer = ChunkTransformer(plan, fitted, loo)
        self.splitter = _Splitter(plan, inputs)
        self.row = row
        self.positions = _Positions(plan.cfg.format)
        self.positions.base = position_base
        for table in [*fitted.vocab.values(), *(t for pair in fitted.covisit.values() for t in pair)]:
            _ = table.index         # built here once, before transform threads share the tables

    def run(self, streams: list[tuple[bool, list[Path]]], bar: _Bar | None) -> None:
        """Every chunk of `streams` ((is_gold, paths) in order) into the writer."""
        plan, data, t = self.plan, self.plan.cfg, self.tallies
        labels = plan.labels
        folds = self.folds
        # chunks whose transform runs on the pool, finished (tallied, written) in input order; without the
        # compiled kernels a transform makes many chunk-sized temporaries (polars splits), so one at a time
        ahead = TRANSFORM_AHEAD if native() is not None else 1
        pending: deque[tuple[Any, np.ndarray, np.ndarray | None, np.ndarray, Future[Any]]] = deque()

        def finish() -> None:
            chunk, split, y, fold, job = pending.popleft()
            frame, n = chunk.frame, chunk.frame.height
            arrays, missing = job.result()
            t.update(plan, arrays, missing, y, split, fold, chunk.bad_rows)
            if y is not None:
                arrays["labels"] = y
            ids = id_array(frame, plan, self.positions(chunk))
            if ids.dtype.kind == "U":
                t.id_width = max(t.id_width, ids.dtype.itemsize // 4)
            arrays["ids"] = ids
            arrays["split"] = split
            arrays["fold"] = fold
            t.parsed_bytes += int(chunk.nbytes)
            if bar is not None:
                bar.advance(chunk, n)           # before add: a full-disk estimate counts this chunk as read
            self.writer.add(arrays)

        # gold rows get no fold and their own split: a gold file need not hold the key columns
        gold_columns = dataclasses.replace(plan.columns, keys=())
        with ThreadPoolExecutor(ahead, thread_name_prefix="ctrpipe-transform") as pool:
            for is_gold, paths in streams:
                for chunk in _chunks(plan, paths, require_labels=self.inputs.role == "train",
                                     columns=gold_columns if is_gold else None, gold=is_gold):
                    frame = chunk.frame
                    n = frame.height
                    idx = np.arange(self.row, self.row + n, dtype=np.int64)
                    self.row += n
                    t.rows += n
                    if t.has_labels is None:
                        t.has_labels = bool(chunk.has_labels) and bool(labels)
                    elif t.has_labels != (bool(chunk.has_labels) and bool(labels)):
                        raise InputFormatError("some inputs have label columns and others do not",
                                               where=str(chunk.source),
                                               fix="shard labelled and unlabelled files separately")
                    split = np.full(n, SPLIT_GOLD, np.int8) if is_gold else self.splitter(frame, idx)
                    y = labels_matrix(frame, labels) if t.has_labels else None
                    fold = np.full(n, -1, dtype=np.int8)
                    if folds.enabled and not is_gold:
                        when = fold_times(chunk, data.folds.time_key, folds.period_starts) \
                            if data.folds.mode == "time" and folds.period_starts is not None else None
                        fold = folds.assign(idx, label=y[:, t.fold_label] if y is not None else None,
                                            key_hash=fold_key_hash(plan, frame, idx), time=when)
                    pending.append((chunk, split, y, fold, pool.submit(self.transformer.transform, frame, split,
                                                                       str(chunk.source))))
                    if len(pending) >= ahead:
                        finish()
            while pending:
                finish()


def write_pass(plan: Plan, inputs: Inputs, fitted: Fitted, loo: bool, work: Path, done: set[int],
               on_shard: Callable[[ShardInfo], None], progress: bool) -> WriteResult:
    """Transform every row of the main then gold inputs, in order, into fixed-size shards under `work`."""
    t0 = time.perf_counter()
    folds = fold_assigner(plan, inputs)
    tallies = WriteTallies(plan, folds.cfg.n_splits)
    title = "write shards" + (" (pass 2)" if plan.needs_fit() and inputs.role == "train" else "")
    bar = _Bar(title, inputs.input_bytes, progress)
    writer = ShardWriter(work, plan.cfg.shard_rows, done=done, on_shard=on_shard)
    stream = StreamWriter(plan, inputs, fitted, loo, folds, tallies, writer)
    # outermost, so a full disk met by the writer thread (surfacing in add, close or __exit__) is one error
    with disk_full_as_error(work.parent, lambda: _cache_size_estimate(bar, writer, inputs.input_bytes),
                            RESUME_NOTE), bar, writer, small_pages():
        stream.run([(False, inputs.main), (True, inputs.gold)], bar)
        shards = writer.close()
    return tallies.result(plan, inputs, folds, shards, writer.bytes_written, time.perf_counter() - t0)

def _cache_size_estimate(bar: _Bar, writer: ShardWriter, input_bytes: int) -> str:
    """Roughly how big the whole cache gets: bytes per stored row x rows extrapolated from the input read."""
    if not (writer.row_bytes and bar.rows and bar.file_bytes):
        return ""
    rows = bar.rows * max(input_bytes, bar.file_bytes) / bar.file_bytes
    return (f"the whole cache needs about {human_bytes(rows * writer.row_bytes)}: ~{rows:,.0f} rows x "
            f"{writer.row_bytes} bytes, extrapolated from the {human_bytes(bar.file_bytes)} of "
            f"{human_bytes(input_bytes)} input read so far")


class _Positions:
    """Physical row position of every parsed row over all inputs (bad rows included), so positional ids
    (Criteo: id_offset + position, as Kaggle's test ids) stay right when malformed rows are skipped. CSV
    chunks carry their positions (header, comment lines and quoted line breaks are not rows)."""

    def __init__(self, fmt: str) -> None:
        self.first = 1 if fmt == "criteo" else 0       # text lines are 1-based, Parquet rows 0-based
        self.base = 0
        self.seen = 0
        self.source: Path | None = None

    def __call__(self, chunk: Any) -> np.ndarray:
        if chunk.source != self.source:
            self.base += self.seen
            self.source, self.seen = chunk.source, 0
        n = chunk.frame.height
        if getattr(chunk, "positions", None) is not None:
            self.seen = max(self.seen, int(chunk.records_end))
            return self.base + chunk.positions
        lines = getattr(chunk, "line_numbers", None)
        local = (np.asarray(lines, dtype=np.int64) if lines is not None
                 else chunk.first_line + np.arange(n, dtype=np.int64)) - self.first
        bad = [b.line if b.line is not None else b.row for b in chunk.bad_rows]
        ends = [int(local[-1]) + 1 if n else 0] + [int(x) - self.first + 1 for x in bad if x is not None]
        self.seen = max([self.seen, *ends])
        return self.base + local


def _stem(name: str) -> str:
    from ctrpipe.data.fitted import safe_name

    return safe_name(name)


class _Bar:
    """A rich progress bar over input bytes, showing rows/s and MB/s."""

    def __init__(self, title: str, total_bytes: int, enabled: bool) -> None:
        self.progress = make_progress(quiet=not enabled)
        self.title = title
        self.total = max(total_bytes, 1)
        self.rows = 0
        self.bytes = 0
        self.file_bytes = 0

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        self.task = self.progress.add_task(self.title, total=self.total, rate_text="")
        self.t0 = time.perf_counter()
        return self

    def advance(self, chunk: Any, rows: int) -> None:
        """Progress by on-disk bytes (file sizes are the total); MB/s shows parsed (uncompressed) bytes."""
        self.rows += rows
        self.bytes += int(chunk.nbytes)
        self.file_bytes += int(getattr(chunk, "file_bytes", 0) or chunk.nbytes)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, completed=min(self.file_bytes, self.total),
                             rate_text=f"{human_rate(self.rows / dt, 'rows/s')}  "
                                       f"{self.bytes / 1e6 / dt:.0f} MB/s")

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
