"""CSV reader (data.format=csv): quoting (separators, line breaks, doubled quotes), multi-character separators,
missing tokens, header or column_names, derived labels, bad rows naming file/line/column, chunk independence."""

from __future__ import annotations

import dataclasses
import gzip
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctrpipe.config import load_config
from ctrpipe.data.config import CategoricalConfig, CsvConfig, DataConfig, DerivedLabelConfig, NumericConfig
from ctrpipe.data.csv_records import RecordCutter
from ctrpipe.data.reader import iter_raw_chunks, resolve_inputs_columns
from ctrpipe.errors import ConfigError, InputFormatError, SchemaError

NAMES = ("uid", "age", "city", "note", "status", "clicked")
CITIES = ["Paris", "New York, NY", "Köln", 'The "Big" Apple', "?", ""]
NOTES = ["plain", "a, b", "two\nlines", 'say "hi"', "", "x; y\t z", "end,\n, start"]
STATUSES = ["Married-civ-spouse", "Never-married", "Divorced", "Married-AF-spouse", "Widowed"]


def make_rows(n: int = 40, seed: int = 0) -> list[list[str]]:
    rnd = random.Random(seed)
    return [[f"u{i}", rnd.choice([str(rnd.randint(17, 90)), "?", "", " 42 "]), rnd.choice(CITIES),
             rnd.choice(NOTES), rnd.choice(STATUSES), rnd.choice(["0", "1"])] for i in range(n)]


def write_csv(path: Path, rows: list[list[str]], sep: str = ",", header: bool = True, head_lines: str = "",
              newline: str = "\n") -> Path:
    """A small RFC 4180 writer: fields holding the separator, a quote or a line break are quoted."""
    def field(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if (sep in v or '"' in v or "\n" in v or "," in v) else v
    lines = ([sep.join(NAMES)] if header else []) + [sep.join(field(v) for v in r) for r in rows]
    path.write_bytes((head_lines + newline.join(lines) + newline).encode())
    return path


def cfg_for(sep: str = ",", header: bool = True, **kw: object) -> DataConfig:
    csv = CsvConfig(separator=sep, header=header, column_names=() if header else NAMES, missing=("?",),
                    comment_prefix=str(kw.pop("comment_prefix", "")))
    base = DataConfig(format="csv", csv=csv, labels=("clicked",), id_column="uid",
                      derived_labels=(DerivedLabelConfig(name="married", column="status", pattern="^Married"),),
                      numeric=NumericConfig(columns=("age",)), categorical=CategoricalConfig(columns=("city", "note")))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]  # test-only overrides


def reference(rows: list[list[str]]) -> pl.DataFrame:
    """What the reader must deliver, computed from the rows in Python."""
    def num(v: str) -> float | None:
        return None if v.strip() in ("?", "") else float(v)
    return pl.DataFrame({
        "clicked": [float(r[5]) for r in rows], "married": [float(r[4].startswith("Married")) for r in rows],
        "uid": [r[0] for r in rows], "age": [num(r[1]) for r in rows],
        "city": [None if r[2] in ("?", "") else r[2] for r in rows], "note": [r[3] or None for r in rows],
    }, schema={"clicked": pl.Float32, "married": pl.Float32, "uid": pl.String, "age": pl.Float64,
               "city": pl.String, "note": pl.String})


def read(cfg: DataConfig, paths: list[Path], rows: int = 1000, **kw: object) -> pl.DataFrame:
    return pl.concat([c.frame for c in iter_raw_chunks(cfg, paths, rows, **kw)])  # type: ignore[arg-type]


@pytest.mark.parametrize("sep", [",", ", ", "\t", ";", "||"])
@pytest.mark.parametrize("header", [True, False])
def test_values_match_the_rows_for_any_separator(tmp_path: Path, sep: str, header: bool) -> None:
    rows = make_rows()
    path = write_csv(tmp_path / "p.csv", rows, sep, header)
    frame = read(cfg_for(sep, header), [path])
    assert frame.equals(reference(rows))


def test_quoted_separators_line_breaks_and_doubled_quotes(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('uid,age,city,note,status,clicked\n'
                    'a,1,"Paris, FR","first\nsecond, third",Divorced,0\n'
                    'b,2,"say ""hi""",,Married-civ-spouse,1\n'
                    'c,3,Rome,"",Widowed,0\n')
    chunks = list(iter_raw_chunks(cfg_for(), [path], 1000))
    frame = chunks[0].frame
    assert frame["city"].to_list() == ["Paris, FR", 'say "hi"', "Rome"]
    assert frame["note"].to_list() == ["first\nsecond, third", None, None]
    assert chunks[0].line_numbers.tolist() == [2, 4, 5]          # the quoted line break moves row b to line 4
    assert chunks[0].positions.tolist() == [0, 1, 2]             # ids count rows, not lines


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 1000])
def test_chunks_identical_for_any_chunk_rows(tmp_path: Path, rows: int) -> None:
    data = make_rows(60, seed=1)
    path = write_csv(tmp_path / "c.csv", data, ", ", head_lines="# exported\n\n# by hand\n", newline="\r\n")
    cfg = cfg_for(", ", comment_prefix="#")
    whole = list(iter_raw_chunks(cfg, [path], 1000))
    chunks = list(iter_raw_chunks(cfg, [path], rows))
    assert all(c.frame.height <= rows for c in chunks)
    assert pl.concat([c.frame for c in chunks]).equals(reference(data))
    for key in ("line_numbers", "positions"):
        assert np.array_equal(np.concatenate([getattr(c, key) for c in chunks]), getattr(whole[0], key))
    assert whole[0].positions.tolist() == list(range(60))
    assert whole[0].line_numbers[0] == 5                         # 3 comment/blank lines + the header


def test_header_and_column_names_and_gzip_agree(tmp_path: Path) -> None:
    rows = make_rows()
    with_header = write_csv(tmp_path / "h.csv", rows)
    without = write_csv(tmp_path / "n.csv", rows, header=False)
    gz = tmp_path / "h.csv.gz"
    gz.write_bytes(gzip.compress(with_header.read_bytes()))
    want = reference(rows)
    assert read(cfg_for(), [with_header]).equals(want)
    assert read(cfg_for(header=False), [without]).equals(want)
    assert read(cfg_for(), [gz]).equals(want)


def test_header_with_bom_and_quoted_names(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b'\xef\xbb\xbf"uid","age","city, town",note,status,clicked\nu1,5,X,n,Widowed,1\n')
    cfg = dataclasses.replace(cfg_for(), categorical=CategoricalConfig(columns=("city, town",)))
    frame = read(cfg, [path])
    assert frame["uid"].to_list() == ["u1"] and frame["city, town"].to_list() == ["X"]


def test_a_byte_order_mark_inside_the_file_is_text_for_any_chunk_rows(tmp_path: Path) -> None:
    """Only the file's first mark is no text: polars dropped one at the start of every chunk (a value's first
    character kept or lost with chunk_rows), and a second mark at the file's start went with the first."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff\ufeffa,b,y\nx,z,1\n\ufeffq,w,0\n".encode())
    cfg = DataConfig(format="csv", csv=CsvConfig(), labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("\ufeffa", "b")))
    for rows in (1, 1000):
        assert read(cfg, [path], rows)["\ufeffa"].to_list() == ["x", "\ufeffq"]


def test_missing_tokens_become_null(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("uid,age,city,note,status,clicked\nu1,?,?,NA,Widowed,1\nu2, ,,x,Widowed,0\n")
    frame = read(dataclasses.replace(cfg_for(), csv=CsvConfig(missing=("?", "NA"))), [path])
    assert frame["age"].to_list() == [None, None] and frame["city"].to_list() == [None, None]
    assert frame["note"].to_list() == [None, "x"]


def test_derived_label_sources_are_never_features(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", make_rows())
    cfg = dataclasses.replace(cfg_for(), derived_labels=(
        DerivedLabelConfig(name="married", column="status", pattern="^Married"),
        DerivedLabelConfig(column="city", positive=("Paris", "Köln"))),
        categorical=CategoricalConfig(pattern="."), numeric=NumericConfig(columns=("age",)))
    rc = resolve_inputs_columns(cfg, [path])
    assert rc.labels == ("clicked", "married", "city")             # raw labels, then derived, by name
    assert rc.categorical == ("note",)                              # uid (id), status, city are taken
    frame = read(cfg, [path], bad_rows="skip")                      # a missing city is a bad row
    assert frame["city"].to_list() == [float(r[2] in ("Paris", "Köln")) for r in make_rows()
                                       if r[2] not in ("?", "")]
    explicit = dataclasses.replace(cfg, categorical=CategoricalConfig(columns=("status",)))
    with pytest.raises(SchemaError, match="'status' is selected by both data.derived_labels and data.categorical"):
        resolve_inputs_columns(explicit, [path])


def test_field_count_error_names_file_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('uid,age,city,note,status,clicked\nu1,1,a,"x\ny",Widowed,0\nu2,2,b,c,Widowed\n')
    with pytest.raises(InputFormatError) as err:
        read(cfg_for(), [path])
    msg = str(err.value)
    assert f"{path}, line 4: 5 comma-separated fields, expected 6 (uid, age, city, note, ...)" in msg
    assert "--bad-rows skip" in msg


def test_wrong_separator_is_suggested(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "semi.csv", [["u1", "5", "a", "b", "Widowed", "1"]] * 3, ";", header=False)
    with pytest.raises(InputFormatError, match=r"(?s)line 1: 1 comma-separated.*separator=';'"):
        read(cfg_for(",", header=False), [path])


def test_value_errors_name_line_and_column(tmp_path: Path) -> None:
    head = "uid,age,city,note,status,clicked\n"
    cases = [("u1,abc,x,y,Widowed,1\n", r"(?s)line 3, column age: 'abc' is not a number.*data.csv.missing"),
             ("u1, 5 x,x,y,Widowed,1\n", r"(?s)line 3, column age: ' 5 x' is not a number.*separator ', '"),
             ("u1,5,x,y,Widowed,2\n", r"line 3, column clicked: label '2' is not 0 or 1"),
             ("u1,5,x,y,?,1\n", r"(?s)line 3, column status: the source of label 'married' is missing \('\?' is listed"
                                r".*fix: every row needs a label: fill in 'status', or pass --bad-rows skip"),
             ("u1,5,x,y,Widowed,\n", r"line 3, column clicked: the label is missing\n")]
    for i, (row, pattern) in enumerate(cases):
        path = tmp_path / f"v{i}.csv"
        path.write_text(head + "u0,1,a,b,Widowed,0\n" + row)
        with pytest.raises(InputFormatError, match=pattern):
            read(cfg_for(), [path])


def test_value_errors_say_what_the_value_looks_like(tmp_path: Path) -> None:
    """(a helper's CSV sweep) each of these got a fix that would hide the problem: list the value as missing or
    the column as categorical for a repeated header (two files joined with cat) or a number written 77,516 or
    77516,0; add ' no' to the label's values where the separator is ', '; check the separator for a line of
    spaces."""
    head = "uid,age,city,note,status,clicked\n"
    cases = [(head + "u1,5,x,y,Widowed,1\n", r"(?s)line 3, column age: 'age' is not a number.*repeats the header"),
             ('"u1","77,516",x,y,Widowed,1\n', r"(?s)'77,516' is not a number.*thousands separator or a decimal comma"),
             ("u1,5,x,y,Widowed,1\n   \n", r"(?s)line 4: the line holds only spaces or tabs.*remove the line")]
    for i, (rows, pattern) in enumerate(cases):
        path = tmp_path / f"v{i}.csv"
        path.write_text(head + "u0,1,a,b,Widowed,0\n" + rows)
        with pytest.raises(InputFormatError, match=pattern):
            read(cfg_for(), [path])
    # (a review) without numeric columns the label column meets the repeated header first
    with pytest.raises(InputFormatError, match=r"(?s)column clicked: label 'clicked' is not 0 or 1.*repeats the h"):
        read(dataclasses.replace(cfg_for(), numeric=NumericConfig(columns=())), [tmp_path / "v0.csv"])
    path = tmp_path / "spaced.csv"
    path.write_text("uid,age,city,note,status,clicked\nu0,1,a,b, yes,0\n")
    cfg = dataclasses.replace(cfg_for(), derived_labels=(
        DerivedLabelConfig(name="ok", column="status", positive=("yes",), negative=("no",)),))
    with pytest.raises(InputFormatError, match=r"(?s)' yes' is neither.*starts with a space: is the separator ', '"):
        read(cfg, [path])


def test_numbers_beyond_float32_are_missing_without_a_warning(tmp_path: Path) -> None:
    """(a helper's CSV sweep) 1e40 became missing, as documented, with numpy's overflow warning on stderr."""
    import warnings

    from ctrpipe.shard.transform import numeric32

    frame = pl.DataFrame({"a": [1e40, 2.0, None]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = numeric32(frame, ("a",))
    assert np.isnan(x[0, 0]) and x[1, 0] == 2.0 and np.isnan(x[2, 0])


def test_negative_values_catch_unknown_label_values(tmp_path: Path) -> None:
    path = tmp_path / "inc.csv"
    path.write_text("uid,age,city,note,status,clicked\nu0,1,a,b,yes,0\nu1,1,a,b,no,0\nu2,1,a,b,maybe,1\n")
    cfg = dataclasses.replace(cfg_for(), derived_labels=(
        DerivedLabelConfig(name="ok", column="status", positive=("yes",), negative=("no",)),))
    with pytest.raises(InputFormatError, match=r"line 4, column status: 'maybe' is neither a positive"):
        read(cfg, [path])
    frame = read(cfg, [path], bad_rows="skip")
    assert frame["ok"].to_list() == [1.0, 0.0]


def test_skip_counts_every_kind_of_bad_row_once(tmp_path: Path) -> None:
    path = tmp_path / "skip.csv"
    path.write_text("uid,age,city,note,status,clicked\n"
                    "u0,1,a,b,Widowed,0\n"
                    "u1,1,a,b\n"                               # line 3: field count
                    'u2,x,a,"b\nb",Widowed,0\n'                # line 4: not a number (spans 2 lines)
                    'u3,1,"a"b,b,Widowed,1\n'                 # line 6: text after a closing quote
                    "u4,1,a,b,?,1\n"                           # line 7: missing label source
                    "u5,2,a,b,Widowed,1\n")
    for rows in (1, 3, 1000):
        chunks = list(iter_raw_chunks(cfg_for(), [path], rows, bad_rows="skip"))
        bad = [b for c in chunks for b in c.bad_rows]
        assert sorted((b.line, b.reason) for b in bad) == [
            (3, "field count"), (4, "not a number"), (6, "unparsable"), (7, "bad label")]
        assert pl.concat([c.frame for c in chunks])["uid"].to_list() == ["u0", "u5"]
        assert np.concatenate([c.positions for c in chunks]).tolist() == [0, 5]
    with pytest.raises(InputFormatError, match=r"skip.csv, line 3: 4 comma-separated"):
        read(cfg_for(), [path])


def test_misplaced_quote_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "mq.csv"
    path.write_text('uid,age,city,note,status,clicked\nu0,1,a,b,Widowed,0\nu1,1,"a"b,b,Widowed,1\n'
                    'u2,1,a"b"c,b,Widowed,1\n')
    with pytest.raises(InputFormatError, match=r"(?s)mq.csv, line 3: cannot parse this row.*quote_char"):
        read(cfg_for(), [path])
    # as in polars, quotes inside an unquoted field are text (an even number of them: see csv_records)
    assert read(cfg_for(), [path], bad_rows="skip")["city"].to_list() == ["a", 'a"b"c']


def test_unclosed_quote_is_named(tmp_path: Path) -> None:
    path = tmp_path / "open.csv"
    path.write_text('uid,age,city,note,status,clicked\nu0,1,a,b,Widowed,0\nu1,1,"a,b,Widowed,1\nu2,1,a,b,W,0\n')
    with pytest.raises(InputFormatError, match=r"open.csv, line 3: .*runs over 2 lines.*unbalanced"):
        read(cfg_for(), [path])
    blob = tmp_path / "blob.csv"
    blob.write_text('uid,age\n1,"' + "x\n" * 3000)
    with pytest.raises(InputFormatError, match=r"blob.csv, line 2: a quoted field .* never closes"):
        list(RecordCutter(blob, CsvConfig(), 100, read_bytes=1024, max_record_bytes=4096))


def test_skip_mode_stray_quotes_lose_only_their_own_rows(tmp_path: Path) -> None:
    """With bad_rows=skip a stray quote costs its row, not every row up to the next quote or the file's end."""
    from ctrpipe.data.csv_reader import stray_quote_resync
    from ctrpipe.data.csv_records import count_records

    good = [f"u{i},1,a,b,Widowed,{i % 2}" for i in range(40)]
    lines = [*good[:5], 'u90,1,"a,b,Widowed,1', *good[5:20], 'u91,1,a,"b,Widowed,0', *good[20:35],
             'u92,1,"x', *good[35:]]             # the last stray quote is open at the end of the file
    path = tmp_path / "stray.csv"
    path.write_text("uid,age,city,note,status,clicked\n" + "\n".join(lines) + "\n")
    want = [f"u{i}" for i in range(40)]
    for rows in (1, 3, 7, 1000):
        chunks = list(iter_raw_chunks(cfg_for(), [path], rows, bad_rows="skip"))
        assert all(c.frame.height <= rows for c in chunks)
        assert pl.concat([c.frame for c in chunks])["uid"].to_list() == want
        assert sorted(b.line for c in chunks for b in c.bad_rows) == [7, 23, 39]
        assert np.concatenate([c.positions for c in chunks]).tolist() == \
            [i for i, ln in enumerate(lines) if '"' not in ln]
    resync = stray_quote_resync(cfg_for(), path, ("clicked", "status"))
    assert count_records(path, cfg_for().csv, resync_fields=resync) == len(lines)
    with pytest.raises(InputFormatError, match=r"stray.csv, line 7: .*unbalanced"):
        read(cfg_for(), [path])                               # error mode still stops at the first one


def test_skip_mode_keeps_a_bad_record_with_line_breaks_whole(tmp_path: Path) -> None:
    """A quoted field with a line break in a row with one field too many was cut at its first line as if
    its quote were stray, and its second line read as a row of its own: ('line"', 'w', 1), shifted garbage
    (a helper's fuzzing); it is one bad row now, and later rows keep their positions."""
    path = tmp_path / "ml.csv"
    path.write_text('a,b,y\nx,z,1\nq,"multi\nline",w,1\nr,s,0\n')
    cfg = DataConfig(format="csv", csv=CsvConfig(), labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("a", "b")))
    for rows in (1, 1000):
        chunks = list(iter_raw_chunks(cfg, [path], rows, bad_rows="skip"))
        assert pl.concat([c.frame for c in chunks]).select("a", "b").rows() == [("x", "z"), ("r", "s")]
        assert [(b.line, b.reason) for c in chunks for b in c.bad_rows] == [(3, "field count")]
        assert np.concatenate([c.positions for c in chunks]).tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(4))
def test_skip_mode_reads_any_quoting_alike_for_any_chunk_rows(tmp_path: Path, seed: int) -> None:
    """Rows, bad lines and positions of ill-quoted files (stray quotes, text after closing quotes, line
    breaks in quotes) do not depend on chunk_rows under bad_rows=skip."""
    fields = ['x', 'a"b', '"ab"c', '"ab"c"d"', '"a""b"', '""', '"p,q"r', '"x"y"z', 'q"', '"two\nl"x', '"', '""x',
              '"a"b,c"', '"m\nn"']
    rng = random.Random(seed)
    cfg = DataConfig(format="csv", csv=CsvConfig(missing=()), labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("a", "b", "c")))
    for k in range(40):
        lines = ["a,b,c,y"] + [",".join([rng.choice(fields) for _ in range(3)] + [str(rng.randint(0, 1))])
                               for _ in range(rng.randint(2, 24))]
        path = tmp_path / f"q{k}.csv"
        path.write_text("\n".join(lines) + "\n")
        got = []
        for rows in (1, 2, 1000):
            chunks = list(iter_raw_chunks(cfg, [path], rows, bad_rows="skip"))
            got.append(([r for c in chunks for r in c.frame.rows()], sorted(b.line for c in chunks for b in c.bad_rows),
                        [int(p) for c in chunks for p in c.positions]))
        assert got[0] == got[1] == got[2], lines


def test_a_quote_inside_an_unquoted_field_opens_nothing(tmp_path: Path) -> None:
    """5'11" in the same column on two rows: counted as toggles, the two quotes joined every row between them
    into one record with the header's field count, which no check could tell from a real one; as in RFC 4180 a
    quote opens a quoted field only at its start, so each such row stands alone and its quote is text (polars
    refused such rows before the cutter stood in for their quotes). Quoted fields around them keep their
    quoting."""
    good = [f'u{i},1,"a, b",b,Widowed,{i % 2}' for i in range(20)]
    lines = [*good[:5], "u90,1,5'11\",b,Widowed,1", *good[5:15], "u91,1,6'0\",b,Widowed,0",
             "u92,1,6'2\",b,Widowed,0", *good[15:]]
    path = tmp_path / "inch.csv"
    path.write_text("uid,age,city,note,status,clicked\n" + "\n".join(lines) + "\n")
    uids = [f"u{i}" for i in range(5)] + ["u90"] + [f"u{i}" for i in range(5, 15)] + ["u91", "u92"] + \
        [f"u{i}" for i in range(15, 20)]
    for rows in (1, 4, 1000):
        chunks = list(iter_raw_chunks(cfg_for(), [path], rows, bad_rows="skip"))
        frame = pl.concat([c.frame for c in chunks])
        assert frame["uid"].to_list() == uids and not any(c.bad_rows for c in chunks)
        assert set(frame["city"]) == {"a, b", "5'11\"", "6'0\"", "6'2\""}


FIELDS = [  # (as written, its value): unquoted fields with quotes that are text, and quoted fields
    ("x", "x"), ('a"b', 'a"b'), ("5'11\"", "5'11\""), ('x""y', 'x""y'), ('ab"', 'ab"'), ('q"r"s', 'q"r"s'),
    ('say ""hi""', 'say ""hi""'), ("", None), (' "sp"', ' "sp"'), ('"p,q"', "p,q"), ('"a""b"', 'a"b'),
    ('"two\nlines"', "two\nlines"), ('""', None), ('"x"', "x"), ('"""lead"', '"lead'), ('"tail"""', 'tail"'),
    ('"p||q"', "p||q"), ('"#not a comment"', "#not a comment"), ('"x\n# y"', "x\n# y"),
]


@pytest.mark.parametrize("sep", [",", "||"])
@pytest.mark.parametrize("seed", range(6))
def test_quotes_inside_unquoted_fields_read_as_text_for_any_chunk_rows(tmp_path: Path, sep: str, seed: int) -> None:
    """polars cut rows by counting every quote as a toggle, so quotes inside unquoted fields (text, as the
    cutter reads them) made it refuse a record alone and, among other records, join fields or rows: which
    one depended on the records parsed together, i.e. on chunk_rows, and some chunks came back with shifted
    fields and the right row count (a helper's fuzzing). Every value now reads as written, with comment lines
    (quotes in them are text too) and a multi-byte separator."""
    rng = random.Random(seed)
    rows = [[rng.choice(FIELDS) for _ in range(3)] for _ in range(rng.randint(5, 30))]
    lines = ["a" + sep + "b" + sep + "c" + sep + "y"]
    for i, r in enumerate(rows):
        if rng.random() < 0.2:
            lines.append(rng.choice(['# a "comment', '#""', "# plain"]))
        lines.append(sep.join([w for w, _ in r] + [str(i % 2)]))
    path = tmp_path / "q.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(format="csv", csv=CsvConfig(separator=sep, missing=(), comment_prefix="#"), labels=("y",),
                     numeric=NumericConfig(columns=()), categorical=CategoricalConfig(columns=("a", "b", "c")))
    want = [tuple(v for _, v in r) for r in rows]
    for rows_per_chunk in (1, 3, 1000):
        got = read(cfg, [path], rows_per_chunk)
        assert got.select("a", "b", "c").rows() == want
        assert got["y"].to_list() == [float(i % 2) for i in range(len(rows))]


def test_control_bytes_in_the_text_read_as_text_beside_text_quotes(tmp_path: Path) -> None:
    """The stand-in for quotes inside unquoted fields was 0x1e, refused when in the text, and only in chunks
    that held such a quote, so chunk_rows decided whether a file read (a review of the change); each chunk
    now takes a control byte it lacks."""
    rows = [("x", '5"\x1e'), ("\x1d\x1e", "y")] + [(f"u{i}", "w") for i in range(200)] + [("q", '6"x')]
    path = tmp_path / "q.csv"
    path.write_text("a,b,y\n" + "".join(f"{a},{b},1\n" for a, b in rows))
    cfg = DataConfig(format="csv", csv=CsvConfig(), labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("a", "b")))
    for chunk_rows in (1, 10, 1000):
        assert read(cfg, [path], chunk_rows).select("a", "b").rows() == rows


@pytest.mark.parametrize("text", [
    'h1,h2,h3\n1,He said ""hi"" twice,x\n2,y,z\n3,"q",r\n',       # a doubled quote in an unquoted field is text
    'h1,h2,h3\nx,"ab"c"d\ne",f\ng,h,i\n',                          # a quoted field reopened after its closer
    'h1,h2,h3\n"a",b,c\n1,5"",x\n4,"",y\n',
    'h1,h2,h3\n1,"a""b",c\n3,"x\ny",z\n',
])
def test_records_end_where_polars_rows_end(tmp_path: Path, text: str) -> None:
    """The cutter decides where each record ends before polars parses it: both must agree, or rows are joined
    (and lost under bad_rows=skip) or split."""
    import io

    path = tmp_path / "q.csv"
    path.write_text(text)
    cut = sum(len(r) for r in RecordCutter(path, CsvConfig(), 100))
    assert cut == pl.read_csv(io.StringIO(text)).height + 1                # + the header record


@pytest.mark.parametrize("text", [
    'h1,h2,h3\n1,"x\n#y",z\n2,a,b\n',                             # a quoted field holds a line starting with #
    'h1,h2,h3\n1,"x\n#y""q",z\n# it\'s "odd\n2,a,b\n',             # ... then a real comment with an odd quote
    'h1,h2,h3\n# "open\n1,"x\n#\n# "",y",z\n2,a,b\n#"\n3,c,d\n',
])
def test_a_line_starting_with_the_comment_prefix_inside_quotes_is_data(tmp_path: Path, text: str) -> None:
    """Quotes on every line starting with the prefix were taken for text, even on a line inside a quoted
    field: its closing quote was lost and the record ran on over the rows after it."""
    import io

    path = tmp_path / "q.csv"
    path.write_text(text)
    want = pl.read_csv(io.StringIO(text), comment_prefix="#")
    for rows in (1, 100):
        cut = sum(len(r) for r in RecordCutter(path, CsvConfig(comment_prefix="#"), rows))
        assert cut == want.height + 1                                   # + the header record


@pytest.mark.parametrize("seed", range(4))
def test_many_prefixed_lines_inside_quotes(tmp_path: Path, seed: int) -> None:
    """Lines starting with the prefix inside quoted fields, between real comments holding odd quotes: each
    such line cost one more pass over the block (2,000 records of them took 24 s); the passes now settle them
    together, and every record still ends where polars ends it."""
    import io

    rng = np.random.default_rng(seed)
    lines = ["h1,h2,h3"]
    for i in range(400):
        kind = int(rng.integers(4))
        if kind == 0:
            lines.append(f'{i},"a\n#q ""{i}"" x\n# "" more",z')
        elif kind == 1:
            lines.append(f'{i},"#\n#",y')
        elif kind == 2:
            lines.append(f'# comment {i} with an "odd quote')
        else:
            lines.append(f"{i},plain,w")
    text = "\n".join(lines) + "\n"
    path = tmp_path / "q.csv"
    path.write_text(text)
    want = pl.read_csv(io.StringIO(text), comment_prefix="#")
    for rows in (7, 1000):
        records = list(RecordCutter(path, CsvConfig(comment_prefix="#"), rows))
        assert sum(len(r) for r in records) == want.height + 1


def test_a_test_files_missing_label_fix_drops_the_labels_not_rows(tmp_path: Path) -> None:
    """A label missing in a test file (labels optional): skipping rows would leave them out of the
    submission; the fix is to drop the label column."""
    rows = make_rows(10)
    rows[3][5] = ""
    path = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(InputFormatError) as err:
        list(iter_raw_chunks(cfg_for(), [path], 1000, require_labels=False))
    assert "column clicked: the label is missing" in str(err.value)
    assert "drop the label columns" in str(err.value) and "--bad-rows" not in str(err.value)
    with pytest.raises(InputFormatError, match="--bad-rows skip"):
        read(cfg_for(), [path])


def test_unlabelled_test_files(tmp_path: Path) -> None:
    rows = make_rows(10)
    no_labels = [[r[0], r[1], r[2], r[3]] for r in rows]             # status and clicked absent
    path = tmp_path / "test.csv"
    path.write_text("uid,age,city,note\n" + "\n".join(",".join(
        '"' + v.replace('"', '""') + '"' if any(ch in v for ch in ',"\n') else v for v in r)
        for r in no_labels) + "\n")
    chunks = list(iter_raw_chunks(cfg_for(), [path], 1000, require_labels=False))
    assert not chunks[0].has_labels and chunks[0].frame.columns == ["uid", "age", "city", "note"]
    with pytest.raises(SchemaError, match="pass --test"):
        read(cfg_for(), [path])
    headerless = tmp_path / "test_nh.csv"
    headerless.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    names = dataclasses.replace(cfg_for(header=False))
    got = list(iter_raw_chunks(names, [headerless], 1000, require_labels=False))
    assert not got[0].has_labels and got[0].frame.equals(chunks[0].frame)
    with pytest.raises(InputFormatError, match="pass --test"):
        read(names, [headerless])


def test_unlabelled_headerless_file_keeps_a_label_source_that_is_also_a_column(tmp_path: Path) -> None:
    """Adult's layout: the label field (clicked, last) is cut from a test file, while status, the source of the
    derived label `married`, stays in it; the file reads unlabelled (as cfgs/adult.yaml with --test)."""
    rows = make_rows(12)
    path = write_csv(tmp_path / "test_nh.csv", [r[:5] for r in rows], header=False)
    chunks = list(iter_raw_chunks(cfg_for(header=False), [path], 5, require_labels=False))
    assert not any(c.has_labels for c in chunks)
    got = pl.concat([c.frame for c in chunks])
    assert got.columns == ["uid", "age", "city", "note"]
    assert got.equals(reference(rows).select(got.columns))
    with pytest.raises(InputFormatError, match="pass --test"):
        read(cfg_for(header=False), [path])


def test_missing_feature_column_names_the_closest(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", make_rows(3))
    cfg = dataclasses.replace(cfg_for(), numeric=NumericConfig(columns=("Age",)))
    with pytest.raises(SchemaError, match="did you mean 'age'"):
        resolve_inputs_columns(cfg, [path])


@pytest.mark.parametrize("override, message", [
    (["data.csv.header=false"], "column_names is empty"),
    (["data.csv.column_names=[a, b]"], "header is true"),
    (["data.csv.separator=''"], "data.csv.separator"),
    (["data.csv.quote_char=ab"], "data.csv.quote_char"),
    (["data.derived_labels=[{column: s}]"], "exactly one of 'positive'"),
    (["data.derived_labels=[{column: s, pattern: '(?=x)'}]"], "Rust regex"),
    (["data.format=parquet", "data.derived_labels=[{column: s, positive: [a]}]"], "needs data.format=csv"),
    (["data.derived_labels=[{name: y, column: s, positive: [a]}]", "data.labels=[y]"], "given twice"),
    # token columns: 1 bin leaves no id beside padding (garbage ids), a negative one overflowed the hashing
    (["data.multihot=[{column: tags, bins: 1}]"], "bad bins 1 for token column 'tags'"),
    (["data.sequence=[{column: seq, bins: -5}]"], "bad bins -5"),
    (["data.sequence=[{column: seq, separator: ''}]"], "empty separator for token column 'seq'"),
    # ids are int32: 3e9 bins stored negative ids (helper's shard sweep)
    (["data.hash_bins=3000000000"], "bad value 3000000000 for 'data.hash_bins'"),
    (["data.categorical.bins={c: 2147483648}"], "data.categorical.bins.c"),
    (["data.multihot=[{column: tags, bins: 2147483648}]"], "bad bins 2147483648"),
    # a multi-byte separator becomes one byte before comment lines are found: '||note' was no comment
    (["data.csv.separator='||'", "data.csv.comment_prefix='|'"], "comment_prefix '|' overlaps the separator"),
    (["data.csv.separator='||'", "data.csv.comment_prefix='#|'"], "comment_prefix '#|' overlaps"),
])
def test_config_errors(override: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.format=csv", *override], resolve_model=False)


@pytest.mark.parametrize("sep, prefix", [("|#", "#"), ("|", "|"), ("||", "#")])
def test_comment_prefixes_beside_their_separator(tmp_path: Path, sep: str, prefix: str) -> None:
    """A prefix that only ends the separator, or equals a one-byte one (never replaced), still marks comments."""
    path = tmp_path / "c.csv"
    path.write_text(sep.join("aby") + f"\n{prefix}note\n" + sep.join(["x", "z", "1"]) + f"\n{prefix}{sep}q\n")
    cfg = DataConfig(format="csv", csv=CsvConfig(separator=sep, comment_prefix=prefix), labels=("y",),
                     numeric=NumericConfig(columns=()), categorical=CategoricalConfig(columns=("a", "b")))
    assert read(cfg, [path]).select("a", "b").rows() == [("x", "z")]


def test_every_bad_weight_of_a_chunk_is_flagged_in_one_pass(tmp_path: Path) -> None:
    """Skipping bad weights re-read the whole column once per bad row (quadratic in them): all are now found in
    one pass, each flagged once (row 5's bad label first), and an error names the earliest with its token."""
    from ctrpipe.data.config import TokenColumnConfig

    lines = ["uid,clicked,tags_w"] + [f"u{i},{i % 2},a:1|b:{i}" for i in range(30)]
    for i, bad in ((2, "a:x"), (5, "a:1|:2"), (6, "b:inf"), (17, "c")):
        lines[i + 1] = f"u{i},{'7' if i == 5 else 0},{bad}"
    path = tmp_path / "w.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(format="csv", csv=CsvConfig(), labels=("clicked",), id_column="uid",
                     numeric=NumericConfig(columns=()), categorical=CategoricalConfig(columns=()),
                     multihot=(TokenColumnConfig(column="tags_w", separator="|", max_len=4, weighted=True),))
    with pytest.raises(InputFormatError) as err:
        read(cfg, [path], rows=7)
    assert f"{path}, line 4, column tags_w" in str(err.value) and "'a:x'" in str(err.value)
    for rows in (4, 1000):
        chunks = list(iter_raw_chunks(cfg, [path], rows, bad_rows="skip"))
        assert sorted((b.line, b.column) for c in chunks for b in c.bad_rows) == [
            (4, "tags_w"), (7, "clicked"), (8, "tags_w"), (19, "tags_w")]
        assert sum(c.frame.height for c in chunks) == 26


def _walk(at: np.ndarray, field_start: np.ndarray, bounds: np.ndarray, size: int, first: int) -> np.ndarray:
    """The reference: the quoted fields walked one quote at a time (what `_quoted_runs` does as arrays)."""
    n = len(at)
    keep = np.zeros(n, dtype=bool)
    keep[:first] = True
    i = first
    while i < n:
        o = next((j for j in range(i, n) if field_start[j]), n)
        if o >= n:
            break
        keep[o] = True
        k = o + 1
        while k < n:
            keep[k] = True
            j = int(np.searchsorted(bounds, at[k], side="right"))
            end = int(bounds[j]) if j < len(bounds) else size
            if k + 1 < n and at[k + 1] < end:
                keep[k + 1] = True
                k += 2
            else:
                break
        i = k + 1
    return keep


@pytest.mark.parametrize("seed", range(30))
def test_quoted_runs_equal_the_quote_by_quote_walk(seed: int) -> None:
    """One stray quote (5'11") sent a whole block through a Python walk over every quote after it (200k
    quoted rows: 0.76 s against 8.5 ms); the walk is whole-array now and must find the same quotes."""
    from ctrpipe.data.csv_records import _quoted_runs

    rng = np.random.default_rng(seed)
    arr = rng.choice(np.frombuffer(b'"",\nab', np.uint8), size=int(rng.integers(1, 400)))
    at = np.flatnonzero(arr == ord('"'))
    if not len(at):
        return
    before = arr[np.maximum(at - 1, 0)]
    field_start = (at == 0) | (before == ord(",")) | (before == 10)
    bounds = np.flatnonzero((arr == ord(",")) | (arr == 10))
    for first in {0, int(rng.integers(0, len(at))), len(at) - 1}:
        want = _walk(at, field_start, bounds, len(arr), first)
        assert np.array_equal(_quoted_runs(at, field_start, bounds, len(arr), first), want), (bytes(arr), first)


def test_headerless_layout_does_not_depend_on_the_chunk_size(tmp_path: Path) -> None:
    """A short first row of a headerless file decided its layout at chunk_rows=1 (a 'test file?' error, or
    unlabelled with the good rows dropped); the first records of the file vote, whatever the chunks."""
    path = tmp_path / "h.csv"
    path.write_bytes(b"x,z\nx,z,1\nq,w,0\n")
    cfg = DataConfig(format="csv", csv=CsvConfig(header=False, column_names=("a", "b", "y"), missing=("?",)),
                     labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("a", "b")))
    for rows in (1, 2, 1000):
        chunks = list(iter_raw_chunks(cfg, [path], rows, bad_rows="skip"))
        assert [r for c in chunks for r in c.frame["a"].to_list()] == ["x", "q"], rows
        assert [(b.line, b.reason) for c in chunks for b in c.bad_rows] == [(1, "field count")], rows


@pytest.mark.parametrize("seed", range(3))
def test_a_quoted_fields_crlf_is_kept_as_polars_keeps_it(tmp_path: Path, seed: int) -> None:
    """Every CRLF of a block became LF before the quotes were known, so a quoted field's CRLF lost its CR (its
    hash then differed from the same text read from Parquet); CRLF line ends and blank CRLF lines still read
    as before."""
    import io

    rng = random.Random(seed)
    vals = ["x", "a b", '"q,1"', '"multi\r\nline"', '"multi\nline2"', "", '"say ""hi"""', "7"]
    rows = ["a,b,y"] + [f"{rng.choice(vals)},{rng.choice(vals)},{rng.randint(0, 1)}" for _ in range(40)]
    text = "\r\n".join(rows) + "\r\n"
    want = pl.read_csv(io.BytesIO(text.encode()), infer_schema=False)
    path = tmp_path / "crlf.csv"
    path.write_bytes(text.replace("\r\n", "\r\n\r\n", 1).encode())             # and a blank line: not a row
    cfg = DataConfig(format="csv", csv=CsvConfig(missing=("?",)), labels=("y",), numeric=NumericConfig(columns=()),
                     categorical=CategoricalConfig(columns=("a", "b")))
    for rows_per_chunk in (1, 7, 1000):
        got = read(cfg, [path], rows_per_chunk)
        assert got["a"].to_list() == want["a"].to_list() and got["b"].to_list() == want["b"].to_list()
        assert got["y"].to_list() == want["y"].cast(pl.Float32).to_list()


def test_header_fixes_for_a_trained_run_name_no_config_change(tmp_path: Path) -> None:
    """predict and serving read with the run's config: a fix telling them to set data.csv.header=false named
    an option they do not have (diff review)."""
    from ctrpipe.data.chunks import Remedies
    from ctrpipe.data.csv_reader import read_header

    path = tmp_path / "dup.csv"
    path.write_text("a,a,y\n1,2,1\n")
    cfg = DataConfig(format="csv", csv=CsvConfig())
    with pytest.raises(SchemaError) as err:
        read_header(cfg, path, Remedies(skip_rows=False, run_format="csv"))
    assert "distinct name" in err.value.fix and "data.csv" not in err.value.fix
    with pytest.raises(SchemaError) as err:
        read_header(cfg, path)
    assert "data.csv.header=false" in err.value.fix


@pytest.mark.parametrize("uid", ["", "?", '""'])
def test_a_row_without_an_id_is_a_bad_row(tmp_path: Path, uid: str) -> None:
    """(helper's CSV sweep) An empty ID was read as "": infer wrote it into the submission, which blend then
    refused ("empty ID"), and two of them were reported as a duplicated ID. As in Parquet (a null ID), the row
    is bad: named with its line in error mode, skipped (and counted) with --bad-rows skip."""
    path = tmp_path / "p.csv"
    path.write_text(f"uid,age,city,note,status,clicked\na,1,x,n,Divorced,0\n{uid},2,y,n,Widowed,1\n"
                    "c,3,z,n,Widowed,0\n")
    with pytest.raises(InputFormatError, match="the ID is missing") as err:
        read(cfg_for(), [path])
    assert err.value.where == f"{path}, line 3, column uid", err.value.where
    chunks = list(iter_raw_chunks(cfg_for(), [path], 1000, bad_rows="skip"))
    assert chunks[0].frame["uid"].to_list() == ["a", "c"]
    assert [(b.line, b.column, b.reason) for b in chunks[0].bad_rows] == [(3, "uid", "missing ID")]


@pytest.mark.parametrize(("file_sep", "cfg_sep"), [(";", ","), (",", "\t"), ("\t", ",")])
def test_a_header_read_as_one_column_names_the_files_separator(tmp_path: Path, file_sep: str, cfg_sep: str) -> None:
    """(helper's CSV sweep) A ';'-separated file read with ',' was told its id column is missing and that the
    existing columns include ['uid;age;...']: the fix now names the separator the header holds."""
    path = write_csv(tmp_path / "p.csv", make_rows(5), sep=file_sep)
    with pytest.raises(SchemaError) as err:
        read(cfg_for(cfg_sep), [path])
    assert f"the file looks separated by {file_sep!r} (set data.csv.separator to {file_sep!r})" in err.value.fix


def test_a_header_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    """A Latin-1 header was told to check its quoting or set data.csv.header=false."""
    path = tmp_path / "latin.csv"
    path.write_bytes("uid,age,city,n\u00f6te,status,clicked\na,1,x,n,Divorced,0\n".encode("latin-1"))
    with pytest.raises(InputFormatError, match="cannot parse the header row") as err:
        read(cfg_for(), [path])
    assert "not UTF-8" in err.value.fix and "iconv" in err.value.fix, err.value.fix
    assert "-f latin1" in err.value.fix
    utf16 = tmp_path / "u16.csv"            # a helper's sweep: UTF-16 (Windows exports) was told latin1
    utf16.write_bytes("uid,age,city,note,status,clicked\na,1,x,n,Divorced,0\n".encode("utf-16"))
    with pytest.raises(InputFormatError, match="cannot parse the header row") as err:
        read(cfg_for(), [utf16])
    assert "-f utf-16 -t utf-8" in err.value.fix, err.value.fix


def test_a_header_in_a_file_read_without_one_is_named_a_header(tmp_path: Path) -> None:
    """A helper's sweep: a headed file read with data.csv.header=false (UCI Adult's config) said "'age' is not a
    number" at line 1, with a fix about data.csv.missing."""
    path = tmp_path / "h.csv"
    path.write_text("uid,age,city,note,status,clicked\nu0,1,a,b,Widowed,0\n")
    with pytest.raises(InputFormatError) as err:
        read(cfg_for(header=False), [path])
    assert "line 1, column age" in err.value.where and "the line is a header" in err.value.fix
    assert "data.csv.header=true" in err.value.fix
