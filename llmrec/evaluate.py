"""Metrics as plain functions over dataframes with named columns, and the evaluation of a
model on the held-out parts.

Ranking protocol: relevant = held-out rows with rating >= `relevant_rating`; candidates =
every catalog item the user has not rated in training; users without a relevant held-out
item are not ranked. recall@K = hits in the top K / relevant items of the user, averaged
over users; NDCG@K uses binary gains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llmrec.config import NightlyConfig
from llmrec.encoder import TextCache
from llmrec.model import Checkpoint
from llmrec.schema import CatalogTexts
from llmrec.scoring import Scorer
from llmrec.window import Window, without


def rating_metrics(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if len(truth) == 0:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan}
    error = prediction - truth
    mse = float(np.mean(error**2))
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(error)))}


def recall_per_user(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.Series:
    """|top-k ∩ relevant| / |relevant| for every user with a relevant item, by user_id."""
    per_user = _hits(relevant, top_k, k)
    return (per_user["hits"] / per_user["relevant"]).rename(f"recall_at_{k}")


def ndcg_per_user(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.Series:
    """Binary-gain NDCG@k for every user with a relevant item, by user_id."""
    relevant = relevant[["user_id", "item_id"]].drop_duplicates()
    if relevant.empty:
        return pd.Series(dtype=np.float64, name=f"ndcg_at_{k}")
    top = top_k[top_k["rank"] <= k]
    hit = top.merge(relevant, on=["user_id", "item_id"])
    dcg = (1.0 / np.log2(hit["rank"].to_numpy() + 1.0))
    dcg = pd.Series(dcg, index=hit["user_id"].to_numpy()).groupby(level=0).sum()
    counts = relevant.groupby("user_id").size()
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    idcg = counts.clip(upper=k).map(lambda n: discounts[n - 1])
    return (dcg.reindex(idcg.index, fill_value=0.0) / idcg).rename(f"ndcg_at_{k}")


def recall_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Mean over users with a relevant item of |top-k ∩ relevant| / |relevant|."""
    per_user = recall_per_user(relevant, top_k, k)
    return float(per_user.mean()) if len(per_user) else math.nan


def ndcg_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Binary-gain NDCG@k averaged over users with a relevant item."""
    per_user = ndcg_per_user(relevant, top_k, k)
    return float(per_user.mean()) if len(per_user) else math.nan


def _hits(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.DataFrame:
    relevant = relevant[["user_id", "item_id"]].drop_duplicates()
    counts = relevant.groupby("user_id").size().rename("relevant")
    hit = top_k[top_k["rank"] <= k].merge(relevant, on=["user_id", "item_id"])
    hits = hit.groupby("user_id").size().rename("hits")
    return pd.concat([counts, hits], axis=1).fillna({"hits": 0}).dropna(subset=["relevant"])


@dataclass
class Sample:
    """What one model's metrics on one part are averages of, for the statistical gate:
    `errors` = prediction - truth per row (in the part's row order), `users` = recall@K and
    NDCG@K per ranked user (index user_id, sorted). Two models scored on the same part have
    the same rows and the same users, so their samples pair up."""

    errors: np.ndarray
    users: pd.DataFrame


def evaluate(scorer: Scorer, rows: pd.DataFrame, trained_pairs: pd.DataFrame, k: int,
             relevant_rating: float, positive_threshold: float | None = None) -> dict[str, float]:
    """All metrics of one model on one held-out part. `trained_pairs` (user_id, item_id)
    are excluded from the candidates. For a bce model the rating metrics compare the
    predicted probability with the 0/1 label."""
    return evaluate_sample(scorer, rows, trained_pairs, k, relevant_rating, positive_threshold)[0]


def evaluate_sample(scorer: Scorer, rows: pd.DataFrame, trained_pairs: pd.DataFrame, k: int,
                    relevant_rating: float, positive_threshold: float | None = None) -> tuple[dict[str, float], Sample]:
    """`evaluate`'s metrics and the per-row errors and per-user scores they average."""
    truth = rows["rating"].to_numpy(dtype=np.float64)
    if scorer.loss_kind == "bce":
        truth = (truth >= positive_threshold).astype(np.float64)
    prediction = np.asarray(scorer.predict(rows["user_id"].tolist(), rows["item_id"].tolist()), dtype=np.float64)
    metrics = rating_metrics(truth, prediction)
    relevant = rows.loc[rows["rating"] >= relevant_rating, ["user_id", "item_id"]]
    users = sorted(relevant["user_id"].unique())
    top = scorer.top_k(users, k, exclude=trained_pairs)
    per_user = pd.concat([recall_per_user(relevant, top, k), ndcg_per_user(relevant, top, k)], axis=1).sort_index()
    for name in per_user.columns:
        metrics[name] = float(per_user[name].mean()) if len(per_user) else math.nan
    return metrics, Sample(errors=prediction - truth, users=per_user)


SEGMENTS = ("all", "cold users", "cold items", "heavy users", "long-tail items")


def segment_masks(rows: pd.DataFrame, history: pd.DataFrame, evaluation) -> dict[str, np.ndarray]:
    """Which rows of a part fall in each segment, by the ratings of `history` (every event
    outside the part): cold users/items have fewer than `cold_ratings`; heavy users are the
    top `heavy_user_share` of users by ratings; long-tail items are outside the top
    `head_item_share` of items."""
    users = history.groupby("user_id").size()
    items = history.groupby("item_id").size()
    user_count = rows["user_id"].map(users).fillna(0).to_numpy()
    item_count = rows["item_id"].map(items).fillna(0).to_numpy()
    heavy = users.nlargest(max(1, int(round(len(users) * evaluation.heavy_user_share)))).index if len(users) else []
    head = items.nlargest(max(1, int(round(len(items) * evaluation.head_item_share)))).index if len(items) else []
    return {
        "all": np.ones(len(rows), dtype=bool),
        "cold users": user_count < evaluation.cold_ratings,
        "cold items": item_count < evaluation.cold_ratings,
        "heavy users": rows["user_id"].isin(heavy).to_numpy(),
        "long-tail items": ~rows["item_id"].isin(head).to_numpy(),
    }


def segment_rows(part: str, rows: pd.DataFrame, history: pd.DataFrame, samples: dict, evaluation) -> list[dict]:
    """Per segment of a part: rows, users ranked, and rmse / mae / recall@K of each model
    (recall over the segment's users that were ranked; for item segments it is not defined)."""
    out = []
    recall = f"recall_at_{evaluation.k}"
    for segment, mask in segment_masks(rows, history, evaluation).items():
        row = {"part": part, "segment": segment, "rows": int(mask.sum())}
        users = pd.Index(rows.loc[mask, "user_id"].unique())
        # Both models rank the same users; item segments mix users, recall is not split by item.
        ranked = samples["challenger"].users.index.intersection(users) if "items" not in segment else pd.Index([])
        row["users ranked"] = len(ranked)
        for who, sample in samples.items():
            errors = sample.errors[mask]
            row[f"{who} rmse"] = float(np.sqrt(np.mean(errors**2))) if len(errors) else math.nan
            row[f"{who} mae"] = float(np.mean(np.abs(errors))) if len(errors) else math.nan
            row[f"{who} {recall}"] = float(sample.users.loc[ranked, recall].mean()) if len(ranked) else math.nan
        out.append(row)
    return out


def global_mean_metrics(mean: float, rows: pd.DataFrame) -> dict[str, float]:
    truth = rows["rating"].to_numpy(dtype=np.float64)
    return rating_metrics(truth, np.full(len(truth), mean))


def evaluate_models(window: Window, events: pd.DataFrame, challenger: Checkpoint, champion: Checkpoint | None,
                    cache: TextCache, texts: CatalogTexts, config: NightlyConfig) -> dict:
    """Score challenger and champion on the same held-out rows, plus the global-mean
    predictor: {"challenger": {part: metrics}, "champion": ... or None, "global_mean": ...,
    "samples": {part: {"challenger": Sample, "champion": Sample (when there is one)}},
    "segments": [one row per part and segment, see `segment_rows`]}.
    Candidates for ranking exclude every pair in `events` outside the part itself."""
    parts = {"held_out": window.held_out, "anchor": window.anchor}
    eval_rows = pd.concat(parts.values(), ignore_index=True)
    samples: dict[str, dict] = {part: {} for part, rows in parts.items() if not rows.empty}

    def metrics_of(checkpoint: Checkpoint, who: str) -> dict:
        scorer = Scorer.from_checkpoint(checkpoint, cache, texts, eval_rows)
        out = {}
        for part, rows in parts.items():
            if rows.empty:
                continue
            trained_pairs = without(events, rows)[["user_id", "item_id"]]
            out[part], samples[part][who] = evaluate_sample(
                scorer, rows, trained_pairs, config.evaluation.k, config.evaluation.relevant_rating,
                config.training.positive_threshold)
        return out

    mean = float(window.train["rating"].mean()) if len(window.train) else 3.0
    result = {
        "challenger": metrics_of(challenger, "challenger"),
        "champion": metrics_of(champion, "champion") if champion is not None else None,
        "global_mean": {part: global_mean_metrics(mean, rows) for part, rows in parts.items() if not rows.empty},
        "samples": samples,
    }
    result["segments"] = [row for part, rows in parts.items() if not rows.empty
                          for row in segment_rows(part, rows, without(events, rows), samples[part], config.evaluation)]
    return result
