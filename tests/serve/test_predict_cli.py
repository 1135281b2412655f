"""`ctrpipe predict --run --input --out`: a raw Criteo text file -> a CSV equal to `Predictor.predict` on the
same lines (over several chunks), written atomically: a bad line fails naming the file and line, and leaves
no output behind."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from cli_helpers import sets as _sets
from cli_helpers import stop_right_after_renaming_onto
from typer.testing import CliRunner

from ctrpipe.cli import app

REPO = Path(__file__).resolve().parents[2]
FAST = ["loader.batch_size=64", "loader.eval_batch_size=128", "model.hidden_units=[16]", "model.embedding_dim=4",
        "train.min_steps=0", "train.evals_per_epoch=1", "train.early_stopping.patience=0", "train.epochs=1",
        "train.max_steps=4", "train.device=cpu", "data.hash_bins=200", "data.shard_rows=500",
        "data.split.val_ratio=0.2", "data.folds.n_splits=0"]


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output + (repr(res.exception) if res.exception else "")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve_predict")
    for args in (("synth", "--format", "criteo", "--rows", "800", "--test-rows", "300", "--out", str(root / "d"),
                  "-q"),
                 ("shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input", str(root / "d" / "train.tsv"),
                  "--out", str(root / "tr"), "-q", *_sets(FAST[-4:])),
                 ("train", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(root / "tr"),
                  "--runs", str(root / "runs"), "-q", *_sets(FAST + ["exp_name=dnn"]))):
        code, out = _invoke(*args)
        assert code == 0, out
    return root


def test_predict_file_equals_predictor(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctrpipe.serve.predict_file as pf
    from ctrpipe.serve.predictor import Predictor

    real = pf.predict_file
    monkeypatch.setattr(pf, "predict_file", lambda *a, **k: real(*a, **k, chunk_rows=128))   # 3 chunks
    out = tmp_path / "preds.csv"
    code, msg = _invoke("predict", "--run", str(world / "runs" / "dnn"), "--input",
                        str(world / "d" / "test.tsv"), "--out", str(out), "-q")
    assert code == 0, msg
    assert " ".join(msg.split()).startswith("wrote ") and "rows to" in msg      # -q: one line, not none
    got = pl.read_csv(out)
    lines = (world / "d" / "test.tsv").read_text().splitlines()
    p = Predictor.load(world / "runs" / "dnn")
    want = p.predict(lines)
    assert got.columns == ["row", *p.heads]
    assert got["row"].to_list() == list(range(len(lines)))
    for head in p.heads:
        np.testing.assert_allclose(got[head].to_numpy(), want[head], rtol=0, atol=1e-12)
    assert not out.with_name(out.name + ".incomplete").exists()


def test_predict_bad_line_names_it_and_writes_nothing(world: Path, tmp_path: Path) -> None:
    lines = (world / "d" / "test.tsv").read_text().splitlines()
    lines[5] = lines[5] + "\textra"
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.csv"
    code, msg = _invoke("predict", "--run", str(world / "runs" / "dnn"), "--input", str(bad), "--out", str(out))
    assert code == 1, msg
    assert "line 6" in msg and "bad.tsv" in msg
    assert not out.exists() and not out.with_name(out.name + ".incomplete").exists()


def test_predict_makes_the_out_folder(world: Path, tmp_path: Path) -> None:
    """--out in a folder that did not exist failed with a FileNotFoundError traceback after the model loaded."""
    out = tmp_path / "new" / "deeper" / "preds.csv"
    code, msg = _invoke("predict", "--run", str(world / "runs" / "dnn"), "--input", str(world / "d" / "test.tsv"),
                        "--out", str(out), "-q")
    assert code == 0, msg
    assert pl.read_csv(out).height == 300
    # its record, as infer writes one: the input by sha256, the run, the training cache, the config
    import hashlib
    import json

    doc = json.loads(out.with_name("preds.csv.json").read_text())
    assert doc["rows"] == 300 and doc["input"]["sha256"] == hashlib.sha256((world / "d" / "test.tsv").read_bytes()
                                                                            ).hexdigest()
    assert doc["run"] == str((world / "runs" / "dnn").resolve()) and doc["shards_fingerprint"]
    assert doc["config"]["exp_name"] == "dnn" and doc["checkpoints"] and list(doc["calibration"]) == ["label"]


def test_export_takes_the_cache_and_inference_settings(world: Path, tmp_path: Path) -> None:
    """export had neither --cache (a moved training cache's fix named a Python call) nor --set (a run whose
    infer.method cannot be exported could not be exported at all), and said nothing of a run predicting in bf16."""
    import json
    import shutil

    moved = tmp_path / "moved_cache"
    shutil.copytree(world / "tr", moved)
    out = tmp_path / "export"
    code, msg = _invoke("export", "--run", str(world / "runs" / "dnn"), "--out", str(out), "--cache", str(moved),
                        "--set", "infer.method=mean", "--set", "train.amp=bf16")
    assert code == 0, msg
    doc = json.loads((out / "model.json").read_text())
    assert doc["preprocessing"]["training_cache"] == str(moved.resolve()) and doc["ensemble"]["method"] == "mean"
    assert doc["precision"]["run_predicts_in"] == "bf16" and doc["precision"]["computes_in"] == "fp32"
    assert "differ from `ctrpipe infer`" in " ".join(msg.split()) and "train.amp=off" in msg
    code, msg = _invoke("export", "--run", str(world / "runs" / "dnn"), "--out", str(out),
                        "--set", "infer.method=rank_avg")
    assert code == 1 and "--set infer.method=logit_mean" in msg
    # median is per row (predict serves it): the refusal said it "needs more than one row"
    code, msg = _invoke("export", "--run", str(world / "runs" / "dnn"), "--out", str(out),
                        "--set", "infer.method=median")
    msg = " ".join(msg.split())
    assert code == 1 and "combines its folds with logit_mean" in msg and "more than one row" not in msg
    assert "--set infer.method" in msg and "the run's config" not in msg
    # trim_mean on 2 folds: the trim check's fix named median, which export refuses too
    code, msg = _invoke("export", "--run", str(world / "runs" / "dnn"), "--out", str(out),
                        "--set", "infer.method=trim_mean")
    msg = " ".join(msg.split())
    assert code == 1 and "infer.method=trim_mean cannot be exported" in msg and "median" not in msg
    code, msg = _invoke("export", "--run", str(world / "runs" / "dnn"), "--out", str(out),
                        "--cache", str(tmp_path / "absent"))
    assert code == 1 and "--cache DIR" in msg


def test_a_file_in_another_format_gets_the_runs_format_as_fix(world: Path, tmp_path: Path) -> None:
    """A Criteo run given Parquet said the first line looked like a header; the shard readers' fix for another
    format (--set data.format=...) is one predict refuses."""
    other = tmp_path / "rows.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(other)
    code, msg = _invoke("predict", "--run", str(world / "runs" / "dnn"), "--input", str(other),
                        "--out", str(tmp_path / "p.csv"))
    assert code == 1 and "this is a Parquet file, not Criteo text" in msg, msg
    assert "data.format=criteo" in msg and "--set" not in msg


def _csv_run(tmp_path: Path, column: str = "c", values: list[str] | None = None,
             features: str = "categorical: {columns: [c], pattern: ''}\n  multihot: []") -> list[str]:
    """A DNN run (tmp_path/runs/csvrun) on a small CSV of columns uid, clicked, a and `column` (300 `values`,
    by default 7 categories), read as `features` says; returns the file's lines."""
    rng = np.random.default_rng(0)
    values = values or [f"k{i % 7}" for i in range(300)]
    rows = [f"uid,clicked,a,{column}"] + [f"u{i},{int(rng.random() < 0.3)},{rng.random():.3f},{v}"
                                          for i, v in enumerate(values)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "csv.yaml"
    cfg.write_text("exp_name: csvrun\ndata:\n  format: csv\n  labels: [clicked]\n  id_column: uid\n"
                   f"  numeric: {{columns: [a], pattern: ''}}\n  {features}\n"
                   "  sequence: []\n  covisit: []\n  folds: {n_splits: 0}\n"
                   "model: {name: dnn, hidden_units: [8], embedding_dim: 4}\n")
    for args in (("shard", "--cfg", str(cfg), "--input", str(tmp_path / "train.csv"), "--out", str(tmp_path / "c"),
                  "-q"),
                 ("train", "--cfg", str(cfg), "--shards", str(tmp_path / "c"), "--runs", str(tmp_path / "runs"),
                  "-q", *_sets(["train.max_steps=3", "train.device=cpu", "loader.batch_size=64",
                                "train.min_steps=0"]))):
        code, out = _invoke(*args)
        assert code == 0, out
    return rows


def test_a_csv_files_ids_are_kept_after_a_bom_or_blank_lines(tmp_path: Path) -> None:
    """predict looked for the ID column in the file's first raw line: behind a byte-order mark or a blank line
    it found none and wrote row numbers instead of the IDs, exit 0. The header is read as `shard` reads it."""
    rows = _csv_run(tmp_path)
    body = "".join(",".join(f for j, f in enumerate(r.split(",")) if j != 1) + "\n" for r in rows[:21])
    for name, text in (("bom.csv", "\ufeff" + body), ("blank.csv", "\n\n" + body)):
        (tmp_path / name).write_text(text)
        code, out = _invoke("predict", "--run", str(tmp_path / "runs" / "csvrun"), "--input", str(tmp_path / name),
                            "--out", str(tmp_path / f"p_{name}"), "-q")
        assert code == 0, out
        got = pl.read_csv(tmp_path / f"p_{name}")
        assert got.columns[0] == "uid" and got["uid"].to_list() == [f"u{i}" for i in range(20)], name


def test_a_csv_with_another_separator_is_told_to_change_the_file(tmp_path: Path) -> None:
    """(helper's infer sweep) a ';'-separated file for a ','-trained run was told to set data.csv.separator to
    ';', which predict then refused (the run fixes it): the fix is the file's separator."""
    rows = _csv_run(tmp_path)
    (tmp_path / "semi.csv").write_text("".join(r.replace(",", ";") + "\n" for r in rows[:21]))
    code, out = _invoke("predict", "--run", str(tmp_path / "runs" / "csvrun"), "--input", str(tmp_path / "semi.csv"),
                        "--out", str(tmp_path / "p.csv"), "-q")
    said = " ".join(out.split())
    assert code == 1 and "the file looks separated by ';', and the training data was read with ','" in said, said
    assert "write the file separated by ','" in said and "set data.csv.separator" not in said, said
    # (a review) a --stats-from test build of the file got the fix the train cache then refused
    code, out = _invoke("shard", "--cfg", str(tmp_path / "csv.yaml"), "--input", str(tmp_path / "semi.csv"), "--test",
                        "--stats-from", str(tmp_path / "c"), "--out", str(tmp_path / "te"), "-q")
    said = " ".join(out.split())
    assert code == 1 and "write the file separated by ','" in said and "set data.csv.separator" not in said, said
    # (a second review) a test build of its own (no --stats-from) may still set its separator
    code, out = _invoke("shard", "--cfg", str(tmp_path / "csv.yaml"), "--input", str(tmp_path / "semi.csv"), "--test",
                        "--out", str(tmp_path / "te2"), "-q")
    said = " ".join(out.split())
    assert code == 1 and "set data.csv.separator to ';'" in said and "training data" not in said, said


def test_predict_errors_name_the_files_line_and_a_fix_predict_has(world: Path, tmp_path: Path) -> None:
    """Past the first chunk a bad line was named by its line within the chunk ("chunk from line 257: input
    rows, line 4"); fixes said --bad-rows skip, an option predict has not; an empty line in Criteo text was
    told to pass a file in the run's format (Criteo)."""
    from ctrpipe.errors import CtrpipeError
    from ctrpipe.serve.predict_file import predict_file

    lines = (world / "d" / "test.tsv").read_text().splitlines()
    for k, bad_line, want in ((260, lines[260] + "\textra", "fields"), (140, "", "remove the empty line")):
        bad = tmp_path / f"bad{k}.tsv"
        bad.write_text("\n".join(lines[:k] + [bad_line] + lines[k + 1:]) + "\n")
        with pytest.raises(CtrpipeError) as err:
            predict_file(world / "runs" / "dnn", bad, tmp_path / "p.csv", chunk_rows=128)
        msg = str(err.value)
        assert err.value.where.startswith(f"{bad}, line {k + 1}") and want in msg, msg
        assert "--bad-rows skip to" not in msg and "--set data.format" not in msg, msg


def test_predict_guards_its_input_its_record_and_gzip(world: Path, tmp_path: Path) -> None:
    """(helper's serving sweep) --out equal to --input replaced the rows with their predictions (exit 0, and
    the record's input sha256 was the output's); a .gz --out was plain CSV under a .gz name; a failed predict
    deleted the earlier output's record; submission-only infer keys were accepted and ignored."""
    import gzip

    from ctrpipe.errors import ConfigError
    from ctrpipe.serve.predict_file import predict_file

    run, test = world / "runs" / "dnn", world / "d" / "test.tsv"
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(test.read_bytes())
    with pytest.raises(ConfigError, match="--out is the --input file"):
        predict_file(run, copy, copy)
    assert copy.read_bytes() == test.read_bytes()
    plain, packed = tmp_path / "p.csv", tmp_path / "p.csv.gz"
    predict_file(run, test, plain)
    predict_file(run, test, packed)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    upper = tmp_path / "p.csv.GZ"                # gzip by name whatever its case, as infer writes it
    predict_file(run, test, upper)
    assert gzip.decompress(upper.read_bytes()) == plain.read_bytes()
    first = packed.read_bytes()
    predict_file(run, test, packed)
    assert packed.read_bytes() == first                                      # byte-identical reruns
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(test.read_text().splitlines()[:5] + ["garbage"]) + "\n")
    record = plain.with_name(plain.name + ".json").read_bytes()
    with pytest.raises(Exception, match="line 6"):
        predict_file(run, bad, plain)
    assert plain.with_name(plain.name + ".json").read_bytes() == record       # the earlier output keeps it
    for key in ("infer.task=label", "infer.pred_header=p", "infer.view=val"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            predict_file(run, test, tmp_path / "q.csv", overrides=[key])
    with pytest.raises(ConfigError, match="scores rows on the CPU") as err:    # was silently scored on the CPU
        predict_file(run, test, tmp_path / "q.csv", overrides=["train.device=cuda"])
    assert "ctrpipe infer" in err.value.fix
    with pytest.raises(ConfigError) as err:         # the fix's example is a key predict takes
        predict_file(run, test, tmp_path / "q.csv", overrides=["data.hash_bins=3"])
    assert "--set infer.method=mean" in err.value.fix
    predict_file(run, test, tmp_path / "q.csv", overrides=["train.device=cpu"])
    predict_file(run, test, tmp_path / "r.csv", overrides=["infer.write_chunk_rows=7"])    # used: it stays
    assert (tmp_path / "r.csv").read_bytes() == plain.read_bytes()


def test_predict_scores_rows_whose_labels_are_pending_or_other_values(tmp_path: Path) -> None:
    """(helper's CSV sweep) predict and Predictor checked the label column of their input though they never
    use it: a log with an outcome still pending (empty) or another value failed with "the label is missing".
    The labels are left unread; every row is scored as it is without them."""
    from ctrpipe.serve.predictor import Predictor

    rows = _csv_run(tmp_path)
    run = tmp_path / "runs" / "csvrun"
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("\n".join(rows[:21]) + "\n")
    pending = tmp_path / "pending.csv"
    pending.write_text("\n".join([rows[0], *(",".join([r.split(",")[0], ["", "2", "?"][i % 3], *r.split(",")[2:]])
                                             for i, r in enumerate(rows[1:21]))]) + "\n")
    for name in ("labelled", "pending"):
        code, out = _invoke("predict", "--run", str(run), "--input", str(tmp_path / f"{name}.csv"),
                            "--out", str(tmp_path / f"p_{name}.csv"), "-q")
        assert code == 0, out
    assert pl.read_csv(tmp_path / "p_pending.csv").equals(pl.read_csv(tmp_path / "p_labelled.csv"))
    p = Predictor.load(run)
    uid, _, a, c = rows[1].split(",")
    got = [p.predict([{"uid": uid, "clicked": y, "a": a, "c": c}])["clicked"] for y in (None, "2", "1")]
    assert got[0] == got[1] == got[2], got


def test_a_stop_as_the_predictions_land_still_writes_their_record(world: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop between the predictions' rename and their record (hashing the input file there) left them
    without a record while the note said nothing partial was left."""
    out = tmp_path / "preds.csv"
    stop_right_after_renaming_onto(monkeypatch, out, signal.SIGTERM)
    code, msg = _invoke("predict", "--run", str(world / "runs" / "dnn"), "--input",
                        str(world / "d" / "test.tsv"), "--out", str(out), "-q")
    assert code == 143 and "stopped by SIGTERM" in msg, msg
    assert pl.read_csv(out).height == 300
    assert json.loads((tmp_path / "preds.csv.json").read_text())["rows"] == 300


def test_predict_of_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    """A helper's sweep: `predict --input DIR` said "input file not found" of a folder that is there."""
    from ctrpipe.errors import InputFormatError
    from ctrpipe.serve.predict_file import predict_file

    with pytest.raises(InputFormatError, match="--input is a folder") as err:
        predict_file(tmp_path, tmp_path, tmp_path / "out.csv")
    assert err.value.where == str(tmp_path)


def test_predict_refuses_a_history_written_with_another_separator(tmp_path: Path) -> None:
    """(helper's sequence sweep) `shard` refuses token lists written with another separator, but predict, which
    shares serving's switch for it, scored them: each row one unknown token, exit 0. A file has the rows the
    check needs; its fix is the file's, since the run's separator is fixed. Serving's request rows stay
    unchecked, and a file written as the run was is scored."""
    from ctrpipe.serve.predictor import Predictor

    rng = np.random.default_rng(1)
    def lists(sep: str, n: int) -> list[str]:
        return [sep.join(f"t{j}" for j in rng.integers(0, 30, 1 + i % 4)) for i in range(n)]
    _csv_run(tmp_path, "h", lists("|", 300), "categorical: {columns: [], pattern: ''}\n"
                                              "  multihot: [{column: h, separator: '|', max_len: 4}]")
    cfg = tmp_path / "csv.yaml"
    run = tmp_path / "runs" / "csvrun"
    semi = tmp_path / "semi.csv"
    semi.write_text("uid,a,h\n" + "".join(f"v{i},0.5,{h}\n" for i, h in enumerate(lists(";", 100))))
    code, out = _invoke("predict", "--run", str(run), "--input", str(semi), "--out", str(tmp_path / "p.csv"))
    said = " ".join(out.split())
    assert code == 1 and "contain ';' and not the separator '|'" in said and str(semi) in said, out
    assert "items joined by '|' alone" in said and "set separator" not in said, out
    # so does a test cache built with the train cache's statistics: its separators are the train cache's
    code, out = _invoke("shard", "--cfg", str(cfg), "--input", str(semi), "--test", "--stats-from",
                        str(tmp_path / "c"), "--out", str(tmp_path / "t"), "-q")
    said = " ".join(out.split())
    assert code == 1 and "items joined by '|' alone" in said and "set separator" not in said, out
    assert not (tmp_path / "p.csv").exists()
    good = tmp_path / "good.csv"
    good.write_text("uid,a,h\n" + "".join(f"v{i},0.5,{h}\n" for i, h in enumerate(lists("|", 100))))
    code, out = _invoke("predict", "--run", str(run), "--input", str(good), "--out", str(tmp_path / "g.csv"), "-q")
    assert code == 0 and pl.read_csv(tmp_path / "g.csv").height == 100, out
    # serving scores what it is given: a handful of request rows cannot tell lists from single tokens
    assert len(Predictor.load(run).predict([{"uid": "x", "a": "0.5", "h": "t1;t2"}] * 30)["clicked"]) == 30
