"""Benchmark: ctrpipe's CPU hot-spot code against the plain torch code it replaces, in the same run.

Usage: python benchmarks/bench_kernels.py [--batch 4096] [--rows 256864] [--reps 40] [--threads 2]

A/B pairs, each timed in alternation (A, B, B, A, ...) so a busy machine hurts both alike; medians:

* lazy_adam   one `LazyAdam` step of a (rows, 16) table from a batch of 26 zipf-distributed ids per row:
              the compiled kernel (`_native.sparse_adam`) vs the numpy + torch path (CTRPIPE_NATIVE=0).
              The table is evicted from the caches before each step, as a training step's activations do.
* cross       DCN-V2's 3 full-rank cross layers (429 wide) forward + backward: the hand-written backward
              (`fused.full_cross_tower`, which runs the tower padded to width 432) vs the same maths through
              autograd; and the hand-written tower at its default width (432: the bias column + alignment)
              vs the narrowest it can run (430: the bias column only, `fused.PAD_TO=1`).
* head/mlp    a 429-wide input in two parts (416 embedding columns | 13 raw numerics) -> Linear(429, 400):
              `fused.linear_over_parts` vs concatenating first.
* bf16        the cross tower and the first layer again under CPU bf16 autocast: the hand-written paths in bf16
              vs autograd under autocast (which keeps the cross tower's residual stream in fp32).
* attention   one layer of attention over 39 fields (AutoInt's: 2 heads of 8) forward + backward, batch x 39 x
              (3, 2, 8) in, in fp32 and in bf16: `attention._SmallAttention` (chunked batched GEMMs, hand-written
              backward) vs torch's `scaled_dot_product_attention`.

In a whole DCN v2 training step the hand-written paths also drop the (B, 829) concatenation of the cross and
deep outputs and a K=1 GEMM in the head, which these pairs do not time. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ctrpipe.hostmem import keep_freed_memory
from ctrpipe.models.layers import fused
from ctrpipe.models.layers.attention import _SmallAttention
from ctrpipe.models.layers.fused import full_cross_tower, linear_over_parts
from ctrpipe.native import native
from ctrpipe.train.optim import LazyAdam


def alternate(a: Callable[[int], None], b: Callable[[int], None], reps: int) -> tuple[float, float]:
    """Median seconds of a and b, called in alternation after 3 warm-up calls each."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(reps + 3):
        for which in ((0, 1) if i % 2 else (1, 0)):
            t = time.perf_counter()
            (a, b)[which](i)
            if i >= 3:
                times[which].append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_lazy_adam(args: argparse.Namespace) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    per_field = args.rows // 26
    batches = [torch.from_numpy((rng.zipf(1.2, (args.batch, 26)) % per_field + np.arange(26) * per_field)
                                .astype(np.int64)) for _ in range(8)]
    tables = {}
    for path in ("kernel", "torch"):
        torch.manual_seed(0)
        emb = nn.Embedding(args.rows, 16, sparse=True)
        tables[path] = (emb, LazyAdam(emb.parameters(), lr=1e-3))
    evict = np.zeros(64 << 20, np.uint8)
    target = torch.randn(args.batch, 26, 16)
    timed: dict[str, list[float]] = {"kernel": [], "torch": []}
    for i in range(args.reps + 3):                      # alternate like `alternate`, timing opt.step() alone
        for path in (("kernel", "torch") if i % 2 else ("torch", "kernel")):
            emb, opt = tables[path]
            os.environ["CTRPIPE_NATIVE"] = "1" if path == "kernel" else "0"
            opt.zero_grad(set_to_none=True)
            (emb(batches[i % 8]) * target).sum().backward()
            evict += 1                                  # cold caches, as after a step's forward/backward
            t = time.perf_counter()
            opt.step()
            if i >= 3:
                timed[path].append(time.perf_counter() - t)
    os.environ.pop("CTRPIPE_NATIVE", None)
    return statistics.median(timed["kernel"]), statistics.median(timed["torch"])


def bench_cross(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    layers = [nn.Linear(429, 429) for _ in range(3)]
    x0 = torch.randn(args.batch, 429, requires_grad=True)
    weight = torch.randn(429)

    def fused(_: int) -> None:
        out = full_cross_tower(x0, [lin.weight for lin in layers], [lin.bias for lin in layers])
        (out @ weight).sum().backward()

    def plain(_: int) -> None:
        x = x0
        for lin in layers:
            x = x0 * lin(x) + x
        (x @ weight).sum().backward()

    return alternate(fused, plain, args.reps)


def bench_cross_padding(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    layers = [nn.Linear(429, 429) for _ in range(3)]
    x0 = torch.randn(args.batch, 429, requires_grad=True)
    weight = torch.randn(429)

    def run(pad_to: int) -> Callable[[int], None]:
        def call(_: int) -> None:
            fused.PAD_TO = pad_to
            out = fused.full_cross_tower(x0, [lin.weight for lin in layers], [lin.bias for lin in layers])
            (out @ weight).sum().backward()
        return call

    padded, unpadded = alternate(run(16), run(1), args.reps)
    fused.PAD_TO = 16
    return padded, unpadded


def bench_first_layer(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    lin = nn.Linear(429, 400)
    emb = torch.randn(args.batch, 416, requires_grad=True)
    num = torch.randn(args.batch, 13)                   # raw numerics: no gradient
    grad = torch.randn(args.batch, 400)

    def parts(_: int) -> None:
        linear_over_parts(lin.weight, lin.bias, (emb, num)).backward(grad)

    def concat(_: int) -> None:
        lin(torch.cat([emb, num], dim=1)).backward(grad)

    return alternate(parts, concat, args.reps)


def bench_cross_bf16(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    layers = [nn.Linear(429, 429) for _ in range(3)]
    x0 = torch.randn(args.batch, 429, requires_grad=True)
    weight = torch.randn(429)

    def hand(_: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = full_cross_tower(x0, [lin.weight for lin in layers], [lin.bias for lin in layers], torch.bfloat16)
        (out.float() @ weight).sum().backward()

    def plain(_: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = x0
            for lin in layers:
                x = x0 * lin(x) + x
        (x.float() @ weight).sum().backward()

    return alternate(hand, plain, args.reps)


def bench_first_layer_bf16(args: argparse.Namespace) -> tuple[float, float]:
    torch.manual_seed(0)
    lin = nn.Linear(429, 400)
    emb = torch.randn(args.batch, 416, requires_grad=True)
    num = torch.randn(args.batch, 13)
    grad = torch.randn(args.batch, 400, dtype=torch.bfloat16)

    def parts(_: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear_over_parts(lin.weight, lin.bias, (emb, num), torch.bfloat16)
        out.backward(grad)

    def concat(_: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(torch.cat([emb, num], dim=1))
        out.backward(grad)

    return alternate(parts, concat, args.reps)


def bench_attention(dtype: torch.dtype) -> Callable[[argparse.Namespace], tuple[float, float]]:
    def bench(args: argparse.Namespace) -> tuple[float, float]:
        torch.manual_seed(0)
        B, F_, H, hd = args.batch, 39, 2, 8
        qkv = torch.randn(B, F_, 3, H, hd, dtype=dtype, requires_grad=True)
        grad = torch.randn(B, F_, H * hd, dtype=dtype)

        def small(_: int) -> None:
            _SmallAttention.apply(qkv).backward(grad)

        def sdpa(_: int) -> None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)                     # (B, H, F, hd) each
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.transpose(1, 2).reshape(B, F_, H * hd).backward(grad)

        return alternate(small, sdpa, args.reps)
    return bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=256_864, help="embedding table rows (bench_quality's table)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    pairs = [("cross (3 x 429, fwd+bwd)", "fused backward", "autograd", bench_cross),
             ("cross width (fused)", "432", "430", bench_cross_padding),
             ("first layer (416 | 13 -> 400)", "parts", "concat", bench_first_layer),
             ("cross, bf16 autocast", "hand bf16", "autograd", bench_cross_bf16),
             ("first layer, bf16 autocast", "parts bf16", "concat", bench_first_layer_bf16),
             ("attention 39 x (2 x 8), fp32", "chunked", "SDPA", bench_attention(torch.float32)),
             ("attention 39 x (2 x 8), bf16", "chunked", "SDPA", bench_attention(torch.bfloat16))]
    if native() is not None:
        pairs.insert(0, ("lazy_adam step", "kernel", "numpy+torch", bench_lazy_adam))
    else:
        print("lazy_adam: the compiled kernel is not built (pip install -e . with a C compiler): skipped")
    print(f"{'what':32} {'ctrpipe':>22} {'baseline':>22} {'speed-up':>9}")
    for what, a_name, b_name, fn in pairs:
        a, b = fn(args)
        print(f"{what:32} {a_name:>12} {a * 1e3:6.2f} ms {b_name:>12} {b * 1e3:6.2f} ms {b / a:8.2f}x")


if __name__ == "__main__":
    main()
