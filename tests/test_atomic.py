"""Atomic writes: the final name holds the old content or the new, never a partial file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


_HOLDER = """
import sys
from pathlib import Path
import numpy as np
from ctrpipe.atomic import atomic_open
from ctrpipe.infer.submission import SubmissionWriter
kind, path = sys.argv[1], Path(sys.argv[2])
if kind == "submission":
    with SubmissionWriter(path, "ID", "clicked") as w:
        w.write(np.array([1, 2]), np.array([0.25, 0.5], dtype=np.float32))
        print("writing", flush=True)
        sys.stdin.readline()
else:
    with atomic_open(path) as fh:
        fh.write("first\\n")
        print("writing", flush=True)
        sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["submission", "atomic"])
def test_second_writer_of_one_file_is_refused_and_leaves_the_first_whole(tmp_path: Path, kind: str) -> None:
    """Two commands writing one output (two `infer` to one --out) shared its temp name: their bytes
    interleaved and the slower one's rename failed. The second is refused while the first writes."""
    import subprocess
    import sys

    from ctrpipe.errors import BusyError
    from ctrpipe.infer.submission import SubmissionWriter

    out = tmp_path / "sub.csv"
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, kind, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "writing"
        with pytest.raises(BusyError, match="another process is writing sub.csv"):
            if kind == "submission":
                with SubmissionWriter(out, "ID", "clicked") as w:
                    w.write(np.array([9]), np.array([0.75], dtype=np.float32))
            else:
                with atomic_open(out) as fh:
                    fh.write("second\n")
        assert out.with_name("sub.csv.incomplete").is_file()     # the first writer's temp file survives
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert out.read_text() == ("ID,clicked\n1,0.25\n2,0.5\n" if kind == "submission" else "first\n")
    with atomic_open(out) as fh:                                    # once it is done, the file is free
        fh.write("third\n")
    assert out.read_text() == "third\n" and sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_a_file_size_limit_in_any_form_reads_as_one() -> None:
    """EFBIG as an errno, and as a library's message without one (polars: '... (os error 27)'), wrapped in
    another error as torch.save wraps it."""
    import errno
    import os

    from ctrpipe.errors import disk_full_reason

    as_errno = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    as_text = OSError(f"failed to write: {os.strerror(errno.EFBIG)} (os error {errno.EFBIG})")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = as_text
    for exc in (as_errno, as_text, wrapped):
        assert disk_full_reason(exc) == os.strerror(errno.EFBIG)
    assert disk_full_reason(OSError("permission denied (os error 13)")) is None
