"""Every package ctrpipe's code imports is one pyproject.toml declares: a user's `pip install ctrpipe` gets
what the commands import. `ctrpipe/cli.py` imported click, which typer no longer depends on (it carries its
own); it was installed only through the dask extra, so every command failed to start without it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# distribution name -> the top-level modules it provides, where they differ
PROVIDES = {"pyyaml": {"yaml"}, "dask": {"dask", "distributed"}}


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")           # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    names = {re.split(r"[\s\[<>=!~;]", s, maxsplit=1)[0].lower().replace("-", "_") for s in specs}
    return set().union(*(PROVIDES.get(n, {n}) for n in names))


def _imported() -> dict[str, str]:
    """Third-party top-level module -> a file of ctrpipe that imports it (at module level or inside a function)."""
    out: dict[str, str] = {}
    for path in sorted((REPO / "ctrpipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "ctrpipe" and top not in sys.stdlib_module_names:
                    out.setdefault(top, str(path.relative_to(REPO)))
    return out


def test_every_imported_package_is_declared() -> None:
    declared = _declared()
    undeclared = {top: where for top, where in _imported().items() if top not in declared}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    assert {"torch", "polars", "typer"} <= set(_imported())            # the scan sees ctrpipe's imports
