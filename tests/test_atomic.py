"""Atomic writes: the final name holds the old content or the new, never a partial file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrpipe.atomic import atomic_open, write_json_atomic, write_text_atomic


def test_writes_and_leaves_no_temp(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "a.txt", "hello")
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_failure_keeps_old_content_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write("new, half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_atomic_open_removes_stale_files_only_when_it_replaces(tmp_path: Path) -> None:
    """An older output's record goes when the new file replaces the output, not when a write fails."""
    out, record = tmp_path / "p.csv", tmp_path / "p.csv.json"
    out.write_text("old\n")
    record.write_text("{}")
    with pytest.raises(RuntimeError), atomic_open(out, stale=(record,)) as fh:
        fh.write("new\n")
        raise RuntimeError("failed")
    assert record.is_file() and out.read_text() == "old\n"
    with atomic_open(out, stale=(record,)) as fh:
        fh.write("new\n")
    assert not record.exists() and out.read_text() == "new\n"
