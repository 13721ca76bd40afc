"""The promotion rule. Point rule: champion comparisons with tolerance, first model vs global
mean, NaN. Bootstrap rule: paired intervals, margins, small samples."""

import math

import numpy as np
import pandas as pd
import pytest

from llmrec.config import GateConfig
from llmrec.gate import Decision, decide


def metrics(rmse=0.93, recall=0.20, mae=0.70, anchor_rmse=0.90, anchor_recall=0.25) -> dict:
    return {
        "held_out": {"mse": rmse**2, "rmse": rmse, "mae": mae, "recall_at_10": recall, "ndcg_at_10": 0.3},
        "anchor": {"mse": anchor_rmse**2, "rmse": anchor_rmse, "mae": mae, "recall_at_10": anchor_recall,
                   "ndcg_at_10": 0.3},
    }


POINT = GateConfig(rule="point")
GLOBAL_MEAN = {
    "held_out": {"mse": 1.21, "rmse": 1.10, "mae": 0.90, "recall_at_10": 0.01, "ndcg_at_10": 0.01},
    "anchor": {"mse": 1.21, "rmse": 1.10, "mae": 0.90, "recall_at_10": 0.01, "ndcg_at_10": 0.01},
}


def test_equal_metrics_promote_with_zero_tolerance():
    d = decide(metrics(), metrics(), GLOBAL_MEAN, POINT)
    assert d.promote and d.alias == "champion"
    assert {(c.part, c.metric) for c in d.checks} == {
        ("held_out", "rmse"), ("held_out", "recall_at_10"), ("anchor", "rmse"), ("anchor", "recall_at_10")
    }
    assert all(c.passed and c.reference_name == "champion" for c in d.checks)
    assert d.failed() == []
    assert d.reason.startswith("Promoted")


def test_rmse_worse_by_0001_rejects_and_names_both_values():
    d = decide(metrics(rmse=0.9322), metrics(rmse=0.9312), GLOBAL_MEAN, POINT)
    assert not d.promote and d.alias == "challenger"
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("held_out", "rmse")
    assert (failed.challenger, failed.reference) == (0.9322, 0.9312)
    assert "0.9312" in failed.rule and "tolerance 0" in failed.rule
    assert failed.outcome() == "challenger 0.9322 > champion 0.9312 (tolerance 0)"
    assert "rmse on held_out" in d.reason and "0.9322" in d.reason and "0.9312" in d.reason


def test_regression_within_tolerance_is_accepted_beyond_it_rejected():
    config = GateConfig(rule="point", tolerance=0.01)
    assert decide(metrics(rmse=0.935, recall=0.195), metrics(rmse=0.93, recall=0.20), GLOBAL_MEAN, config).promote
    d = decide(metrics(rmse=0.945), metrics(rmse=0.93), GLOBAL_MEAN, config)
    assert not d.promote
    assert [c.metric for c in d.failed()] == ["rmse"]
    assert d.failed()[0].tolerance == 0.01


def test_worse_recall_rejects():
    d = decide(metrics(anchor_recall=0.24), metrics(anchor_recall=0.25), GLOBAL_MEAN, POINT)
    assert not d.promote
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("anchor", "recall_at_10")
    assert (failed.challenger, failed.reference) == (0.24, 0.25)
    assert failed.outcome().startswith("challenger 0.24 < champion 0.25")


def test_better_on_every_metric_promotes():
    assert decide(metrics(rmse=0.8, recall=0.3), metrics(), GLOBAL_MEAN, POINT).promote


def test_zero_champion_recall_is_not_a_bar_the_challenger_must_beat():
    # MLflow's relative comparison demands a strict gain when the baseline is 0.
    zero = metrics(recall=0.0, anchor_recall=0.0)
    d = decide(zero, dict(zero), GLOBAL_MEAN, POINT)
    assert d.promote, d.reason


def test_only_configured_metrics_are_gated():
    config = GateConfig(rule="point", metrics=["mae"])
    d = decide(metrics(rmse=2.0, mae=0.6), metrics(mae=0.7), GLOBAL_MEAN, config)
    assert d.promote
    assert {c.metric for c in d.checks} == {"mae"}


def test_first_model_must_beat_global_mean_on_error_metrics_only():
    config = GateConfig(rule="point", metrics=["rmse", "mae", "recall_at_10"])
    d = decide(metrics(rmse=1.0, mae=0.8, recall=0.0), None, GLOBAL_MEAN, config)
    assert d.promote and d.alias == "champion"
    assert {c.metric for c in d.checks} == {"rmse", "mae"}
    assert all(c.reference_name == "global_mean" for c in d.checks)
    assert "ranking" in d.checks[0].rule
    assert "recall_at_10 not compared with the global mean" in d.reason


def test_first_model_equal_to_global_mean_is_rejected():
    d = decide(metrics(rmse=1.10, anchor_rmse=1.05), None, GLOBAL_MEAN, POINT)
    assert not d.promote
    [failed] = d.failed()
    assert (failed.part, failed.metric) == ("held_out", "rmse")
    assert (failed.challenger, failed.reference) == (1.10, 1.10)
    assert failed.outcome() == "challenger 1.1 >= global_mean 1.1 (must be strictly lower)"


def test_nan_on_both_sides_is_skipped_and_said():
    d = decide(metrics(recall=math.nan), metrics(recall=math.nan), GLOBAL_MEAN, POINT)
    assert d.promote
    assert ("held_out", "recall_at_10") not in {(c.part, c.metric) for c in d.checks}
    assert "recall_at_10 on held_out not comparable" in d.reason


def test_nan_challenger_against_finite_champion_fails():
    d = decide(metrics(recall=math.nan), metrics(recall=0.2), GLOBAL_MEAN, POINT)
    assert not d.promote
    [failed] = d.failed()
    assert failed.metric == "recall_at_10" and math.isnan(failed.challenger) and failed.reference == 0.2
    assert "NaN" in failed.outcome()


def test_nan_challenger_against_global_mean_fails():
    d = decide(metrics(rmse=math.nan), None, GLOBAL_MEAN, POINT)
    assert not d.promote
    assert [(c.part, c.metric) for c in d.failed()] == [("held_out", "rmse")]


def test_part_missing_from_champion_is_skipped_and_said():
    champion = {"held_out": metrics()["held_out"]}
    d = decide(metrics(), champion, GLOBAL_MEAN, POINT)
    assert d.promote
    assert {c.part for c in d.checks} == {"held_out"}
    assert "part anchor missing from champion" in d.reason


def test_nothing_comparable_keeps_champion():
    d = decide(metrics(), {}, GLOBAL_MEAN, POINT)
    assert not d.promote and d.alias == "challenger"
    assert "no gated metric could be compared" in d.reason


def test_to_dict_round_trips_checks():
    d = decide(metrics(rmse=1.0), metrics(), GLOBAL_MEAN, POINT)
    data = d.to_dict()
    assert data["promote"] is False and data["alias"] == "challenger"
    assert data["checks"][0] == {
        "part": "held_out", "metric": "rmse", "challenger": 1.0, "reference": 0.93, "reference_name": "champion",
        "passed": False, "rule": "rmse on held_out must not exceed champion's 0.93 + tolerance 0", "tolerance": 0.0,
        "difference": None, "low": None, "high": None, "margin": None, "samples": None, "status": "",
    }
    assert data["drift_hold"] == ""
    assert isinstance(d, Decision)


@pytest.mark.parametrize("metric", ["mse", "mae", "ndcg_at_10"])
def test_each_metric_direction(metric):
    better = metrics()
    worse = metrics()
    worse["held_out"][metric] += -0.05 if metric == "ndcg_at_10" else 0.05
    config = GateConfig(rule="point", metrics=[metric])
    assert decide(better, worse, GLOBAL_MEAN, config).promote
    assert not decide(worse, better, GLOBAL_MEAN, config).promote


# --- bootstrap rule -------------------------------------------------------------------------

from llmrec.evaluate import Sample  # noqa: E402
from llmrec.gate import check_metrics, check_rows, margin_of, paired_interval  # noqa: E402


def sample(errors, recall=None) -> Sample:
    recall = np.zeros(0) if recall is None else np.asarray(recall, dtype=float)
    users = pd.DataFrame({"recall_at_10": recall, "ndcg_at_10": recall},
                         index=pd.Index([f"u{i:04d}" for i in range(len(recall))], name="user_id"))
    return Sample(errors=np.asarray(errors, dtype=float), users=users)


def metrics_of(s: Sample) -> dict:
    return {"rmse": float(np.sqrt(np.mean(s.errors**2))), "mae": float(np.mean(np.abs(s.errors))),
            "mse": float(np.mean(s.errors**2)), "recall_at_10": float(s.users["recall_at_10"].mean()),
            "ndcg_at_10": float(s.users["ndcg_at_10"].mean())}


def gate(ours: Sample, theirs: Sample, **config):
    """decide() on the held_out part only, from two samples."""
    config = GateConfig(**({"resamples": 1000} | config))
    return decide({"held_out": metrics_of(ours)}, {"held_out": metrics_of(theirs)}, GLOBAL_MEAN, config,
                  {"held_out": {"challenger": ours, "champion": theirs}})


rng = np.random.default_rng(7)
CHAMPION_ERRORS = rng.normal(0.0, 1.0, 2000)
CHAMPION_RECALL = rng.uniform(0, 1, 300)


def test_interval_agrees_with_an_independent_paired_percentile_bootstrap():
    ours = CHAMPION_ERRORS * 1.02 + rng.normal(0, 0.1, 2000)
    a, b = ours**2, CHAMPION_ERRORS**2
    difference, low, high = paired_interval("rmse", a, b, 4000, 0.9, seed=1)
    assert difference == pytest.approx(np.sqrt(a.mean()) - np.sqrt(b.mean()))
    # The same procedure written out by hand: rows drawn with replacement, both models together.
    draws = np.random.default_rng(99).integers(0, len(a), (4000, len(a)))
    by_hand = np.sqrt(a[draws].mean(axis=1)) - np.sqrt(b[draws].mean(axis=1))
    hand_low, hand_high = np.percentile(by_hand, [5, 95])
    width = hand_high - hand_low
    assert low == pytest.approx(hand_low, abs=0.1 * width) and high == pytest.approx(hand_high, abs=0.1 * width)
    # Seeded: the same seed gives the same interval.
    assert paired_interval("rmse", a, b, 4000, 0.9, seed=1) == (difference, low, high)


def test_pairing_detects_a_small_consistent_gain_unpaired_noise_would_hide():
    # Per-row errors vary a lot between rows, but the challenger is better on every row by
    # a little: only a paired interval sees that the difference is positive for sure.
    worse = np.abs(CHAMPION_ERRORS) + 0.01  # unpaired, the interval would straddle 0
    d = gate(sample(CHAMPION_ERRORS), sample(worse), metrics=["mae"])
    [check] = d.checks
    assert check.high < 0 and check.status == "pass" and d.promote
    d = gate(sample(worse), sample(CHAMPION_ERRORS), metrics=["mae"])
    [check] = d.checks
    assert check.low > 0 and check.status == "fail" and not d.promote
    assert "mae on held_out" in d.reason and f"[{check.low:+.4g}, {check.high:+.4g}]" in d.reason


def test_noise_is_not_a_regression_but_a_clear_one_is():
    noisy = rng.normal(0.0, 1.0, 2000)  # same error distribution, independent noise
    d = gate(sample(noisy, rng.uniform(0, 1, 300)), sample(CHAMPION_ERRORS, CHAMPION_RECALL))
    assert d.promote, d.reason
    assert {(c.metric, c.status) for c in d.checks} == {("rmse", "pass"), ("recall_at_10", "pass")}
    assert all(c.low < c.difference < c.high for c in d.checks)
    d = gate(sample(CHAMPION_ERRORS * 1.3, CHAMPION_RECALL), sample(CHAMPION_ERRORS, CHAMPION_RECALL))
    assert not d.promote
    assert [(c.metric, c.status) for c in d.failed()] == [("rmse", "fail")]


def test_ranking_checks_resample_users_and_fail_on_lower_recall():
    d = gate(sample(CHAMPION_ERRORS, CHAMPION_RECALL * 0.6), sample(CHAMPION_ERRORS, CHAMPION_RECALL),
             metrics=["recall_at_10"])
    [check] = d.checks
    assert check.samples == 300 and check.high < 0 and not check.passed
    assert "300 users" in check.outcome()


def test_margin_absolute_and_relative():
    worse = CHAMPION_ERRORS * 1.05  # rmse about 5% higher, every row
    champion_rmse = metrics_of(sample(CHAMPION_ERRORS))["rmse"]
    assert not gate(sample(worse), sample(CHAMPION_ERRORS), metrics=["rmse"]).promote  # default margin 1%
    assert gate(sample(CHAMPION_ERRORS * 1.005), sample(CHAMPION_ERRORS), metrics=["rmse"]).promote
    assert not gate(sample(CHAMPION_ERRORS * 1.005), sample(CHAMPION_ERRORS), metrics=["rmse"], margin={}).promote
    assert gate(sample(worse), sample(CHAMPION_ERRORS), metrics=["rmse"], margin={"rmse": 0.2}).promote
    assert gate(sample(worse), sample(CHAMPION_ERRORS), metrics=["rmse"], margin={"rmse": "10%"}).promote
    assert not gate(sample(worse), sample(CHAMPION_ERRORS), metrics=["rmse"], margin={"rmse": "1%"}).promote
    assert margin_of("held_out", "rmse", champion_rmse, GateConfig(margin={"rmse": "10%"})) == pytest.approx(
        0.1 * champion_rmse)
    assert margin_of("held_out", "mae", 0.7, GateConfig(margin={"rmse": 0.5})) == 0.0


def test_a_part_margin_overrides_the_metric_margin_on_that_part_only():
    config = GateConfig(margin={"rmse": "10%", "new_users.rmse": 0.05})
    assert margin_of("new_users", "rmse", 2.0, config) == 0.05
    assert margin_of("anchor", "rmse", 2.0, config) == pytest.approx(0.2)
    worse = CHAMPION_ERRORS * 1.05
    parts = {part: metrics_of(sample(worse)) for part in ("held_out", "new_users")}
    reference = {part: metrics_of(sample(CHAMPION_ERRORS)) for part in ("held_out", "new_users")}
    samples = {part: {"challenger": sample(worse), "champion": sample(CHAMPION_ERRORS)} for part in parts}
    d = decide(parts, reference, GLOBAL_MEAN, GateConfig(metrics=["rmse"], resamples=1000,
                                                         margin={"rmse": "10%", "new_users.rmse": "1%"}), samples)
    assert [(c.part, c.status) for c in d.checks] == [("held_out", "pass"), ("new_users", "fail")]
    assert not d.promote and "rmse on new_users" in d.reason


def test_new_users_part_gates_error_metrics_against_a_champion_only():
    both = metrics() | {"new_users": metrics()["anchor"]}
    d = decide(both, dict(both), GLOBAL_MEAN, POINT)
    assert {(c.part, c.metric) for c in d.checks if c.part == "new_users"} == {("new_users", "rmse")}
    # The first model is judged against the global mean on the observed users only.
    first = decide(both, None, GLOBAL_MEAN, POINT)
    assert {c.part for c in first.checks} == {"held_out", "anchor"} and "new_users" not in first.reason


@pytest.mark.parametrize("bad", [{"rmse": -0.1}, {"rmse": "ten%"}, {"rmse": "5"}, {"auc": 0.1},
                                 {"future.rmse": "1%"}, {"anchor.auc": 0.1}])
def test_bad_margins_are_refused(bad):
    with pytest.raises(ValueError, match="margin"):
        GateConfig(margin=bad)


@pytest.mark.parametrize("policy", ["hold", "ignore"])
def test_too_few_rows_follow_small_sample(policy):
    few = CHAMPION_ERRORS[:10]
    d = gate(sample(few * 3), sample(few), metrics=["rmse"], small_sample=policy)
    [check] = d.checks
    assert check.low is None and check.samples == 10 and check.status == ("hold" if policy == "hold" else "ignored")
    assert "too few for an interval" in check.outcome()
    assert not d.promote and d.alias == "challenger"
    if policy == "hold":
        assert d.reason.startswith("Held")
    else:  # the only check ignored: no evidence, the champion stays
        assert d.reason.startswith("Rejected: every check had too few samples")


def test_an_ignored_small_check_leaves_the_decision_to_the_others():
    few_users = CHAMPION_RECALL[:5]
    d = gate(sample(CHAMPION_ERRORS, few_users * 0.1), sample(CHAMPION_ERRORS * 1.01, few_users))
    assert d.promote, d.reason
    assert {(c.metric, c.status) for c in d.checks} == {("rmse", "pass"), ("recall_at_10", "ignored")}
    assert "too few samples, ignored: recall_at_10 on held_out" in d.reason
    assert not gate(sample(CHAMPION_ERRORS * 1.3, few_users * 0.1), sample(CHAMPION_ERRORS, few_users)).promote


def test_nan_predictions_fail_and_missing_samples_are_skipped():
    broken = CHAMPION_ERRORS.copy()
    broken[3] = np.nan
    d = gate(sample(broken), sample(CHAMPION_ERRORS), metrics=["rmse"])
    assert not d.promote and d.checks[0].status == "fail" and "NaN" in d.reason
    d = decide(metrics(), metrics(), GLOBAL_MEAN, GateConfig())
    assert not d.promote and "no per-row samples" in d.reason


def test_identical_models_pass_with_a_zero_interval():
    d = gate(sample(CHAMPION_ERRORS, CHAMPION_RECALL), sample(CHAMPION_ERRORS, CHAMPION_RECALL))
    assert d.promote and all((c.low, c.high) == (0.0, 0.0) for c in d.checks)


def test_evidence_goes_to_rows_and_mlflow_metrics():
    d = gate(sample(CHAMPION_ERRORS * 1.3), sample(CHAMPION_ERRORS), metrics=["rmse"])
    [row] = check_rows(d)
    assert row["outcome"] == "fail" and row["interval"].startswith("[+") and row["n"] == "2000"
    flat = check_metrics(d)
    assert flat["gate.held_out.rmse.passed"] == 0.0
    assert flat["gate.held_out.rmse.low"] < flat["gate.held_out.rmse.difference"] < flat["gate.held_out.rmse.high"]
    assert flat["gate.held_out.rmse.margin"] == pytest.approx(0.01 * metrics_of(sample(CHAMPION_ERRORS))["rmse"])
