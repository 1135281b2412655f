"""`Predictor` on real tiny runs: its probabilities on raw rows equal `ctrpipe shard --test` + `ctrpipe infer`
on the same rows bit for bit (Criteo text with and without labels, Parquet with sequences / multi-hot /
co-visitation, CSV with derived labels), and bad rows fail naming the row and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from cli_helpers import run_cli as _cli
from cli_helpers import sets as _sets

from ctrpipe.errors import CtrpipeError, InputFormatError, SchemaError
from ctrpipe.infer.predict import run_infer

REPO = Path(__file__).resolve().parents[2]
ADULT = REPO.parent / "shared" / "data" / "adult"
FAST = ["loader.batch_size=64", "loader.eval_batch_size=128", "model.hidden_units=[16]", "model.embedding_dim=4",
        "train.log_every=5", "train.min_steps=0", "train.evals_per_epoch=1", "train.early_stopping.patience=0",
        "train.epochs=1", "train.device=cpu"]


def _world(root: Path, cfg: Path, train: Path, test: Path, data: list[str], kfold: int = 0,
           train_sets: tuple[str, ...] = ()) -> dict[str, Path]:
    """Train cache, test cache (--stats-from), a run, and `ctrpipe infer` of the test cache (fold logits
    kept), all through the CLI."""
    tr, te, runs = root / "tr", root / "te", root / "runs"
    _cli("shard", "--cfg", str(cfg), "--input", str(train), "--out", str(tr), "-q", *_sets(data))
    _cli("shard", "--cfg", str(cfg), "--input", str(test), "--test", "--stats-from", str(tr), "--out", str(te),
         "-q", *_sets(data))
    _cli("train", "--cfg", str(cfg), "--shards", str(tr), "--runs", str(runs), "-q",
         *(["--kfold", str(kfold)] if kfold else []), *_sets(data + FAST + ["exp_name=serve", *train_sets]))
    run = runs / "serve"
    out = root / "sub.csv"
    run_infer(run, te, out, ["infer.save_fold_preds=true"], quiet=True)
    return {"run": run, "te": te, "sub": out}


def _infer_result(w: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fold logits and (N,) float32 probabilities written by `ctrpipe infer`."""
    folds = np.load(w["sub"].with_name(w["sub"].name + ".folds.npz"))
    sub = pl.read_csv(w["sub"])
    return folds["logits"], sub[sub.columns[1]].cast(pl.Float32).to_numpy()


def _check_equal(p: object, w: dict[str, Path], rows: object) -> None:
    from ctrpipe.serve.predictor import Predictor

    assert isinstance(p, Predictor)
    logits, probs = _infer_result(w)
    head = p.heads[0]
    got = p.predict(rows, tasks=[head])[head]
    assert np.array_equal(p.logits(rows)[:, :, 0], logits)
    assert np.array_equal(got.astype(np.float32), probs)


# ------------------------------------------------------------------------------------------ Criteo text

@pytest.fixture(scope="module")
def criteo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_criteo")
    _cli("synth", "--format", "criteo", "--rows", "1200", "--test-rows", "300", "--out", str(root / "d"), "-q")
    w = _world(root, REPO / "cfgs" / "criteo.yaml", root / "d" / "train.tsv", root / "d" / "test.tsv",
               ["data.hash_bins=200", "data.shard_rows=500", "data.folds.n_splits=2",
                "data.split.val_ratio=0.2"], kfold=2, train_sets=("infer.calibration.method=temperature",))
    return {**w, "test": root / "d" / "test.tsv"}


def test_small_chunks_hash_columns_together(criteo: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The transform's small-chunk path (the Criteo kernel's hashed columns mapped to ids together, which
    serving's few-row calls take) gives the arrays of its per-column path (the large chunks of a build)."""
    from ctrpipe import Predictor
    from ctrpipe.serve.rows import rows_chunk
    from ctrpipe.shard import transform

    p = Predictor.load(criteo["run"])
    lines = criteo["test"].read_text().splitlines()
    chunk = rows_chunk(p.plan.cfg, p.plan.columns, lines)
    from ctrpipe.data.chunks import HASHED_PREFIX
    from ctrpipe.native import native

    if native() is None:            # a build without a compiler parses with polars, which hashes nothing early
        pytest.skip("the compiled Criteo kernel hashes columns as it parses; it is not built here")
    assert any(c.startswith(HASHED_PREFIX) for c in chunk.frame.columns), "no column came hashed: nothing to compare"
    split = np.zeros(chunk.frame.height, dtype=np.int8)
    together, _ = p.transformer.transform(chunk.frame, split)
    monkeypatch.setattr(transform, "_STACK_VALUES", 0)
    per_column, _ = p.transformer.transform(chunk.frame, split)
    assert together.keys() == per_column.keys()
    for k in together:
        assert np.array_equal(together[k], per_column[k]), k


def test_criteo_lines_with_and_without_labels(criteo: dict[str, Path]) -> None:
    from ctrpipe import Predictor

    p = Predictor.load(criteo["run"])
    assert len(p.models) == 2
    lines = criteo["test"].read_text().splitlines()
    _check_equal(p, criteo, lines)
    _check_equal(p, criteo, [ln.split("\t", 1)[1] for ln in lines])       # Kaggle test.txt: no label field


def test_criteo_dicts_and_single_row(criteo: dict[str, Path]) -> None:
    from ctrpipe import Predictor

    p = Predictor.load(criteo["run"])
    lines = criteo["test"].read_text().splitlines()
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    dicts = [{k: (v or None) for k, v in zip(names, ln.split("\t"), strict=True)} for ln in lines]
    for d in dicts:
        for k in names[1:14]:
            d[k] = None if d[k] is None else int(d[k])
    _check_equal(p, criteo, dicts)
    _check_equal(p, criteo, pl.DataFrame(dicts))
    one = p.predict(lines[5])[p.heads[0]]
    assert one.shape == (1,) and np.isclose(one[0], p.predict(lines)[p.heads[0]][5], rtol=1e-6)


def test_run_records_and_serves_with_the_caches_data_section(criteo: dict[str, Path], tmp_path: Path) -> None:
    """Shards built with a --set that the training --cfg lacks: the run records the cache's data section, and
    serving prepares raw rows by it (it hashed into the config file's 100k bins and failed before)."""
    import json

    from ctrpipe import Predictor

    runs = tmp_path / "runs"
    _cli("train", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--shards", str(criteo["run"].parents[1] / "tr"),
         "--runs", str(runs), "--kfold", "2", "-q",
         *_sets(FAST + ["exp_name=serve", "infer.calibration.method=temperature"]))
    doc = json.loads((runs / "serve" / "config.json").read_text())
    assert doc["config"]["data"]["hash_bins"] == 200
    assert doc["sources"]["data.hash_bins"].endswith("manifest.json")
    w = dict(criteo, run=runs / "serve", sub=tmp_path / "sub.csv")
    run_infer(w["run"], criteo["te"], w["sub"], ["infer.save_fold_preds=true"], quiet=True)
    _check_equal(Predictor.load(w["run"]), w, criteo["test"].read_text().splitlines())


def test_a_damaged_oof_is_an_error_and_a_missing_one_is_warned_of(criteo: dict[str, Path], tmp_path: Path) -> None:
    """A helper's sweep: a cut oof.npz (calibration.json gone) was read as "no validation predictions", so
    infer, predict and export wrote uncalibrated probabilities (infer with a misleading warning, the other two
    without a word). A damaged file is an error; a missing one is warned of by predict and export too."""
    import shutil

    from typer.testing import CliRunner

    from ctrpipe.cli import app

    run = tmp_path / "run"
    shutil.copytree(criteo["run"], run)
    (run / "calibration.json").unlink()
    oof = run / "oof.npz"
    oof.write_bytes(oof.read_bytes()[:300])
    commands = {"infer": ["infer", "--run", str(run), "--shards", str(criteo["te"]), "--out", str(tmp_path / "i.csv")],
                "predict": ["predict", "--run", str(run), "--input", str(criteo["test"]),
                            "--out", str(tmp_path / "p.csv")],
                "export": ["export", "--run", str(run), "--out", str(tmp_path / "export")]}
    for name, args in commands.items():
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1 and "cannot read oof.npz" in res.output and "damaged" in res.output, \
            (name, res.output)
    oof.unlink()
    for name, args in commands.items():
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0 and "cannot be fitted; writing uncalibrated" in " ".join(res.output.split()), \
            (name, res.output)


def test_rank_avg_is_refused_and_a_per_row_method_can_be_set(criteo: dict[str, Path], tmp_path: Path) -> None:
    """rank_avg ranks among the rows at hand: served rows would be ranked among their chunk only."""
    from typer.testing import CliRunner

    from ctrpipe import Predictor
    from ctrpipe.cli import app
    from ctrpipe.errors import ConfigError

    with pytest.raises(ConfigError, match="rank_avg") as e:
        Predictor.load(criteo["run"], overrides=["infer.method=rank_avg"])
    assert "infer.method=logit_mean" in e.value.fix
    assert e.value.where == "--set infer.method"             # it named the run's config, which did not set it
    lines = criteo["test"].read_text().splitlines()[:20]
    mean = Predictor.load(criteo["run"], overrides=["infer.method=mean"]).predict(lines)
    both = Predictor.load(criteo["run"]).logits(lines)                          # (K, N, H)
    p = Predictor.load(criteo["run"])
    want = np.mean([1 / (1 + np.exp(-p.calibrations[0].apply(both[k, :, 0]))) for k in range(2)], axis=0)
    np.testing.assert_allclose(mean[p.heads[0]], want, rtol=1e-6)
    src = tmp_path / "rows.tsv"
    src.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["predict", "--run", str(criteo["run"]), "--input", str(src), "--out",
                                   str(tmp_path / "p.csv"), "--set", "infer.method=rank_avg"])
    assert res.exit_code == 1 and "rank_avg" in res.output and not (tmp_path / "p.csv").exists()
    # a trim_mean that cuts nothing from its 2 folds is refused as infer refuses it, not served as a mean
    with pytest.raises(ConfigError, match="trims nothing from 2 models"):
        Predictor.load(criteo["run"], overrides=["infer.method=trim_mean"])


def test_predict_reads_gzipped_criteo_text(criteo: dict[str, Path], tmp_path: Path) -> None:
    """`ctrpipe shard` reads .gz Criteo text; predict read its bytes as text and blamed a header."""
    import gzip

    from ctrpipe.serve.predict_file import predict_file

    plain, packed = tmp_path / "plain.csv", tmp_path / "packed.csv"
    gz = tmp_path / "test.tsv.gz"
    gz.write_bytes(gzip.compress(criteo["test"].read_bytes()))
    assert predict_file(criteo["run"], criteo["test"], plain) == predict_file(criteo["run"], gz, packed) == 300
    assert plain.read_bytes() == packed.read_bytes()


def test_no_rows_and_one_head_by_name(criteo: dict[str, Path]) -> None:
    """(a helper's export sweep) a Criteo run given a table of the Criteo columns and no rows ended in an
    IndexError; tasks="label" read as the heads 'l', 'a', ..."""
    from ctrpipe import Predictor

    p = Predictor.load(criteo["run"])
    columns = {**{f"I{i}": pl.Float64 for i in range(1, 14)}, **{f"C{i}": pl.String for i in range(1, 27)}}
    empty = pl.DataFrame(schema=columns)
    for rows in (empty, empty.to_arrow()):
        with pytest.raises(InputFormatError, match="no rows given"):
            p.predict(rows)
    lines = criteo["test"].read_text().splitlines()[:3]
    head = p.heads[0]
    assert np.array_equal(p.predict(lines, tasks=head)[head], p.predict(lines, tasks=[head])[head])


def test_criteo_bad_rows_name_row_and_column(criteo: dict[str, Path]) -> None:
    from ctrpipe import Predictor

    p = Predictor.load(criteo["run"])
    lines = criteo["test"].read_text().splitlines()[:4]
    f = lines[2].split("\t")
    f[3] = "abc"                                 # I3 of line 3
    with pytest.raises(InputFormatError) as e:
        p.predict([lines[0], lines[1], "\t".join(f)])
    assert "line 3" in e.value.where and "column I3" in e.value.where
    assert "fix the value" in e.value.fix and "--bad-rows" not in e.value.fix      # served rows are all scored
    with pytest.raises(InputFormatError) as e:
        p.predict([lines[0], lines[1], lines[2] + "\textra", lines[3]])      # malformed: 41 fields
    assert "line 3" in e.value.where
    assert "--bad-rows" not in e.value.fix and "--set" not in e.value.fix
    assert "(the run reads data.format=criteo)" in e.value.fix and "Parquet input" not in e.value.fix
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    dicts = [dict(zip(names, ln.split("\t"), strict=True)) for ln in lines]
    del dicts[1]["C7"]
    with pytest.raises(SchemaError) as e:
        p.predict(dicts)
    assert e.value.where == "input rows, row 1, column C7"
    with pytest.raises(SchemaError) as e:
        p.predict(pl.DataFrame(dicts[2:]).drop("I5"))
    assert "column I5" in e.value.where


# ------------------------------------------------------------------------------------------ Parquet

@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_parquet")
    _cli("synth", "--format", "parquet", "--rows", "1200", "--test-rows", "300", "--out", str(root / "d"), "-q")
    w = _world(root, REPO / "cfgs" / "parquet_example.yaml", root / "d" / "train.parquet",
               root / "d" / "test.parquet", ["data.hash_bins=500", "data.shard_rows=500", "data.chunk_rows=400",
                                             "data.folds.n_splits=0"])
    return {**w, "test": root / "d" / "test.parquet"}


def test_parquet_table_polars_and_dicts(parquet: dict[str, Path]) -> None:
    from ctrpipe import Predictor

    p = Predictor.load(parquet["run"])
    table = pq.read_table(parquet["test"])
    assert p.plan.covisit and p.plan.sequence and p.plan.multihot
    _check_equal(p, parquet, table)
    _check_equal(p, parquet, pl.from_arrow(table).drop("clicked", "converted", "ID"))
    _check_equal(p, parquet, table.to_pylist())


def test_serving_does_not_check_token_separators(parquet: dict[str, Path]) -> None:
    """A review: the build's separator check ran on every request batch, so 32 candidate rows of one user whose
    tags were "sports fan team" were refused with a fix (set separator: ' ') a trained run cannot take."""
    from ctrpipe import Predictor

    p = Predictor.load(parquet["run"])
    rows = pl.from_arrow(pq.read_table(parquet["test"])).head(32).with_columns(tags=pl.lit("sports fan team"))
    assert len(p.predict(rows)[p.heads[0]]) == 32


def test_parquet_labels_are_not_read_when_serving(parquet: dict[str, Path]) -> None:
    """(helper's serving sweep) A pending outcome (null) or any other value in a label column failed as a bad
    label: serving never uses labels, so they are left unread."""
    from ctrpipe import Predictor

    p = Predictor.load(parquet["run"])
    rows = pq.read_table(parquet["test"]).slice(0, 6).to_pylist()
    want = p.predict(rows)
    for value in (None, 2):
        got = p.predict([{**r, "clicked": value, "converted": value} for r in rows])
        assert all(np.array_equal(got[h], want[h]) for h in want), value


def test_parquet_bad_input(parquet: dict[str, Path]) -> None:
    from ctrpipe import Predictor

    p = Predictor.load(parquet["run"])
    rows = pq.read_table(parquet["test"]).slice(0, 5).to_pylist()
    with pytest.raises(SchemaError) as e:
        p.predict(pl.DataFrame(rows).drop("gender"))
    assert "gender" in e.value.what or "gender" in e.value.where
    num = p.plan.numeric[0]
    bad = [dict(r) for r in rows]
    bad[3][num] = "lots"
    with pytest.raises(SchemaError) as e:
        p.predict(bad)
    assert e.value.where == f"input rows, row 3, column {num}"
    with pytest.raises(InputFormatError):
        p.predict(["1\t2\t3"])


def test_a_test_cache_given_as_the_training_cache_is_named(parquet: dict[str, Path]) -> None:
    """Its vocabularies are its train cache's: the error said the statistics were missing and to rebuild it."""
    from ctrpipe import Predictor
    from ctrpipe.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        Predictor.load(parquet["run"], cache=parquet["te"])
    assert "is a test cache" in e.value.what and "the cache the run trained on" in e.value.fix


def test_predict_names_the_parquet_file_of_a_missing_column(parquet: dict[str, Path], tmp_path: Path) -> None:
    """A column missing from a whole Parquet file was placed at "input rows" (helper's serving sweep)."""
    from ctrpipe.serve.predict_file import predict_file

    path = tmp_path / "nogender.parquet"
    pq.write_table(pq.read_table(parquet["test"]).drop_columns(["gender"]), path)
    with pytest.raises(SchemaError) as e:
        predict_file(parquet["run"], path, tmp_path / "p.csv")
    assert e.value.where == str(path) and "gender" in e.value.what


def test_parquet_run_given_another_file_kind(parquet: dict[str, Path], tmp_path: Path) -> None:
    """A Parquet run given text raised pyarrow's ArrowInvalid with a traceback; a cut file too."""
    from ctrpipe.serve.predict_file import predict_file

    text = tmp_path / "rows.tsv"
    text.write_text("1\t2\t3\n")
    with pytest.raises(InputFormatError) as e:
        predict_file(parquet["run"], text, tmp_path / "p.csv")
    assert "cannot be read as Parquet" in e.value.what and e.value.where == str(text)
    cut = tmp_path / "cut.parquet"
    data = parquet["test"].read_bytes()
    cut.write_bytes(data[:4] + b"\0" * (len(data) // 2) + data[len(data) // 2 + 4:])     # footer kept, pages not
    with pytest.raises(InputFormatError) as e:
        predict_file(parquet["run"], cut, tmp_path / "p.csv")
    assert str(cut) in e.value.where and not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------------------------------ CSV (Adult)

@pytest.fixture(scope="module")
def adult(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not (ADULT / "uci_adult.data").is_file():
        pytest.skip("../shared/data/adult is not present")
    root = tmp_path_factory.mktemp("serve_adult")
    train, test = root / "adult.data", root / "adult.test"
    train.write_text("".join((ADULT / "uci_adult.data").read_text().splitlines(keepends=True)[:2000]))
    test.write_text("".join((ADULT / "uci_adult.test").read_text().splitlines(keepends=True)[:300]))
    w = _world(root, REPO / "cfgs" / "adult.yaml", train, test, [])
    return {**w, "test": test}


def test_csv_lines_and_table(adult: dict[str, Path]) -> None:
    from ctrpipe import Predictor
    from ctrpipe.config import load_config

    p = Predictor.load(adult["run"])
    lines = adult["test"].read_text().splitlines()
    _check_equal(p, adult, lines)
    names = list(load_config(REPO / "cfgs" / "adult.yaml", []).data.csv.column_names)
    rows = [dict(zip(names, ln.split(", "), strict=True)) for ln in lines if not ln.startswith("|")]
    _check_equal(p, adult, rows)
    unlabelled = [{k: v for k, v in r.items() if k != "income"} for r in rows]
    _check_equal(p, adult, unlabelled)
    # a label source of neither a positive nor a negative value (an outcome not known yet) is not read
    _check_equal(p, adult, [ln if ln.startswith("|") else ln.rsplit(", ", 1)[0] + ", unknown" for ln in lines])


def test_csv_bad_input(adult: dict[str, Path]) -> None:
    from ctrpipe import Predictor
    from ctrpipe.config import load_config

    p = Predictor.load(adult["run"])
    names = list(load_config(REPO / "cfgs" / "adult.yaml", []).data.csv.column_names)
    lines = [ln for ln in adult["test"].read_text().splitlines() if not ln.startswith("|")][:5]
    rows = [dict(zip(names, ln.split(", "), strict=True)) for ln in lines]
    bad = [dict(r) for r in rows]
    bad[2]["age"] = "old"
    with pytest.raises(CtrpipeError) as e:
        p.predict(bad)
    assert "row 2" in e.value.where and "age" in e.value.where and "--bad-rows" not in e.value.fix
    with pytest.raises(SchemaError) as e:
        p.predict([{k: v for k, v in r.items() if k != "occupation"} for r in rows])
    assert "occupation" in e.value.where
    with pytest.raises(CtrpipeError) as e:
        p.predict(lines[:2] + [lines[2].rsplit(", ", 3)[0]])                 # a short line
    assert "line 3" in e.value.where and "the run reads ', '-separated fields age" in e.value.fix
    assert "--bad-rows" not in e.value.fix and "data.csv" not in e.value.fix    # a trained run's config is fixed


def test_predict_cli_reads_a_csv_file(adult: dict[str, Path], tmp_path: Path) -> None:
    """`ctrpipe predict` on a CSV-trained run reads the file with the build's CSV reader (comment lines and
    all) and gives Predictor.predict's probabilities; a bad line names the file and line and leaves nothing."""
    from typer.testing import CliRunner

    from ctrpipe import Predictor
    from ctrpipe.cli import app

    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", "--run", str(adult["run"]), "--input", str(adult["test"]),
                                   "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    p = Predictor.load(adult["run"])
    want = p.predict(adult["test"].read_text().splitlines())
    got = pl.read_csv(out)
    assert got.columns == ["row", *p.heads]
    for head in p.heads:
        np.testing.assert_allclose(got[head].to_numpy(), want[head], rtol=0, atol=1e-12)
    lines = adult["test"].read_text().splitlines()
    k = next(i for i, ln in enumerate(lines) if not ln.startswith("|")) + 3
    lines[k] = lines[k].rsplit(", ", 3)[0]                                     # a short line
    bad = tmp_path / "bad.test"
    bad.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["predict", "--run", str(adult["run"]), "--input", str(bad), "--out",
                                   str(tmp_path / "bad.csv"), "-q"])
    assert res.exit_code == 1 and f"line {k + 1}" in res.output and "bad.test" in res.output, res.output
    assert not (tmp_path / "bad.csv").exists()


def test_a_categorical_stored_with_other_values_than_in_training_is_refused(parquet: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """(helper's infer sweep) `hour` stored as integers in the file to score ("07" as 7: what a pandas round
    trip often gives) became other text, so a quarter of the predictions changed, exit 0, in predict, in a
    --stats-from test build and in serving. The train cache records how each categorical and token column's
    values were stored; a train build's later files must store them as its first did."""
    import polars as pl
    from typer.testing import CliRunner

    from ctrpipe import Predictor
    from ctrpipe.cli import app
    from ctrpipe.serve.predict_file import predict_file
    from ctrpipe.shard.manifest import read_manifest

    cache = Predictor.load(parquet["run"]).cache_dir
    m = read_manifest(cache)
    assert m.column("hour").value_type == "text" and m.column("seq").value_type == "text"
    table = pl.read_parquet(parquet["test"])
    ints = tmp_path / "ints.parquet"
    table.with_columns(pl.col("hour").cast(pl.Int64)).write_parquet(ints)
    with pytest.raises(SchemaError) as e:
        predict_file(parquet["run"], ints, tmp_path / "p.csv")
    assert e.value.where == f"{ints}, column hour" and "holds integer values (int64)" in e.value.what
    assert "the run's training data stored text values" in e.value.what
    # (a review) the fix once said to cast it to text, which gives "7" for "07" and passes the check
    assert "written exactly as there" in e.value.fix and "cast(" not in e.value.fix
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(SchemaError, match="holds integer values"):
        Predictor.load(parquet["run"]).predict(table.head(5).with_columns(pl.col("hour").cast(pl.Int64)))
    res = CliRunner().invoke(app, ["shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
                                   str(ints), "--test", "--stats-from", str(cache), "--out", str(tmp_path / "te"), "-q",
                                   *_sets(["data.hash_bins=500", "data.shard_rows=500", "data.folds.n_splits=0"])])
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and f"where the --stats-from train cache {cache} stored text values" in said, said
    # a train build over two files: the second stores the column otherwise than the first
    res = CliRunner().invoke(app, ["shard", "--cfg", str(REPO / "cfgs" / "parquet_example.yaml"), "--input",
                                   str(parquet["test"]), "--input", str(ints), "--out", str(tmp_path / "tr"), "-q",
                                   *_sets(["data.hash_bins=500", "data.folds.n_splits=0"])])
    said = " ".join(res.output.split())
    assert res.exit_code == 1 and f"where the first input file {parquet['test']} stored text values" in said, said
    assert not (tmp_path / "tr" / "manifest.json").exists()
