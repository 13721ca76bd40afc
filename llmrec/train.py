"""The training loop, in one readable function, and the fine-tune stage that resumes it
night after night from the champion."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from llmrec.config import ModelConfig, TrainingConfig
from llmrec.encoder import TextCache, TextFeatures
from llmrec.model import Champion, Checkpoint, grow, new_checkpoint, save
from llmrec.profile import train_profiles
from llmrec.schema import CatalogTexts
from llmrec.scoring import Scorer
from llmrec.window import Window

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
    # The rating-profile autoencoder's RMSE on its training ratings, every 100 steps.
    profile_losses: list[float] = field(default_factory=list)
    steps: int = 0
    ratings: int = 0
    seconds: float = 0.0

    @property
    def ratings_per_second(self) -> float:
        return self.ratings / self.seconds if self.seconds else math.nan


ID_TABLES = ("user_id", "item_id", "user_bias", "item_bias")
RANK_PARAMS = ("item_rank", "popularity_weight")


def make_optimizer(checkpoint: Checkpoint, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """Four groups: the per-id tables, the items' ranking bias (its own rate: it must span
    the log-popularity range within a night's few steps), the shared weights (mu, text
    projections) and the trainable encoder weights. Resuming a trained model, the shared weights and the encoder
    learn at `resume_shared_lr_scale` x their rate: they were fit on all history, and at full
    rate a small night pulls them towards its few users, which new users then inherit."""
    model = checkpoint.model
    scale = config.resume_shared_lr_scale if checkpoint.global_step > 0 else 1.0
    id_params, shared_params, encoder_params, rank_params = [], [], [], []
    for name, p in model.named_parameters():
        # (The rating-profile autoencoder has its own loop, `train_profiles`.)
        if p.requires_grad and not name.startswith("profiles."):
            module = name.split(".")[0]
            group = (encoder_params if module == "top_layers" else rank_params if module in RANK_PARAMS
                     else id_params if module in ID_TABLES else shared_params)
            group.append(p)
    groups = [{"params": id_params, "lr": config.lr}, {"params": shared_params, "lr": config.lr * scale},
              {"params": rank_params, "lr": config.ranking_bias_lr, "weight_decay": 0.0}]
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


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel fit: rank `rank` of `world` processes. Every
    process draws the same shuffled order, takes every `world`-th row of each global batch
    and averages its gradients with the others, so a step sees the same rows (and about the
    same gradient) whatever the number of processes. world=1 is the plain in-process loop."""

    rank: int = 0
    world: int = 1

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        # A last batch with fewer rows than processes is used whole by each of them: the
        # average of identical gradients is that batch's gradient, and no row is dropped.
        return batch[self.rank :: self.world] if len(batch) >= self.world else batch

    def negatives_generator(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """Where the ranking negatives are drawn from: the shuffling generator itself in one
        process (unchanged results); in several, one stream per rank, or every rank would
        draw the same negatives."""
        return generator if self.world == 1 else torch.Generator().manual_seed(seed * 1_000_003 + self.rank + 1)

    def loss_function(self, model: nn.Module, device: torch.device) -> Callable:
        if self.world == 1:
            return lambda *args: batch_loss(model, *args)
        from torch.nn.parallel import DistributedDataParallel

        # DDP hooks the gradient all-reduce into backward of what its forward returns; the
        # loss of a batch is that forward.
        # Some weights take no part in some losses (e.g. ranking-only ones with
        # ranking_weight=0): DDP must not wait for their gradients.
        return DistributedDataParallel(BatchLoss(model), device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def total(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        summed = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(summed)
        return summed.tolist()


class BatchLoss(nn.Module):
    """`batch_loss` as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return batch_loss(self.model, *args)


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
    batch, then scores every rating of the batch from those vectors. With
    `config.workers` > 1 the same loop runs data-parallel in that many processes
    (llmrec.distributed); the checkpoint comes back the same way either way.
    """
    if config.workers > 1:
        from llmrec.distributed import train_data_parallel

        return train_data_parallel(checkpoint, user_features, item_features, user_rows, item_rows, ratings, config,
                                   on_epoch)
    result = train_loop(checkpoint, user_features, item_features, user_rows, item_rows, ratings, config, on_epoch,
                        pick_device(config.device))
    checkpoint.model = checkpoint.model.cpu().eval()
    return result


def train_loop(checkpoint: Checkpoint, user_features: TextFeatures, item_features: TextFeatures, user_rows: np.ndarray,
               item_rows: np.ndarray, ratings: np.ndarray, config: TrainingConfig,
               on_epoch: Callable[[int, float], None] | None, device: torch.device, shard: Shard = Shard()) -> TrainResult:
    """The loop itself, in one process (`shard`: which part of each batch is this one's)."""
    model = checkpoint.model.to(device).train()
    optimizer = make_optimizer(checkpoint, config, device)
    loss_of = shard.loss_function(model, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    users = torch.as_tensor(user_rows, dtype=torch.long)
    items = torch.as_tensor(item_rows, dtype=torch.long)
    targets = torch.as_tensor(ratings, dtype=torch.float32)
    if config.loss == "bce":
        targets = (targets >= config.positive_threshold).float()
    generator = torch.Generator().manual_seed(config.seed + checkpoint.global_step)
    log_q = None
    if config.ranking_weight and config.ranking_logq:
        # Expected times an item is a candidate of the ranking term: the batch's items are
        # drawn in proportion to their share of the rows, the extra negatives uniformly.
        share = torch.bincount(items, minlength=len(item_features)).float() / max(len(items), 1)
        # (per process: each takes its share of the batch and draws its own negatives)
        expected = len(shard.rows(torch.arange(config.batch_size))) * share + config.ranking_negatives / max(len(item_features) - 1, 1)
        log_q = torch.log(expected.clamp_min(1e-6)).to(device)
    negatives = shard.negatives_generator(generator, config.seed + checkpoint.global_step)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(targets), generator=generator)
        total, seen = 0.0, 0
        for first in range(0, len(order), config.batch_size):
            batch = shard.rows(order[first : first + config.batch_size])
            loss, fit_loss = loss_of(user_features, item_features, users[batch], items[batch], targets[batch], config,
                                     negatives, device, autocast, log_q)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            checkpoint.global_step += 1
            result.steps += 1
            total += float(fit_loss.detach()) * len(batch)
            seen += len(batch)
        total, seen = shard.total(total, seen)
        epoch_loss = total / max(seen, 1)
        result.epoch_losses.append(epoch_loss)
        result.ratings += int(seen)
        if shard.rank == 0:
            log.info("epoch %d/%d: loss %.4f (%d ratings, step %d)", epoch + 1, config.epochs, epoch_loss, seen,
                     checkpoint.global_step)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    result.seconds = time.perf_counter() - start
    checkpoint.optimizer_state = export_optimizer_state(model, optimizer)
    checkpoint.loss_kind = config.loss
    return result


def batch_loss(model, user_features: TextFeatures, item_features: TextFeatures, users: torch.Tensor,
               items: torch.Tensor, targets: torch.Tensor, config: TrainingConfig, generator: torch.Generator,
               device: torch.device, autocast=nullcontext(),
               log_q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one batch of (user row, item row, target) and its rating part alone (the
    figure reported per epoch). The distinct users and items of the batch are encoded once,
    then every rating is scored from those vectors:

        rating loss (MSE on ratings, or BCE on 0/1 labels)
        + ranking_weight x sampled softmax over catalog items, for the positive rows, on the
          ranking score (the rating score plus the items' ranking bias a_i)
        + l2 x per-rating squared norm of the vectors and biases used

    Only the forward pass runs under `autocast` (bf16 on CUDA); the losses are float32.
    """
    batch_users, user_pos = torch.unique(users, return_inverse=True)
    batch_items, item_pos = torch.unique(items, return_inverse=True)
    user_pos, item_pos, target = user_pos.to(device), item_pos.to(device), targets.to(device)
    with autocast:
        user_pooled = model.encode(to_device(user_features.take(batch_users), device))
        user_vec, user_bias = model.side(batch_users.to(device), user_pooled, user=True)
        item_vec, item_bias = model.side(batch_items.to(device), model.encode(to_device(item_features.take(batch_items), device)), user=False)
        user_vec, user_bias = user_vec[user_pos], user_bias[user_pos]
        score = model.score(user_vec, user_bias, item_vec[item_pos], item_bias[item_pos]).float()
    if config.loss == "bce":
        fit_loss = nn.functional.binary_cross_entropy_with_logits(score, target)
    else:
        fit_loss = nn.functional.mse_loss(score, target)
    loss = fit_loss
    if config.ranking_weight:
        positive = target >= (0.5 if config.loss == "bce" else config.ranking_positive_rating)
        if bool(positive.any()):
            rank_users = user_vec[positive]
            if config.ranking_id_dropout:
                # Some rows see their user as a new user would be seen: text alone, no id.
                text_only = model.user_text(user_pooled)[:, : model.dim][user_pos][positive]
                drop = torch.rand(len(rank_users), generator=generator) < config.ranking_id_dropout
                rank_users = torch.where(drop.to(device)[:, None], text_only, rank_users)
            batch_ids = batch_items.to(device)
            # b_i takes no gradient from the ranking term: it stays a rating offset, and how
            # often an item is chosen goes to the ranking bias a_i (with every rated row a
            # positive, a shared b_i cost 0.004 RMSE on the first half of the weekly protocol).
            loss = loss + config.ranking_weight * ranking_loss(
                model, item_features, rank_users, item_vec, item_bias.detach() + model.rank_bias(batch_ids), item_pos[positive],
                config, generator, device, None if log_q is None else log_q[batch_ids], log_q)
    if config.l2:
        # Per-rating L2 on the vectors and biases used, as in biased matrix factorisation:
        # without it the id embeddings of users with few ratings overfit within an epoch.
        penalty = (user_vec.float().pow(2).sum(-1) + item_vec.float().pow(2).sum(-1)[item_pos]
                   + user_bias.float().pow(2) + item_bias.float().pow(2)[item_pos])
        loss = loss + config.l2 * penalty.mean()
    return loss, fit_loss


def ranking_loss(model, item_features: TextFeatures, user_vec: torch.Tensor, item_vec: torch.Tensor,
                 item_bias: torch.Tensor, target: torch.Tensor, config: TrainingConfig,
                 generator: torch.Generator, device: torch.device, batch_log_q: torch.Tensor | None = None,
                 log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax: each positive (user, item) row must outscore the other candidates,
    which are the distinct items of the batch plus `ranking_negatives` items drawn uniformly
    from the vocabulary. The logit is the served ranking score minus the user's own terms
    (mu + b_u cancel in a softmax over items): <v_u, v_i> + b_i + a_i, with a_i the ranking
    bias, so it trains the very ranking `top_k` uses. `item_bias` holds b_i + a_i.
    Uniform negatives keep popularity in the scores; in-batch ones alone would remove it.
    With `log_q` (log of each item's expected count among the candidates; `batch_log_q` for
    the batch's items) the logits are corrected by -log q (Yi et al. 2019, sampling-bias
    correction), so the softmax estimates the full one and the ranking bias learns the
    items' true share of positives instead of being pushed down for being frequent."""
    cand_vec, cand_bias = item_vec, item_bias
    if batch_log_q is not None:
        cand_bias = cand_bias.float() - batch_log_q
    if config.ranking_negatives and len(item_features) > 1:
        rows = torch.randint(1, len(item_features), (config.ranking_negatives,), generator=generator)
        neg_vec, neg_bias = model.side(rows.to(device), model.encode(to_device(item_features.take(rows), device)), user=False)
        neg_bias = neg_bias.detach() + model.rank_bias(rows.to(device))
        if log_q is not None:
            neg_bias = neg_bias.float() - log_q[rows.to(device)]
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


def fit(
    checkpoint: Checkpoint,
    cache: TextCache,
    train_rows: pd.DataFrame,
    texts: CatalogTexts,
    config: TrainingConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, dict[str, int]]:
    """Grow the vocabularies with the ids in `train_rows`, add them to the items' popularity
    (after decaying it by `popularity_decay`), then train on them. An id without a catalog
    row reads as empty text, which the encoder still maps to a vector."""
    first_run = checkpoint.global_step == 0
    added_users, added_items = grow(checkpoint, train_rows["user_id"].unique(), train_rows["item_id"].unique(), config.seed)
    if first_run and config.loss == "mse" and len(train_rows):
        with torch.no_grad():
            checkpoint.model.mu.fill_(float(train_rows["rating"].mean()))
    user_rows = checkpoint.users.rows(train_rows["user_id"].tolist())
    item_rows = checkpoint.items.rows(train_rows["item_id"].tolist())
    ratings = train_rows["rating"].to_numpy(dtype=np.float32)
    with torch.no_grad():
        counts = np.bincount(item_rows, minlength=len(checkpoint.items))
        popularity = checkpoint.model.item_popularity
        popularity.mul_(config.popularity_decay).add_(torch.as_tensor(counts, dtype=popularity.dtype))
        popularity[0] = 0.0  # the unknown item
    result = train(
        checkpoint,
        cache.features([texts.users.get(u, "") for u in checkpoint.users.ids]),
        cache.features([texts.items.get(i, "") for i in checkpoint.items.ids]),
        user_rows,
        item_rows,
        ratings,
        config,
        on_epoch,
    )
    profiles = checkpoint.model.profiles
    if profiles is not None:
        profiles.add_ratings(user_rows, item_rows, ratings, len(checkpoint.items))
        result.profile_losses = train_profiles(profiles, config, pick_device(config.device))
    return result, {"added_users": added_users, "added_items": added_items,
                    "users": len(checkpoint.users) - 1, "items": len(checkpoint.items) - 1}


@dataclass
class Trained:
    """Tonight's challenger: the checkpoint (in memory and saved), its serving vectors and
    how training went."""

    checkpoint: Checkpoint
    checkpoint_dir: Path
    scorer: Scorer
    result: TrainResult
    vocab: dict
    resumed_from: str | None
    start_step: int

    @property
    def global_step(self) -> int:
        return self.checkpoint.global_step


def fine_tune(champion: Champion, cache: TextCache, texts: CatalogTexts, window: Window, model_config: ModelConfig,
              config: TrainingConfig, out_dir: Path, run_name: str,
              on_epoch: Callable[[int, float], None] | None = None) -> Trained:
    """Resume a copy of the champion (or start from `cache.encoder` with `model_config`),
    grow its vocabularies, train on the window, and save the challenger checkpoint with its
    serving vectors into `out_dir`. The champion itself is left as it was, for the
    comparison. `cache` holds the frozen-encoder outputs for the champion's config (see
    `Champion.model_config`)."""
    if champion.checkpoint is not None:
        checkpoint = copy.deepcopy(champion.checkpoint)
        if checkpoint.config.model_dump() != model_config.model_dump():
            log.warning("model config differs from the champion's; resuming keeps the champion's %s",
                        checkpoint.config.model_dump())
    else:
        checkpoint = new_checkpoint(cache.encoder, model_config, config.seed)
    start_step = checkpoint.global_step
    result, vocab = fit(checkpoint, cache, window.train, texts, config, on_epoch)
    checkpoint.ingest_watermark = window.watermark
    last = pd.concat([window.train["timestamp"], window.held_out["timestamp"]]).max()
    checkpoint.max_event_time = pd.Timestamp(last).isoformat()
    checkpoint.history.append({"run": run_name, "trained_at": datetime.now(timezone.utc).isoformat(),
                               "train_rows": len(window.train), "steps": result.steps, "epoch_losses": result.epoch_losses}
                              | ({"profile_rmse": result.profile_losses} if result.profile_losses else {}))
    scorer = Scorer.from_checkpoint(checkpoint, cache, texts)
    folder = save(checkpoint, out_dir, *scorer.vectors())
    return Trained(checkpoint=checkpoint, checkpoint_dir=folder, scorer=scorer, result=result, vocab=vocab,
                   resumed_from=champion.version, start_step=start_step)
