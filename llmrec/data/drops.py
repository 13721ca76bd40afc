"""Drops: the files that arrive in a landing folder on one night.

A drop tagged `1997-09-20` is `events/events-1997-09-20.parquet`, plus
`items/items-1997-09-20.parquet` and `users/users-1997-09-20.parquet` when that night
brings new catalog or profile rows. Tags sort in time order, so the file names do too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmrec.errors import LlmrecError
from llmrec.files import replace_atomically
from llmrec.schema import EVENTS, EVENTS_OPTIONAL, EVENTS_SCHEMA, ITEMS, ITEMS_REQUIRED, KINDS, USERS, USERS_REQUIRED

# In-memory column holding the tag of the drop a row lands in; stripped before writing
# (the leading underscore also keeps it out of `render_text`).
DROP = "_drop"


def drop_path(folder: str | Path, kind: str, tag: str) -> Path:
    """Where the `kind` file (events, items or users) of drop `tag` lives under `folder`."""
    return Path(folder) / kind / f"{kind}-{tag}.parquet"


def landing_schema(kind: str, frame: pd.DataFrame) -> pa.Schema:
    """The explicit Parquet schema of a landing file: the contract's required columns
    first, then the frame's other columns as string, int64 or float64. Explicit because
    pyarrow would otherwise turn pandas `str` columns into large_string."""
    if kind == EVENTS:
        fields = list(EVENTS_SCHEMA)
        known = {f.name for f in fields}
        return pa.schema(fields + [pa.field(c, EVENTS_OPTIONAL[c]) for c in frame.columns if c not in known])
    required = {ITEMS: ITEMS_REQUIRED, USERS: USERS_REQUIRED}[kind]
    fields = [pa.field(name, type_, nullable=False) for name, type_ in required.items()]
    for column in frame.columns:
        if column in required:
            continue
        dtype = frame[column].dtype
        if pd.api.types.is_integer_dtype(dtype):
            fields.append(pa.field(column, pa.int64()))
        elif pd.api.types.is_float_dtype(dtype):
            fields.append(pa.field(column, pa.float64()))
        elif pd.api.types.is_string_dtype(dtype):
            fields.append(pa.field(column, pa.string()))
        else:
            raise TypeError(f"{kind} column {column!r} has dtype {dtype}; landing files take str, int or float")
    return pa.schema(fields)


def drop_index(timestamps: pd.Series, period_days: int, bootstrap_days: int) -> pd.Series:
    """Which drop each timestamp lands in: -1 for the first `bootstrap_days` days (UTC,
    counted from the first day), then 0, 1, ... per `period_days` days after them."""
    days = timestamps.dt.floor("D")
    offset = (days - days.min()).dt.days - bootstrap_days
    return (offset // period_days).where(offset >= 0, -1)


def write_parquet_atomic(frame: pd.DataFrame, path: str | Path, schema: pa.Schema) -> Path:
    """Write `frame` (columns in `schema` order, index dropped) to `path` as Parquet with
    exactly `schema`, atomically. Returns the path."""
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    return replace_atomically(Path(path), lambda temp: pq.write_table(table, temp))


def write_drops(out: str | Path, events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame) -> list[str]:
    """Write one drop per tag found in the `_drop` column of the three frames. Every drop
    gets an events file (possibly empty, so the drop is listed); items and users files only
    when the drop has rows for them. Returns the tags in order."""
    frames = {EVENTS: events, ITEMS: items, USERS: users}
    tags = sorted(set().union(*(set(frame[DROP]) for frame in frames.values())))
    for kind, frame in frames.items():
        columns = frame.drop(columns=DROP)
        schema = landing_schema(kind, columns)
        groups = dict(tuple(columns.groupby(frame[DROP], sort=False)))
        for tag in tags:
            part = groups.get(tag)
            if part is None and kind != EVENTS:
                continue
            part = columns.iloc[:0] if part is None else part
            write_parquet_atomic(part, drop_path(out, kind, tag), schema)
    return tags


def list_drops(folder: str | Path) -> list[str]:
    """The tags of the drops under `folder` (from its events/ files), oldest first."""
    events = Path(folder) / EVENTS
    if not events.is_dir():
        raise LlmrecError(f"no drops in {folder}: expected a folder {events} holding {EVENTS}-<tag>.parquet files")
    prefix = f"{EVENTS}-"
    return sorted(p.stem[len(prefix) :] for p in events.glob(f"{prefix}*.parquet"))


def copy_drop(folder: str | Path, tag: str, landing: str | Path) -> list[Path]:
    """Copy drop `tag` from `folder` into the same sub-folders of `landing`, atomically, as
    if it had arrived tonight. Returns the paths written in `landing`."""
    if not drop_path(folder, EVENTS, tag).is_file():
        available = list_drops(folder)
        raise LlmrecError(
            f"no drop {tag!r} in {folder}: expected {drop_path(folder, EVENTS, tag)}; "
            f"{len(available)} drops there, from {available[:1]} to {available[-1:]}"
        )
    written = []
    for kind in KINDS:
        source = drop_path(folder, kind, tag)
        if source.is_file():
            target = drop_path(landing, kind, tag)
            written.append(replace_atomically(target, lambda temp, s=source: shutil.copyfile(s, temp)))
    return written
