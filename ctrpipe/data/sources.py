"""Stage 1: turn --input arguments (files, folders, globs) into a sorted, checked list of input files."""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ctrpipe.errors import InputFormatError

Format = Literal["criteo", "parquet", "csv"]

_GLOB_CHARS = set("*?[")


def _is_glob(p: str) -> bool:
    return any(c in _GLOB_CHARS for c in p)


def natural_key(path: Path) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Sort key reading runs of digits as numbers: day_2 before day_10 (as text, day_10 came first, and a tail
    split took day_8 and day_9 for the last days). Ties (day_02, day_2) fall back to the text."""
    text = str(path)
    parts = tuple((0, int(run)) if run.isdigit() else (1, run) for run in re.findall(r"\d+|\D+", text))
    return parts, text


def _folder_files(folder: Path, fmt: Format) -> list[Path]:
    if fmt == "parquet":
        return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix == ".parquet"), key=natural_key)
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=natural_key)


def expand_inputs(paths: Sequence[Path | str], fmt: Format) -> list[Path]:
    """Files as given; folders -> their files (Parquet: *.parquet), globs -> matches, each sorted with numbers
    in names as numbers (`natural_key`: day_2 before day_10).

    Order is the order of the arguments, each expanded deterministically, so row order (and so splits and
    shards) never depends on the file system. A path matching nothing, an empty file or a file given twice
    is an error: silently reading less data than asked is worse than stopping.
    """
    if not paths:
        raise InputFormatError("no input given", fix="pass --input FILE (a file, a folder or a quoted glob)")
    out: list[Path] = []
    for raw in paths:
        text = str(raw)
        if _is_glob(text) and not Path(text).exists():
            matches = sorted((Path(m) for m in glob.glob(text, recursive=True)), key=natural_key)
            files = [m for m in matches if m.is_file()]
            if fmt == "parquet":
                files = [m for m in files if m.suffix == ".parquet"]
            if not files:
                raise InputFormatError(f"the pattern {text!r} matches no {fmt} file", where=text,
                                       fix="check the pattern; quote it so the shell does not expand it")
        else:
            p = Path(text)
            if p.is_dir():
                files = _folder_files(p, fmt)
                if not files:
                    raise _empty_folder(p, fmt)
            elif p.is_file():
                files = [p]
            else:
                raise InputFormatError("input file not found", where=text,
                                       fix="check the path (relative paths start from the current folder)")
        for f in files:
            if f.stat().st_size == 0:
                raise InputFormatError("input file is empty", where=str(f),
                                       fix="re-create or re-download it, or leave it out of --input")
        out.extend(files)
    seen: set[Path] = set()
    for f in out:
        key = f.resolve()
        if key in seen:
            raise InputFormatError("the same file is given twice", where=str(f),
                                   fix="list each input file once (check overlapping folders and globs)")
        seen.add(key)
    return out


def _empty_folder(folder: Path, fmt: str) -> InputFormatError:
    """A folder's own files are read, not its subfolders': a partitioned folder (day=1/part-0.parquet) is
    read with a glob, which the fix then gives."""
    pattern = "*.parquet" if fmt == "parquet" else "*"
    kind = "*.parquet files" if fmt == "parquet" else "files"
    if any(f.is_file() for f in folder.rglob(pattern)):
        return InputFormatError(f"the folder holds no {kind} of its own (its subfolders do)", where=str(folder),
                                fix=f"pass a quoted glob to read them: --input '{folder / '**' / pattern}'")
    return InputFormatError(f"the folder holds no {kind}", where=str(folder),
                            fix="point --input at the data files or at their folder")
