"""The promotion rule: champion comparisons with tolerance, first model vs global mean, NaN."""

import math

import pytest

from llmrec.config import GateConfig
from llmrec.gate import Decision, decide


def metrics(rmse=0.93, recall=0.20, mae=0.70, anchor_rmse=0.90, anchor_recall=0.25) -> dict:
    return {
        "held_out": {"mse": rmse**2, "rmse": rmse, "mae": mae, "recall_at_10": recall, "ndcg_at_10": 0.3},
        "anchor": {"mse": anchor_rmse**2, "rmse": anchor_rmse, "mae": mae, "recall_at_10": anchor_recall,
                   "ndcg_at_10": 0.3},
    }


GLOBAL_MEAN = {
    "held_out": {"mse": 1.21, "rmse": 1.10, "mae": 0.90, "recall_at_10": 0.01, "ndcg_at_10": 0.01},
    "anchor": {"mse": 1.21, "rmse": 1.10, "mae": 0.90, "recall_at_10": 0.01, "ndcg_at_10": 0.01},
}


def test_equal_metrics_promote_with_zero_tolerance():
    d = decide(metrics(), metrics(), GLOBAL_MEAN, GateConfig())
    assert d.promote and d.alias == "champion"
    assert {(c.part, c.metric) for c in d.checks} == {
        ("held_out", "rmse"), ("held_out", "recall_at_10"), ("anchor", "rmse"), ("anchor", "recall_at_10")
    }
    assert all(c.passed and c.reference_name == "champion" for c in d.checks)
    assert d.failed() == []
    assert d.reason.startswith("Promoted")


def test_rmse_worse_by_0001_rejects_and_names_both_values():
    d = decide(metrics(rmse=0.9322), metrics(rmse=0.9312), GLOBAL_MEAN, GateConfig())
    assert not d.promote and d.alias == "challenger"
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("held_out", "rmse")
    assert (failed.challenger, failed.reference) == (0.9322, 0.9312)
    assert "0.9312" in failed.rule and "tolerance 0" in failed.rule
    assert failed.outcome() == "challenger 0.9322 > champion 0.9312 (tolerance 0)"
    assert "rmse on held_out" in d.reason and "0.9322" in d.reason and "0.9312" in d.reason


def test_regression_within_tolerance_is_accepted_beyond_it_rejected():
    config = GateConfig(tolerance=0.01)
    assert decide(metrics(rmse=0.935, recall=0.195), metrics(rmse=0.93, recall=0.20), GLOBAL_MEAN, config).promote
    d = decide(metrics(rmse=0.945), metrics(rmse=0.93), GLOBAL_MEAN, config)
    assert not d.promote
    assert [c.metric for c in d.failed()] == ["rmse"]
    assert d.failed()[0].tolerance == 0.01


def test_worse_recall_rejects():
    d = decide(metrics(anchor_recall=0.24), metrics(anchor_recall=0.25), GLOBAL_MEAN, GateConfig())
    assert not d.promote
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("anchor", "recall_at_10")
    assert (failed.challenger, failed.reference) == (0.24, 0.25)
    assert failed.outcome().startswith("challenger 0.24 < champion 0.25")


def test_better_on_every_metric_promotes():
    assert decide(metrics(rmse=0.8, recall=0.3), metrics(), GLOBAL_MEAN, GateConfig()).promote


def test_zero_champion_recall_is_not_a_bar_the_challenger_must_beat():
    # MLflow's relative comparison demands a strict gain when the baseline is 0.
    zero = metrics(recall=0.0, anchor_recall=0.0)
    d = decide(zero, dict(zero), GLOBAL_MEAN, GateConfig())
    assert d.promote, d.reason


def test_only_configured_metrics_are_gated():
    config = GateConfig(metrics=["mae"])
    d = decide(metrics(rmse=2.0, mae=0.6), metrics(mae=0.7), GLOBAL_MEAN, config)
    assert d.promote
    assert {c.metric for c in d.checks} == {"mae"}


def test_first_model_must_beat_global_mean_on_error_metrics_only():
    config = GateConfig(metrics=["rmse", "mae", "recall_at_10"])
    d = decide(metrics(rmse=1.0, mae=0.8, recall=0.0), None, GLOBAL_MEAN, config)
    assert d.promote and d.alias == "champion"
    assert {c.metric for c in d.checks} == {"rmse", "mae"}
    assert all(c.reference_name == "global_mean" for c in d.checks)
    assert "ranking" in d.checks[0].rule
    assert "recall_at_10 not compared with the global mean" in d.reason


def test_first_model_equal_to_global_mean_is_rejected():
    d = decide(metrics(rmse=1.10, anchor_rmse=1.05), None, GLOBAL_MEAN, GateConfig())
    assert not d.promote
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("held_out", "rmse")
    assert (failed.challenger, failed.reference) == (1.10, 1.10)
    assert failed.outcome() == "challenger 1.1 >= global_mean 1.1 (must be strictly lower)"


def test_nan_on_both_sides_is_skipped_and_said():
    d = decide(metrics(recall=math.nan), metrics(recall=math.nan), GLOBAL_MEAN, GateConfig())
    assert d.promote
    assert ("held_out", "recall_at_10") not in {(c.part, c.metric) for c in d.checks}
    assert "recall_at_10 on held_out not comparable" in d.reason


def test_nan_challenger_against_finite_champion_fails():
    d = decide(metrics(recall=math.nan), metrics(recall=0.2), GLOBAL_MEAN, GateConfig())
    assert not d.promote
    [failed] = d.failed()
    assert failed.metric == "recall_at_10" and math.isnan(failed.challenger) and failed.reference == 0.2
    assert "NaN" in failed.outcome()


def test_nan_challenger_against_global_mean_fails():
    d = decide(metrics(rmse=math.nan), None, GLOBAL_MEAN, GateConfig())
    assert not d.promote
    assert [(c.part, c.metric) for c in d.failed()] == [("held_out", "rmse")]


def test_part_missing_from_champion_is_skipped_and_said():
    champion = {"held_out": metrics()["held_out"]}
    d = decide(metrics(), champion, GLOBAL_MEAN, GateConfig())
    assert d.promote
    assert {c.part for c in d.checks} == {"held_out"}
    assert "part anchor missing from champion" in d.reason


def test_nothing_comparable_keeps_champion():
    d = decide(metrics(), {}, GLOBAL_MEAN, GateConfig())
    assert not d.promote and d.alias == "challenger"
    assert "no gated metric could be compared" in d.reason


def test_to_dict_round_trips_checks():
    d = decide(metrics(rmse=1.0), metrics(), GLOBAL_MEAN, GateConfig())
    data = d.to_dict()
    assert data["promote"] is False and data["alias"] == "challenger"
    assert data["checks"][0] == {
        "part": "held_out", "metric": "rmse", "challenger": 1.0, "reference": 0.93, "reference_name": "champion",
        "passed": False, "rule": "rmse on held_out must not exceed champion's 0.93 + tolerance 0", "tolerance": 0.0,
    }
    assert isinstance(d, Decision)


@pytest.mark.parametrize("metric", ["mse", "mae", "ndcg_at_10"])
def test_each_metric_direction(metric):
    better = metrics()
    worse = metrics()
    worse["held_out"][metric] += -0.05 if metric == "ndcg_at_10" else 0.05
    config = GateConfig(metrics=[metric])
    assert decide(better, worse, GLOBAL_MEAN, config).promote
    assert not decide(worse, better, GLOBAL_MEAN, config).promote
