"""`ctrpipe blend submissions`: ID alignment across shuffled files, streaming == in-memory, every refusal."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import get_args

import numpy as np
import polars as pl
import pytest
from cli_helpers import stop_right_after_renaming_onto
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.errors import ConfigError, SubmissionError
from ctrpipe.infer.blend import run_blend
from ctrpipe.infer.config import EnsembleMethod
from ctrpipe.infer.ensemble import combine
from ctrpipe.infer.predict import file_sha256
from ctrpipe.infer.submission import SubmissionWriter, iter_submission

N = 500


def _make(tmp: Path, k: int = 3, n: int = N, seed: int = 0) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """k files with the same string IDs in different orders; returns (paths, ids, preds (k, n))."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"id{v:06d}" for v in rng.choice(10**6, n, replace=False)])
    preds = rng.random((k, n))
    preds[:, :5] = 0.5                                    # some ties for rank_avg
    paths = []
    for j in range(k):
        perm = rng.permutation(n)
        path = tmp / f"sub{j}.csv"
        pl.DataFrame({"ID": ids[perm], "clicked": preds[j, perm]}).write_csv(path)
        paths.append(path)
    return paths, ids, preds


def _read(path: Path) -> pl.DataFrame:
    return pl.read_csv(path, schema={"ID": pl.String, "clicked": pl.Float64})


def _in_memory(paths: list[Path], method: str, weights: list[float] | None, trim_ratio: float = 0.1
               ) -> pl.DataFrame:
    """Reference: full polars join on ID, in the first file's order, then the same combine()."""
    frames = [_read(p).rename({"clicked": f"p{j}"}) for j, p in enumerate(paths)]
    joined = frames[0]
    for f in frames[1:]:
        joined = joined.join(f, on="ID", how="inner", maintain_order="left")
    mat = np.stack([joined[f"p{j}"].to_numpy() for j in range(len(paths))])
    return pl.DataFrame({"ID": joined["ID"], "clicked": combine(mat, method, weights=weights,
                                                                trim_ratio=trim_ratio)})


@pytest.mark.parametrize("method", get_args(EnsembleMethod))
@pytest.mark.parametrize("partitions", [1, 3])
def test_streaming_blend_equals_in_memory_join(tmp_path: Path, method: str, partitions: int) -> None:
    paths, _, _ = _make(tmp_path)
    weights = [0.5, 0.3, 0.2] if method == "weighted" else None
    out = tmp_path / "blend.csv"
    trim = 0.34                                                       # of 3 files: cuts one from each end
    report = run_blend(paths, method, "0.5,0.3,0.2" if weights else None, out, quiet=True,
                       partitions=partitions, chunk_bytes=2048, trim_ratio=trim)   # many chunks, several buckets
    got, want = _read(out), _in_memory(paths, method, weights, trim)
    assert report.rows == N
    assert got["ID"].to_list() == _read(paths[0])["ID"].to_list()    # first file's order
    np.testing.assert_allclose(got["clicked"].to_numpy(), want["clicked"].to_numpy(), rtol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend.csv", "blend.csv.json", "sub0.csv", "sub1.csv",
                                                           "sub2.csv"]


def test_a_blend_records_its_inputs_and_settings(tmp_path: Path) -> None:
    """A blend wrote no record of what it blended (every other output records its config and data): its
    record names each input by sha256, with the run of an input that has an infer record."""
    import hashlib
    import json

    paths, _, _ = _make(tmp_path)
    (tmp_path / "sub1.csv.json").write_text(json.dumps({"run": "/runs/dnn", "exp_name": "dnn",
                                                        "shards_fingerprint": "abc", "config": {}}))
    out = tmp_path / "b.csv"
    (tmp_path / "b.csv.json").write_text("{}")                       # an older blend's record: replaced
    run_blend(paths, "weighted", "0.5,0.3,0.2", out, quiet=True)
    doc = json.loads((tmp_path / "b.csv.json").read_text())
    assert doc["method"] == "weighted" and doc["weights"] == [0.5, 0.3, 0.2] and doc["rows"] == N
    assert [i["sha256"] for i in doc["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [i["from"] for i in doc["inputs"]] == [None, {"run": "/runs/dnn", "exp_name": "dnn",
                                                         "shards_fingerprint": "abc"}, None]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_as_the_blend_lands_still_writes_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           signum: int) -> None:
    """A stop between the blend's rename and its record (hashing the inputs took most of a second there) left a
    finished blend with no record, or beside none while the note said nothing partial was left."""
    paths, _, _ = _make(tmp_path, k=2)
    out = tmp_path / "blend.csv"
    run_blend(paths, "mean", None, out, quiet=True)
    (tmp_path / "sub0.csv").write_text((tmp_path / "sub0.csv").read_text().replace(",0.", ",0.0", 1))
    stop_right_after_renaming_onto(monkeypatch, out, signum)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)        # as in a terminal
    try:
        res = CliRunner().invoke(app, ["blend", "submissions", *map(str, paths), "--out", str(out), "-q"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert res.exit_code == 128 + signum, res.output
    record = json.loads((tmp_path / "blend.csv.json").read_text())
    assert record["inputs"][0]["sha256"] == file_sha256(paths[0])             # this blend's record, not the last
    assert _read(out).height == N


def test_blend_of_a_file_with_its_shuffled_copy_is_identity(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=1)
    df = _read(paths[0]).sample(fraction=1.0, shuffle=True, seed=3)
    df.write_csv(tmp_path / "copy.csv")
    run_blend([paths[0], tmp_path / "copy.csv"], "logit_mean", None, tmp_path / "o.csv", quiet=True,
              partitions=2)
    np.testing.assert_allclose(_read(tmp_path / "o.csv")["clicked"], _read(paths[0])["clicked"], rtol=1e-9)


def test_a_blend_removes_the_scratch_folders_of_killed_blends(tmp_path: Path) -> None:
    """A blend killed (SIGKILL) left its scratch records (about the inputs' size) beside --out, and no later
    blend removed them. A live blend's folder (its process still runs) is left alone."""
    import os
    import subprocess
    import sys

    paths, _, _ = _make(tmp_path, k=2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".o.csv.blend-{dead.pid}-x1y2"
    running = tmp_path / f".o.csv.blend-{os.getpid()}-z3w4"
    for folder in (killed, running):
        folder.mkdir()
        (folder / "part_0.bin").write_bytes(b"records")
    run_blend(paths, "mean", None, tmp_path / "o.csv", quiet=True)
    assert not killed.exists() and running.is_dir()
    assert not [p for p in tmp_path.glob(".o.csv.blend-*") if p != running]       # its own folder is gone too


def test_weights_change_the_blend(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=2)
    run_blend(paths, "mean", "1,0", tmp_path / "o.csv", quiet=True)
    np.testing.assert_allclose(_read(tmp_path / "o.csv")["clicked"], _read(paths[0])["clicked"], rtol=1e-12)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _two(tmp: Path, b_text: str) -> list[Path]:
    a = _write(tmp / "a.csv", "ID,clicked\n1,0.1\n2,0.2\n3,0.3\n")
    return [a, _write(tmp / "b.csv", b_text)]


def _refuse(tmp: Path, files: list[Path], exc_type: type[Exception], *needles: str, method: str = "mean",
            weights: str | None = None) -> str:
    out = tmp / "out.csv"
    with pytest.raises(exc_type) as exc:
        run_blend(files, method, weights, out, quiet=True, partitions=2)
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "fix:" in msg
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith((".out", "out.csv."))], "temp files left"
    return msg


def test_refuses_id_missing_from_other_file(tmp_path: Path) -> None:
    files = _two(tmp_path, "ID,clicked\n3,0.3\n1,0.1\n4,0.2\n")
    msg = _refuse(tmp_path, files, SubmissionError, "missing from")
    in_a = "'2'" in msg and "line 3 of" in msg and str(files[0]) in msg
    assert in_a or ("'4'" in msg and "line 4" in msg)


def test_a_refused_blend_keeps_the_earlier_blends_record(tmp_path: Path) -> None:
    """The record of an earlier blend to the same --out was deleted before the inputs were checked, so a
    refused blend left that blend's file without its record (helper's serving sweep)."""
    out = tmp_path / "out.csv"
    run_blend(_two(tmp_path, "ID,clicked\n3,0.3\n1,0.1\n2,0.2\n"), "mean", None, out, quiet=True)
    record = out.with_name("out.csv.json").read_bytes()
    with pytest.raises(SubmissionError):
        run_blend(_two(tmp_path, "ID,clicked\n3,0.3\n1,0.1\n4,0.2\n"), "mean", None, out, quiet=True)
    assert out.with_name("out.csv.json").read_bytes() == record and out.is_file()


def test_refuses_extra_row_in_second_file(tmp_path: Path) -> None:
    files = _two(tmp_path, "ID,clicked\n3,0.3\n1,0.1\n2,0.2\n9,0.5\n")
    _refuse(tmp_path, files, SubmissionError, "'9'", "line 5", "missing from", str(files[0]))


def test_refuses_duplicate_ids(tmp_path: Path) -> None:
    files = _two(tmp_path, "ID,clicked\n3,0.3\n1,0.1\n3,0.2\n")
    _refuse(tmp_path, files, SubmissionError, "duplicate ID '3'", "lines 2 and 4", str(files[1]))


@pytest.mark.parametrize("row, needle", [
    ("2,abc", "non-numeric prediction 'abc'"),
    ("2,", "missing prediction"),
    ("2,1.2", "outside [0, 1]"),
    ("2,-0.1", "outside [0, 1]"),
    ("2,nan", "non-numeric prediction 'nan'"),
    ("2", "1 fields"),
    ("2,0.1,7", "3 fields"),
])
def test_refuses_bad_rows_naming_the_line(tmp_path: Path, row: str, needle: str) -> None:
    files = _two(tmp_path, f"ID,clicked\n3,0.3\n1,0.1\n{row}\n")
    _refuse(tmp_path, files, SubmissionError, needle, f"{files[1]}, line 4")


def test_refuses_missing_empty_and_headerless_files(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.csv", "ID,clicked\n1,0.1\n")
    _refuse(tmp_path, [a, tmp_path / "nope.csv"], SubmissionError, "does not exist", "nope.csv")
    _refuse(tmp_path, [a, _write(tmp_path / "e.csv", "")], SubmissionError, "file is empty", "e.csv")
    _refuse(tmp_path, [a, _write(tmp_path / "h.csv", "ID,clicked\n")], SubmissionError, "no rows")
    _refuse(tmp_path, [a, _write(tmp_path / "d.csv", "1,0.1\n")], SubmissionError, "looks like data",
            "d.csv, line 1")
    _refuse(tmp_path, [a, _write(tmp_path / "w.csv", "ID,clicked,x\n1,0.1,2\n")], SubmissionError,
            "3 columns", "w.csv, line 1")
    _refuse(tmp_path, [a, _write(tmp_path / "o.csv", "Id,Predicted\n1,0.1\n")], SubmissionError,
            "differs from 'ID,clicked'", "o.csv, line 1")


def test_refuses_bad_options(tmp_path: Path) -> None:
    files = _two(tmp_path, "ID,clicked\n1,0.1\n2,0.2\n3,0.3\n")
    _refuse(tmp_path, files, ConfigError, "3 weights for 2 files", "--weights", weights="1,2,3")
    _refuse(tmp_path, files, ConfigError, "not a comma-separated list", weights="1,x")
    _refuse(tmp_path, files, ConfigError, "needs one weight", method="weighted")
    _refuse(tmp_path, files, ConfigError, "does not take weights", method="median", weights="1,1")
    _refuse(tmp_path, files, ConfigError, "unknown ensembling method 'avg'", "logit_mean", method="avg")
    _refuse(tmp_path, files[:1], ConfigError, "at least two files")
    _refuse(tmp_path, [files[0], files[0]], ConfigError, "listed twice")
    with pytest.raises(ConfigError, match="is one of the input files"):
        run_blend(files, "mean", None, files[1], quiet=True)


def test_cli_blend_end_to_end(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=2, n=50)
    out = tmp_path / "cli.csv"
    res = CliRunner().invoke(app, ["blend", "submissions", *map(str, paths), "--method", "mean",
                                   "--weights", "1,3", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    want = _in_memory(paths, "mean", [1, 3])
    np.testing.assert_allclose(_read(out)["clicked"], want["clicked"], rtol=1e-12)
    bad = _write(tmp_path / "bad.csv", "ID,clicked\n1,x\n")
    res = CliRunner().invoke(app, ["blend", "submissions", str(paths[0]), str(bad), "--out", str(out)])
    assert res.exit_code == 1
    assert "bad.csv, line 2" in res.output and "Traceback" not in res.output


def test_writer_is_atomic_and_reader_streams_chunks(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    with pytest.raises(RuntimeError):
        with SubmissionWriter(path) as w:
            w.write(np.array([1, 2]), np.array([0.1, 0.2], dtype=np.float32))
            raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())
    with SubmissionWriter(path) as w:
        for start in range(0, 1000, 100):
            w.write(np.arange(start, start + 100), np.full(100, 0.25, dtype=np.float32))
    assert path.read_text().startswith("ID,clicked\n0,0.25\n1,0.25\n")
    chunks = list(iter_submission(path, chunk_bytes=1024))
    assert len(chunks) > 3
    assert [c.first_row for c in chunks] == list(np.cumsum([0] + [len(c.ids) for c in chunks[:-1]]))
    assert sum(len(c.ids) for c in chunks) == 1000


def test_buckets_stay_within_the_open_file_limit(tmp_path: Path) -> None:
    """Each pass holds one file per bucket open: more buckets than RLIMIT_NOFILE allows failed with EMFILE."""
    import resource

    paths, _, _ = _make(tmp_path, k=2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
    try:
        report = run_blend(paths, "mean", None, tmp_path / "o.csv", quiet=True, partitions=1024)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert report.partitions == 200 - 64 and report.rows == N
    np.testing.assert_allclose(_read(tmp_path / "o.csv")["clicked"], _in_memory(paths, "mean", None)["clicked"],
                               rtol=1e-12)


def test_gz_names_are_written_as_gzip_and_read_back(tmp_path: Path) -> None:
    """A .gz --out gets gzip data (it was plain text, which the reader then refused with a traceback), and a
    .gz name holding plain text is a clear SubmissionError."""
    import gzip

    paths, _, _ = _make(tmp_path, k=2)
    out = tmp_path / "blend.csv.gz"
    run_blend(paths, "mean", None, out, quiet=True)
    assert gzip.open(out).readline() == b"ID,clicked\n"
    again = tmp_path / "again.csv"
    run_blend([out, paths[0]], "mean", "1,0", again, quiet=True)
    np.testing.assert_allclose(_read(again)["clicked"], _read(out)["clicked"], rtol=1e-12)
    fake = tmp_path / "plain.csv.gz"
    fake.write_bytes(paths[0].read_bytes())
    with pytest.raises(SubmissionError, match="gzip") as e:
        run_blend([fake, paths[1]], "mean", None, tmp_path / "x.csv", quiet=True)
    assert str(fake) in str(e.value)


def test_trim_ratio_reaches_the_blend(tmp_path: Path) -> None:
    """--trim-ratio was fixed at 0.1, which trims nothing below 10 files."""
    paths, _, _ = _make(tmp_path, k=4)
    run_blend(paths, "trim_mean", None, tmp_path / "o.csv", quiet=True, trim_ratio=0.25)
    frames = [_read(p).rename({"clicked": f"p{j}"}) for j, p in enumerate(paths)]
    joined = frames[0]
    for f in frames[1:]:
        joined = joined.join(f, on="ID", how="inner", maintain_order="left")
    mat = np.stack([joined[f"p{j}"].to_numpy() for j in range(4)])
    want = np.sort(mat, axis=0)[1:3].mean(axis=0)                 # 1 of 4 cut from each end
    np.testing.assert_allclose(_read(tmp_path / "o.csv")["clicked"].to_numpy(), want, rtol=1e-12)
    with pytest.raises(ConfigError, match="--trim-ratio"):
        run_blend(paths, "trim_mean", None, tmp_path / "x.csv", quiet=True, trim_ratio=0.5)


def test_out_naming_a_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=2)
    (tmp_path / "outdir").mkdir()
    with pytest.raises(SubmissionError, match="names a folder") as e:
        run_blend(paths, "mean", None, tmp_path / "outdir", quiet=True)
    assert "outdir/submission.csv" in e.value.fix


def test_a_trim_that_cuts_nothing_is_refused_before_reading(tmp_path: Path) -> None:
    """trim_mean of 3 files with --trim-ratio 0.1 cuts floor(0.3) = 0 files: a plain mean under another name."""
    paths, _, _ = _make(tmp_path)
    with pytest.raises(ConfigError, match=r"trims nothing from 3 models(?s:.*)--trim-ratio 0.334 or more"):
        run_blend(paths, "trim_mean", None, tmp_path / "o.csv", quiet=True, trim_ratio=0.1)
    assert not (tmp_path / "o.csv").exists()


def test_a_submissions_old_record_goes_only_when_the_new_file_replaces_it(tmp_path: Path) -> None:
    """Blend and infer removed the older output's record before writing: a write that then failed (e.g. a
    full disk) left the old file without it (diff review)."""
    out = tmp_path / "sub.csv"
    out.write_text("ID,clicked\n1,0.5\n")
    record = out.with_name("sub.csv.json")
    record.write_text("{}")
    with pytest.raises(RuntimeError), SubmissionWriter(out, stale=(record,)) as w:
        w.write(np.array([1]), np.array([0.25], dtype=np.float32))
        raise RuntimeError("the disk filled")
    assert record.is_file() and out.read_text() == "ID,clicked\n1,0.5\n"
    with SubmissionWriter(out, stale=(record,)) as w:
        w.write(np.array([1]), np.array([0.25], dtype=np.float32))
    assert not record.exists() and out.read_text() == "ID,clicked\n1,0.25\n"


def test_rank_scores_blended_with_probabilities_are_warned_about(tmp_path: Path) -> None:
    """(helper's blend sweep) A rank_avg submission (rank scores in [0, 1]) blended by logit_mean with a
    probability submission gave neither, without a word; the inputs' records say which method wrote them."""
    import json

    paths, _, _ = _make(tmp_path, k=2)

    def blend(method: str) -> str:
        res = CliRunner().invoke(app, ["blend", "submissions", *map(str, paths), "--method", method, "--out",
                                       str(tmp_path / f"{method}.csv"), "-q"])
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    assert "warning" not in blend("logit_mean")                       # no records: nothing is known
    paths[0].with_name(paths[0].name + ".json").write_text(json.dumps({"method": "rank_avg"}))
    paths[1].with_name(paths[1].name + ".json").write_text(json.dumps({"method": "logit_mean"}))
    out = blend("logit_mean")
    assert f"warning: {paths[0]} holds rank scores" in out and "blend with --method rank_avg" in out, out
    assert "warning" not in blend("rank_avg")
    paths[1].with_name(paths[1].name + ".json").write_text(json.dumps({"method": "rank_avg"}))
    assert "warning" not in blend("mean")                             # all ranks: one kind of score


def test_a_damaged_gzip_input_is_one_error_naming_it(tmp_path: Path) -> None:
    """A cut or corrupted .gz passed the header check (its first line reads) and then crashed in pyarrow
    with a traceback naming no file (helper's infer sweep)."""
    import gzip

    paths, _, _ = _make(tmp_path, k=2, n=3000)
    data = gzip.compress(paths[1].read_bytes())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(data[: len(data) // 2])
    crc = tmp_path / "crc.csv.gz"
    crc.write_bytes(data[:-8] + b"\0" * 8)
    for bad in (cut, crc):
        msg = _refuse(tmp_path, [paths[0], bad], SubmissionError, str(bad), "damaged")
        assert "Traceback" not in msg


def test_an_upper_case_gz_name_is_read_as_gzip(tmp_path: Path) -> None:
    import gzip

    paths, _, _ = _make(tmp_path, k=2)
    up = tmp_path / "b.csv.GZ"
    up.write_bytes(gzip.compress(paths[1].read_bytes()))
    run_blend([paths[0], up], "mean", None, tmp_path / "o.csv", quiet=True)
    run_blend(paths, "mean", None, tmp_path / "want.csv", quiet=True)
    assert (tmp_path / "o.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()


def test_blank_lines_around_the_header_are_named_as_such(tmp_path: Path) -> None:
    """A blank line 2 read as "a header and no rows", a blank line 1 as "file is empty", for files of rows."""
    _refuse(tmp_path, _two(tmp_path, "ID,clicked\n\n3,0.3\n1,0.1\n2,0.2\n"), SubmissionError, "line 2",
            "empty ID")
    _refuse(tmp_path, _two(tmp_path, "\nID,clicked\n3,0.3\n1,0.1\n2,0.2\n"), SubmissionError, "line 1",
            "blank")
    _refuse(tmp_path, _two(tmp_path, "ID,clicked\n\n"), SubmissionError, "a header and no rows")


def test_weight_errors_name_the_option(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=2)
    _refuse(tmp_path, paths, ConfigError, "--weights", weights="1,-1")
    _refuse(tmp_path, paths, ConfigError, "--weights", method="median", weights="1,2")


def test_an_out_folder_without_room_for_scratch_names_out(tmp_path: Path) -> None:
    paths, _, _ = _make(tmp_path, k=2)
    with pytest.raises(SubmissionError) as exc:
        run_blend(paths, "mean", None, Path("/proc/o.csv"), quiet=True)
    msg = str(exc.value)
    assert "--out /proc/o.csv" in msg and "scratch folder" in msg and "report it as a bug" not in msg


def test_the_writer_refuses_non_finite_predictions(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    out.write_text("ID,clicked\n1,0.5\n")
    with pytest.raises(SubmissionError, match="not finite"):
        with SubmissionWriter(out) as w:
            w.write(np.array([1, 2]), np.array([0.5, np.nan]))
    assert out.read_text() == "ID,clicked\n1,0.5\n"


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="FIFOs (POSIX)")
def test_an_output_that_is_no_regular_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A helper's sweep: infer, predict and blend wrote beside --out and renamed onto it, which replaced a FIFO,
    a symbolic link (not its target) and, as root, /dev/full itself with a regular file. They are refused before
    any work, naming what the path is."""
    import os
    import stat

    paths, _, _ = _make(tmp_path, k=2)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.csv"
    target.write_text("kept\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    for out, what in ((fifo, "names a FIFO"), (link, "names a symbolic link")):   # not /dev/null: a regression
        # would replace it on the machine running the tests
        res = CliRunner().invoke(app, ["blend", "submissions", *map(str, paths), "--out", str(out), "-q"])
        assert res.exit_code == 1 and what in res.output, res.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink() and target.read_text() == "kept\n"
    assert not list(tmp_path.glob("*.json"))


def test_submissions_of_different_heads_are_warned_about_and_a_blend_records_its_head(tmp_path: Path) -> None:
    """(helper's infer sweep) a multi-task run's clicked and converted submissions (both headed `clicked` by
    default) blended without a word; their records name the head. A blend of one head records it, so a blend
    of blends is checked too."""
    import json

    paths, _, _ = _make(tmp_path, k=3)

    def blend(files: list[Path], name: str) -> str:
        res = CliRunner().invoke(app, ["blend", "submissions", *map(str, files), "--out", str(tmp_path / name),
                                       "-q"])
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split())

    for p, task in zip(paths, ("clicked", "clicked", "converted"), strict=True):
        p.with_name(p.name + ".json").write_text(json.dumps({"method": "logit_mean", "task": task}))
    assert "warning" not in blend(paths[:2], "same.csv")
    assert json.loads((tmp_path / "same.csv.json").read_text())["task"] == "clicked"
    out = blend(paths, "mixed.csv")
    assert f"warning: {paths[0]} predicts head 'clicked' (its record), {paths[2]} head 'converted'" in out, out
    assert json.loads((tmp_path / "mixed.csv.json").read_text())["task"] is None
    out = blend([tmp_path / "same.csv", paths[2]], "of_blends.csv")
    assert "predicts head 'clicked' (its record)" in out and "head 'converted'" in out, out
