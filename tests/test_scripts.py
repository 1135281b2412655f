"""train.sh and infer.sh run from another folder: the paths a user gives (SHARDS, RUN, --runs) are taken from that
folder, as shard.sh takes --input. train.sh changed into the repository first, so `SHARDS=sh ./train.sh` from the
folder holding sh/ said there was no cache. Real processes on a small real cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ctrpipe.cli import app

REPO = Path(__file__).resolve().parents[1]
SMALL = ["loader.batch_size=64", "model.hidden_units=[8]", "model.embedding_dim=4", "train.epochs=1",
         "train.min_steps=0", "train.evals_per_epoch=1", "data.hash_bins=64", "exp_name=from_here"]


def test_wrapper_scripts_take_given_paths_from_the_callers_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--rows", "600", "--out", str(tmp_path / "data"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["shard", "--cfg", str(REPO / "cfgs" / "criteo.yaml"), "--input",
                              str(tmp_path / "data" / "train.tsv"), "--out", str(tmp_path / "sh"), "-q",
                              "--set", "data.hash_bins=64"])
    assert res.exit_code == 0, res.output
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "SHARDS": "sh"}
    sets = [x for s in SMALL for x in ("--set", s)]
    train = subprocess.run([str(REPO / "train.sh"), "--runs", "runs", "-q", *sets], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert (tmp_path / "runs" / "from_here" / "metrics.json").is_file()
    infer = subprocess.run([str(REPO / "infer.sh"), "--set", "infer.view=val", "--out", "val.csv", "-q"],
                           cwd=tmp_path, env={**env, "RUN": "runs/from_here"}, capture_output=True, text=True,
                           timeout=600)
    assert infer.returncode == 0, infer.stdout + infer.stderr
    assert (tmp_path / "val.csv").is_file()
