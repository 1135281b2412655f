"""Atomic file writes shared by every stage: write '<name>.incomplete', fsync, rename onto the final name.

A crash at any moment leaves the old file or none, never a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(final: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside `final`; on success fsync + rename onto `final`, on error delete the temp file."""
    final = Path(final)
    tmp = final.with_name(final.name + ".incomplete")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path | str, text: str) -> Path:
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json_atomic(path: Path | str, obj: Any, indent: int = 2) -> Path:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=indent)
    return Path(path)
