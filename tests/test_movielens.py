"""scripts/movielens_to_parquet.py (MovieLens-100K as a click log, cfgs/movielens.yaml): labels, histories of
earlier liked movies only (never the same second, never the row's own rating), the per-user time split, and a
real shard of its output whose history ids are the candidate's ids."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest

from tests.cli_helpers import run_cli
from tests.shard.helpers import load_all

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from movielens_to_parquet import prepare  # noqa: E402

# user, movie, rating, unix second; user 1's ratings 10 and 11 share a second
RATINGS = [(1, 10, 5, 100), (1, 11, 4, 100), (1, 12, 2, 200), (1, 13, 5, 300), (1, 11 + 3, 3, 400),
           (1, 15, 4, 500), (2, 12, 5, 50), (2, 10, 1, 60), (2, 13, 4, 70), (2, 14, 4, 80), (2, 15, 2, 90)]


def write_ml100k(folder: Path) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in reversed(RATINGS)))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|K2H4J\n")
    genres = ["0"] * 19
    lines = []
    for movie in range(10, 16):
        flags = genres.copy()
        flags[1 + movie % 3] = "1"                           # Action, Adventure or Animation
        lines.append(f"{movie}|Caf\xe9 {movie} (1995)|01-Jan-199{movie % 10}||http://x|" + "|".join(flags))
    (folder / "u.item").write_bytes("\n".join(lines).encode("latin-1") + b"\n")   # as GroupLens ships it
    return folder


def test_histories_hold_earlier_liked_movies_only_and_the_split_is_per_user_by_time(tmp_path: Path) -> None:
    stats = prepare(write_ml100k(tmp_path / "ml-100k"), tmp_path / "out")
    train = pl.read_parquet(tmp_path / "out" / "train.parquet")
    test = pl.read_parquet(tmp_path / "out" / "test.parquet")
    rows = {r["ID"]: r for r in pl.concat([train, test]).iter_rows(named=True)}
    assert len(rows) == len(RATINGS) and stats["train"]["rows"] + stats["test"]["rows"] == len(RATINGS)
    # user 1: movies 10 and 11 (same second, both liked) see no history; 12 sees both; 13 sees 10, 11 (12 was
    # rated 2); the last ones see 13 too
    assert [rows[f"1-{m}"]["seq"] for m in (10, 11, 12, 13, 14, 15)] == ["", "", "10,11", "10,11", "10,11,13",
                                                                         "10,11,13"]
    assert [rows[f"2-{m}"]["seq"] for m in (12, 10, 13, 14, 15)] == ["", "12", "12", "12,13", "12,13,14"]
    assert [rows[f"1-{m}"]["clicked"] for m in (10, 11, 12, 13, 14, 15)] == [1, 1, 0, 1, 0, 1]
    assert rows["1-13"]["num_rated_before"] == 3 and rows["1-13"]["num_liked_before"] == 2
    # each user's latest 20% (6 ratings -> 1, 5 -> 1) are test rows
    assert sorted(test["ID"].to_list()) == ["1-15", "2-15"]
    assert rows["1-10"]["genres"] == "Adventure" and rows["1-10"]["year"] == "1990"
    assert rows["2-12"]["zip3"] == "K2H" and rows["2-12"]["age"] == "5"      # 53: the 50-55 band


def test_its_output_shards_with_the_shipped_config(tmp_path: Path) -> None:
    prepare(write_ml100k(tmp_path / "ml-100k"), tmp_path / "out")
    run_cli("shard", "--cfg", str(REPO / "cfgs" / "movielens.yaml"), "-i", str(tmp_path / "out" / "train.parquet"),
            "--gold", str(tmp_path / "out" / "test.parquet"), "-o", str(tmp_path / "cache"), "-q",
            "--set", "data.split.val_ratio=0")
    arrays = load_all(tmp_path / "cache")
    raw = {r["ID"]: r for r in pl.concat([pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
                                          for name in ("train", "test")]).iter_rows(named=True)}
    rows = [raw[i] for i in arrays["ids"]]                  # the cache's rows, in its order
    item_col = ["user_id", "item_id", "gender", "age", "occupation", "zip3", "year"].index("item_id")
    item_ids = {r["item_id"]: int(i) for r, i in zip(rows, arrays["categorical"][:, item_col], strict=True)}
    assert len(set(item_ids.values())) == len(item_ids) and item_ids["15"] == 1   # 15: in test rows only -> OOV
    for r, tokens in zip(rows, arrays["seq.tokens"], strict=True):
        assert [int(t) for t in tokens if t > 0] == [item_ids[m] for m in r["seq"].split(",") if m], r["ID"]
    assert arrays["seq.tokens"].any()


@pytest.mark.parametrize("missing", ["u.data", "u.user", "u.item"])
def test_a_missing_file_names_it_and_the_download(tmp_path: Path, missing: str) -> None:
    folder = write_ml100k(tmp_path / "ml-100k")
    (folder / missing).unlink()
    with pytest.raises(SystemExit, match=f"{missing}: not found.*ml-100k.zip"):
        prepare(folder, tmp_path / "out")
