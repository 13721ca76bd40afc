"""Night-by-night monitoring: how far tonight's new events drift from the training history
(an Evidently data-drift report), and whether that drift must hold the challenger back.

Every event row is described by the columns below; tonight's new rows (ingest sequence
above the watermark: rows no gate has judged yet, see llmrec.window) are the current data,
a seeded uniform sample of the older curated rows (`monitor.reference_rows`) the reference.
When the new rows span several ingest batches (after a night that crashed before its gate)
each batch is also measured on its own, so a bad batch cannot hide among clean ones.

    rating          the rating itself
    user_ratings    ratings the row's user gave in the row's night (heavy raters, bots)
    item_popularity log(1 + ratings of the row's item in the history): popular vs long tail
    text_length     characters of the item's text (catalog changes)
    new_user        "yes" when the row's user first appears in the row's night
    new_item        the same for the item

Drift of each column alone misses a night whose ratings are attached to the wrong rows (a
bad join, ratings shuffled between rows): every marginal distribution stays the same. The
rating consistency catches it: per user with `monitor.consistency_min_ratings` or more new
ratings of items the history knows, the correlation between those ratings and the items'
mean rating in the history; averaged over users (Fisher z, weighted by n - 3). Within a
user, so a generous or harsh rater does not count, and over users, so one heavy rater
cannot sway it. Its level belongs to the domain (MovieLens weeks 0.32-0.52), so a night is
held when it falls below `monitor.consistency_ratio` of the median over the earlier nights
(the trend): 30% of a MovieLens week's ratings shuffled bring it to 0.50-0.89 of that,
ordinary weeks stay at 0.80 or more (benchmarks/night_statistics.py).

Evidently picks a drift test by sample size (p-values up to 1,000 rows, distances above),
so its per-column scores would change meaning from night to night; the method is pinned
(`monitor.drift_method`, default Jensen-Shannon distance, 0 = same distribution, 1 =
disjoint) with its threshold, and a column drifts when its score reaches the threshold.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.config import MonitorConfig
from llmrec.history import History
from llmrec.schema import CatalogTexts

NUMERIC = ["rating", "user_ratings", "item_popularity", "text_length"]
CATEGORICAL = ["new_user", "new_item"]
# Not a drift column: the row's item's mean rating in the history (for the rating consistency),
# shrunk toward the history's mean by this many ratings so a film rated twice is not an outlier.
ITEM_MEAN = "item_mean_rating"
PRIOR_RATINGS = 10.0


def drift_columns(history: History, watermark: int, texts: CatalogTexts, reference_rows: int,
                  seed: int, current: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, current): the monitored columns of a uniform sample of `reference_rows`
    history rows (ingest sequence <= `watermark`; all of them when there are fewer) and of
    tonight's new rows (`current`, read here when not given), in their order. Only those rows
    are read, plus, for the counts and first nights of their users and items, a scan of two
    columns filtered to those users and items. Both frames also carry `ITEM_MEAN` (NaN for an
    item without older ratings)."""
    reference = history.sample_older(watermark, reference_rows, seed)
    current = history.new_rows(watermark) if current is None else current
    rows = pd.concat([reference, current], ignore_index=True)
    seq = rows["_ingest_seq"]
    users, user_nights = history.activity("user_id", rows, watermark)
    items, _ = history.activity("item_id", rows, watermark, rating_sums=True)
    night_of_user = pd.MultiIndex.from_arrays([rows["user_id"], seq])
    mean = reference["rating"].mean()
    item_mean = (items["older_rating"] + PRIOR_RATINGS * mean) / (items["older"] + PRIOR_RATINGS)
    frame = pd.DataFrame({
        "rating": rows["rating"].astype(np.float64),
        "user_ratings": user_nights.reindex(night_of_user).to_numpy(dtype=np.float64),
        "item_popularity": np.log1p(rows["item_id"].map(items["older"]).fillna(0.0).astype(np.float64)),
        "text_length": rows["item_id"].map(lambda item: len(texts.items.get(item, ""))).astype(np.float64),
        "new_user": np.where(rows["user_id"].map(users["first"]) == seq, "yes", "no"),
        "new_item": np.where(rows["item_id"].map(items["first"]) == seq, "yes", "no"),
        ITEM_MEAN: rows["item_id"].map(item_mean.where(items["older"] > 0)).astype(np.float64),
    })
    return frame.iloc[:len(reference)].reset_index(drop=True), frame.iloc[len(reference):].reset_index(drop=True)


@dataclass
class DriftRecord:
    """Tonight's drift: per-column scores, which columns drifted, the drifted share, and
    the Evidently snapshot as JSON and HTML (for MLflow artifacts)."""

    method: str
    threshold: float
    scores: dict[str, float]
    drifted: list[str]
    share: float
    reference_rows: int
    current_rows: int
    json: str = ""
    html: str = ""
    # Tonight's one-value raters (`one_value_raters`), e.g. "user 7: 500 ratings, 100% 5".
    raters: list[str] = field(default_factory=list)
    # When the new rows span several ingest batches: each batch's own record, by sequence.
    batches: dict[int, DriftRecord] = field(default_factory=dict)
    # `rating_consistency` of the new rows and the users it averaged (None: no such user),
    # and the earlier nights' median it is held against (None: too few earlier nights).
    consistency: float | None = None
    consistency_users: int = 0
    consistency_baseline: float | None = None

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: drift.share, drift.<column> (the pinned method's score),
        drift.one_value_raters and drift.rating_consistency (when measured)."""
        consistency = {} if self.consistency is None else {"drift.rating_consistency": self.consistency}
        return ({"drift.share": self.share, "drift.one_value_raters": float(len(self.raters))}
                | {f"drift.{column}": score for column, score in self.scores.items()} | consistency)

    def rows(self) -> list[dict]:
        """One row per column for render_table."""
        return [{"column": column, "score": score, "threshold": self.threshold,
                 "drifted": "yes" if column in self.drifted else "no"} for column, score in self.scores.items()]


def measure_drift(reference: pd.DataFrame, current: pd.DataFrame, config: MonitorConfig,
                  snapshot: bool = True) -> DriftRecord:
    """Run Evidently's data-drift preset with the pinned method on every monitored column.
    The reference is subsampled to `config.reference_rows` (seeded) to bound the cost.
    `snapshot=False` keeps the scores only (no JSON and HTML rendered)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if len(reference) > config.reference_rows:
        reference = reference.sample(n=config.reference_rows, random_state=config.seed).reset_index(drop=True)
    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=CATEGORICAL)
    current, reference = current[NUMERIC + CATEGORICAL], reference[NUMERIC + CATEGORICAL]
    preset = DataDriftPreset(method=config.drift_method, threshold=config.column_threshold)
    snapshot = Report([preset]).run(Dataset.from_pandas(current, data_definition=definition),
                                    Dataset.from_pandas(reference, data_definition=definition))
    scores = {}
    for metric in snapshot.dict()["metrics"]:
        if metric["config"]["type"].endswith("ValueDrift"):
            scores[metric["config"]["column"]] = float(metric["value"])
    scores = {column: scores[column] for column in NUMERIC + CATEGORICAL if column in scores}
    drifted = [column for column, score in scores.items() if score >= config.column_threshold]
    share = len(drifted) / len(scores) if scores else 0.0
    if not snapshot:
        return DriftRecord(config.drift_method, config.column_threshold, scores, drifted, share, len(reference),
                           len(current))
    with tempfile.TemporaryDirectory() as scratch:
        snapshot.save_html(str(Path(scratch) / "drift.html"))
        html = (Path(scratch) / "drift.html").read_text()
    return DriftRecord(config.drift_method, config.column_threshold, scores, drifted, share, len(reference),
                       len(current), json=snapshot.json(), html=html)


def drift_hold(record: DriftRecord | None, config: MonitorConfig) -> str | None:
    """Why tonight's challenger must not be promoted automatically, or None: a one-value
    rater, a column of `config.hold_columns` (the rating distribution) scoring at least
    `config.hold_threshold`, a drifted share above `config.drift_threshold`, or a rating
    consistency (over at least `config.consistency_min_users` users) below
    `config.consistency_ratio` x the earlier nights' median. The reason names the raters,
    the columns and their scores, or the consistency and its reference."""
    if record is None:
        return None
    for seq, batch in sorted(record.batches.items()):
        reason = drift_hold(batch, config)
        if reason:
            return f"ingest batch {seq} ({batch.current_rows} of the {record.current_rows} new rows): {reason}"
    if record.raters:
        return (f"one-value raters tonight ({', '.join(record.raters)}; monitor.rater_min_ratings "
                f"{config.rater_min_ratings}, monitor.rater_max_share {config.rater_max_share})")
    named = [c for c in record.drifted if c in config.hold_columns and record.scores[c] >= config.hold_threshold]
    if named or record.share > config.drift_threshold:
        scores = ", ".join(f"{c} {record.scores[c]:.3f}" for c in record.drifted)
        why = (f"{', '.join(named)} drifted, score >= monitor.hold_threshold {config.hold_threshold}" if named
               else f"drift share {record.share:.2f} > monitor.drift_threshold {config.drift_threshold}")
        return (f"new events drift from the history ({why}; {record.method} score >= {record.threshold}: "
                f"{scores})")
    baseline = record.consistency_baseline
    if (record.consistency is not None and baseline is not None and config.consistency_ratio > 0
            and record.consistency_users >= config.consistency_min_users
            and record.consistency < config.consistency_ratio * baseline):
        return (f"tonight's ratings agree with the items' past ratings less than earlier nights' did "
                f"(rating consistency {record.consistency:.3f} over {record.consistency_users} users < "
                f"monitor.consistency_ratio {config.consistency_ratio} x {baseline:.3f}, the earlier nights' "
                f"median): ratings attached to the wrong rows?")
    return None


def consistency_baseline(earlier: list[float], config: MonitorConfig) -> float | None:
    """The median of the earlier nights' rating consistency (the trend), or None with fewer
    than `config.consistency_min_nights` of them."""
    return float(np.median(earlier)) if len(earlier) >= config.consistency_min_nights else None


def night_drift(history: History, watermark: int, texts: CatalogTexts, config: MonitorConfig,
                baseline: float | None = None) -> DriftRecord | None:
    """Tonight's drift record, with one record per ingest batch when the new rows span
    several (each with its one-value raters and rating consistency, held against the same
    `baseline`: `consistency_baseline` of the earlier nights); None on the first night (no
    history) or without new rows."""
    new_rows = history.new_rows(watermark)
    reference, current = drift_columns(history, watermark, texts, config.reference_rows, config.seed, new_rows)
    if reference.empty or current.empty:
        return None

    def measured(rows: np.ndarray, snapshot: bool) -> DriftRecord:
        """The drift record of the new rows where `rows` is true: column scores, one-value
        raters and rating consistency (held against `baseline`)."""
        part = current[rows].reset_index(drop=True)
        record = measure_drift(reference, part, config, snapshot=snapshot)
        record.raters = one_value_raters(new_rows[rows], config)
        record.consistency, record.consistency_users = rating_consistency(
            new_rows["user_id"][rows].reset_index(drop=True), part, config)
        record.consistency_baseline = baseline
        return record

    sequences = new_rows["_ingest_seq"].to_numpy()
    record = measured(np.ones(len(sequences), dtype=bool), snapshot=True)
    if len(np.unique(sequences)) > 1:
        # Only the scores decide a hold; the night's record carries the report.
        record.batches = {int(seq): measured(sequences == seq, snapshot=False) for seq in np.unique(sequences)}
    return record


def rating_consistency(user_ids: pd.Series, current: pd.DataFrame, config: MonitorConfig) -> tuple[float | None, int]:
    """(consistency, users): over the users with at least `config.consistency_min_ratings`
    of the `current` rows (the monitored columns of their rows, in the order of `user_ids`)
    on items with a history mean, the Pearson correlation of each user's ratings with those
    items' `ITEM_MEAN`, averaged as Fisher z weighted by n - 3; (None, 0) without such a
    user. A user whose ratings (or items' means) are all equal has no correlation and is
    left out."""
    rows = pd.DataFrame({"user": user_ids.to_numpy(), "rating": current["rating"].to_numpy(),
                         "item_mean": current[ITEM_MEAN].to_numpy()}).dropna()
    rows = rows[rows.groupby("user")["rating"].transform("size") >= config.consistency_min_ratings]
    by_user = rows.groupby("user")
    rating = rows["rating"] - by_user["rating"].transform("mean")
    item_mean = rows["item_mean"] - by_user["item_mean"].transform("mean")
    sums = pd.DataFrame({"user": rows["user"], "cross": rating * item_mean, "rating": rating ** 2,
                         "item_mean": item_mean ** 2, "n": 1}).groupby("user").sum()
    sums = sums[(sums["rating"] > 0) & (sums["item_mean"] > 0)]
    if sums.empty:
        return None, 0
    correlation = (sums["cross"] / np.sqrt(sums["rating"] * sums["item_mean"])).clip(-0.999, 0.999)
    weight = sums["n"] - 3
    return float(np.tanh(np.sum(np.arctanh(correlation) * weight) / weight.sum())), len(sums)


def one_value_raters(new_rows: pd.DataFrame, config: MonitorConfig) -> list[str]:
    """Users with at least `config.rater_min_ratings` ratings among tonight's rows, more than
    `config.rater_max_share` of them one value (a rating bot), as "user U: N ratings, S% R"."""
    counts = new_rows.groupby("user_id")["rating"].size()
    heavy = new_rows[new_rows["user_id"].isin(counts.index[counts >= config.rater_min_ratings])]
    found = []
    for user, ratings in heavy.groupby("user_id")["rating"]:
        shares = ratings.value_counts(normalize=True)
        if shares.iloc[0] > config.rater_max_share:
            found.append(f"user {user}: {len(ratings)} ratings, {shares.iloc[0]:.0%} {shares.index[0]:g}")
    return found
