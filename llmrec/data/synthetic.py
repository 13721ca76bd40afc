"""Synthetic landing data with structure a text-reading recommender can learn.

Each rating is clip(round(mu + user bias + item quality + taste_u(day) . genres_i + noise), 1, 5):
items show their genres only as text, users' tastes over genres are latent (never written)
and drift slowly, and profiles hint at taste only through occupation. About 60% of the
catalog exists on day 1; the rest arrives over the following days. Popular items are rated
more. Everything is drawn from one seeded generator, so a seed gives the same data.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from llmrec.data.drops import DROP, write_drops
from llmrec.errors import LlmrecError

GENRES = (
    "Action", "Comedy", "Drama", "Romance", "Thriller", "Horror",
    "Sci-Fi", "Fantasy", "Documentary", "Animation", "Mystery", "Western",
)  # fmt: skip
OCCUPATIONS = (
    "student", "engineer", "teacher", "nurse", "artist", "writer",
    "lawyer", "programmer", "retired", "salesman", "scientist", "homemaker",
)  # fmt: skip
ADJECTIVES = (
    "Silent", "Crimson", "Last", "Hidden", "Broken", "Golden", "Distant", "Midnight",
    "Lost", "Electric", "Frozen", "Wild", "Secret", "Burning", "Quiet", "Final",
)  # fmt: skip
NOUNS = (
    "Harbor", "Empire", "Garden", "Signal", "River", "Crown", "Machine", "Orchard",
    "Frontier", "Letter", "Mirror", "Storm", "Kingdom", "Station", "Promise", "Shadow",
)  # fmt: skip
MOODS = ("gritty", "gentle", "sprawling", "tense", "playful", "haunting", "warm", "bleak")
SUBJECTS = (
    "a retired detective", "two estranged sisters", "a stubborn inventor", "a small-town band",
    "a lost expedition", "an unlikely friendship", "a family secret", "a stolen map",
)  # fmt: skip

MEAN_RATING = 3.6
NEW_ITEM_SHARE = 0.4  # of the catalog, arriving after day 1
NEW_USER_SHARE = 0.1  # of the users, joining after day 1


class SyntheticData(NamedTuple):
    """Landing frames (each with a `_drop` tag column) plus the latent day-1 tastes,
    which are never written and exist so tests can check the signal is learnable."""

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    tastes: pd.DataFrame  # user_id index x GENRES columns


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LlmrecError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _start_date(start: str) -> pd.Timestamp:
    try:
        date = pd.Timestamp(start)
    except (TypeError, ValueError) as error:
        raise LlmrecError(f"start must be a date such as '2026-01-01', got {start!r}") from error
    if date.tzinfo is None:
        date = date.tz_localize("UTC")
    return date.tz_convert("UTC").floor("D")


def _arrival_days(rng: np.random.Generator, count: int, days: int, later_share: float) -> np.ndarray:
    """Day each of `count` entities first exists: most on day 0, the rest spread over the
    following days (everything on day 0 when there is only one day)."""
    arrival = np.zeros(count, dtype=int)
    if days > 1:
        later = rng.permutation(count)[: int(round(later_share * count))]
        arrival[later] = rng.integers(1, days, size=len(later))
    return arrival


def _items(rng: np.random.Generator, count: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Catalog text, plus latent genre weights (rows sum to 1), quality and log-popularity."""
    n_genres = rng.choice([1, 2, 3], size=count, p=[0.4, 0.4, 0.2])
    genre_sets = [np.sort(rng.choice(len(GENRES), size=n, replace=False)) for n in n_genres]
    weights = np.zeros((count, len(GENRES)))
    for row, genres in enumerate(genre_sets):
        weights[row, genres] = 1.0 / len(genres)
    quality = rng.normal(0.0, 0.4, size=count)
    # Better items are somewhat more popular, as in real catalogs.
    log_popularity = rng.normal(0.0, 1.0, size=count) + 0.8 * quality
    adjective = rng.choice(ADJECTIVES, size=count)
    noun = rng.choice(NOUNS, size=count)
    mood = rng.choice(MOODS, size=count)
    subject = rng.choice(SUBJECTS, size=count)
    year = rng.integers(1960, 2026, size=count)
    frame = pd.DataFrame(
        {
            "item_id": [f"i{n:05d}" for n in range(count)],
            "title": [f"The {a} {n}" for a, n in zip(adjective, noun)],
            "genres": [", ".join(GENRES[g] for g in genres) for genres in genre_sets],
            "year": year.astype(str),
            "description": [
                f"A {m} {GENRES[g[0]].lower()} story about {s}." for m, g, s in zip(mood, genre_sets, subject)
            ],
        }
    )
    return frame, weights, quality, log_popularity


def _users(rng: np.random.Generator, count: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Profiles, plus latent tastes over genres, rating bias and activity (mean 1)."""
    occupation = rng.integers(len(OCCUPATIONS), size=count)
    # Occupation shifts taste a little, so profile text helps with new users without
    # giving tastes away.
    occupation_taste = rng.normal(0.0, 0.4, size=(len(OCCUPATIONS), len(GENRES)))
    tastes = occupation_taste[occupation] + rng.normal(0.0, 0.8, size=(count, len(GENRES)))
    bias = rng.normal(0.0, 0.3, size=count)
    activity = rng.lognormal(-0.18, 0.6, size=count)
    frame = pd.DataFrame(
        {
            "user_id": [f"u{n:05d}" for n in range(count)],
            "age": rng.integers(18, 76, size=count).astype("int64"),
            "gender": rng.choice(["F", "M"], size=count),
            "occupation": np.asarray(OCCUPATIONS)[occupation],
        }
    )
    return frame, tastes, bias, activity


def synthetic_frames(
    users: int = 300,
    items: int = 400,
    days: int = 14,
    seed: int = 0,
    ratings_per_user_day: float = 2.0,
    drift: float = 0.05,
    start: str = "2026-01-01",
) -> SyntheticData:
    """Generate `days` days of ratings by `users` users over `items` items, deterministic
    in `seed`. Each user rates on average `ratings_per_user_day` new items a day (more for
    active users), never the same item twice; tastes take a daily random step of size
    `drift`. Rows are tagged with their drop (the date, from `start`) in `_drop`."""
    users = _positive_int("users", users)
    items = _positive_int("items", items)
    days = _positive_int("days", days)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LlmrecError(f"seed must be a non-negative whole number, got {seed!r}")
    if not ratings_per_user_day > 0:
        raise LlmrecError(f"ratings_per_user_day must be positive, got {ratings_per_user_day!r}")
    if not drift >= 0:
        raise LlmrecError(f"drift must be zero or positive, got {drift!r}")
    first_day = _start_date(start)

    rng = np.random.default_rng(seed)
    item_frame, genre_weights, quality, log_popularity = _items(rng, items)
    user_frame, tastes, bias, activity = _users(rng, users)
    item_day = _arrival_days(rng, items, days, NEW_ITEM_SHARE)
    user_day = _arrival_days(rng, users, days, NEW_USER_SHARE)

    rated = np.zeros((users, items), dtype=bool)
    taste = tastes.copy()
    parts = []
    for day in range(days):
        if day:
            taste = taste + rng.normal(0.0, drift, size=taste.shape)
        # Sampling without replacement in proportion to popularity, for every user at once:
        # the top-k of log-weight + Gumbel noise (items not out yet or already rated excluded).
        log_weight = np.where((item_day <= day)[None, :] & ~rated, log_popularity[None, :], -np.inf)
        order = np.argsort(-(log_weight + rng.gumbel(size=log_weight.shape)), axis=1, kind="stable")
        wanted = rng.poisson(ratings_per_user_day * activity) * (user_day <= day)
        counts = np.minimum(wanted, np.isfinite(log_weight).sum(axis=1))
        user_index, rank = np.nonzero(np.arange(items)[None, :] < counts[:, None])
        item_index = order[user_index, rank]
        rated[user_index, item_index] = True

        signal = (
            MEAN_RATING
            + bias[user_index]
            + quality[item_index]
            + np.einsum("ij,ij->i", taste[user_index], genre_weights[item_index])
        )
        noisy = signal + rng.normal(0.0, 0.5, size=len(signal))
        seconds = rng.integers(0, 86_400, size=len(signal))
        parts.append(
            pd.DataFrame(
                {
                    "user_id": user_frame["user_id"].to_numpy()[user_index],
                    "item_id": item_frame["item_id"].to_numpy()[item_index],
                    "rating": np.clip(np.round(noisy), 1, 5).astype("float64"),
                    "timestamp": first_day + pd.to_timedelta(day * 86_400 + seconds, unit="s"),
                }
            )
        )

    events = pd.concat(parts, ignore_index=True)
    events["timestamp"] = events["timestamp"].astype("datetime64[us, UTC]")
    events = events.sort_values(["timestamp", "user_id", "item_id"], kind="stable", ignore_index=True)
    events["event_id"] = [f"s{seed}-{n:07d}" for n in range(len(events))]
    events[DROP] = events["timestamp"].dt.strftime("%Y-%m-%d")

    day_tags = (first_day + pd.to_timedelta(np.arange(days), unit="D")).strftime("%Y-%m-%d")
    item_frame[DROP] = np.asarray(day_tags)[item_day]
    user_frame[DROP] = np.asarray(day_tags)[user_day]
    taste_frame = pd.DataFrame(tastes, index=pd.Index(user_frame["user_id"], name="user_id"), columns=list(GENRES))
    return SyntheticData(events, item_frame, user_frame, taste_frame)


def synthetic_drops(
    out: str | Path, users: int = 300, items: int = 400, days: int = 14, seed: int = 0, start: str = "2026-01-01"
) -> list[str]:
    """Write `days` daily drops of synthetic data under `out` (see `synthetic_frames`).
    Returns the tags (dates from `start`) in order."""
    data = synthetic_frames(users=users, items=items, days=days, seed=seed, start=start)
    return write_drops(out, data.events, data.items, data.users)
