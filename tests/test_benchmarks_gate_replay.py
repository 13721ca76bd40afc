"""benchmarks/gate_replay.py: the injections and the scoring of decisions by hand, and its
--quick mode (cut to 3 nights) end to end on the real MovieLens-100k (slow)."""

import subprocess
import sys
from pathlib import Path

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
