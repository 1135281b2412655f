"""CLI helpers shared by test modules (a plain module: test modules never import a conftest)."""

from __future__ import annotations

from typer.testing import CliRunner

from ctrpipe.cli import app


def run_cli(*args: str) -> None:
    """Run `ctrpipe ARGS` in-process; fail the test with its output unless it exits 0."""
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output + (repr(res.exception) if res.exception else "")


def sets(values: list[str]) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]."""
    return [a for v in values for a in ("--set", v)]
