"""toss.sh, the README's Toss-style walk-through, end to end at a tiny size: synth -> shard (K folds,
co-visitation, a shared-id sequence) -> train --kfold (dare_qnn, din) -> infer -> blend, each step scored
beside the oracle. Real processes and files, as a user runs it (the active environment, outputs in tmp)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
STEPS = ["dare_qnn (out-of-fold)", "dare_qnn (test)", "din (out-of-fold)", "din (test)",
         "blend dare_qnn + din (test)"]


def test_toss_walkthrough_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "ROWS": "3000", "TEST_ROWS": "600", "K": "2", "TOSS_DIR": str(tmp_path),
           "CTRPIPE_NO_SETUP": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "200"}
    res = subprocess.run(["bash", str(REPO / "toss.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # a small file trains with a quarter of the configs' batch, or a fold gets too few steps to learn from
    assert "3000 rows: training with loader.batch_size=256" in res.stdout
    scored = {m.group(1): json.loads(m.group(2))
              for m in re.finditer(r"^(.+?): (\{\"(?:submission|out_of_fold)\".*\})$", res.stdout, re.M)}
    assert list(scored) == STEPS
    for name, figures in scored.items():
        oracle = figures["oracle"]
        ours = figures["out_of_fold" if "out-of-fold" in name else "submission"]
        for fig in (ours, oracle):
            assert 0.0 < fig["ap"] <= 1.0 and fig["wll"] > 0.0
            assert abs(fig["score"] - (0.5 * fig["ap"] + 0.5 / (1.0 + fig["wll"]))) < 1e-4
        assert oracle["auc"] > 0.7                     # the synth truth separates clicks: nothing beats it
        if "out-of-fold" in name:                      # calibrated for WLL on these rows: WLL can only fall
            assert figures["calibrated"]["wll"] <= ours["wll"] + 1e-6
            assert figures["calibrated"]["auc"] == ours["auc"]       # an increasing map keeps the order
    runs = tmp_path / "runs" / "toss"
    test_ids = pl.read_parquet(tmp_path / "data" / "toss" / "test.parquet", columns=["ID"])["ID"].cast(pl.String)
    for sub in (runs / "dare_qnn" / "submission.csv", runs / "din" / "submission.csv", runs / "blend.csv"):
        frame = pl.read_csv(sub, infer_schema_length=0)
        assert frame.columns == ["ID", "clicked"] and sorted(frame["ID"]) == sorted(test_ids)
        p = frame["clicked"].cast(pl.Float64)
        assert p.is_between(0.0, 1.0).all()
    assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name]    # no half-written outputs left
