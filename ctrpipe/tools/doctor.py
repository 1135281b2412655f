"""`ctrpipe doctor`: is this environment able to run ctrpipe, and if not, what to do about it.

Versions of Python and the libraries ctrpipe needs (CUDA and cuDNN when torch has them), the devices torch
sees with their memory and compute capability, whether the compiled kernels (ctrpipe/native.py) are built
and on, whether TensorBoard events can be written, and a smoke test on every device: a tensor copied there,
a matmul checked against the CPU, and a backward through a dense layer and a sparse embedding (what training
does). Each failed check says how to fix it; any failure makes the command exit 1.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rich.table import Table

from ctrpipe.console import console

if TYPE_CHECKING:
    import torch

Status = Literal["ok", "warn", "fail"]
PACKAGES = ("ctrpipe", "torch", "numpy", "polars", "pyarrow", "xxhash", "typer", "rich", "pyyaml", "tensorboard",
            "matplotlib")
MODULES = {"pyyaml": "yaml"}             # import name where it is not the package's
REINSTALL = "reinstall ctrpipe's dependencies: pip install -e . (./test.sh and ./demo.sh do it in .venv)"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def run_doctor() -> list[Check]:
    """Every check, printed as a table on stderr; returns them (the CLI exits 1 on any failure)."""
    checks = collect()
    render(checks)
    return checks


def collect() -> list[Check]:
    checks = [Check("python", "ok" if sys.version_info >= (3, 10) else "fail",
                    f"{platform.python_version()} ({sys.executable})",
                    "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer")]
    checks += [_package(name) for name in PACKAGES]
    checks += _torch_build()
    checks += [_native(), _tensorboard()]
    checks += _devices()
    return checks


def _package(name: str) -> Check:
    """Installed, at least the version pyproject.toml asks for, and importable: a package that is installed
    but shadowed or broken (another copy earlier on the path, a half-removed install) passed the version
    lookup and failed the first command that imported it."""
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return Check(name, "fail", "not installed", f"{REINSTALL}, or pip install {name}")
    least = _least_version(name)
    if least is not None and _version_key(version) < _version_key(least):
        return Check(name, "fail", f"{version} installed, ctrpipe needs >= {least}",
                     f"{REINSTALL}, or pip install '{name}>={least}'")
    try:
        importlib.import_module(MODULES.get(name, name))
    except Exception as exc:    # whatever stops the import stops the commands that need it
        reason = (str(exc).splitlines() or [""])[0]
        if name == "matplotlib" and "backend" in reason and os.environ.get("MPLBACKEND"):
            # installed well: the environment names a backend it does not know (reinstalling changes nothing)
            return Check(name, "fail", f"{version} installed, but MPLBACKEND={os.environ['MPLBACKEND']!r} is no "
                                       "backend it knows", "unset MPLBACKEND, or set it to e.g. MPLBACKEND=Agg")
        return Check(name, "fail", f"{version} installed, but importing it fails: {type(exc).__name__}: {reason}",
                     f"{REINSTALL}; check that no other copy of {name} comes first on the Python path "
                     "(PYTHONPATH, the working folder)")
    return Check(name, "ok", version)


def _least_version(name: str) -> str | None:
    """The lowest version ctrpipe's own requirements allow for `name` ("torch>=2.1" -> "2.1"), if any."""
    try:
        requires = importlib.metadata.requires("ctrpipe") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", req)
        if m and m.group(1).lower().replace("_", "-") == name:
            return m.group(2)
    return None


def _version_key(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): the leading numbers, enough to compare with a >= bound."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _torch_build() -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check("torch import", "fail", str(exc), REINSTALL)]
    cuda = torch.version.cuda
    if cuda is None:
        gpu_here = shutil.which("nvidia-smi") is not None
        return [Check("CUDA", "warn" if gpu_here else "ok", "torch is a CPU build" +
                      (" but nvidia-smi is present" if gpu_here else ""),
                      "install a CUDA build of torch into .venv, then CTRPIPE_SKIP_TORCH=1 ./test.sh"
                      if gpu_here else "")]
    out = [Check("CUDA", "ok", f"torch built with CUDA {cuda}")]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out.append(Check("cuDNN", "ok" if cudnn else "warn", str(cudnn) if cudnn else "not available",
                     "" if cudnn else "install the cuDNN that matches this torch build (its CUDA wheel ships it)"))
    return out


def _native() -> Check:
    from ctrpipe.native import native, native_built

    if not native_built():
        return Check("compiled kernels", "warn", "not built: the shard build and lazy_adam take the slower "
                     "polars/numpy/torch paths (same results)",
                     "install a C compiler and the Python headers (e.g. apt-get install gcc python3-dev), "
                     "then pip install -e .")
    if native() is None:
        return Check("compiled kernels", "warn", "built, switched off by CTRPIPE_NATIVE=0", "unset CTRPIPE_NATIVE")
    return Check("compiled kernels", "ok", "built and on (ctrpipe/_native.c)")


def _tensorboard() -> Check:
    import tempfile

    try:
        from torch.utils.tensorboard import SummaryWriter

        with tempfile.TemporaryDirectory() as d:
            writer = SummaryWriter(d)
            writer.add_scalar("doctor", 1.0, 0)
            writer.close()
            written = any(Path(d).iterdir())
    except Exception as exc:   # whatever stops the run log stops training: report it, with the fix
        return Check("tensorboard events", "fail", f"{type(exc).__name__}: {exc}", REINSTALL)
    return Check("tensorboard events", "ok" if written else "fail", "writable" if written else "no event file",
                 "" if written else REINSTALL)


def _devices() -> list[Check]:
    import torch

    from ctrpipe.device import cpu_name

    out = [Check("cpu", "ok", f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
                 + _ram())]
    out.append(_smoke("cpu smoke test", torch.device("cpu")))
    if torch.version.cuda is None:
        return out
    if not torch.cuda.is_available():
        out.append(Check("cuda devices", "warn", "none visible to torch",
                         "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; train.device=cpu works "
                         "meanwhile"))
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(Check(f"cuda:{i}", "ok", f"{p.name}, {total / 1e9:.1f} GB ({free / 1e9:.1f} GB free), "
                         f"compute capability {p.major}.{p.minor}, bf16 "
                         f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
        out.append(_smoke(f"cuda:{i} smoke test", torch.device("cuda", i)))
    return out


def _smoke(name: str, device: torch.device) -> Check:
    """A tensor to `device`, a matmul checked against the CPU, a backward through a dense layer and a sparse
    embedding; the fix depends on where it broke."""
    import torch

    stage = "copying a tensor to the device"
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 32, generator=g), torch.randn(32, 16, generator=g)
        da, db = a.to(device), b.to(device)
        stage = "a matmul"
        got = (da @ db).cpu()
        if not torch.allclose(got, a @ b, rtol=1e-3, atol=1e-3):
            return Check(name, "fail", "a matmul differs from the CPU result",
                         "update the GPU driver / torch build; train on cpu meanwhile (train.device=cpu)")
        stage = "a backward pass"
        emb = torch.nn.Embedding(100, 16, sparse=True).to(device)
        layer = torch.nn.Linear(16, 1).to(device)
        ids = torch.randint(0, 100, (64, 4), generator=g).to(device)
        loss = layer(emb(ids).sum(1) + da[:, :16]).square().mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ok = emb.weight.grad is not None and emb.weight.grad.is_sparse and torch.isfinite(layer.weight.grad).all()
    except Exception as exc:  # a broken device shows up as any exception: report it with the fix
        return Check(name, "fail", f"{stage} failed: {type(exc).__name__}: {str(exc)[:200]}",
                     "check the driver and that the torch build matches it (python -c 'import torch; "
                     "print(torch.version.cuda)'); train with train.device=cpu meanwhile"
                     if device.type == "cuda" else REINSTALL)
    if not ok:
        return Check(name, "fail", "the backward pass gave no (finite) gradients", REINSTALL)
    return Check(name, "ok", "tensor copy, matmul (matches CPU), dense + sparse-embedding backward")


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f", {int(line.split()[1]) * 1024 / 1e9:.1f} GB RAM"
    except OSError:
        pass
    return ""


def render(checks: list[Check]) -> None:
    table = Table(title="ctrpipe doctor")
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col)
    colour = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
    console.print(table)
    failed = [c.name for c in checks if c.status == "fail"]
    warned = [c.name for c in checks if c.status == "warn"]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(failed)} (see the fix column)")
    else:
        console.print("[green]ready[/]" + (f" ({len(warned)} warning(s): {', '.join(warned)})" if warned else ""))
