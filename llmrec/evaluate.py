"""Metrics as plain functions over dataframes with named columns, and the evaluation of a
model on the held-out parts.

Ranking protocol: relevant = held-out rows with rating >= `relevant_rating`; candidates =
every catalog item the user has not rated in training; users without a relevant held-out
item are not ranked. recall@K = hits in the top K / relevant items of the user, averaged
over users; NDCG@K uses binary gains. Every list metric joins the top-k lists to the
held-out pairs through `join_top_k`.

Offline CTR@K: each user active in the evaluation period is "shown" their top K
candidates; CTR@K = shown items the user engaged with (rated, any rating) in that period /
items shown, pooled over users. It is a replay estimate: an item not shown could still have
been rated, and a shown item the user never saw counts as not clicked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llmrec.config import NightlyConfig
from llmrec.encoder import TextCache
from llmrec.history import History
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


def join_top_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.DataFrame:
    """The one join every list metric shares: the top-k rows (rank <= k) of the users who
    have a row in `relevant`, each with `hit` (the pair is in `relevant`), plus per user
    `relevant` (that user's count of distinct relevant items). Users of `relevant` without
    any top-k row keep one row with rank NaN and hit False, so they count as misses."""
    pairs = relevant[["user_id", "item_id"]].drop_duplicates()
    counts = pairs.groupby("user_id").size().rename("relevant")
    top = top_k.loc[(top_k["rank"] <= k) & top_k["user_id"].isin(counts.index), ["user_id", "item_id", "rank"]]
    top = top.merge(pairs, on=["user_id", "item_id"], how="left", indicator="hit")
    top["hit"] = top["hit"].eq("both")
    missing = counts.index.difference(pd.Index(top["user_id"].unique()))
    if len(missing):
        top = pd.concat([top, pd.DataFrame({"user_id": missing, "item_id": None, "rank": np.nan, "hit": False})],
                        ignore_index=True)
    return top.merge(counts.reset_index(), on="user_id")


def _per_user_hits(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.DataFrame:
    joined = join_top_k(relevant, top_k, k)
    return joined.groupby("user_id").agg(hits=("hit", "sum"), relevant=("relevant", "first"))


def recall_per_user(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.Series:
    """|top-k ∩ relevant| / |relevant| for every user with a relevant item, by user_id."""
    per_user = _per_user_hits(relevant, top_k, k)
    return (per_user["hits"] / per_user["relevant"]).astype(np.float64).rename(f"recall_at_{k}")


def ndcg_per_user(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> pd.Series:
    """Binary-gain NDCG@k for every user with a relevant item, by user_id."""
    joined = join_top_k(relevant, top_k, k)
    if joined.empty:
        return pd.Series(dtype=np.float64, name=f"ndcg_at_{k}")
    joined["dcg"] = np.where(joined["hit"], 1.0 / np.log2(joined["rank"].fillna(1.0).to_numpy() + 1.0), 0.0)
    per_user = joined.groupby("user_id").agg(dcg=("dcg", "sum"), relevant=("relevant", "first"))
    discounts = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
    idcg = discounts[per_user["relevant"].clip(upper=k).to_numpy() - 1]
    return (per_user["dcg"] / idcg).rename(f"ndcg_at_{k}")


def recall_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Mean over users with a relevant item of |top-k ∩ relevant| / |relevant|."""
    per_user = recall_per_user(relevant, top_k, k)
    return float(per_user.mean()) if len(per_user) else math.nan


def precision_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Mean over users with a relevant item of |top-k ∩ relevant| / k."""
    per_user = _per_user_hits(relevant, top_k, k)
    if per_user.empty:
        return math.nan
    return float((per_user["hits"] / k).mean())


def hit_rate_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Share of users with a relevant item who find at least one of them in their top k."""
    per_user = _per_user_hits(relevant, top_k, k)
    if per_user.empty:
        return math.nan
    return float((per_user["hits"] > 0).mean())


def map_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Mean over users with a relevant item of AP@k = sum over hit ranks r <= k of
    precision@r, divided by min(|relevant|, k)."""
    joined = join_top_k(relevant, top_k, k)
    if joined.empty:
        return math.nan
    joined = joined.sort_values(["user_id", "rank"])
    hits_so_far = joined.groupby("user_id")["hit"].cumsum()
    joined["gain"] = np.where(joined["hit"], hits_so_far / joined["rank"], 0.0)
    per_user = joined.groupby("user_id").agg(gain=("gain", "sum"), relevant=("relevant", "first"))
    return float((per_user["gain"] / per_user["relevant"].clip(upper=k)).mean())


def ndcg_at_k(relevant: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Binary-gain NDCG@k averaged over users with a relevant item."""
    per_user = ndcg_per_user(relevant, top_k, k)
    return float(per_user.mean()) if len(per_user) else math.nan


def coverage_at_k(top_k: pd.DataFrame, catalog_size: int, k: int) -> float:
    """Catalog coverage: distinct items in anyone's top k / items that could be shown."""
    if catalog_size <= 0:
        return math.nan
    return float(top_k.loc[top_k["rank"] <= k, "item_id"].nunique() / catalog_size)


def ctr_at_k(engaged: pd.DataFrame, top_k: pd.DataFrame, k: int) -> float:
    """Offline CTR@k: of all items shown (every top-k list, rank <= k, of the users in
    `top_k`), the share the user engaged with (rated, whatever the rating) in the
    evaluation period, pooled over users. `engaged` holds the period's (user_id, item_id)
    pairs; `top_k` should list the users active in that period."""
    shown = top_k[top_k["rank"] <= k]
    if shown.empty:
        return math.nan
    joined = join_top_k(engaged, shown, k)
    return float(joined["hit"].sum() / len(shown))


def classification_metrics(liked: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """"Liked" (a 0/1 label per held-out row) predicted as score >= threshold: accuracy,
    precision, recall, F1 (0 when undefined, as scikit-learn's zero_division=0), and the
    threshold-free ROC-AUC of the score (NaN when only one class is present; ties count
    half, the Mann-Whitney form)."""
    liked = np.asarray(liked, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if len(liked) == 0:
        return {m: math.nan for m in ("accuracy", "precision", "recall", "f1", "roc_auc")}
    predicted = score >= threshold
    tp = float(np.sum(predicted & liked))
    fp = float(np.sum(predicted & ~liked))
    fn = float(np.sum(~predicted & liked))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float(np.mean(predicted == liked)), "precision": precision, "recall": recall, "f1": f1,
            "roc_auc": roc_auc(liked, score)}


def roc_auc(liked: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random liked row > score of a random other row), ties counting half."""
    liked = np.asarray(liked, dtype=bool)
    n_pos, n_neg = int(liked.sum()), int((~liked).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(np.asarray(score, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[liked].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    """All metrics of one model on one held-out part, as a flat {name: float} dict.
    `trained_pairs` (user_id, item_id) are excluded from the candidates. For a bce model the
    rating metrics compare the predicted probability with the 0/1 label.

    rating: mse, rmse, mae. "liked" (rating >= relevant_rating) predicted as prediction >=
    relevant_rating (a rating model) or probability >= 0.5 (bce): accuracy, precision,
    recall, f1, and roc_auc of the prediction. Lists (top k of every user active in `rows`,
    over the candidates): recall, precision, hit rate, MAP and NDCG at k over the users with
    a relevant row; coverage at k (distinct items shown / items scored) and offline CTR at k
    (shown items the user rated in `rows` / items shown) over every active user."""
    return evaluate_sample(scorer, rows, trained_pairs, k, relevant_rating, positive_threshold)[0]


def evaluate_sample(scorer: Scorer, rows: pd.DataFrame, trained_pairs: pd.DataFrame, k: int,
                    relevant_rating: float, positive_threshold: float | None = None) -> tuple[dict[str, float], Sample]:
    """`evaluate`'s metrics and the per-row errors and per-user scores they average."""
    truth = rows["rating"].to_numpy(dtype=np.float64)
    if scorer.loss_kind == "bce":
        truth = (truth >= positive_threshold).astype(np.float64)
    prediction = np.asarray(scorer.predict(rows["user_id"].tolist(), rows["item_id"].tolist()), dtype=np.float64)
    metrics = rating_metrics(truth, prediction)
    liked = rows["rating"].to_numpy(dtype=np.float64) >= relevant_rating
    metrics.update(classification_metrics(liked, prediction, 0.5 if scorer.loss_kind == "bce" else relevant_rating))
    relevant = rows.loc[rows["rating"] >= relevant_rating, ["user_id", "item_id"]]
    # Every user active in the part is shown a list (CTR, coverage); the other list metrics
    # average over the users with a relevant row.
    active = sorted(rows["user_id"].unique())
    top = scorer.top_k(active, k, exclude=trained_pairs)
    per_user = pd.concat([recall_per_user(relevant, top, k), ndcg_per_user(relevant, top, k)], axis=1).sort_index()
    for name in per_user.columns:
        metrics[name] = float(per_user[name].mean()) if len(per_user) else math.nan
    metrics[f"precision_at_{k}"] = precision_at_k(relevant, top, k)
    metrics[f"hit_rate_at_{k}"] = hit_rate_at_k(relevant, top, k)
    metrics[f"map_at_{k}"] = map_at_k(relevant, top, k)
    metrics[f"coverage_at_{k}"] = coverage_at_k(top, len(scorer.item_ids), k)
    metrics[f"ctr_at_{k}"] = ctr_at_k(rows[["user_id", "item_id"]], top, k)
    return metrics, Sample(errors=prediction - truth, users=per_user)


SEGMENTS = ("all", "cold users", "cold items", "heavy users", "long-tail items")


def segment_masks(rows: pd.DataFrame, users: pd.Series, items: pd.Series, evaluation) -> dict[str, np.ndarray]:
    """Which rows of a part fall in each segment, by `users` and `items`, the ratings per
    user and per item of every event outside the part (`History.counts`):
    cold users/items have fewer than `cold_ratings`; heavy users are the top
    `heavy_user_share` of users by ratings; long-tail items are outside the top
    `head_item_share` of items."""
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


def segment_rows(part: str, rows: pd.DataFrame, users: pd.Series, items: pd.Series, samples: dict,
                 evaluation) -> list[dict]:
    """Per segment of a part: rows, users ranked, and rmse / mae / recall@K of each model
    (recall over the segment's users that were ranked; for item segments it is not defined)."""
    out = []
    recall = f"recall_at_{evaluation.k}"
    for segment, mask in segment_masks(rows, users, items, evaluation).items():
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


def evaluate_models(window: Window, history: History, challenger: Checkpoint, champion: Checkpoint | None,
                    cache: TextCache, texts: CatalogTexts, config: NightlyConfig) -> dict:
    """Score challenger and champion on the same held-out rows, plus the global-mean
    predictor, on each of `PARTS` (new_users: the anchor's rows with every user scored from
    the profile text alone, `Scorer.as_new_users`): {"challenger": {part: metrics},
    "champion": ... or None, "global_mean": ...,
    "samples": {part: {"challenger": Sample, "champion": Sample (when there is one)}},
    "segments": [one row per part and segment, see `segment_rows`]}.
    Candidates for ranking exclude every pair in the curated `history` outside the part
    itself; only the events of the users ranked are read. The segments count ratings per
    user and per item over the history outside the part, in scans of one column."""
    parts = {"held_out": window.held_out, "anchor": window.anchor, "new_users": window.anchor}
    eval_rows = pd.concat([window.held_out, window.anchor], ignore_index=True)
    samples: dict[str, dict] = {part: {} for part, rows in parts.items() if not rows.empty}
    ranked = eval_rows.loc[eval_rows["rating"] >= config.evaluation.relevant_rating, "user_id"].unique()
    seen = history.pairs(ranked)

    def metrics_of(checkpoint: Checkpoint, who: str) -> dict:
        scorer = Scorer.from_checkpoint(checkpoint, cache, texts, eval_rows)
        out = {}
        for part, rows in parts.items():
            if rows.empty:
                continue
            part_scorer = (scorer.as_new_users(checkpoint, cache, texts, sorted(rows["user_id"].unique()))
                           if part == "new_users" else scorer)
            trained_pairs = without(seen, rows)[["user_id", "item_id"]]
            out[part], samples[part][who] = evaluate_sample(
                part_scorer, rows, trained_pairs, config.evaluation.k, config.evaluation.relevant_rating,
                config.training.positive_threshold)
        return out

    mean = float(window.train["rating"].mean()) if len(window.train) else 3.0
    result = {
        "challenger": metrics_of(challenger, "challenger"),
        "champion": metrics_of(champion, "champion") if champion is not None else None,
        "global_mean": {part: global_mean_metrics(mean, rows) for part, rows in parts.items() if not rows.empty},
        "samples": samples,
    }
    # new_users has no segments: its users are all scored as new, whatever their history.
    result["segments"] = [row for part, rows in parts.items() if not rows.empty and part != "new_users"
                          for row in segment_rows(part, rows, *history.counts(rows), samples[part], config.evaluation)]
    return result
