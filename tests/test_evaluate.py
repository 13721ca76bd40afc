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
    masks = segment_masks(rows, history, config)
    assert masks["cold users"].tolist() == [False, True, True, False]  # a: 7, b: 2, d: 0, c: 5
    assert masks["cold items"].tolist() == [False, False, True, True]  # x: 8, y: 5, z: 1, w: 0
    assert masks["heavy users"].tolist() == [True, False, False, False]  # top 1 of 3 users: a
    assert masks["long-tail items"].tolist() == [False, True, True, True]  # head: x
    errors = np.array([1.0, -2.0, 0.0, 2.0])
    users = pd.DataFrame({"recall_at_10": [1.0, 0.0], "ndcg_at_10": [1.0, 0.0]}, index=pd.Index(["a", "b"], name="user_id"))
    out = {row["segment"]: row for row in segment_rows("held_out", rows, history,
                                                         {"challenger": Sample(errors, users)}, config)}
    assert out["all"]["rows"] == 4 and out["all"]["challenger rmse"] == pytest.approx(math.sqrt(9 / 4))
    assert out["cold users"]["challenger mae"] == pytest.approx(1.0) and out["cold users"]["users ranked"] == 1
    assert out["cold users"]["challenger recall_at_10"] == 0.0 and out["heavy users"]["challenger recall_at_10"] == 1.0
    assert math.isnan(out["cold items"]["challenger recall_at_10"])
