"""What a model needs to know about the data: field names, id-space sizes and widths, derived from a manifest.

Kept free of torch and of the on-disk format so models and the loader agree on one description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FieldKind = Literal["categorical", "multihot", "sequence"]


@dataclass(frozen=True)
class FieldSpec:
    """One id-valued field. Ids lie in [0, bins); 0 means missing (categorical) or padding (multihot/sequence)."""

    name: str
    kind: FieldKind
    bins: int
    width: int = 1          # max_len for multihot/sequence, 1 for categorical
    weighted: bool = False  # multihot with per-token weights
    # fields with the same non-empty id_space hold ids of one space (e.g. a candidate item column and the
    # history of items): equal raw values have equal ids, and models look them up in the same embedding rows
    id_space: str = ""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything a model's constructor may depend on. Column order matches the Batch tensors."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[FieldSpec, ...] = ()
    multihot: tuple[FieldSpec, ...] = ()
    sequence: tuple[FieldSpec, ...] = ()
    labels: tuple[str, ...] = ("label",)
    label_rates: tuple[float, ...] = (0.5,)  # positive rate per label on the train split (output-bias init)
    # (label a, label b, rate of both positive on the train split) per pair of labels: masked and AND heads
    # start from these (heads.head_rate); () for one label, or a cache built before they were recorded
    label_pair_rates: tuple[tuple[str, str, float], ...] = ()

    @property
    def n_numeric(self) -> int:
        return len(self.numeric)

    @property
    def n_tasks(self) -> int:
        return len(self.labels)

    @property
    def id_fields(self) -> tuple[FieldSpec, ...]:
        return self.categorical + self.multihot + self.sequence
