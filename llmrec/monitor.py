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


def drift_columns(history: History, watermark: int, texts: CatalogTexts, reference_rows: int,
                  seed: int, current: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, current): the monitored columns of a uniform sample of `reference_rows`
    history rows (ingest sequence <= `watermark`; all of them when there are fewer) and of
    tonight's new rows (`current`, read here when not given), in their order. Only those rows
    are read, plus, for the counts and first nights of their users and items, a scan of two
    columns filtered to those users and items."""
    reference = history.sample_older(watermark, reference_rows, seed)
    current = history.new_rows(watermark) if current is None else current
    rows = pd.concat([reference, current], ignore_index=True)
    seq = rows["_ingest_seq"]
    users, user_nights = history.activity("user_id", rows, watermark)
    items, _ = history.activity("item_id", rows, watermark)
    night_of_user = pd.MultiIndex.from_arrays([rows["user_id"], seq])
    frame = pd.DataFrame({
        "rating": rows["rating"].astype(np.float64),
        "user_ratings": user_nights.reindex(night_of_user).to_numpy(dtype=np.float64),
        "item_popularity": np.log1p(rows["item_id"].map(items["older"]).fillna(0.0).astype(np.float64)),
        "text_length": rows["item_id"].map(lambda item: len(texts.items.get(item, ""))).astype(np.float64),
        "new_user": np.where(rows["user_id"].map(users["first"]) == seq, "yes", "no"),
        "new_item": np.where(rows["item_id"].map(items["first"]) == seq, "yes", "no"),
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

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: drift.share, drift.<column> (the pinned method's score) and
        drift.one_value_raters."""
        return ({"drift.share": self.share, "drift.one_value_raters": float(len(self.raters))}
                | {f"drift.{column}": score for column, score in self.scores.items()})

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
    `config.hold_threshold`, or a drifted share above `config.drift_threshold`. The reason
    names the raters, or the columns and their scores."""
    if record is None:
        return None
    for seq, batch in sorted(record.batches.items()):
        reason = drift_hold(batch, config)
        if reason:
            return f"ingest batch {seq} ({batch.current_rows} of the {record.current_rows} new rows): {reason}"
    named = [c for c in record.drifted if c in config.hold_columns and record.scores[c] >= config.hold_threshold]
    if record.raters:
        return (f"one-value raters tonight ({', '.join(record.raters)}; monitor.rater_min_ratings "
                f"{config.rater_min_ratings}, monitor.rater_max_share {config.rater_max_share})")
    if not named and record.share <= config.drift_threshold:
        return None
    scores = ", ".join(f"{c} {record.scores[c]:.3f}" for c in record.drifted)
    why = (f"{', '.join(named)} drifted, score >= monitor.hold_threshold {config.hold_threshold}" if named
           else f"drift share {record.share:.2f} > monitor.drift_threshold {config.drift_threshold}")
    return (f"new events drift from the history ({why}; {record.method} score >= {record.threshold}: "
            f"{scores})")


def night_drift(history: History, watermark: int, texts: CatalogTexts, config: MonitorConfig) -> DriftRecord | None:
    """Tonight's drift record, with one record per ingest batch when the new rows span
    several (each with its one-value raters); None on the first night (no history) or
    without new rows."""
    new_rows = history.new_rows(watermark)
    reference, current = drift_columns(history, watermark, texts, config.reference_rows, config.seed, new_rows)
    if reference.empty or current.empty:
        return None
    record = measure_drift(reference, current, config)
    record.raters = one_value_raters(new_rows, config)
    sequences = new_rows["_ingest_seq"].to_numpy()
    if len(np.unique(sequences)) > 1:
        for seq in np.unique(sequences):
            # Only the scores decide a hold; the night's record carries the report.
            batch = measure_drift(reference, current[sequences == seq].reset_index(drop=True), config,
                                  snapshot=False)
            batch.raters = one_value_raters(new_rows[sequences == seq], config)
            record.batches[int(seq)] = batch
    return record


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
