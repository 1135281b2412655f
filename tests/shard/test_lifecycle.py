"""Cache lifecycle: reuse by fingerprint, refusal naming what differs, --force, resume after kill -9,
manifest round trip, test caches with --stats-from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from raw_inputs import write_criteo_tsv, write_parquet

from ctrpipe.errors import ConfigError, InputFormatError, ManifestMismatchError, SchemaError
from ctrpipe.shard.build import build_shards
from ctrpipe.shard.manifest import MANIFEST_NAME, Manifest, read_manifest
from ctrpipe.shard.reader import open_cache
from tests.shard.helpers import REPO, criteo_cfg, load_all, npy_bytes, parquet_cfg


def test_same_inputs_reuse_the_cache(tmp_path: Path, criteo_tsv: Path) -> None:
    first = build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    stamp = (tmp_path / "c" / "shard_00000" / "numeric.npy").stat().st_mtime_ns
    again = build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    assert again.reused and not first.reused
    assert again.manifest == first.manifest
    assert (tmp_path / "c" / "shard_00000" / "numeric.npy").stat().st_mtime_ns == stamp


def test_different_config_is_refused_with_the_key_and_fix(tmp_path: Path, criteo_tsv: Path) -> None:
    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    with pytest.raises(ManifestMismatchError) as err:
        build_shards(criteo_cfg("data.hash_bins=2000"), [criteo_tsv], tmp_path / "c", progress=False)
    msg = str(err.value)
    assert "data.hash_bins: 1000 -> 2000" in msg and "--force" in msg and "manifest.json" in msg


def test_changed_source_file_is_refused_naming_the_file(tmp_path: Path, criteo_tsv: Path) -> None:
    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    write_criteo_tsv(criteo_tsv, 70, seed=5)
    with pytest.raises(ManifestMismatchError) as err:
        build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    assert str(criteo_tsv.resolve()) in str(err.value) and "changed" in str(err.value)


def test_force_rebuilds(tmp_path: Path, criteo_tsv: Path) -> None:
    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    res = build_shards(criteo_cfg("data.shard_rows=40"), [criteo_tsv], tmp_path / "c", force=True,
                       progress=False)
    assert not res.reused and [s.rows for s in res.manifest.shards] == [40, 24]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST_NAME, "shard_00000", "shard_00001"]
    assert read_manifest(tmp_path / "c").fingerprint == res.manifest.fingerprint


def test_out_folder_with_foreign_files_is_refused(tmp_path: Path, criteo_tsv: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as err:
        build_shards(criteo_cfg(), [criteo_tsv], out, progress=False)
    assert "notes.txt" in str(err.value) and "fix:" in str(err.value)


def test_manifest_round_trip(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "p.parquet", 50)
    m = build_shards(parquet_cfg(), [src], tmp_path / "c", progress=False).manifest
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert read_manifest(tmp_path / "c") == m
    assert m.schema_fingerprint() == read_manifest(tmp_path / "c").schema_fingerprint()
    assert m.config_sources["data.format"].endswith("parquet_example.yaml")
    assert m.config_sources["data.shard_rows"] == "--set"


def _kill_mid_build(cmd: list[str], work_glob: Path) -> None:
    """Start a build in a subprocess and kill -9 it as soon as its first shard is recorded as finished."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            for prog in work_glob.parent.glob(work_glob.name + "/progress.json"):
                try:
                    done = json.loads(prog.read_text()).get("finished", [])
                except (OSError, json.JSONDecodeError):
                    done = []
                if done:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"the build finished before it could be killed: {proc.stderr.read()[-500:]!r}")


def test_resume_after_kill_is_byte_identical(tmp_path: Path) -> None:
    src = write_criteo_tsv(tmp_path / "big.tsv", 20_000)
    sets = ["data.shard_rows=500", "data.chunk_rows=100", "data.hash_bins=1000", "data.folds.n_splits=3"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ctrpipe.cli", "shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"),
           "--input", str(src), "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    _kill_mid_build(cmd, out / ".incomplete-*")
    # killed: nothing looks complete
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(ManifestMismatchError):
        open_cache(out)
    work = next(out.glob(".incomplete-*"))
    finished = json.loads((work / "progress.json").read_text())["finished"]
    stamps = {i: (work / f"shard_{i:05d}" / "numeric.npy").stat().st_mtime_ns for i in finished}
    from ctrpipe.config import load_config

    cfg = load_config(REPO / "cfgs" / "criteo.yaml", sets)
    resumed = build_shards(cfg, [src], out, progress=False)
    clean = build_shards(cfg, [src], tmp_path / "clean", progress=False)
    assert npy_bytes(out) == npy_bytes(tmp_path / "clean")
    assert resumed.manifest.fingerprint == clean.manifest.fingerprint
    assert resumed.manifest.rows == clean.manifest.rows and resumed.manifest.columns == clean.manifest.columns
    for i, stamp in stamps.items():                              # finished shards were not rewritten
        assert (out / f"shard_{i:05d}" / "numeric.npy").stat().st_mtime_ns == stamp
    assert not list(out.glob(".incomplete-*"))


def test_test_cache_reuses_train_statistics(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", 150, seed=1)
    test = write_parquet(tmp_path / "test.parquet", 40, seed=2, labels=False)
    tm = build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False).manifest
    with pytest.raises(ConfigError) as err:
        build_shards(parquet_cfg(), [test], tmp_path / "test", role="test", progress=False)
    assert "--stats-from" in str(err.value)
    # which settings need the statistics (a helper's sweep: the message listed every kind, not the config's)
    median_only = parquet_cfg("data.categorical.mode=hash", "data.covisit=[]", "data.numeric.standardize=false")
    with pytest.raises(ConfigError) as err:
        build_shards(median_only, [test], tmp_path / "test", role="test", progress=False)
    assert "(data.numeric.impute=median)" in err.value.what and err.value.where == "--test"
    m = build_shards(parquet_cfg(), [test], tmp_path / "test", role="test", stats_from=tmp_path / "train",
                     progress=False).manifest
    assert m.role == "test" and m.rows == {"total": 40, "train": 0, "val": 0, "gold": 0, "test": 40}
    assert m.schema_fingerprint() == tm.schema_fingerprint()
    assert m.feature_spec().numeric == tm.feature_spec().numeric
    assert m.fitted["identity"] == tm.fitted["identity"] and m.stats_from == tm.fingerprint
    a = load_all(tmp_path / "test")
    assert "labels" not in a and (a["split"] == 3).all() and (a["fold"] == -1).all()
    assert a["ids"].dtype.kind == "U"
    # the test rows were never counted: covisit features use train counts only, without leave-one-out
    assert np.isfinite(a["numeric"]).all()


def test_a_file_to_predict_without_its_sequence_column_is_told_to_add_it(tmp_path: Path) -> None:
    """A test file lacking the history column was told to check the config, which the train cache then
    refused to differ: the file is the one to fix (an all-null column is empty histories)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctrpipe.data.parquet import check_schema
    from ctrpipe.errors import SchemaError
    from ctrpipe.shard.passes import resolve_plan

    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    table = pq.read_table(write_parquet(tmp_path / "test.parquet", 20, seed=2, labels=False))
    pq.write_table(table.drop(["seq"]), tmp_path / "lacking.parquet")
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    add = "add 'seq' to the file, all null where it has no values (an empty history"
    with pytest.raises(SchemaError, match=r"\(data.multihot/sequence\) is not in the input") as err:
        build_shards(parquet_cfg(), [tmp_path / "lacking.parquet"], tmp_path / "test", role="test",
                     stats_from=tmp_path / "train", progress=False)
    assert add in err.value.fix and "config" not in err.value.fix
    with pytest.raises(SchemaError) as err:     # what `predict` meets: the plan comes from the train cache
        check_schema(tmp_path / "lacking.parquet", pq.read_schema(tmp_path / "lacking.parquet"),
                     resolve_plan(parquet_cfg().data, [train]).columns, require_labels=False)
    assert add in err.value.fix
    pq.write_table(table.set_column(table.schema.get_field_index("seq"), "seq", pa.nulls(20, pa.string())),
                   tmp_path / "empty.parquet")
    m = build_shards(parquet_cfg(), [tmp_path / "empty.parquet"], tmp_path / "test", role="test",
                     stats_from=tmp_path / "train", progress=False).manifest
    assert m.rows["test"] == 20 and (load_all(tmp_path / "test")["seq.len"] == 0).all()


def test_stats_from_with_other_hashing_is_refused(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    test = write_parquet(tmp_path / "test.parquet", 20, seed=2, labels=False)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    with pytest.raises(ManifestMismatchError) as err:
        build_shards(parquet_cfg("data.hash_bins=777"), [test], tmp_path / "test", role="test",
                     stats_from=tmp_path / "train", progress=False)
    assert "data.hash_bins" in str(err.value) and "fix:" in str(err.value)


def test_group_key_must_be_a_parsed_column(tmp_path: Path) -> None:
    from ctrpipe.errors import SchemaError

    src = write_parquet(tmp_path / "p.parquet", 30)
    with pytest.raises(SchemaError) as err:
        build_shards(parquet_cfg("data.split.mode=group", "data.split.key=user"), [src], tmp_path / "c",
                     progress=False)
    assert "'user'" in str(err.value) and "fix:" in str(err.value)
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def test_tampered_train_statistics_are_refused(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    test = write_parquet(tmp_path / "test.parquet", 20, seed=2, labels=False)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    vocab = next((tmp_path / "train" / "fitted").glob("vocab.*.ids.npy"))
    ids = np.load(vocab)
    np.save(vocab, ids[::-1].copy())
    with pytest.raises(ManifestMismatchError) as err:
        build_shards(parquet_cfg(), [test], tmp_path / "test", role="test", stats_from=tmp_path / "train",
                     progress=False)
    assert "fitted" in str(err.value) and "--force" in str(err.value)


def test_a_test_file_lacking_a_feature_column_is_refused(tmp_path: Path) -> None:
    """Patterns resolved against a test file without one numeric column gave a cache with fewer columns, every
    later one shifted to another index, and no error."""
    import pyarrow.parquet as pq

    from ctrpipe.errors import SchemaError

    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    test = write_parquet(tmp_path / "test.parquet", 20, seed=2, labels=False)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    table = pq.read_table(test)
    dropped = next(c for c in table.column_names if c.startswith("feat_a_"))
    pq.write_table(table.drop([dropped]), tmp_path / "lacking.parquet")
    with pytest.raises(SchemaError, match=rf"lacks the numeric columns \['{dropped}'"):
        build_shards(parquet_cfg(), [tmp_path / "lacking.parquet"], tmp_path / "test", role="test",
                     stats_from=tmp_path / "train", progress=False)
    assert not (tmp_path / "test" / MANIFEST_NAME).exists()
    build_shards(parquet_cfg(), [test], tmp_path / "test", role="test", stats_from=tmp_path / "train",
                 progress=False)


def test_stats_from_needs_test(tmp_path: Path) -> None:
    """A train build with --stats-from wrote a cache with no fitted/, which no test cache could then use."""
    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    with pytest.raises(ConfigError, match=r"--stats-from(?s:.*)add --test"):
        build_shards(parquet_cfg(), [train], tmp_path / "again", stats_from=tmp_path / "train", progress=False)


def test_a_test_cache_may_not_replace_its_stats_from_cache(tmp_path: Path) -> None:
    """(helper's shard sweep) --test --stats-from C --out C --force replaced the train cache C, fitted/ and all,
    by the test cache built from it."""
    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    before = (tmp_path / "train" / MANIFEST_NAME).read_bytes()
    for out in (tmp_path / "train", tmp_path / "train" / "test"):
        with pytest.raises(ConfigError, match="--out is the --stats-from train cache"):
            build_shards(parquet_cfg(), [train], out, role="test", stats_from=tmp_path / "train", force=True,
                         progress=False)
    assert (tmp_path / "train" / MANIFEST_NAME).read_bytes() == before


def test_reuse_checks_the_shards_and_force_checks_the_folder_first(tmp_path: Path, criteo_tsv: Path) -> None:
    """A cache missing a shard was reused as up to date; --force deleted a valid cache's manifest and only
    then refused a folder holding other files."""
    import shutil

    cfg = criteo_cfg("data.shard_rows=16")
    build_shards(cfg, [criteo_tsv], tmp_path / "c", progress=False)
    shutil.rmtree(tmp_path / "c" / "shard_00001")
    with pytest.raises(ManifestMismatchError, match=r"shard file is missing(?s:.*)--force"):
        build_shards(cfg, [criteo_tsv], tmp_path / "c", progress=False)
    build_shards(cfg, [criteo_tsv], tmp_path / "c", progress=False, force=True)
    (tmp_path / "c" / "NOTES.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not part of a shard cache"):
        build_shards(cfg, [criteo_tsv], tmp_path / "c", progress=False, force=True)
    assert read_manifest(tmp_path / "c").total_rows > 0                   # the cache is still there, whole


def test_a_failed_force_rebuild_keeps_the_old_cache(tmp_path: Path, criteo_tsv: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--force deleted the old manifest before building: a rebuild that then failed on bad input left no cache
    at all. The old cache now stays whole until the new one replaces it, and the rebuild resumes later."""
    out = tmp_path / "c"
    old = build_shards(criteo_cfg("data.shard_rows=16"), [criteo_tsv], out, progress=False).manifest
    bad = tmp_path / "bad.tsv"
    bad.write_text(criteo_tsv.read_text() + "2\t" + "\t" * 38 + "\n")        # label 2: the last line is bad
    with pytest.raises(InputFormatError, match="label"):
        build_shards(criteo_cfg("data.shard_rows=16"), [bad], out, force=True, progress=False)
    assert read_manifest(out) == old
    assert load_all(out)["labels"].shape[0] == old.total_rows == 64          # open_cache checks every array
    capsys.readouterr()
    assert build_shards(criteo_cfg("data.shard_rows=16"), [criteo_tsv], out, progress=False).reused
    note = " ".join(capsys.readouterr().err.split())        # the failed rebuild's folder is named, not left unseen
    assert ".incomplete-" in note and "rerun that build with --force to finish it, or delete" in note, note
    new = build_shards(criteo_cfg("data.shard_rows=40"), [criteo_tsv], out, force=True, progress=False)
    assert [s.rows for s in new.manifest.shards] == [40, 24]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "shard_00000", "shard_00001"]


def test_force_rebuild_without_statistics_drops_the_old_ones(tmp_path: Path) -> None:
    src = write_parquet(tmp_path / "p.parquet", 60)
    out = tmp_path / "c"
    build_shards(parquet_cfg(), [src], out, progress=False)
    assert (out / "fitted").is_dir()
    hashed = parquet_cfg("data.categorical.mode=hash", "data.covisit=[]", "data.numeric.impute=zero",
                         "data.numeric.standardize=false")
    build_shards(hashed, [src], out, force=True, progress=False)
    assert not (out / "fitted").exists() and open_cache(out).manifest.fitted.get("vocab", {}) == {}


def test_a_labelled_parquet_test_file_keeps_its_labels(tmp_path: Path) -> None:
    """A Parquet schema's `in` looks for fields, not names: a labelled test file was taken for an unlabelled
    one, and its cache had no labels.npy (a Criteo test cache kept them)."""
    train = write_parquet(tmp_path / "train.parquet", 60, seed=1)
    test = write_parquet(tmp_path / "test.parquet", 40, seed=2)
    build_shards(parquet_cfg(), [train], tmp_path / "train", progress=False)
    m = build_shards(parquet_cfg(), [test], tmp_path / "test", role="test", stats_from=tmp_path / "train",
                     progress=False).manifest
    import pyarrow.parquet as pq

    labels = load_all(tmp_path / "test")["labels"]
    assert labels.shape == (40, len(m.data_config().labels)) and m.label_rates
    want = pq.read_table(test).column(m.data_config().labels[0]).to_numpy()
    assert np.array_equal(labels[:, 0], want.astype(np.float32))


def test_a_cache_keyed_by_older_assignment_rules_is_refused_saying_why(tmp_path: Path) -> None:
    """Group and time keys now place some rows elsewhere (keyless rows, whole-number keys, time units): a cache
    built by the older rules, or an interrupted build of them, must not pass as this config's cache."""
    src = write_parquet(tmp_path / "p.parquet", 60)
    cfg = parquet_cfg("data.folds.mode=group", "data.folds.key=inventory_id", "data.folds.n_splits=3")
    build_shards(cfg, [src], tmp_path / "c", progress=False)
    path = tmp_path / "c" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["fingerprint"] = "0" * 64                  # what the same inputs and config gave under the older rules
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestMismatchError, match="assign rows to the split and folds"):
        build_shards(cfg, [src], tmp_path / "c", progress=False)


def test_inputs_with_integer_and_text_ids_are_refused(tmp_path: Path) -> None:
    """ID stored as int64 in one file and as text in another: a writer traceback in one order, and in the
    other a cache reported as built whose ids.npy had lost the integer IDs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = write_parquet(tmp_path / "text.parquet", 40)
    table = pq.read_table(text)
    ints = pa.array(range(1000, 1040), pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("ID"), "ID", ints), tmp_path / "ints.parquet")
    for i, (inputs, gold) in enumerate((([text, tmp_path / "ints.parquet"], []),
                                        ([tmp_path / "ints.parquet", text], []),
                                        ([text], [tmp_path / "ints.parquet"]))):
        with pytest.raises(SchemaError) as err:
            build_shards(parquet_cfg(), inputs, tmp_path / f"c{i}", gold=gold, progress=False)
        assert "ID" in err.value.where and "one type in every input file" in str(err.value)
        assert not (tmp_path / f"c{i}" / MANIFEST_NAME).exists()


def test_bins_for_a_column_that_is_not_categorical_are_refused(tmp_path: Path) -> None:
    """data.categorical.bins.C=50 for column `c`: the column kept data.hash_bins, without a word."""
    src = write_parquet(tmp_path / "p.parquet", 30)
    with pytest.raises(ConfigError) as err:
        build_shards(parquet_cfg("data.categorical.bins.Gender=50"), [src], tmp_path / "c", progress=False)
    assert err.value.where == "data.categorical.bins.Gender" and "gender" in err.value.fix
    assert build_shards(parquet_cfg("data.categorical.bins.gender=50"), [src], tmp_path / "c", progress=False)


def test_every_row_skipped_says_why(tmp_path: Path) -> None:
    """With --bad-rows skip and every row bad (here every label is 2) it said the inputs held no rows and to
    check the --input paths; it now names the reasons, the first bad row and how to see its error."""
    src = tmp_path / "labels.tsv"
    src.write_text("".join("\t".join(["2"] + ["2"] * 13 + ["abc"] * 26) + "\n" for _ in range(20)))
    with pytest.raises(InputFormatError) as err:
        build_shards(criteo_cfg("data.bad_rows=skip"), [src], tmp_path / "c", progress=False)
    assert "every row of the inputs was skipped as bad (20 " in err.value.what, err.value
    assert err.value.where == f"{src}, line 1" and "without --bad-rows skip" in err.value.fix


def test_an_unlabelled_gold_file_is_not_told_to_pass_test(tmp_path: Path) -> None:
    """--gold with a file without labels was told to pass --test, which --gold refuses."""
    train = write_criteo_tsv(tmp_path / "train.tsv", 40)
    gold = write_criteo_tsv(tmp_path / "gold.tsv", 20, seed=2, labels=False)
    with pytest.raises(InputFormatError) as err:
        build_shards(criteo_cfg(), [train], tmp_path / "c", gold=[gold], progress=False)
    assert "--gold inputs need the label columns" in err.value.fix and "--test" not in err.value.fix


@pytest.mark.parametrize("edit", ["[1]", "drop_columns", "columns_not_a_list"])
def test_a_hand_edited_manifest_is_named_not_a_traceback(tmp_path: Path, criteo_tsv: Path, edit: str) -> None:
    """JSON of the wrong shape in manifest.json (a list, a key removed, a value of another type) raised
    AttributeError / KeyError tracebacks; calibration.json likewise."""
    import json

    build_shards(criteo_cfg(), [criteo_tsv], tmp_path / "c", progress=False)
    path = tmp_path / "c" / MANIFEST_NAME
    doc = json.loads(path.read_text())
    if edit == "[1]":
        path.write_text("[1]")
    elif edit == "drop_columns":
        del doc["columns"]
        path.write_text(json.dumps(doc))
    else:
        doc["columns"] = 5
        path.write_text(json.dumps(doc))
    with pytest.raises(ManifestMismatchError) as err:
        read_manifest(tmp_path / "c")
    assert err.value.where == str(path) and err.value.fix
    from ctrpipe.errors import CheckpointError
    from ctrpipe.infer.calibrate import read_calibration

    (tmp_path / "calibration.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="cannot read the calibration file"):
        read_calibration(tmp_path / "calibration.json")
