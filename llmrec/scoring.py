"""Scoring users against items with precomputed vectors: one matrix product per chunk of
users, so ranking the whole catalog never loops over items in Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmrec.encoder import TextCache, TextFeatures
from llmrec.model import Checkpoint, output_transform, rating, read_state
from llmrec.schema import CatalogTexts

CHUNK = 4096


def rank_biases(checkpoint: Checkpoint, rows: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return checkpoint.model.rank_bias(torch.as_tensor(rows, dtype=torch.long)).float()


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
    """The one scoring formula, r = mu + b_u + b_i + <v_u, v_i>, over precomputed user and
    item vectors: evaluation, the registered pyfunc, benchmarks and serving all score here.
    Top-k lists rank by r + a_i, a_i the item's ranking bias (zero when none is given). An id without a vector scores as if its vector and bias were zero (mean plus the other
    side's bias); build the scorer with every id you need to score from its text."""

    def __init__(self, mu: float, user_ids: list[str], user_vectors: torch.Tensor, user_bias: torch.Tensor,
                 item_ids: list[str], item_vectors: torch.Tensor, item_bias: torch.Tensor, loss_kind: str = "mse",
                 item_rank_bias: torch.Tensor | None = None):
        self.mu = float(mu)
        self.loss_kind = loss_kind
        self.user_ids = list(user_ids)
        self.item_ids = list(item_ids)
        self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        self.item_index = {v: i for i, v in enumerate(self.item_ids)}
        self.user_vectors, self.user_bias = user_vectors.float(), user_bias.float()
        self.item_vectors, self.item_bias = item_vectors.float(), item_bias.float()
        # The ranking bias a_i of each item: added to the score by top_k only.
        self.item_rank_bias = (torch.zeros(len(self.item_ids)) if item_rank_bias is None
                               else torch.as_tensor(item_rank_bias).float())

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, cache: TextCache, texts: CatalogTexts,
                        extra: pd.DataFrame | None = None) -> "Scorer":
        """Vectors for every user and item the checkpoint knows or the catalog lists, plus
        the ids in `extra` (user_id, item_id columns), each through the model's towers."""
        checkpoint.model.eval()
        users = dict.fromkeys(checkpoint.users.ids[1:]) | dict.fromkeys(texts.users)
        items = dict.fromkeys(checkpoint.items.ids[1:]) | dict.fromkeys(texts.items)
        if extra is not None:
            users |= dict.fromkeys(extra["user_id"])
            items |= dict.fromkeys(extra["item_id"])
        user_ids, item_ids = list(users), list(items)
        user_vectors, user_bias = side_vectors(checkpoint, checkpoint.users.rows(user_ids),
                                               cache.features([texts.users.get(u, "") for u in user_ids]), True)
        item_rows = checkpoint.items.rows(item_ids)
        item_vectors, item_bias = side_vectors(checkpoint, item_rows,
                                               cache.features([texts.items.get(i, "") for i in item_ids]), False)
        return cls(float(checkpoint.model.mu.detach()), user_ids, user_vectors, user_bias,
                   item_ids, item_vectors, item_bias, checkpoint.loss_kind, rank_biases(checkpoint, item_rows))

    @classmethod
    def load(cls, folder: Path) -> "Scorer":
        """The serving vectors stored in a checkpoint folder (no encoder needed)."""
        from safetensors.torch import load_file

        meta = read_state(folder)
        tensors = load_file(str(Path(folder) / "vectors.safetensors"))
        # Vectors written before the ranking bias existed have none: it reads as zero.
        return cls(float(tensors["mu"]), meta["vector_ids"]["users"], tensors["user_vectors"], tensors["user_bias"],
                   meta["vector_ids"]["items"], tensors["item_vectors"], tensors["item_bias"],
                   meta.get("loss_kind", meta.get("loss", "mse")), tensors.get("item_rank_bias"))

    def vectors(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        tensors = {
            "mu": torch.tensor(self.mu),
            "user_vectors": self.user_vectors,
            "user_bias": self.user_bias,
            "item_vectors": self.item_vectors,
            "item_bias": self.item_bias,
            "item_rank_bias": self.item_rank_bias,
        }
        return tensors, {"users": self.user_ids, "items": self.item_ids}

    @staticmethod
    def _lookup(index: dict, vectors: torch.Tensor, bias: torch.Tensor, ids) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor([index.get(i, -1) for i in ids], dtype=torch.long)
        known = rows >= 0
        vec, b = torch.zeros(len(rows), vectors.shape[1]), torch.zeros(len(rows))
        vec[known], b[known] = vectors[rows[known]], bias[rows[known]]
        return vec, b

    def raw_scores(self, user_ids, item_ids) -> torch.Tensor:
        user_vec, user_bias = self._lookup(self.user_index, self.user_vectors, self.user_bias, user_ids)
        item_vec, item_bias = self._lookup(self.item_index, self.item_vectors, self.item_bias, item_ids)
        return rating(self.mu, user_vec, user_bias, item_vec, item_bias)

    def predict(self, user_ids, item_ids) -> np.ndarray:
        return output_transform(self.raw_scores(user_ids, item_ids).double().numpy(), self.loss_kind)

    def top_k(self, user_ids: list[str], k: int, exclude: pd.DataFrame | None = None) -> pd.DataFrame:
        """Top-k items for each user over all items, skipping (user_id, item_id) pairs in
        `exclude` (the items a user rated in training). Ranked by the predicted rating plus
        the item's ranking bias. Returns user_id, item_id, rank, score (the ranking score)."""
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
            # rating() for every (user, item) of the chunk at once, as one matrix product, plus
            # the ranking bias a_i.
            scores = self.user_vectors[chunk] @ self.item_vectors.T
            scores += self.user_bias[chunk, None] + (self.item_bias + self.item_rank_bias)[None, :] + self.mu
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
