"""`ctrpipe shard` and `ctrpipe inspect` end to end through the Typer app."""

from __future__ import annotations

from pathlib import Path

from raw_inputs import write_criteo_tsv, write_parquet
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.shard.manifest import read_manifest
from tests.shard.helpers import CRITEO_CFG, PARQUET_CFG

runner = CliRunner()


def test_shard_then_inspect(tmp_path: Path) -> None:
    src = write_criteo_tsv(tmp_path / "train.tsv", 50)
    out = tmp_path / "cache"
    args = ["shard", "--cfg", str(CRITEO_CFG), "--input", str(src), "--out", str(out),
            "--set", "data.shard_rows=20", "--set", "data.hash_bins=500"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "50" in res.output and "shards" in res.output
    assert read_manifest(out).total_rows == 50
    res = runner.invoke(app, args + ["--quiet"])
    assert res.exit_code == 0 and "up to date" in res.output
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "all checks passed" in res.output


def test_test_cache_via_cli(tmp_path: Path) -> None:
    train = write_parquet(tmp_path / "train.parquet", 60)
    test = write_parquet(tmp_path / "test.parquet", 20, seed=3, labels=False)
    common = ["--cfg", str(PARQUET_CFG), "--set", "data.shard_rows=32", "--quiet"]
    res = runner.invoke(app, ["shard", "--input", str(train), "--out", str(tmp_path / "tr"), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["shard", "--input", str(test), "--out", str(tmp_path / "te"), "--test",
                              *common])
    assert res.exit_code == 1 and "--stats-from" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["shard", "--input", str(test), "--out", str(tmp_path / "te"), "--test",
                              "--stats-from", str(tmp_path / "tr"), *common])
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "te").rows["test"] == 20


def test_bad_option_and_refusal_messages(tmp_path: Path) -> None:
    src = write_criteo_tsv(tmp_path / "train.tsv", 30)
    out = tmp_path / "cache"
    base = ["shard", "--cfg", str(CRITEO_CFG), "--input", str(src), "--out", str(out), "--quiet"]
    res = runner.invoke(app, base + ["--bad-rows", "maybe"])
    assert res.exit_code == 1 and "--bad-rows" in res.output and "fix:" in res.output
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, base + ["--set", "data.hash_seed=3"])
    assert res.exit_code == 1 and "data.hash_seed: 0 -> 3" in res.output and "--force" in res.output
    assert runner.invoke(app, base + ["--set", "data.hash_seed=3", "--force"]).exit_code == 0


def test_inspect_exit_code_on_corrupt_cache(tmp_path: Path) -> None:
    import numpy as np

    src = write_criteo_tsv(tmp_path / "train.tsv", 40)
    out = tmp_path / "cache"
    res = runner.invoke(app, ["shard", "--cfg", str(CRITEO_CFG), "--input", str(src), "--out", str(out),
                              "--set", "data.hash_bins=100", "--quiet"])
    assert res.exit_code == 0, res.output
    path = out / "shard_00000" / "categorical.npy"
    cat = np.load(path)
    cat[0, 0] = 100 + 5                                       # bins + 5
    np.save(path, cat)
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 1 and "FAIL" in res.output and "C1" in res.output


def test_several_inputs_after_one_input_flag(tmp_path: Path) -> None:
    a = write_criteo_tsv(tmp_path / "a.tsv", 30, seed=1)
    b = write_criteo_tsv(tmp_path / "b.tsv", 20, seed=2)
    out = tmp_path / "cache"
    res = runner.invoke(app, ["shard", "--cfg", str(CRITEO_CFG), "--input", str(a), str(b), "--out", str(out),
                              "--set", "data.hash_bins=500", "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert manifest.total_rows == 50
    assert [Path(s.path).name for s in manifest.sources] == ["a.tsv", "b.tsv"]


def test_several_gold_files_after_one_gold_option_stay_gold(tmp_path: Path) -> None:
    """`--gold g1 g2` put g2 among the training inputs (click gives an option one value; the rest were
    positional, i.e. more --input paths): held-out rows trained on. Paths after --input or --gold now extend
    that option, in either order and beside other options."""
    a, b = (write_criteo_tsv(tmp_path / f"{n}.tsv", 40, seed=i) for i, n in enumerate("ab"))
    g1, g2 = (write_criteo_tsv(tmp_path / f"{n}.tsv", 25, seed=5 + i) for i, n in enumerate(("g1", "g2")))
    sets = ["--set", "data.shard_rows=50", "--set", "data.hash_bins=500", "--quiet"]
    for i, order in enumerate((["--input", str(a), str(b), "--gold", str(g1), str(g2)],
                               ["--gold", str(g1), str(g2), "--cfg", str(CRITEO_CFG), "-i", str(a), str(b)],
                               ["--gold=" + str(g1), str(g2), "--input", str(a), "--force", str(b)])):
        out = tmp_path / f"c{i}"
        res = runner.invoke(app, ["shard", "--cfg", str(CRITEO_CFG), *order, "--out", str(out), *sets])
        assert res.exit_code == 0, res.output
        m = read_manifest(out)
        assert m.gold_sources == 2 and m.rows["gold"] == 50 and m.rows["train"] + m.rows["val"] == 80, m.rows


def test_an_output_path_through_a_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """--out notes.txt/x (or --runs notes.txt) was a NotADirectoryError / FileExistsError traceback in every
    command that writes: the CLI names the path and the fix."""
    src = write_criteo_tsv(tmp_path / "train.tsv", 50)
    (tmp_path / "notes.txt").write_text("x")
    shard = ["shard", "--cfg", str(CRITEO_CFG), "--input", str(src), "--set", "data.hash_bins=500", "-q"]
    for args in (["synth", "--rows", "50", "--out", str(tmp_path / "notes.txt" / "d"), "-q"],
                 [*shard, "--out", str(tmp_path / "notes.txt" / "c")],
                 ["train", "--cfg", str(CRITEO_CFG.parent / "criteo_dnn.yaml"), "--shards", str(tmp_path / "c"),
                  "--runs", str(tmp_path / "notes.txt"), "-q", "--set", "train.max_steps=1",
                  "--set", "train.device=cpu", "--set", "data.hash_bins=500"]):
        if args[0] == "train":
            assert runner.invoke(app, [*shard, "--out", str(tmp_path / "c")]).exit_code == 0
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.output, res.exception)
        assert "notes.txt" in res.output and "fix:" in res.output, res.output
