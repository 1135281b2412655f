"""Where a training step waits: a torch.profiler table of a few steps of one model fed by the shard loader.

Usage: python benchmarks/profile_step.py [--device cuda] [--model dcnv2] [--batch-size 16384] [--rows 400000]
                                         [--hash-bins 1000000] [--amp bf16] [--steps 10] [--threads 2]

The model, optimisers and step are bench_train.py's (its cache too: .bench/train/), so the profile is of the
run that benchmark times. Printed: the ops by self time on the device (CUDA) or the CPU, then the calls that make
the host wait inside a step (cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy without Async,
aten::item / aten::_local_scalar_dense, cudaEventSynchronize) with their counts per step: the loop should make
none. One sync at the end closes the profiled steps (as `ctrpipe train` syncs on its log steps). The counts are
of every thread: about one cudaEventSynchronize per step is the loader's own thread waiting until a pinned
buffer's copy has finished before it refills it (ctrpipe/loader/loader.py), not the step's. Figures:
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import Trainer, build_cache, endless, sync  # noqa: E402 - the sibling benchmark's parts

from ctrpipe.loader.loader import ShardLoader  # noqa: E402
from ctrpipe.loader.view import RowView  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "aten::item",
              "aten::_local_scalar_dense", "cudaEventSynchronize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="dcnv2")
    ap.add_argument("--batch-size", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--hash-bins", type=int, default=1_000_000)
    ap.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cache = build_cache(args.rows, args.hash_bins)
    loader = ShardLoader(cache, RowView.train(), args.batch_size, shuffle=True, seed=0, device=device,
                         drop_last=True)
    trainer = Trainer(args.model, [f"train.amp={args.amp}", f"train.device={args.device}"], loader.spec, device)
    stream = endless(loader)
    trainer.run(stream, 3)                                   # first touch, autotuning
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.run(islice(stream, args.steps), args.steps)
        sync(device)
    stream.close()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.model}, batch {args.batch_size}, amp {args.amp}, {args.steps} steps on {device}")
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    events = prof.key_averages()
    print("\ncalls that make the host wait, on any thread (per step; the step loop should have none, the closing "
          "sync aside; ~1 cudaEventSynchronize per step is the loader's thread before it refills a pinned buffer):")
    for e in events:
        if any(e.key == name or e.key.startswith(name + " ") for name in SYNC_CALLS):
            print(f"  {e.key}: {e.count} calls, {e.count / args.steps:.1f} per step")


if __name__ == "__main__":
    main()
