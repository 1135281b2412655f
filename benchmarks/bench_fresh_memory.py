"""Machine probe: what touching memory the machine has not used lately costs, next to memory just freed.

Usage: python benchmarks/bench_fresh_memory.py [--mb 546] [--rest 6] [--repeat 3] [--dir .bench/fresh]

Why: the shard benchmarks' kernel time (writing the cache into the page cache, zeroing pages for new arrays)
moves between identical runs. On a virtual machine whose balloon device reports free pages to its host
(virtio-balloon `free page reporting`), memory the guest freed a few seconds ago is handed back to the host, and
the next first touch of it faults on the host as well; memory freed a moment ago is reused at full speed. A build
that writes a 546 MB cache then pays for fresh pages, while a read-only baseline often reuses what the previous
process freed. This script measures both on this machine, in child processes, alternating:
  fresh:  after `--rest` seconds with nothing running (free memory handed back meanwhile, where it is);
  reused: right after another process touched and freed the same amount.
for (w) writing `--mb` MB into a new file (page cache) and (t) touching `--mb` MB of new anonymous memory
(numpy). Printed: medians, MB/s and fresh/reused ratios, and whether the balloon device offers free page
reporting (Linux sysfs; "unknown" elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import os, sys, time
import numpy as np
kind, mb, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
block = np.random.default_rng(0).integers(0, 255, size=1 << 20, dtype=np.uint8)
t0 = time.perf_counter()
if kind == "write":
    with open(path, "wb") as fh:
        for _ in range(mb):
            fh.write(block)
else:
    a = np.ones(mb << 17)          # float64: mb MiB
print(time.perf_counter() - t0)
"""


def free_page_reporting() -> str:
    """'yes' / 'no' for a virtio balloon device offering free page reporting (feature bit 5), else 'unknown'."""
    root = Path("/sys/bus/virtio/devices")
    if not root.is_dir():
        return "unknown"
    for dev in root.iterdir():
        try:
            if (dev / "device").read_text().strip() == "0x0005":
                bits = (dev / "features").read_text().strip()
                return "yes" if len(bits) > 5 and bits[5] == "1" else "no"
        except OSError:
            continue
    return "no balloon device"


def child(kind: str, mb: int, path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(mb), str(path)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=546, help="MiB per measurement (default: the 1M-row Parquet cache)")
    ap.add_argument("--rest", type=float, default=6.0, help="seconds of rest before a 'fresh' measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=REPO / ".bench" / "fresh")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    target, warm = args.dir / "probe.bin", args.dir / "warm.bin"
    times: dict[tuple[str, str], list[float]] = {(k, s): [] for k in ("write", "touch") for s in ("fresh", "reused")}
    try:
        for _ in range(args.repeat):
            for kind in ("write", "touch"):
                target.unlink(missing_ok=True)
                time.sleep(args.rest)
                times[kind, "fresh"].append(child(kind, args.mb, target))
                target.unlink(missing_ok=True)
                child(kind, args.mb, warm)          # touch the same amount, free it, measure at once
                warm.unlink(missing_ok=True)
                times[kind, "reused"].append(child(kind, args.mb, target))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{args.mb} MiB per measurement, {args.repeat} run(s) each (median); free page reporting: "
          f"{free_page_reporting()}; {os.cpu_count()} CPUs")
    print(f"{'':34}{'fresh s':>9}{'reused s':>10}{'fresh MB/s':>12}{'reused MB/s':>13}{'fresh/reused':>14}")
    for kind, label in (("write", "(w) write a new file (page cache)"), ("touch", "(t) touch new numpy memory")):
        f, r = statistics.median(times[kind, "fresh"]), statistics.median(times[kind, "reused"])
        print(f"{label:34}{f:9.3f}{r:10.3f}{args.mb / f:12,.0f}{args.mb / r:13,.0f}{f / r:14.1f}")


if __name__ == "__main__":
    main()
