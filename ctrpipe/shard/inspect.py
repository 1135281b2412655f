"""Stage 2 check: `ctrpipe inspect DIR` re-reads every shard of a cache and checks it against its manifest
(shapes, dtypes, id ranges, token lengths, finite numerics, binary labels, split and fold sizes) before
hours of training are spent on it. Prints rich tables; returns False when any check fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from ctrpipe.console import console
from ctrpipe.data.fitted import Fitted
from ctrpipe.data.splits import NO_FOLD, SPLIT_CODES, SPLIT_VAL
from ctrpipe.errors import ManifestMismatchError
from ctrpipe.shard.manifest import ColumnSpec, Manifest, ShardInfo, read_manifest
from ctrpipe.shard.reader import map_array


@dataclass
class Check:
    name: str
    failures: list[str] = field(default_factory=list)
    done: int = 0                                   # number of arrays / columns examined
    shards: set[int] = field(default_factory=set)   # shards a per-column check read
    rates: int = 0                                  # label rates compared (the statistics check)

    def fail(self, msg: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(msg)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class ColumnRange:
    lo: float = np.inf
    hi: float = -np.inf
    bad: int = 0                                    # NaN/inf (numeric) or out-of-range ids
    total: float = 0.0                              # sum and count of the values: their mean
    n: int = 0

    def update(self, values: np.ndarray, bad: int = 0) -> None:
        """Widen the range by `values` (already without NaN/inf; may be empty) and count `bad` ones."""
        if len(values):
            self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
            self.total += float(values.sum(dtype=np.float64))
            self.n += len(values)
        self.bad += bad


class _Inspector:
    def __init__(self, root: Path, m: Manifest) -> None:
        self.root, self.m = root, m
        self.checks = {k: Check(k) for k in ("files", "rows", "numeric finite", "categorical ids", "tokens",
                                              "labels", "splits", "folds", "statistics", "fitted", "layout")}
        self.ranges: dict[str, ColumnRange] = {c.name: ColumnRange() for c in m.columns}
        self.split_rows = np.zeros(len(SPLIT_CODES), dtype=np.int64)
        self.shard = m.shards[0] if m.shards else None          # the shard being checked
        k = int(m.folds.get("n_splits", 0) or 0)
        self.fold_rows = np.zeros(max(k, 1), dtype=np.int64)
        labels = m.columns_of("label")
        self.label_sum = np.zeros((len(labels), len(SPLIT_CODES)))       # per label and split: label_rates
        self.label_n = np.zeros((len(labels), len(SPLIT_CODES)), dtype=np.int64)
        # per pair of labels and split: label_pair_rates (both positive), which masked heads start from
        self.pairs = [(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels))]
        self.pair_sum = np.zeros((len(self.pairs), len(SPLIT_CODES)))
        self.pair_n = np.zeros((len(self.pairs), len(SPLIT_CODES)), dtype=np.int64)

    def run(self) -> None:
        m = self.m
        start = 0
        for info in m.shards:
            if info.row_start != start:
                self.checks["rows"].fail(f"shard {info.index} starts at row {info.row_start}, "
                                         f"expected {start}")
            start += info.rows
            arrays = self._load(info)
            self.shard = info           # value failures name the shard and the first bad row
            self._check_numeric(arrays)
            self._check_categorical(arrays)
            self._check_tokens(arrays)
            self._check_labels(arrays)
            self._check_split_fold(arrays, info.index)
            self._tally_labels(arrays)
        total = m.rows.get("total", start)
        if start != total:
            self.checks["rows"].fail(f"shards hold {start} rows, the manifest says {total}")
        self.checks["rows"].done = len(m.shards)
        for name, code in SPLIT_CODES.items():
            if int(self.split_rows[code]) != int(m.rows.get(name, 0)):
                self.checks["splits"].fail(f"{name}: {int(self.split_rows[code])} rows in split.npy, "
                                           f"manifest says {m.rows.get(name, 0)}")
        sizes = [int(x) for x in m.folds.get("sizes", [])]
        if sizes and sizes != self.fold_rows.tolist():
            self.checks["folds"].fail(f"fold sizes {self.fold_rows.tolist()} != manifest {sizes}")
        self._check_statistics()
        self._check_fitted()
        layout = self.checks["layout"]
        if self.checks["splits"].ok and self.checks["folds"].ok and m.role == "train" and m.label_names:
            layout.done = 1
            for message in (msg for blocking, msg in m.layout_problems() if blocking):
                layout.fail(message)

    def _tally_labels(self, arrays: dict[str, np.ndarray]) -> None:
        y, split = arrays.get("labels"), arrays.get("split")
        if y is None or split is None or ((np.asarray(split) < 0) | (np.asarray(split) >= len(SPLIT_CODES))).any():
            return
        y, split = np.asarray(y), np.asarray(split)
        columns = self.m.columns_of("label")
        for t, c in enumerate(columns):
            v = y[:, c.index]
            ok = np.isfinite(v)
            self.label_sum[t] += np.bincount(split[ok], weights=v[ok], minlength=len(SPLIT_CODES))
            self.label_n[t] += np.bincount(split[ok], minlength=len(SPLIT_CODES))
        for k, (a, b) in enumerate(self.pairs):
            va, vb = y[:, columns[a].index], y[:, columns[b].index]
            ok = np.isfinite(va) & np.isfinite(vb)
            self.pair_sum[k] += np.bincount(split[ok], weights=va[ok] * vb[ok], minlength=len(SPLIT_CODES))
            self.pair_n[k] += np.bincount(split[ok], minlength=len(SPLIT_CODES))

    def _check_statistics(self) -> None:
        """The values against the min, max and mean the build recorded for each column: data overwritten or
        swapped after the build (same shapes, readable files) passes every other check. With a file
        unreadable, its rows are missing from every total: the 'files' check names it, and this one waits."""
        chk = self.checks["statistics"]
        if not self.checks["files"].ok:
            return
        for c in self.m.columns_of("numeric", "missing_indicator", "covisit", "categorical"):
            r, st = self.ranges[c.name], c.stats
            if not st or r.n == 0 or r.bad:
                continue
            chk.done += 1
            mean = r.total / r.n
            lo, hi = float(np.float32(r.lo)), float(np.float32(r.hi))
            if lo != st["min"] or hi != st["max"] or abs(mean - st["mean"]) > 1e-5 * max(1.0, abs(st["mean"])):
                chk.fail(f"{c.name}: min {lo:g}, max {hi:g}, mean {mean:.6g}; the build recorded min "
                         f"{st['min']:g}, max {st['max']:g}, mean {st['mean']:.6g} (data changed after the build)")
        columns = self.m.columns_of("label")
        for t, c in enumerate(columns):
            if not self.ranges[c.name].bad:             # values outside {0, 1}: the labels check says so
                self._compare_rates(self.m.label_rates.get(c.name, {}), self.label_sum[t], self.label_n[t],
                                    f"{c.name}: positive rate")
        for k, (a, b) in enumerate(self.pairs):
            first, second = columns[a].name, columns[b].name
            if not (self.ranges[first].bad or self.ranges[second].bad):    # {} in caches built before
                self._compare_rates(self.m.label_pair_rates.get(first, {}).get(second, {}), self.pair_sum[k],
                                    self.pair_n[k], f"{first} and {second}: rate of both positive")

    def _compare_rates(self, recorded: dict[str, float], sums: np.ndarray, counts: np.ndarray, what: str) -> None:
        """A rate per split as the shards give it (`sums` / `counts`) against the one the build recorded."""
        chk = self.checks["statistics"]
        for name, code in SPLIT_CODES.items():
            if name not in recorded or not counts[code]:
                continue
            chk.rates += 1
            rate = sums[code] / counts[code]
            if abs(rate - recorded[name]) > 1e-6:
                chk.fail(f"{what} {rate:.6g} on {name}, the build recorded {recorded[name]:.6g} (labels changed "
                         "after the build)")

    def _check_fitted(self) -> None:
        """A train cache's fitted statistics (vocabularies, co-visitation tables) must be readable: a test
        cache built with --stats-from and serving load them."""
        fitted = self.m.fitted
        if not fitted or fitted.get("cache") or not (fitted.get("vocab") or fitted.get("covisit")):
            return
        chk = self.checks["fitted"]
        chk.done += 1
        try:
            Fitted.load(self.root, fitted)
        except ManifestMismatchError as exc:
            chk.fail(exc.what)

    def _load(self, info: ShardInfo) -> dict[str, np.ndarray]:
        """Map every array the shard lists; each one the reader refuses is a 'files' failure, not a stop."""
        chk = self.checks["files"]
        out: dict[str, np.ndarray] = {}
        for group, a in info.files.items():
            chk.done += 1
            try:
                out[group] = map_array(self.root, info, group)
            except ManifestMismatchError as exc:
                chk.fail(f"{a.file}: {exc.what}")
        return out

    def _cols(self, group: str, *kinds: str) -> list[ColumnSpec]:
        return [c for c in self.m.columns if c.group == group and c.kind in kinds]

    def _at(self, bad: np.ndarray) -> str:
        """' in shard 3 (first at row 1,204 of the cache)' for the rows flagged in the current shard."""
        info = self.shard
        if info is None:
            return ""
        first = int(np.argmax(bad)) if bad.any() else 0
        return f" in shard {info.index} (first at row {info.row_start + first:,} of the cache)"

    def _check_numeric(self, arrays: dict[str, np.ndarray]) -> None:
        if "numeric" not in arrays:
            return
        x = np.asarray(arrays["numeric"])
        chk = self.checks["numeric finite"]
        for c in self._cols("numeric", "numeric", "missing_indicator", "covisit"):
            v = x[:, c.index]
            finite = np.isfinite(v)
            nbad = int((~finite).sum())
            vf = v[finite]
            self.ranges[c.name].update(vf, nbad)
            chk.done += 1
            chk.shards.add(self.shard.index if self.shard else 0)
            if nbad:
                chk.fail(f"{c.name}: {int(np.isnan(v).sum())} NaN and {int(np.isinf(v).sum())} inf values"
                         + self._at(~finite))

    def _check_categorical(self, arrays: dict[str, np.ndarray]) -> None:
        if "categorical" not in arrays:
            return
        x = np.asarray(arrays["categorical"])
        chk = self.checks["categorical ids"]
        for c in self._cols("categorical", "categorical"):
            v = x[:, c.index]
            nbad = int(((v < 0) | (v >= c.bins)).sum())
            self.ranges[c.name].update(v, nbad)
            chk.done += 1
            chk.shards.add(self.shard.index if self.shard else 0)
            if nbad:
                chk.fail(f"{c.name}: {nbad} ids outside [0, {c.bins}) (min {int(v.min())}, max {int(v.max())})"
                         + self._at((v < 0) | (v >= c.bins)))

    def _check_tokens(self, arrays: dict[str, np.ndarray]) -> None:
        chk = self.checks["tokens"]
        for c in self.m.columns_of("multihot", "sequence"):
            stem = c.group.removesuffix(".tokens")
            tok, ln = arrays.get(c.group), arrays.get(f"{stem}.len")
            if tok is None or ln is None:
                continue
            tok, ln = np.asarray(tok), np.asarray(ln)
            chk.done += 1
            chk.shards.add(self.shard.index if self.shard else 0)
            bad_len = int(((ln < 0) | (ln > c.width)).sum())
            bad_ids = int(((tok < 0) | (tok >= c.bins)).sum())
            pad = np.arange(tok.shape[1])[None, :] >= ln[:, None]               # (N, L) padding positions
            bad_pad = int((tok[pad] != 0).sum()) + int((tok[~pad] == 0).sum())
            self.ranges[c.name].update(ln, bad_len + bad_ids)
            if bad_len:
                chk.fail(f"{c.name}: {bad_len} lengths outside [0, {c.width}]" + self._at((ln < 0) | (ln > c.width)))
            if bad_ids:
                chk.fail(f"{c.name}: {bad_ids} token ids outside [0, {c.bins})"
                         + self._at(((tok < 0) | (tok >= c.bins)).any(axis=1)))
            if bad_pad:
                chk.fail(f"{c.name}: {bad_pad} tokens disagree with the lengths "
                         "(padding must be 0, tokens > 0)" + self._at(((tok != 0) == pad).any(axis=1)))
            w = arrays.get(f"{stem}.weights")
            if c.weighted and w is not None and not np.isfinite(np.asarray(w)).all():
                chk.fail(f"{c.name}: non-finite weights")

    def _check_labels(self, arrays: dict[str, np.ndarray]) -> None:
        if "labels" not in arrays:
            return
        y = np.asarray(arrays["labels"])
        chk = self.checks["labels"]
        for c in self._cols("labels", "label"):
            v = y[:, c.index]
            nbad = int(((v != 0) & (v != 1)).sum())
            finite = v[np.isfinite(v)]
            self.ranges[c.name].update(finite, nbad)
            chk.done += 1
            chk.shards.add(self.shard.index if self.shard else 0)
            if nbad:
                chk.fail(f"{c.name}: {nbad} values not in {{0, 1}}" + self._at((v != 0) & (v != 1)))

    def _check_split_fold(self, arrays: dict[str, np.ndarray], index: int) -> None:
        split, fold = arrays.get("split"), arrays.get("fold")
        if split is None or fold is None:
            self.checks["splits"].fail(f"shard {index}: split.npy or fold.npy missing")
            return
        split, fold = np.asarray(split), np.asarray(fold)
        self.checks["splits"].done += 1
        self.checks["folds"].done += 1
        if ((split < 0) | (split >= len(SPLIT_CODES))).any():
            self.checks["splits"].fail(f"shard {index}: split codes outside 0..{len(SPLIT_CODES) - 1}")
            return
        self.split_rows += np.bincount(split, minlength=len(SPLIT_CODES))
        k = int(self.m.folds.get("n_splits", 0) or 0)
        if ((fold < NO_FOLD) | (fold >= max(k, 0))).any():
            self.checks["folds"].fail(f"shard {index}: fold ids outside [{NO_FOLD}, {k})")
            return
        if k:
            cv = split <= SPLIT_VAL                 # train and val rows take part in CV
            if (fold[cv] < 0).any():
                self.checks["folds"].fail(f"shard {index}: train/val rows without a fold")
            if (fold[~cv] >= 0).any():
                self.checks["folds"].fail(f"shard {index}: gold/test rows assigned to a fold")
            self.fold_rows += np.bincount(fold[fold >= 0], minlength=k)[:k]


def inspect_cache(cache: Path) -> tuple[Manifest, dict[str, Check], dict[str, ColumnRange]]:
    """Run every check; (manifest, checks by name, observed range per column)."""
    m = read_manifest(Path(cache))
    ins = _Inspector(Path(cache), m)
    ins.run()
    return m, ins.checks, ins.ranges


def run_inspect(cache: Path) -> bool:
    """`ctrpipe inspect DIR`: print the checks and the per-column table; False when a check fails."""
    m, checks, ranges = inspect_cache(Path(cache))
    head = Table(title=f"cache {cache}", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("role / rows / shards", f"{m.role} / {m.total_rows:,} / {len(m.shards)}")
    head.add_row("input", f"{m.config.get('format', '?')}: {len(m.sources)} file(s)")
    labels = m.columns_of("label")
    if labels:
        head.add_row("labels", ", ".join(c.name + (f" ({c.transform}, from {c.source})" if c.transform else "")
                                         for c in labels))
    head.add_row("splits", ", ".join(f"{k} {v:,}" for k, v in m.rows.items() if v))
    if m.folds.get("n_splits"):
        head.add_row("folds", f"{m.folds['n_splits']} {m.folds.get('mode', '')}: {m.folds.get('sizes')}")
    head.add_row("fingerprint", f"{m.fingerprint[:16]} (schema {m.schema_fingerprint()[:16]})")
    if m.bad_rows.get("skipped"):
        head.add_row("bad rows skipped", str(m.bad_rows["skipped"]))
    console.print(head)

    cols = Table(title="columns")
    cols.add_column("column", no_wrap=True, overflow="fold")
    for name in ("kind", "dtype", "bins/width", "min", "max", "mean", "missing", "bad"):
        cols.add_column(name, justify="left" if name in ("kind", "dtype") else "right", overflow="fold")
    for c in m.columns:
        if c.kind == "id":
            continue
        r = ranges.get(c.name, ColumnRange())
        size = f"{c.bins}" + (f"/{c.width}" if c.kind in ("multihot", "sequence") else "") if c.bins else ""
        s = c.stats
        cols.add_row(c.name, c.kind, c.dtype, size, _fmt(r.lo), _fmt(r.hi), _fmt(s.get("mean")),
                     _fmt(s.get("missing_rate")), f"[red]{r.bad}[/]" if r.bad else "0")
    console.print(cols)

    res = Table(title="checks")
    for name in ("check", "result"):
        res.add_column(name, no_wrap=True)
    res.add_column("detail", overflow="fold")       # a cut detail hid the name of the missing file
    for chk in checks.values():
        if chk.failures:
            res.add_row(chk.name, "[bold red]FAIL[/]", "; ".join(chk.failures[:3])
                        + (f"; and {len(chk.failures) - 3} more" if len(chk.failures) > 3 else ""))
        elif chk.done or chk.rates:
            res.add_row(chk.name, "[green]ok[/]", _examined(chk))
        else:
            res.add_row(chk.name, "[dim]skipped[/]", "nothing examined: none of this kind in the cache, its "
                        "files missing, or values another check failed")
    console.print(res)
    print_cache_problems(m, warnings_only=True)       # the blocking ones fail the layout check above
    ok = all(c.ok for c in checks.values())
    damaged = any(not c.ok for name, c in checks.items() if name != "layout")
    if ok:
        console.print("[green]all checks passed[/]")
    elif not damaged:
        console.print("[bold red]the cache is whole, but training cannot use it as built[/] (the layout check "
                      "says why)\n  fix: build it again with the change that check names (`ctrpipe shard ... "
                      f"--out {cache} --force` and a --set)", highlight=False)
    else:
        console.print("[bold red]some checks failed[/]: the cache is damaged, or was changed after its build\n"
                      f"  fix: build it again (`ctrpipe shard ... --out {cache} --force`, with the inputs and "
                      "config it was built from: manifest.json records both)", highlight=False)
    return ok


# what one unit of Check.done is; the per-column checks count a column once in every shard
_UNITS = {"files": "file", "rows": "shard", "splits": "shard", "folds": "shard", "statistics": "column",
          "fitted": "set of tables", "layout": "cache"}


def _count(n: int, unit: str) -> str:
    return f"{n} {unit if n == 1 else 'sets of tables' if unit == 'set of tables' else unit + 's'}"


def _examined(chk: Check) -> str:
    """'13 files', '26 columns in 2 shards', '41 columns and 4 label rates': what a passed check looked at."""
    if chk.shards:                  # a per-column check, each column once in every shard it read
        return f"{_count(chk.done // len(chk.shards), 'column')} in {_count(len(chk.shards), 'shard')}"
    return _count(chk.done, _UNITS.get(chk.name, "item")) + (
        f" and {_count(chk.rates, 'label rate')}" if chk.rates else "")


def print_cache_problems(m: Manifest, warnings_only: bool = False) -> None:
    """A split or folds unlike what the config asked (`Manifest.layout_problems`) and columns a model can learn
    nothing from (`Manifest.column_problems`): said when the cache is built, and by `inspect`."""
    for blocking, message in m.layout_problems():
        if not (blocking and warnings_only):
            console.print(f"[{'bold red' if blocking else 'yellow'}]warning[/]: {escape(message)}", highlight=False)
    for message in m.column_problems():
        console.print(f"[yellow]warning[/]: {escape(message)}", highlight=False)


def _fmt(v: float | None) -> str:
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:.4g}"
