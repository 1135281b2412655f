"""Stage 1: Criteo text (plain or gzip) -> typed RawChunks, with the exact file and line of any bad input.

The input (a memory map for plain files, a stream for gzip) is cut into blocks of `chunk_rows` lines here (not
by polars), so every chunk knows its first line number. When the caller wants categoricals as hashes and the
compiled kernel (`ctrpipe/_native.c`) is built, a block is checked, parsed and hashed in one pass over its
bytes; otherwise, and for every block the kernel declines, it is parsed by `pl.read_csv` with an explicit schema
(never `ignore_errors`), which costs a separator count beyond the parse; only a block that fails that is analysed
line by line, and that path names the file, line, column and fix of any bad input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import mmap
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import polars as pl

from ctrpipe.data.chunks import SHARD_REMEDIES, BadRow, RawChunk, Remedies, hashed_name
from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig
from ctrpipe.data.hashing import field_seed
from ctrpipe.data.schema import CRITEO_LABEL
from ctrpipe.errors import InputFormatError, location
from ctrpipe.native import native
from ctrpipe.prefetch import prefetch

LABELLED_FIELDS = 1 + len(CRITEO_INT) + len(CRITEO_CAT)    # 40
TEST_FIELDS = LABELLED_FIELDS - 1                          # 39
READ_BYTES = 16 << 20
MAX_LINE_BYTES = 32 << 20
_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip",
          b"PAR1": "Parquet"}
_SEP_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "space"}
BadMode = Literal["error", "skip"]
BOM = b"\xef\xbb\xbf"            # a UTF-8 byte-order mark (spreadsheet exports): not part of the first field


def polars_input(data: bytes) -> io.BytesIO:
    """Lines or records for `pl.read_csv`, which drops a byte-order mark at the start of what it is given: the
    file's own mark is gone already (the readers drop it), so a mark there is text, the first character of a
    line that only happens to start a chunk (it was kept or lost with chunk_rows); a second mark in front is
    the one dropped instead."""
    return io.BytesIO(BOM + data if data.startswith(BOM) else data)


def _sep_name(sep: str) -> str:
    return _SEP_NAMES.get(sep, repr(sep))


def _expected_text(n: int) -> str:
    return (f"{LABELLED_FIELDS} (label + 13 ints + 26 cats)" if n == LABELLED_FIELDS
            else f"{TEST_FIELDS} (13 ints + 26 cats, unlabelled test file)")


# ------------------------------------------------------------------------------------------ byte blocks

@dataclass
class _Block:
    data: bytes          # whole lines, each ending in b"\n" (CR stripped later)
    first_line: int      # 1-based line number of data's first line
    lines: int
    file_bytes: int      # on-disk bytes consumed since the previous block


def open_text(path: Path, kind_name: str = "Criteo text",
              remedies: Remedies = SHARD_REMEDIES) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, raw file). gzip is recognised by its magic bytes, whatever the suffix."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    head = raw.read(8)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            raw.close()
            fix = (remedies.read_as("parquet") if kind == "Parquet"
                   else f"decompress it first ({kind_name} may be plain or .gz), e.g. with the {kind} tool")
            raise InputFormatError(f"this is a {kind} file, not {kind_name}", where=str(path), fix=fix)
    return raw, raw


LAYOUT_LINES = 10_000      # lines that vote on a file's layout (labelled or not), whatever chunk_rows is
_UTF8_PIECE = 1 << 16      # bytes decoded at once when a block holds invalid UTF-8 (see _check_utf8)
_COUNT_STEP = 1 << 18     # bytes compared per numpy call: the bool temporary stays in cache


def _count_byte(buf: bytes | mmap.mmap, byte: int, start: int, stop: int) -> int:
    """Occurrences of `byte` in buf[start:stop]. numpy's compare + count_nonzero beats bytes.count, and
    beats it by more in cache-sized steps (no block-sized temporary)."""
    arr = np.frombuffer(buf, np.uint8, count=stop - start, offset=start)
    if len(arr) <= _COUNT_STEP:
        return int(np.count_nonzero(arr == byte))
    tmp = np.empty(_COUNT_STEP, dtype=bool)
    total = 0
    for i in range(0, len(arr), _COUNT_STEP):
        part = arr[i: i + _COUNT_STEP]
        hit = tmp[: len(part)]
        np.equal(part, byte, out=hit)
        total += int(np.count_nonzero(hit))
    return total


def _count_newlines(buf: bytes | mmap.mmap, start: int, stop: int) -> int:
    """b'\\n' in buf[start:stop]."""
    return _count_byte(buf, 10, start, stop)


def _advance(buf: bytes, off: int, need: int, avg: float) -> tuple[int, int]:
    """Move from line start `off` forward by up to `need` lines of buf: (new line start, lines passed).

    Fewer than `need` lines are passed only when buf ends first. Large moves jump by the average line
    length, count the newlines jumped over and re-estimate (so each byte is counted about once); the last
    few lines are stepped one `find` at a time, an overshoot is walked back with `rfind`.
    """
    start, got = off, 0
    while need - got > 256:
        guess = min(len(buf), off + int(avg * (need - got) * 0.9))
        guess = buf.rfind(b"\n", off, guess) + 1
        if guess <= off:
            break
        got += _count_newlines(buf, off, guess)
        off = guess
        avg = (off - start) / got
        if guess == len(buf):
            break
    while got < need:
        j = buf.find(b"\n", off)
        if j < 0:
            return off, got
        off, got = j + 1, got + 1
    while got > need:                               # the jump overshot: line lengths vary a lot
        off = buf.rfind(b"\n", start, off - 1) + 1
        got -= 1
    return off, got


def iter_blocks(path: Path, chunk_rows: int, read_bytes: int = READ_BYTES,
                max_line_bytes: int = MAX_LINE_BYTES, kind_name: str = "Criteo text",
                remedies: Remedies = SHARD_REMEDIES) -> Iterator[_Block]:
    """Blocks of exactly chunk_rows lines (the last may be shorter); a final line without '\\n' gets one.

    One buffer holds the unconsumed bytes; a block is found by jumping ahead by the average line length
    (`_advance`), and its bytes are one slice of the buffer. `kind_name` names the expected text in errors.
    """
    stream, raw = open_text(path, kind_name, remedies)
    if stream is raw and os.fstat(raw.fileno()).st_size > 0:
        raw.close()
        yield from _mapped_blocks(path, chunk_rows, max_line_bytes, kind_name, remedies)
        return
    buf, pos = b"", 0          # buf[pos:] is unconsumed; pos is a line start
    off, got = 0, 0            # the current block so far: buf[pos:off] holds `got` whole lines
    avg = 0.0                  # average line length (bytes), from the first read
    line = 1
    disk_pos = 0
    eof = False
    try:
        while True:
            if avg:
                off, more = _advance(buf, off, chunk_rows - got, avg)
                got += more
            if got == chunk_rows:
                block_pos = raw.tell()
                yield _Block(buf[pos:off], line, chunk_rows, block_pos - disk_pos)
                disk_pos, line, pos, got = block_pos, line + chunk_rows, off, 0
                continue
            if eof:
                break
            want = max(read_bytes, int(avg * (chunk_rows - got) * 1.02) - (len(buf) - off))
            try:
                piece = stream.read(want)
            except (OSError, EOFError, zlib.error) as exc:
                # the failed read drops what it had decompressed: count the intact lines afresh
                raise InputFormatError(
                    f"corrupt or truncated gzip data ({exc}) after line {gzip_intact_lines(path):,}",
                    where=str(path),
                    fix="re-download or re-copy the file; `gunzip -t FILE` checks it") from None
            if not piece:
                eof = True
                avg = avg or 1.0
                continue
            if not buf and line == 1 and piece.startswith(BOM):
                piece = piece[len(BOM):]
            buf, off, pos = buf[pos:] + piece, off - pos, 0
            if not avg:
                sample = min(len(buf), 1 << 20)
                avg = sample / max(1, _count_newlines(buf, 0, sample))
            if len(buf) - buf.rfind(b"\n") - 1 > max_line_bytes:   # binary data or a wrong format
                raise InputFormatError(
                    f"line {line + got + _count_newlines(buf, off, len(buf)):,} is longer than "
                    f"{max_line_bytes:,} bytes (no line break)",
                    where=str(path), fix=_long_line_fix(kind_name, remedies))
        data = buf[pos:]
        if data:
            if not data.endswith(b"\n"):
                data += b"\n"
            yield _Block(data, line, data.count(b"\n"), raw.tell() - disk_pos)
    finally:
        stream.close()
        raw.close()


def _mapped_blocks(path: Path, chunk_rows: int, max_line_bytes: int, kind_name: str,
                   remedies: Remedies) -> Iterator[_Block]:
    """Plain files: the same blocks, cut in a memory map of the file, so each block costs one copy (its
    slice) instead of a read, a buffer concatenation and a slice. Pages behind the cursor are dropped from
    the mapping (they stay in the page cache), so resident memory stays about one block whatever the size."""
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        size = len(mm)
        sample = min(size, 1 << 20)
        avg = sample / max(1, _count_newlines(mm, 0, sample))
        pos, line, dropped = 0, 1, 0
        if mm[: len(BOM)] == BOM:                 # a UTF-8 byte-order mark is not data
            pos = len(BOM)
        block_start = 0                             # file bytes a block accounts for start here
        while pos < size:
            off, got = _advance(mm, pos, chunk_rows, avg)
            if got == 0:                               # no line break left: the unterminated last line
                off = size
            elif got < chunk_rows and off < size:      # the last line has no b"\n"
                off = size
            if off - pos > max_line_bytes:
                _check_line_lengths(path, mm, pos, off, line, max_line_bytes, kind_name, remedies)
            data = mm[pos:off]
            if not data.endswith(b"\n"):
                data += b"\n"
                got += 1
            yield _Block(data, line, got, off - block_start)
            avg = (off - pos) / got
            line, pos, block_start = line + got, off, off
            keep = pos - pos % mmap.PAGESIZE
            if keep > dropped:
                mm.madvise(mmap.MADV_DONTNEED, dropped, keep - dropped)
                dropped = keep
    finally:
        try:
            mm.close()
        except BufferError:                            # a numpy view is still alive: the GC closes it
            pass


def gzip_intact_lines(path: Path) -> int:
    """Complete lines before the first corrupt or missing gzip byte (the error path only: a second read)."""
    lines = 0
    unpack = zlib.decompressobj(wbits=31)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                while chunk:
                    out = unpack.decompress(chunk)
                    lines += _count_newlines(out, 0, len(out))
                    chunk = unpack.unused_data               # a further gzip member starts here
                    if chunk:
                        unpack = zlib.decompressobj(wbits=31)
            except zlib.error:
                break
    return lines


def _long_line_fix(kind_name: str, remedies: Remedies) -> str:
    return remedies.or_read_as(f"check the file is {kind_name}", "parquet", "Parquet")


def _check_line_lengths(path: Path, buf: mmap.mmap, start: int, stop: int, line: int, limit: int,
                        kind_name: str, remedies: Remedies) -> None:
    """A block larger than the line limit: raise if one of its lines is (binary data or a wrong format)."""
    ends = np.flatnonzero(np.frombuffer(buf, np.uint8, count=stop - start, offset=start) == 10)
    bounds = np.concatenate(([-1], ends, [stop - start - 1] if len(ends) == 0 or ends[-1] != stop - start - 1
                             else []))
    long = np.flatnonzero(np.diff(bounds) - 1 > limit)
    if len(long):
        raise InputFormatError(
            f"line {line + int(long[0]):,} is longer than {limit:,} bytes (no line break)",
            where=str(path), fix=_long_line_fix(kind_name, remedies))


# ------------------------------------------------------------------------------------------ line analysis

def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte offsets of every line; ends point at its b'\\n'."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    return starts, ends


def _field_counts(data: bytes, starts: np.ndarray, sep: str) -> np.ndarray:
    """(lines,) number of `sep`-separated fields per line, vectorised."""
    is_sep = np.frombuffer(data, dtype=np.uint8) == ord(sep)
    return np.add.reduceat(is_sep, starts, dtype=np.int64) + 1


def _line_text(data: bytes, starts: np.ndarray, ends: np.ndarray, i: int) -> str:
    return data[starts[i]: ends[i]].decode("utf-8", errors="replace")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def detect_layout(path: Path, block: _Block, sep: str, remedies: Remedies = SHARD_REMEDIES) -> int:
    """40 (labelled) or 39 (test) fields, by majority over the first block; a header line or a wrong
    separator is reported here, where the first line is at hand."""
    sample = block.data[: 1 << 22]
    sample = sample[: sample.rfind(b"\n") + 1] or block.data
    starts, ends = _line_bounds(sample)
    counts = _field_counts(sample, starts, sep)
    first = _line_text(sample, starts, ends, 0).rstrip("\r")
    first_field = first.split(sep)[0]
    other = _other_separator(first, sep)
    if first_field.strip() and not _is_number(first_field) and other is not None and \
            _is_number(first.split(other)[0]):
        # a data line split by another character is no header: removing it (the header's fix) met the
        # same error on the next line, for ever
        raise InputFormatError(
            f"the first line has {first.count(other) + 1} {_sep_name(other)}-separated fields and no "
            f"{_sep_name(sep)} (expected {_expected_text(LABELLED_FIELDS)} separated by {_sep_name(sep)}s)",
            where=location(path, 1), fix=_separator_hint(first, sep, remedies).removeprefix("; "))
    # a header names the fields: as many as a data line has (other text, a README, is no Criteo text at all)
    if first_field.strip() and not _is_number(first_field) and int(counts[0]) in (LABELLED_FIELDS, TEST_FIELDS):
        shown = first if len(first) <= 40 else first[:40] + "..."
        raise InputFormatError(
            f"the first line looks like a header ({shown!r}): Criteo text has no header line",
            where=location(path, 1),
            fix="remove the header line (e.g. `tail -n +2 FILE > FILE.tsv`)" + _separator_hint(first, sep, remedies))
    n_lab, n_test = int((counts == LABELLED_FIELDS).sum()), int((counts == TEST_FIELDS).sum())
    if n_lab == 0 and n_test == 0:
        raise InputFormatError(
            f"{int(counts[0])} {_sep_name(sep)}-separated field{'' if counts[0] == 1 else 's'} on the first line, "
            "expected "
            f"{_expected_text(LABELLED_FIELDS)} or {_expected_text(TEST_FIELDS)}",
            where=location(path, 1),
            fix=remedies.or_read_as("check the file is Criteo text", "parquet", "Parquet")
                + _separator_hint(first, sep, remedies))
    return LABELLED_FIELDS if n_lab >= n_test else TEST_FIELDS


def _other_separator(line: str, sep: str) -> str | None:
    """Another character that splits `line` into a Criteo line's 40 or 39 fields, if one does."""
    return next((other for other in ("\t", ",", ";", "|", " ")
                 if other != sep and line.count(other) + 1 in (LABELLED_FIELDS, TEST_FIELDS)), None)


def _separator_hint(line: str, sep: str, remedies: Remedies = SHARD_REMEDIES) -> str:
    other = _other_separator(line, sep)
    if other is None:
        return ""
    n = line.count(other) + 1
    if other == " ":            # Criteo fields hold no spaces: a tool wrote spaces for the tabs
        return (f"; the line has {n} space-separated fields: convert the spaces to tabs (e.g. `tr ' ' '\\t' < "
                "FILE > FILE.tsv`)" + ("" if remedies.run_format else ", or set data.separator=' '"))
    if remedies.run_format:
        return (f"; the line has {n} {_sep_name(other)}-separated fields, and the run reads "
                f"{_sep_name(sep)}-separated ones")
    return (f"; the line has {n} {_sep_name(other)}-separated fields: set data.separator={other!r}"
            + (" (integers written as floats like 260.0 are accepted)" if other == "," else ""))


# ------------------------------------------------------------------------------------------ parsing

@dataclass
class CriteoReader:
    """Parses blocks of one file into RawChunks. `keep` lists the output columns (labels, numeric, cats).

    `hash_seeds` (categorical column -> field seed) asks for those columns as xxh64 hashes (see
    `column_hashes`); then, when the compiled kernel is available, a block is parsed and hashed in one pass
    over its bytes, and only a block the kernel declines (a malformed line, a non-integer count) goes through
    polars, which gives the same values or the exact error.
    """

    path: Path
    sep: str
    n_fields: int
    keep: list[str]
    bad_rows: BadMode
    hash_seeds: dict[str, int] = dataclasses.field(default_factory=dict)
    remedies: Remedies = SHARD_REMEDIES

    def __post_init__(self) -> None:
        cats = self.columns[self.n_fields - len(CRITEO_CAT):]
        # the kernel hashes every categorical field; it can serve the block only when each kept one is hashed
        kept_cats = [c for c in cats if c in self.keep]
        self._kernel_ok = bool(kept_cats) and all(c in self.hash_seeds for c in kept_cats)
        self._seeds = np.array([self.hash_seeds.get(c, 0) for c in cats], dtype=np.uint64)

    @property
    def has_labels(self) -> bool:
        return self.n_fields == LABELLED_FIELDS

    @property
    def columns(self) -> list[str]:
        return ([CRITEO_LABEL] if self.has_labels else []) + list(CRITEO_INT) + list(CRITEO_CAT)

    def _schema(self, numeric_as_text: bool) -> dict[str, pl.DataType]:
        num = pl.String if numeric_as_text else pl.Float64
        return {c: (pl.String if c.startswith("C") else num) for c in self.columns}

    def _parse(self, data: bytes, numeric_as_text: bool = False) -> pl.DataFrame:
        return pl.read_csv(polars_input(data), has_header=False, separator=self.sep, quote_char=None,
                           schema=self._schema(numeric_as_text))

    def chunk(self, block: _Block) -> RawChunk:
        cr = b"\r" in block.data
        data = block.data.replace(b"\r\n", b"\n") if cr else block.data
        line_idx: np.ndarray | None = None          # kept lines (0-based in block) when some were dropped
        bad: list[BadRow] = []
        # a "\r\n" left after the replace came from "\r\r\n", where polars drops one more "\r": its path decides
        use_kernel = self._kernel_ok and not (cr and b"\r\n" in data)
        frame = self._kernel_frame(data, block) if use_kernel else None
        if frame is not None:
            frame, line_idx, bad = self._check_labels(frame, block, None)
            return self._raw_chunk(self._finish(frame), block, line_idx, bad)
        # numpy counts a byte faster than bytes.count; a mismatch sends the block to the line check
        n_sep = _count_byte(data, ord(self.sep), 0, len(data))
        checked = n_sep != (self.n_fields - 1) * block.lines
        if checked:
            data, line_idx, bad = self._check_fields(data, block)
        if line_idx is not None and len(line_idx) == 0:     # every line of the block was bad (skip mode)
            frame = pl.DataFrame(schema=self._schema(False))
        else:
            try:
                frame = self._parse(data)
            except (pl.exceptions.ComputeError, pl.exceptions.SchemaError):
                frame = None
        if frame is None or frame.height != (block.lines if line_idx is None else len(line_idx)):
            if not checked:     # a long and a short line can cancel out in the separator count
                data, line_idx, bad = self._check_fields(data, block)
            frame, line_idx, more = self._slow_parse(data, block, line_idx)
            bad += more
        frame, line_idx, more = self._check_labels(frame, block, line_idx)
        bad += more
        return self._raw_chunk(self._finish(frame), block, line_idx, bad)

    def _raw_chunk(self, frame: pl.DataFrame, block: _Block, line_idx: np.ndarray | None,
                   bad: list[BadRow]) -> RawChunk:
        first = block.first_line + (int(line_idx[0]) if line_idx is not None and len(line_idx) else 0)
        lines = None if line_idx is None else (block.first_line + line_idx).astype(np.int64)
        return RawChunk(frame=frame, source=self.path, first_line=first, nbytes=len(block.data), bad_rows=bad,
                        has_labels=self.has_labels, line_numbers=lines, file_bytes=block.file_bytes)

    # -- the compiled kernel
    def _kernel_frame(self, data: bytes, block: _Block) -> pl.DataFrame | None:
        """The block parsed and hashed by the compiled kernel, or None (no kernel, or a line it declines)."""
        kernel = native()
        if kernel is None:
            return None
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:      # polars' path finds the line and reports it
                return None
        n, n_cat = block.lines, len(CRITEO_CAT)
        n_num = self.n_fields - n_cat
        numeric = np.empty((n_num, n), dtype=np.float64)
        hashes = np.empty((n_cat, n), dtype=np.uint64)
        bad = kernel.criteo_block(data, n, self.n_fields, n_num, int(self.has_labels), ord(self.sep),
                                  self._seeds, numeric, hashes)
        if bad >= 0:
            return None
        names = self.columns
        # a list of Series: a dict of arrays costs polars more per column (a fixed cost per chunk that
        # dominates a few-row chunk, as in serving)
        cols = [pl.Series(c, numeric[j]) for j, c in enumerate(names[:n_num]) if c in self.keep]
        cols += [pl.Series(hashed_name(c), hashes[k]) for k, c in enumerate(names[n_num:]) if c in self.hash_seeds]
        return pl.DataFrame(cols)

    # -- field counts
    def _check_fields(self, data: bytes, block: _Block) -> tuple[bytes, np.ndarray | None, list[BadRow]]:
        """Per-line field counts: raise on the first wrong line, or drop wrong lines (skip mode)."""
        starts, ends = _line_bounds(data)
        counts = _field_counts(data, starts, self.sep)
        wrong = counts != self.n_fields
        rows = np.flatnonzero(wrong)
        if len(rows) == 0:
            return data, None, []
        if self.bad_rows == "error":
            i = int(rows[0])
            raise self._field_error(int(counts[i]), block.first_line + i,
                                    _line_text(data, starts, ends, i))
        bad = [BadRow(str(self.path), block.first_line + int(i), None, None, "field count") for i in rows]
        keep = ~wrong
        byte_mask = np.repeat(keep, ends - starts + 1)
        kept = np.frombuffer(data, dtype=np.uint8)[byte_mask].tobytes()
        return kept, np.flatnonzero(keep), bad

    def _field_error(self, n: int, line: int, text: str) -> InputFormatError:
        what = f"{n} {_sep_name(self.sep)}-separated field{'' if n == 1 else 's'}, expected " \
            f"{_expected_text(self.n_fields)}"
        if not text.strip():
            what = f"empty line, expected {_expected_text(self.n_fields)} fields"
        r = self.remedies
        if not text.strip():
            fix = r.or_skip("remove the empty line", "lines")
        elif _other_separator(text, self.sep) is not None:      # not short: split by another character
            return InputFormatError(what, where=location(self.path, line),
                                    fix=r.or_skip(_separator_hint(text, self.sep, r).removeprefix("; "), "lines"))
        elif 0 < n < self.n_fields:
            fix = r.or_skip("the line is short: were trailing empty fields stripped (an editor or tool that trims "
                            "lines)? Re-export with every separator kept", "lines")
        elif n == LABELLED_FIELDS + TEST_FIELDS - self.n_fields:
            fix = r.or_skip("files mix labelled (40-field) and unlabelled (39-field) lines; shard them "
                            "separately", "lines")
        else:
            fix = r.or_skip(r.or_read_as("check the file is Criteo text", "parquet", "Parquet"), "lines")
        fix += _separator_hint(text, self.sep, r) if text.strip() else ""
        return InputFormatError(what, where=location(self.path, line), fix=fix)

    # -- values
    def _slow_parse(self, data: bytes, block: _Block, line_idx: np.ndarray | None,
                    ) -> tuple[pl.DataFrame, np.ndarray | None, list[BadRow]]:
        """The typed parse failed: find the exact line (bad UTF-8 or a non-number), raise or drop it."""
        idx = np.arange(block.lines) if line_idx is None else line_idx
        data, idx, bad = self._check_utf8(data, block, idx)
        try:
            text = self._parse(data, numeric_as_text=True)
        except (pl.exceptions.ComputeError, pl.exceptions.SchemaError) as exc:
            raise InputFormatError(f"polars cannot parse this block: {str(exc).splitlines()[0]}",
                                   where=f"{self.path}, lines {block.first_line}-"
                                         f"{block.first_line + block.lines - 1}",
                                   fix="check the file is Criteo text (tab-separated, no quotes)") from None
        ok = np.ones(text.height, dtype=bool)
        for col in self.columns:
            if col.startswith("C"):
                continue
            s = text[col].str.strip_chars()
            nonnum = (s.str.len_bytes() > 0) & s.cast(pl.Float64, strict=False).is_null()
            rows = np.flatnonzero(nonnum.fill_null(False).to_numpy())
            if len(rows) == 0:
                continue
            if self.bad_rows == "error":
                i = int(rows[0])
                what = (f"{text[col][i]!r} is not a number" if col != CRITEO_LABEL
                        else f"label {text[col][i]!r} is not 0 or 1")
                where = location(self.path, block.first_line + int(idx[i]), column=col)
                raise InputFormatError(what, where=where, fix=self._value_fix(col))
            for i in rows[ok[rows]]:
                bad.append(BadRow(str(self.path), block.first_line + int(idx[i]), None, col,
                                  "bad label" if col == CRITEO_LABEL else "not a number"))
            ok[rows] = False
        if not ok.all():
            text = text.filter(pl.Series(ok))
            idx = idx[ok]
        # non-strict is safe: every non-blank value was just checked; blank -> null (missing)
        frame = text.with_columns([pl.col(c).str.strip_chars().cast(pl.Float64, strict=False)
                                   for c in self.columns if not c.startswith("C")])
        return frame, (None if len(idx) == block.lines else idx), bad

    def _value_fix(self, col: str) -> str:
        if col == CRITEO_LABEL:
            return self.remedies.or_skip("the first field of a 40-field line is the 0/1 click label; fix the "
                                         "value", "lines")
        return self.remedies.or_skip("I1..I13 hold integer counts (blank = missing); fix the value", "lines")

    def _check_utf8(self, data: bytes, block: _Block, idx: np.ndarray,
                    ) -> tuple[bytes, np.ndarray, list[BadRow]]:
        """Lines that are not UTF-8: an error, or (skip mode) dropped from `data` and `idx`. The block is
        decoded in pieces of whole lines, so each bad line costs a piece, not another pass over the block."""
        try:
            data.decode("utf-8")
            return data, idx, []
        except UnicodeDecodeError:
            pass
        view = memoryview(data)
        cut: list[tuple[int, int]] = []                     # [start, end) of each bad line
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", min(pos + _UTF8_PIECE, len(data)) - 1) + 1 or len(data)
            try:
                str(view[pos:end], "utf-8")
                pos = end
                continue
            except UnicodeDecodeError as exc:
                at = pos + exc.start
            start = data.rfind(b"\n", 0, at) + 1
            pos = data.find(b"\n", at) + 1 or len(data)
            cut.append((start, pos))
            if self.bad_rows == "error":
                break
        nl = np.flatnonzero(np.frombuffer(data, np.uint8) == 10)
        ks = np.searchsorted(nl, [start for start, _ in cut])     # 0-based lines within `data`
        lines = block.first_line + idx[ks].astype(np.int64)
        if self.bad_rows == "error":
            raise InputFormatError("invalid UTF-8 bytes", where=location(self.path, int(lines[0])),
                                   fix="the file is not UTF-8 text (or is corrupt); re-export as UTF-8")
        bad = [BadRow(str(self.path), int(line), None, None, "invalid UTF-8") for line in lines]
        keep = [0, *(b for a, b in cut)], [*(a for a, b in cut), len(data)]
        data = b"".join(view[a:b] for a, b in zip(*keep, strict=True))
        return data, np.delete(idx, ks), bad

    # -- labels
    def _check_labels(self, frame: pl.DataFrame, block: _Block, line_idx: np.ndarray | None,
                      ) -> tuple[pl.DataFrame, np.ndarray | None, list[BadRow]]:
        if not self.has_labels:
            return frame, line_idx, []
        y = frame[CRITEO_LABEL]                                 # Float64: a null reads as NaN, which is bad
        yv = y.to_numpy()
        badmask = (yv != 0.0) & (yv != 1.0)
        if not badmask.any():
            return frame, line_idx, []
        idx = np.arange(frame.height) if line_idx is None else line_idx
        rows = np.flatnonzero(badmask)
        if self.bad_rows == "error":
            i = int(rows[0])
            value = y[i]
            what = "empty label" if value is None else f"label {value:g} is not 0 or 1"
            where = location(self.path, block.first_line + int(idx[i]), column=CRITEO_LABEL)
            raise InputFormatError(what, where=where, fix=self._value_fix(CRITEO_LABEL))
        bad = [BadRow(str(self.path), block.first_line + int(idx[i]), None, CRITEO_LABEL, "bad label")
               for i in rows]
        return frame.filter(pl.Series(~badmask)), idx[~badmask], bad

    def _finish(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Kept columns in `keep` order: labels as Float32, categoricals as text or (kernel) hashes."""
        have = set(frame.columns)
        cols = [hashed_name(c) if hashed_name(c) in have else c for c in self.keep
                if c in have or hashed_name(c) in have]
        # Series, not frame.select: a select runs a lazy query, a fixed cost that dominates a few-row chunk
        return pl.DataFrame([frame[c].cast(pl.Float32) if c == CRITEO_LABEL else frame[c] for c in cols])


def criteo_text_chunk(cfg: DataConfig, data: bytes, source: Path, keep: list[str],
                      hashed: tuple[str, ...] = (), remedies: Remedies = SHARD_REMEDIES) -> RawChunk:
    """One RawChunk of in-memory Criteo text (whole lines, labelled or not), parsed exactly as one block of
    a file by `iter_criteo_chunks` (same layout detection, kernel and checks); errors name `source`, line."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    block = _Block(data, 1, data.count(b"\n"), len(data))
    reader = CriteoReader(source, cfg.separator, detect_layout(source, block, cfg.separator, remedies), keep,
                          "error", {c: field_seed(c, cfg.hash_seed) for c in hashed}, remedies)
    return reader.chunk(block)


def iter_criteo_chunks(cfg: DataConfig, path: Path, chunk_rows: int, keep: list[str],
                       bad_rows: BadMode = "error", require_labels: bool = True,
                       hashed: tuple[str, ...] = (), remedies: Remedies = SHARD_REMEDIES) -> Iterator[RawChunk]:
    """RawChunks of one Criteo text file; `keep` names the columns the config uses, `hashed` the
    categorical ones the caller only needs as hashes (field seeds from cfg.hash_seed)."""
    seeds = {c: field_seed(c, cfg.hash_seed) for c in hashed}
    reader: CriteoReader | None = None
    # the layout is voted on the file's first LAYOUT_LINES lines, read apart: with the first chunk's, a file
    # whose first line is bad was a test file at chunk_rows=1 and a training file at 1000
    with contextlib.closing(iter_blocks(path, LAYOUT_LINES, remedies=remedies)) as head:
        first = next(head, None)
    # blocks are cut one ahead in their own thread: cutting (page faults, copies) overlaps the parse
    for block in prefetch(lambda: iter_blocks(path, chunk_rows, remedies=remedies), 1, "ctrpipe-read"):
        if reader is None:
            n_fields = detect_layout(path, first or block, cfg.separator, remedies)
            if require_labels and n_fields == TEST_FIELDS:
                raise InputFormatError(
                    f"the file has {TEST_FIELDS} fields per line (no label column): a test file?",
                    where=str(path),
                    fix=remedies.unlabelled)
            reader = CriteoReader(path, cfg.separator, n_fields, keep, bad_rows, seeds, remedies)
        yield reader.chunk(block)
    if reader is None:
        raise InputFormatError("input file is empty", where=str(path), fix="re-create or re-download it")
