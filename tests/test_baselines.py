"""The ranking baselines of benchmarks/quality.py: EASE against an independent solve,
item-kNN by hand, the popularity fallback for users without history, BPR/ALS end to end."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from baselines import EASE, ImplicitFactors, ItemKNN, interactions  # noqa: E402


def rows_of(pairs):
    return pd.DataFrame(pairs, columns=["user_id", "item_id"]).assign(rating=4.0)


PAIRS = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("b", "z"), ("c", "y"), ("c", "z"), ("d", "z"),
         ("d", "w"), ("e", "x"), ("e", "z")]


def test_ease_matches_a_column_by_column_ridge_solve():
    """EASE's closed form equals, for each item j, ridge regression of column j on the other
    columns: B[-j, j] = (G[-j,-j] + lam I)^-1 G[-j, j], B[j, j] = 0."""
    rows, lam = rows_of(PAIRS), 2.0
    X, users, items = interactions(rows)
    G = (X.T @ X).toarray().astype(np.float64)
    n = len(G)
    expected = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        expected[others, j] = np.linalg.solve(G[np.ix_(others, others)] + lam * np.eye(n - 1), G[others, j])
    item_ids = list(items)
    scorer = EASE(lam=lam).scorer(rows, list(users), item_ids)
    got = scorer.item_vectors.numpy().T  # item vector i = column i of B
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # score(u, i) = X_u B[:, i] (+ a popularity tie-break of at most 1e-6 x log(1 + count)).
    raw = scorer.raw_scores(["a"], ["z"]).item()
    assert raw == pytest.approx(X.toarray()[users["a"]] @ expected[:, items["z"]], abs=1e-5)


def test_item_knn_by_hand_and_popularity_fallback():
    rows = rows_of(PAIRS)
    scorer = ItemKNN(neighbours=10).scorer(rows, ["a", "new"], ["x", "y", "z", "w", "never"])
    # cosine(x, z) = |{b, e}| / sqrt(3 * 4); cosine(y, z) = |{b, c}| / sqrt(3 * 4); a rated x and y.
    assert scorer.raw_scores(["a"], ["z"]).item() == pytest.approx(2 / np.sqrt(12) + 2 / np.sqrt(12), abs=1e-5)
    # w: only d rated it (with z): similar to z alone, so a (x, y) scores 0 for it.
    assert scorer.raw_scores(["a"], ["w"]).item() == pytest.approx(0.0, abs=1e-5)
    # A user without history gets the popularity order: z (4) > x, y (3) > w (1) > never (0).
    top = scorer.top_k(["new"], 5)
    assert list(top["item_id"])[0] == "z" and list(top["item_id"])[-2:] == ["w", "never"]
    # Keeping one neighbour per item drops the weaker similarities.
    # x's nearest item is y (cosine 2/3), then z (2/sqrt(12)); c rated y and z.
    everything = ItemKNN(neighbours=10).scorer(rows, ["c"], ["x", "y", "z", "w"])
    one = ItemKNN(neighbours=1).scorer(rows, ["c"], ["x", "y", "z", "w"])
    assert everything.raw_scores(["c"], ["x"]).item() == pytest.approx(2 / 3 + 2 / np.sqrt(12), abs=1e-5)
    assert one.raw_scores(["c"], ["x"]).item() == pytest.approx(2 / 3, abs=1e-5)


@pytest.mark.parametrize("kind", ["bpr", "als"])
def test_implicit_factor_models_rank_the_block_structure(kind):
    """Two user groups, each rating only its own half of the items: a fitted BPR / ALS ranks
    a group's unrated own-half items above the other half."""
    rng = np.random.default_rng(0)
    pairs = [(f"u{u}", f"i{i}") for u in range(40) for i in range(20)
             if (u < 20) == (i < 10) and rng.random() < 0.6]
    rows = rows_of(pairs)
    params = dict(factors=8, iterations=200, learning_rate=0.05) if kind == "bpr" else dict(factors=8, iterations=15)
    scorer = ImplicitFactors(kind, seed=0, **params).scorer(rows, ["u0", "u30"], [f"i{i}" for i in range(20)])
    top = scorer.top_k(["u0", "u30"], 5, exclude=rows[["user_id", "item_id"]])
    u0 = top[top["user_id"] == "u0"]["item_id"].str[1:].astype(int)
    u30 = top[top["user_id"] == "u30"]["item_id"].str[1:].astype(int)
    assert (u0.head(2) < 10).all() and (u30.head(2) >= 10).all()
