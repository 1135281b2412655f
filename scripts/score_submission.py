"""Score a submission (`ID,<prediction>`) against labelled rows: AP, WLL, Score = 0.5*AP + 0.5/(1+WLL), AUC,
and the same for the true probabilities when a synth truth file is given (the oracle: no model beats its AUC or
logloss on average; a calibration fitted for WLL can beat its WLL, which the true probabilities do not minimise).

    python scripts/score_submission.py runs/toss/dare_qnn/submission.csv --labels data/toss/test.parquet \
        --truth data/toss/test.truth.npy
    # a K-fold run's out-of-fold predictions (oof.npz) instead, raw and with the run's calibration.json
    # applied (fitted on these same rows, so in-sample), beside the oracle on the same train rows:
    python scripts/score_submission.py --oof runs/toss/dare_qnn --shards shards/toss \
        --labels data/toss/train.parquet --truth data/toss/train.truth.npy

Rows are matched by ID, so a submission in any row order scores the same. The submission is read with the
checks `ctrpipe blend` makes (a missing, non-numeric, NaN or out-of-[0, 1] prediction, a duplicate ID: each an
error naming its line). Used by toss.sh.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from ctrpipe.train.metrics import compute_metrics, sigmoid

KEYS = ("ap", "wll", "score", "auc", "logloss")


def score(submission: Path, labels: Path, truth: Path | None, label: str, id_column: str) -> dict[str, dict]:
    from ctrpipe.errors import CtrpipeError
    from ctrpipe.infer.submission import iter_submission, line_of

    try:
        chunks = list(iter_submission(Path(submission)))
    except CtrpipeError as exc:
        raise SystemExit(f"error: {exc}") from None
    ids = pl.concat([pl.Series("_id", c.ids) for c in chunks]) if chunks else pl.Series("_id", [], pl.String)
    twice = ids.is_duplicated().to_numpy()
    if twice.any():
        rows = np.flatnonzero(twice)
        first = ids[int(rows[0])]
        lines = [line_of(int(r)) for r in rows if ids[int(r)] == first][:2]
        raise SystemExit(f"error: {submission}: duplicate ID {first!r} (lines {lines[0]} and {lines[1]})\n"
                         "  fix: one prediction per ID; score the submission ctrpipe infer wrote")
    preds = pl.DataFrame({"_id": ids.cast(pl.String),
                          "submission": np.concatenate([c.preds for c in chunks]) if chunks else np.zeros(0)})
    return score_frame(preds, labels, truth, label, id_column, where=str(submission), subset=False)


def score_frame(preds: pl.DataFrame, labels: Path, truth: Path | None, label: str, id_column: str, where: str,
                subset: bool) -> dict[str, dict]:
    """Metrics of each prediction column of `preds` (`_id` + columns of probabilities) on the labelled rows it
    names (`subset`: only those; else every labelled row must have a prediction), and the oracle's on them."""
    rows = pl.read_parquet(labels, columns=[id_column, label]).with_row_index("_row")
    rows = rows.select(pl.col(id_column).cast(pl.String).alias("_id"), pl.col(label).alias("_y"), "_row")
    joined = rows.join(preds, on="_id", how="inner" if subset else "left")
    names = [c for c in preds.columns if c != "_id"]
    missing = joined[names[0]].null_count()
    if missing:
        raise SystemExit(f"error: {where}: {missing} of {rows.height} labelled IDs have no prediction\n"
                         "  fix: score the submission made for these rows")
    if joined.height < preds.height:
        raise SystemExit(f"error: {where}: {preds.height - joined.height} of {preds.height} predicted IDs are not "
                         f"in {labels}\n  fix: score against the file the cache was built from")
    y = joined["_y"].to_numpy().astype(np.float64)
    out = {name: compute_metrics(y, joined[name].to_numpy()) for name in names}
    if truth is not None:
        true_p = np.load(truth)
        true_p = true_p[:, 0] if true_p.ndim == 2 else true_p        # column 0: the click probability
        out["oracle"] = compute_metrics(y, true_p[joined["_row"].to_numpy()])
    return {k: {m: round(float(v[m]), 5) for m in KEYS} for k, v in out.items()}


def oof_predictions(run: Path, shards: Path, label: str) -> pl.DataFrame:
    """`_id`, `out_of_fold` (raw) and, where the run has calibration.json, `calibrated` probabilities of every
    out-of-fold row of a K-fold run; IDs come from the cache (oof.npz holds cache row numbers)."""
    from ctrpipe.infer.calibrate import CALIBRATION_NAME, read_calibration
    from ctrpipe.shard.reader import open_cache

    with np.load(run / "oof.npz") as npz:
        rows, logits = npz["row_index"], np.asarray(npz["logits"], dtype=np.float64)
        names = [str(n) for n in npz["label_names"]] if "label_names" in npz.files else [label]
    if label not in names:
        raise SystemExit(f"error: {run}: the run predicts {names}, not {label!r}\n  fix: pass --label with one of them")
    task = names.index(label)
    logits = logits.reshape(len(rows), -1)[:, task]
    ids = open_cache(shards, groups=("ids",)).take("ids", rows)          # oof rows are ascending
    out = pl.DataFrame({"_id": pl.Series(ids).cast(pl.String), "out_of_fold": sigmoid(logits)})
    cal_path = run / CALIBRATION_NAME
    if cal_path.is_file():
        cals, _ = read_calibration(cal_path)
        out = out.with_columns(pl.Series("calibrated", sigmoid(cals[task].apply(logits))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("submission", type=Path, nargs="?", help="ID,prediction CSV (or --oof)")
    ap.add_argument("--oof", type=Path, help="a K-fold run directory: score its out-of-fold predictions")
    ap.add_argument("--shards", type=Path, help="with --oof: the train cache the run trained on (its IDs)")
    ap.add_argument("--labels", type=Path, required=True, help="Parquet with the ID and label columns")
    ap.add_argument("--truth", type=Path, help="synth .truth.npy of the same rows (oracle figures)")
    ap.add_argument("--label", default="clicked")
    ap.add_argument("--id-column", default="ID")
    ap.add_argument("--name", default="", help="a name printed before the figures")
    args = ap.parse_args()
    if (args.oof is None) == (args.submission is None) or (args.oof is not None and args.shards is None):
        ap.error("give a submission, or --oof RUN with --shards CACHE")
    if args.oof is not None:
        preds = oof_predictions(args.oof, args.shards, args.label)
        res = score_frame(preds, args.labels, args.truth, args.label, args.id_column, where=str(args.oof),
                          subset=True)
    else:
        res = score(args.submission, args.labels, args.truth, args.label, args.id_column)
    print(f"{args.name or args.submission or args.oof}: {json.dumps(res)}")


if __name__ == "__main__":
    main()
