"""MovieLens-100k as landing data: load the raw files into contract frames, and cut them
into nightly drops so the flow can be replayed night by night on real ratings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmrec.data.drops import DROP, drop_index, write_drops
from llmrec.errors import LlmrecError

PERIODS = ("1D", "7D")
# The raw item and genre files are latin-1 (titles such as "Misérables, Les").
ENCODING = "latin-1"
# u.genre's "unknown" flag means "no genre known", not a genre a model should read.
NO_GENRE = "unknown"


def _require(folder: Path, name: str, what: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise LlmrecError(f"MovieLens file {path} is missing: expected {what}")
    return path


def _events(path: Path) -> pd.DataFrame:
    raw = pd.read_csv(path, sep="\t", header=None, names=["user", "item", "rating", "unixtime"], dtype="int64")
    events = pd.DataFrame(
        {
            "user_id": raw["user"].astype(str),
            "item_id": raw["item"].astype(str),
            "rating": raw["rating"].astype("float64"),
            "timestamp": pd.to_datetime(raw["unixtime"], unit="s", utc=True).astype("datetime64[us, UTC]"),
        }
    )
    # Ties in time are common (one user rates many films in a second): break them stably.
    return events.sort_values(["timestamp", "user_id", "item_id"], kind="stable", ignore_index=True)


def _genre_names(path: Path) -> list[str]:
    genres = pd.read_csv(path, sep="|", header=None, names=["name", "index"], encoding=ENCODING)
    return genres.sort_values("index")["name"].astype(str).tolist()


def _items(path: Path, genre_names: list[str]) -> pd.DataFrame:
    columns = ["item", "title", "release_date", "video_release_date", "imdb_url", *genre_names]
    raw = pd.read_csv(path, sep="|", header=None, names=columns, encoding=ENCODING, dtype=str, keep_default_na=False)
    flags = raw[[g for g in genre_names if g != NO_GENRE]] == "1"
    genres = flags.apply(lambda row: ", ".join(row.index[row]), axis=1)
    return pd.DataFrame(
        {
            "item_id": raw["item"],
            "title": raw["title"],
            "genres": genres.replace("", None),
            "release_date": raw["release_date"].replace("", None),
        }
    )


def _users(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep="|",
        header=None,
        names=["user_id", "age", "gender", "occupation", "zip"],
        # zip codes stay text: some have leading zeros, some are Canadian ("T8H1N").
        dtype={"user_id": str, "age": "int64", "gender": str, "occupation": str, "zip": str},
        encoding=ENCODING,
    )


def load_movielens(source: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read a MovieLens-100k folder into (events, items, users) frames in the landing
    contract. Events are sorted by time; items carry title, genres (comma-joined) and
    release_date; users carry age, gender, occupation and zip when u.user exists, and
    only user_id (from the ratings) when it does not."""
    folder = Path(source)
    if not folder.is_dir():
        raise LlmrecError(f"MovieLens folder {folder} does not exist: expected the unpacked ml-100k folder")
    events = _events(_require(folder, "u.data", "tab-separated ratings 'user item rating unixtime'"))
    genre_names = _genre_names(_require(folder, "u.genre", "'|'-separated genre names 'name|index'"))
    item_file = _require(folder, "u.item", "'|'-separated items 'id|title|release date|...|19 genre flags'")
    items = _items(item_file, genre_names)
    user_file = folder / "u.user"
    if user_file.is_file():
        users = _users(user_file)
    else:
        users = pd.DataFrame({"user_id": pd.Series(sorted(events["user_id"].unique(), key=int), dtype=str)})
    return events, items, users


def _first_tags(ids: pd.Series, tags: pd.Series) -> pd.Series:
    """The tag of the first drop each id appears in (rows must be in time order)."""
    return tags.groupby(ids.values, sort=False).first()


def movielens_drops(source: str | Path, out: str | Path, period: str = "1D", bootstrap_days: int = 28) -> list[str]:
    """Write MovieLens-100k as drops under `out`: the first drop holds the first
    `bootstrap_days` days (UTC), then one drop per `period` ("1D" or "7D"); periods with
    no ratings get no drop. Each drop is tagged with the date of its last day, and
    items and users land in the drop where they are first rated. Returns the tags in order."""
    if period not in PERIODS:
        raise LlmrecError(f"period must be one of {PERIODS}, got {period!r}")
    if isinstance(bootstrap_days, bool) or not isinstance(bootstrap_days, int) or bootstrap_days < 1:
        raise LlmrecError(f"bootstrap_days must be a positive whole number of days, got {bootstrap_days!r}")
    events, items, users = load_movielens(source)

    first_day = events["timestamp"].dt.floor("D").min()
    step = int(period[:-1])
    index = drop_index(events["timestamp"], step, bootstrap_days)
    last_day = first_day + pd.to_timedelta(bootstrap_days - 1 + (index + 1) * step, unit="D")
    events[DROP] = last_day.dt.strftime("%Y-%m-%d")

    item_tags = _first_tags(events["item_id"], events[DROP])
    user_tags = _first_tags(events["user_id"], events[DROP])
    # Catalog and profile rows nobody rated would never be read; they land with no drop.
    items = items.assign(**{DROP: items["item_id"].map(item_tags)}).dropna(subset=[DROP])
    users = users.assign(**{DROP: users["user_id"].map(user_tags)}).dropna(subset=[DROP])
    return write_drops(out, events, items, users)
