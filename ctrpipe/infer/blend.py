"""Stage 6: `ctrpipe blend submissions`: combine submission files row-aligned by ID, in bounded memory.

Files may list IDs in different orders, and may hold tens of millions of rows, so alignment is an external
hash partition instead of an in-memory join:

1. partition: stream each file in chunks; hash every ID to 128 bits (two seeded xxh64 of its UTF-8 bytes,
   so a false match is ~2^-100 likely) and append (h1, h2, row, pred) to bucket file `h1 % P` of that file;
2. align: per bucket, sort each file's records by (h1, h2); refuse duplicates or IDs missing from a file;
   combine the aligned predictions with `ensemble.combine` and append (first-file row, blend) to the output
   range file `row // R`;
3. write: per range, scatter the blends into first-file row order and stream them out with the first
   file's IDs. The output keeps the FIRST file's row order and ID spelling: that is the order users diff
   against and graders expect (test-file order), and blending one file with itself gives it back (to the
   last digits logit_mean's round trip changes; `mean` exactly).

Memory is about (total records / P) x 32 bytes x a small sort factor; P is chosen from the input size.
`rank_avg` additionally holds one file's predictions (8 bytes a row) to rank them globally.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.atomic import pid_alive
from ctrpipe.console import console, human_rate, make_progress
from ctrpipe.data.hashing import xxh64_strings
from ctrpipe.errors import ConfigError, SubmissionError, disk_full_as_error, human_bytes, location
from ctrpipe.hostmem import open_file_limit
from ctrpipe.infer.config import check_trim_ratio
from ctrpipe.infer.ensemble import check_method, resolve_weights
from ctrpipe.infer.submission import (
    DEFAULT_CHUNK_BYTES,
    SubmissionWriter,
    check_out_file,
    id_at_rows,
    is_gzip_name,
    iter_submission,
    line_of,
    read_header,
)

REC = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("row", "<i8"), ("pred", "<f8")])   # 32 bytes per row
OUT = np.dtype([("row", "<i8"), ("pred", "<f8")])
SEED1, SEED2 = 0, 0x5EED_B1E2D           # two independent xxh64 seeds -> a 128-bit ID key
TARGET_BUCKET_BYTES = 16 << 20           # CSV bytes (all files) per bucket; ~4x that in RAM while aligning
REDO_BLEND = "the blend is redone from the start (its scratch files beside --out were removed)"


@dataclass(frozen=True)
class BlendReport:
    out: Path
    rows: int
    files: tuple[Path, ...]
    method: str
    weights: tuple[float, ...] | None
    partitions: int
    seconds: float


def parse_weights(text: str | Sequence[float] | None, n_files: int) -> tuple[float, ...] | None:
    """'0.5,0.3,0.2' -> floats; refuses non-numbers and a count that differs from the number of files."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--weights {text!r} is not a comma-separated list of numbers", where="--weights",
                          fix=f"e.g. --weights {','.join(['1'] * n_files)}") from None
    if len(weights) != n_files:
        raise ConfigError(f"{len(weights)} weights for {n_files} files", where="--weights",
                          fix=f"one weight per file, in file order: --weights {','.join(['1'] * n_files)}")
    return weights


def _check_inputs(files: Sequence[Path], out: Path) -> tuple[str, str]:
    if len(files) < 2:
        raise ConfigError(f"blending needs at least two files, got {len(files)}", where="FILES",
                          fix="e.g. ctrpipe blend submissions a.csv b.csv --out blend.csv")
    headers = [read_header(f) for f in files]
    for f, h in zip(files[1:], headers[1:], strict=True):
        if h != headers[0]:
            first = ",".join(headers[0])
            raise SubmissionError(f"header {','.join(h)!r} differs from {first!r} in {files[0]}",
                                  where=location(f, line=1),
                                  fix="blend files of the same competition and format (same header line)")
    resolved = {Path(f).resolve() for f in files}
    if len(resolved) != len(files):
        raise ConfigError("the same file is listed twice", where="FILES", fix="list each submission once")
    if Path(out).resolve() in resolved:
        raise ConfigError(f"--out {out} is one of the input files", where="--out",
                          fix="write the blend to a new file, e.g. --out blended.csv")
    return headers[0]


def _choose_partitions(files: Sequence[Path]) -> int:
    total = sum(Path(f).stat().st_size for f in files)
    return int(min(1024, max(1, math.ceil(total / TARGET_BUCKET_BYTES))))


FILES_KEPT_FREE = 64        # descriptors left to the rest of the process (inputs, output, imports, threads)


def _open_file_budget() -> int:
    """Bucket files a blend may hold open at once: the open-file limit (often 1024) less a margin.
    Each pass holds one file per bucket open, so more buckets than this fail with EMFILE."""
    return max(1, open_file_limit() - FILES_KEPT_FREE)


def _global_ranks_source(path: Path, chunk_bytes: int) -> np.ndarray:
    """All of one file's predictions, sorted (rank_avg ranks a row among the whole file)."""
    parts = [c.preds for c in iter_submission(path, chunk_bytes)]
    return np.sort(np.concatenate(parts))


def _to_rank(sorted_preds: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Average-rank of each value among `sorted_preds`, scaled to [0, 1] (same as ensemble.rank_normalise)."""
    n = sorted_preds.size
    if n <= 1:
        return np.full(p.size, 0.5)
    lo = np.searchsorted(sorted_preds, p, side="left")
    hi = np.searchsorted(sorted_preds, p, side="right") - 1
    return (lo + hi) / 2.0 / (n - 1)


def _partition_file(path: Path, j: int, tmp: Path, parts: int, chunk_bytes: int, rank: bool,
                    progress_cb: Callable[[int], None]) -> int:
    """Pass 1 for one file: append its (h1, h2, row, pred) records to `parts` bucket files; returns rows."""
    sorted_preds = _global_ranks_source(path, chunk_bytes) if rank else None
    handles = [open(tmp / f"f{j}_b{b}.bin", "wb") for b in range(parts)]  # noqa: SIM115 - closed below
    rows = 0
    chunks = iter_submission(path, chunk_bytes)
    try:
        for chunk in chunks:
            n = len(chunk.ids)
            rec = np.empty(n, dtype=REC)
            rec["h1"] = xxh64_strings(chunk.ids, SEED1)
            rec["h2"] = xxh64_strings(chunk.ids, SEED2)
            rec["row"] = np.arange(chunk.first_row, chunk.first_row + n, dtype=np.int64)
            rec["pred"] = _to_rank(sorted_preds, chunk.preds) if sorted_preds is not None else chunk.preds
            bucket = (rec["h1"] % np.uint64(parts)).astype(np.uint16)   # parts <= 1024
            order = np.argsort(bucket, kind="stable")                   # radix sort for 16-bit keys
            bounds = np.searchsorted(bucket[order], np.arange(parts + 1))
            rec = rec[order]
            for b in range(parts):
                if bounds[b + 1] > bounds[b]:
                    handles[b].write(rec[bounds[b]:bounds[b + 1]])   # not tofile: its short write has no errno
            rows += n
            progress_cb(n)
    finally:
        chunks.close()      # now, not at exit: a live reader's read-ahead thread aborts the interpreter
        for h in handles:
            h.close()
    return rows


@dataclass(frozen=True)
class _SortedKeys:
    order: np.ndarray       # (n,) record order by (h1, h2)
    h1: np.ndarray          # (n,) h1[order], contiguous
    h2: np.ndarray          # (n,) h2[order], contiguous


def _sort_keys(rec: np.ndarray) -> _SortedKeys:
    """Sort records by (h1, h2): one argsort on h1 (faster than lexsort); lexsort only if h1 ties."""
    h1 = np.ascontiguousarray(rec["h1"])
    order = np.argsort(h1)
    h1s = h1[order]
    if np.any(h1s[1:] == h1s[:-1]):         # a duplicate ID or a 64-bit collision: sort by both halves
        order = np.lexsort((rec["h2"], h1))
        h1s = h1[order]
    return _SortedKeys(order, h1s, np.ascontiguousarray(rec["h2"])[order])


def _refuse_duplicate(path: Path, rec: np.ndarray, keys: _SortedKeys) -> None:
    tie = keys.h1[1:] == keys.h1[:-1]
    if not tie.any():
        return
    dup = np.flatnonzero(tie & (keys.h2[1:] == keys.h2[:-1]))
    if dup.size:
        i = int(dup[0])
        order = keys.order
        r_a, r_b = sorted((int(rec["row"][order[i]]), int(rec["row"][order[i + 1]])))
        example = id_at_rows(path, [r_a]).get(r_a, "?")
        raise SubmissionError(f"duplicate ID {example!r} on lines {line_of(r_a)} and {line_of(r_b)}",
                              where=location(path, line=line_of(r_b)),
                              fix="keep one row per ID (each test row is predicted once)")


def _refuse_mismatch(files: Sequence[Path], j: int, rec0: np.ndarray, recj: np.ndarray) -> None:
    """Find one ID present in exactly one of files[0] / files[j] and refuse, naming it."""
    both = np.concatenate([rec0[["h1", "h2", "row"]], recj[["h1", "h2", "row"]]])
    src = np.r_[np.zeros(len(rec0), np.int8), np.ones(len(recj), np.int8)]
    order = np.lexsort((both["h2"], both["h1"]))
    h1, h2 = both["h1"][order], both["h2"][order]
    same_next = np.r_[(h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1]), False]
    same_prev = np.r_[False, same_next[:-1]]
    lonely = np.flatnonzero(~same_next & ~same_prev)
    assert lonely.size, "bucket keys differ but every key has a partner"
    k = order[int(lonely[0])]
    has, lacks = (files[0], files[j]) if src[k] == 0 else (files[j], files[0])
    row = int(both["row"][k])
    example = id_at_rows(has, [row]).get(row, "?")
    raise SubmissionError(f"ID {example!r} (line {line_of(row)} of {has}) is missing from {lacks}",
                          where=str(lacks), fix="blend submissions for the same test set: every file needs "
                                                "exactly the same IDs (in any order)")


def _align_bucket(files: Sequence[Path], b: int, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """(first-file rows (n,), predictions (M, n) aligned to them) for bucket b, after all checks."""
    recs = [np.fromfile(tmp / f"f{j}_b{b}.bin", dtype=REC) for j in range(len(files))]
    keys = [_sort_keys(r) for r in recs]
    for path, rec, key in zip(files, recs, keys, strict=True):
        _refuse_duplicate(path, rec, key)
    rec0, key0 = recs[0], keys[0]
    preds = np.empty((len(files), len(rec0)), dtype=np.float64)
    for j, (rec, key) in enumerate(zip(recs, keys, strict=True)):
        same = len(rec) == len(rec0) and np.array_equal(key.h1, key0.h1) and np.array_equal(key.h2, key0.h2)
        if not same:
            _refuse_mismatch(files, j, rec0, rec)
        preds[j, key0.order] = rec["pred"][key.order]
    return rec0["row"], preds


def run_blend(files: Sequence[Path], method: str, weights: str | Sequence[float] | None, out: Path,
              quiet: bool = False, *, partitions: int | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, trim_ratio: float = 0.1) -> BlendReport:
    """Blend submission files by ID with one `ensemble.combine` method; writes `out` atomically."""
    t0 = time.perf_counter()
    files = [Path(f) for f in files]
    out = Path(out)
    check_method(method, where="--method")
    check_out_file(out)
    w = parse_weights(weights, len(files))
    resolve_weights(method, len(files), w, None, 1.0, "--weights")  # refuse bad combinations before reading
    check_trim_ratio(trim_ratio, "--trim-ratio", len(files) if method == "trim_mean" else None)
    id_header, pred_header = _check_inputs(files, out)
    _warn_rank_scores_beside_probabilities(files, method)
    _warn_mixed_heads(files)
    # more, larger buckets than the open-file limit allows cost memory per bucket, not correctness
    parts = min(partitions or _choose_partitions(files), _open_file_budget())
    rank = method == "rank_avg"
    combine_method = "mean" if rank else method           # rank_avg: ranks are made globally in pass 1
    from ctrpipe.infer.ensemble import combine

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_blends(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.blend-{os.getpid()}-", dir=out.parent))
    except OSError as exc:      # the scratch folder beside --out: a name the user never gave
        raise SubmissionError(f"cannot create a scratch folder in {out.parent} ({exc.strerror or exc})",
                              where=f"--out {out}",
                              fix="write --out into a folder you can create files in") from None
    counts: list[int] = []
    try:
        with disk_full_as_error(out, lambda: _space_needed(files, counts), REDO_BLEND), \
                make_progress(quiet) as progress:
            for j, f in enumerate(files):
                task = progress.add_task(f"hash {f.name}", total=None)
                counts.append(_partition_file(f, j, tmp, parts, chunk_bytes, rank,
                                              lambda n, task=task: progress.advance(task, n)))
            n0 = counts[0]   # other files' counts are checked bucket by bucket, which can name an ID
            span = max(1, math.ceil(n0 / parts))   # output range file q holds rows [q*span, (q+1)*span)
            n_ranges = max(1, math.ceil(n0 / span))
            task = progress.add_task("align + blend", total=parts)
            range_files = [open(tmp / f"out_{q}.bin", "wb") for q in range(n_ranges)]  # noqa: SIM115
            try:
                for b in range(parts):
                    rows0, preds = _align_bucket(files, b, tmp)
                    blended = combine(preds, combine_method, weights=w, trim_ratio=trim_ratio)
                    res = np.empty(len(rows0), dtype=OUT)
                    res["row"], res["pred"] = rows0, blended
                    q = rows0 // span
                    order = np.argsort(q, kind="stable")
                    bounds = np.searchsorted(q[order], np.arange(n_ranges + 1))
                    res = res[order]
                    for r in range(n_ranges):
                        if bounds[r + 1] > bounds[r]:
                            range_files[r].write(res[bounds[r]:bounds[r + 1]])
                    for j in range(len(files)):
                        (tmp / f"f{j}_b{b}.bin").unlink()
                    progress.advance(task)
            finally:
                for h in range_files:
                    h.close()
            inputs = _input_records(files)    # hashed before the commit, which holds Ctrl-C while it runs
            reports: list[BlendReport] = []

            def record() -> None:
                reports.append(BlendReport(out=out, rows=n0, files=tuple(files), method=method, weights=w,
                                           partitions=parts, seconds=time.perf_counter() - t0))
                _write_record(reports[0], trim_ratio, inputs)

            task = progress.add_task("write", total=n0)
            _write_in_first_file_order(files[0], out, tmp, n0, span, (id_header, pred_header),
                                       chunk_bytes, lambda n: progress.advance(task, n), then=record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_summary(reports[0], quiet)
    return reports[0]


def _origin(f: Path) -> dict[str, object] | None:
    """Where a submission came from, by the record `ctrpipe infer` / `blend` wrote beside it: its run, config
    name, method and training-cache fingerprint; None without a readable record (the sha256 still identifies
    the file)."""
    record = f.with_name(f.name + ".json")
    if not record.is_file():
        return None
    try:
        doc = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {k: doc.get(k) for k in ("run", "exp_name", "method", "task", "shards_fingerprint", "blend")
            if k in doc}


def _warn_rank_scores_beside_probabilities(files: Sequence[Path], method: str) -> None:
    """rank_avg writes rank scores in [0, 1]: blended by any other method with probabilities, the result is
    neither (a rank of 0.9 reads as a 90% click chance). Told, not refused: the records may be out of date."""
    if method == "rank_avg":
        return
    methods = {f: (_origin(f) or {}).get("method") for f in files}
    ranked = [f for f, m in methods.items() if m == "rank_avg"]
    probs = [f for f, m in methods.items() if m is not None and m != "rank_avg"]
    if ranked and probs:
        console.print(f"[yellow]warning:[/] {ranked[0]} holds rank scores (its record: method rank_avg), "
                      f"{probs[0]} probabilities ({methods[probs[0]]}): a {method} of both is neither; blend "
                      "with --method rank_avg, or write every input with a probability method", highlight=False)


def _warn_mixed_heads(files: Sequence[Path]) -> None:
    """Submissions of different heads (a multi-task run's clicked and converted, each written as `clicked`
    by default) blend into a number that predicts neither. Told, not refused: the records may be out of date,
    and a blend of related heads can be meant."""
    tasks = {f: (_origin(f) or {}).get("task") for f in files}
    named = [(f, t) for f, t in tasks.items() if t]
    other = next(((f, t) for f, t in named if t != named[0][1]), None) if named else None
    if other is not None:
        console.print(f"[yellow]warning:[/] {named[0][0]} predicts head {named[0][1]!r} (its record), {other[0]} "
                      f"head {other[1]!r}: their blend predicts neither; blend submissions of one head "
                      "(ctrpipe infer --set infer.task=<head>)", highlight=False)


def _common_task(inputs: Sequence[dict[str, object]]) -> object:
    """The head every input predicts, as their records say (None when they differ or one has no record), so a
    blend of blends is checked too."""
    tasks = {(i.get("from") or {}).get("task") for i in inputs}  # type: ignore[union-attr]
    return tasks.pop() if len(tasks) == 1 else None


def _input_records(files: Sequence[Path]) -> list[dict[str, object]]:
    """Per input of a blend, its bytes' sha256 and, where the input has a record, where it came from (that
    record's run, config name and training-cache fingerprint)."""
    from ctrpipe.infer.predict import file_sha256

    inputs: list[dict[str, object]] = []
    for f in files:
        record = f.with_name(f.name + ".json")
        origin = _origin(f)
        inputs.append({"path": str(f.resolve()), "sha256": file_sha256(f), "bytes": f.stat().st_size,
                       "record": str(record.resolve()) if origin is not None else None, "from": origin})
    return inputs


def _write_record(r: BlendReport, trim_ratio: float, inputs: list[dict[str, object]]) -> Path:
    """`<out>.json`, as `ctrpipe infer` writes beside a submission: the blend's settings and its inputs
    (`_input_records`)."""
    from ctrpipe.atomic import write_json_atomic

    doc = {"blend": str(r.out.resolve()), "rows": r.rows, "method": r.method, "task": _common_task(inputs),
           "weights": list(r.weights) if r.weights is not None else None,
           "trim_ratio": trim_ratio if r.method == "trim_mean" else None, "inputs": inputs,
           "seconds": round(r.seconds, 3)}
    return write_json_atomic(r.out.with_name(r.out.name + ".json"), doc)


def _remove_dead_blends(out: Path) -> None:
    """Scratch folders of blends into `out` whose process is gone (killed: no cleanup ran). Each holds
    about the inputs' size in records, and nothing else would ever remove them."""
    for p in out.parent.glob(f".{out.name}.blend-*-*"):
        pid = p.name[len(out.name) + 8:].partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _write_in_first_file_order(first: Path, out: Path, tmp: Path, rows: int, span: int,
                               headers: tuple[str, str], chunk_bytes: int,
                               progress_cb: Callable[[int], None], then: Callable[[], object]) -> None:
    """Pass 3: stream the first file's IDs again and pair them with the blends of the same rows; `then`
    writes the blend's record, committed with it (`SubmissionWriter(then=)`)."""
    n_ranges = max(1, math.ceil(rows / span))
    pending_ids: list[pl.Series] = []       # IDs read from the first file but not yet written
    have = 0
    chunks = iter_submission(first, chunk_bytes)
    # an older blend's record never pairs with this one; a blend that fails keeps both
    with closing(chunks), SubmissionWriter(out, *headers, expected_rows=rows,
                                           stale=(out.with_name(out.name + ".json"),), then=then) as writer:
        for q in range(n_ranges):
            res = np.fromfile(tmp / f"out_{q}.bin", dtype=OUT)
            start = q * span
            vals = np.empty(len(res), dtype=np.float64)
            vals[res["row"] - start] = res["pred"]
            while have < len(res):
                ids = pl.Series("id", next(chunks).ids)
                pending_ids.append(ids)
                have += len(ids)
            ids = pl.concat(pending_ids) if len(pending_ids) > 1 else pending_ids[0]
            writer.write(ids[:len(res)], vals)
            rest = ids[len(res):]
            pending_ids, have = ([rest], len(rest)) if len(rest) else ([], 0)
            progress_cb(len(res))


def _space_needed(files: Sequence[Path], counts: Sequence[int]) -> str:
    """Roughly the peak disk use of a blend: every file's 32-byte records in scratch files beside --out
    (rows counted where pass 1 got that far, else extrapolated from the file's first lines), then the output
    (about the size of the first file) while its 16-byte range records still exist."""
    rows = [counts[j] if j < len(counts) else _rows_estimate(f) for j, f in enumerate(files)]
    first = Path(files[0]).stat().st_size
    need = max(REC.itemsize * sum(rows), OUT.itemsize * rows[0] + first)
    return f"the blend needs about {human_bytes(need)} ({sum(rows):,} rows over {len(files)} files)"


def _rows_estimate(path: Path, probe: int = 1 << 16) -> int:
    """Rows of a submission, extrapolated from its first 64 kB (low for gzip: its size is compressed)."""
    opener = gzip.open if is_gzip_name(Path(path)) else open
    with opener(path, "rb") as fh:
        head = fh.read(probe)
    size = len(head) if len(head) < probe else Path(path).stat().st_size
    return int(size * head.count(b"\n") / max(len(head), 1))


def _print_summary(r: BlendReport, quiet: bool) -> None:
    rate = human_rate(r.rows / max(r.seconds, 1e-9), "rows/s")
    weights = "" if r.weights is None else f" weights={','.join(f'{x:g}' for x in r.weights)}"
    if quiet:
        console.print(f"blended {len(r.files)} files, {r.rows:,} rows ({r.method}{weights}) -> {r.out} "
                      f"in {r.seconds:.1f}s ({rate})", highlight=False)
        return
    from rich.table import Table

    table = Table(title="blend", title_justify="left", show_header=False)
    table.add_row("files", "\n".join(str(f) for f in r.files))
    table.add_row("method", r.method + weights)
    table.add_row("rows", f"{r.rows:,}")
    table.add_row("partitions", str(r.partitions))
    table.add_row("time", f"{r.seconds:.1f}s ({rate})")
    table.add_row("written", str(r.out))
    console.print(table)
    if r.method == "rank_avg":
        console.print("  note: rank_avg writes rank scores in [0, 1], not calibrated probabilities")
