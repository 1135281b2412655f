"""ctrpipe synth: determinism, chunk invariance, Criteo text, Parquet schema, truth files and the CLI."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.errors import ConfigError
from ctrpipe.synth import BLOCK_ROWS, parquet, synth_criteo, synth_parquet
from ctrpipe.synth.common import Stream, atomic_path, block_rng, roc_auc
from ctrpipe.synth.criteo import CAT_SPECS, INT_SPECS

HEX8 = re.compile(r"^[0-9a-f]{8}$")


def _lines(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def criteo20k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("criteo20k")
    synth_criteo(out, rows=20_000, seed=0, test_rows=2_000)
    return out


@pytest.fixture(scope="module")
def parquet5k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parquet5k")
    synth_parquet(out, rows=5_000, seed=0, test_rows=700)
    return out


# ---- metrics ---------------------------------------------------------------------------------------------

def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(400) < 0.3
    score = rng.integers(0, 6, 400).astype(float)      # many ties
    pos, neg = score[y], score[~y]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert roc_auc(y, score) == pytest.approx(brute, abs=1e-12)
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5.0)))


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "x.tsv"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ---- Criteo text -----------------------------------------------------------------------------------------

def test_criteo_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth_criteo(a, rows=2000, seed=1, test_rows=300)
    synth_criteo(b, rows=2000, seed=1, test_rows=300)
    synth_criteo(c, rows=2000, seed=0, test_rows=300)
    names = ["train.tsv", "test.tsv", "train.truth.npy", "test.truth.npy", "synth.json"]
    assert sorted(p.name for p in a.iterdir()) == sorted(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.tsv").read_bytes() != (c / "train.tsv").read_bytes()
    # train and test are independent streams of the same model
    assert (a / "train.tsv").read_text().splitlines()[:300] != (a / "test.tsv").read_text().splitlines()


def test_criteo_bytes_do_not_depend_on_chunk_size_and_short_files_are_prefixes(tmp_path: Path) -> None:
    rows = 2 * BLOCK_ROWS + 123                         # three blocks, the last one cut
    synth_criteo(tmp_path / "one", rows=rows, seed=1, chunk_blocks=1)
    synth_criteo(tmp_path / "big", rows=rows, seed=1, chunk_blocks=32)
    synth_criteo(tmp_path / "short", rows=1000, seed=1)
    one = (tmp_path / "one" / "train.tsv").read_bytes()
    assert one == (tmp_path / "big" / "train.tsv").read_bytes()
    truth = [(tmp_path / d / "train.truth.npy").read_bytes() for d in ("one", "big")]
    assert truth[0] == truth[1]
    assert one.count(b"\n") == rows
    assert one.startswith((tmp_path / "short" / "train.tsv").read_bytes())


def test_criteo_fields_format_and_missing_rates(criteo20k: Path) -> None:
    rows = _lines(criteo20k / "train.tsv")
    assert len(rows) == 20_000
    assert {len(r) for r in rows} == {40}
    cols = list(zip(*rows, strict=True))
    assert set(cols[0]) == {"0", "1"}
    for j, spec in enumerate(INT_SPECS):
        col = cols[1 + j]
        missing = np.mean([v == "" for v in col])
        assert abs(missing - spec.missing) < 0.02, (f"I{j + 1}", missing, spec.missing)
        values = np.array([int(v) for v in col if v != ""])       # every present value is an integer
        if spec.neg:
            assert abs(np.mean(values < 0) - spec.neg) < 0.02
        else:
            assert values.min() >= 0
    assert max(int(v) for v in cols[5] if v) > 100_000              # I5 is heavy-tailed like the real one
    for f, spec in enumerate(CAT_SPECS):
        col = cols[14 + f]
        missing = np.mean([v == "" for v in col])
        assert abs(missing - spec.missing) < 0.02, (f"C{f + 1}", missing, spec.missing)
        present = [v for v in col if v]
        assert all(HEX8.match(v) for v in present), f"C{f + 1}"
        assert len(set(present)) <= spec.vocab
    distinct = [len(set(cols[14 + f]) - {""}) for f in range(len(CAT_SPECS))]
    assert min(distinct) <= 4 and max(distinct) > 10_000            # tiny to huge vocabularies, Zipf heads
    # missing groups: C19, C20, C25, C26 go missing together, as in real Criteo
    assert all((r[32] == "") == (r[33] == "") == (r[38] == "") == (r[39] == "") for r in rows[:2000])


def test_criteo_truth_matches_labels(criteo20k: Path) -> None:
    meta = json.loads((criteo20k / "synth.json").read_text())
    for split, n in (("train", 20_000), ("test", 2_000)):
        truth = np.load(criteo20k / f"{split}.truth.npy")
        labels = np.array([int(r[0]) for r in _lines(criteo20k / f"{split}.tsv")])
        assert truth.dtype == np.float32 and truth.shape == (n,)
        assert truth.min() > 0 and truth.max() < 1
        assert abs(truth.mean() - labels.mean()) < 0.03
        stats = meta["splits"][split]["labels"]["click"]
        assert stats["positive_rate"] == pytest.approx(labels.mean(), abs=1e-6)
        assert stats["oracle_auc"] == pytest.approx(roc_auc(labels, truth), abs=1e-5)
    labels = np.array([int(r[0]) for r in _lines(criteo20k / "train.tsv")])
    assert 0.2 < labels.mean() < 0.3
    assert 0.75 < roc_auc(labels, np.load(criteo20k / "train.truth.npy")) < 0.83
    assert meta["format"] == "criteo" and meta["rows"] == 20_000 and meta["test_rows"] == 2_000


def test_criteo_gzip_is_the_same_text_and_deterministic(tmp_path: Path) -> None:
    synth_criteo(tmp_path / "plain", rows=1500, seed=2, test_rows=100)
    synth_criteo(tmp_path / "gz1", rows=1500, seed=2, test_rows=100, gz=True)
    synth_criteo(tmp_path / "gz2", rows=1500, seed=2, test_rows=100, gz=True)
    for split in ("train", "test"):
        gz1 = (tmp_path / "gz1" / f"{split}.tsv.gz").read_bytes()
        assert gz1 == (tmp_path / "gz2" / f"{split}.tsv.gz").read_bytes()
        assert gzip.decompress(gz1) == (tmp_path / "plain" / f"{split}.tsv").read_bytes()
    assert not (tmp_path / "gz1" / "train.tsv").exists()


def test_rerun_removes_stale_outputs(tmp_path: Path) -> None:
    synth_criteo(tmp_path, rows=500, seed=0, test_rows=100)
    synth_criteo(tmp_path, rows=500, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth.json", "train.truth.npy", "train.tsv"]


def test_a_folder_of_real_data_is_left_alone(tmp_path: Path) -> None:
    """Synth's outputs have the usual names of real logs: a folder no synth run wrote lost test.parquet."""
    (tmp_path / "test.parquet").write_text("mine")
    with pytest.raises(ConfigError, match="holds test.parquet, which no ctrpipe synth run wrote"):
        synth_parquet(tmp_path, rows=500, seed=0)
    assert (tmp_path / "test.parquet").read_text() == "mine"
    # an interrupted run's folder (its marker, no synth.json yet) is cleared and written again
    run = tmp_path / "run"
    run.mkdir()
    (run / ".synth-incomplete").touch()
    (run / "train.tsv").write_text("partial")
    synth_criteo(run, rows=500, seed=0)
    assert sorted(p.name for p in run.iterdir()) == ["synth.json", "train.truth.npy", "train.tsv"]


# ---- Parquet ---------------------------------------------------------------------------------------------

EXPECTED_SCHEMA = (
    [("ID", pa.string()), ("clicked", pa.int8()), ("converted", pa.int8()), ("gender", pa.string()),
     ("age_group", pa.string()), ("inventory_id", pa.string()), ("day_of_week", pa.string()),
     ("hour", pa.string())]
    + [(f"l_feat_{i}", pa.string()) for i in range(1, 11)]
    + [(f"feat_a_{i}", pa.float64()) for i in range(1, 9)]
    + [(f"history_a_{i}", pa.float64()) for i in range(1, 5)]
    + [("seq", pa.string()), ("tags", pa.string()), ("tags_w", pa.string()), ("item_id", pa.string())])


def test_parquet_schema_ids_and_labels(parquet5k: Path) -> None:
    for split, n, prefix in (("train", 5_000, "TRAIN_"), ("test", 700, "TEST_")):
        table = pq.read_table(parquet5k / f"{split}.parquet")
        assert [(f.name, f.type) for f in table.schema] == EXPECTED_SCHEMA
        assert table.num_rows == n
        ids = table["ID"].to_pylist()
        assert ids[:2] == [f"{prefix}0000000", f"{prefix}0000001"] and ids[-1] == f"{prefix}{n - 1:07d}"
        clicked = table["clicked"].to_numpy()
        converted = table["converted"].to_numpy()
        assert set(np.unique(clicked)) <= {0, 1} and set(np.unique(converted)) <= {0, 1}
        assert np.all(converted <= clicked)                       # conversion only after a click
        truth = np.load(parquet5k / f"{split}.truth.npy")
        assert truth.dtype == np.float32 and truth.shape == (n, 2)
        assert truth.min() > 0 and truth.max() < 1 and np.all(truth[:, 1] <= truth[:, 0])
        assert abs(truth[:, 0].mean() - clicked.mean()) < 0.04
        assert abs(truth[:, 1].mean() - converted.mean()) < 0.02
    train = pq.read_table(parquet5k / "train.parquet")
    clicked = train["clicked"].to_numpy()
    assert roc_auc(clicked, np.load(parquet5k / "train.truth.npy")[:, 0]) > 0.72
    meta = json.loads((parquet5k / "synth.json").read_text())
    assert meta["truth_columns"] == ["click", "click_and_conversion"]
    assert 0.0 < meta["splits"]["train"]["labels"]["conversion"]["positive_rate"] < clicked.mean()


def test_parquet_values_look_like_the_spec(parquet5k: Path) -> None:
    t = pq.read_table(parquet5k / "train.parquet").to_pydict()
    assert set(t["day_of_week"]) == {str(i) for i in range(1, 8)}
    assert len(set(t["hour"])) == 24 and len(set(t["age_group"]) - {None}) == 8
    assert len(set(t["gender"]) - {None}) == 3 and None in t["gender"]
    assert 20 <= len(set(t["inventory_id"])) <= 50
    assert 0.3 < np.mean([v is None for v in t["l_feat_9"]]) < 0.5
    assert len(set(t["l_feat_1"])) <= 10 and len(set(t["l_feat_10"])) > 1000
    a3 = np.array([v for v in t["feat_a_3"] if v is not None])
    assert (a3 < 0).any() and 0.05 < np.mean([v is None for v in t["feat_a_3"]]) < 0.15
    lengths = np.array([len(s.split(",")) if s else 0 for s in t["seq"]])
    assert lengths.min() == 0 and lengths.max() <= 120 and np.median(lengths) < lengths.max() / 3
    assert all(tok.isdigit() and int(tok) < 50_000 for s in t["seq"][:200] if s for tok in s.split(","))
    for s in t["tags"]:
        toks = s.split("|") if s else []
        assert len(toks) <= 6 and len(set(toks)) == len(toks)
    assert all(re.fullmatch(r"\d+:(0\.\d\d|1\.00)(\|\d+:(0\.\d\d|1\.00))*", s) for s in t["tags_w"] if s)
    assert any(s == "" for s in t["tags"]) and any("|" in s for s in t["tags_w"])


def test_parquet_candidate_item_comes_from_the_history_vocabulary(parquet5k: Path) -> None:
    t = pq.read_table(parquet5k / "train.parquet").to_pydict()
    hist = [s.split(",") if s else [] for s in t["seq"]]
    seq_vocab = {tok for h in hist for tok in h}
    items = t["item_id"]
    assert all(v is not None and v.isdigit() and int(v) < 50_000 for v in items)
    assert np.mean([v in seq_vocab for v in items]) > 0.5              # the same string tokens as seq
    repeat = np.mean([v in h[-10:] for v, h in zip(items, hist, strict=True) if h])
    assert 0.12 < repeat < 0.3                                          # retargeted: a recent history item
    assert len(set(items)) > 1000


def test_parquet_oracle_needs_the_candidate_x_history_term(parquet5k: Path) -> None:
    """The hidden click logit holds a candidate x history term worth a visible AUC: dropping it from the
    true logit costs AUC, so a model reading the history against the candidate has something to gain."""
    model = parquet.build_model(0)
    raw = parquet.draw_raw(block_rng(0, Stream.TRAIN, 0))
    comps = parquet._components(model, raw)                              # (n, 7), the last one the target term
    z = comps @ model.comp_w
    y = pq.read_table(parquet5k / "train.parquet")["clicked"].to_numpy()
    truth = np.load(parquet5k / "train.truth.npy")[:, 0]
    n = len(y)
    np.testing.assert_allclose(parquet.sigmoid(model.bias + model.scale * z[:n]), truth, rtol=1e-5)
    share = np.var(comps[:, 6] * model.comp_w[6]) / np.var(z)
    assert 0.12 < share < 0.25
    without = z - comps[:, 6] * model.comp_w[6]
    assert roc_auc(y, z[:n]) - roc_auc(y, without[:n]) > 0.015
    meta = json.loads((parquet5k / "synth.json").read_text())
    assert meta["model"]["logit_variance_shares"]["candidate_x_history"] == pytest.approx(0.18)
    # the headroom is recorded: the oracle's AUC without the term, beside its own
    click = meta["splits"]["train"]["labels"]["click"]
    assert click["oracle_auc_without_candidate_x_history"] == pytest.approx(roc_auc(y, without[:n]), abs=2e-6)
    assert click["oracle_auc"] - click["oracle_auc_without_candidate_x_history"] > 0.015


def test_parquet_deterministic_and_independent_of_row_group_size(tmp_path: Path) -> None:
    synth_parquet(tmp_path / "a", rows=BLOCK_ROWS + 50, seed=0, group_blocks=1)
    synth_parquet(tmp_path / "c", rows=BLOCK_ROWS + 50, seed=0, group_blocks=6)
    a, c = tmp_path / "a", tmp_path / "c"
    assert pq.ParquetFile(a / "train.parquet").num_row_groups == 2
    assert pq.ParquetFile(c / "train.parquet").num_row_groups == 1
    assert pq.read_table(a / "train.parquet").equals(pq.read_table(c / "train.parquet"))
    assert (a / "train.truth.npy").read_bytes() == (c / "train.truth.npy").read_bytes()
    synth_parquet(tmp_path / "d", rows=400, seed=0, test_rows=50)
    synth_parquet(tmp_path / "e", rows=400, seed=0, test_rows=50)
    synth_parquet(tmp_path / "f", rows=400, seed=1)
    for name in ("train.parquet", "test.parquet", "train.truth.npy", "synth.json"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "e" / name).read_bytes(), name
    d = pq.read_table(tmp_path / "d" / "train.parquet")
    assert not d.equals(pq.read_table(tmp_path / "f" / "train.parquet"))
    assert pq.read_table(a / "train.parquet").slice(0, 400).equals(d)             # short files are prefixes


# ---- errors and CLI --------------------------------------------------------------------------------------

def test_library_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        synth_criteo(tmp_path, rows=0)
    assert "--rows" in str(err.value) and "fix:" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        synth_parquet(tmp_path / "file", rows=10)
    assert str(tmp_path / "file") in str(err.value) and "--out" in str(err.value)


def test_cli_end_to_end_criteo_and_parquet(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--format", "criteo", "--rows", "800", "--test-rows", "200",
                              "--seed", "1", "--out", str(tmp_path / "c"), "--gzip"])
    assert res.exit_code == 0, res.output
    assert "oracle AUC" in res.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "synth.json", "test.truth.npy", "test.tsv.gz", "train.truth.npy", "train.tsv.gz"]
    res = runner.invoke(app, ["synth", "--format", "parquet", "--rows", "300", "--seed", "1",
                              "--out", str(tmp_path / "p"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "p" / "train.parquet").num_rows == 300
    assert json.loads((tmp_path / "p" / "synth.json").read_text())["test_rows"] == 0


@pytest.mark.parametrize(("args", "where", "fix"), [
    (["--format", "csv"], "--format", "--format criteo"),
    (["--rows", "0"], "--rows", "positive integer"),
    (["--test-rows", "-5"], "--test-rows", "--test-rows 10000"),
    (["--seed", "-1"], "--seed", "non-negative"),
    (["--format", "parquet", "--gzip"], "--gzip", "drop --gzip"),
])
def test_cli_errors_name_the_option_and_the_fix(tmp_path: Path, args: list[str], where: str,
                                                 fix: str) -> None:
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "o"), "--quiet", *args])
    assert res.exit_code == 1
    assert where in res.output and "fix:" in res.output and fix in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="a filesystem where folders cannot be made: Linux's /proc")
def test_an_output_folder_that_cannot_be_made_is_a_clear_error() -> None:
    """--out under /proc gave a FileNotFoundError traceback."""
    res = CliRunner().invoke(app, ["synth", "--rows", "10", "--out", "/proc/ctrpipe_x", "-q"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception      # no traceback
    assert "cannot use /proc/ctrpipe_x" in res.output and "fix:" in res.output
