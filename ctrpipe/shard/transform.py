"""Stage 2: one parsed chunk (polars frame) -> the arrays of every shard group, vectorised per column.

`Plan` fixes which raw column becomes which stored column (and in what order); `ChunkTransformer` applies the
hashing / vocabularies / imputation / log1p / standardisation / co-visitation to a chunk. The same code runs
for train, gold and test inputs; only the fitted statistics it is given differ.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from ctrpipe.data.chunks import column_hashes, hashed_name
from ctrpipe.data.config import CovisitConfig, DataConfig, TokenColumnConfig
from ctrpipe.data.covisit import ContextTokens, covisit_features
from ctrpipe.data.fitted import Fitted, VocabTable, safe_name
from ctrpipe.data.hashing import field_seed, hash_ids, ids_from_hashes
from ctrpipe.data.schema import ResolvedColumns, closest
from ctrpipe.data.token_kernel import KeptTokens, kept_tokens
from ctrpipe.data.transforms import log1p_transform, polars_tokens_hashes, polars_tokens_to_ids
from ctrpipe.errors import ConfigError, SchemaError
from ctrpipe.shard.manifest import ColumnSpec

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Plan:
    """Resolved stored columns, in storage order, plus everything needed to compute them."""

    cfg: DataConfig
    columns: ResolvedColumns                # what the readers parse; the stored columns follow its order
    covisit: tuple[CovisitConfig, ...]      # with `name` filled in
    # the token separators are another cache's (a --stats-from build): a file written otherwise is to change,
    # not the config, whose separators must stay the train cache's
    separators_fixed: bool = False

    @property
    def numeric(self) -> tuple[str, ...]:
        return self.columns.numeric

    @property
    def categorical(self) -> tuple[str, ...]:
        return self.columns.categorical

    @property
    def multihot(self) -> tuple[TokenColumnConfig, ...]:
        return self.columns.multihot

    @property
    def sequence(self) -> tuple[TokenColumnConfig, ...]:
        return self.columns.sequence

    @property
    def labels(self) -> tuple[str, ...]:
        return self.columns.labels

    @property
    def id_column(self) -> str:
        return self.columns.id or ""

    @property
    def tokens(self) -> tuple[TokenColumnConfig, ...]:
        return self.columns.tokens

    def seed(self, fld: str) -> int:
        return field_seed(fld, self.cfg.hash_seed)

    def cat_bins(self, fld: str, fitted: Fitted) -> int:
        if self.cfg.categorical.mode == "vocab":
            return fitted.vocab[fld].bins
        return int(self.cfg.categorical.bins.get(fld, self.cfg.hash_bins))

    def token_seed(self, tc: TokenColumnConfig) -> int:
        """Tokens sharing a categorical column's id space hash with that column's seed (same value, same id)."""
        return self.seed(tc.share_ids_with or tc.column)

    def token_bins(self, tc: TokenColumnConfig, fitted: Fitted) -> int:
        if tc.share_ids_with:
            return self.cat_bins(tc.share_ids_with, fitted)
        return tc.bins or self.cfg.hash_bins

    def token_vocab(self, tc: TokenColumnConfig, fitted: Fitted) -> VocabTable | None:
        """The shared vocabulary a token column's ids come from (vocab mode), else None (hashed ids)."""
        if tc.share_ids_with and self.cfg.categorical.mode == "vocab":
            return fitted.vocab[tc.share_ids_with]
        return None

    def sharing(self, categorical: str) -> tuple[TokenColumnConfig, ...]:
        """Token columns whose ids live in `categorical`'s id space."""
        return tuple(tc for tc in self.tokens if tc.share_ids_with == categorical)

    def id_space(self, name: str) -> str:
        """The manifest's `id_space` of a categorical or token field: the shared categorical's name, or ''."""
        for tc in self.tokens:
            if tc.share_ids_with and name in (tc.column, tc.share_ids_with):
                return tc.share_ids_with
        return ""

    def token_keep(self, tc: TokenColumnConfig) -> str:
        """Sequences keep the most recent (last) tokens; multihot keeps the first ones."""
        return "last" if tc in self.sequence else "first"

    def numeric_layout(self) -> list[tuple[str, str, str, str]]:
        """(name, kind, transform, source) of each numeric.npy column, in order: numeric columns, missing
        indicators, co-visitation features (max, mean per entry)."""
        num = self.cfg.numeric
        tr = f"impute={num.impute},log1p={num.log1p}" + (",standardize" if num.standardize else "")
        cols = [(c, "numeric", tr, c) for c in self.numeric]
        if num.missing_indicator:
            cols += [(f"{c}_missing", "missing_indicator", "1 if missing", c) for c in self.numeric]
        cols += [(f"{cv.name}_{agg}", "covisit", f"{agg} n(t,c)/(n(c)+{cv.smoothing})",
                  f"{cv.target}|{cv.context}") for cv in self.covisit for agg in ("max", "mean")]
        return cols

    @property
    def fold_label(self) -> int:
        """Column of `labels` that stratified folds rank rows by (the first when the label is not stored)."""
        label = self.cfg.folds.label
        return self.labels.index(label) if label in self.labels else 0

    def needs_fit(self) -> bool:
        """Whether building needs train-split statistics (a first pass, or --stats-from for test data)."""
        num = self.cfg.numeric
        return bool(self.numeric and (num.impute != "zero" or num.standardize)) or bool(self.covisit) or (
            bool(self.categorical) and self.cfg.categorical.mode == "vocab")

    def fitted_keys(self) -> list[str]:
        """The settings that need train-split statistics (what `needs_fit` is true for), as config keys."""
        num, keys = self.cfg.numeric, []
        if self.numeric and num.impute != "zero":
            keys.append(f"data.numeric.impute={num.impute}")
        if self.numeric and num.standardize:
            keys.append("data.numeric.standardize=true")
        if self.categorical and self.cfg.categorical.mode == "vocab":
            keys.append("data.categorical.mode=vocab")
        if self.covisit:
            keys.append("data.covisit")
        return keys

    def read_columns(self) -> tuple[str, ...]:
        """Raw columns the transform reads (besides labels/id)."""
        return self.numeric + self.categorical + tuple(tc.column for tc in self.tokens)

    def column_specs(self, fitted: Fitted, id_dtype: str, stats: dict[str, dict[str, float]],
                     with_labels: bool) -> list[ColumnSpec]:
        """The manifest's columns, in storage order, with their output statistics.

        `with_labels` says whether the shards hold labels.npy: Criteo test text has no label field, so its
        plan still names the config's labels, but the manifest must list only what is on disk.
        """
        specs = [ColumnSpec(name, kind, "numeric", "float32", i, transform=tr, source=src,
                            stats=stats.get(name, {}))
                 for i, (name, kind, tr, src) in enumerate(self.numeric_layout())]
        cat_tr = ("vocab" + f",min_count={self.cfg.categorical.min_count}"
                  if self.cfg.categorical.mode == "vocab" else "hash")
        for i, c in enumerate(self.categorical):
            specs.append(ColumnSpec(c, "categorical", "categorical", "int32", i,
                                    bins=self.cat_bins(c, fitted), transform=cat_tr, source=c,
                                    stats=stats.get(c, {}), id_space=self.id_space(c),
                                    value_type=self.columns.value_type(c) or ""))
        for tc in self.tokens:
            kind = "sequence" if tc in self.sequence else "multihot"
            ids = "hash"
            if tc.share_ids_with:       # e.g. 'vocab of item_id' / 'hash of item_id'
                ids = ("vocab" if self.token_vocab(tc, fitted) is not None else "hash") + f" of {tc.share_ids_with}"
            specs.append(ColumnSpec(tc.column, kind, f"{safe_name(tc.column)}.tokens", "int32", 0,
                                    width=tc.max_len, bins=self.token_bins(tc, fitted), weighted=tc.weighted,
                                    transform=f"{ids},sep={tc.separator!r},keep={self.token_keep(tc)}",
                                    source=tc.column, stats=stats.get(tc.column, {}),
                                    id_space=self.id_space(tc.column),
                                    value_type=self.columns.value_type(tc.column) or ""))
        derived = {d.name: d for d in self.columns.derived}
        for i, lab in enumerate(self.labels if with_labels else ()):
            d = derived.get(lab)
            how = "" if d is None else (f"1 if matches {d.pattern!r}" if d.pattern else f"1 if in {list(d.positive)}")
            specs.append(ColumnSpec(lab, "label", "labels", "float32", i, source=d.column if d else lab,
                                    transform=how, stats=stats.get(lab, {})))
        specs.append(ColumnSpec("id", "id", "ids", id_dtype, 0, source=self.id_column or "row position",
                                transform="" if self.id_column else f"id_offset={self.cfg.id_offset}+row"))
        return specs


def make_plan(cfg: DataConfig, rc: ResolvedColumns) -> Plan:
    """Check names (files are named after token fields; co-visitation refers to known fields) and fill in
    co-visitation output names."""
    categorical = rc.categorical
    token_names = [tc.column for tc in rc.tokens]
    stems = [safe_name(t) for t in token_names]
    if len(set(stems)) != len(stems):
        raise SchemaError(f"token columns {token_names} map to clashing file names {stems}",
                          where="data.multihot / data.sequence", fix="rename the columns in the input")
    _check_shared_ids(cfg, rc)
    unknown = sorted(set(cfg.categorical.bins) - set(categorical))
    if unknown:         # a mistyped name left its column at data.hash_bins without a word
        raise ConfigError(f"data.categorical.bins names {unknown[0]!r}, which is not a categorical column",
                          where=f"data.categorical.bins.{unknown[0]}",
                          fix=f"{closest(unknown[0], list(categorical))} Name a column of data.categorical")
    covisit: list[CovisitConfig] = []
    for i, cv in enumerate(cfg.covisit):
        key = f"data.covisit[{i}]"
        if cv.target not in categorical:
            raise SchemaError(f"co-visitation target {cv.target!r} is not a categorical column",
                              where=f"{key}.target", fix=f"use one of {list(categorical)[:8]}")
        if cv.context not in token_names and cv.context not in categorical:
            raise SchemaError(f"co-visitation context {cv.context!r} is not a sequence, multihot or "
                              "categorical column", where=f"{key}.context",
                              fix=f"use one of {(token_names + list(categorical))[:8]}")
        name = cv.name or f"{cv.target}_x_{cv.context}"
        if name in [c.name for c in covisit]:      # two features of one name: the second shadows the first
            raise ConfigError(f"two co-visitation entries are named {name!r}", where=f"{key}",
                              fix="drop the repeated entry, or give one a distinct 'name'")
        covisit.append(dataclasses.replace(cv, name=name))
    return Plan(cfg, rc, tuple(covisit))


def _check_shared_ids(cfg: DataConfig, rc: ResolvedColumns) -> None:
    """`share_ids_with` must name a categorical column, and a token column's own bins must not contradict
    the id space it joins (one space has one size)."""
    for kind, tcs in (("sequence", rc.sequence), ("multihot", rc.multihot)):
        for i, tc in enumerate(tcs):
            share = tc.share_ids_with
            if not share:
                continue
            key = f"data.{kind}[{i}].share_ids_with"
            if share not in rc.categorical:
                raise ConfigError(f"{key} = {share!r} is not a categorical column",
                                  where=key,
                                  fix=f"name one of the categorical columns {list(rc.categorical)[:12]}, or "
                                      f"add {share!r} to data.categorical.columns")
            vocab = cfg.categorical.mode == "vocab"
            cat_bins = cfg.categorical.bins.get(share, 0 if vocab else cfg.hash_bins)
            if tc.bins and tc.bins != cat_bins:
                size = (f"data.categorical.bins.{share} = {cat_bins}" if cat_bins
                        else f"a vocabulary fitted on {share!r} and {tc.column!r}")
                raise ConfigError(f"data.{kind}[{i}].bins = {tc.bins} conflicts with the id space it shares "
                                  f"with {share!r} ({size})",
                                  where=f"data.{kind}[{i}].bins",
                                  fix=f"remove bins from the {tc.column!r} entry (it takes {share!r}'s)")


# ------------------------------------------------------------------------------------------ per chunk

def numeric32(frame: pl.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    """(N, F) float32, NaN where missing (null, NaN or +-inf, including values beyond float32 range)."""
    x = np.empty((len(names), frame.height), dtype=np.float32)      # (F, N): contiguous per-column writes
    for j, c in enumerate(names):
        s = frame[c]
        # float columns: to_numpy already turns nulls into NaN (fill_null would cost a lazy query per column)
        values = (s.fill_null(float("nan")) if s.null_count() and not s.dtype.is_float() else s).to_numpy()
        with np.errstate(over="ignore"):     # beyond float32 becomes inf, then missing: as documented, quietly
            x[j] = values
    np.copyto(x, np.float32(np.nan), where=np.isinf(x))             # NaN is already NaN
    return x.T                                                       # (N, F) view, Fortran order


class ChunkTokens:
    """The kept tokens of one chunk's token columns, hashed by the compiled kernel, each column split once.

    A column read in two id spaces, such as a sequence sharing item_id's vocabulary (hashed with item_id's
    seed for its ids and vocabulary counts) that is also a co-visitation context (hashed with its own seed),
    is split and hashed for both seeds in one pass; its readers (tasks on several threads) share the result.
    `kept` is None where the kernel cannot take the column: the caller then runs the polars path."""

    def __init__(self, plan: Plan, frame: pl.DataFrame, source: str = "", check: SeparatorCheck = "build") -> None:
        self.plan, self.frame, self.source = plan, frame, source        # source: the file, for errors
        self.check = check              # check_separator: see SeparatorCheck
        self._checked: set[str] = set()     # columns checked in this chunk (several readers split one column)
        self._kept: dict[tuple[str, int], KeptTokens | None] = {}
        self._lock = threading.Lock()                       # guards _kept and _columns
        self._columns: dict[str, threading.Lock] = {}       # one per token column, held while it is split

    def _seeds(self, tc: TokenColumnConfig) -> tuple[int, ...]:
        plan = self.plan
        own = plan.seed(tc.column)
        context = any(cv.context == tc.column for cv in plan.covisit)
        ids = plan.token_seed(tc)
        return (ids, own) if context and own != ids else (ids,)

    def kept(self, tc: TokenColumnConfig, seed: int) -> KeptTokens | None:
        key = (tc.column, seed)
        with self._lock:
            column = self._columns.setdefault(tc.column, threading.Lock())
        # a second reader of the column waits for the first one's split instead of repeating it; readers of
        # other columns go on
        with column:
            with self._lock:
                if key in self._kept:
                    return self._kept[key]
            seeds = self._seeds(tc)
            if seed not in seeds:
                seeds = (seed,)
            got = kept_tokens(self.frame[tc.column], tc.separator, self.plan.token_keep(tc), tc.max_len,
                              seeds[0], tc.weighted, seed2=seeds[1] if len(seeds) > 1 else None)
            with self._lock:
                self._kept[(tc.column, seeds[0])] = got
                if len(seeds) > 1:
                    self._kept[(tc.column, seeds[1])] = None if got is None else got.second()
                return self._kept[key]

    def forget(self, keep: set[tuple[str, int]]) -> None:
        """Drop the hashes of every (column, seed) not in `keep`: a chunk-sized array each."""
        with self._lock:
            for key in [k for k in self._kept if k not in keep]:
                del self._kept[key]

    def hashes(self, tc: TokenColumnConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """`transforms.tokens_hashes` of the column with `seed`: (M,) uint64 hashes, (N,) int64 lengths."""
        got = self.kept(tc, seed)
        self.check_column(tc)
        if got is not None:
            return got.hashes, got.lengths
        flat, lengths = polars_tokens_hashes(self.frame[tc.column], tc.separator, self.plan.token_keep(tc),
                                             tc.max_len, seed, weighted=tc.weighted)
        return np.asarray(flat, dtype=np.uint64), np.asarray(lengths, dtype=np.int64)

    def check_column(self, tc: TokenColumnConfig) -> None:
        """`check_separator` of the column, once per chunk whichever reader asks first."""
        with self._lock:
            if self.check == "off" or tc.column in self._checked:
                return
            self._checked.add(tc.column)
        check_separator(tc, self.frame[tc.column], self.source, fixed=self.check == "run")


OTHER_SEPARATORS = (",", "|", ";", "\t", " ")
_SEPARATOR_SAMPLE = 1000        # values of a chunk check_separator looks at


# when check_separator runs: "build" (a shard build: the config's separator can change), "run" (the separator
# is fixed by a trained run scoring a file, or by the train cache of a --stats-from build: the file must
# change), "off" (serving's request batches: too few rows to tell)
SeparatorCheck = Literal["build", "run", "off"]


def check_separator(tc: TokenColumnConfig, values: pl.Series, source: str = "", fixed: bool = False) -> None:
    """Refuse a separator that leaves many of a chunk's values whole while they are evidently lists split by
    another character (each such row would silently hold one token: a history all out-of-vocabulary, ids that
    never match the candidate's), or that leaves a space on most tokens ("a, b" split on ","; the ids of
    " b" and "b" differ). The first values of the chunk tell: one pass over at most 1,000 of them. Values
    that hold another separator inside their tokens ("Paris, France|Rome, Italy" split on "|", multi-word tags)
    pass (see the conditions below). `fixed`: the separator is the training data's, so the fix is the file's."""
    if tc.max_len < 2 or values.dtype != pl.String or not len(values):
        return
    sample = values.drop_nulls()
    sample = sample.filter(sample.str.len_bytes() > 0).head(_SEPARATOR_SAMPLE)
    n = sample.len()
    if n < 20:                  # too few values to tell lists from single tokens
        return
    where = source or f"data.sequence / data.multihot: {tc.column}"
    split = sample.str.contains(tc.separator, literal=True)
    whole, lists = sample.filter(~split), sample.filter(split)
    for other in OTHER_SEPARATORS:
        if other in tc.separator:
            continue
        found = whole.filter(whole.str.contains(other, literal=True))
        if other != " ":
            # lists of one item are common in histories: where the separator splits no value, a share of
            # values holding another separator tells; where it splits some, the other character is inside
            # their tokens ("Paris, France|Rome, Italy") unless it is missing there and leaves more whole
            inside = lists.len() and float(lists.str.contains(other, literal=True).mean() or 0.0) >= 0.5
            refuse = found.len() >= 0.2 * n if not lists.len() else \
                not inside and found.len() >= max(lists.len(), 0.5 * n)
        else:
            # a space also sits inside single tokens (multi-word tags): it tells only where the separator
            # splits nothing and the words are ids (digits in them), as a history's are
            parts = found.str.split(" ").explode()
            parts = parts.filter(parts.str.len_bytes() > 0)
            ids = float(parts.str.contains(r"^\w*\d\w*$").mean() or 0.0) if parts.len() else 0.0
            refuse = not split.any() and found.len() >= 0.2 * n and ids >= 0.9
        if refuse:
            raise ConfigError(f"{found.len() / n:.0%} of a chunk's values of token column {tc.column!r} contain "
                              f"{other!r} and not the separator {tc.separator!r} (e.g. {found[0][:60]!r}), so "
                              "each would be a single token", where=where,
                              fix=_written_with(tc) if fixed else f"set separator: {other!r} for {tc.column!r}" + (
                                  "" if found.len() > 0.9 * n else " (or write the column with one separator)"))
    spaced = lists.filter(lists.str.contains(tc.separator + " ", literal=True)) if tc.separator[-1:] != " " \
        else lists.head(0)
    if spaced.len() >= 0.5 * max(lists.len(), 1) and spaced.len() >= 10:
        raise ConfigError(f"the separator {tc.separator!r} of token column {tc.column!r} is followed by a space "
                          f"in {spaced.len() / lists.len():.0%} of a chunk's lists (e.g. {spaced[0][:60]!r}), so their "
                          "tokens would keep it (' b' is another id than 'b')", where=where,
                          fix=_written_with(tc) if fixed else
                          f"set separator: {tc.separator + ' '!r} for {tc.column!r}")


def _written_with(tc: TokenColumnConfig) -> str:
    return (f"write {tc.column!r} as the training data was: its items joined by {tc.separator!r} alone (the "
            f"training cache was built with separator {tc.separator!r}, and the ids depend on it)")


def context_tokens(plan: Plan, frame: pl.DataFrame, fld: str, tokens: ChunkTokens | None = None) -> ContextTokens:
    """Hashes of the tokens a row carries in `fld` (a token column or a categorical column); `tokens` shares
    the split of the chunk's token columns with their other readers."""
    for tc in plan.tokens:
        if tc.column == fld:
            flat, lengths = (tokens or ChunkTokens(plan, frame)).hashes(tc, plan.seed(fld))
            return ContextTokens(flat, lengths)
    h, missing = column_hashes(frame, fld, plan.seed(fld))
    return ContextTokens(h[~missing], (~missing).astype(np.int64))


def vocab_keys(plan: Plan, frame: pl.DataFrame, categorical: str, tokens: ChunkTokens | None = None) -> np.ndarray:
    """Hashes a vocabulary-mode categorical column counts on a chunk of train rows: its present values, then
    the kept tokens of every token column sharing its id space (hashed with its seed), so one vocabulary
    ranks values and tokens by their summed counts."""
    h, missing = column_hashes(frame, categorical, plan.seed(categorical))
    parts = [h[~missing]]
    for tc in plan.sharing(categorical):
        parts.append((tokens or ChunkTokens(plan, frame)).hashes(tc, plan.token_seed(tc))[0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


_STACK_VALUES = 1 << 16     # ChunkTransformer._categoricals: hashed columns together up to this many values


class ChunkTransformer:
    """Applies a plan with fixed fitted statistics to chunks; `loo_fitted` says whether train rows of this
    build were themselves counted (co-visitation leave-one-out)."""

    def __init__(self, plan: Plan, fitted: Fitted, loo_fitted: bool,
                 check_separators: SeparatorCheck | None = None) -> None:
        self.check_separators: SeparatorCheck = check_separators or ("run" if plan.separators_fixed else "build")
        self.plan = plan
        self.fitted = fitted
        self.loo_fitted = loo_fitted
        num = plan.cfg.numeric
        stats = [fitted.numeric.get(c) for c in plan.numeric]
        if any(s is None for s in stats) and (num.impute != "zero" or num.standardize):
            missing = [c for c, s in zip(plan.numeric, stats, strict=True) if s is None]
            raise SchemaError(f"no fitted statistics for numeric columns {missing[:5]}",
                              fix="build the train cache with the same numeric columns")
        self.fill = np.array([s.fill if s else 0.0 for s in stats], dtype=np.float32)
        self.mean = np.array([s.mean if s else 0.0 for s in stats], dtype=np.float32)
        self.std = np.array([s.std if s else 1.0 for s in stats], dtype=np.float32)

    def transform(self, frame: pl.DataFrame, split: np.ndarray, source: str = "") -> tuple[Arrays, np.ndarray]:
        """Arrays for every group except split/fold/ids/labels, plus (Fn,) raw-missing counts per numeric.npy
        column (only numeric columns can be missing; indicators and covisit features never are)."""
        plan, cfg = self.plan, self.plan.cfg
        n = frame.height
        out: Arrays = {}
        tokens = ChunkTokens(plan, frame, source, self.check_separators)
        layout = plan.numeric_layout()
        missing_counts = np.zeros(len(layout), dtype=np.int64)
        if layout:
            # (Fn, N) memory, used as its (N, Fn) transpose: per-column writes and per-column statistics are
            # contiguous; the writer thread makes the row-major copy the file needs
            num = np.empty((len(layout), n), dtype=np.float32).T
            k = len(plan.numeric)
            if k:
                # float32 early: log1p_transform works in float32 anyway, so the result is the same
                x = numeric32(frame, plan.numeric)                     # (N, k), NaN where missing
                missing = np.isnan(x)
                np.copyto(x, np.broadcast_to(self.fill, x.shape), where=missing)
                t = log1p_transform(x, cfg.numeric.log1p, out=num[:, :k])   # straight into the output
                if cfg.numeric.standardize:
                    t -= self.mean
                    t /= self.std
                missing_counts[:k] = np.count_nonzero(missing, axis=0)
                if cfg.numeric.missing_indicator:
                    num[:, k:2 * k] = missing
            col = len(layout) - 2 * len(plan.covisit)
            for cv in plan.covisit:
                num[:, col:col + 2] = self._covisit(frame, cv, split, tokens)
                col += 2
            tokens.forget({(tc.column, plan.token_seed(tc)) for tc in plan.tokens})   # contexts' own seeds
            out["numeric"] = num
        if plan.categorical:
            cat = np.empty((len(plan.categorical), n), dtype=np.int32)    # (Fc, N): contiguous writes
            self._categoricals(frame, cat)
            out["categorical"] = cat.T          # (N, Fc) view, column-major like "numeric" (see above)
        for tc in plan.tokens:
            bins, vocab = plan.token_bins(tc, self.fitted), plan.token_vocab(tc, self.fitted)
            kept = tokens.kept(tc, plan.token_seed(tc))
            ids, lengths, weights = kept.padded(tc.max_len, bins, vocab) if kept is not None else \
                polars_tokens_to_ids(frame[tc.column], tc.separator, tc.max_len, plan.token_seed(tc), bins,
                                     tc.weighted, plan.token_keep(tc), vocab)
            tokens.check_column(tc)
            tokens.forget({(t.column, plan.token_seed(t)) for t in plan.tokens if t != tc})
            stem = safe_name(tc.column)
            out[f"{stem}.tokens"] = np.asarray(ids, dtype=np.int32)
            out[f"{stem}.len"] = np.asarray(lengths, dtype=np.int32)
            if tc.weighted:
                out[f"{stem}.weights"] = np.asarray(weights, dtype=np.float32)
        return out, missing_counts

    def _categoricals(self, frame: pl.DataFrame, cat: np.ndarray) -> None:
        """cat[j] = ids of plan.categorical[j]. In a small chunk (serving's few rows) the columns a reader
        delivered already hashed (the Criteo kernel) go through `ids_from_hashes` together, one (k * N,) array
        per bin count: per column, its fixed cost of a dozen numpy calls would dominate. Same ids either way;
        large chunks go per column, without the (k, N) copy."""
        plan = self.plan
        have = set(frame.columns)
        together: dict[int, list[int]] = {}
        small = frame.height * len(plan.categorical) <= _STACK_VALUES
        for j, c in enumerate(plan.categorical):
            if small and plan.cfg.categorical.mode != "vocab" and c not in have and hashed_name(c) in have:
                together.setdefault(plan.cat_bins(c, self.fitted), []).append(j)
            else:
                cat[j] = self._categorical(frame, c)
        for bins, js in together.items():
            h = np.stack([frame[hashed_name(plan.categorical[j])].to_numpy() for j in js]).reshape(-1)
            cat[js] = ids_from_hashes(h, h == 0, bins).reshape(len(js), -1)     # column_hashes: 0 = missing

    def _categorical(self, frame: pl.DataFrame, name: str) -> np.ndarray:
        seed = self.plan.seed(name)
        if self.plan.cfg.categorical.mode == "vocab":
            return self.fitted.vocab[name].lookup(*column_hashes(frame, name, seed))
        bins = self.plan.cat_bins(name, self.fitted)
        if name in frame.columns:      # text: hashing fused with the modulo
            return hash_ids(frame[name], seed, bins)
        h, missing = column_hashes(frame, name, seed)
        return ids_from_hashes(h, missing, bins)

    def _covisit(self, frame: pl.DataFrame, cv: CovisitConfig, split: np.ndarray,
                 tokens: ChunkTokens) -> np.ndarray:
        pairs, ctx_table = self.fitted.covisit[cv.name]
        h, missing = column_hashes(frame, cv.target, self.plan.seed(cv.target))
        loo = (split == 0) if self.loo_fitted and cv.leave_one_out else np.zeros(frame.height, dtype=bool)
        return covisit_features(pairs, ctx_table, h, missing, context_tokens(self.plan, frame, cv.context, tokens),
                                cv.smoothing, loo)


def labels_matrix(frame: pl.DataFrame, labels: tuple[str, ...]) -> np.ndarray:
    """(N, T) float32 labels."""
    return frame.select([pl.col(c).cast(pl.Float32) for c in labels]).to_numpy(order="c").astype(np.float32)


def id_array(frame: pl.DataFrame, plan: Plan, position: np.ndarray) -> np.ndarray:
    """(N,) ids: the id column (int64, or unicode for strings) or id_offset + physical row position."""
    if not plan.id_column:
        return (position + plan.cfg.id_offset).astype(np.int64)
    s = frame[plan.id_column]
    if s.dtype.is_integer():
        return s.cast(pl.Int64).to_numpy()
    s = s.cast(pl.String).fill_null("")
    fast = ascii_unicode(s)
    return fast if fast is not None else np.asarray(s.to_numpy(), dtype=np.str_)


def ascii_unicode(s: pl.Series) -> np.ndarray | None:
    """The (N,) '<U{longest}' array `np.asarray(s.to_numpy(), dtype=np.str_)` gives for a String column with no
    nulls, built from its bytes: no Python string per row, which the write pass's main thread would build
    holding the GIL. None when some value is not ASCII (a byte is then not a character), or none has a
    character."""
    arr = s.to_arrow(compat_level=pl.CompatLevel.oldest())       # large_string: offsets + bytes
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if len(arr) == 0 or arr.null_count:
        return None
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    if len(data) and data.max() >= 0x80:
        return None
    lengths = np.diff(offsets)
    width = int(lengths.max())
    if width == 0:
        return None             # all empty: numpy's own width rule for '' decides
    if (lengths == width).all():
        raw = data.reshape(len(arr), width)
    else:       # row-major boolean assignment fills each row's first lengths[i] bytes in order, 0 after
        raw = np.zeros((len(arr), width), dtype=np.uint8)
        raw[np.arange(width) < lengths[:, None]] = data
    # an ASCII byte is its code point: widen each to a little-endian UCS4 unit, the '<U' layout
    return raw.astype("<u4").view(f"<U{width}").reshape(-1)


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (np.floating, np.integer)) else v) for k, v in d.items()}
