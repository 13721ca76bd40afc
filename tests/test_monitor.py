"""Drift record (Evidently, pinned method), the drift hold, and the champion's trend."""

import numpy as np
import pandas as pd
import pytest

from llmrec.config import MonitorConfig
from llmrec.gate import Decision, hold_for_drift
from llmrec.history import History, footer
from llmrec.monitor import ITEM_MEAN, drift_columns, drift_hold, night_drift, rating_consistency
from llmrec.schema import CatalogTexts

# Each of the 300 items' quality: ratings are quality plus noise, as real ratings are.
QUALITY = np.random.default_rng(99).normal(0.0, 0.9, 300)


def ratings_of(items: np.ndarray, rng) -> np.ndarray:
    return np.clip(np.round(3.5 + QUALITY[items] + rng.normal(0.0, 1.0, len(items))), 1.0, 5.0)


def nights(n_rows=1500, seed=0, tonight=None) -> pd.DataFrame:
    """Two nights of ratings from the same distribution; `tonight` rewrites night 2."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 300, 2 * n_rows)
    frame = pd.DataFrame({
        "user_id": rng.integers(0, 200, 2 * n_rows).astype(str),
        "item_id": items.astype(str),
        "rating": ratings_of(items, rng),
        "_ingest_seq": np.repeat([1, 2], n_rows),
    })
    if tonight is not None:
        frame = tonight(frame)
    return frame


def history_of(frame: pd.DataFrame, folder) -> History:
    """`frame` as a curated history: one file per ingest sequence, a timestamp per row in
    frame order, one day per sequence."""
    seconds = frame["_ingest_seq"].to_numpy() * 86_400 + np.arange(len(frame))
    frame = frame.assign(timestamp=pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(seconds, unit="s"))
    paths = []
    for seq, rows in frame.groupby("_ingest_seq"):
        paths.append(str(folder / f"night-{seq}.parquet"))
        rows.to_parquet(paths[-1], index=False)
    return History([footer(path) for path in paths])


TEXTS = CatalogTexts(users={}, items={str(i): "x" * (10 + i % 7) for i in range(300)})


def test_drift_columns_by_hand(tmp_path):
    events = pd.DataFrame({
        "user_id": ["a", "a", "b", "a", "c", "c"],
        "item_id": ["x", "y", "x", "x", "z", "x"],
        "rating": [4.0, 3.0, 5.0, 1.0, 2.0, 2.0],
        "_ingest_seq": [1, 1, 1, 2, 2, 2],
    })
    reference, current = drift_columns(history_of(events, tmp_path), 1, CatalogTexts({}, {"x": "abc", "y": "ab"}),
                                       100, 0)
    # The reference is a sample (here all of night 1), in the sample's order.
    assert sorted(reference["user_ratings"]) == [1, 2, 2] and list(current["user_ratings"]) == [1, 2, 2]
    assert list(current["new_user"]) == ["no", "yes", "yes"] and list(current["new_item"]) == ["no", "yes", "no"]
    assert current["item_popularity"].tolist() == pytest.approx([np.log(3), 0.0, np.log(3)])
    assert list(current["text_length"]) == [3, 0, 3] and list(current["rating"]) == [1.0, 2.0, 2.0]
    # x: ratings 4 and 5 before, shrunk toward the history's mean 4 by 10 ratings; z: none before.
    assert current[ITEM_MEAN].tolist()[::2] == pytest.approx([(9 + 40) / 12] * 2) and np.isnan(current[ITEM_MEAN][1])


def test_same_distribution_is_not_held(tmp_path):
    record = night_drift(history_of(nights(), tmp_path), 1, TEXTS, MonitorConfig())
    assert record.method == "jensenshannon" and record.current_rows == 1500 and record.reference_rows == 1500
    assert set(record.scores) == {"rating", "user_ratings", "item_popularity", "text_length", "new_user", "new_item"}
    assert record.scores["rating"] < 0.1 and "rating" not in record.drifted
    assert drift_hold(record, MonitorConfig()) is None
    assert record.consistency > 0.4 and record.consistency_users > 100
    assert record.metrics()["drift.share"] == record.share and "drift.rating" in record.metrics()
    assert record.metrics()["drift.rating_consistency"] == record.consistency
    assert "<html" in record.html.lower() and '"metrics"' in record.json


def test_inverted_ratings_hold_the_challenger_and_name_the_column(tmp_path):
    def invert(frame):
        frame.loc[frame["_ingest_seq"] == 2, "rating"] = 6 - frame.loc[frame["_ingest_seq"] == 2, "rating"]
        return frame

    record = night_drift(history_of(nights(tonight=invert), tmp_path), 1, TEXTS, MonitorConfig())
    assert "rating" in record.drifted and record.scores["rating"] > 0.2
    reason = drift_hold(record, MonitorConfig())
    assert reason.startswith("new events drift from the history (rating drifted")
    assert f"rating {record.scores['rating']:.3f}" in reason
    # Without the rating in hold_columns only the share would hold it, or, once earlier nights
    # give a reference, the rating consistency (negative: the ratings now oppose the items').
    assert drift_hold(record, MonitorConfig(hold_columns=[], drift_threshold=0.9)) is None
    assert record.consistency < -0.3
    record.consistency_baseline = 0.5
    assert drift_hold(record, MonitorConfig(hold_columns=[])).startswith("tonight's ratings agree")


def test_ratings_attached_to_the_wrong_rows_hold_the_challenger(tmp_path):
    """A bad join: night 2's ratings permuted among its rows. Every column's distribution is
    unchanged; the ratings no longer agree with the items' past ratings."""
    def permute(frame):
        tonight = frame["_ingest_seq"] == 2
        frame.loc[tonight, "rating"] = np.random.default_rng(1).permutation(frame.loc[tonight, "rating"].to_numpy())
        return frame

    config = MonitorConfig()
    clean = night_drift(history_of(nights(), tmp_path), 1, TEXTS, config, baseline=0.55)
    assert clean.consistency > 0.75 * 0.55 and drift_hold(clean, config) is None
    (tmp_path / "bad").mkdir()
    record = night_drift(history_of(nights(tonight=permute), tmp_path / "bad"), 1, TEXTS, config, baseline=0.55)
    assert record.scores["rating"] < 0.1 and record.share <= config.drift_threshold
    assert abs(record.consistency) < 0.1 and record.consistency_users > 100 and record.consistency_baseline == 0.55
    reason = drift_hold(record, config)
    assert reason == ("tonight's ratings agree with the items' past ratings less than earlier nights' did "
                      f"(rating consistency {record.consistency:.3f} over {record.consistency_users} users < "
                      "monitor.consistency_ratio 0.75 x 0.550, the earlier nights' median): ratings attached to "
                      "the wrong rows?")
    # Too few users to trust the figure, no earlier nights to compare with, or the check
    # switched off: not held.
    assert drift_hold(record, MonitorConfig(consistency_min_users=record.consistency_users + 1)) is None
    assert drift_hold(record, MonitorConfig(consistency_ratio=0.0)) is None
    record.consistency_baseline = None
    assert drift_hold(record, config) is None


def test_consistency_baseline_is_the_median_of_enough_earlier_nights():
    from llmrec.monitor import consistency_baseline

    assert consistency_baseline([0.4, 0.5], MonitorConfig()) is None
    assert consistency_baseline([0.4, 0.5, 0.3], MonitorConfig()) == pytest.approx(0.4)
    assert consistency_baseline([0.4, 0.5], MonitorConfig(consistency_min_nights=2)) == pytest.approx(0.45)


def test_rating_consistency_by_hand():
    """Per user the correlation of ratings with the items' history means, Fisher z averaged
    with weight n - 3; users with fewer rows, constant ratings or no item mean are left out."""
    a_rating, a_mean = [5.0, 4.0, 4.0, 2.0, 1.0], [4.5, 3.0, 4.0, 3.5, 2.0]
    b_rating, b_mean = [1.0, 3.0, 2.0, 5.0, 4.0, 3.0], [3.0, 3.2, 2.5, 4.1, 3.0, 4.4]
    users = ["a"] * 5 + ["b"] * 6 + ["b"] + ["c"] * 4 + ["d"] * 5
    rating = a_rating + b_rating + [1.0] + [5.0, 1.0, 2.0, 4.0] + [3.0] * 5
    mean = a_mean + b_mean + [np.nan] + [4.0, 3.0, 2.0, 1.0] + [4.0, 3.0, 2.0, 1.0, 3.5]
    current = pd.DataFrame({"rating": rating, ITEM_MEAN: mean})
    a, b = np.corrcoef(a_rating, a_mean)[0, 1], np.corrcoef(b_rating, b_mean)[0, 1]
    expected = np.tanh((2 * np.arctanh(a) + 3 * np.arctanh(b)) / 5)
    value, count = rating_consistency(pd.Series(users), current, MonitorConfig())
    assert count == 2 and value == pytest.approx(expected)
    # A generous rater is the same rater: shifting a user's ratings changes nothing.
    shifted = current.assign(rating=current["rating"] + np.where(np.array(users) == "a", 0.5, 0.0))
    assert rating_consistency(pd.Series(users), shifted, MonitorConfig())[0] == pytest.approx(expected)
    assert rating_consistency(pd.Series(users), current, MonitorConfig(consistency_min_ratings=6)) == (
        pytest.approx(b), 1)
    assert rating_consistency(pd.Series(users[:5]), current[:5], MonitorConfig(consistency_min_ratings=6)) == (None, 0)


def test_first_night_has_no_drift_record(tmp_path):
    assert night_drift(history_of(nights(), tmp_path), 0, TEXTS, MonitorConfig()) is None


def test_drift_turns_a_promotion_into_a_rejection():
    promoted = Decision(True, "champion", "Promoted: fine.", [])
    held = hold_for_drift(promoted, "new events drift from the history (rating drifted; ...)")
    assert not held.promote and held.alias == "challenger"
    assert held.reason.startswith("Rejected (drift hold): new events drift") and "Promoted: fine." in held.reason
    assert held.drift_hold.startswith("new events drift")
    assert hold_for_drift(promoted, None) is promoted
    rejected = hold_for_drift(Decision(False, "challenger", "Rejected: rmse.", []), "rating drifted")
    assert not rejected.promote and rejected.reason == "Rejected: rmse. Drift: rating drifted."
    assert rejected.drift_hold == "rating drifted"


def test_trend_history_table_and_png(tmp_path, monkeypatch):
    import mlflow

    from llmrec import registry
    from llmrec.config import Home
    from llmrec.monitor import DriftRecord
    from llmrec.report import trend_png

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    try:
        registry.configure(Home(tmp_path / "home"), "trend-test")
        assert registry.trend_table("trend-test").empty
        def drift(consistency):
            return DriftRecord("jensenshannon", 0.1, {"rating": 0.02}, [], 0.25, 10, 10, consistency=consistency,
                               consistency_users=30)

        for night, rmse, consistency in [(1, 1.0, 0.5), (2, 0.95, None), (3, 0.97, 0.3)]:
            registry.log_trend("trend-test", night, str(night), {"held_out": {"rmse": rmse, "mse": rmse**2},
                                                                 "anchor": {"rmse": rmse + 0.1}},
                               drift(consistency) if night != 2 else None)
        registry.log_trend("trend-test", 3, "3", {"held_out": {"rmse": 0.96}, "anchor": {"rmse": 1.0}},
                           drift(0.41))  # rerun
        registry.log_trend("trend-test", 4, "4", {"held_out": {"rmse": 0.96}}, drift(0.45))
        trend = registry.trend_table("trend-test")
        assert list(trend.index) == [1, 2, 3, 4]
        assert trend.loc[3, "drift.share"] == 0.25 and trend.loc[3, "drift.rating_consistency"] == pytest.approx(0.41)
        # Tonight's reference: the nights up to its new rows' watermark that measured one.
        assert registry.trend_consistency_baseline("trend-test", 3, MonitorConfig()) is None  # 2 nights
        assert registry.trend_consistency_baseline("trend-test", 3, MonitorConfig(consistency_min_nights=2)) == (
            pytest.approx(0.455))
        assert registry.trend_consistency_baseline("trend-test", 4, MonitorConfig()) == pytest.approx(0.45)
        assert registry.trend_consistency_baseline("no-such-experiment", 4, MonitorConfig()) is None
        trend = trend.loc[[1, 2, 3]]
        assert list(trend["held_out.rmse"]) == pytest.approx([1.0, 0.95, 0.96])
        assert list(trend["champion_version"]) == [1, 2, 3] and "held_out.mse" not in trend
        trend_png(trend, tmp_path / "trend.png")
        assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        mlflow.set_tracking_uri(previous)


def test_one_value_raters_are_named_and_hold_the_challenger(tmp_path):
    from llmrec.ingest import IngestResult
    from llmrec.monitor import DriftRecord, night_drift, one_value_raters
    from llmrec.report import run_report

    def bot(frame):
        rows = pd.DataFrame({"user_id": ["bot"] * 120 + ["fan"] * 120 + ["few"] * 50,
                             "item_id": [str(i) for i in range(120)] * 2 + [str(i) for i in range(50)],
                             "rating": [5.0] * 120 + [5.0] * 100 + [4.0] * 20 + [1.0] * 50, "_ingest_seq": 2})
        return pd.concat([frame, rows], ignore_index=True)

    events = nights(tonight=bot)
    config = MonitorConfig()
    # "fan" is 83% 5.0, "few" has too few ratings to judge; only "bot" is flagged.
    assert one_value_raters(events[events["_ingest_seq"] == 2], config) == ["user bot: 120 ratings, 100% 5"]
    record = night_drift(history_of(events, tmp_path), 1, TEXTS, config)
    assert record.raters == ["user bot: 120 ratings, 100% 5"] and record.metrics()["drift.one_value_raters"] == 1.0
    assert drift_hold(record, config) == ("one-value raters tonight (user bot: 120 ratings, 100% 5; "
                                          "monitor.rater_min_ratings 100, monitor.rater_max_share 0.95)")
    tonight = events[events["_ingest_seq"] == 2]
    assert one_value_raters(tonight, MonitorConfig(rater_max_share=1.0)) == []
    assert one_value_raters(tonight, MonitorConfig(rater_min_ratings=50)) == [
        "user bot: 120 ratings, 100% 5", "user few: 50 ratings, 100% 1"]
    quiet = DriftRecord("jensenshannon", 0.1, {"rating": 0.02}, [], 0.0, 10, 10)
    assert drift_hold(quiet, config) is None
    report = run_report("r", IngestResult([], [], 0), drift=record)
    assert "- one-value raters: user bot: 120 ratings, 100% 5" in report
    assert f"- rating consistency {record.consistency:.3f} over {record.consistency_users} users" in report
    assert "one-value raters" not in run_report("r", IngestResult([], [], 0), drift=quiet)


def test_the_rating_column_holds_only_from_the_hold_threshold():
    from llmrec.monitor import DriftRecord

    record = DriftRecord("jensenshannon", 0.1, {"rating": 0.15, "new_item": 0.3}, ["rating", "new_item"], 0.5, 10, 10)
    assert drift_hold(record, MonitorConfig()) is None  # drifted (>= 0.1) but below hold_threshold 0.21
    reason = drift_hold(record, MonitorConfig(hold_threshold=0.15))
    assert reason.startswith("new events drift from the history (rating drifted, score >= monitor.hold_threshold 0.15;")
    assert "rating 0.150, new_item 0.300" in reason


@pytest.mark.parametrize("bad_batch", [2, 3])
def test_a_bad_batch_holds_even_among_clean_new_rows(tmp_path, bad_batch):
    """After a rejected night the new rows span two ingest batches: inverted ratings in one
    batch of 500 rows hold the challenger although the 2,500 new rows together stay under
    the hold threshold, whether the bad batch came first (it is still in the training
    window) or tonight."""
    sizes = {1: 1500, 2: 2000 if bad_batch == 3 else 500, 3: 500 if bad_batch == 3 else 2000}
    rng = np.random.default_rng(3)
    frame = pd.concat([pd.DataFrame({
        "user_id": rng.integers(0, 200, n).astype(str), "item_id": (items := rng.integers(0, 300, n)).astype(str),
        "rating": ratings_of(items, rng), "_ingest_seq": seq}) for seq, n in sizes.items()], ignore_index=True)
    bad = frame["_ingest_seq"] == bad_batch
    frame.loc[bad, "rating"] = 6 - frame.loc[bad, "rating"]
    config = MonitorConfig()
    record = night_drift(history_of(frame, tmp_path), 1, TEXTS, config)
    assert record.current_rows == 2500 and record.scores["rating"] < config.hold_threshold
    assert sorted(record.batches) == [2, 3] and record.batches[bad_batch].current_rows == 500
    assert record.batches[bad_batch].scores["rating"] >= config.hold_threshold
    reason = drift_hold(record, config)
    assert reason.startswith(f"ingest batch {bad_batch} (500 of the 2500 new rows): new events drift from the history "
                             "(rating drifted")
    # One batch since the champion: no per-batch records, the night's own record decides.
    (tmp_path / "one").mkdir()
    assert night_drift(history_of(frame[frame["_ingest_seq"] < 3], tmp_path / "one"), 1, TEXTS, config).batches == {}
