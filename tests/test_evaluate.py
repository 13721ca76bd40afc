"""Code tests of the metrics (hand-computed cases) and of full-catalog top-k scoring."""

import math

import numpy as np
import pandas as pd
import pytest

from llmrec.evaluate import ndcg_at_k, rating_metrics, recall_at_k


def frame(rows, columns=("user_id", "item_id")):
    return pd.DataFrame(rows, columns=list(columns))


def test_rating_metrics_by_hand():
    m = rating_metrics(np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0]))
    assert m["mse"] == pytest.approx(5 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["mae"] == pytest.approx(1.0)
    assert math.isnan(rating_metrics(np.array([]), np.array([]))["rmse"])


def test_recall_and_ndcg_by_hand():
    relevant = frame([("a", "x"), ("a", "y"), ("b", "z")])
    top = frame([("a", "x", 1), ("a", "q", 2), ("a", "y", 3), ("b", "q", 1), ("b", "r", 2)],
                ("user_id", "item_id", "rank"))
    # a: 2 of 2 relevant in top-3; b: 0 of 1.
    assert recall_at_k(relevant, top, 3) == pytest.approx((1.0 + 0.0) / 2)
    assert recall_at_k(relevant, top, 1) == pytest.approx((0.5 + 0.0) / 2)
    dcg_a = 1 / math.log2(2) + 1 / math.log2(4)
    idcg_a = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(relevant, top, 3) == pytest.approx((dcg_a / idcg_a + 0.0) / 2)
    assert math.isnan(recall_at_k(frame([]), top, 3))


def test_top_k_ranks_all_items_and_skips_trained_pairs(tiny_encoder):
    import torch

    from llmrec.config import ModelConfig
    from llmrec.encoder import TextCache
    from llmrec.model import grow, new_checkpoint
    from llmrec.schema import CatalogTexts
    from llmrec.scoring import Scorer

    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=4), seed=0)
    grow(checkpoint, ["u"], [f"i{n}" for n in range(6)], seed=0)
    with torch.no_grad():
        checkpoint.model.item_bias.weight[1:, 0] = torch.arange(6, dtype=torch.float32)  # i5 best, i0 worst
        # A zero user vector leaves the item biases alone to decide the order.
        checkpoint.model.user_id.weight.zero_()
        checkpoint.model.user_text.weight.zero_()
        checkpoint.model.item_text.weight[-1].zero_()
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers, 16)
    items = [f"i{n}" for n in range(6)]
    scorer = Scorer.from_checkpoint(checkpoint, cache, CatalogTexts({"u": ""}, {i: i for i in items}))
    top = scorer.top_k(["u"], 3, exclude=frame([("u", "i5")]))
    assert list(top["item_id"]) == ["i4", "i3", "i2"]
    assert list(top["rank"]) == [1, 2, 3]


def test_segments_by_hand():
    from llmrec.config import EvaluationConfig
    from llmrec.evaluate import Sample, segment_masks, segment_rows

    history = frame([("a", "x")] * 6 + [("b", "x")] * 2 + [("c", "y")] * 5 + [("a", "z")])
    rows = frame([("a", "x"), ("b", "y"), ("d", "z"), ("c", "w")])
    config = EvaluationConfig(cold_ratings=5, heavy_user_share=0.34, head_item_share=0.34)
    user_counts, item_counts = history.groupby("user_id").size(), history.groupby("item_id").size()
    masks = segment_masks(rows, user_counts, item_counts, config)
    assert masks["cold users"].tolist() == [False, True, True, False]  # a: 7, b: 2, d: 0, c: 5
    assert masks["cold items"].tolist() == [False, False, True, True]  # x: 8, y: 5, z: 1, w: 0
    assert masks["heavy users"].tolist() == [True, False, False, False]  # top 1 of 3 users: a
    assert masks["long-tail items"].tolist() == [False, True, True, True]  # head: x
    errors = np.array([1.0, -2.0, 0.0, 2.0])
    users = pd.DataFrame({"recall_at_10": [1.0, 0.0], "ndcg_at_10": [1.0, 0.0]}, index=pd.Index(["a", "b"], name="user_id"))
    out = {row["segment"]: row for row in segment_rows("held_out", rows, user_counts, item_counts,
                                                         {"challenger": Sample(errors, users)}, config)}
    assert out["all"]["rows"] == 4 and out["all"]["challenger rmse"] == pytest.approx(math.sqrt(9 / 4))
    assert out["cold users"]["challenger mae"] == pytest.approx(1.0) and out["cold users"]["users ranked"] == 1
    assert out["cold users"]["challenger recall_at_10"] == 0.0 and out["heavy users"]["challenger recall_at_10"] == 1.0
    assert math.isnan(out["cold items"]["challenger recall_at_10"])


def test_list_metrics_by_hand():
    from llmrec.evaluate import coverage_at_k, ctr_at_k, hit_rate_at_k, map_at_k, precision_at_k

    relevant = frame([("a", "x"), ("a", "y"), ("b", "z"), ("c", "w")])
    top = frame([("a", "x", 1), ("a", "q", 2), ("a", "y", 3), ("b", "q", 1), ("b", "z", 2), ("b", "r", 3)],
                ("user_id", "item_id", "rank"))
    # c has a relevant item but no list at all: a miss for every per-user metric.
    # hits in top 3: a 2, b 1, c 0.
    assert precision_at_k(relevant, top, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert hit_rate_at_k(relevant, top, 3) == pytest.approx(2 / 3)
    assert hit_rate_at_k(relevant, top, 1) == pytest.approx(1 / 3)
    # AP@3: a = (1/1 + 2/3) / min(2, 3); b = (1/2) / 1; c = 0.
    assert map_at_k(relevant, top, 3) == pytest.approx(((1 + 2 / 3) / 2 + 0.5 + 0.0) / 3)
    # AP@2: a = (1/1) / min(2, 2); b = (1/2) / 1.
    assert map_at_k(relevant, top, 2) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # Distinct items shown in the top 3: x, q, y, z, r out of a catalog of 10.
    assert coverage_at_k(top, 10, 3) == pytest.approx(5 / 10)
    assert coverage_at_k(top, 10, 1) == pytest.approx(2 / 10)
    # Engaged (any rating) in the period: a rated x and q, b rated r; 6 items shown.
    engaged = frame([("a", "x"), ("a", "q"), ("b", "r"), ("c", "x")])
    assert ctr_at_k(engaged, top, 3) == pytest.approx(3 / 6)
    assert ctr_at_k(engaged, top, 1) == pytest.approx(1 / 2)
    assert math.isnan(ctr_at_k(engaged, top.iloc[:0], 3))


def test_list_metrics_against_scikit_learn():
    from sklearn.metrics import ndcg_score, precision_score, recall_score, roc_auc_score

    from llmrec.evaluate import precision_at_k

    rng = np.random.default_rng(0)
    users, items, k = [f"u{n}" for n in range(20)], [f"i{n}" for n in range(30)], 5
    truth = rng.random((len(users), len(items))) < 0.2
    truth[:, 0] = True  # every user has a relevant item
    scores = rng.random((len(users), len(items)))
    order = np.argsort(-scores, axis=1)
    top = frame([(u, items[j], r + 1) for n, u in enumerate(users) for r, j in enumerate(order[n, :k])],
                ("user_id", "item_id", "rank"))
    relevant = frame([(u, items[j]) for n, u in enumerate(users) for j in np.flatnonzero(truth[n])])
    assert ndcg_at_k(relevant, top, k) == pytest.approx(ndcg_score(truth.astype(float), scores, k=k))
    in_top = np.zeros_like(truth)
    np.put_along_axis(in_top, order[:, :k], True, axis=1)
    by_user_recall = [recall_score(truth[n], in_top[n]) for n in range(len(users))]
    by_user_precision = [precision_score(truth[n], in_top[n]) for n in range(len(users))]
    assert recall_at_k(relevant, top, k) == pytest.approx(np.mean(by_user_recall))
    assert precision_at_k(relevant, top, k) == pytest.approx(np.mean(by_user_precision))
    assert roc_auc_score([0, 1], [0.2, 0.4]) == 1.0


def test_classification_metrics_by_hand_and_against_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

    from llmrec.evaluate import classification_metrics

    liked = np.array([1, 1, 0, 0, 1], dtype=bool)
    score = np.array([4.5, 3.0, 4.0, 2.0, 4.0])
    m = classification_metrics(liked, score, 4.0)
    # predicted liked: rows 0, 2, 4 -> tp 2, fp 1, fn 1, tn 1.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # pairs (liked, not): (4.5, 4.0) > , (4.5, 2) >, (3, 4) <, (3, 2) >, (4, 4) tie, (4, 2) > -> 4.5 / 6.
    assert m["roc_auc"] == pytest.approx(4.5 / 6)
    assert math.isnan(classification_metrics(np.ones(3, bool), np.arange(3.0), 1.0)["roc_auc"])
    assert classification_metrics(np.zeros(2, bool), np.zeros(2), 1.0)["f1"] == 0.0

    rng = np.random.default_rng(1)
    liked = rng.random(500) < 0.55
    score = np.round(rng.normal(3.6, 0.8, 500) + 0.6 * liked, 1)  # rounded: ties on purpose
    m = classification_metrics(liked, score, 4.0)
    predicted = score >= 4.0
    assert m["accuracy"] == pytest.approx(accuracy_score(liked, predicted))
    assert m["precision"] == pytest.approx(precision_score(liked, predicted))
    assert m["recall"] == pytest.approx(recall_score(liked, predicted))
    assert m["f1"] == pytest.approx(f1_score(liked, predicted))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(liked, score))


def test_evaluate_returns_every_metric_flat(tiny_encoder):
    import torch

    from llmrec.config import ModelConfig
    from llmrec.encoder import TextCache
    from llmrec.evaluate import evaluate
    from llmrec.model import grow, new_checkpoint
    from llmrec.schema import CatalogTexts
    from llmrec.scoring import Scorer

    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=4), seed=0)
    items = [f"i{n}" for n in range(6)]
    grow(checkpoint, ["u", "v"], items, seed=0)
    with torch.no_grad():
        checkpoint.model.mu.fill_(3.0)
        checkpoint.model.item_bias.weight[1:, 0] = torch.arange(6, dtype=torch.float32) * 0.5  # i5 best
        checkpoint.model.user_id.weight.zero_()
        checkpoint.model.user_text.weight.zero_()
        checkpoint.model.item_text.weight.zero_()
        checkpoint.model.item_text.bias.zero_()
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers, 16)
    scorer = Scorer.from_checkpoint(checkpoint, cache, CatalogTexts({"u": "", "v": ""}, {i: i for i in items}))
    # predictions: i0 3.0, i1 3.5, i2 4.0, i3 4.5, i4 5.0, i5 5.5
    rows = pd.DataFrame({"user_id": ["u", "u", "u", "v"], "item_id": ["i5", "i1", "i3", "i0"],
                         "rating": [5.0, 4.0, 2.0, 3.0]})
    trained = frame([("u", "i4")])
    m = evaluate(scorer, rows, trained, 2, 4.0)
    assert all(isinstance(v, float) for v in m.values())
    # liked: i5 yes (pred 5.5 >= 4), i1 yes (3.5 no), i3 no (4.5 yes), i0 no (3.0 no)
    assert m["accuracy"] == pytest.approx(2 / 4) and m["precision"] == pytest.approx(1 / 2)
    # pairs (liked, not): (5.5, 4.5) >, (5.5, 3.0) >, (3.5, 4.5) <, (3.5, 3.0) > -> 3 / 4.
    assert m["recall"] == pytest.approx(1 / 2) and m["roc_auc"] == pytest.approx(3 / 4)
    # top 2: u -> i5, i3 (i4 excluded); v -> i5, i4. Only u has relevant items (i5, i1).
    assert m["recall_at_2"] == pytest.approx(1 / 2) and m["precision_at_2"] == pytest.approx(1 / 2)
    assert m["hit_rate_at_2"] == 1.0 and m["map_at_2"] == pytest.approx(1 / 2)
    assert m["coverage_at_2"] == pytest.approx(3 / 6)
    # shown: u (i5 rated, i3 rated), v (i5, i4 not rated) -> 2 of 4.
    assert m["ctr_at_2"] == pytest.approx(2 / 4)
