"""Tiny feature specs and hand-built batches for the model-zoo tests (numeric, categorical, weighted multihot,
sequence), with labels that are a learnable function of the inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ctrpipe.features import FeatureSpec, FieldSpec
from ctrpipe.loader.batch import Batch


def make_spec(n_tasks: int = 1, numeric: bool = True, multihot: bool = True,
              sequence: bool = True) -> FeatureSpec:
    labels = tuple(f"y{t}" for t in range(n_tasks))
    return FeatureSpec(
        numeric=("I1", "I2", "I3") if numeric else (),
        # the history shares the candidate item's id space (data.sequence[].share_ids_with: item)
        categorical=(FieldSpec("C1", "categorical", 11), FieldSpec("C2", "categorical", 7),
                     FieldSpec("C3", "categorical", 23)) +
                    ((FieldSpec("item", "categorical", 17, id_space="item"),) if sequence else ()),
        multihot=(FieldSpec("tags", "multihot", 13, width=4, weighted=True),) if multihot else (),
        sequence=(FieldSpec("hist", "sequence", 17, width=5, id_space="item"),) if sequence else (),
        labels=labels,
        label_rates=tuple(0.1 + 0.2 * t for t in range(n_tasks)),
    )


def make_batch(spec: FeatureSpec, rows: int = 64, seed: int = 0) -> Batch:
    """Random ids/values of the right dtypes; task t's label depends on C1, C2 and the sign of I1."""
    g = torch.Generator().manual_seed(seed)
    numeric = torch.randn(rows, spec.n_numeric, generator=g) if spec.n_numeric else None
    cat = torch.stack([torch.randint(0, f.bins, (rows,), generator=g) for f in spec.categorical], 1).int()
    mh, mh_len, mh_w = [], [], []
    for f in spec.multihot:
        lengths = torch.randint(0, f.width + 1, (rows,), generator=g)
        tok = torch.randint(1, f.bins, (rows, f.width), generator=g)
        tok[torch.arange(f.width) >= lengths.unsqueeze(1)] = 0            # right-padded
        mh.append(tok.int())
        mh_len.append(lengths.int())
        mh_w.append(torch.rand(rows, f.width, generator=g) * (tok > 0) if f.weighted else None)
    seq, seq_len = [], []
    for f in spec.sequence:
        lengths = torch.randint(0, f.width + 1, (rows,), generator=g)
        tok = torch.randint(1, f.bins, (rows, f.width), generator=g)
        tok[torch.arange(f.width) >= lengths.unsqueeze(1)] = 0            # right-padded, most recent last
        seq.append(tok.int())
        seq_len.append(lengths.int())
    signal = (cat[:, 0] % 2) + (cat[:, 1] % 3 == 0)
    if numeric is not None:
        signal = signal + (numeric[:, 0] > 0)
    labels = torch.stack([((signal + t) % 2).float() for t in range(spec.n_tasks)], 1)
    return Batch(numeric=numeric, categorical=cat, labels=labels, row_index=torch.arange(rows),
                 multihot=tuple(mh), multihot_len=tuple(mh_len), multihot_weights=tuple(mh_w),
                 sequence=tuple(seq), sequence_len=tuple(seq_len))


# factories as fixtures: test modules never import conftest (several test folders have one)
@pytest.fixture
def spec_factory() -> Callable[..., FeatureSpec]:
    return make_spec


@pytest.fixture
def batch_factory() -> Callable[..., Batch]:
    return make_batch
