"""Scoring users against items with precomputed vectors: one matrix product per chunk of
users, so ranking the whole catalog never loops over items in Python."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llmrec.encoder import TextCache, TextFeatures
from llmrec.model import UNKNOWN, Checkpoint, output_transform, rating, read_state
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
            v, b = model.served_side(torch.as_tensor(rows[start : start + CHUNK]), pooled, user=user)
            vectors.append(v.float())
            biases.append(b.float())
    if not vectors:
        return torch.zeros(0, model.width), torch.zeros(0)
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
        # Set by `quantized()`: item_vectors then hold int8 rows, each times its scale.
        self.item_scale: torch.Tensor | None = None

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

    def as_new_users(self, checkpoint: Checkpoint, cache: TextCache, texts: CatalogTexts,
                     user_ids: list[str]) -> "Scorer":
        """A scorer of `user_ids` as users `checkpoint` has never seen (the unknown id's
        embedding and bias: their profile text alone), over this scorer's items."""
        user_vectors, user_bias = side_vectors(checkpoint, np.full(len(user_ids), UNKNOWN, dtype=np.int64),
                                               cache.features([texts.users.get(u, "") for u in user_ids]), True)
        return Scorer(self.mu, user_ids, user_vectors, user_bias, self.item_ids, self.item_matrix(), self.item_bias,
                      self.loss_kind, self.item_rank_bias)

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
            "item_vectors": self.item_matrix(),
            "item_bias": self.item_bias,
            "item_rank_bias": self.item_rank_bias,
        }
        return tensors, {"users": self.user_ids, "items": self.item_ids}

    def extended(self, user_ids: list[str], user_vectors: torch.Tensor, user_bias: torch.Tensor,
                 item_ids: list[str], item_vectors: torch.Tensor, item_bias: torch.Tensor) -> "Scorer":
        """A new scorer with these users and items appended (ids it already has are skipped
        by the caller): how serving adds items and profiles that arrived after training."""
        # Appended items have no learned ranking bias: zero, as for any item without one.
        scorer = Scorer(self.mu, self.user_ids + list(user_ids), torch.cat([self.user_vectors, user_vectors.float()]),
                        torch.cat([self.user_bias, user_bias.float()]), self.item_ids + list(item_ids),
                        torch.cat([self.item_matrix(), item_vectors.float()]), torch.cat([self.item_bias, item_bias.float()]),
                        self.loss_kind, torch.cat([self.item_rank_bias, torch.zeros(len(item_ids))]))
        return scorer.quantized() if self.item_scale is not None else scorer

    def quantized(self) -> "Scorer":
        """The same scorer with the item matrix in int8, one scale per item row (symmetric,
        max |value| -> 127): a quarter of the memory for the top-K product."""
        matrix = self.item_matrix()
        scale = matrix.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        scorer = Scorer(self.mu, self.user_ids, self.user_vectors, self.user_bias, self.item_ids, matrix,
                        self.item_bias, self.loss_kind, self.item_rank_bias)
        scorer.item_vectors = torch.round(matrix / scale[:, None]).clamp(-127, 127).to(torch.int8)
        scorer.item_scale = scale
        return scorer

    def item_matrix(self) -> torch.Tensor:
        """Item vectors in float32 (dequantized when int8)."""
        if self.item_scale is None:
            return self.item_vectors
        return self.item_vectors.float() * self.item_scale[:, None]

    def _item_dot(self, user_vec: torch.Tensor) -> torch.Tensor:
        """user_vec [n, d] times every item vector -> [n, items]; with int8 items the scale
        is applied to the product, not to a dequantized copy of the matrix."""
        if self.item_scale is None:
            return user_vec @ self.item_vectors.T
        return (user_vec @ self.item_vectors.T.float()) * self.item_scale[None, :]

    @staticmethod
    def _lookup(index: dict, vectors: torch.Tensor, bias: torch.Tensor, ids,
                scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor([index.get(i, -1) for i in ids], dtype=torch.long)
        known = rows >= 0
        vec, b = torch.zeros(len(rows), vectors.shape[1]), torch.zeros(len(rows))
        vec[known], b[known] = vectors[rows[known]].float(), bias[rows[known]]
        if scale is not None:
            vec[known] *= scale[rows[known], None]
        return vec, b

    def raw_scores(self, user_ids, item_ids) -> torch.Tensor:
        user_vec, user_bias = self._lookup(self.user_index, self.user_vectors, self.user_bias, user_ids)
        item_vec, item_bias = self._lookup(self.item_index, self.item_vectors, self.item_bias, item_ids, self.item_scale)
        return rating(self.mu, user_vec, user_bias, item_vec, item_bias)

    def predict(self, user_ids, item_ids) -> np.ndarray:
        return output_transform(self.raw_scores(user_ids, item_ids).double().numpy(), self.loss_kind)

    def ranked(self, user_ids: list[str], k: int, excluded_rows: torch.Tensor | None = None,
               excluded_cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking itself: [users, k] item positions and ranking scores (predicted rating
        plus the item's ranking bias) of each user's best k, with (excluded_rows[j], excluded_cols[j]) = (user position, item position) pairs
        scored -inf (they come last, with score -inf, when fewer than k remain). A user
        without a vector is ranked as the unknown user (by mu + b_i)."""
        user_vec, user_bias = self._lookup(self.user_index, self.user_vectors, self.user_bias, user_ids)
        k = min(k, len(self.item_ids))
        out_items, out_scores = [torch.zeros(0, k, dtype=torch.long)], [torch.zeros(0, k)]
        for start in range(0, len(user_ids), CHUNK):
            chunk = slice(start, start + CHUNK)
            # rating() for every (user, item) of the chunk at once, as one matrix product, plus
            # the ranking bias a_i.
            scores = self._item_dot(user_vec[chunk])
            scores += user_bias[chunk, None] + (self.item_bias + self.item_rank_bias)[None, :] + self.mu
            if excluded_rows is not None:
                inside = (excluded_rows >= start) & (excluded_rows < start + len(scores))
                scores[excluded_rows[inside] - start, excluded_cols[inside]] = float("-inf")
            best_scores, best_items = torch.topk(scores, k, dim=1)
            out_items.append(best_items)
            out_scores.append(best_scores)
        return torch.cat(out_items), torch.cat(out_scores)

    def top_k(self, user_ids: list[str], k: int, exclude: pd.DataFrame | None = None) -> pd.DataFrame:
        """Top-k items for each user over all items, skipping (user_id, item_id) pairs in
        `exclude` (the items a user rated in training). Ranked by the predicted rating plus
        the item's ranking bias. Returns user_id, item_id, rank, score (the ranking score;
        see `ranked`)."""
        excluded_rows = excluded_cols = None
        if exclude is not None and len(exclude):
            position = {u: p for p, u in enumerate(user_ids)}
            pairs = exclude[exclude["user_id"].isin(position) & exclude["item_id"].isin(self.item_index)]
            excluded_rows = torch.as_tensor(pairs["user_id"].map(position).to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
            excluded_cols = torch.as_tensor(pairs["item_id"].map(self.item_index).to_numpy(dtype=np.int64, copy=True), dtype=torch.long)
        best_items, best_scores = self.ranked(user_ids, k, excluded_rows, excluded_cols)
        k = best_items.shape[1]
        frame = pd.DataFrame(
            {
                "user_id": np.repeat(np.asarray(user_ids, dtype=object), k),
                "item_id": np.asarray(self.item_ids, dtype=object)[best_items.reshape(-1).numpy()],
                "rank": np.tile(np.arange(1, k + 1), len(user_ids)),
                "score": best_scores.reshape(-1).numpy(),
            }
        )
        # An item already excluded scores -inf; it is not a recommendation.
        return frame[np.isfinite(frame["score"].to_numpy())].reset_index(drop=True)
