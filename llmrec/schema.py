"""The landing data contract, in one place.

A landing folder (a local path or a pyarrow/fsspec URI) holds three kinds of Parquet file:

    events/*.parquet  one row per rating: user_id, item_id, rating (float, 1-5),
                      timestamp (UTC), and optionally event_id
    items/*.parquet   catalog upserts: item_id, title, and any free-text fields
                      (genres, description, ...); the newest row per item_id wins
    users/*.parquet   profile upserts: user_id and any profile fields; newest wins

Ids are strings. Every non-id column of items and users is turned into the text the
encoder reads (see `render_text`), so adding a column to the catalog needs no code change.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

RATING_MIN = 1.0
RATING_MAX = 5.0

EVENTS = "events"
ITEMS = "items"
USERS = "users"
KINDS = (EVENTS, ITEMS, USERS)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("rating", pa.float64(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
EVENTS_OPTIONAL = {"event_id": pa.string()}
ITEMS_REQUIRED = {"item_id": pa.string(), "title": pa.string()}
USERS_REQUIRED = {"user_id": pa.string()}

ID_COLUMN = {EVENTS: None, ITEMS: "item_id", USERS: "user_id"}
# What makes an event unique.
EVENT_KEY = ["user_id", "item_id", "timestamp"]


def required_columns(kind: str) -> dict[str, pa.DataType]:
    if kind == EVENTS:
        return {f.name: f.type for f in EVENTS_SCHEMA}
    if kind == ITEMS:
        return dict(ITEMS_REQUIRED)
    if kind == USERS:
        return dict(USERS_REQUIRED)
    raise ValueError(f"unknown landing kind {kind!r}; expected one of {KINDS}")


def empty_events() -> pd.DataFrame:
    return EVENTS_SCHEMA.empty_table().to_pandas()


def render_text(frame: pd.DataFrame, id_column: str) -> pd.Series:
    """The text the encoder reads for each row: "field: value; ..." over every non-id
    column, nulls skipped, with the title (if any) first and unlabelled."""
    columns = [c for c in frame.columns if c != id_column and not c.startswith("_")]
    if "title" in columns:
        columns.remove("title")
        columns.insert(0, "title")

    def one(row) -> str:
        parts = []
        for column in columns:
            value = row[column]
            if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
                continue
            text = str(value).strip()
            if not text:
                continue
            parts.append(text if column == "title" else f"{column}: {text}")
        return "; ".join(parts)

    return pd.Series([one(r) for _, r in frame.iterrows()], index=frame[id_column].values, dtype=object)


@dataclass
class CatalogTexts:
    """The text each user and each item is encoded from, by id."""

    users: dict[str, str]
    items: dict[str, str]
