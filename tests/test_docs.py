"""docs/config.md is generated from the config dataclasses: it must match them and name every key."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ctrpipe.config import ModelSection, RunConfig
from ctrpipe.models.registry import config_class, model_names

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "config.md"
COMMAND = "python scripts/config_reference.py --write"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(cls: type, prefix: str) -> list[str]:
    """Dotted keys of a config dataclass, walked here rather than by the generator so each checks the other."""
    hints = typing.get_type_hints(cls)
    # other names a config accepts for its keys, and keys fixed to one value, are documented rows too
    keys: list[str] = [f"{prefix}{k}" for k in (*getattr(cls, "KEY_ALIASES", {}), *getattr(cls, "FIXED_KEYS", {}))]
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if f.name == "sources":
            continue
        if tp is ModelSection:
            keys.append(f"{key}.name")
            for name in model_names():
                keys += _keys(config_class(name), f"{key}.")     # model.sequence.tfm.n_heads and the like
        elif dataclasses.is_dataclass(tp):
            keys += _keys(tp, f"{key}.")
        else:
            keys.append(key)
            args = typing.get_args(tp)
            if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
                keys += _keys(args[0], f"{key}[].")       # items of a list such as data.multihot
    return keys


def _doc_text() -> str:
    if not DOC.is_file():
        pytest.fail(f"{DOC.relative_to(ROOT)} is missing: run `{COMMAND}`")
    return DOC.read_text()


def test_config_reference_is_up_to_date() -> None:
    expected, actual = _generator().render(), _doc_text()
    if actual != expected:
        diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(), "docs/config.md (committed)",
                                    "docs/config.md (from the code)", lineterm="", n=1)
        shown = "\n".join(list(diff)[:40])
        pytest.fail(f"docs/config.md is out of date with the config dataclasses: run `{COMMAND}` and commit it."
                    f"\n{shown}")


def test_config_reference_names_every_key() -> None:
    text = _doc_text()
    keys = _keys(RunConfig, "")
    assert "train.lr" in keys and "model.embedding_dim" in keys and "data.multihot[].column" in keys
    assert "model.sequence.tfm.n_heads" in keys and "model.qnn_alpha.rank" in keys
    assert "model.emb_dim" in keys and "model.sequence.pad_id" in keys
    missing = [k for k in dict.fromkeys(keys) if f"`{k}`" not in text]
    assert not missing, f"docs/config.md lacks {missing}: run `{COMMAND}`"


def test_every_option_help_shows_its_brackets() -> None:
    """Typer renders help with rich markup: an unescaped `[onnx]` vanished from `export --help` (it named
    the extra to install). Every option's help, markup escapes removed, is shown whole."""
    import typer
    from typer.testing import CliRunner

    from ctrpipe.cli import app

    def commands(cmd: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
        if hasattr(cmd, "commands"):            # a group (typer's own click)
            return [x for name, sub in cmd.commands.items() for x in commands(sub, (*path, name))]
        return [(path, cmd)]

    checked = 0
    for path, cmd in commands(typer.main.get_command(app), ()):
        out = " ".join(CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output.split())
        for param in cmd.params:
            text = " ".join((getattr(param, "help", None) or "").replace("\\[", "[").split())
            if "[" in text:
                assert text in out, (path, param.name)
                checked += 1
    assert checked >= 1
