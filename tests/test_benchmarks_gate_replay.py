"""benchmarks/gate_replay.py: the injections and the scoring of decisions by hand, and its
--quick mode (cut to 3 nights) end to end on the real MovieLens-100k (slow)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gate_replay import inject, summary  # noqa: E402


def nights() -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": [f"u{i % 7}" for i in range(40)], "item_id": [f"i{i % 11}" for i in range(40)],
        "rating": [float(1 + i % 5) for i in range(40)],
        "timestamp": pd.date_range("2024-01-01", periods=40, freq="h", tz="UTC").as_unit("us"),
        "_ingest_seq": [1] * 20 + [2] * 20,
    })


def test_injections_touch_only_the_night():
    events = nights()
    inverted = inject("inverted", events, 2, [], seed=0)
    assert (inverted["rating"][:20] == events["rating"][:20]).all()
    assert (inverted["rating"][20:] == 6 - events["rating"][20:]).all()
    shuffled = inject("shuffled", events, 2, [], seed=0)
    assert sorted(shuffled["rating"]) == sorted(events["rating"]) and (shuffled["rating"][:20] == events["rating"][:20]).all()
    assert (shuffled["rating"] != events["rating"]).sum() > 0
    bot = inject("bot user", events, 2, [f"i{n}" for n in range(600)], seed=0)
    rows = bot[bot["user_id"] == "injected-bot"]
    assert len(rows) == 500 and (rows["rating"] == 5.0).all() and (rows["_ingest_seq"] == 2).all()
    assert rows["item_id"].nunique() == 500 and bot["timestamp"].is_monotonic_increasing
    assert inject("lr x100", events, 2, [], seed=0).equals(events)


def test_summary_counts_false_decisions_and_lag():
    rows = [
        {"rule": "r", "kind": "clean", "promoted": False, "truth": "better"},  # false rejection, lag starts
        {"rule": "r", "kind": "clean", "promoted": False, "truth": "tie"},  # still lagging
        {"rule": "r", "kind": "clean", "promoted": True, "truth": "worse"},  # false promotion, lag ends
        {"rule": "r", "kind": "inverted", "promoted": True, "truth": None},
        {"rule": "r", "kind": "clean", "promoted": True, "truth": "better"},
        {"rule": "r", "kind": "clean", "promoted": False, "truth": None},  # not judged
    ]
    out = summary(rows)
    assert out["promotion rate"] == "2/5" and out["judged (better/tie/worse)"] == "2/1/1"
    assert out["false rejections"] == "1/2 (50%)" and out["false promotions"] == "1/4 (25%)"
    assert out["injected promoted"] == "1/1" and out["weeks lagged"] == 2


@pytest.mark.slow
def test_gate_replay_quick_runs_both_rules_over_seeds(movielens):
    # --quick injects on its 2nd and 3rd nights; 3 nights of 1 epoch keep the test to minutes.
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/gate_replay.py"), "--quick", "--nights", "3",
                          "--set", "training.epochs=1", "--seeds", "0,1", "--data", str(movielens)],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    table = [line.split("|") for line in lines if line.startswith(("point ", "bootstrap "))]
    # A row per rule and seed, then a row per rule pooling both seeds' nights.
    assert [(cells[0].strip(), cells[1].strip()) for cells in table] == [
        ("point", "0"), ("bootstrap", "0"), ("point", "1"), ("bootstrap", "1"), ("point", "all"), ("bootstrap", "all")]
    assert [cells[2].strip() for cells in table] == ["3"] * 4 + ["6"] * 2, run.stdout[-3000:]
    assert "injected promoted" in run.stdout and "weeks lagged" in run.stdout
    assert "future rmse difference" in run.stdout and "future recall difference" in run.stdout
    assert sum(" inverted " in line or " shuffled " in line for line in lines) == 8  # 2 injections x 2 rules x 2 seeds


def test_a_shuffled_movielens_week_is_held_and_the_clean_week_is_not(movielens, tmp_path):
    """The gate replay's 6th night (a MovieLens week) with 30% of its ratings shuffled
    between rows: every column's distribution is the week's own; its rating consistency
    falls below 0.75 of the earlier weeks' median, which holds it. The same week clean is
    not held."""
    from quality import weekly

    from llmrec.config import MonitorConfig
    from llmrec.data import load_movielens
    from llmrec.history import History, footer
    from llmrec.monitor import consistency_baseline, drift_hold, night_drift
    from llmrec.schema import CatalogTexts, render_text

    events, items, users = load_movielens(movielens)
    events = weekly(events)
    texts = CatalogTexts(render_text(users, "user_id").to_dict(), render_text(items, "item_id").to_dict())
    config = MonitorConfig()

    def drift(upto, night, baseline=None):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.parquet"
        upto[upto["_ingest_seq"] <= night].to_parquet(path, index=False)
        return night_drift(History([footer(str(path))]), night - 1, texts, config, baseline)

    baseline = consistency_baseline([drift(events, night).consistency for night in range(2, 6)], config)
    clean = drift(events, 6, baseline)
    shuffled = drift(inject("shuffled", events, 6, sorted(texts.items), 6), 6, baseline)
    assert drift_hold(clean, config) is None and clean.consistency > 0.35
    assert shuffled.scores["rating"] == pytest.approx(clean.scores["rating"])
    assert shuffled.consistency < 0.75 * baseline and shuffled.consistency_users >= 20
    assert drift_hold(shuffled, config).startswith("tonight's ratings agree with the items' past ratings less")


def test_a_week_of_harsh_new_raters_fails_the_new_user_check(movielens, tmp_path):
    """Why the gate scores the anchor's users as new users: MovieLens weeks 15 and 20 were
    weeks of harsh heavy raters, and a challenger trained on one rates every new user lower
    (the text prior is shared), which the weeks that follow (mostly new users) punish. Here
    the replay's first weekly night gets two new users with 700 ratings of 1 and 2: tonight's
    held-out rows do not object, the new-user check does. The same night clean passes it."""
    from quality import weekly

    from gate_replay import Replay
    from llmrec.config import NightlyConfig
    from llmrec.data import load_movielens
    from llmrec.encoder import TextCache, load_encoder
    from llmrec.model import Champion
    from llmrec.schema import CatalogTexts, render_text

    events, items, users = load_movielens(movielens)
    events = weekly(events)
    profiles = render_text(users, "user_id").to_dict()
    # Harsh raters with profiles like everyone's (MovieLens' harsh raters had them).
    harsh_ids = ["harsh-1", "harsh-2"]
    texts = CatalogTexts(profiles | dict(zip(harsh_ids, (profiles["1"], profiles["2"]))),
                         render_text(items, "item_id").to_dict())
    config = NightlyConfig()
    cache = TextCache.for_model(tmp_path / "cache", load_encoder(config.model.encoder), config.model)
    replay = Replay(events, texts, cache, config, tmp_path)
    window, _, bootstrap = replay.challenger(Champion(), events, 1, 0, None, config)
    champion, anchor = Champion(version="1", checkpoint=bootstrap.checkpoint), window.anchor

    night = events[events["_ingest_seq"] == 2]
    rng = np.random.default_rng(0)
    popular = events["item_id"].value_counts().index[:700]  # films people watch
    harsh = pd.concat([pd.DataFrame({"user_id": user, "item_id": rng.permutation(popular),
                                     "rating": rng.choice([1.0, 2.0], 700),
                                     "timestamp": rng.choice(night["timestamp"].to_numpy(), 700), "_ingest_seq": 2})
                       for user in harsh_ids])
    harsh_events = pd.concat([events, harsh], ignore_index=True).sort_values("timestamp", kind="stable")

    def new_user_check(evts):
        w, upto, trained = replay.challenger(champion, evts, 2, 1, anchor, config)
        decision, _ = replay.gate(w, upto, trained, champion, config, [])
        return {(c.part, c.metric): c for c in decision.checks}

    clean, harsh_night = new_user_check(events), new_user_check(harsh_events)
    assert clean[("new_users", "rmse")].passed, clean[("new_users", "rmse")].outcome()
    check = harsh_night[("new_users", "rmse")]
    assert check.low > check.margin and not check.passed, check.outcome()
    assert harsh_night[("held_out", "rmse")].passed  # tonight's rows alone would let it through
