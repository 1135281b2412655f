"""CLI helpers shared by test modules (a plain module: test modules never import a conftest)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctrpipe.cli import app


def run_cli(*args: str) -> None:
    """Run `ctrpipe ARGS` in-process; fail the test with its output unless it exits 0."""
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")


def sets(values: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for v in values for a in ("--set", v)]


def stop_right_after_renaming_onto(monkeypatch: pytest.MonkeyPatch, target: Path,
                                   signum: int = signal.SIGINT) -> None:
    """Send this process `signum` the moment a file is renamed onto `target` (a real signal, at the worst
    moment of a commit: the output is in place, its record not yet)."""
    real = os.replace

    def replace(src: str | Path, dst: str | Path, *args: object, **kwargs: object) -> None:
        real(src, dst, *args, **kwargs)  # type: ignore[arg-type]
        if Path(dst) == target:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(os, "replace", replace)
