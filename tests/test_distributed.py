"""Data-parallel fine-tuning (training.workers > 1) on torch.distributed with gloo over
127.0.0.1: same quality as one process, same checkpoint format both ways."""

import numpy as np
import pytest
import torch

from llmrec.config import ModelConfig, TrainingConfig
from llmrec.data.synthetic import synthetic_frames
from llmrec.encoder import TextCache
from llmrec.model import load, new_checkpoint, save
from llmrec.schema import CatalogTexts, render_text
from llmrec.scoring import Scorer
from llmrec.train import fit

MODEL = ModelConfig(dim=16)


@pytest.fixture(scope="module")
def ratings():
    """Synthetic ratings with structure to learn: the newest 10% by time are held out."""
    data = synthetic_frames(users=150, items=200, days=10, seed=3)
    events = data.events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    cut = int(len(events) * 0.9)
    texts = CatalogTexts(users=render_text(data.users.drop(columns="_drop"), "user_id").to_dict(),
                         items=render_text(data.items.drop(columns="_drop"), "item_id").to_dict())
    return events.iloc[:cut], events.iloc[cut:], texts


def held_out_rmse(tiny_encoder, ratings, **training) -> float:
    train_rows, held_out, texts = ratings
    checkpoint = new_checkpoint(tiny_encoder, MODEL, seed=training.get("seed", 0))
    cache = TextCache.for_model(None, tiny_encoder, MODEL)
    fit(checkpoint, cache, train_rows, texts, TrainingConfig(epochs=6, batch_size=256, lr=0.01, **training))
    prediction = Scorer.from_checkpoint(checkpoint, cache, texts, held_out).predict(held_out["user_id"].tolist(),
                                                                                     held_out["item_id"].tolist())
    return float(np.sqrt(np.mean((prediction - held_out["rating"].to_numpy()) ** 2)))


@pytest.mark.slow
def test_two_workers_reach_the_held_out_rmse_of_one_within_seed_noise(tiny_encoder, ratings):
    one = [held_out_rmse(tiny_encoder, ratings, seed=seed) for seed in (0, 1, 2)]
    two = held_out_rmse(tiny_encoder, ratings, seed=0, workers=2)
    train_rows, held_out, _ = ratings
    global_mean = float(np.sqrt(np.mean((held_out["rating"] - train_rows["rating"].mean()) ** 2)))
    noise = max(3 * float(np.std(one, ddof=1)), 0.01)
    print(f"held-out RMSE: 1 worker (seeds 0, 1, 2) {np.round(one, 4).tolist()}, 2 workers (seed 0) {two:.4f}, "
          f"global mean {global_mean:.4f}, allowed |2 - mean(1)| <= {noise:.4f}")
    assert abs(two - float(np.mean(one))) <= noise, (two, one)
    # ... and both actually learned something beyond the global mean.
    assert max(one) < global_mean - 0.03 and two < global_mean - 0.03, (one, two, global_mean)


@pytest.mark.slow
def test_a_model_trained_by_two_workers_resumes_with_one_and_back(tiny_encoder, ratings, tmp_path):
    """Night 1 on one worker, night 2 on two, night 3 on one, each resumed from the saved
    checkpoint of the night before. Night 2 is also trained in process from the same
    checkpoint: with a loss without sampling (no ranking negatives) and batches that split
    evenly, the two workers' averaged gradients are the one process's, so the weights match."""
    train_rows, _, texts = ratings
    nights = [train_rows.iloc[:1024], train_rows.iloc[1024:1792], train_rows.iloc[1792:2560]]
    cache = TextCache.for_model(None, tiny_encoder, MODEL)
    checkpoint = new_checkpoint(tiny_encoder, MODEL, seed=0)
    steps, files = [], []
    for night, workers in enumerate((1, 2, 1)):
        config = TrainingConfig(epochs=2, batch_size=128, ranking_weight=0.0, workers=workers)
        if workers == 2:
            in_process = load(folder, tiny_encoder)
            fit(in_process, cache, nights[night], texts, config.model_copy(update={"workers": 1}))
        result, _ = fit(checkpoint, cache, nights[night], texts, config)
        if workers == 2:
            for name, value in in_process.model.state_dict().items():
                assert torch.allclose(checkpoint.model.state_dict()[name], value, atol=1e-4), name
            assert in_process.global_step == checkpoint.global_step
        steps.append((checkpoint.global_step, result.steps))
        folder = save(checkpoint, tmp_path / f"night{night}")
        files.append(sorted(p.name for p in folder.iterdir()))
        resumed = load(folder, tiny_encoder)
        for name, value in checkpoint.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[name], value), name
        assert resumed.optimizer_state.keys() == checkpoint.optimizer_state.keys()
        assert resumed.optimizer_state["item_id.weight"]["exp_avg"].abs().sum() > 0
        checkpoint = resumed
    assert files[0] == files[1] == files[2]
    # The step count goes on across the switch, one step per global batch whatever the workers.
    assert [s for s, _ in steps] == list(np.cumsum([r for _, r in steps]))
    assert [r for _, r in steps] == [2 * -(-len(n) // 128) for n in nights]


def test_one_worker_trains_in_process_and_starts_no_engine(tiny_encoder, ratings, monkeypatch):
    import llmrec.distributed

    def engine(*args, **kwargs):
        raise AssertionError("workers=1 must not start the data-parallel engine")

    monkeypatch.setattr(llmrec.distributed, "train_data_parallel", engine)
    train_rows, _, texts = ratings
    checkpoint = new_checkpoint(tiny_encoder, MODEL, seed=0)
    fit(checkpoint, TextCache.for_model(None, tiny_encoder, MODEL), train_rows.iloc[:500], texts,
        TrainingConfig(epochs=1))
    assert checkpoint.global_step > 0
    assert not torch.distributed.is_initialized()
