"""What a night needs from the curated event history, read without loading it whole.

The curated events are Parquet files partitioned by event date, one file per landing file
and day, every row of a file carrying the ingest sequence it arrived in. A night needs:

    watermark    the newest ingest sequence             Parquet footers only
    new rows     ingest sequence > champion's watermark  only the files whose footer
                                                         statistics say so are opened
    replay       a uniform sample of the older rows      row counts from the footers,
                                                         then a streamed take of the
                                                         drawn positions
    seen pairs   (user, item) pairs of the users ranked  a filtered scan: only the
                                                         matching rows are materialised
    segments     ratings per user and per item           a streamed scan of one column,
                                                         counted batch by batch
    drift        first night and ratings per night of    a streamed scan of two columns,
                 the users and items of a sample         filtered to those users/items

so its memory grows with tonight's rows and the sample, not with the history, and its
time with the history only through streamed scans of a few columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from llmrec.config import Home
from llmrec.schema import EVENT_KEY, empty_events

SEQ = "_ingest_seq"
# Rows per record batch of the counting scans.
SCAN_ROWS = 1 << 20


@dataclass(frozen=True)
class EventFile:
    path: str
    rows: int
    first_seq: int
    last_seq: int


def footer(path: str) -> EventFile:
    """Row count and ingest-sequence range of one curated file, from its footer."""
    meta = pq.ParquetFile(path).metadata
    column = meta.schema.to_arrow_schema().get_field_index(SEQ)
    low, high = [], []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if meta.row_group(group).num_rows:
            low.append(stats.min)
            high.append(stats.max)
    return EventFile(path, meta.num_rows, min(low, default=0), max(high, default=0))


class History:
    """The curated events of one LLMREC_HOME, as footers and filtered reads."""

    def __init__(self, files: list[EventFile]):
        self.files = sorted(files, key=lambda f: f.path)

    @classmethod
    def open(cls, home: Home) -> "History":
        paths = sorted(str(p) for p in home.events.glob("date=*/*.parquet")) if home.events.exists() else []
        return cls([footer(p) for p in paths])

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def watermark(self) -> int:
        """The newest ingest sequence among the curated events (0 when there are none)."""
        return max((f.last_seq for f in self.files), default=0)

    def _dataset(self, files: list[EventFile]) -> ds.Dataset | None:
        return ds.dataset([f.path for f in files], format="parquet") if files else None

    def _columns(self, dataset: ds.Dataset) -> list[str]:
        return [c for c in dataset.schema.names if c != "date"]

    def new_rows(self, watermark: int) -> pd.DataFrame:
        """Every event that arrived after `watermark`: only files whose sequence range
        reaches past it are opened."""
        dataset = self._dataset([f for f in self.files if f.last_seq > watermark])
        if dataset is None:
            return self.empty()
        table = dataset.to_table(columns=self._columns(dataset), filter=pc.field(SEQ) > watermark)
        return table.to_pandas().sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)

    def older_rows(self, watermark: int) -> int:
        return sum(f.rows for f in self.files if f.last_seq <= watermark) + sum(
            self._dataset([f]).count_rows(filter=pc.field(SEQ) <= watermark)
            for f in self.files if f.first_seq <= watermark < f.last_seq)

    def sample_older(self, watermark: int, count: int, seed: int) -> pd.DataFrame:
        """A uniform sample without replacement of `count` events with ingest sequence <=
        `watermark` (all of them when there are fewer), deterministic in `seed`. The
        positions are drawn first, then taken in one streamed pass over the older files."""
        older = [f for f in self.files if f.first_seq <= watermark]
        total = self.older_rows(watermark)
        count = min(count, total)
        if count == 0:
            return self.empty()
        positions = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
        dataset = self._dataset(older)
        table = dataset.take(positions, columns=self._columns(dataset), filter=pc.field(SEQ) <= watermark)
        # Shuffled, so that the first n rows of the sample are a sample too.
        return table.to_pandas().sample(frac=1.0, random_state=seed).reset_index(drop=True)

    def pairs(self, users, columns=("user_id", "item_id", "timestamp")) -> pd.DataFrame:
        """The events of `users` (ranking excludes the items a user has rated)."""
        dataset = self._dataset(self.files)
        if dataset is None or not len(users):
            return self.empty()[list(columns)]
        table = dataset.to_table(columns=list(columns), filter=pc.field("user_id").isin(list(users)))
        return table.to_pandas()

    def counts(self, without: pd.DataFrame | None = None) -> tuple[pd.Series, pd.Series]:
        """Events per user and per item, each indexed by id in sorted order, counted batch
        by batch over a scan of the two id columns; the events whose key is in `without`
        (a part being evaluated) are not counted."""
        totals = {column: pd.Series(dtype="int64") for column in ("user_id", "item_id")}
        dataset = self._dataset(self.files)
        if dataset is not None:
            for batch in dataset.to_batches(columns=list(totals), batch_size=SCAN_ROWS):
                for column in totals:
                    counted = pc.value_counts(batch.column(column))
                    totals[column] = totals[column].add(pd.Series(counted.field("counts").to_numpy(),
                                                                  index=counted.field("values").to_pandas()),
                                                        fill_value=0)
        present = None
        if without is not None and len(without):
            present = self.pairs(without["user_id"].unique(), EVENT_KEY).merge(without[EVENT_KEY].drop_duplicates(),
                                                                             on=EVENT_KEY)
        for column, total in totals.items():
            if present is not None:
                total = total.sub(present[column].value_counts(), fill_value=0)
            totals[column] = total[total > 0].astype("int64").sort_index().rename_axis(column)
        return totals["user_id"], totals["item_id"]

    def rated_positions(self, item_ids: list[str]) -> dict[str, np.ndarray]:
        """Per user, the positions in `item_ids` of the items they rated (events of other
        items are left out), from a scan of the two id columns batch by batch: the serving
        model's "already rated" sets without the history as one frame."""
        dataset = self._dataset(self.files)
        if dataset is None:
            return {}
        catalog = pa.array(item_ids, type=pa.string())
        users, positions = [], []
        for batch in dataset.to_batches(columns=["user_id", "item_id"], batch_size=SCAN_ROWS):
            position = pc.index_in(batch.column("item_id").cast(pa.string()), value_set=catalog)
            known = pc.is_valid(position)
            users.append(pc.filter(batch.column("user_id").cast(pa.string()), known))
            positions.append(pc.filter(position, known).to_numpy(zero_copy_only=False).astype(np.int64))
        if not users:
            return {}
        encoded = pa.chunked_array(users, type=pa.string()).combine_chunks().dictionary_encode()
        codes, names = encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()
        position = np.concatenate(positions)
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
        ends = np.r_[starts[1:], len(order)]
        return {names[codes[order[start]]]: position[order[start:end]] for start, end in zip(starts, ends)}

    @staticmethod
    def rated_counts(rated: dict[str, np.ndarray], item_ids: list[str]) -> pd.Series:
        """Ratings per item of `item_ids` (those rated at least once), from the positions
        `rated_positions` returned: the popularity without a second scan of the ids."""
        counts = pd.Series(np.bincount(np.concatenate([*rated.values(), np.zeros(0, np.int64)]),
                                       minlength=len(item_ids)), index=item_ids)
        return counts[counts > 0]

    def activity(self, column: str, rows: pd.DataFrame, watermark: int,
                 rating_sums: bool = False) -> tuple[pd.DataFrame, pd.Series]:
        """What the history holds about the values of `column` (user_id or item_id) found in
        `rows` (which carry `_ingest_seq`), from a scan of that column and the ingest
        sequence filtered to those values, aggregated batch by batch: per value, its first
        ingest sequence (`first`), its events up to `watermark` (`older`) and, with
        `rating_sums` (the rating column is read too), the sum of their ratings
        (`older_rating`); per (value, ingest sequence) pair of `rows`, its events."""
        values = rows[column].unique()
        pairs = pd.MultiIndex.from_frame(rows[[column, SEQ]].drop_duplicates())
        per_value, per_pair = [], []
        dataset = self._dataset(self.files)
        if dataset is not None and len(values):
            scan = dataset.to_batches(columns=[column, SEQ] + (["rating"] if rating_sums else []),
                                      filter=pc.field(column).isin(list(values)), batch_size=SCAN_ROWS)
            sums = {"first": (SEQ, "min"), "older": ("older", "sum")}
            if rating_sums:
                sums["older_rating"] = ("older_rating", "sum")
            for batch in scan:
                frame = batch.to_pandas().assign(older=lambda f: f[SEQ] <= watermark)
                if rating_sums:
                    frame["older_rating"] = frame["rating"].astype(np.float64).where(frame["older"], 0.0)
                per_value.append(frame.groupby(column).agg(**sums))
                counted = frame.groupby([column, SEQ]).size()
                per_pair.append(counted[counted.index.isin(pairs)])
        if not per_value:
            empty = pd.DataFrame({"first": pd.Series(dtype="int64"), "older": pd.Series(dtype="int64")}
                                 | ({"older_rating": pd.Series(dtype="float64")} if rating_sums else {}))
            return empty, pd.Series(dtype="int64")
        first = pd.concat(per_value).groupby(level=0).agg(
            {"first": "min", "older": "sum"} | ({"older_rating": "sum"} if rating_sums else {}))
        return first, pd.concat(per_pair).groupby(level=[0, 1]).sum()

    @staticmethod
    def empty() -> pd.DataFrame:
        frame = empty_events()
        frame[SEQ] = pd.Series(dtype="int64")
        return frame
