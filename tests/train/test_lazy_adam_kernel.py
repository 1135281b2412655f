"""LazyAdam's compiled CPU step (`_native.sparse_adam`): agrees with the numpy + torch path, rejects bad ids.

Skipped where the kernel is not built; tests/train/test_optim.py runs LazyAdam's other tests on both paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctrpipe.native import native, native_built
from ctrpipe.train.optim import LazyAdam

pytestmark = pytest.mark.skipif(not native_built(), reason="the compiled kernel is not built")


def test_kernel_and_torch_paths_agree_on_skewed_ids(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CTRPIPE_NATIVE", "1")

    def train() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        emb, first = nn.Embedding(300, 8, sparse=True), nn.Embedding(300, 1, sparse=True)
        opt = LazyAdam([*emb.parameters(), *first.parameters()], lr=0.01)
        gen = torch.Generator().manual_seed(5)
        for _ in range(8):
            ids = torch.randint(0, 300, (256, 13), generator=gen) ** 2 % 300     # skewed: many repeats
            target = torch.randn(256, generator=gen)
            opt.zero_grad(set_to_none=True)
            ((emb(ids).sum(dim=(1, 2)) + first(ids).sum(dim=(1, 2)) - target) ** 2).mean().backward()
            opt.step()
        return emb.weight.detach().clone(), first.weight.detach().clone()

    kernel = train()
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    plain = train()
    for a, b in zip(kernel, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_rejects_an_id_outside_the_table_and_keeps_its_slots(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CTRPIPE_NATIVE", "1")
    kernel = native()
    assert kernel is not None
    table = np.zeros((5, 2), np.float32)
    m, v = np.zeros_like(table), np.zeros_like(table)
    slots = np.full(5, -1, np.int32)
    grads = np.ones((3, 2), np.float32)
    with pytest.raises(IndexError, match="id 7 at position 2 is outside the table's 5 rows"):
        kernel.sparse_adam(table, m, v, np.array([1, 1, 7]), grads, slots, 2, -0.1, 0.9, 0.999, 1e-8, 0.001)
    assert (slots == -1).all() and not table.any()          # nothing applied, scratch left clean
    assert kernel.sparse_adam(table, m, v, np.array([3, 1, 3]), grads, slots, 2, -0.1, 0.9, 0.999, 1e-8,
                              0.001) == 2
    assert (slots == -1).all() and table[[1, 3]].all() and not table[[0, 2, 4]].any()
