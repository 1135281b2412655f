"""Score a submission (`ID,<prediction>`) against labelled rows: AP, WLL, Score = 0.5*AP + 0.5/(1+WLL), AUC,
and the same for the true probabilities when a synth truth file is given (what no model can beat).

    python scripts/score_submission.py runs/toss/dare_qnn/submission.csv --labels data/toss/test.parquet \
        --truth data/toss/test.truth.npy

Rows are matched by ID, so a submission in any row order scores the same. Used by toss.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.train.metrics import compute_metrics

KEYS = ("ap", "wll", "score", "auc", "logloss")


def score(submission: Path, labels: Path, truth: Path | None, label: str, id_column: str) -> dict[str, dict]:
    sub = pl.read_csv(submission, infer_schema_length=0)
    id_name, pred_name = sub.columns[:2]
    sub = sub.select(pl.col(id_name).alias("_id"), pl.col(pred_name).cast(pl.Float64).alias("_p"))
    rows = pl.read_parquet(labels, columns=[id_column, label]).with_row_index("_row")
    rows = rows.select(pl.col(id_column).cast(pl.String).alias("_id"), pl.col(label).alias("_y"), "_row")
    joined = rows.join(sub, on="_id", how="left")
    missing = joined["_p"].null_count()
    if missing:
        raise SystemExit(f"error: {submission}: {missing} of {rows.height} labelled IDs have no prediction\n"
                         "  fix: score the submission made for these rows")
    y = joined["_y"].to_numpy().astype(np.float64)
    out = {"submission": compute_metrics(y, joined["_p"].to_numpy())}
    if truth is not None:
        true_p = np.load(truth)
        true_p = true_p[:, 0] if true_p.ndim == 2 else true_p        # column 0: the click probability
        out["oracle"] = compute_metrics(y, true_p[joined["_row"].to_numpy()])
    return {k: {m: round(float(v[m]), 5) for m in KEYS} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("submission", type=Path)
    ap.add_argument("--labels", type=Path, required=True, help="Parquet with the ID and label columns")
    ap.add_argument("--truth", type=Path, help="synth .truth.npy of the same rows (oracle figures)")
    ap.add_argument("--label", default="clicked")
    ap.add_argument("--id-column", default="ID")
    ap.add_argument("--name", default="", help="a name printed before the figures")
    args = ap.parse_args()
    res = score(args.submission, args.labels, args.truth, args.label, args.id_column)
    print(f"{args.name or args.submission}: {json.dumps(res)}")


if __name__ == "__main__":
    main()
