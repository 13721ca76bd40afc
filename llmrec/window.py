"""Which rows a nightly run trains on and which it is judged on.

    new rows   curated rows no gate has judged yet: ingest sequence above the champion's
               watermark and above every decided (promoted or rejected) version's. A
               rejected night's rows are not trained as new again on later nights (so one
               harmful week cannot hold every later challenger back); they stay in the
               history and are replayed like any older row
    anchor     a fixed sample drawn from the first night's rows, never trained on, so
               every later model is scored on the same old rows (exposes forgetting)
    held_out   the newest slice by time of the new rows, not trained on tonight
    replay     a random sample of older rows, `replay_fraction` x the new training rows
    train      new rows - anchor - held_out, plus replay
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from llmrec.config import EvaluationConfig, Home, TrainingConfig
from llmrec.history import History
from llmrec.ingest import write_atomic

KEY = ["user_id", "item_id", "timestamp"]


@dataclass
class Window:
    train: pd.DataFrame
    held_out: pd.DataFrame
    anchor: pd.DataFrame
    new_rows: int
    replay_rows: int
    # The newest ingest sequence among the events the window was cut from: a model trained
    # on it has seen everything up to here.
    watermark: int = 0
    # The new rows are those with ingest sequence above this one.
    since: int = 0

    def summary(self) -> dict:
        return {
            "new_rows": self.new_rows,
            "train_rows": len(self.train),
            "replay_rows": self.replay_rows,
            "held_out_rows": len(self.held_out),
            "anchor_rows": len(self.anchor),
            "first_event": _iso(self.train["timestamp"].min()) if len(self.train) else None,
            "last_event": _iso(self.held_out["timestamp"].max()) if len(self.held_out) else None,
        }


def _iso(value) -> str:
    return pd.Timestamp(value).isoformat()


def draw_anchor(rows: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    count = max(1, int(round(len(rows) * fraction))) if len(rows) else 0
    return rows.sample(n=count, random_state=seed)[KEY + ["rating"]].reset_index(drop=True)


def without(rows: pd.DataFrame, drop: pd.DataFrame) -> pd.DataFrame:
    if drop.empty or rows.empty:
        return rows
    marker = drop[KEY].drop_duplicates().assign(_drop=True)
    merged = rows.merge(marker, on=KEY, how="left")
    return merged[merged["_drop"].isna()].drop(columns="_drop").reset_index(drop=True)


def split(events: pd.DataFrame, watermark: int, anchor: pd.DataFrame | None,
          training: TrainingConfig, evaluation: EvaluationConfig) -> Window:
    """Cut tonight's window out of curated events held in memory (benchmarks, tests); the
    nightly flow reads them from a `History` instead (`prepare_window`)."""
    older = events[events["_ingest_seq"] <= watermark]
    latest = int(events["_ingest_seq"].max()) if len(events) else watermark
    return cut(events[events["_ingest_seq"] > watermark],
               lambda count, seed: older.sample(n=min(len(older), count), random_state=seed),
               watermark, latest, anchor, training, evaluation)


def cut(new: pd.DataFrame, draw_older: Callable[[int, int], pd.DataFrame], watermark: int, latest: int,
        anchor: pd.DataFrame | None, training: TrainingConfig, evaluation: EvaluationConfig) -> Window:
    """Tonight's window from the `new` rows (ingest sequence > `watermark`: not yet judged
    by a gate; 0 before the first model) and `draw_older(count, seed)`, a uniform sample of
    the older rows. `anchor` is None on the first night; `latest` is the newest ingest
    sequence."""
    if anchor is None:
        anchor = draw_anchor(new, evaluation.anchor_fraction, training.seed)
    new = without(new, anchor).sort_values("timestamp", kind="stable")
    held_count = int(np.ceil(len(new) * evaluation.held_out_fraction)) if len(new) > 1 else 0
    held_out = new.iloc[len(new) - held_count :] if held_count else new.iloc[0:0]
    new_train = new.iloc[: len(new) - held_count]
    wanted = int(round(len(new_train) * training.replay_fraction))
    # Draw from all older rows, then drop anchor rows from the draw only: a uniform sample
    # of older rows minus the anchor, without an anti-join over the whole history.
    drawn = draw_older(wanted + len(anchor), training.seed + watermark) if wanted else new.iloc[0:0]
    replay = without(drawn, anchor).iloc[:wanted]
    train = pd.concat([new_train, replay], ignore_index=True)
    return Window(train=train.reset_index(drop=True), held_out=held_out.reset_index(drop=True),
                  anchor=anchor.reset_index(drop=True), new_rows=len(new), replay_rows=len(replay),
                  watermark=latest, since=watermark)


def prepare_window(home: Home, history: History, watermark: int, training: TrainingConfig,
                   evaluation: EvaluationConfig) -> Window:
    """Tonight's window read from the curated `history` (tonight's rows and a replay
    sample, never the whole of it), with the anchor set drawn on the first night and kept
    in `home`."""
    anchor = pd.read_parquet(home.anchor) if home.anchor.exists() else None
    window = cut(history.new_rows(watermark), lambda count, seed: history.sample_older(watermark, count, seed),
                 watermark, history.watermark if history.rows else watermark, anchor, training, evaluation)
    if anchor is None and len(window.anchor):
        write_atomic(pa.Table.from_pandas(window.anchor, preserve_index=False), home.anchor)
    return window
