"""The promotion rule: may tonight's challenger replace the champion?

Two rules (`gate.rule`):

- `bootstrap` (default): for every gated metric and part, the difference challenger minus
  champion on the same rows, with a paired bootstrap confidence interval (rows resampled for
  mse/rmse/mae, ranked users for recall@K/NDCG@K; scipy.stats.bootstrap, percentile method,
  seeded). A check fails only when the whole interval lies beyond `gate.margin` on the worse
  side: the challenger is worse by more than the margin with that confidence. Fewer rows or
  users than `gate.min_samples` give no meaningful interval; the check then follows
  `gate.small_sample` (ignore the check, or hold the challenger back).
- `point`: point estimate against point estimate with an absolute `gate.tolerance`, each
  comparison checked by MLflow's own validator (`mlflow.validate_evaluation_results`).

The first model (no champion) must beat the global-mean predictor's point estimates on the
error metrics under either rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from scipy import stats

from llmrec.config import PARTS, RATING_ONLY_PARTS, GateConfig

if TYPE_CHECKING:
    from llmrec.evaluate import Sample

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
    # The bootstrap rule's evidence: challenger - champion, its confidence interval, the
    # margin in the metric's units, how many rows or users were resampled, and the status
    # (pass, fail, hold = too few samples and held, ignored = too few samples and ignored).
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    margin: float | None = None
    samples: int | None = None
    status: str = ""

    def outcome(self) -> str:
        """Short statement of both values, e.g. 'challenger 0.95 > champion 0.93 (tolerance 0)'."""
        if self.status:
            return self._interval_outcome()
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

    def _interval_outcome(self) -> str:
        unit = "users" if not lower_is_better(self.metric) else "rows"
        if self.difference is None or math.isnan(self.difference):
            return f"challenger is NaN, champion {_fmt(self.reference)}"
        head = f"difference {self.difference:+.4g}"
        if self.low is None:
            return f"{head}, only {self.samples} {unit}: too few for an interval ({self.status})"
        return (f"{head} [{self.low:+.4g}, {self.high:+.4g}] over {self.samples} {unit}, "
                f"margin {self.margin:.4g}: {self.status}")


@dataclass
class Decision:
    """The gate's verdict: promote or not, which alias the new version gets, and why."""

    promote: bool
    alias: str  # "champion" | "challenger"
    reason: str
    checks: list[Check]
    skipped: list[str] = field(default_factory=list)  # comparisons that could not be made, and why
    drift_hold: str = ""  # why the night's drift held back a challenger the checks would promote

    def failed(self) -> list[Check]:
        """Checks that stop the promotion: failed, or held for too few samples."""
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return asdict(self)


def check_rows(decision: Decision) -> list[dict]:
    """One row per check for render_table: estimate, interval, margin and outcome."""
    rows = []
    for c in decision.checks:
        interval = "" if c.low is None else f"[{c.low:+.4g}, {c.high:+.4g}]"
        difference = c.challenger - c.reference if c.difference is None else c.difference
        rows.append({"part": c.part, "metric": c.metric, "challenger": c.challenger,
                     "reference": f"{c.reference_name} {_fmt(c.reference)}", "difference": f"{difference:+.4g}",
                     "interval": interval, "margin": "" if c.margin is None else _fmt(c.margin),
                     "n": "" if c.samples is None else str(c.samples),
                     "outcome": c.status or ("pass" if c.passed else "fail")})
    return rows


def check_metrics(decision: Decision) -> dict[str, float]:
    """The checks as MLflow metrics: gate.<part>.<metric>.{difference,low,high,margin,passed}."""
    out = {}
    for c in decision.checks:
        key = f"gate.{c.part}.{c.metric}"
        out[f"{key}.passed"] = float(c.passed)
        for name in ("difference", "low", "high", "margin"):
            value = getattr(c, name)
            if value is not None and math.isfinite(value):
                out[f"{key}.{name}"] = value
    return out


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


def margin_of(part: str, metric: str, champion: float, config: GateConfig) -> float:
    """`gate.margin["<part>.<metric>"]`, else `gate.margin[metric]`, in the metric's units: a
    number is absolute, "2%" is relative to the champion's value; a metric without a margin
    has 0."""
    value = config.margin.get(f"{part}.{metric}", config.margin.get(metric, 0.0))
    if isinstance(value, str):
        return abs(champion) * float(value.rstrip("%")) / 100.0
    return float(value)


def paired_values(metric: str, challenger: Sample, champion: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The per-unit values whose means the metric is built from, paired: squared or absolute
    errors per row for mse/rmse/mae, the per-user score for ranking metrics."""
    if metric in ("mse", "rmse"):
        return challenger.errors**2, champion.errors**2
    if metric == "mae":
        return np.abs(challenger.errors), np.abs(champion.errors)
    users = challenger.users.index.intersection(champion.users.index)
    return (challenger.users.loc[users, metric].to_numpy(np.float64),
            champion.users.loc[users, metric].to_numpy(np.float64))


def metric_difference(metric: str):
    """statistic(challenger_values, champion_values, axis) = metric(challenger) - metric(champion)."""
    if metric == "rmse":
        return lambda a, b, axis=-1: np.sqrt(np.mean(a, axis=axis)) - np.sqrt(np.mean(b, axis=axis))
    return lambda a, b, axis=-1: np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_interval(metric: str, ours: np.ndarray, theirs: np.ndarray, resamples: int, confidence: float,
                    seed: int) -> tuple[float, float, float]:
    """(difference, low, high): the metric's difference challenger - champion and its paired
    percentile bootstrap interval; row i of `ours` and `theirs` is resampled together."""
    statistic = metric_difference(metric)
    difference = float(statistic(ours, theirs))
    if np.all(ours == theirs):
        # Identical models: every resample gives 0, and scipy warns about a degenerate distribution.
        return difference, difference, difference
    result = stats.bootstrap((ours, theirs), statistic, paired=True, vectorized=True, n_resamples=resamples,
                             confidence_level=confidence, method="percentile", batch=max(1, 2_000_000 // len(ours)),
                             rng=np.random.default_rng(seed))
    return difference, float(result.confidence_interval.low), float(result.confidence_interval.high)


def _bootstrap_check(part: str, metric: str, challenger: float, champion: float, ours: Sample, theirs: Sample,
                     config: GateConfig) -> Check:
    lower = lower_is_better(metric)
    margin = margin_of(part, metric, champion, config)
    a, b = paired_values(metric, ours, theirs)
    worse = "higher" if lower else "lower"
    rule = (f"{metric} on {part}: fails when the challenger is {worse} than the champion by more than "
            f"{_fmt(margin)} with {config.confidence:.0%} confidence (paired bootstrap over "
            f"{'rows' if lower else 'users'}, {config.resamples} resamples)")
    check = Check(part, metric, challenger, champion, "champion", False, rule, margin=margin, samples=len(a))
    if not np.all(np.isfinite(a)):
        check.difference, check.status = math.nan, "fail"
        return check
    if len(a) < config.min_samples:
        check.difference = float(metric_difference(metric)(a, b)) if len(a) else math.nan
        check.status = "hold" if config.small_sample == "hold" else "ignored"
        check.passed = config.small_sample == "ignore"
        return check
    seed = config.seed + sum(map(ord, f"{part}.{metric}"))  # one stream per check, stable across runs
    check.difference, check.low, check.high = paired_interval(metric, a, b, config.resamples, config.confidence, seed)
    beyond = check.low > margin if lower else check.high < -margin
    check.passed, check.status = not beyond, "fail" if beyond else "pass"
    return check


def decide(challenger: dict, champion: dict | None, global_mean: dict, config: GateConfig,
           samples: dict | None = None) -> Decision:
    """Compare the challenger's metrics with the champion's (or, for the first model, with the
    global-mean predictor's) on the evaluated parts (`PARTS`) and decide whether to promote it.

    Metrics are nested `{part: {metric: value}}`; `samples` is evaluate_models' `samples`
    (`{part: {"challenger": Sample, "champion": Sample}}`), needed by the bootstrap rule. A
    part missing from either side, or a metric that is NaN on the reference side or on both,
    is skipped and named in the reason; a NaN challenger against a finite reference fails.
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
        if part in RATING_ONLY_PARTS and champion is None:
            continue  # the first model is judged against the global mean on the observed users
        missing = [side for side, m in (("challenger", challenger), (reference_name, reference)) if part not in m]
        if missing:
            skipped.append(f"part {part} missing from {' and '.join(missing)}")
            continue
        for metric in metrics:
            if part in RATING_ONLY_PARTS and not lower_is_better(metric):
                continue
            ours, theirs = _value(challenger, part, metric), _value(reference, part, metric)
            if math.isnan(theirs):
                skipped.append(f"{metric} on {part} not comparable, {reference_name} value is NaN")
                continue
            pair = (samples or {}).get(part, {})
            if champion is not None and config.rule == "bootstrap":
                if "challenger" not in pair or "champion" not in pair:
                    skipped.append(f"{metric} on {part} not compared, no per-row samples for the bootstrap")
                    continue
                checks.append(_bootstrap_check(part, metric, ours, theirs, pair["challenger"], pair["champion"],
                                               config))
            elif champion is not None:
                checks.append(_vs_champion(part, metric, ours, theirs, config.tolerance))
            else:
                checks.append(_vs_global_mean(part, metric, ours, theirs))

    failed = [c for c in checks if not c.passed and c.status != "hold"]
    held = [c for c in checks if c.status == "hold"]
    if failed:
        promote, head = False, "Rejected: " + "; ".join(f"{c.metric} on {c.part}: {c.outcome()}" for c in failed)
    elif held:
        promote, head = False, ("Held (gate.small_sample=hold): too few samples for a confidence interval: "
                                + "; ".join(f"{c.metric} on {c.part}: {c.outcome()}" for c in held))
    elif champion is not None and not checks:
        # Nothing could be compared: keeping the proven champion is the safe choice.
        promote, head = False, "Rejected: no gated metric could be compared with the champion"
    elif champion is not None and all(c.status == "ignored" for c in checks):
        promote, head = False, ("Rejected: every check had too few samples for an interval "
                                "(gate.small_sample=ignore), no evidence either way")
    elif champion is not None and config.rule == "bootstrap":
        ignored = [f"{c.metric} on {c.part}" for c in checks if c.status == "ignored"]
        promote, head = True, (
            f"Promoted: no gated metric worse than the champion beyond its margin with "
            f"{config.confidence:.0%} confidence ({len(checks) - len(ignored)} checks"
            + (f"; too few samples, ignored: {', '.join(ignored)}" if ignored else "") + ")"
        )
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


def hold_for_drift(decision: Decision, drift_reason: str | None) -> Decision:
    """A challenger the checks would promote is not promoted automatically on a night whose
    new events drift (its own held-out rows come from the same, possibly wrong, data). The
    drift is recorded on every decision of such a night, promoted or not."""
    if drift_reason is None:
        return decision
    if not decision.promote:
        return replace(decision, reason=f"{decision.reason} Drift: {drift_reason}.", drift_hold=drift_reason)
    reason = f"Rejected (drift hold): {drift_reason}. The checks alone would have promoted it: {decision.reason}"
    return replace(decision, promote=False, alias="challenger", reason=reason, drift_hold=drift_reason)
