"""Landing-data generators: synthetic and MovieLens drops, and the drop helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmrec.data import (
    copy_drop,
    list_drops,
    load_movielens,
    movielens_drops,
    synthetic_drops,
    synthetic_frames,
    write_parquet_atomic,
)
from llmrec.data.drops import drop_path
from llmrec.data.synthetic import GENRES
from llmrec.errors import LlmrecError
from llmrec.schema import EVENTS_SCHEMA

SMALL = dict(users=60, items=80, days=6)


def read(folder: Path, kind: str, tag: str) -> pd.DataFrame:
    return pq.read_table(drop_path(folder, kind, tag)).to_pandas()


@pytest.fixture(scope="module")
def synthetic_landing(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic_drops(out, seed=3, **SMALL)


# --- synthetic -------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds():
    first, again, other = (synthetic_frames(seed=s, **SMALL) for s in (1, 1, 2))
    for name in ("events", "items", "users", "tastes"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name))
    assert not first.events["rating"].equals(other.events["rating"])
    assert not first.items["title"].equals(other.items["title"])


def test_synthetic_drops_are_daily_and_match_the_contract_schema(synthetic_landing):
    out, tags = synthetic_landing
    assert tags == ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05", "2026-01-06"]
    assert list_drops(out) == tags
    expected = EVENTS_SCHEMA.append(pa.field("event_id", pa.string()))
    for tag in tags:
        schema = pq.read_schema(drop_path(out, "events", tag)).remove_metadata()
        assert schema.equals(expected), schema
        events = read(out, "events", tag)
        assert len(events) > 0
        assert events["timestamp"].dt.strftime("%Y-%m-%d").eq(tag).all()
        assert events["rating"].between(1, 5).all() and (events["rating"] % 1 == 0).all()
    items = pq.read_schema(drop_path(out, "items", tags[0]))
    assert items.field("item_id").type == pa.string() and items.field("title").type == pa.string()
    assert {"genres", "description"} <= set(items.names)
    users = pq.read_schema(drop_path(out, "users", tags[0]))
    assert users.field("user_id").type == pa.string()
    # Tastes are latent: nothing in the profile spells them out.
    assert not {"likes", "tastes", "genres"} & set(users.names)


def test_every_event_refers_to_items_and_users_already_landed(synthetic_landing):
    out, tags = synthetic_landing
    items: set[str] = set()
    users: set[str] = set()
    for tag in tags:
        for kind, known in (("items", items), ("users", users)):
            if drop_path(out, kind, tag).exists():
                known.update(read(out, kind, tag)[f"{kind[:-1]}_id"])
        events = read(out, "events", tag)
        assert set(events["item_id"]) <= items, tag
        assert set(events["user_id"]) <= users, tag


def test_new_items_arrive_after_day_one(synthetic_landing):
    out, tags = synthetic_landing
    first = set(read(out, "items", tags[0])["item_id"])
    later = [set(read(out, "items", t)["item_id"]) for t in tags[1:] if drop_path(out, "items", t).exists()]
    assert len(later) >= 3
    assert all(ids and not ids & first for ids in later)
    assert 0.5 <= len(first) / SMALL["items"] <= 0.7
    # New items do get rated on later days.
    rated_later = set().union(*(set(read(out, "events", t)["item_id"]) for t in tags[1:]))
    assert rated_later - first


def test_ratings_follow_latent_tastes_over_genres_read_from_text():
    data = synthetic_frames(seed=5)
    # Genres as a model would read them: from the item's text.
    genres = data.items.set_index("item_id")["genres"].str.split(", ")
    hot = pd.DataFrame([[g in gs for g in GENRES] for gs in genres], index=genres.index, columns=list(GENRES))
    weights = hot.div(hot.sum(axis=1), axis=0)
    events = data.events

    def taste_score(tastes: pd.DataFrame) -> np.ndarray:
        user_tastes = tastes.loc[events["user_id"]].to_numpy()
        return np.einsum("ij,ij->i", user_tastes, weights.loc[events["item_id"]].to_numpy())

    real = np.corrcoef(events["rating"], taste_score(data.tastes))[0, 1]
    shuffled = data.tastes.set_axis(np.random.default_rng(0).permutation(data.tastes.index))
    control = np.corrcoef(events["rating"], taste_score(shuffled))[0, 1]
    assert real > 0.4, real
    assert abs(control) < 0.1, control
    # Per-genre mean ratings differ across users, in line with their taste for that genre.
    for genre in GENRES:
        in_genre = events[hot.loc[events["item_id"], genre].to_numpy()]
        means = in_genre.groupby("user_id")["rating"].agg(["mean", "size"]).query("size >= 5")["mean"]
        assert means.max() - means.min() > 1.5, genre
        assert np.corrcoef(means, data.tastes.loc[means.index, genre])[0, 1] > 0.4, genre


def test_synthetic_default_size_is_fast_and_realistic():
    data = synthetic_frames()
    assert len(data.users) == 300 and len(data.items) == 400
    assert 4_000 < len(data.events) < 20_000
    assert not data.events.duplicated(["user_id", "item_id"]).any()
    assert data.events["timestamp"].is_monotonic_increasing
    # Popular items are rated much more than the median item.
    counts = data.events["item_id"].value_counts()
    assert counts.iloc[:10].mean() > 3 * counts.median()


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"users": 0}, "users"),
        ({"items": -1}, "items"),
        ({"days": 2.5}, "days"),
        ({"seed": -1}, "seed"),
        ({"ratings_per_user_day": 0}, "ratings_per_user_day"),
        ({"start": "not a date"}, "start"),
    ],
)
def test_synthetic_rejects_bad_arguments_naming_them(kwargs, parameter):
    with pytest.raises(LlmrecError, match=parameter):
        synthetic_frames(**kwargs)


# --- drop helpers ----------------------------------------------------------------------


def test_write_parquet_atomic_overwrites_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "events" / "events-x.parquet"
    frame = synthetic_frames(seed=0, **SMALL).events[EVENTS_SCHEMA.names]
    write_parquet_atomic(frame, path, EVENTS_SCHEMA)
    write_parquet_atomic(frame.iloc[:5], path, EVENTS_SCHEMA)
    assert pq.read_table(path).num_rows == 5
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_copy_drop_plays_one_night_into_a_landing_folder(synthetic_landing, tmp_path):
    out, tags = synthetic_landing
    written = copy_drop(out, tags[0], tmp_path)
    assert {p.parent.name for p in written} == {"events", "items", "users"}
    assert list_drops(tmp_path) == [tags[0]]
    for path in written:
        assert path.read_bytes() == (out / path.relative_to(tmp_path)).read_bytes()
    with pytest.raises(LlmrecError, match="1999-01-01"):
        copy_drop(out, "1999-01-01", tmp_path)


def test_list_drops_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(LlmrecError, match="nowhere"):
        list_drops(tmp_path / "nowhere")


# --- MovieLens -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movielens_landing(tmp_path_factory, movielens) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("movielens")
    return out, movielens_drops(movielens, out, period="1D", bootstrap_days=28)


def test_movielens_drops_hold_all_ratings_in_time_order(movielens_landing):
    out, tags = movielens_landing
    assert tags == sorted(set(tags)) == list_drops(out)
    frames = [read(out, "events", t) for t in tags]
    assert sum(len(f) for f in frames) == 100_000
    for tag, events in zip(tags, frames):
        assert pq.read_schema(drop_path(out, "events", tag)).remove_metadata().equals(EVENTS_SCHEMA)
        assert events["timestamp"].max().strftime("%Y-%m-%d") <= tag
    for before, after in zip(frames, frames[1:]):
        assert before["timestamp"].max() <= after["timestamp"].min()


def test_movielens_first_drop_covers_the_bootstrap_days(movielens_landing):
    out, tags = movielens_landing
    first = read(out, "events", tags[0])
    start = pd.Timestamp("1997-09-20", tz="UTC")
    assert first["timestamp"].min().floor("D") == start
    assert first["timestamp"].max() < start + pd.Timedelta(days=28)
    assert tags[0] == "1997-10-17" and tags[1] == "1997-10-18"
    assert read(out, "events", tags[1])["timestamp"].min() >= start + pd.Timedelta(days=28)


def test_movielens_items_and_users_land_where_first_rated(movielens_landing):
    out, tags = movielens_landing
    seen = {"items": {}, "users": {}}
    for tag in tags:
        for kind in seen:
            if drop_path(out, kind, tag).exists():
                for key in read(out, kind, tag)[f"{kind[:-1]}_id"]:
                    assert key not in seen[kind], (kind, key)
                    seen[kind][key] = tag
    assert len(seen["items"]) == 1682 and len(seen["users"]) == 943
    for tag in tags:
        events = read(out, "events", tag)
        assert events["item_id"].map(seen["items"]).le(tag).all()
        # Some item in each items file is rated that night (it was first rated then).
        if drop_path(out, "items", tag).exists():
            assert set(read(out, "items", tag)["item_id"]) <= set(events["item_id"])


def test_movielens_weekly_drops_are_seven_days_apart(tmp_path, movielens):
    tags = movielens_drops(movielens, tmp_path, period="7D", bootstrap_days=14)
    dates = pd.to_datetime(tags)
    assert tags[0] == "1997-10-03"
    assert set(np.diff(dates).astype("timedelta64[D]").astype(int)) == {7}


def test_load_movielens_text_fields(movielens):
    events, items, users = load_movielens(movielens)
    toy_story = items.set_index("item_id").loc["1"]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["genres"] == "Animation, Children's, Comedy"
    assert toy_story["release_date"] == "01-Jan-1995"
    # latin-1 titles decode.
    assert "Misérables, Les (1995)" in set(items["title"])
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", "zip"]
    assert pd.api.types.is_string_dtype(events["item_id"]) and events["rating"].dtype == "float64"


# --- MovieLens errors, on tiny hand-written files (no real data needed) ----------------


def tiny_movielens(folder: Path, with_users: bool) -> Path:
    folder.mkdir()
    (folder / "u.data").write_text("1\t10\t4\t881250949\n2\t10\t2\t881250950\n2\t11\t5\t884250950\n")
    genres = ["unknown", "Action", "Comedy"]
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)) + "\n")
    (folder / "u.item").write_bytes(
        "10|Caf\u00e9 (1995)|01-Jan-1995||http://x|0|1|1\n11|Quiet (1996)|||http://y|1|0|0\n".encode("latin-1")
    )
    if with_users:
        (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    return folder


def test_movielens_without_u_user_gives_ids_only(tmp_path):
    events, items, users = load_movielens(tiny_movielens(tmp_path / "ml", with_users=False))
    assert list(users.columns) == ["user_id"] and list(users["user_id"]) == ["1", "2"]
    assert list(items["title"]) == ["Café (1995)", "Quiet (1996)"]
    assert items["genres"].iloc[0] == "Action, Comedy" and pd.isna(items["genres"].iloc[1])
    tags = movielens_drops(tmp_path / "ml", tmp_path / "out", bootstrap_days=1)
    assert tags == ["1997-12-04", "1998-01-08"]
    assert list(read(tmp_path / "out", "users", tags[0]).columns) == ["user_id"]
    assert list(read(tmp_path / "out", "items", tags[1])["item_id"]) == ["11"]


def test_movielens_users_keep_zip_as_text(tmp_path):
    _, _, users = load_movielens(tiny_movielens(tmp_path / "ml", with_users=True))
    assert list(users["zip"]) == ["85711", "T8H1N"] and users["age"].dtype == "int64"


@pytest.mark.parametrize("period", ["1W", "daily", "2D"])
def test_movielens_rejects_unknown_period(tmp_path, period):
    with pytest.raises(LlmrecError, match=r"period.*1D.*7D"):
        movielens_drops(tiny_movielens(tmp_path / "ml", with_users=True), tmp_path / "out", period=period)


def test_movielens_missing_source_or_file_names_the_path(tmp_path):
    with pytest.raises(LlmrecError, match="no-such-folder"):
        load_movielens(tmp_path / "no-such-folder")
    folder = tiny_movielens(tmp_path / "ml", with_users=True)
    (folder / "u.item").unlink()
    with pytest.raises(LlmrecError, match=r"u\.item"):
        movielens_drops(folder, tmp_path / "out")
