"""Stage 1, CSV bytes -> whole records: blocks of lines (`criteo.iter_blocks`) regrouped into CSV records, each
with its line number and its quote-aware field count, vectorised over the block's bytes (no loop over rows).

Quoting follows RFC 4180: every quote character toggles "inside quotes" (a doubled quote toggles twice), so a
quoted field may hold separators and line breaks, and a record ends at the first line break outside quotes.
A quote inside an unquoted field (`5'11"`, `5""`) is text: only a quote at a field's start opens a quoted
field, in which every quote toggles, as polars reads it (`_quoting_quotes`); such text quotes reach polars as
a control byte absent from the chunk (its row cutter would count them as toggles) and are put back in the
values. An opening quote that never closes runs on into the next lines: the reader reports it with the hint to
turn quoting off (with bad_rows=skip, `resync_fields` cuts it back to its line).
Before that analysis a separator of several bytes (", ") becomes the single byte `SEP_BYTE`, so polars
(one-byte separators only) parses the records and each occurrence of the configured separator is exactly one
field boundary. CRLF line ends stay as they are: polars reads them, and a quoted field's CRLF is its text.
Blank lines (empty, or a lone CR) and comment lines are not records.

    'a, "x, y"\\n\\n|note\\nb, "2\\n3"\\n'  with separator ", ", comment_prefix "|"
    -> records  'a\\x1f"x\\x1f y"'  (line 1, 2 fields)   'b\\x1f"2\\n3"'  (line 4, spans 2 lines, 2 fields)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrpipe.data.chunks import SHARD_REMEDIES, Remedies
from ctrpipe.data.config import CsvConfig
from ctrpipe.data.criteo import MAX_LINE_BYTES, READ_BYTES, iter_blocks
from ctrpipe.errors import InputFormatError, location

SEP_BYTE = 0x1F              # ASCII "unit separator": stands for a multi-byte separator (never in real text)
# with bad_rows=skip, a record of a field count no layout has that runs over more lines than this is taken for
# a stray quote (cut at its first line); up to this, for a real record with line breaks in quotes when its
# quotes close a field (see RecordCutter._stray_quote_line_end)
RESYNC_LINES = 16
# control bytes that may stand for a quote that is text (in an unquoted field): the first absent from a chunk
STAND_INS = bytes(b for b in range(0x1E, 0, -1) if b not in (9, 10, 13))
KIND = "delimited text (data.format=csv)"


@dataclass
class Records:
    """Whole CSV records of one file, in file order. `data` may also hold skipped (blank, comment) lines."""

    data: bytes              # normalised bytes: the separator as one byte
    starts: np.ndarray       # (R,) int64 offset of each record in data
    ends: np.ndarray         # (R,) int64 offset of its closing b"\n"
    lines: np.ndarray        # (R,) int64 1-based line of the record's first line
    spans: np.ndarray        # (R,) int64 lines it runs over: more than 1 with quoted line breaks
    fields: np.ndarray       # (R,) int64 fields (separators outside quotes + 1)
    file_bytes: int          # on-disk bytes consumed since the previous Records (progress)
    open_quote: bool = False  # the last record's quote never closes (only at the end of a file)
    text_quote: str = ""     # the quote character that `stand_in` stands for in data ("": data has none)
    stand_in: str = ""

    def __len__(self) -> int:
        return len(self.starts)

    def drop_first(self) -> Records:
        """Without the first record (a header row)."""
        return Records(self.data, self.starts[1:], self.ends[1:], self.lines[1:], self.spans[1:],
                       self.fields[1:], self.file_bytes, self.open_quote and len(self) > 1, self.text_quote,
                       self.stand_in)

    def text(self, i: int, sep: str, limit: int = 80) -> str:
        """Record i as written (with the configured separator), cut to `limit` characters."""
        raw = self.data[self.starts[i]: self.ends[i]].decode("utf-8", errors="replace").rstrip("\r")
        raw = raw.replace(chr(SEP_BYTE), sep)
        if self.text_quote:
            raw = raw.replace(self.stand_in, self.text_quote)
        return raw if len(raw) <= limit else raw[:limit] + "..."

    def gather(self, idx: np.ndarray | None = None) -> bytes:
        """The bytes of records `idx` (default: all), each with its b"\\n": what polars parses."""
        starts, ends = (self.starts, self.ends) if idx is None else (self.starts[idx], self.ends[idx])
        if len(starts) == 0:
            return b""
        if len(starts) == 1 or np.array_equal(starts[1:], ends[:-1] + 1):      # contiguous: one slice
            return self.data[int(starts[0]): int(ends[-1]) + 1]
        return np.frombuffer(self.data, np.uint8)[_ranges_mask(len(self.data), starts, ends + 1)].tobytes()


def _quoted_runs(at: np.ndarray, field_start: np.ndarray, bounds: np.ndarray, size: int,
                 first: int) -> np.ndarray:
    """(n,) bool: the quotes (byte offsets `at`) that toggle quoting, given that those before index `first`
    all do and that quoting restarts there (the field holding the first odd quote, which its own opening
    quote may reopen: "ab"c"d).

    From `first`, the next quote at a field's start opens a quoted field; the quote after it closes it; a
    quote before the next field boundary after a closing quote reopens it, and the one after that closes it
    again, and so on; then the next quote at a field's start opens the next quoted field. A quoted field
    opened at quote i thus ends before quote jump(i) = i + 2 + 2 * (the reopenings after i + 1), found for
    every i at once; the opened fields are the chain first-open, next-open(jump(...)), ..., followed by
    pointer doubling over the quotes' indices: no step per quote in Python."""
    n = len(at)
    diff = np.zeros(n + 1, dtype=np.int64)        # +1 where a run of toggling quotes starts, -1 after it
    diff[0] += 1
    diff[first] -= 1
    if first < n:
        idx = np.arange(n)
        nxt = np.where(field_start, idx, n)
        nxt = np.append(np.minimum.accumulate(nxt[::-1])[::-1], n)      # next quote at or after i at a field start
        end = np.append(bounds, size)[np.searchsorted(bounds, at, side="right")]    # the field's end after it
        reopens = np.zeros(n + 2, dtype=bool)
        reopens[:n - 1] = at[1:] < end[:-1]          # quote k + 1 lies in the same field as quote k
        run = np.zeros(n + 2, dtype=np.int64)        # reopenings in a row at k, k + 2, k + 4, ...
        for parity in (0, 1):
            g = reopens[parity::2]
            stop = np.where(~g, np.arange(len(g)), len(g))
            stop = np.minimum.accumulate(stop[::-1])[::-1]
            run[parity::2] = stop - np.arange(len(g))
        jump = np.minimum(idx + 2 + 2 * run[idx + 1], n)               # after the quoted field opened at i
        hop = np.append(nxt[jump], n)                                   # the next opening after it (n: none)
        opened = np.array([nxt[first]])[[nxt[first] < n]]
        while len(opened):          # {f^t(open_0): t < 2^k} -> t < 2^(k+1), with hop = f^(2^k)
            more = hop[opened]
            more = more[more < n]
            if not len(more):
                break
            opened = np.concatenate([opened, more])
            hop = hop[hop]
        np.add.at(diff, opened, 1)
        np.add.at(diff, jump[opened], -1)
    return np.cumsum(diff[:n]) > 0


def _ranges_mask(n: int, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """(n,) bool: True inside any [start, stop) (ranges do not overlap)."""
    mark = np.zeros(n + 1, dtype=np.int64)
    np.add.at(mark, starts, 1)
    np.add.at(mark, stops, -1)
    return np.cumsum(mark[:-1]) > 0


class RecordCutter:
    """Cuts one file into Records of at most `chunk_rows` records (blank and comment lines excluded).

    Lines are read in blocks of `chunk_rows`; a record whose quoted field runs past a block's end is carried
    over to the next block, as are records beyond `chunk_rows`, so a carry stays below one block (plus one
    open record, refused beyond `max_record_bytes`: a stray quote would otherwise swallow the file).
    """

    def __init__(self, path: Path, cfg: CsvConfig, chunk_rows: int, read_bytes: int = READ_BYTES,
                 max_record_bytes: int = MAX_LINE_BYTES, resync_fields: frozenset[int] = frozenset(),
                 remedies: Remedies = SHARD_REMEDIES) -> None:
        self.path, self.cfg, self.chunk_rows = path, cfg, chunk_rows
        # With bad_rows=skip: a record running over several lines whose field count is none of these is a
        # stray quote (it would swallow every row up to the next one, or to the end of the file); it ends
        # at its first line instead, and cutting starts afresh on the next, unless it reads as a real record
        # with line breaks in quotes (see _stray_quote_line_end), which is one bad row whole.
        self.resync_fields = resync_fields
        self.read_bytes, self.max_record_bytes = read_bytes, max_record_bytes
        self.remedies = remedies
        self.sep = cfg.separator.encode()
        self.quote = ord(cfg.quote_char) if cfg.quote_char else None
        self.comment = cfg.comment_prefix.encode()

    def __iter__(self) -> Iterator[Records]:
        carry, line, disk = b"", 1, 0
        for block in iter_blocks(self.path, self.chunk_rows, self.read_bytes, self.max_record_bytes, KIND,
                                 self.remedies):
            data = self._normalise(block.data, block.first_line)
            buf = carry + data if carry else data
            disk += block.file_bytes
            while True:
                rec, used, used_lines = self._take(buf, line, final=False, file_bytes=disk)
                if rec is not None:
                    disk = 0
                    yield rec
                buf, line = buf[used:], line + used_lines
                if rec is None:         # no whole record left (a take may stop early, at a stray quote)
                    break
            if len(buf) > self.max_record_bytes:
                raise self._open_quote_error(line, f"runs on for more than {self.max_record_bytes:,} bytes")
            carry = buf
        while carry:
            rec, used, used_lines = self._take(carry, line, final=True, file_bytes=disk)
            disk = 0
            if rec is None:
                break
            yield rec
            carry, line = carry[used:], line + used_lines

    def _normalise(self, data: bytes, first_line: int) -> bytes:
        if len(self.sep) > 1:
            if bytes([SEP_BYTE]) in data:
                at = data.index(bytes([SEP_BYTE]))
                raise InputFormatError(
                    "the byte 0x1f (ASCII unit separator) is in the text; the reader uses it in place of "
                    f"the {len(self.sep)}-byte separator {self.cfg.separator!r}",
                    where=location(self.path, first_line + data.count(b"\n", 0, at)),
                    fix="remove the control character from the file, or use a one-character separator")
            data = data.replace(self.sep, bytes([SEP_BYTE]))
        return data

    def _take(self, buf: bytes, line0: int, final: bool, file_bytes: int, resync: bool = True,
              ) -> tuple[Records | None, int, int]:
        """(the first records of buf, up to chunk_rows, or None; bytes used; lines used). Without `final`,
        an unfinished last record stays in buf; with it, the rest of buf is one record with an open quote."""
        arr = np.frombuffer(buf, np.uint8)
        nl_at = np.flatnonzero(arr == 10)
        inside, text_quotes = self._inside_quotes(arr, nl_at)
        if resync and self.resync_fields and inside is not None:
            cut = self._stray_quote_line_end(arr, nl_at, inside, final)
            if cut is not None:         # parity restarts after the cut; the record before it stays as it is
                return self._take(buf[: cut[0] + 1], line0, True, file_bytes, resync=not cut[1])
        ends = nl_at[~inside[nl_at]] if inside is not None else nl_at
        open_quote = False
        if final and (len(ends) == 0 or ends[-1] != len(buf) - 1):
            ends = np.append(ends, len(buf) - 1)             # iter_blocks ends every file with b"\n"
            open_quote = True
        if len(ends) == 0:
            return None, 0, 0
        starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
        # CRLF line ends stay (polars reads them, and keeps a quoted field's CRLF as the text it is): a blank
        # line is empty or a lone CR
        blank = (ends == starts) | ((ends == starts + 1) & (arr[np.minimum(starts, len(arr) - 1)] == 13))
        data_rec = ~blank & ~self._comments(arr, starts)
        kept = np.flatnonzero(data_rec)
        if len(kept) > self.chunk_rows:                     # the rest is carried into the next Records
            cut = int(kept[self.chunk_rows - 1]) + 1
            starts, ends, kept = starts[:cut], ends[:cut], kept[: self.chunk_rows]
            open_quote = False
        used = int(ends[-1]) + 1
        first_nl = np.searchsorted(nl_at, starts[kept], side="left")
        lines = line0 + first_nl
        spans = np.searchsorted(nl_at, ends[kept], side="right") - first_nl
        fields = self._field_counts(arr, starts, used, inside)[kept] if len(kept) else np.zeros(0, np.int64)
        used_lines = int(np.searchsorted(nl_at, used, side="left"))
        if not len(kept):                                   # only blank and comment lines
            return None, used, used_lines
        data, text_quote, stand_in = buf, "", ""
        text_quotes = text_quotes[text_quotes < used]
        if len(text_quotes):
            data, stand_in = self._mark_text_quotes(arr[:used], text_quotes, line0)
            text_quote = chr(self.quote or 0)
        rec = Records(data, starts[kept], ends[kept], lines.astype(np.int64), spans.astype(np.int64),
                      fields, file_bytes, open_quote and bool(kept[-1] == len(starts) - 1), text_quote, stand_in)
        return rec, used, used_lines

    def _mark_text_quotes(self, arr: np.ndarray, at: np.ndarray, line0: int) -> tuple[bytes, str]:
        """(arr's bytes with the quotes at `at` (text, inside unquoted fields) as a stand-in byte, the stand-in):
        the first of STAND_INS that is not in arr, nor the separator or comment prefix.

        polars reads such quotes as text too, but only while it parses a record alone: its parallel reader
        cuts the bytes into rows by counting every quote as a toggle, so an odd number of them refused the
        record and an even number could join the fields or rows between them, depending on which records
        shared the parse (chunk_rows). Polars never sees them now; the reader puts them back in the values."""
        used = np.bincount(arr, minlength=256).astype(bool)
        used[list(self.sep + self.comment)] = True
        free = [b for b in STAND_INS if not used[b]]
        if not free:          # every control byte in one chunk: binary data, not delimited text
            raise InputFormatError(
                "the text holds every ASCII control character, so none can stand for the quotes inside unquoted "
                "fields while polars parses it", where=location(self.path, line0),
                fix=self.remedies.or_config("check the file is delimited text", "set data.csv.quote_char=\"\" if "
                                            "quote characters are plain text in this file"))
        out = arr.copy()
        out[at] = free[0]
        return out.tobytes(), chr(free[0])

    def _stray_quote_line_end(self, arr: np.ndarray, nl_at: np.ndarray, inside: np.ndarray,
                              final: bool) -> tuple[int, bool] | None:
        """Where to cut buf at the first runaway record (see resync_fields): (offset of a b"\\n", whether the
        record before it is whole), or None.

        A stray quote: the record ends at its first line, and its other lines are rows of their own. But a
        record of at most RESYNC_LINES lines whose quotes close a field (the last one is followed by a
        separator or the line's end) and whose lines between the first and the last are no rows when read
        alone (or that spans two lines) is a real record with the wrong field count: one bad row, whole (cut
        at its first line, its last line would read as a row of its own, fields shifted). A record still open at
        the end of buf waits for more lines until it runs past RESYNC_LINES (at the end of the file it is
        cut: its quote never closes), so the decision never depends on where a block ends (chunk_rows);
        waiting for its quote to close would carry the rest of the file. Only buffers holding a record over
        several lines pay the field count."""
        ends = nl_at[~inside[nl_at]]
        starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        open_tail = (int(ends[-1]) + 1 if len(ends) else 0) < len(arr)
        if open_tail:
            starts = np.append(starts, int(ends[-1]) + 1 if len(ends) else 0)
            ends = np.append(ends, len(arr) - 1)
        spans = np.searchsorted(nl_at, ends, side="right") - np.searchsorted(nl_at, starts, side="left")
        multi = spans > 1
        if not multi.any():
            return None
        sep_byte = SEP_BYTE if len(self.sep) > 1 else self.sep[0]
        sep = (arr == sep_byte) & ~inside
        fields = np.add.reduceat(sep, starts, dtype=np.int64) + 1
        allowed = np.array(sorted(self.resync_fields), dtype=np.int64)
        runaway = multi & ~np.isin(fields, allowed)
        if open_tail:       # it may still close, until it runs past RESYNC_LINES lines or the file ends
            runaway[-1] = multi[-1] and (final or spans[-1] > RESYNC_LINES)
        hit = np.flatnonzero(runaway)
        if not len(hit):
            return None
        i = int(hit[0])
        start, end = int(starts[i]), int(ends[i])
        first_end = int(nl_at[np.searchsorted(nl_at, start)])
        if (open_tail and i == len(starts) - 1) or spans[i] > RESYNC_LINES:
            return first_end, False
        closing = start + int(np.flatnonzero(inside[start:end])[-1]) + 1       # the quote that ends quoting
        after = int(arr[closing + 1]) if closing + 1 < len(arr) else 10
        last_line = int(nl_at[np.searchsorted(nl_at, end) - 1]) + 1
        if after in (sep_byte, 13, 10) and (last_line == first_end + 1 or
                                             not self._rows_alone(arr[first_end + 1: last_line], allowed)):
            return end, True
        return first_end, False

    def _rows_alone(self, seg: np.ndarray, allowed: np.ndarray) -> bool:
        """Whether the lines of seg, cut afresh, are each a record of an allowed field count with no quote
        inside an unquoted field (blank and comment lines aside)."""
        nl_at = np.flatnonzero(seg == 10)
        inside, text_quotes = self._inside_quotes(seg, nl_at)
        if len(text_quotes) or (inside is not None and inside[nl_at].any()):
            return False
        starts = np.concatenate(([0], nl_at[:-1] + 1)).astype(np.int64)
        rows = (nl_at > starts) & ~((nl_at == starts + 1) & (seg[starts] == 13)) & ~self._comments(seg, starts)
        fields = self._field_counts(seg, starts, len(seg), inside)
        return bool(np.isin(fields[rows], allowed).all())

    def _inside_quotes(self, arr: np.ndarray, nl_at: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """((n,) bool: byte i lies inside quotes (parity of the quotes before it and at it), None: no quotes;
        the offsets of the quotes that are text: in unquoted fields of data lines)."""
        none = np.zeros(0, dtype=np.int64)
        if self.quote is None:
            return None, none
        q = arr == self.quote
        if not q.any():
            return None, none
        if not self.comment:
            quoting = self._quoting_quotes(arr, q)
            return np.logical_xor.accumulate(quoting), none if quoting is q else np.flatnonzero(q & ~quoting)
        # quotes in comment lines are text, and a line is a comment only where it starts outside quotes (a
        # quoted field may hold a line that begins with the prefix). Every line that begins with the prefix is
        # first taken for a comment, then each pass takes every line's status from the parity the last pass
        # gave, until none changes. A line's status depends only on the lines before it, so each pass settles
        # at least the first unsettled line and usually most of them: a file seldom has such lines (one pass),
        # and quoted text full of them needs a few passes; only a chain where each such line flips the next
        # (an open quote, then line after line of `#,"`) still takes one pass per line
        line_starts = np.concatenate(([0], nl_at[:-1] + 1)).astype(np.int64)
        line_starts = line_starts[line_starts < len(arr)]
        prefixed = line_starts[self._comments(arr, line_starts)]
        line_ends = np.append(nl_at + 1, len(arr))[np.searchsorted(nl_at, prefixed)]
        at = np.flatnonzero(q)
        has_quote = np.searchsorted(at, line_ends) > np.searchsorted(at, prefixed)   # only these move the parity
        prefixed, line_ends = prefixed[has_quote], line_ends[has_quote]
        comment = np.ones(len(prefixed), dtype=bool)
        while True:
            text = _ranges_mask(len(arr), prefixed[comment], line_ends[comment]) if comment.any() else None
            data_q = q & ~text if text is not None else q
            quoting = self._quoting_quotes(arr, data_q)
            inside = np.logical_xor.accumulate(quoting)
            quoted = (prefixed > 0) & inside[np.maximum(prefixed - 1, 0)]
            if np.array_equal(comment, ~quoted):
                return inside, none if quoting is data_q else np.flatnonzero(data_q & ~quoting)
            comment = ~quoted

    def _quoting_quotes(self, arr: np.ndarray, q: np.ndarray) -> np.ndarray:
        """q less the quotes that are text, as polars reads them: a field that starts with a quote is quoted,
        and every quote in it toggles (a closing quote, an escaped pair "", a reopening) until a separator or
        line break outside quotes ends it; in a field that does not start with a quote, quotes are characters
        (5'11", 5""). Counting every quote as a toggle is right until the first quote that would open away
        from a field's start; from there the quoted fields are found on the quotes' positions alone, as whole
        arrays (`_quoted_runs`), which only a file with such quotes pays."""
        at = np.flatnonzero(q)
        sep = SEP_BYTE if len(self.sep) > 1 else self.sep[0]
        before = arr[np.maximum(at - 1, 0)]
        field_start = (at == 0) | (before == sep) | (before == 10)
        stray = np.flatnonzero((np.arange(len(at)) % 2 == 0) & ~field_start)
        if not len(stray):
            return q
        bounds = np.flatnonzero((arr == sep) | (arr == 10))     # where a field can end
        keep = _quoted_runs(at, field_start, bounds, len(arr), max(int(stray[0]) - 2, 0))
        out = np.zeros_like(q)
        out[at[keep]] = True
        return out

    def _comments(self, arr: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(len(starts),) bool: the line at each start begins with the comment prefix."""
        hit = np.zeros(len(starts), dtype=bool)
        if not self.comment or not len(starts):
            return hit
        hit[:] = True
        for j, b in enumerate(self.comment):
            pos = starts + j
            ok = pos < len(arr)
            hit &= ok & (arr[np.minimum(pos, len(arr) - 1)] == b)
        return hit

    def _field_counts(self, arr: np.ndarray, starts: np.ndarray, used: int,
                      inside: np.ndarray | None) -> np.ndarray:
        sep = arr[:used] == (SEP_BYTE if len(self.sep) > 1 else self.sep[0])
        if inside is not None:
            sep &= ~inside[:used]
        return np.add.reduceat(sep, starts, dtype=np.int64) + 1

    def _open_quote_error(self, line: int, how: str) -> InputFormatError:
        return InputFormatError(
            f"a quoted field in the row starting on this line never closes: it {how}",
            where=location(self.path, line),
            fix=self.remedies.or_config(f"check the quoting near that line (a stray {self.cfg.quote_char!r}?)",
                                        "if quote characters are plain text in this file, set "
                                        "data.csv.quote_char=\"\""))


def count_records(path: Path, cfg: CsvConfig, chunk_rows: int = 100_000,
                  resync_fields: frozenset[int] = frozenset()) -> int:
    """Data rows in a CSV file (records, less the header), without parsing values: for tail splits.
    `resync_fields`: as the reader's (bad_rows=skip), so both count the same records."""
    n = sum(len(r) for r in RecordCutter(path, cfg, chunk_rows, resync_fields=resync_fields))
    return max(n - int(cfg.header), 0)
