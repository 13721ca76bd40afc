"""The training loop, in one readable function, and resuming it night after night."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from llmrec.config import TrainingConfig
from llmrec.encoder import TextCache, TextFeatures
from llmrec.model import Checkpoint, grow

log = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        from llmrec.errors import LlmrecError

        raise LlmrecError("training.device='cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class TrainResult:
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    ratings: int = 0
    seconds: float = 0.0

    @property
    def ratings_per_second(self) -> float:
        return self.ratings / self.seconds if self.seconds else math.nan


ID_TABLES = ("user_id", "item_id", "user_bias", "item_bias")


def make_optimizer(checkpoint: Checkpoint, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """Three groups: the per-id tables, the shared weights (mu, text projections) and the
    trainable encoder weights. Resuming a trained model, the shared weights and the encoder
    learn at `resume_shared_lr_scale` x their rate: they were fit on all history, and at full
    rate a small night pulls them towards its few users, which new users then inherit."""
    model = checkpoint.model
    scale = config.resume_shared_lr_scale if checkpoint.global_step > 0 else 1.0
    id_params, shared_params, encoder_params = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            module = name.split(".")[0]
            group = encoder_params if module == "top_layers" else id_params if module in ID_TABLES else shared_params
            group.append(p)
    groups = [{"params": id_params, "lr": config.lr}, {"params": shared_params, "lr": config.lr * scale}]
    if encoder_params:
        encoder_lr = config.lora_lr if checkpoint.config.lora_rank else config.encoder_lr
        groups.append({"params": encoder_params, "lr": encoder_lr * scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=device.type == "cuda")
    # Moments are stored by parameter name, so they survive vocabulary growth and reordering.
    by_name = dict(model.named_parameters())
    for name, moments in checkpoint.optimizer_state.items():
        if name in by_name and moments["exp_avg"].shape == by_name[name].shape:
            optimizer.state[by_name[name]] = {k: v.to(device) for k, v in moments.items()}
    return optimizer


def export_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    exported = {}
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter)
        if state:
            exported[name] = {k: torch.as_tensor(v).detach().cpu().float() for k, v in state.items()}
    return exported


def train(
    checkpoint: Checkpoint,
    user_features: TextFeatures,
    item_features: TextFeatures,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    ratings: np.ndarray,
    config: TrainingConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune `checkpoint` in place on (user row, item row, rating) triples.

    `user_features` / `item_features` are the frozen encoder outputs row-aligned with the
    checkpoint's vocabularies. Each step encodes only the distinct users and items of its
    batch, then scores every rating of the batch from those vectors.
    """
    device = pick_device(config.device)
    model = checkpoint.model.to(device).train()
    optimizer = make_optimizer(checkpoint, config, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    users = torch.as_tensor(user_rows, dtype=torch.long)
    items = torch.as_tensor(item_rows, dtype=torch.long)
    targets = torch.as_tensor(ratings, dtype=torch.float32)
    if config.loss == "bce":
        targets = (targets >= config.positive_threshold).float()
    generator = torch.Generator().manual_seed(config.seed + checkpoint.global_step)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(targets), generator=generator)
        total, seen = 0.0, 0
        for first in range(0, len(order), config.batch_size):
            batch = order[first : first + config.batch_size]
            batch_users, user_pos = torch.unique(users[batch], return_inverse=True)
            batch_items, item_pos = torch.unique(items[batch], return_inverse=True)
            user_in = to_device(user_features.take(batch_users), device)
            item_in = to_device(item_features.take(batch_items), device)
            target = targets[batch].to(device)
            with autocast:
                user_vec, user_bias = model.side(batch_users.to(device), model.encode(user_in), user=True)
                item_vec, item_bias = model.side(batch_items.to(device), model.encode(item_in), user=False)
                score = model.score(user_vec[user_pos.to(device)], user_bias[user_pos.to(device)],
                                    item_vec[item_pos.to(device)], item_bias[item_pos.to(device)]).float()
            if config.loss == "bce":
                loss = nn.functional.binary_cross_entropy_with_logits(score, target)
            else:
                loss = nn.functional.mse_loss(score, target)
            fit_loss = loss
            if config.ranking_weight:
                positive = targets[batch] >= (0.5 if config.loss == "bce" else config.positive_threshold)
                if bool(positive.any()):
                    rank_loss = ranking_loss(model, item_features, user_vec[user_pos.to(device)][positive.to(device)],
                                             item_vec, item_bias, item_pos[positive].to(device), config, generator, device)
                    loss = loss + config.ranking_weight * rank_loss
            if config.l2:
                # Per-rating L2 on the vectors and biases used, as in biased matrix factorisation:
                # without it the id embeddings of users with few ratings overfit within an epoch.
                penalty = (user_vec.float().pow(2).sum(-1)[user_pos.to(device)] + item_vec.float().pow(2).sum(-1)[item_pos.to(device)]
                           + user_bias.float().pow(2)[user_pos.to(device)] + item_bias.float().pow(2)[item_pos.to(device)])
                loss = loss + config.l2 * penalty.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            checkpoint.global_step += 1
            result.steps += 1
            total += float(fit_loss.detach()) * len(batch)
            seen += len(batch)
        epoch_loss = total / max(seen, 1)
        result.epoch_losses.append(epoch_loss)
        result.ratings += seen
        log.info("epoch %d/%d: loss %.4f (%d ratings, step %d)", epoch + 1, config.epochs, epoch_loss, seen,
                 checkpoint.global_step)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    result.seconds = time.perf_counter() - start
    checkpoint.model = model.cpu().eval()
    checkpoint.optimizer_state = export_optimizer_state(checkpoint.model, optimizer)
    checkpoint.loss = config.loss
    return result


def ranking_loss(model, item_features: TextFeatures, user_vec: torch.Tensor, item_vec: torch.Tensor,
                 item_bias: torch.Tensor, target: torch.Tensor, config: TrainingConfig,
                 generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sampled softmax: each positive (user, item) row must outscore the other candidates,
    which are the distinct items of the batch plus `ranking_negatives` items drawn uniformly
    from the vocabulary. The logit is the served score minus the user's own terms
    (mu + b_u cancel in a softmax over items), so it trains the very ranking `top_k` uses.
    Uniform negatives keep popularity in the scores; in-batch ones alone would remove it."""
    cand_vec, cand_bias = item_vec, item_bias
    if config.ranking_negatives and len(item_features) > 1:
        rows = torch.randint(1, len(item_features), (config.ranking_negatives,), generator=generator)
        neg_vec, neg_bias = model.side(rows.to(device), model.encode(to_device(item_features.take(rows), device)), user=False)
        cand_vec, cand_bias = torch.cat([item_vec.float(), neg_vec.float()]), torch.cat([item_bias.float(), neg_bias.float()])
    logits = user_vec.float() @ cand_vec.float().T + cand_bias.float()[None, :]
    return nn.functional.cross_entropy(logits, target)


def to_device(features: TextFeatures, device: torch.device) -> TextFeatures:
    if device.type == "cpu":
        return features
    return TextFeatures(
        pooled=None if features.pooled is None else features.pooled.to(device, non_blocking=True),
        hidden=None if features.hidden is None else features.hidden.to(device, non_blocking=True),
        mask=None if features.mask is None else features.mask.to(device, non_blocking=True),
    )


def text_features(cache: TextCache, ids: list[str], texts: dict[str, str]) -> TextFeatures:
    """Frozen-encoder features for ids, in order; an id without a catalog row reads as
    empty text, which the encoder still maps to a vector."""
    return cache.features([texts.get(i, "") for i in ids])


def fit(
    checkpoint: Checkpoint,
    cache: TextCache,
    train_rows: pd.DataFrame,
    user_texts: dict[str, str],
    item_texts: dict[str, str],
    config: TrainingConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, dict[str, int]]:
    """Grow the vocabularies with the ids in `train_rows`, then train on them."""
    first_run = checkpoint.global_step == 0
    added_users, added_items = grow(checkpoint, train_rows["user_id"].unique(), train_rows["item_id"].unique(), config.seed)
    if first_run and config.loss == "mse" and len(train_rows):
        with torch.no_grad():
            checkpoint.model.mu.fill_(float(train_rows["rating"].mean()))
    user_features = text_features(cache, checkpoint.users.ids, user_texts)
    item_features = text_features(cache, checkpoint.items.ids, item_texts)
    result = train(
        checkpoint,
        user_features,
        item_features,
        checkpoint.users.rows(train_rows["user_id"].tolist()),
        checkpoint.items.rows(train_rows["item_id"].tolist()),
        train_rows["rating"].to_numpy(dtype=np.float32),
        config,
        on_epoch,
    )
    return result, {"added_users": added_users, "added_items": added_items,
                    "users": len(checkpoint.users) - 1, "items": len(checkpoint.items) - 1}
