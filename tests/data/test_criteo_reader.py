"""Criteo text reader: chunking never changes the rows, and every bad input names its file, line and fix."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from reader_helpers import lines_of, reference_frame, unlabelled_copy, write_lines

from ctrpipe.data.config import CRITEO_CAT, CRITEO_INT, DataConfig
from ctrpipe.data.criteo import iter_blocks
from ctrpipe.data.reader import iter_raw_chunks
from ctrpipe.errors import InputFormatError

CFG = DataConfig()


def read_all(path: Path, chunk_rows: int = 1000, cfg: DataConfig = CFG, **kw: object) -> pl.DataFrame:
    return pl.concat([c.frame for c in iter_raw_chunks(cfg, [path], chunk_rows, **kw)], how="vertical")


# ------------------------------------------------------------------------------------------ clean input

def test_values_match_reference_parse(criteo_tsv: Path) -> None:
    got = read_all(criteo_tsv)
    assert got.columns == ["label", *CRITEO_INT, *CRITEO_CAT]
    assert (got.schema["label"], got.schema["I1"], got.schema["C1"]) == (pl.Float32, pl.Float64, pl.String)
    assert got.equals(reference_frame(criteo_tsv))


@pytest.mark.parametrize("chunk_rows", [1, 7, 63, 64, 65, 10_000])
def test_chunks_identical_for_any_chunk_rows_plain_and_gz(tmp_path: Path, criteo_tsv: Path,
                                                          chunk_rows: int) -> None:
    gz = tmp_path / "train.tsv.gz"
    gz.write_bytes(gzip.compress(criteo_tsv.read_bytes()))
    disguised = tmp_path / "train_gz_without_suffix.tsv"        # gzip found by magic bytes, not the name
    disguised.write_bytes(gz.read_bytes())
    want = read_all(criteo_tsv, 64)
    for path in (criteo_tsv, gz, disguised):
        chunks = list(iter_raw_chunks(CFG, [path], chunk_rows))
        assert all(c.frame.height <= chunk_rows for c in chunks)
        assert [c.first_line for c in chunks] == list(range(1, 65, chunk_rows))
        assert sum(c.nbytes for c in chunks) == len(criteo_tsv.read_bytes())
        assert sum(c.file_bytes for c in chunks) == path.stat().st_size
        assert all(c.has_labels and not c.bad_rows and c.line_numbers is None for c in chunks)
        assert pl.concat([c.frame for c in chunks]).equals(want)


def test_only_configured_columns_are_returned(criteo_tsv: Path) -> None:
    cfg = dataclasses.replace(CFG, numeric=dataclasses.replace(CFG.numeric, columns=("I2", "I1")),
                              categorical=dataclasses.replace(CFG.categorical, columns=("C3",)))
    assert read_all(criteo_tsv, cfg=cfg).columns == ["label", "I2", "I1", "C3"]


def test_crlf_and_missing_final_newline(tmp_path: Path, criteo_tsv: Path) -> None:
    text = criteo_tsv.read_text()
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    no_nl = tmp_path / "no_nl.tsv"
    no_nl.write_text(text.rstrip("\n"))
    want = read_all(criteo_tsv)
    for path in (crlf, no_nl):
        for rows in (5, 1000):
            assert read_all(path, rows).equals(want)


def test_float_formatted_integers_are_accepted(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    f = lines[0].split("\t")
    f[1], f[2] = "260.0", "-1.0"
    lines[0] = "\t".join(f)
    got = read_all(write_lines(tmp_path / "f.tsv", lines))
    assert got["I1"][0] == 260.0 and got["I2"][0] == -1.0


def test_unlabelled_test_file(tmp_path: Path, criteo_tsv: Path) -> None:
    path = unlabelled_copy(criteo_tsv, tmp_path / "test.tsv")
    chunks = list(iter_raw_chunks(CFG, [path], 8, require_labels=False))
    assert all(not c.has_labels for c in chunks)
    frame = pl.concat([c.frame for c in chunks])
    assert frame.columns == [*CRITEO_INT, *CRITEO_CAT]
    assert frame.equals(read_all(criteo_tsv).drop("label"))
    with pytest.raises(InputFormatError) as err:
        list(iter_raw_chunks(CFG, [path], 8))
    msg = str(err.value)
    assert str(path) in msg and "39 fields" in msg and "--test" in msg


# ------------------------------------------------------------------------------------------ bad input

def test_wrong_field_count_names_line(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines[17] = lines[17].rstrip("\n") + "\textra\n"
    path = write_lines(tmp_path / "day_0.tsv", lines)
    for rows in (5, 1000):
        with pytest.raises(InputFormatError) as err:
            read_all(path, rows)
        msg = str(err.value)
        assert f"{path}, line 18: 41 tab-separated fields, expected 40 (label + 13 ints + 26 cats)" in msg
        assert "fix:" in msg and "--bad-rows skip" in msg


def test_stripped_trailing_fields_fix_message(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines[40] = "\t".join(lines[40].split("\t")[:37]) + "\n"
    path = write_lines(tmp_path / "t.tsv", lines)
    with pytest.raises(InputFormatError) as err:
        read_all(path, 16)
    msg = str(err.value)
    assert f"{path}, line 41: 37 tab-separated fields" in msg and "trailing empty fields stripped" in msg


@pytest.mark.parametrize("native", ["0", "1"])
def test_a_byte_order_mark_inside_the_file_is_text_for_any_chunk_rows(tmp_path: Path, criteo_tsv: Path,
                                                                       native: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """polars drops a mark at the start of the bytes it parses: on line 11 one was dropped (a good row) when a
    chunk started there and kept (a bad label) otherwise, in the polars path (CTRPIPE_NATIVE=0)."""
    monkeypatch.setenv("CTRPIPE_NATIVE", native)
    lines = lines_of(criteo_tsv)
    lines[10] = "\ufeff" + lines[10]
    path = write_lines(tmp_path / "bom.tsv", lines)
    for chunk_rows in (5, 10, 1000):
        chunks = list(iter_raw_chunks(CFG, [path], chunk_rows, bad_rows="skip"))
        assert [(b.line, b.reason) for c in chunks for b in c.bad_rows] == [(11, "bad label")]


def test_blank_line_is_a_bad_line(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines.insert(10, "\n")
    path = write_lines(tmp_path / "blank.tsv", lines)
    with pytest.raises(InputFormatError, match=r"line 11: empty line"):
        read_all(path)
    chunks = list(iter_raw_chunks(CFG, [path], 1000, bad_rows="skip"))
    assert [b.line for b in chunks[0].bad_rows] == [11]


def test_non_numeric_value_names_line_and_column(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    f = lines[29].split("\t")
    f[5] = "abc"                                   # field 5 = I5
    lines[29] = "\t".join(f)
    path = write_lines(tmp_path / "n.tsv", lines)
    for rows in (7, 1000):
        with pytest.raises(InputFormatError) as err:
            read_all(path, rows)
        msg = str(err.value)
        assert f"{path}, line 30, column I5: 'abc' is not a number" in msg and "fix:" in msg


@pytest.mark.parametrize("label,expected", [("2", "label 2 is not 0 or 1"), ("", "empty label"),
                                            ("yes", "label 'yes' is not 0 or 1")])
def test_bad_label(tmp_path: Path, criteo_tsv: Path, label: str, expected: str) -> None:
    lines = lines_of(criteo_tsv)
    lines[3] = label + lines[3][lines[3].index("\t"):]
    path = write_lines(tmp_path / "l.tsv", lines)
    with pytest.raises(InputFormatError) as err:
        read_all(path)
    msg = str(err.value)
    assert f"{path}, line 4, column label: {expected}" in msg and "0/1 click label" in msg


def test_header_line(tmp_path: Path, criteo_tsv: Path) -> None:
    header = "\t".join(["label", *CRITEO_INT, *CRITEO_CAT]) + "\n"
    path = write_lines(tmp_path / "h.tsv", [header, *lines_of(criteo_tsv)])
    with pytest.raises(InputFormatError) as err:
        read_all(path)
    msg = str(err.value)
    assert f"{path}, line 1: the first line looks like a header" in msg and "remove the header line" in msg


def test_comma_separated_file_gets_separator_hint(tmp_path: Path, criteo_tsv: Path) -> None:
    path = write_lines(tmp_path / "c.csv", [ln.replace("\t", ",") for ln in lines_of(criteo_tsv)])
    with pytest.raises(InputFormatError) as err:
        read_all(path)
    assert "line 1" in str(err.value) and "data.separator=','" in str(err.value)
    cfg = dataclasses.replace(CFG, separator=",")
    assert read_all(path, cfg=cfg).equals(read_all(criteo_tsv))


def test_lines_split_by_spaces_or_commas_are_no_header(tmp_path: Path, criteo_tsv: Path) -> None:
    """A helper's sweep: a space-separated file was said to start with a header, and removing that line (the
    fix) met the same error on the next one, for ever; a space-separated line inside a file was called short
    (trailing fields stripped); a README among the inputs was a header too."""
    lines = lines_of(criteo_tsv)
    spaced = write_lines(tmp_path / "s.txt", [ln.replace("\t", " ") for ln in lines])
    with pytest.raises(InputFormatError) as err:
        read_all(spaced)
    assert "header" not in str(err.value) and "40 space-separated fields" in err.value.what
    assert "convert the spaces to tabs" in err.value.fix and "data.separator=' '" in err.value.fix
    assert read_all(spaced, cfg=dataclasses.replace(CFG, separator=" ")).equals(read_all(criteo_tsv))
    comma = write_lines(tmp_path / "c.csv", [ln.replace("\t", ",") for ln in lines])
    with pytest.raises(InputFormatError) as err:
        read_all(comma)
    assert "header" not in str(err.value) and "data.separator=','" in err.value.fix
    inside = write_lines(tmp_path / "i.tsv", [*lines[:10], lines[10].replace("\t", " "), *lines[11:]])
    with pytest.raises(InputFormatError) as err:
        read_all(inside)
    assert err.value.where.endswith("line 11") and "short" not in err.value.fix and "spaces to tabs" in err.value.fix
    readme = write_lines(tmp_path / "README.md", ["# my data\n", "some notes\n"])
    with pytest.raises(InputFormatError) as err:
        read_all(readme)
    assert "header" not in str(err.value) and "1 tab-separated field on the first line" in err.value.what


def test_corrupt_and_truncated_gz(tmp_path: Path, criteo_tsv: Path) -> None:
    blob = gzip.compress(criteo_tsv.read_bytes() * 20)
    truncated = tmp_path / "trunc.tsv.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    corrupt = tmp_path / "corrupt.tsv.gz"
    corrupt.write_bytes(blob[:20] + bytes(b ^ 0x5A for b in blob[20:200]) + blob[200:])
    for path in (truncated, corrupt):
        with pytest.raises(InputFormatError) as err:
            read_all(path, 50)
        msg = str(err.value)
        assert str(path) in msg and "gzip" in msg and "gunzip -t" in msg


def test_missing_and_empty_files(tmp_path: Path) -> None:
    from ctrpipe.data.sources import expand_inputs

    with pytest.raises(InputFormatError, match="not found"):
        expand_inputs([tmp_path / "nope.tsv"], "criteo")
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(InputFormatError, match="empty"):
        expand_inputs([empty], "criteo")
    empty_gz = tmp_path / "empty.tsv.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    with pytest.raises(InputFormatError) as err:
        read_all(empty_gz)
    assert str(empty_gz) in str(err.value) and "empty" in str(err.value)


def test_other_formats_are_named(tmp_path: Path, parquet_file: Path) -> None:
    with pytest.raises(InputFormatError, match="this is a Parquet file.*\n.*--set data.format=parquet"):
        read_all(parquet_file)
    bz = tmp_path / "x.tsv.bz2"
    bz.write_bytes(b"BZh91AY&SY" + bytes(50))
    with pytest.raises(InputFormatError, match="bzip2"):
        read_all(bz)


def test_invalid_utf8(tmp_path: Path, criteo_tsv: Path) -> None:
    raw = bytearray(criteo_tsv.read_bytes())
    lines = raw.split(b"\n")
    lines[6] = lines[6][:-3] + b"\xff\xfe\n"[:2] + lines[6][-1:]
    path = tmp_path / "u.tsv"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(InputFormatError, match=r"line 7: invalid UTF-8"):
        read_all(path)
    chunks = list(iter_raw_chunks(CFG, [path], 1000, bad_rows="skip"))
    assert [(b.line, b.reason) for b in chunks[0].bad_rows] == [(7, "invalid UTF-8")]


def test_many_invalid_utf8_lines(tmp_path: Path) -> None:
    """Each invalid line cost a copy and a decode of the whole rest of the block (quadratic in bad lines):
    they are found piece by piece now. Bad lines first, last, side by side and across pieces are all dropped
    and named, and the good lines read as they would without the bad ones."""
    from raw_inputs import write_criteo_tsv

    src = write_criteo_tsv(tmp_path / "src.tsv", 3000, seed=5)
    lines = src.read_bytes().split(b"\n")[:-1]
    bad = sorted({0, 1, 2, 700, 701, 1499, 2999, *range(1000, 3000, 37)})
    for i in bad:
        lines[i] += b"\xe9"                                       # a Latin-1 e-acute ends the last field
    path = tmp_path / "u.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputFormatError, match=r"line 1: invalid UTF-8"):
        read_all(path)
    good = tmp_path / "good.tsv"
    good.write_bytes(b"".join(line + b"\n" for i, line in enumerate(lines) if i not in set(bad)))
    chunks = list(iter_raw_chunks(CFG, [path], 100_000, bad_rows="skip"))
    assert [(b.line, b.reason) for b in chunks[0].bad_rows] == [(i + 1, "invalid UTF-8") for i in bad]
    assert chunks[0].frame.equals(read_all(good, 100_000))


# ------------------------------------------------------------------------------------------ skip mode

def test_skip_mode_counts_and_keeps_order(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines[2] = "\t".join(lines[2].split("\t")[:30]) + "\n"          # line 3: field count
    f = lines[9].split("\t")
    f[3] = "x1"                                                      # line 10: I3 not a number
    lines[9] = "\t".join(f)
    lines[20] = "7" + lines[20][lines[20].index("\t"):]              # line 21: bad label
    lines[50] = lines[50].rstrip("\n") + "\t\t\n"                    # line 51: 42 fields
    path = write_lines(tmp_path / "bad.tsv", lines)
    good = [i for i in range(64) if i not in (2, 9, 20, 50)]
    want = read_all(write_lines(tmp_path / "good.tsv", [lines[i] for i in good]))
    for rows in (4, 16, 1000):
        chunks = list(iter_raw_chunks(CFG, [path], rows, bad_rows="skip"))
        bad = [b for c in chunks for b in c.bad_rows]
        assert sorted((b.line, b.reason, b.column) for b in bad) == [
            (3, "field count", None), (10, "not a number", "I3"), (21, "bad label", "label"),
            (51, "field count", None)]
        assert pl.concat([c.frame for c in chunks]).equals(want)
        kept_lines = np.concatenate([[c.line_of(i) for i in range(c.frame.height)] for c in chunks])
        assert kept_lines.tolist() == [i + 1 for i in good]


def test_skip_mode_whole_block_bad(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    for i in range(8, 16):
        lines[i] = "1\t2\n"
    path = write_lines(tmp_path / "b.tsv", lines)
    chunks = list(iter_raw_chunks(CFG, [path], 8, bad_rows="skip"))
    assert chunks[1].frame.height == 0 and len(chunks[1].bad_rows) == 8
    assert chunks[1].frame.columns == chunks[0].frame.columns
    assert sum(c.frame.height for c in chunks) == 56


def test_layout_decided_by_majority_not_first_line(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines[0] = "\t".join(lines[0].rstrip("\n").split("\t")[:39]) + "\n"   # stripped C26 -> 39 fields
    path = write_lines(tmp_path / "m.tsv", lines)
    with pytest.raises(InputFormatError) as err:
        read_all(path)
    assert f"{path}, line 1: 39 tab-separated fields, expected 40" in str(err.value)


def test_no_line_breaks_is_an_error_not_a_memory_blowup(tmp_path: Path) -> None:
    path = tmp_path / "blob.tsv"
    path.write_bytes(b"1\t2\n" + b"x" * 10_000)
    with pytest.raises(InputFormatError, match=r"blob.tsv: line 2 is longer than 4,096 bytes"):
        list(iter_blocks(path, 100, read_bytes=1024, max_line_bytes=4096))   # small limits, tiny file


@pytest.mark.parametrize("read_bytes", [7, 100, 4096])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_blocks_cut_at_lines_across_reads(criteo_tsv: Path, read_bytes: int, chunk_rows: int) -> None:
    raw = criteo_tsv.read_bytes()
    blocks = list(iter_blocks(criteo_tsv, chunk_rows, read_bytes=read_bytes))
    assert b"".join(b.data for b in blocks) == raw
    assert all(b.data.count(b"\n") == b.lines == min(chunk_rows, 64 - b.first_line + 1) for b in blocks)
    assert [b.first_line for b in blocks] == list(range(1, 65, chunk_rows))


def test_long_and_short_line_cancelling_out(tmp_path: Path, criteo_tsv: Path) -> None:
    lines = lines_of(criteo_tsv)
    lines[5] = lines[5].rstrip("\n") + "\tx\n"                         # 41 fields
    lines[8] = lines[8][: lines[8].rindex("\t")] + "\n"              # 39 fields: separator total unchanged
    path = write_lines(tmp_path / "cancel.tsv", lines)
    with pytest.raises(InputFormatError, match=r"cancel.tsv, line 6: 41 tab-separated fields"):
        read_all(path)
    chunks = list(iter_raw_chunks(CFG, [path], 1000, bad_rows="skip"))
    assert [b.line for b in chunks[0].bad_rows] == [6, 9] and chunks[0].frame.height == 62


def test_long_line_inside_a_plain_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mid.tsv"
    path.write_bytes(b"1\t2\n" * 3 + b"y" * 5_000 + b"\n" + b"1\t2\n" * 3)
    with pytest.raises(InputFormatError, match=r"mid.tsv: line 4 is longer than 4,096 bytes"):
        list(iter_blocks(path, 100, max_line_bytes=4096))
    blocks = list(iter_blocks(path, 2, max_line_bytes=8192))
    assert [b.lines for b in blocks] == [2, 2, 2, 1] and b"".join(b.data for b in blocks) == path.read_bytes()


def test_truncated_gz_names_the_last_intact_line(tmp_path: Path, criteo_tsv: Path) -> None:
    text = criteo_tsv.read_bytes() * 200                         # 12,800 lines: the cut falls far from line 1
    blob = gzip.compress(text)
    truncated = tmp_path / "trunc.tsv.gz"
    truncated.write_bytes(blob[: len(blob) * 3 // 4])
    intact = len(_intact_lines(truncated.read_bytes()))
    with pytest.raises(InputFormatError) as err:
        read_all(truncated, 50)
    assert f"after line {intact:,}" in str(err.value) and intact > 1000


def _intact_lines(blob: bytes) -> list[bytes]:
    import zlib
    out = zlib.decompressobj(wbits=31).decompress(blob)
    return out.split(b"\n")[:-1]


@pytest.mark.parametrize("gz", [False, True])
def test_utf8_byte_order_mark_is_not_data(tmp_path: Path, criteo_tsv: Path, gz: bool) -> None:
    raw = b"\xef\xbb\xbf" + criteo_tsv.read_bytes()
    path = tmp_path / ("bom.tsv.gz" if gz else "bom.tsv")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    chunks = list(iter_raw_chunks(CFG, [path], 20))
    assert sum(c.file_bytes for c in chunks) == path.stat().st_size
    assert pl.concat([c.frame for c in chunks]).equals(read_all(criteo_tsv))


def test_layout_does_not_depend_on_the_chunk_size(tmp_path: Path) -> None:
    """A first line with 39 fields: at chunk_rows=1 the whole file was called a test file (or, unlabelled,
    every later line was dropped as bad); the layout is voted on the file's first lines, whatever the chunks."""
    l40 = b"1" + b"\t5" * 13 + b"\tab" * 26 + b"\n"
    l39 = b"5" + b"\t5" * 12 + b"\tab" * 26 + b"\n"
    path = tmp_path / "first_short.tsv"
    path.write_bytes(l39 + l40 * 3)
    for rows in (1, 2, 1000):
        chunks = list(iter_raw_chunks(CFG, [path], rows, bad_rows="skip"))
        assert sum(c.frame.height for c in chunks) == 3, rows
        assert [(b.line, b.reason) for c in chunks for b in c.bad_rows] == [(1, "field count")], rows
