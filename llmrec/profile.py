"""The items' rating profiles: an item-based autoencoder trained beside the recommender
(`model.profile_dim` > 0), with its loss and training loop.

Each item's vector of ratings over the users (who rated it, how) goes through two
sigmoid layers to a code h_i, and is decoded back to every user's rating as
b'_u + <d_u, h_i>. Every connection's weight is multiplied by GLocal-K's local kernel,
max(0, 1 - |p - q|^2) between learned points of the two units it joins (Han et al. 2021,
the pretraining stage), which learns to switch off connections that only overfit.

The decoder is a dot product of a per-user vector d_u and a per-item code h_i, so the
recommender serves it in its own formula (`Recommender.served_side`). The ratings it
encodes are kept in the checkpoint (one per user and item, the newest).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

log = logging.getLogger(__name__)

UNKNOWN = 0  # row of the unknown user (as in llmrec.model): no ratings, no decoder
KERNEL_DIM = 5
# Items per full-batch block: at most ~16M (item, user) outputs at once.
BLOCK_OUTPUTS = 1 << 24


def local_kernel(points_in: torch.Tensor, points_out: torch.Tensor) -> torch.Tensor:
    """[in, out] connection weights in [0, 1]: max(0, 1 - squared distance of their points)."""
    return torch.clamp(1 - torch.cdist(points_in, points_out).pow(2), min=0)


def glorot(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols) * math.sqrt(2.0 / (rows + cols))


class RatingProfiles(nn.Module):
    def __init__(self, n_users: int, n_items: int, size: int):
        super().__init__()
        self.size = size
        # Layer 1 (the users' ratings -> hidden units): a row of weights and a kernel point per user.
        self.user_in = nn.Embedding(n_users, size)
        self.user_in_point = nn.Embedding(n_users, KERNEL_DIM)
        self.hidden_in_point = nn.Parameter(torch.randn(size, KERNEL_DIM) * 1e-3)
        self.bias_in = nn.Parameter(torch.zeros(size))
        # Layer 2 (hidden -> code).
        self.weight_mid = nn.Parameter(glorot(size, size))
        self.mid_points = nn.Parameter(torch.randn(2, size, KERNEL_DIM) * 1e-3)
        self.bias_mid = nn.Parameter(torch.zeros(size))
        # Decoder (code -> each user's rating): d_u, a kernel point and a bias per user.
        self.user_out = nn.Embedding(n_users, size)
        self.user_out_point = nn.Embedding(n_users, KERNEL_DIM)
        self.hidden_out_point = nn.Parameter(torch.randn(size, KERNEL_DIM) * 1e-3)
        self.user_bias = nn.Embedding(n_users, 1)
        with torch.no_grad():
            self.user_in.weight.copy_(glorot(n_users, size))
            self.user_out.weight.copy_(glorot(n_users, size))
            for table in (self.user_in_point, self.user_out_point):
                table.weight.normal_(std=1e-3)
            self.user_bias.weight.zero_()
            # The unknown user has no ratings and no decoder: its rows start at zero and stay
            # there (no rating reaches them, and zero weights take no L2 gradient).
            for table in (self.user_in, self.user_out):
                table.weight[UNKNOWN] = 0.0
        self.set_ratings(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), n_items)

    # ------------------------------------------------------------------ the ratings

    def set_ratings(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, n_items: int) -> None:
        """Store (user row, item row, rating) sorted by item; start[i] is where item i's ratings begin."""
        order = np.lexsort((users.numpy(), items.numpy()))
        self.register_buffer("users", users[order].long())
        self.register_buffer("items", items[order].long())
        self.register_buffer("ratings", ratings[order].float())
        counts = torch.bincount(self.items, minlength=n_items)
        self.register_buffer("start", torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))

    def add_ratings(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, n_items: int) -> None:
        """Merge training rows in; a (user, item) pair rated again keeps its newest rating
        (replayed rows are the same pair again, not a second rating)."""
        frame = pd.DataFrame({"user": np.concatenate([self.users.numpy(), users]),
                              "item": np.concatenate([self.items.numpy(), items]),
                              "rating": np.concatenate([self.ratings.numpy(), ratings])})
        frame = frame.drop_duplicates(["user", "item"], keep="last")
        self.set_ratings(*(torch.as_tensor(frame[c].to_numpy()) for c in ("user", "item", "rating")), n_items)

    def grow(self, n_users: int, n_items: int, generator: torch.Generator) -> None:
        """New users get fresh rows (as at initialisation); new items an empty profile."""
        for name in ("user_in", "user_in_point", "user_out", "user_out_point", "user_bias"):
            table: nn.Embedding = getattr(self, name)
            old = table.weight.data
            if len(old) >= n_users:
                continue
            if name in ("user_in", "user_out"):
                fresh = torch.randn(n_users - len(old), old.shape[1], generator=generator) * math.sqrt(
                    2.0 / (n_users + old.shape[1]))
            elif name == "user_bias":
                fresh = torch.zeros(n_users - len(old), 1)
            else:
                fresh = torch.randn(n_users - len(old), KERNEL_DIM, generator=generator) * 1e-3
            grown = nn.Embedding(n_users, old.shape[1])
            grown.weight.data = torch.cat([old, fresh])
            setattr(self, name, grown)
        if len(self.start) <= n_items:
            self.set_ratings(self.users, self.items, self.ratings, n_items)

    # ------------------------------------------------------------------ the network

    def kernel_in(self) -> torch.Tensor:
        return local_kernel(self.user_in_point.weight, self.hidden_in_point)

    def kernel_mid(self) -> torch.Tensor:
        return local_kernel(self.mid_points[0], self.mid_points[1])

    def kernel_out(self) -> torch.Tensor:
        return local_kernel(self.hidden_out_point, self.user_out_point.weight)

    def kernels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kernel_in(), self.kernel_mid(), self.kernel_out()

    def code(self, items: torch.Tensor, kernels=None, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """h_i for each item row in `items`: its ratings through the two kernel layers
        (`kernels`: the step's, when training; else the two it needs are computed;
        `inputs`: the values encoded in place of the stored ratings, row-aligned with them)."""
        if not len(items):
            return torch.zeros(0, self.size, device=items.device)
        k_in, k_mid = (self.kernel_in(), self.kernel_mid()) if kernels is None else kernels[:2]
        start, lengths = self.start[items], self.start[items + 1] - self.start[items]
        entries = torch.repeat_interleave(start - lengths.cumsum(0) + lengths, lengths) + torch.arange(
            int(lengths.sum()), device=items.device)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=items.device), lengths.cumsum(0)[:-1]])
        values = self.ratings if inputs is None else inputs
        summed = nn.functional.embedding_bag(self.users[entries], self.user_in.weight * k_in, offsets,
                                             mode="sum", per_sample_weights=values[entries])
        hidden = torch.sigmoid(summed + self.bias_in)
        return torch.sigmoid(hidden @ (self.weight_mid * k_mid) + self.bias_mid)

    def decoder(self, users: torch.Tensor, kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_u, b'_u) for each user row in `users`: its rating of item i is b'_u + <d_u, h_i>."""
        k_out = self.kernel_out() if kernels is None else kernels[2]
        return self.user_out(users) * k_out[:, users].T, self.user_bias(users)[:, 0]

    def penalty(self, kernels, l2: float, kernel_l2: float) -> torch.Tensor:
        weights = (self.user_in.weight, self.weight_mid, self.user_out.weight)
        return (l2 / 2 * sum(w.pow(2).sum() for w in weights)
                + kernel_l2 / 2 * sum(k.pow(2).sum() for k in kernels))


def train_profiles(profiles: RatingProfiles, config, device: torch.device) -> list[float]:
    """Full-batch training on every stored rating: each step decodes every item's code to
    every user, loss = summed squared error on the stored ratings / 2 + `profile_l2` / 2 x
    squared weights + `profile_kernel_l2` / 2 x squared kernels, then one Adam step (fresh
    moments each call; a resumed night starts from the trained weights). Each step encodes
    the ratings with a `profile_dropout` share of them hidden (the rest scaled up to keep
    the sum's scale) and is scored on all of them: an item's code learns to predict ratings
    it did not see. Items go through in blocks (one on MovieLens-100k). Returns the
    training RMSE every 100 steps (the step's own, from the inputs it kept)."""
    profiles = profiles.to(device).train()
    optimizer = torch.optim.Adam(profiles.parameters(), lr=config.profile_lr)
    n_users, n_items = profiles.user_in.num_embeddings, len(profiles.start) - 1
    block = max(1, BLOCK_OUTPUTS // n_users)
    users = torch.arange(n_users, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    keep = 1.0 - config.profile_dropout
    rmse = []
    for step in range(config.profile_epochs):
        optimizer.zero_grad(set_to_none=True)
        inputs = None
        if config.profile_dropout:
            kept = torch.rand(len(profiles.ratings), generator=generator, device=device) < keep
            inputs = profiles.ratings * kept / keep
        squared = 0.0
        for first in range(1, n_items, block):
            last = min(first + block, n_items)
            begin, end = int(profiles.start[first]), int(profiles.start[last])
            if begin == end:
                continue
            kernels = profiles.kernels()
            user_vec, user_bias = profiles.decoder(users, kernels)
            codes = profiles.code(torch.arange(first, last, device=device), kernels, inputs)
            predicted = user_bias[:, None] + user_vec @ codes.T
            error = (predicted[profiles.users[begin:end], profiles.items[begin:end] - first]
                     - profiles.ratings[begin:end]).pow(2).sum()
            (error / 2).backward()
            squared += float(error.detach())
        profiles.penalty(profiles.kernels(), config.profile_l2, config.profile_kernel_l2).backward()
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == config.profile_epochs:
            rmse.append(math.sqrt(squared / max(len(profiles.ratings), 1)))
            log.info("rating profiles step %d/%d: training RMSE %.4f", step + 1, config.profile_epochs, rmse[-1])
    spread = float(profiles.ratings.std()) if len(profiles.ratings) > 1 else math.nan
    if rmse and not rmse[-1] < spread:
        # The decoder starts at 0 and climbs to the rating scale step by step.
        log.warning("rating profiles: training RMSE %.3f after %d steps is no better than predicting the mean "
                    "rating (%.3f); raise training.profile_epochs or training.profile_lr, or lower "
                    "training.profile_l2 for fewer ratings", rmse[-1], config.profile_epochs, spread)
    profiles.cpu().eval()
    return rmse
