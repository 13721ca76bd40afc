"""The promotion rule: may tonight's challenger replace the champion?

Every comparison is checked by MLflow's own validator (`mlflow.validate_evaluation_results`),
one call per metric and part, so each failure can be reported with both values.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import mlflow
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException

from llmrec.config import GateConfig
from llmrec.window import PARTS

ERROR_METRICS = ("mse", "rmse", "mae")
# Smallest margin MLflow accepts for min_absolute_change (it must be > 0): "strictly better".
STRICT = 1e-12
# The validator logs two INFO lines per call; with one call per check that drowns the run log.
logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)


def lower_is_better(metric: str) -> bool:
    """mse/rmse/mae are errors; recall_at_K and ndcg_at_K are scores."""
    return metric in ERROR_METRICS


def _fmt(value: float) -> str:
    return f"{value:.6g}"


@dataclass
class Check:
    """One gated comparison of the challenger against a reference model."""

    part: str
    metric: str
    challenger: float
    reference: float
    reference_name: str  # "champion" or "global_mean"
    passed: bool
    rule: str
    tolerance: float = 0.0

    def outcome(self) -> str:
        """Short statement of both values, e.g. 'challenger 0.95 > champion 0.93 (tolerance 0)'."""
        if math.isnan(self.challenger):
            return f"challenger is NaN, {self.reference_name} {_fmt(self.reference)}"
        if self.reference_name == "champion":
            worse = ">" if lower_is_better(self.metric) else "<"
            ok = "<=" if lower_is_better(self.metric) else ">="
            sign = worse if not self.passed else ok
            return (
                f"challenger {_fmt(self.challenger)} {sign} champion {_fmt(self.reference)} "
                f"(tolerance {_fmt(self.tolerance)})"
            )
        sign = "<" if self.passed else ">="
        return (
            f"challenger {_fmt(self.challenger)} {sign} {self.reference_name} "
            f"{_fmt(self.reference)} (must be strictly lower)"
        )


@dataclass
class Decision:
    """The gate's verdict: promote or not, which alias the new version gets, and why."""

    promote: bool
    alias: str  # "champion" | "challenger"
    reason: str
    checks: list[Check]
    skipped: list[str] = field(default_factory=list)  # comparisons that could not be made, and why

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return asdict(self)


def _value(metrics: dict, part: str, metric: str) -> float:
    """A metric as float; a missing one counts as NaN (not measured)."""
    value = metrics.get(part, {}).get(metric)
    return math.nan if value is None else float(value)


def _mlflow_passes(metric: str, challenger: float, baseline: float, threshold: MetricThreshold) -> bool:
    """Run MLflow's validator on one metric; True when it raises nothing."""
    if math.isnan(challenger):
        # MLflow compares through Decimal, where NaN raises instead of failing.
        return False
    try:
        mlflow.validate_evaluation_results(
            {metric: threshold},
            EvaluationResult(metrics={metric: challenger}, artifacts={}),
            EvaluationResult(metrics={metric: baseline}, artifacts={}),
        )
    except ModelValidationFailedException:
        return False
    return True


def _vs_champion(part: str, metric: str, challenger: float, champion: float, tolerance: float) -> Check:
    lower = lower_is_better(metric)
    # MLflow rejects min_absolute_change <= 0, so "no worse than champion by more than tolerance"
    # is an absolute `threshold` at the champion's value shifted by the tolerance. A shifted
    # baseline with min_relative_change=0.0 would do the same except when it is 0 (e.g. recall
    # 0.0 on a tiny anchor set): MLflow then demands a strict improvement and an equal
    # challenger would be rejected.
    bound = champion + tolerance if lower else champion - tolerance
    threshold = MetricThreshold(threshold=bound, greater_is_better=not lower)
    verb = "exceed" if lower else "fall below"
    sign = "+" if lower else "-"
    rule = (
        f"{metric} on {part} must not {verb} champion's {_fmt(champion)} {sign} tolerance {_fmt(tolerance)}"
    )
    passed = _mlflow_passes(metric, challenger, champion, threshold)
    return Check(part, metric, challenger, champion, "champion", passed, rule, tolerance)


def _vs_global_mean(part: str, metric: str, challenger: float, baseline: float) -> Check:
    threshold = MetricThreshold(min_absolute_change=STRICT, greater_is_better=False)
    rule = (
        f"{metric} on {part} must be strictly below the global-mean predictor's {_fmt(baseline)} "
        "(first model; ranking metrics are not compared, a constant predictor has no ranking)"
    )
    passed = _mlflow_passes(metric, challenger, baseline, threshold)
    return Check(part, metric, challenger, baseline, "global_mean", passed, rule)


def decide(challenger: dict, champion: dict | None, global_mean: dict, config: GateConfig) -> Decision:
    """Compare the challenger's metrics with the champion's (or, for the first model, with the
    global-mean predictor's) on both held-out parts and decide whether to promote it.

    Metrics are nested `{part: {metric: value}}`. A part missing from either side, or a metric
    that is NaN on the reference side or on both, is skipped and named in the reason; a NaN
    challenger against a finite reference fails.
    """
    checks: list[Check] = []
    skipped: list[str] = []
    if champion is not None:
        reference_name, reference, metrics = "champion", champion, list(config.metrics)
    else:
        reference_name, reference = "global_mean", global_mean
        metrics = [m for m in config.metrics if lower_is_better(m)]
        ranking = [m for m in config.metrics if not lower_is_better(m)]
        if ranking:
            skipped.append(
                f"{', '.join(ranking)} not compared with the global mean, a constant predictor has no ranking"
            )

    for part in PARTS:
        missing = [side for side, m in (("challenger", challenger), (reference_name, reference)) if part not in m]
        if missing:
            skipped.append(f"part {part} missing from {' and '.join(missing)}")
            continue
        for metric in metrics:
            ours, theirs = _value(challenger, part, metric), _value(reference, part, metric)
            if math.isnan(theirs):
                skipped.append(f"{metric} on {part} not comparable, {reference_name} value is NaN")
                continue
            if champion is not None:
                checks.append(_vs_champion(part, metric, ours, theirs, config.tolerance))
            else:
                checks.append(_vs_global_mean(part, metric, ours, theirs))

    failed = [c for c in checks if not c.passed]
    if failed:
        promote, head = False, "Rejected: " + "; ".join(f"{c.metric} on {c.part}: {c.outcome()}" for c in failed)
    elif champion is not None and not checks:
        # Nothing could be compared: keeping the proven champion is the safe choice.
        promote, head = False, "Rejected: no gated metric could be compared with the champion"
    elif champion is not None:
        promote, head = True, (
            f"Promoted: no gated metric regressed against the champion "
            f"({len(checks)} checks, tolerance {_fmt(config.tolerance)})"
        )
    elif checks:
        promote, head = True, (
            f"Promoted: first model, beats the global-mean predictor on all {len(checks)} error checks"
        )
    else:
        promote, head = True, "Promoted: first model, no gated error metric to compare with the global mean"
    note = f" (skipped: {' / '.join(skipped)})" if skipped else ""
    return Decision(promote, "champion" if promote else "challenger", head + note + ".", checks, skipped)
