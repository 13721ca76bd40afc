"""What a night reads from the curated history: footers, pruned and filtered reads, a
uniform replay sample; never the whole history as one frame."""

import numpy as np
import pandas as pd
import pytest

from llmrec import ingest
from llmrec.config import EvaluationConfig, Home, MonitorConfig, TrainingConfig
from llmrec.data import copy_drop, synthetic_drops
from llmrec.evaluate import segment_masks
from llmrec.history import EventFile, History
from llmrec.monitor import ITEM_MEAN, drift_columns, measure_drift, night_drift
from llmrec.window import KEY, prepare_window, without


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Three nights ingested: ingest sequences 1, 2, 3."""
    root = tmp_path_factory.mktemp("history")
    tags = synthetic_drops(root / "drops", users=40, items=50, days=3, seed=2)
    home = Home(root / "home").ensure()
    for tag in tags:
        landing = root / f"landing-{tag}"
        copy_drop(root / "drops", tag, landing)
        batch = ingest.ingest(str(landing), home)
        ingest.curate(home, batch.reads, [], ingest.next_ingest_seq(ingest.read_manifest(home)))
    return home


def keys(frame):
    return set(map(tuple, frame[KEY].astype(str).to_numpy()))


def test_watermark_and_row_count_come_from_the_footers(home):
    events = ingest.read_events(home)
    history = History.open(home)
    assert history.watermark == events["_ingest_seq"].max() == 3
    assert history.rows == len(events)
    assert len(history.files) == 3


def test_new_rows_open_only_the_files_past_the_watermark(home, tmp_path):
    events = ingest.read_events(home)
    expected = events[events["_ingest_seq"] > 2]
    # A copy of the history whose older files are wrecked after their footers were read:
    # tonight's rows must still read, so those files were never opened.
    files = []
    for n, f in enumerate(History.open(home).files):
        target = tmp_path / f"{n}.parquet"
        target.write_bytes(b"not parquet" if f.last_seq <= 2 else open(f.path, "rb").read())
        files.append(EventFile(str(target), f.rows, f.first_seq, f.last_seq))
    rows = History(files).new_rows(2)
    assert len(rows) == len(expected) and keys(rows) == keys(expected)
    assert (rows["timestamp"].diff().dropna() >= pd.Timedelta(0)).all()
    with pytest.raises(Exception):
        History(files).new_rows(1)


def test_replay_sample_is_uniform_over_older_rows_and_repeatable(home):
    events = ingest.read_events(home)
    older = events[events["_ingest_seq"] <= 2]
    history = History.open(home)
    sample = history.sample_older(2, 100, seed=7)
    assert len(sample) == 100 and (sample["_ingest_seq"] <= 2).all()
    assert len(keys(sample)) == 100 and keys(sample) <= keys(older)
    assert keys(history.sample_older(2, 100, seed=7)) == keys(sample)
    assert keys(history.sample_older(2, 100, seed=8)) != keys(sample)
    # Both older nights are drawn from, in proportion to their size (within sampling noise).
    share = (sample["_ingest_seq"] == 1).mean()
    expected = (older["_ingest_seq"] == 1).mean()
    assert abs(share - expected) < 0.2
    assert keys(history.sample_older(2, 10**9, seed=0)) == keys(older)
    assert history.sample_older(0, 10, seed=0).empty


def test_seen_pairs_are_the_events_of_the_users_asked_for(home):
    events = ingest.read_events(home)
    users = sorted(events["user_id"].unique())[:5]
    pairs = History.open(home).pairs(users)
    assert keys(pairs) == keys(events[events["user_id"].isin(users)])
    assert History.open(home).pairs([]).empty


def test_window_from_history_matches_tonights_rows_and_replays_older_ones(home, tmp_path):
    events = ingest.read_events(home)
    night = Home(tmp_path / "night").ensure()
    window = prepare_window(night, History.open(home), 2, TrainingConfig(replay_fraction=0.5), EvaluationConfig())
    tonight = events[events["_ingest_seq"] == 3]
    assert window.watermark == 3
    assert window.new_rows == len(tonight) - len(keys(window.anchor) & keys(tonight))
    replay = window.train[window.train["_ingest_seq"] <= 2]
    assert len(replay) == window.replay_rows == round((len(window.train) - window.replay_rows) * 0.5)
    assert not keys(replay) & keys(window.anchor)
    assert keys(window.held_out) <= keys(tonight)


def drift_columns_of_frame(events, watermark, texts):
    """The monitored columns as they were computed on the whole history as one frame,
    before `monitor.drift_columns` read them through History: the oracle of the test below."""
    seq = events["_ingest_seq"]
    popularity = events[seq <= watermark].groupby("item_id").size()
    older = events[seq <= watermark]
    item_mean = (older.groupby("item_id")["rating"].sum() + 10 * older["rating"].mean()) / (popularity + 10)
    frame = pd.DataFrame({
        "rating": events["rating"].astype(np.float64),
        "user_ratings": events.groupby(["_ingest_seq", "user_id"])["user_id"].transform("size").astype(np.float64),
        "item_popularity": np.log1p(events["item_id"].map(popularity).fillna(0.0).astype(np.float64)),
        "text_length": events["item_id"].map(lambda item: len(texts.items.get(item, ""))).astype(np.float64),
        "new_user": np.where(events.groupby("user_id")["_ingest_seq"].transform("min") == seq, "yes", "no"),
        "new_item": np.where(events.groupby("item_id")["_ingest_seq"].transform("min") == seq, "yes", "no"),
        ITEM_MEAN: events["item_id"].map(item_mean).astype(np.float64),
    }, index=events.index)
    return frame[seq <= watermark].reset_index(drop=True), frame[seq > watermark].reset_index(drop=True)


def in_order(frame):
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("watermark", [1, 2])
def test_drift_through_history_matches_the_whole_frame(home, watermark):
    events = ingest.read_events(home)
    texts = ingest.read_catalog_texts(home)
    history = History.open(home)
    old_reference, old_current = drift_columns_of_frame(events, watermark, texts)
    reference, current = drift_columns(history, watermark, texts, 10**6, 0)
    pd.testing.assert_frame_equal(current, old_current)
    pd.testing.assert_frame_equal(in_order(reference), in_order(old_reference))
    config = MonitorConfig()
    assert night_drift(history, watermark, texts, config).scores == measure_drift(old_reference, old_current,
                                                                                  config).scores
    # A smaller reference is a sample of the same rows.
    sampled, _ = drift_columns(history, watermark, texts, 50, 0)
    assert len(sampled) == 50


def test_segment_counts_through_history_match_the_whole_frame(home):
    events = ingest.read_events(home)
    history = History.open(home)
    part = pd.concat([events[events["_ingest_seq"] == 3].sample(40, random_state=1), events.head(10)])
    outside = without(events, part)
    users, items = history.counts(part)
    pd.testing.assert_series_equal(users, outside.groupby("user_id").size())
    pd.testing.assert_series_equal(items, outside.groupby("item_id").size())
    pd.testing.assert_series_equal(history.counts()[0], events.groupby("user_id").size())
    config = EvaluationConfig(cold_ratings=20, heavy_user_share=0.1, head_item_share=0.2)
    new = segment_masks(part, users, items, config)
    old = segment_masks(part, outside.groupby("user_id").size(), outside.groupby("item_id").size(), config)
    assert all((new[segment] == old[segment]).all() for segment in old)


def test_rated_positions_match_the_whole_frame_grouped_by_user(home, monkeypatch):
    """The serving model's rated sets, scanned in batches of 7 rows, equal the whole history
    grouped by user; items outside the given catalog are left out."""
    import llmrec.history

    events = ingest.read_events(home)
    catalog = sorted(events["item_id"].unique())[::2] + ["never-rated"]
    index = {item: i for i, item in enumerate(catalog)}
    kept = events[events["item_id"].isin(index)]
    expected = {user: sorted(rows["item_id"].map(index)) for user, rows in kept.groupby("user_id")}
    monkeypatch.setattr(llmrec.history, "SCAN_ROWS", 7)
    rated = History.open(home).rated_positions(catalog)
    assert {user: sorted(positions.tolist()) for user, positions in rated.items()} == expected
    assert all(positions.dtype == np.int64 for positions in rated.values())
    assert History([]).rated_positions(catalog) == {}
    # The popularity from the same positions: ratings per catalog item, unrated items left out.
    counts = History.rated_counts(rated, catalog)
    assert counts.to_dict() == kept["item_id"].value_counts().to_dict() and "never-rated" not in counts
    assert History.rated_counts({}, catalog).empty
