"""`ctrpipe doctor` through the CLI: it passes on a working environment (what CI runs it on) and names a
broken piece with its fix."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctrpipe.cli import app

runner = CliRunner()
WIDE = {"COLUMNS": "250"}   # rich wraps table cells at 80 columns without a terminal


def test_doctor_passes_here_with_versions_devices_and_a_smoke_test() -> None:
    res = runner.invoke(app, ["doctor"], env=WIDE)
    assert res.exit_code == 0, res.output
    out = res.output
    for name in ("python", "torch", "numpy", "polars", "pyarrow", "tensorboard", "compiled kernels", "cpu smoke test"):
        assert name in out, name
    assert importlib.metadata.version("torch") in out
    assert "tensor copy, matmul (matches CPU), dense + sparse-embedding backward" in out
    assert "ready" in out and "failed" not in out


def test_doctor_names_a_missing_package_and_its_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "polars":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)   # the package index of this environment
    res = runner.invoke(app, ["doctor"], env=WIDE)
    assert res.exit_code == 1, res.output
    line = next(line for line in res.output.splitlines() if "polars" in line and "not installed" in line)
    assert "fail" in line and "pip install" in line
    assert "1 check(s) failed: polars" in res.output


def test_doctor_warns_when_the_kernels_are_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from ctrpipe.native import native_built

    if not native_built():
        pytest.skip("the compiled kernels are not built here")
    monkeypatch.setenv("CTRPIPE_NATIVE", "0")
    res = runner.invoke(app, ["doctor"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "switched off by CTRPIPE_NATIVE=0" in res.output and "unset CTRPIPE_NATIVE" in res.output


@pytest.mark.parametrize("module", ["matplotlib", "xxhash"])
def test_doctor_imports_each_package_it_lists(tmp_path, module: str) -> None:
    """A package installed but shadowed by a broken copy earlier on the path passed doctor ("ready"), and the
    first command that imported it (report: matplotlib; shard: xxhash) ended in a traceback."""
    shadow = tmp_path / module
    shadow.mkdir()
    (shadow / "__init__.py").write_text('raise ImportError("a broken copy")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "250"}
    res = subprocess.run([sys.executable, "-m", "ctrpipe.cli", "doctor"], env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    line = next(line for line in out.splitlines() if line.strip("│ ").startswith(module))
    assert "fail" in line and "importing it fails: ImportError: a broken copy" in line and "Python path" in out
    assert f"1 check(s) failed: {module}" in out


def test_doctor_names_a_package_older_than_ctrpipe_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.20.0" if name == "numpy" else real(name))
    res = runner.invoke(app, ["doctor"], env=WIDE)
    assert res.exit_code == 1, res.output
    line = next(line for line in res.output.splitlines() if line.strip("│ ").startswith("numpy"))
    assert "1.20.0 installed, ctrpipe needs >= 1.24" in line and "pip install 'numpy>=1.24'" in line


def test_a_backend_matplotlib_does_not_know_is_named_by_doctor_and_report(tmp_path: Path) -> None:
    """(a helper's sweep) MPLBACKEND=nonsense ended `ctrpipe report` in matplotlib's traceback, and doctor told
    to reinstall the dependencies, which changes nothing: the environment variable is what to change."""
    env = {**os.environ, "MPLBACKEND": "nonsense", "COLUMNS": "250"}
    res = subprocess.run([sys.executable, "-m", "ctrpipe.cli", "doctor"], env=env, capture_output=True, text=True,
                         timeout=300)
    out = res.stdout + res.stderr
    line = next(line for line in out.splitlines() if line.strip("│ ").startswith("matplotlib"))
    assert res.returncode == 1 and "MPLBACKEND='nonsense' is no backend it knows" in line, out
    assert "unset MPLBACKEND" in line and "pip install" not in line, line
    res = subprocess.run([sys.executable, "-m", "ctrpipe.cli", "report", str(tmp_path), "--out",
                          str(tmp_path / "rep")], env=env, capture_output=True, text=True, timeout=300)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1 and "matplotlib refuses MPLBACKEND='nonsense'" in out and "Traceback" not in out, out
    assert "MPLBACKEND=Agg" in out
