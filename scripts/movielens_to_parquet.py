"""MovieLens-100K -> a click log with behaviour histories, as two Parquet files cfgs/movielens.yaml reads.

    python scripts/movielens_to_parquet.py PATH/ml-100k OUT      # OUT/train.parquet, OUT/test.parquet
    ctrpipe shard --cfg cfgs/movielens.yaml -i OUT/train.parquet --gold OUT/test.parquet -o shards/movielens

PATH/ml-100k is the unzipped https://files.grouplens.org/datasets/movielens/ml-100k.zip (u.data, u.item,
u.user); its licence allows research use but not redistribution, so ctrpipe ships no copy.

One row per rating; clicked = rating >= 4. Columns: ID (user-item), user_id, the candidate movie item_id, the
user's gender, age band (MovieLens-1M's: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), occupation and
3-digit zip prefix, the movie's release year and genres ("|"-separated), num_rated_before and
num_liked_before (the user's earlier ratings and earlier ratings >= 4), and seq: the movies the user rated >= 4
at an earlier second, most recent last (the latest 200), in item_id's id space. Only earlier seconds count, so
no row's history holds its own label or a rating given in the same second. Split per user by time: each
user's latest 20% of ratings (rounded down; by timestamp, ties by movie id) are test.parquet, the rest
train.parquet; rows in both are ordered by user, then time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western")
AGE_BANDS = (18, 25, 35, 45, 50, 56)        # MovieLens-1M's bands: under 18, 18-24, ..., 56+
HISTORY_IN_FILE = 200
TEST_SHARE = 0.2


def read_movielens(ml: Path) -> tuple[pl.DataFrame, dict]:
    """u.data joined with u.user and u.item; ratings of users u.user does not list are dropped and counted
    (some copies of u.data carry extra rows)."""
    for name in ("u.data", "u.user", "u.item"):
        if not (ml / name).is_file():
            raise SystemExit(f"{ml / name}: not found. Fix: pass the folder of the unzipped "
                             "https://files.grouplens.org/datasets/movielens/ml-100k.zip (u.data, u.item, u.user)")
    try:
        ratings = pl.read_csv(ml / "u.data", separator="\t", has_header=False,
                              new_columns=["user", "item", "rating", "ts"],
                              schema_overrides=[pl.Int64, pl.Int64, pl.Int64, pl.Int64])
        users = pl.read_csv(ml / "u.user", separator="|", has_header=False,
                            new_columns=["user", "age_years", "gender", "occupation", "zip"],
                            schema_overrides=[pl.Int64, pl.Int64, pl.Utf8, pl.Utf8, pl.Utf8])
    except pl.exceptions.PolarsError as err:
        raise SystemExit(f"{ml}: u.data (user, item, rating, second; tab-separated) or u.user (user|age|gender|"
                         f"occupation|zip) is not in the GroupLens layout: {err}. Fix: use the files of "
                         "ml-100k.zip unchanged") from err
    # u.item is Latin-1 (titles); only its id, release date and 19 genre flags are used
    item_rows = [line.split("|") for line in (ml / "u.item").read_text(encoding="latin-1").splitlines()]
    for n, r in enumerate(item_rows, 1):
        if len(r) != 5 + len(GENRES) or not r[0].isdigit():
            raise SystemExit(f"{ml / 'u.item'}, line {n}: {len(r)} '|'-separated fields, expected "
                             f"{5 + len(GENRES)} (id|title|release date|video date|url|19 genre flags). Fix: use "
                             "the u.item of ml-100k.zip unchanged")
    items = pl.DataFrame({
        "item": [int(r[0]) for r in item_rows],
        "year": [r[2][-4:] if r[2] else "unknown" for r in item_rows],
        "genres": ["|".join(g for g, flag in zip(GENRES, r[5:24], strict=True) if flag == "1") or "unknown"
                   for r in item_rows],
    })
    n = ratings.height
    df = ratings.join(users, on="user", how="inner").join(items, on="item", how="inner")
    return df, {"ratings_in_file": n, "dropped_unknown_user_or_item": n - df.height}


def liked_histories(df: pl.DataFrame) -> pl.DataFrame:
    """Adds seq (the movies the user rated >= 4 at an earlier second, most recent last, at most
    HISTORY_IN_FILE), num_rated_before and num_liked_before. `df` is sorted by (user, ts, item)."""
    user = df["user"].to_numpy()
    ts = df["ts"].to_numpy()
    liked = df["rating"].to_numpy() >= 4
    key = user * (1 << 32) + ts          # one sortable key per (user, second); ts < 2^32
    liked_key, liked_item = key[liked], df["item"].to_numpy()[liked]
    end = np.searchsorted(liked_key, key, side="left")                # liked rows strictly before, any user
    first = np.searchsorted(liked_key, user * (1 << 32), side="left")  # the user's first liked row
    start = np.maximum(first, end - HISTORY_IN_FILE)
    rated_first = np.searchsorted(key, user * (1 << 32), side="left")
    rated_before = np.searchsorted(key, key, side="left") - rated_first
    tokens = liked_item.astype(str)
    seq = [",".join(tokens[s:e]) for s, e in zip(start.tolist(), end.tolist(), strict=True)]
    return df.with_columns(pl.Series("seq", seq), pl.Series("num_rated_before", rated_before.astype(np.float32)),
                           pl.Series("num_liked_before", (end - first).astype(np.float32)))


def prepare(ml: Path, out: Path) -> dict:
    """ml-100k -> out/{train,test}.parquet (the columns cfgs/movielens.yaml reads); returns their statistics."""
    df, stats = read_movielens(ml)
    df = df.sort(["user", "ts", "item"])
    df = liked_histories(df)
    # per-user time split: the latest TEST_SHARE of each user's ratings are gold
    rank = df.select(pl.int_range(pl.len()).over("user").alias("r"), pl.len().over("user").alias("n"))
    is_test = (rank["r"] >= (rank["n"] * (1 - TEST_SHARE)).ceil().cast(pl.Int64)).to_numpy()
    bands = np.searchsorted(np.asarray(AGE_BANDS), df["age_years"].to_numpy(), side="right")
    table = df.select(
        pl.format("{}-{}", "user", "item").alias("ID"),
        (pl.col("rating") >= 4).cast(pl.Int8).alias("clicked"),
        pl.col("user").cast(pl.Utf8).alias("user_id"),
        pl.col("item").cast(pl.Utf8).alias("item_id"),
        "gender", "occupation", pl.col("zip").str.slice(0, 3).alias("zip3"), "year", "genres", "seq",
        "num_rated_before", "num_liked_before",
    ).with_columns(pl.Series("age", bands.astype(str)))
    out.mkdir(parents=True, exist_ok=True)
    for name, mask in (("train", ~is_test), ("test", is_test)):
        part = table.filter(pl.Series(mask))
        tmp = out / f".{name}.parquet.tmp"
        part.write_parquet(tmp, row_group_size=50_000)
        tmp.replace(out / f"{name}.parquet")
        hist = part["seq"].str.count_matches(",") + (part["seq"].str.len_bytes() > 0).cast(pl.UInt32)
        stats[name] = {"rows": part.height, "pos_rate": float(part["clicked"].mean()),
                       "users": part["user_id"].n_unique(), "items": part["item_id"].n_unique(),
                       "history_mean": float(hist.mean()), "history_median": float(hist.median()),
                       "history_empty": float((hist == 0).mean()), "history_at_50_or_more": float((hist >= 50).mean())}
    (out / "prepared.json").write_text(json.dumps(stats, indent=1))
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ml100k", type=Path, help="the unzipped ml-100k folder (u.data, u.item, u.user)")
    ap.add_argument("out", type=Path, help="folder for train.parquet, test.parquet and prepared.json")
    args = ap.parse_args(argv)
    print(json.dumps(prepare(args.ml100k, args.out), indent=1))


if __name__ == "__main__":
    main()
