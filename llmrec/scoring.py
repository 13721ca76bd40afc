"""Scoring users against items with precomputed vectors: one matrix product per chunk of
users, so ranking the whole catalog never loops over items in Python."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from llmrec.encoder import TextFeatures
from llmrec.model import Checkpoint, output_transform

CHUNK = 4096


def side_vectors(checkpoint: Checkpoint, rows: np.ndarray, features: TextFeatures, user: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model = checkpoint.model
    vectors, biases = [], []
    with torch.no_grad():
        for start in range(0, len(rows), CHUNK):
            index = torch.arange(start, min(start + CHUNK, len(rows)))
            pooled = model.encode(features.take(index))
            v, b = model.side(torch.as_tensor(rows[start : start + CHUNK]), pooled, user=user)
            vectors.append(v.float())
            biases.append(b.float())
    if not vectors:
        return torch.zeros(0, model.dim), torch.zeros(0)
    return torch.cat(vectors), torch.cat(biases)


class Scorer:
    """User and item vectors for a set of ids. An id outside the checkpoint's vocabulary
    uses the unknown row, so its score comes from its text and the mean."""

    def __init__(self, checkpoint: Checkpoint, user_ids: list[str], user_features: TextFeatures,
                 item_ids: list[str], item_features: TextFeatures):
        checkpoint.model.eval()
        self.loss = checkpoint.loss
        self.mu = float(checkpoint.model.mu.detach())
        self.user_ids = list(user_ids)
        self.item_ids = list(item_ids)
        self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        self.item_index = {v: i for i, v in enumerate(self.item_ids)}
        self.user_vectors, self.user_bias = side_vectors(checkpoint, checkpoint.users.rows(self.user_ids), user_features, True)
        self.item_vectors, self.item_bias = side_vectors(checkpoint, checkpoint.items.rows(self.item_ids), item_features, False)

    def vectors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        tensors = {
            "mu": torch.tensor(self.mu),
            "user_vectors": self.user_vectors,
            "user_bias": self.user_bias,
            "item_vectors": self.item_vectors,
            "item_bias": self.item_bias,
        }
        return tensors, {"users": self.user_ids, "items": self.item_ids}

    def raw_scores(self, user_ids, item_ids) -> torch.Tensor:
        users = torch.as_tensor([self.user_index[u] for u in user_ids], dtype=torch.long)
        items = torch.as_tensor([self.item_index[i] for i in item_ids], dtype=torch.long)
        dot = (self.user_vectors[users] * self.item_vectors[items]).sum(-1)
        return self.mu + self.user_bias[users] + self.item_bias[items] + dot

    def predict(self, user_ids, item_ids) -> np.ndarray:
        return output_transform(self.raw_scores(user_ids, item_ids).double().numpy(), self.loss)

    def top_k(self, user_ids: list[str], k: int, exclude: pd.DataFrame | None = None) -> pd.DataFrame:
        """Top-k items for each user over all items, skipping (user_id, item_id) pairs in
        `exclude` (the items a user rated in training). Returns user_id, item_id, rank, score."""
        users = torch.as_tensor([self.user_index[u] for u in user_ids], dtype=torch.long)
        excluded_rows = excluded_cols = None
        if exclude is not None and len(exclude):
            position = {u: p for p, u in enumerate(user_ids)}
            pairs = exclude[exclude["user_id"].isin(position) & exclude["item_id"].isin(self.item_index)]
            excluded_rows = torch.as_tensor(pairs["user_id"].map(position).to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
            excluded_cols = torch.as_tensor(pairs["item_id"].map(self.item_index).to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
        k = min(k, len(self.item_ids))
        out_users, out_items, out_scores = [], [], []
        for start in range(0, len(users), CHUNK):
            chunk = users[start : start + CHUNK]
            scores = self.user_vectors[chunk] @ self.item_vectors.T
            scores += self.user_bias[chunk, None] + self.item_bias[None, :] + self.mu
            if excluded_rows is not None:
                inside = (excluded_rows >= start) & (excluded_rows < start + len(chunk))
                scores[excluded_rows[inside] - start, excluded_cols[inside]] = float("-inf")
            best_scores, best_items = torch.topk(scores, k, dim=1)
            out_users.append(torch.arange(start, start + len(chunk)).repeat_interleave(k))
            out_items.append(best_items.reshape(-1))
            out_scores.append(best_scores.reshape(-1))
        if not out_users:
            return pd.DataFrame({"user_id": [], "item_id": [], "rank": [], "score": []})
        user_pos = torch.cat(out_users).numpy()
        item_pos = torch.cat(out_items).numpy()
        scores = torch.cat(out_scores).numpy()
        frame = pd.DataFrame(
            {
                "user_id": np.asarray(user_ids, dtype=object)[user_pos],
                "item_id": np.asarray(self.item_ids, dtype=object)[item_pos],
                "rank": np.tile(np.arange(1, k + 1), len(users)),
                "score": scores,
            }
        )
        # An item already excluded scores -inf; it is not a recommendation.
        return frame[np.isfinite(frame["score"].to_numpy())].reset_index(drop=True)
