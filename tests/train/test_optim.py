"""LazyAdam (train/optim.py): the row-wise Adam for embedding tables matches torch's Adam and SparseAdam.

Every test runs twice: with the compiled kernel (`ctrpipe/_native.c`, skipped when it is not built) and with
the numpy + torch path (CTRPIPE_NATIVE=0).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ctrpipe.native import native_built
from ctrpipe.train.optim import LazyAdam


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def optimiser_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "kernel" and not native_built():
        pytest.skip("the compiled kernel is not built")
    monkeypatch.setenv("CTRPIPE_NATIVE", "1" if request.param == "kernel" else "0")
    return request.param


def _tables(rows: int, dim: int, n: int) -> list[nn.Embedding]:
    torch.manual_seed(0)
    first = nn.Embedding(rows, dim, sparse=True)
    out = [first]
    for _ in range(n - 1):
        twin = nn.Embedding(rows, dim, sparse=True)
        twin.weight.data.copy_(first.weight.data)
        out.append(twin)
    return out


def _step(table: nn.Embedding, ids: torch.Tensor, target: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    ((table(ids) - target) ** 2).sum().backward()
    opt.step()


def test_lazy_adam_equals_dense_adam_when_every_row_is_touched():
    lazy, dense_table = _tables(7, 3, 2)
    dense_table.sparse = False
    opt_lazy = LazyAdam(lazy.parameters(), lr=0.05)
    opt_dense = torch.optim.Adam(dense_table.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        # every row at least once, some rows several times (duplicates must be summed)
        ids = torch.cat([torch.arange(7), torch.randint(0, 7, (9,), generator=gen)]).view(4, 4)
        target = torch.randn(4, 4, 3, generator=gen)
        _step(lazy, ids, target, opt_lazy)
        _step(dense_table, ids, target, opt_dense)
    torch.testing.assert_close(lazy.weight, dense_table.weight, rtol=1e-5, atol=1e-6)


class _GpuDedup(LazyAdam):
    """LazyAdam taking the path it takes for GPU tables (no data-dependent sizes), here on CPU tensors."""

    @staticmethod
    def _sync_free(idx: torch.Tensor) -> bool:
        return True


@pytest.mark.parametrize("dedup", ["cpu", "gpu"])
def test_lazy_adam_equals_sparse_adam_and_leaves_untouched_rows_alone(dedup: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu: every occurrence carries its row's summed gradient and duplicates write the same values."""
    if dedup == "gpu":
        monkeypatch.setenv("CTRPIPE_NATIVE", "0")    # the compiled CPU step would take the table first
    lazy, ref = _tables(50, 4, 2)
    start = lazy.weight.detach().clone()
    opt_lazy = (LazyAdam if dedup == "cpu" else _GpuDedup)(lazy.parameters(), lr=0.01)
    opt_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        ids = torch.randint(0, 20, (8, 5), generator=gen)            # rows 20.. are never touched
        target = torch.randn(8, 5, 4, generator=gen)
        _step(lazy, ids, target, opt_lazy)
        _step(ref, ids, target, opt_ref)
    torch.testing.assert_close(lazy.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(lazy.weight[20:], start[20:])
    assert torch.count_nonzero(opt_lazy.state[lazy.weight]["exp_avg"][20:]) == 0


def test_lazy_adam_state_round_trip_continues_exactly():
    a, b = _tables(30, 2, 2)
    opt_a = LazyAdam(a.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 30, (6, 3), generator=gen), torch.randn(6, 3, 2, generator=gen))
               for _ in range(6)]
    for ids, target in batches[:3]:
        _step(a, ids, target, opt_a)
    b.weight.data.copy_(a.weight.data)
    opt_b = LazyAdam(b.parameters(), lr=0.02)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))   # as from a checkpoint file: no shared state
    for ids, target in batches[3:]:
        _step(a, ids, target, opt_a)
        _step(b, ids, target, opt_b)
    assert torch.equal(a.weight, b.weight)


def test_lazy_adam_one_column_tables_and_shared_ids_match_sparse_adam():
    # DeepFM's case: a (rows, 16) table and a (rows, 1) first-order table looked up with the same ids in one
    # optimiser: the shared deduplication and the bincount sum of one-column tables give SparseAdam's result
    torch.manual_seed(0)
    emb, first = nn.Embedding(40, 4, sparse=True), nn.Embedding(40, 1, sparse=True)
    ref_emb, ref_first = copy.deepcopy(emb), copy.deepcopy(first)
    opt = LazyAdam([*emb.parameters(), *first.parameters()], lr=0.03)
    ref = torch.optim.SparseAdam([*ref_emb.parameters(), *ref_first.parameters()], lr=0.03)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        ids = torch.randint(0, 25, (16, 6), generator=gen)          # duplicates in every step
        target = torch.randn(16, generator=gen)
        for (e, f), o in (((emb, first), opt), ((ref_emb, ref_first), ref)):
            o.zero_grad(set_to_none=True)
            ((e(ids).sum(dim=(1, 2)) + f(ids).sum(dim=(1, 2)) - target) ** 2).sum().backward()
            o.step()
    torch.testing.assert_close(emb.weight, ref_emb.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.weight, ref_first.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(first.weight[25:], ref_first.weight[25:])


def test_occurrence_sums_give_each_occurrence_its_rows_total() -> None:
    from ctrpipe.train.optim import occurrence_sums

    idx = torch.tensor([5, 2, 5, 9, 2, 5])
    values = torch.arange(12, dtype=torch.float32).view(6, 2)
    want = torch.stack([values[idx == i].sum(dim=0) for i in idx.tolist()])
    torch.testing.assert_close(occurrence_sums(idx, values), want)


def test_lazy_adam_steps_over_a_sparse_gradient_with_no_rows():
    """A batch whose histories are all empty gives the history tables a sparse gradient of 0 rows (DARE's
    packed search); reshaping its values with -1 failed."""
    table = _tables(6, 3, 1)[0]
    before = table.weight.detach().clone()
    opt = LazyAdam(table.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    table(torch.zeros(0, dtype=torch.long)).sum().backward()
    assert table.weight.grad is not None and table.weight.grad._nnz() == 0
    opt.step()
    torch.testing.assert_close(table.weight.detach(), before, rtol=0, atol=0)
    _step(table, torch.tensor([1, 2]), torch.ones(2, 3), opt)              # and goes on as usual
    assert not torch.equal(table.weight[1], before[1]) and torch.equal(table.weight[0], before[0])


@pytest.mark.parametrize("dedup", ["cpu", "gpu"])
@pytest.mark.parametrize("unscaled_first", [False, True])
def test_lazy_adam_under_a_grad_scaler_skips_overflowed_steps_itself(dedup: str, unscaled_first: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """train.amp=fp16: GradScaler read its inf flag with .item() before every LazyAdam step (a host sync per
    step on CUDA). LazyAdam takes the scale and the flag as tensors instead: scaled steps equal unscaled ones,
    and a step with an inf gradient leaves weights, moments and the step count as they were (on the GPU path
    by selection, nothing read back). `unscaled_first`: the grad_clip path, which unscales before the step."""
    if dedup == "gpu":
        monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    scaled, ref = _tables(30, 3, 2)
    opt = (LazyAdam if dedup == "cpu" else _GpuDedup)(scaled.parameters(), lr=0.02)
    opt_ref = LazyAdam(ref.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    assert opt._step_supports_amp_scaling       # what makes GradScaler hand over the flag instead of reading it
    gen = torch.Generator().manual_seed(4)
    for i in range(5):
        ids = torch.randint(0, 20, (6, 3), generator=gen)
        target = torch.randn(6, 3, 3, generator=gen)
        if i == 2:
            target[0, 0, 0] = float("inf")                  # this step's gradient overflows: skipped
        before = (scaled.weight.detach().clone(), copy.deepcopy(opt.state_dict()))
        opt.zero_grad()
        scaler.scale(((scaled(ids) - target) ** 2).sum()).backward()
        if unscaled_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert torch.equal(scaled.weight, before[0])
            after = opt.state_dict()["state"][0]
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(after[key], before[1]["state"][0][key]), key
            continue
        _step(ref, ids, target, opt_ref)
        torch.testing.assert_close(scaled.weight, ref.weight, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() < 1024.0 * 2 ** 4           # the overflow halved the scale once


@pytest.mark.parametrize("dedup", ["cpu", "gpu"])
def test_lazy_adam_on_dense_gradients_equals_adam(dedup: str) -> None:
    """A table built without sparse gradients gets LazyAdam's dense step, on either path."""
    a, b = _tables(12, 3, 2)
    a.sparse = b.sparse = False
    opt_a = (LazyAdam if dedup == "cpu" else _GpuDedup)(a.parameters(), lr=0.05)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        ids, target = torch.randint(0, 12, (5, 2), generator=gen), torch.randn(5, 2, 3, generator=gen)
        _step(a, ids, target, opt_a)
        _step(b, ids, target, opt_b)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,device,ema,table_copies", [
    ("adam", "cpu", 0.0, 4),           # weights, dense gradient, 2 moments
    ("lazy_adam", "cpu", 0.0, 1),      # moments mapped lazily: only touched pages count
    ("lazy_adam", "cuda", 0.0, 3),
    ("adagrad", "cpu", 0.999, 3),      # weights, 1 moment, the EMA copy
    ("sgd", "cpu", 0.0, 1),
])
def test_least_training_bytes_counts_each_optimizers_state(kind: str, device: str, ema: float,
                                                           table_copies: int) -> None:
    """The memory train refuses a model by before building it: the dense layers' weights, gradients and
    AdamW moments (4 copies, 5 with EMA) and the table's state per embedding optimiser, on a meta model."""
    from ctrpipe.train.config import TrainConfig
    from ctrpipe.train.optim import least_training_bytes

    with torch.device("meta"):
        model = nn.Sequential(nn.Embedding(1000, 8), nn.Linear(8, 4, bias=False))
    cfg = TrainConfig(embedding_optimizer=kind, ema=ema)  # type: ignore[arg-type]
    dense_copies = 4 + (ema > 0)
    assert least_training_bytes(model, cfg, torch.device(device)) == (1000 * 8 * table_copies
                                                                       + 8 * 4 * dense_copies) * 4
