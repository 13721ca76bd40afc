"""Model tests: vocabulary growth, resumable checkpoints, text features, cold start, cache."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec.config import ModelConfig, TrainingConfig
from llmrec.encoder import TextCache
from llmrec.errors import LlmrecError
from llmrec.model import UNKNOWN, grow, load, new_checkpoint, save
from llmrec.schema import CatalogTexts
from llmrec.scoring import Scorer
from llmrec.train import fit

GENRES = ["action", "comedy", "drama", "horror"]


def toy(n_users=40, n_items=60, n=3000, seed=0):
    """Ratings driven by genre taste: user u likes genre u % 4."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, n_items, n)
    rating = np.where(users % 4 == items % 4, 5.0, 2.0)
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                          "rating": rating, "timestamp": pd.Timestamp("2026-01-01", tz="UTC")})
    user_texts = {f"u{u}": f"occupation: fan of {GENRES[u % 4]}" for u in range(n_users)}
    item_texts = {f"i{i}": f"film {i}; genres: {GENRES[i % 4]}" for i in range(n_items)}
    return frame, user_texts, item_texts


def trained(tiny_encoder, trainable_layers=0, epochs=4, lora_rank=0, **kw):
    frame, user_texts, item_texts = toy(**kw)
    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=8, trainable_layers=trainable_layers, lora_rank=lora_rank),
                                seed=0)
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers - trainable_layers, 32)
    # The toy's users rate every genre alike, so only the liked rows show taste to the ranking term.
    config = TrainingConfig(epochs=epochs, lr=0.02, batch_size=256, ranking_positive_rating=4.0)
    result, _ = fit(checkpoint, cache, frame, CatalogTexts(user_texts, item_texts), config)
    return checkpoint, cache, result, (frame, user_texts, item_texts)


def scorer_for(checkpoint, cache, user_texts, item_texts):
    users, items = sorted(user_texts), sorted(item_texts)
    return Scorer.from_checkpoint(checkpoint, cache, CatalogTexts({u: user_texts[u] for u in users},
                                                                  {i: item_texts[i] for i in items}))


def test_training_learns_the_taste_structure(tiny_encoder):
    checkpoint, cache, result, (frame, user_texts, item_texts) = trained(tiny_encoder, epochs=6)
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    pred = scorer.predict(frame["user_id"].tolist(), frame["item_id"].tolist())
    assert np.sqrt(np.mean((pred - frame["rating"].to_numpy()) ** 2)) < 0.8


def test_vocab_growth_keeps_old_rows_and_pads_optimizer_moments(tiny_encoder):
    checkpoint, *_ = trained(tiny_encoder, epochs=1)
    old_users = len(checkpoint.users)
    old_rows = checkpoint.model.user_id.weight.detach().clone()
    old_moment = checkpoint.optimizer_state["user_id.weight"]["exp_avg"].clone()
    added_users, added_items = grow(checkpoint, ["u1", "new-a", "new-b"], ["i1"], seed=0)
    assert (added_users, added_items) == (2, 0)
    assert checkpoint.users.ids[-2:] == ["new-a", "new-b"]
    weight = checkpoint.model.user_id.weight.detach()
    assert torch.equal(weight[:old_users], old_rows)
    moment = checkpoint.optimizer_state["user_id.weight"]["exp_avg"]
    assert moment.shape[0] == old_users + 2 and torch.equal(moment[:old_users], old_moment)
    assert torch.count_nonzero(checkpoint.model.user_bias.weight[old_users:]) == 0
    assert torch.count_nonzero(checkpoint.model.user_id.weight[UNKNOWN]) == 0


def test_checkpoint_round_trip_resumes_exactly(tiny_encoder, tmp_path):
    checkpoint, cache, _, (frame, user_texts, item_texts) = trained(tiny_encoder, epochs=2)
    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    tensors, ids = scorer.vectors()
    folder = save(checkpoint, tmp_path / "ck", tensors, ids)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                         "state.json", "vectors.safetensors"]
    state = json.loads((folder / "state.json").read_text())
    assert state["global_step"] == checkpoint.global_step > 0
    loaded = load(folder, tiny_encoder)
    assert loaded.users.ids == checkpoint.users.ids and loaded.items.ids == checkpoint.items.ids
    for name, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert loaded.optimizer_state.keys() == checkpoint.optimizer_state.keys()
    users, items = frame["user_id"].head(50).tolist(), frame["item_id"].head(50).tolist()
    expected = scorer.predict(users, items)
    again = scorer_for(loaded, cache, user_texts, item_texts).predict(users, items)
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-5)
    # The serving predictor reads only the stored vectors, and agrees.
    np.testing.assert_allclose(Scorer.load(folder).predict(users, items), expected, rtol=1e-4, atol=1e-4)


def test_resume_refuses_a_different_encoder(tiny_encoder, tmp_path):
    from transformers import BertConfig, BertModel

    from llmrec.encoder import from_model

    checkpoint, *_ = trained(tiny_encoder, epochs=1)
    folder = save(checkpoint, tmp_path / "ck")
    torch.manual_seed(1)
    other = from_model("other", tiny_encoder.tokenizer, BertModel(BertConfig(**tiny_encoder.model.config.to_dict())))
    with pytest.raises(LlmrecError, match="encoder identity"):
        load(folder, other)


def test_unseen_item_is_scored_from_its_text(tiny_encoder):
    checkpoint, cache, _, (frame, user_texts, item_texts) = trained(tiny_encoder, epochs=8)
    user_texts = dict(user_texts)
    new_items = {"new-action": "brand new film; genres: action", "new-comedy": "brand new film; genres: comedy"}
    item_texts = dict(item_texts) | new_items
    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    action_fans = [f"u{u}" for u in range(0, 40, 4)]
    comedy_fans = [f"u{u}" for u in range(1, 40, 4)]
    on_action = scorer.predict(action_fans, ["new-action"] * 10) - scorer.predict(action_fans, ["new-comedy"] * 10)
    on_comedy = scorer.predict(comedy_fans, ["new-comedy"] * 10) - scorer.predict(comedy_fans, ["new-action"] * 10)
    assert "new-action" not in checkpoint.items.index
    assert on_action.mean() > 0.3 and on_comedy.mean() > 0.3


def test_known_users_scored_as_new_get_their_text_prior_only(tiny_encoder):
    checkpoint, cache, _, (frame, user_texts, item_texts) = trained(tiny_encoder, epochs=8)
    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    users = ["u0", "u1", "u5"]
    as_new = scorer.as_new_users(checkpoint, cache, CatalogTexts(user_texts, item_texts), users)
    # The same profiles under ids the model never saw are scored from their text alone.
    ghosts = {f"ghost-{u}": user_texts[u] for u in users}
    ghost_scorer = scorer_for(checkpoint, cache, user_texts | ghosts, item_texts)
    items = ["i0", "i1", "i2", "i3"]
    for user in users:
        np.testing.assert_allclose(as_new.predict([user] * 4, items), ghost_scorer.predict([f"ghost-{user}"] * 4, items),
                                   rtol=1e-5, atol=1e-5)
    # Not the known user's own scores: the learned id embedding and bias are left out.
    assert not np.allclose(as_new.predict(["u0"] * 4, items), scorer.predict(["u0"] * 4, items), atol=1e-3)
    # The taste the text carries survives: a fan of action still prefers the action film.
    assert (as_new.predict(["u0"], ["i0"]) - as_new.predict(["u0"], ["i1"]))[0] > 0


def test_trainable_top_layer_is_fine_tuned_and_bottom_is_not(tiny_encoder):
    before_top = tiny_encoder.layers[-1].attention.self.query.weight.detach().clone()
    before_bottom = tiny_encoder.layers[0].attention.self.query.weight.detach().clone()
    checkpoint, _, result, _ = trained(tiny_encoder, trainable_layers=1, epochs=2)
    assert len(checkpoint.model.top_layers) == 1
    assert not torch.equal(checkpoint.model.top_layers[0].attention.self.query.weight, before_top)
    assert torch.equal(tiny_encoder.layers[0].attention.self.query.weight, before_bottom)
    assert torch.equal(tiny_encoder.layers[-1].attention.self.query.weight, before_top)
    assert any(name.startswith("top_layers.") for name in checkpoint.optimizer_state)


def test_lora_trains_adapters_only_and_resumes(tiny_encoder, tmp_path):
    before = tiny_encoder.layers[-1].attention.self.query.weight.detach().clone()
    checkpoint, cache, result, (frame, user_texts, item_texts) = trained(tiny_encoder, trainable_layers=1,
                                                                          epochs=2, lora_rank=4)
    layer = checkpoint.model.top_layers[0]
    assert torch.equal(layer.attention.self.query.base_layer.weight, before)
    assert not layer.attention.self.query.base_layer.weight.requires_grad
    adapted = layer.attention.self.query.lora_B["default"].weight
    assert adapted.requires_grad and adapted.abs().sum() > 0  # B starts at zero, so training moved it
    moments = [name for name in checkpoint.optimizer_state if name.startswith("top_layers.")]
    assert moments and all("lora_" in name for name in moments)
    folder = save(checkpoint, tmp_path / "ck")
    loaded = load(folder, tiny_encoder)
    for name, value in checkpoint.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    users, items = frame["user_id"].head(20).tolist(), frame["item_id"].head(20).tolist()
    np.testing.assert_allclose(scorer_for(loaded, cache, user_texts, item_texts).predict(users, items),
                               scorer_for(checkpoint, cache, user_texts, item_texts).predict(users, items),
                               rtol=1e-5, atol=1e-5)


def test_lora_without_trainable_layers_is_refused():
    with pytest.raises(ValueError, match="model.trainable_layers=0"):
        ModelConfig(lora_rank=8)


def test_resuming_moves_shared_weights_at_a_fraction_of_the_rate(tiny_encoder):
    import copy

    checkpoint, cache, _, (frame, user_texts, item_texts) = trained(tiny_encoder, epochs=2)
    night = frame.head(200)
    moved = {}
    for scale in (1.0, 0.03):
        resumed = copy.deepcopy(checkpoint)
        before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
        fit(resumed, cache, night, CatalogTexts(user_texts, item_texts),
            TrainingConfig(epochs=2, lr=0.02, batch_size=64, resume_shared_lr_scale=scale))
        after = resumed.model.state_dict()
        moved[scale] = {k: float((after[k] - before[k]).abs().max()) for k in ("user_text.weight", "user_id.weight")}
    assert moved[0.03]["user_text.weight"] < 0.1 * moved[1.0]["user_text.weight"]
    # Per-id embeddings learn at the full rate either way.
    assert moved[0.03]["user_id.weight"] > 0.5 * moved[1.0]["user_id.weight"]


def test_length_bucketed_encoding_matches_one_padded_pass(tiny_encoder):
    """More texts than one piece: sorted into length buckets, then put back in order."""
    from llmrec.encoder import mean_pool, run_layers
    from llmrec.model import PIECE_CPU

    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=8, trainable_layers=1), seed=0)
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers - 1, 32)
    texts = [("word " * (1 + i % 13)).strip() + f" {i}" for i in range(PIECE_CPU * 2 + 37)]
    features = cache.features(texts)
    model = checkpoint.model
    bucketed = model.encode(features)
    whole = mean_pool(run_layers(model.top_layers, features.hidden, features.mask), features.mask)
    assert bucketed.shape == whole.shape
    torch.testing.assert_close(bucketed, whole, atol=1e-5, rtol=1e-4)
    bucketed.sum().backward()
    assert model.top_layers[0].attention.self.query.weight.grad is not None


def test_text_cache_persists_and_is_reused(tiny_encoder, tmp_path, monkeypatch):
    cache = TextCache(tmp_path, tiny_encoder, 1, 32)
    first = cache.features(["a red film", "a blue film"])
    reloaded = TextCache(tmp_path, tiny_encoder, 1, 32)
    monkeypatch.setattr(reloaded, "_compute", lambda missing: pytest.fail(f"recomputed {missing}"))
    second = reloaded.features(["a blue film", "a red film"])
    assert torch.allclose(first.hidden[0].float(), second.hidden[1].float())
    # A different split point is a different cache entry.
    other = TextCache(tmp_path, tiny_encoder, 2, 32)
    assert other.folder != cache.folder


def test_bce_loss_predicts_probabilities(tiny_encoder):
    frame, user_texts, item_texts = toy()
    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=8), seed=0)
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers, 32)
    fit(checkpoint, cache, frame, CatalogTexts(user_texts, item_texts), TrainingConfig(epochs=10, lr=0.05, loss="bce"))
    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    pred = scorer.predict(frame["user_id"].tolist(), frame["item_id"].tolist())
    assert ((pred > 0) & (pred < 1)).all()
    positive = frame["rating"].to_numpy() >= 4
    assert pred[positive].mean() > pred[~positive].mean() + 0.3


def test_ranking_bias_learns_popularity_ranks_only_and_old_checkpoints_load(tiny_encoder, tmp_path):
    """The ranking bias a_i = w log(1 + n_i) + r_i: n_i counts the rows each item was trained
    on (decayed night by night), w and r_i are trained by the ranking term only. Here i0..i4
    hold a third of all rows: they get the larger a_i. a_i moves top_k, leaves rating
    predictions alone, and a checkpoint written before it existed loads with a_i = 0."""
    from safetensors.torch import load_file, save_file

    frame, user_texts, item_texts = toy(n=3000)
    rng = np.random.default_rng(3)
    hits = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 40, 1500)],
                         "item_id": [f"i{i}" for i in rng.integers(0, 5, 1500)], "rating": 5.0,
                         "timestamp": pd.Timestamp("2026-01-01", tz="UTC")})
    rows = pd.concat([frame, hits], ignore_index=True)
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers, 32)
    config = TrainingConfig(epochs=3, lr=0.02, batch_size=256)
    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=8), seed=0)
    fit(checkpoint, cache, rows, CatalogTexts(user_texts, item_texts), config)
    model = checkpoint.model
    counts = rows["item_id"].value_counts()
    expected = torch.as_tensor([0.0] + [float(counts[i]) for i in checkpoint.items.ids[1:]])
    assert torch.equal(model.item_popularity, expected)
    with torch.no_grad():
        rank = model.rank_bias(torch.arange(len(checkpoint.items)))
    popular = torch.as_tensor(checkpoint.items.rows([f"i{i}" for i in range(5)]))
    others = torch.as_tensor(checkpoint.items.rows([f"i{i}" for i in range(5, 60)]))
    assert rank[popular].mean() > rank[others].mean() + 0.5
    # A second night decays the counts before adding its own rows.
    night = rows.head(100)
    fit(checkpoint, cache, night, CatalogTexts(user_texts, item_texts), config.model_copy(update={"popularity_decay": 0.5, "epochs": 1}))
    again = torch.as_tensor([0.0] + [float(night["item_id"].value_counts().get(i, 0)) for i in checkpoint.items.ids[1:]])
    assert torch.allclose(model.item_popularity, 0.5 * expected + again)
    # The rating loss alone never touches the learned parts.
    plain = new_checkpoint(tiny_encoder, ModelConfig(dim=8), seed=0)
    fit(plain, cache, rows, CatalogTexts(user_texts, item_texts), config.model_copy(update={"ranking_weight": 0.0}))
    assert torch.count_nonzero(plain.model.item_rank.weight) == 0 and float(plain.model.popularity_weight) == 1.0

    scorer = scorer_for(checkpoint, cache, user_texts, item_texts)
    users, items = scorer.user_ids, scorer.item_ids
    top = scorer.top_k(users, 5)
    with torch.no_grad():
        ranked = (scorer.user_vectors @ scorer.item_vectors.T + scorer.user_bias[:, None] + scorer.item_bias[None, :]
                  + scorer.mu + scorer.item_rank_bias[None, :])
    assert list(top[top["user_id"] == users[0]]["item_id"]) == [items[j] for j in torch.topk(ranked[0], 5).indices]
    predicted = scorer.predict(users[:3], items[:3])
    np.testing.assert_allclose(predicted, (scorer.mu + scorer.user_bias[:3] + scorer.item_bias[:3]
                                           + (scorer.user_vectors[:3] * scorer.item_vectors[:3]).sum(-1)).numpy(),
                               rtol=1e-5, atol=1e-5)

    # A checkpoint from before the ranking bias: same files without item_rank.weight.
    folder = save(checkpoint, tmp_path / "old")
    weights = load_file(str(folder / "model.safetensors"))
    for name in ("item_rank.weight", "item_popularity", "popularity_weight"):
        del weights[name]
    save_file(weights, str(folder / "model.safetensors"))
    loaded = load(folder, tiny_encoder)
    with torch.no_grad():
        assert torch.count_nonzero(loaded.model.rank_bias(torch.arange(len(loaded.items)))) == 0
    assert len(loaded.model.item_rank.weight) == len(loaded.model.item_popularity) == len(loaded.items)
    np.testing.assert_allclose(scorer_for(loaded, cache, user_texts, item_texts).predict(users[:3], items[:3]),
                               predicted, rtol=1e-5, atol=1e-5)
    # Anything else missing is still an error.
    del weights["item_bias.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(LlmrecError, match="does not match"):
        load(folder, tiny_encoder)


def test_ranking_term_takes_every_rated_row_and_leaves_the_rating_biases_alone(tiny_encoder):
    """The ranking term's positives are the rows rated >= ranking_positive_rating (1: all of
    them), and it trains the ranking bias and the vectors but never b_i (a rating offset)."""
    from llmrec.train import batch_loss

    frame, user_texts, item_texts = toy(n=300)
    cache = TextCache(None, tiny_encoder, tiny_encoder.num_layers, 32)
    checkpoint = new_checkpoint(tiny_encoder, ModelConfig(dim=8), seed=0)
    grow(checkpoint, frame["user_id"].unique(), frame["item_id"].unique(), seed=0)
    model = checkpoint.model
    users = cache.features([user_texts.get(u, "") for u in checkpoint.users.ids])
    items = cache.features([item_texts.get(i, "") for i in checkpoint.items.ids])
    rows = frame.head(256)
    user_rows = torch.as_tensor(checkpoint.users.rows(rows["user_id"].tolist()))
    item_rows = torch.as_tensor(checkpoint.items.rows(rows["item_id"].tolist()))
    low = torch.full((len(rows),), 2.0)  # every row rated 2: positives at 1, none at 4

    def gradients(**update):
        model.zero_grad()
        config = TrainingConfig(l2=0.0).model_copy(update=update)
        loss, _ = batch_loss(model, users, items, user_rows, item_rows, low, config,
                             torch.Generator().manual_seed(0), torch.device("cpu"))
        loss.backward()
        return {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for name, p in model.named_parameters()}

    rating_only = gradients(ranking_weight=0.0)
    with_ranking = gradients(ranking_weight=1.0, ranking_positive_rating=1.0)
    liked_only = gradients(ranking_weight=1.0, ranking_positive_rating=4.0)
    assert torch.equal(with_ranking["item_bias.weight"], rating_only["item_bias.weight"])
    assert torch.count_nonzero(with_ranking["item_rank.weight"]) > 0
    assert not torch.allclose(with_ranking["item_id.weight"], rating_only["item_id.weight"])
    assert torch.count_nonzero(liked_only["item_rank.weight"]) == 0
