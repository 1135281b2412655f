"""The README's Kaggle path end to end, through the installed `ctrpipe` command, on the real Criteo rows in
../shared/data/criteo (skipped when absent): shard train -> train -> shard the unlabelled test text
(39 fields, --test --stats-from) -> infer a submission with Kaggle's `Id,Predicted` header.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "criteo"
CFG = REPO / "cfgs" / "demo.yaml"
TEST_ROWS = 1999                       # test_sample.tsv: the first 1,999 lines of Kaggle's test.txt
pytestmark = pytest.mark.skipif(not (DATA / "test_sample.tsv").is_file(), reason="../shared/data absent")


def ctrpipe(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (the venv's, beside this interpreter) in `cwd`."""
    exe = Path(sys.executable).with_name("ctrpipe")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from ctrpipe.cli import app; app()"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(res: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def shard_test(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return ctrpipe(cwd, "shard", "--cfg", str(CFG), "--input", str(DATA / "test_sample.tsv"), "--test",
                   "--stats-from", "K", "--out", "KT", "--set", "data.id_offset=60000000", *extra)


def infer(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return ctrpipe(cwd, "infer", "--run", "R/demo", "--shards", "KT", "--set", "infer.pred_header=Predicted",
                   "--set", "infer.id_header=Id", *extra)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The four README commands, run once in a fresh folder (relative K, R, KT as in the README)."""
    root = tmp_path_factory.mktemp("kaggle")
    ok(ctrpipe(root, "shard", "--cfg", str(CFG), "--input", str(DATA / "train_sample.tsv"), "--out", "K"))
    ok(ctrpipe(root, "train", "--cfg", str(CFG), "--shards", "K", "--runs", "R"))
    ok(shard_test(root))
    ok(infer(root))
    yield root
    # the demo config's checkpoints are hundreds of MB; pytest keeps old tmp folders, so drop them
    for ckpt in (root / "R" / "demo").glob("*.pt"):
        ckpt.unlink()


def test_submission_has_kaggle_ids_and_probabilities(kaggle: Path) -> None:
    sub = kaggle / "R" / "demo" / "submission.csv"
    assert sub.read_text().splitlines()[0] == "Id,Predicted"
    df = pl.read_csv(sub)
    assert df.height == TEST_ROWS
    assert df["Id"].to_list() == list(range(60_000_000, 60_000_000 + TEST_ROWS))
    p = df["Predicted"].to_numpy()
    assert np.isfinite(p).all() and (p > 0).all() and (p < 1).all()
    assert p.std() > 0                              # a trained model, not one constant


def test_unlabelled_test_manifest_describes_the_disk(kaggle: Path) -> None:
    m = json.loads((kaggle / "KT" / "manifest.json").read_text())
    assert m["role"] == "test"
    assert not [c for c in m["columns"] if c["kind"] == "label"]
    assert m["label_rates"] == {}
    for s in m["shards"]:
        assert "labels" not in s["files"]
        assert {p.name for p in (kaggle / "KT" / f"shard_{s['index']:05d}").iterdir()} == \
            {f"{g}.npy" for g in s["files"]}


def test_cache_listing_absent_labels_is_refused_with_rebuild_fix(kaggle: Path, tmp_path: Path) -> None:
    """A test cache whose manifest lists label columns without labels.npy (as ctrpipe wrote them before the
    manifest followed the disk) is refused by infer and by a rerun of the shard command; --force mends it."""
    for name in ("K", "KT", "R"):
        src = kaggle / name
        if name == "R":   # the run without its checkpoints' bulk: copy only what infer reads
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("ckpt_last.pt"))
        else:
            shutil.copytree(src, tmp_path / name)
    path = tmp_path / "KT" / "manifest.json"
    m = json.loads(path.read_text())
    m["columns"].insert(-1, {"name": "label", "kind": "label", "group": "labels", "dtype": "float32",
                             "index": 0, "width": 1, "bins": 0, "transform": "", "weighted": False,
                             "source": "label", "stats": {}})
    path.write_text(json.dumps(m))
    for res in (infer(tmp_path), shard_test(tmp_path)):
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        assert str(Path("KT") / "manifest.json") in res.stderr and "'labels'" in res.stderr
        assert "--force" in res.stderr
    ok(shard_test(tmp_path, "--force"))
    ok(infer(tmp_path))
    assert pl.read_csv(tmp_path / "R" / "demo" / "submission.csv").height == TEST_ROWS
