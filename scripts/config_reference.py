"""Print the config reference (every key, default and comment) as Markdown, for the README.

Run: python scripts/config_reference.py > /tmp/ref.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from ctrpipe.config import RunConfig
from ctrpipe.models.registry import config_class, model_names

_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+?(?:=\s*(.*?))?\s*#\s*(.*)$")


def _comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = _FIELD.match(line)
            if m:
                out.setdefault(m.group(1), m.group(3))
    return out


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    return re.sub(r"typing\.|<class '|'>", "", str(tp)).replace("|", "\\|")


def _rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    rows: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name in ("sources", "params"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows += _rows(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        shown = repr(default)
        if len(shown) > 48:
            shown = shown[:45] + "..."
        rows.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{shown}` | {notes.get(f.name, '')} |")
    return rows


def main() -> None:
    head = "| key | type | default | meaning |\n|---|---|---|---|"
    print(head)
    print("\n".join(_rows(RunConfig, "")))
    for name in model_names():
        print(f"\n`model.name: {name}`\n\n{head}")
        print("\n".join(_rows(config_class(name), "model.")))


if __name__ == "__main__":
    main()
