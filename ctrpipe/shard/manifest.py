"""The shard cache's table of contents. `manifest.json` is written last: its presence marks a complete cache.

Layout of a cache DIR (N = rows in that shard; F* = columns of a group; L = max_len of a field)::

    DIR/manifest.json
    DIR/shard_00000/numeric.npy        float32 (N, Fn)  numeric + missing indicators + co-visitation features
    DIR/shard_00000/categorical.npy    int32   (N, Fc)  per-field local ids; 0 = missing, 1 = OOV (vocab mode)
    DIR/shard_00000/labels.npy         float32 (N, T)   absent when the input has no labels
    DIR/shard_00000/ids.npy            int64 (N,) or unicode '<Uw' (N,)
    DIR/shard_00000/split.npy          int8    (N,)     0 train, 1 val, 2 gold, 3 test
    DIR/shard_00000/fold.npy           int8    (N,)     fold id in [0, K), -1 when not in any fold
    DIR/shard_00000/<field>.tokens.npy int32   (N, L)   multihot/sequence tokens, 0 = padding, left-aligned
                                                        (sequences: most recent last; <field> = safe_name)
                                                        e.g. history a,b,c, L = 5: [a, b, c, 0, 0], len 3;
                                                        more than L tokens: the most recent L are kept
    DIR/shard_00000/<field>.len.npy    int32   (N,)
    DIR/shard_00000/<field>.weights.npy float32 (N, L)  weighted multihot only

Example: row 3 of shard 0 has categorical column C2 at `categorical.npy[3, columns['C2'].index]`.

Shared id spaces: a token column with `share_ids_with: item_id` holds ids of the categorical column item_id's
space (same hashing seed and bins, or one vocabulary fitted over both); both columns record
`id_space="item_id"` and equal `bins`, so the same raw value has the same id in either.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ctrpipe import __version__
from ctrpipe.atomic import write_text_atomic
from ctrpipe.errors import REBUILD_CACHE_FIX, ManifestMismatchError
from ctrpipe.features import FeatureSpec, FieldSpec

if TYPE_CHECKING:
    from ctrpipe.data.config import DataConfig

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

ColumnKind = Literal["numeric", "missing_indicator", "covisit", "categorical", "multihot", "sequence",
                     "label", "id"]


@dataclass(frozen=True)
class ColumnSpec:
    """One stored column: which group file holds it, at which index, and how it was transformed."""

    name: str
    kind: ColumnKind
    group: str                 # file stem in a shard: "numeric", "categorical", "labels", "ids", "<f>.tokens"
    dtype: str                 # numpy dtype string of the group array, e.g. "float32", "int32", "<U12"
    index: int = 0             # column index within a 2-D group (0 for 1-D groups)
    width: int = 1             # max_len for multihot/sequence
    bins: int = 0              # id space [0, bins) for categorical/multihot/sequence
    transform: str = ""        # human-readable, e.g. "impute=median,log1p=signed,standardize"
    weighted: bool = False
    source: str = ""           # raw input column it came from
    stats: dict[str, float] = field(default_factory=dict)  # min, max, mean, missing_rate on the output
    # id fields sharing one id space (data.sequence[].share_ids_with) carry the same key: the categorical
    # column's name; "" = the field's own space
    id_space: str = ""
    # a Parquet categorical or token column's values as the training files stored them (schema.value_family:
    # text, integer, ...): files transformed with this cache's statistics must store them alike
    value_type: str = ""


@dataclass(frozen=True)
class ArrayInfo:
    file: str                  # relative to the cache dir
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ShardInfo:
    index: int
    rows: int
    row_start: int             # global index of the shard's first row
    files: dict[str, ArrayInfo]  # group -> array

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        """The inverse of `dataclasses.asdict` (a manifest entry, or a worker's report of the shards it wrote)."""
        return cls(index=int(d["index"]), rows=int(d["rows"]), row_start=int(d["row_start"]),
                   files={g: ArrayInfo(a["file"], tuple(int(x) for x in a["shape"]), a["dtype"])
                          for g, a in d["files"].items()})


@dataclass(frozen=True)
class SourceInfo:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    fingerprint: str
    config: dict[str, Any]                 # resolved `data` config section
    config_sources: dict[str, str]
    role: Literal["train", "test"]
    sources: tuple[SourceInfo, ...]
    columns: tuple[ColumnSpec, ...]
    shards: tuple[ShardInfo, ...]
    rows: dict[str, int]                   # total, train, val, gold, test
    folds: dict[str, Any]                  # n_splits, mode, key, sizes
    label_rates: dict[str, dict[str, float]]  # label -> split -> positive rate
    bad_rows: dict[str, Any]               # skipped, by_reason, examples
    fitted: dict[str, Any]                 # train-split statistics needed to transform other inputs
    stats_from: str = ""                   # fingerprint of the train cache whose statistics a test cache used
    gold_sources: int = 0                  # the last `gold_sources` entries of `sources` are --gold inputs
    build: dict[str, float] = field(default_factory=dict)  # seconds, rows/s, MB/s (not part of identity)
    # label a -> label b (later in label order) -> split -> rate of both positive; {} in caches built before
    label_pair_rates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    ctrpipe_version: str = __version__

    # ------------------------------------------------------------------ lookups
    def data_config(self, where: str = "manifest.json") -> DataConfig:
        """The `data` section the cache was built with: how raw rows become its columns (serving, runs)."""
        from ctrpipe.config import build_dataclass
        from ctrpipe.data.config import DataConfig

        return build_dataclass(DataConfig, self.config, "data.", where)

    def value_types(self) -> tuple[tuple[str, str], ...]:
        """(raw column, value family) of the Parquet categorical and token columns (ResolvedColumns')."""
        return tuple((c.source, c.value_type) for c in self.columns if c.value_type)

    def columns_of(self, *kinds: str) -> tuple[ColumnSpec, ...]:
        return tuple(c for c in self.columns if c.kind in kinds)

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in sorted(self.columns_of("label"), key=lambda c: c.index))

    def layout_problems(self) -> list[tuple[bool, str]]:
        """(blocking, message) for a split or folds that came out unlike what the config asked: they follow
        the data's keys, so one group key holding most rows (or a tiny input) can leave the val split, a fold
        or the train split near-empty. Blocking: training cannot use the cache as built (no train rows); an
        empty fold blocks only `train --kfold`, so it is warned of."""
        if self.role != "train" or not self.label_names:
            return []
        out: list[tuple[bool, str]] = []
        split = self.config.get("split", {}) or {}
        train, val = int(self.rows.get("train", 0)), int(self.rows.get("val", 0))
        ratio, mode = float(split.get("val_ratio", 0.0) or 0.0), split.get("mode", "random")
        by = f" (data.split.mode={mode}" + (f", key {split.get('key')!r}" if mode == "group" else "") + ")"
        if train + val and not train:
            out.append((True, f"no row went to the train split{by}: training has nothing to learn from; lower "
                              "data.split.val_ratio" + (" or use a key with more values" if mode == "group" else "")
                              + ", and shard again"))
        elif ratio and train + val and _off_share(val, train + val, ratio):
            share = val / (train + val)
            out.append((False, f"the val split holds {share:.1%} of the rows, where data.split.val_ratio asks "
                               f"{ratio:.1%}{by}" + ("; a few key values hold most rows" if mode == "group" else "")
                               + (": runs train without validation (no early stopping, no best step)"
                                  if not val else "")))
        sizes = [int(x) for x in self.folds.get("sizes", []) or []]
        k, total = len(sizes), sum(sizes)
        if k and total:
            key = self.folds.get("key") or self.folds.get("time_key") or ""
            mode = self.folds.get("mode", "")
            finer = "" if not key else f" or a finer time column than {key!r}" if mode == "time" else \
                f" or a key with more values than {key!r}"
            empty = [i for i, n in enumerate(sizes) if not n]
            big = max(range(k), key=lambda i: sizes[i])
            if empty:
                out.append((False, f"fold(s) {', '.join(map(str, empty))} of {k} ({mode}) hold no rows: "
                                  f"`ctrpipe train --kfold {k}` refuses this cache; use fewer folds "
                                  f"(data.folds.n_splits){finer}, and shard again"))
            elif sizes[big] > 2 * total / k and _off_share(sizes[big], total, 1 / k):
                out.append((False, f"fold {big} of {k} ({mode}) holds {sizes[big] / total:.0%} of the rows (an even "
                                   f"share is {1 / k:.0%}): its model trains on the other "
                                   f"{1 - sizes[big] / total:.0%}" + (f"; a few {key!r} values hold most rows"
                                                                      if key else "")))
        return out

    def column_problems(self) -> list[str]:
        """Columns that came out the same in every row, so a model can learn nothing from them: a categorical
        column missing everywhere (read from the wrong column, or null in the input) or with one id (one value,
        or every value rarer than min_count), a numeric one with one value, a token column whose lists are all
        empty (a sequence model then reads no history), a label of one class (a derived label whose pattern
        never matches). Said when the cache is built, and by `inspect`."""
        if self.role != "train" or not self.total_rows:     # a test file may be a handful of rows
            return []
        cat = self.config.get("categorical", {}) or {}
        out: list[str] = []
        for c in self.columns_of("categorical"):
            lo, hi = c.stats.get("min"), c.stats.get("max")
            if lo is None or lo != hi:
                continue
            why = ("is missing in every row" if lo == 0 else
                   f"has one id in every row: every value is out of the vocabulary (seen fewer than "
                   f"data.categorical.min_count={cat.get('min_count')} times in the train split, or beyond "
                   f"data.categorical.bins.{c.name})" if lo == 1 and cat.get("mode") == "vocab"
                   else "has one id in every row (one value, or values hashed into one bin)")
            out.append(f"categorical column {c.name!r} {why}: it carries nothing a model can learn from; check how "
                       "the input fills it, or leave it out (data.categorical.columns / pattern)")
        indicators = {c.source for c in self.columns_of("missing_indicator")}
        for c in self.columns_of("numeric"):
            lo, hi = c.stats.get("min"), c.stats.get("max")
            missing = float(c.stats.get("missing_rate", 0.0))
            if lo is None or lo != hi or (0 < missing < 1 and c.source in indicators):
                continue        # a flag (one value or missing) still varies in its missing indicator
            out.append(f"numeric column {c.name!r} holds one value in every row after its transform ({c.transform}"
                       f"; {missing:.0%} of them missing): it carries nothing a model can learn from; "
                       + ("keep what missing tells with data.numeric.missing_indicator: true, or " if 0 < missing < 1
                          else "") + "leave it out (data.numeric.columns / pattern)")
        for c in self.columns_of("label"):
            lo, hi = c.stats.get("min"), c.stats.get("max")
            if lo is not None and lo == hi:
                out.append(f"label {c.name!r} is {lo:g} in every row: its head has one class and no AUC; check how "
                           "it is made (data.labels, a derived label's values or pattern)")
        for c in self.columns_of("multihot", "sequence"):
            if c.stats.get("max") == 0:
                out.append(f"{c.kind} column {c.name!r} is empty in every row" + (
                    ": a sequence model reads no history" if c.kind == "sequence" else "")
                    + f"; check data.{c.kind}[].separator and the input column {c.source or c.name!r}")
        return out


    def feature_spec(self) -> FeatureSpec:
        """The model-facing description; numeric columns in `numeric.npy` order."""
        numeric = sorted(self.columns_of("numeric", "missing_indicator", "covisit"), key=lambda c: c.index)
        cats = sorted(self.columns_of("categorical"), key=lambda c: c.index)
        rates = tuple(float(self.label_rates.get(n, {}).get("train", 0.5)) for n in self.label_names)
        pairs = tuple((a, b, float(r["train"])) for a, with_a in self.label_pair_rates.items()
                      for b, r in with_a.items() if "train" in r)
        return FeatureSpec(
            numeric=tuple(c.name for c in numeric),
            categorical=tuple(FieldSpec(c.name, "categorical", c.bins, id_space=c.id_space) for c in cats),
            multihot=tuple(FieldSpec(c.name, "multihot", c.bins, c.width, c.weighted, id_space=c.id_space)
                           for c in self.columns_of("multihot")),
            sequence=tuple(FieldSpec(c.name, "sequence", c.bins, c.width, id_space=c.id_space)
                           for c in self.columns_of("sequence")),
            labels=self.label_names,
            label_rates=rates,
            label_pair_rates=pairs,
        )

    def schema_fingerprint(self) -> str:
        """Identity of the feature layout and hashing (what a checkpoint depends on), not of the rows."""
        cols = [(c.name, c.kind, c.group, c.index, c.width, c.bins, c.transform, c.weighted)
                + ((c.id_space,) if c.id_space else ())   # only when set: older caches keep their identity
                for c in self.columns if c.kind not in ("label", "id")]
        keys = {k: self.config.get(k) for k in ("hash_seed", "hash_bins")}
        return _sha256({"columns": cols, "hashing": keys, "fitted": self.fitted.get("identity", "")})

    # ------------------------------------------------------------------ io
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        d["sources"] = tuple(SourceInfo(**s) for s in d["sources"])
        d["columns"] = tuple(ColumnSpec(**c) for c in d["columns"])
        d["shards"] = tuple(ShardInfo.from_dict(s) for s in d["shards"])
        return cls(**d)


def _off_share(part: int, whole: int, share: float) -> bool:
    """Whether `part` of `whole` rows is far from `share` of them: under half or over twice that share, and
    beyond what chance gives a random assignment (3 binomial deviations: small inputs vary)."""
    got = part / whole
    spread = 3.0 * math.sqrt(share * (1.0 - share) / whole)
    return (got < share / 2 or got > 2 * share) and abs(got - share) > spread


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(config: dict[str, Any], sources: list[SourceInfo] | tuple[SourceInfo, ...],
                extra: Any = None) -> str:
    """Identity of a cache: resolved data config + source files (path, size, mtime) + format version."""
    return _sha256({"v": FORMAT_VERSION, "config": config, "sources": [asdict(s) for s in sources],
                    "extra": extra})


def source_info(path: Path) -> SourceInfo:
    st = Path(path).stat()
    return SourceInfo(path=str(Path(path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)


def write_manifest(cache_dir: Path, manifest: Manifest) -> Path:
    """Atomically write `manifest.json` (temp name + fsync + rename): the last step of every build."""
    cache_dir = Path(cache_dir)
    return write_text_atomic(cache_dir / MANIFEST_NAME, manifest.to_json())


def read_manifest(cache_dir: Path) -> Manifest:
    """Load and check a cache's manifest; a missing one means the cache is absent or was never finished."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        missing = "the folder does not exist" if not cache_dir.exists() else "it is a file, not a folder" \
            if not cache_dir.is_dir() else f"{MANIFEST_NAME} is missing"
        raise ManifestMismatchError(
            f"no complete shard cache at {cache_dir} ({missing})",
            where=str(cache_dir),
            fix="build it with `ctrpipe shard --cfg CFG --input FILE --out DIR` (an interrupted build is "
                "finished by running the same command again)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestMismatchError(f"{MANIFEST_NAME} is not valid JSON ({exc})", where=str(path),
                                    fix=REBUILD_CACHE_FIX) from None
    if not isinstance(raw, dict):
        raise ManifestMismatchError(f"{MANIFEST_NAME} holds a JSON {type(raw).__name__}, not a manifest",
                                    where=str(path), fix=REBUILD_CACHE_FIX)
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestMismatchError(
            f"shard format version {version}, this ctrpipe reads version {FORMAT_VERSION}", where=str(path),
            fix=REBUILD_CACHE_FIX)
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:      # edited by hand, or cut and patched
        raise ManifestMismatchError(f"{MANIFEST_NAME} does not hold a whole manifest ({type(exc).__name__}: "
                                    f"{exc})", where=str(path), fix=REBUILD_CACHE_FIX) from None
    _check_columns_on_disk(manifest, path)
    return manifest


def _check_columns_on_disk(manifest: Manifest, path: Path) -> None:
    """Every listed column's array must be in every shard: readers trust the columns to say what exists.

    Unlabelled test caches built before the manifest followed the disk listed the config's label columns
    without any labels.npy; they are refused here with the rebuild command rather than failing in a reader.
    """
    for col in manifest.columns:
        lacking = [s.index for s in manifest.shards if col.group not in s.files]
        if lacking:
            raise ManifestMismatchError(
                f"the manifest lists column {col.name!r} ({col.kind}) in array '{col.group}', but "
                f"{len(lacking)} of {len(manifest.shards)} shards have no {col.group}.npy "
                f"(first: shard {lacking[0]})",
                where=str(path),
                fix=REBUILD_CACHE_FIX)
