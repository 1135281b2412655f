"""scripts/score_submission.py (toss.sh's scorer): rows matched by ID in any order, the oracle's figures from
a truth file, and a clear error for a submission that misses labelled IDs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ctrpipe.train.metrics import average_precision, weighted_logloss

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from score_submission import score  # noqa: E402


def test_scores_by_id_in_any_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.random(200) * 0.7, 0.01, 0.99)
    truth = np.clip(0.5 * y + 0.25, 0.01, 0.99)
    ids = [f"r{i}" for i in range(200)]
    pl.DataFrame({"ID": ids, "clicked": y}).write_parquet(tmp_path / "rows.parquet")
    np.save(tmp_path / "truth.npy", np.stack([truth, truth * 0.1], axis=1))
    order = rng.permutation(200)
    pl.DataFrame({"ID": [ids[i] for i in order], "clicked": p[order]}).write_csv(tmp_path / "sub.csv")
    res = score(tmp_path / "sub.csv", tmp_path / "rows.parquet", tmp_path / "truth.npy", "clicked", "ID")
    ap, wll = average_precision(y, p), weighted_logloss(y, p)
    assert res["submission"]["ap"] == pytest.approx(ap, abs=1e-5)
    assert res["submission"]["score"] == pytest.approx(0.5 * ap + 0.5 / (1 + wll), abs=1e-5)
    assert res["oracle"]["ap"] == pytest.approx(average_precision(y, truth), abs=1e-5)


def test_missing_ids_are_an_error(tmp_path: Path) -> None:
    pl.DataFrame({"ID": ["a", "b"], "clicked": [0, 1]}).write_parquet(tmp_path / "rows.parquet")
    pl.DataFrame({"ID": ["a"], "clicked": [0.2]}).write_csv(tmp_path / "sub.csv")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "score_submission.py"), str(tmp_path / "sub.csv"),
                          "--labels", str(tmp_path / "rows.parquet")], capture_output=True, text=True)
    assert res.returncode != 0 and "1 of 2 labelled IDs have no prediction" in res.stderr


@pytest.mark.parametrize(("rows", "needle"), [
    ("a,0.2\nb,0.7\na,0.9\n", "duplicate ID 'a' (lines 2 and 4)"),
    ("a,0.2\nb,1.7\n", "outside [0, 1]"),
    ("a,0.2\nb,nan\n", "non-numeric prediction 'nan'"),
    ("a,0.2\nb,\n", "missing prediction"),
])
def test_a_bad_submission_is_refused_naming_its_line(tmp_path: Path, rows: str, needle: str) -> None:
    """Duplicates, NaN, values above 1 and empty values were scored (clipped or NaN figures) without a word
    (helper's infer sweep): the scorer reads the file with blend's checks."""
    pl.DataFrame({"ID": ["a", "b"], "clicked": [0, 1]}).write_parquet(tmp_path / "rows.parquet")
    (tmp_path / "sub.csv").write_text("ID,clicked\n" + rows)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "score_submission.py"), str(tmp_path / "sub.csv"),
                          "--labels", str(tmp_path / "rows.parquet")], capture_output=True, text=True)
    assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
