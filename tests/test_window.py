"""Code tests of the nightly window: anchor, held-out slice, replay."""

import pandas as pd

from llmrec.config import EvaluationConfig, TrainingConfig
from llmrec.window import KEY, split


def events(n=200, seqs=(1, 2)):
    rows = []
    for seq in seqs:
        for i in range(n):
            rows.append({"user_id": f"u{i % 17}", "item_id": f"i{i % 23}", "rating": float(1 + i % 5),
                         "timestamp": pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=seq * 10_000 + i),
                         "_ingest_seq": seq})
    return pd.DataFrame(rows)


def keys(frame):
    return set(map(tuple, frame[KEY].astype(str).to_numpy()))


def test_first_night_draws_anchor_and_holds_out_the_newest_slice():
    data = events(seqs=(1,))
    w = split(data, 0, None, TrainingConfig(), EvaluationConfig(held_out_fraction=0.1, anchor_fraction=0.05))
    assert len(w.anchor) == 10 and len(w.held_out) == 19
    assert w.held_out["timestamp"].min() > w.train["timestamp"].max()
    assert not keys(w.anchor) & keys(w.train) and not keys(w.held_out) & keys(w.train)
    assert w.replay_rows == 0 and len(w.train) + len(w.held_out) + len(w.anchor) == len(data)


def test_later_night_keeps_anchor_and_replays_older_rows():
    data = events()
    first = split(data[data["_ingest_seq"] == 1], 0, None, TrainingConfig(), EvaluationConfig())
    w = split(data, 1, first.anchor, TrainingConfig(replay_fraction=0.5), EvaluationConfig())
    assert keys(w.anchor) == keys(first.anchor)
    assert w.new_rows == 200
    new_train = len(w.train) - w.replay_rows
    assert w.replay_rows == round(new_train * 0.5)
    replay = w.train[w.train["_ingest_seq"] == 1]
    assert len(replay) == w.replay_rows and not keys(replay) & keys(first.anchor)
    none = split(data, 1, first.anchor, TrainingConfig(replay_fraction=0.0), EvaluationConfig())
    assert none.replay_rows == 0 and (none.train["_ingest_seq"] == 2).all()
    # More replay asked for than there are older rows: every older row but the anchor, once.
    everything = split(data, 1, first.anchor, TrainingConfig(replay_fraction=5.0), EvaluationConfig())
    replayed = everything.train[everything.train["_ingest_seq"] == 1]
    assert everything.replay_rows == len(replayed) == 200 - len(first.anchor)
    assert keys(replayed) == keys(data[data["_ingest_seq"] == 1]) - keys(first.anchor)
