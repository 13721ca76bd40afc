"""Baselines for the quality benchmark, in the same score form as llmrec
(mu + b_u + b_i + <p_u, q_i>) so they are ranked and scored by the very same
`llmrec.scoring.Scorer.top_k` / `llmrec.evaluate.evaluate` code.

    BiasedMF     biased matrix factorisation trained by SGD (Funk / Surprise "SVD"
                 update rule, vectorised over small mini-batches), resumable: `fit`
                 called again continues from the current factors (continual updates);
                 an id never trained on keeps zero factors and zero bias, so its
                 prediction is the bias-only fallback mu + b_(known side).
    global mean, item mean, popularity   closed-form, from the rows given.
    item-kNN, EASE, BPR, implicit ALS    ranking-only top-N baselines (below), refit on
                 the history each time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from llmrec.scoring import Scorer


class BiasedMF:
    """r_hat = mu + b_u + b_i + <p_u, q_i>, SGD with L2 on every parameter it touches:
        e = r - r_hat;  b_u += lr (e - reg b_u);  p_u += lr (e q_i - reg p_u)  (and i alike).
    Updates are applied per mini-batch of `batch` ratings with per-rating step sizes (sums,
    not means), which for small batches is the classic per-rating SGD, vectorised."""

    def __init__(self, dim: int = 64, lr: float = 0.01, reg: float = 0.05, bias_reg: float | None = None,
                 epochs: int = 20, batch: int = 64, init_std: float = 0.1, seed: int = 0):
        self.dim, self.lr, self.reg, self.epochs, self.batch, self.init_std = dim, lr, reg, epochs, batch, init_std
        self.bias_reg = reg if bias_reg is None else bias_reg
        self.generator = torch.Generator().manual_seed(seed)
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.P = torch.zeros(0, dim)
        self.Q = torch.zeros(0, dim)
        self.bu = torch.zeros(0)
        self.bi = torch.zeros(0)
        self.mu = 0.0
        self.count = 0

    def _grow(self, index: dict[str, int], ids, table: torch.Tensor, bias: torch.Tensor):
        new = [i for i in dict.fromkeys(ids) if i not in index]
        for value in new:
            index[value] = len(index)
        if new:
            fresh = torch.randn(len(new), self.dim, generator=self.generator) * self.init_std
            table = torch.cat([table, fresh])
            bias = torch.cat([bias, torch.zeros(len(new))])
        return table, bias

    def fit(self, rows: pd.DataFrame, epochs: int | None = None) -> "BiasedMF":
        if rows.empty:
            return self
        self.P, self.bu = self._grow(self.user_index, rows["user_id"], self.P, self.bu)
        self.Q, self.bi = self._grow(self.item_index, rows["item_id"], self.Q, self.bi)
        ratings = torch.as_tensor(rows["rating"].to_numpy(dtype=np.float32))
        # mu: running mean of every rating trained on so far.
        total = self.mu * self.count + float(ratings.sum())
        self.count += len(ratings)
        self.mu = total / self.count
        users = torch.as_tensor(rows["user_id"].map(self.user_index).to_numpy(dtype=np.int64))
        items = torch.as_tensor(rows["item_id"].map(self.item_index).to_numpy(dtype=np.int64))
        lr, reg, breg = self.lr, self.reg, self.bias_reg
        for _ in range(self.epochs if epochs is None else epochs):
            order = torch.randperm(len(ratings), generator=self.generator)
            for first in range(0, len(order), self.batch):
                b = order[first : first + self.batch]
                u, i, r = users[b], items[b], ratings[b]
                pu, qi = self.P[u], self.Q[i]
                e = r - (self.mu + self.bu[u] + self.bi[i] + (pu * qi).sum(1))
                self.bu.index_add_(0, u, lr * (e - breg * self.bu[u]))
                self.bi.index_add_(0, i, lr * (e - breg * self.bi[i]))
                self.P.index_add_(0, u, lr * (e[:, None] * qi - reg * pu))
                self.Q.index_add_(0, i, lr * (e[:, None] * pu - reg * qi))
        return self

    def _side(self, ids, index, table, bias):
        rows = torch.as_tensor([index.get(v, -1) for v in ids], dtype=torch.long)
        known = rows >= 0
        vectors = torch.zeros(len(rows), self.dim)
        biases = torch.zeros(len(rows))
        vectors[known] = table[rows[known]]
        biases[known] = bias[rows[known]]
        return vectors, biases

    def scorer(self, user_ids: list[str], item_ids: list[str]) -> Scorer:
        uv, ub = self._side(user_ids, self.user_index, self.P, self.bu)
        iv, ib = self._side(item_ids, self.item_index, self.Q, self.bi)
        return Scorer(self.mu, user_ids, uv, ub, item_ids, iv, ib)


def constant_scorer(rows: pd.DataFrame, user_ids: list[str], item_ids: list[str], kind: str) -> Scorer:
    """global mean (kind='global'), item mean (kind='item': mean rating of the item, the
    global mean for an item without ratings) or popularity (kind='popularity': ranks by
    the number of ratings; its rating predictions are meaningless and not reported)."""
    mu = float(rows["rating"].mean()) if len(rows) else 3.0
    zeros_u = torch.zeros(len(user_ids), 1)
    zeros_i = torch.zeros(len(item_ids), 1)
    if kind == "global":
        bias = torch.zeros(len(item_ids))
    elif kind == "item":
        means = rows.groupby("item_id")["rating"].mean()
        bias = torch.as_tensor(pd.Series(item_ids).map(means).fillna(mu).to_numpy(dtype=np.float32) - mu)
    elif kind == "popularity":
        counts = rows.groupby("item_id").size()
        bias = torch.as_tensor(np.log1p(pd.Series(item_ids).map(counts).fillna(0).to_numpy(dtype=np.float32)))
        mu = 0.0
    else:
        raise ValueError(kind)
    return Scorer(mu, user_ids, zeros_u, torch.zeros(len(user_ids)), item_ids, zeros_i, bias)


# ----------------------------------------------------------------------------- top-N baselines
#
# Implicit-feedback recommenders, refit from scratch on the history at every step: a row is
# an interaction whatever its rating (the standard top-N setting on MovieLens). They rank
# only; their rating predictions are meaningless and not reported. A user without history
# gets all-zero scores, so the popularity term (1e-6 x log(1 + count), far below any real
# score difference) decides: they fall back to the popularity list.

TIE_BREAK = 1e-6


def interactions(rows: pd.DataFrame):
    """Binary user x item matrix (scipy CSR) of `rows` and the id -> row/column maps."""
    import scipy.sparse as sp

    users = {u: i for i, u in enumerate(dict.fromkeys(rows["user_id"]))}
    items = {v: i for i, v in enumerate(dict.fromkeys(rows["item_id"]))}
    pairs = rows[["user_id", "item_id"]].drop_duplicates()
    matrix = sp.csr_matrix((np.ones(len(pairs), dtype=np.float32),
                            (pairs["user_id"].map(users).to_numpy(), pairs["item_id"].map(items).to_numpy())),
                           shape=(len(users), len(items)))
    return matrix, users, items


def factor_scorer(rows: pd.DataFrame, user_ids: list[str], item_ids: list[str], user_factors: np.ndarray,
                  item_factors: np.ndarray, users: dict, items: dict) -> Scorer:
    """score(u, i) = <user_factors[u], item_factors[i]> (+ the popularity tie-break); ids the
    model never saw get zero vectors."""
    dim = user_factors.shape[1]
    uv = np.zeros((len(user_ids), dim), dtype=np.float32)
    iv = np.zeros((len(item_ids), dim), dtype=np.float32)
    u_known = [(p, users[u]) for p, u in enumerate(user_ids) if u in users]
    i_known = [(p, items[i]) for p, i in enumerate(item_ids) if i in items]
    if u_known:
        pos, row = map(list, zip(*u_known))
        uv[pos] = user_factors[row]
    if i_known:
        pos, row = map(list, zip(*i_known))
        iv[pos] = item_factors[row]
    counts = rows.groupby("item_id").size()
    tie = TIE_BREAK * np.log1p(pd.Series(item_ids).map(counts).fillna(0).to_numpy(dtype=np.float32))
    return Scorer(0.0, user_ids, torch.as_tensor(uv), torch.zeros(len(user_ids)), item_ids,
                  torch.as_tensor(iv), torch.as_tensor(tie, dtype=torch.float32))


class EASE:
    """Steck (2019), "Embarrassingly Shallow Autoencoders": B = argmin ||X - XB||^2 +
    lam ||B||^2 with diag(B) = 0, closed form P = (X'X + lam I)^-1, B = -P / diag(P),
    diag(B) = 0; score(u) = X_u B."""

    def __init__(self, lam: float = 500.0):
        self.lam = lam

    def scorer(self, rows: pd.DataFrame, user_ids: list[str], item_ids: list[str]) -> Scorer:
        X, users, items = interactions(rows)
        gram = (X.T @ X).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.lam
        P = np.linalg.inv(gram)
        B = -P / np.diag(P)[None, :]
        B[np.diag_indices_from(B)] = 0.0
        # user vector = X_u (its items), item vector = column i of B.
        return factor_scorer(rows, user_ids, item_ids, X.toarray(), B.T.astype(np.float32), users, items)


class ItemKNN:
    """Item-based k-nearest neighbours: cosine similarity of the items' user columns, only
    each item's `neighbours` most similar items kept; score(u, i) = sum of the similarities
    of i to the items u interacted with (Deshpande & Karypis 2004, without normalisation)."""

    def __init__(self, neighbours: int = 50, shrink: float = 0.0):
        self.neighbours, self.shrink = neighbours, shrink

    def scorer(self, rows: pd.DataFrame, user_ids: list[str], item_ids: list[str]) -> Scorer:
        X, users, items = interactions(rows)
        co = (X.T @ X).toarray().astype(np.float64)
        norms = np.sqrt(np.diag(co))
        sim = co / (np.outer(norms, norms) + self.shrink + 1e-12)
        np.fill_diagonal(sim, 0.0)
        if self.neighbours < len(sim) - 1:
            # keep, for each target item i (column), its `neighbours` most similar items j.
            cut = np.partition(sim, -self.neighbours, axis=0)[-self.neighbours]
            sim = np.where(sim >= cut[None, :], sim, 0.0)
        return factor_scorer(rows, user_ids, item_ids, X.toarray(), sim.T.astype(np.float32), users, items)


class ImplicitFactors:
    """BPR (Rendle et al. 2009) or implicit ALS (Hu, Koren & Volinsky 2008) from the
    `implicit` package, one thread, fixed seed; `kind` = 'bpr' or 'als'."""

    def __init__(self, kind: str, seed: int = 0, **params):
        self.kind, self.seed, self.params = kind, seed, params

    def scorer(self, rows: pd.DataFrame, user_ids: list[str], item_ids: list[str]) -> Scorer:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        X, users, items = interactions(rows)
        cls = BayesianPersonalizedRanking if self.kind == "bpr" else AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"):  # implicit's advice: no BLAS thread pool under its own loops
            model = cls(random_state=self.seed, num_threads=1, **self.params)
            model.fit(X, show_progress=False)
        return factor_scorer(rows, user_ids, item_ids, np.asarray(model.user_factors), np.asarray(model.item_factors),
                             users, items)
