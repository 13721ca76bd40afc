"""Metrics as plain functions over dataframes with named columns, and the evaluation of a
model on the held-out parts.

Ranking protocol: relevant = held-out rows with rating >= `relevant_rating`; candidates =
every catalog item the user has not rated in training; users without a relevant held-out
item are not ranked. recall@K = hits in the top K / relevant items of the user, averaged
over users; NDCG@K uses binary gains.
"""

from __future__ import annotations

import math

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


def recall_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Mean over users with a relevant item of |top-k ∩ relevant| / |relevant|."""
    per_user = _hits(relevant, top_k, k)
    if per_user.empty:
        return math.nan
    return float((per_user["hits"] / per_user["relevant"]).mean())


def ndcg_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Binary-gain NDCG@k averaged over users with a relevant item."""
    if relevant.empty:
        return math.nan
    top = top_k[top_k["rank"] <= k]
    hit = top.merge(relevant[["user_id", "item_id"]].drop_duplicates(), on=["user_id", "item_id"])
    dcg = (1.0 / np.log2(hit["rank"].to_numpy() + 1.0))
    dcg = pd.Series(dcg, index=hit["user_id"].to_numpy()).groupby(level=0).sum()
    counts = relevant.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    idcg = counts.clip(upper=k).map(lambda n: discounts[n - 1])
    return float((dcg.reindex(idcg.index, fill_value=0.0) / idcg).mean())


def _hits(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.DataFrame:
    relevant = relevant[["user_id", "item_id"]].drop_duplicates()
    counts = relevant.groupby("user_id").size().rename("relevant")
    hit = top_k[top_k["rank"] <= k].merge(relevant, on=["user_id", "item_id"])
    hits = hit.groupby("user_id").size().rename("hits")
    return pd.concat([counts, hits], axis=1).fillna({"hits": 0}).dropna(subset=["relevant"])


def evaluate(scorer: Scorer, rows: pd.DataFrame, trained_pairs: pd.DataFrame, k: int,
             relevant_rating: float, positive_threshold: float | None = None) -> dict[str, float]:
    """All metrics of one model on one held-out part. `trained_pairs` (user_id, item_id)
    are excluded from the candidates. For a bce model the rating metrics compare the
    predicted probability with the 0/1 label."""
    truth = rows["rating"].to_numpy(dtype=np.float64)
    if scorer.loss_kind == "bce":
        truth = (truth >= positive_threshold).astype(np.float64)
    metrics = rating_metrics(truth, scorer.predict(rows["user_id"].tolist(), rows["item_id"].tolist()))
    relevant = rows.loc[rows["rating"] >= relevant_rating, ["user_id", "item_id"]]
    users = sorted(relevant["user_id"].unique())
    top = scorer.top_k(users, k, exclude=trained_pairs)
    metrics[f"recall_at_{k}"] = recall_at_k(relevant, top, k)
    metrics[f"ndcg_at_{k}"] = ndcg_at_k(relevant, top, k)
    return metrics


def global_mean_metrics(mean: float, rows: pd.DataFrame) -> dict[str, float]:
    truth = rows["rating"].to_numpy(dtype=np.float64)
    return rating_metrics(truth, np.full(len(truth), mean))


def evaluate_models(window: Window, events: pd.DataFrame, challenger: Checkpoint, champion: Checkpoint | None,
                    cache: TextCache, texts: CatalogTexts, config: NightlyConfig) -> dict:
    """Score challenger and champion on the same held-out rows, plus the global-mean
    predictor: {"challenger": {part: metrics}, "champion": ... or None, "global_mean": ...}.
    Candidates for ranking exclude every pair in `events` outside the part itself."""
    parts = {"held_out": window.held_out, "anchor": window.anchor}
    eval_rows = pd.concat(parts.values(), ignore_index=True)

    def metrics_of(checkpoint: Checkpoint) -> dict:
        scorer = Scorer.from_checkpoint(checkpoint, cache, texts, eval_rows)
        out = {}
        for part, rows in parts.items():
            if rows.empty:
                continue
            trained_pairs = without(events, rows)[["user_id", "item_id"]]
            out[part] = evaluate(scorer, rows, trained_pairs, config.evaluation.k, config.evaluation.relevant_rating,
                                 config.training.positive_threshold)
        return out

    mean = float(window.train["rating"].mean()) if len(window.train) else 3.0
    return {
        "challenger": metrics_of(challenger),
        "champion": metrics_of(champion) if champion is not None else None,
        "global_mean": {part: global_mean_metrics(mean, rows) for part, rows in parts.items() if not rows.empty},
    }
