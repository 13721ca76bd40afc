"""The recommender: rating = mu + b_u + b_i + <v_u, v_i>.

    v_i = W_i · enc(item text) + e_i        b_i = w_i · enc(item text) + c_i
    v_u = W_u · enc(user text) + e_u        b_u = w_u · enc(user text) + c_u

enc() is the pretrained encoder (frozen bottom, optionally fine-tuned top layers, mean
pooled); e and c are learned per-id embeddings and biases.

Ranking (top-k lists) adds a per-item ranking bias a_i to that score: mu + b_u + b_i +
<v_u, v_i> + a_i, with a_i = w * log(1 + n_i) + r_i: n_i is the item's popularity (rows
trained on, decayed by `training.popularity_decay` each night), w a learned weight and r_i
a learned per-item offset. w and r_i are trained by the ranking term only (never by the
rating loss): how likely an item is to be chosen at all, mostly popularity and its recent
trend, which the rating head cannot hold (b_i must stay a rating offset, so the ranking
term leaves it alone; it trains a_i and the vectors, with every rated row a positive). Rating
predictions ignore a_i. Row 0 of every id table is the
unknown id and stays zero, so a user or item never seen in training is scored from its
text alone.

A checkpoint is a folder of safetensors and JSON (nothing is unpickled):
    model.safetensors      trainable weights
    optimizer.safetensors  AdamW moments per parameter name
    vectors.safetensors    final user and item vectors for serving without the encoder
    state.json             vocabularies, step, data watermark, encoder identity, config
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmrec.config import ModelConfig
from llmrec.encoder import Encoder, TextFeatures, mean_pool, run_layers
from llmrec.files import replace_atomically
from llmrec.profile import RatingProfiles

UNKNOWN = 0
# Weights a checkpoint may lack because it predates them; they load as initialised (zero).
OPTIONAL_WEIGHTS = {"item_rank.weight", "item_popularity", "popularity_weight"}
FORMAT_VERSION = 1
# Texts per length bucket through the trainable top layers (smaller pieces run slower
# on a CPU, larger ones pad more; a GPU prefers big batches).
PIECE_CPU = 128
PIECE_CUDA = 1024


class Recommender(nn.Module):
    def __init__(self, hidden_size: int, dim: int, n_users: int, n_items: int, top_layers: nn.ModuleList | None = None,
                 profile_dim: int = 0, profile_share: float = 0.6):
        super().__init__()
        self.dim = dim
        self.profile_share = profile_share
        self.mu = nn.Parameter(torch.tensor(3.5))
        self.user_id = nn.Embedding(n_users, dim)
        self.item_id = nn.Embedding(n_items, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.item_rank = nn.Embedding(n_items, 1)
        # Popularity prior of the ranking: (decayed) count of the rows each item was trained
        # on, kept across nights, and its learned weight (1 at the start: p(i) ~ count).
        self.register_buffer("item_popularity", torch.zeros(n_items))
        self.popularity_weight = nn.Parameter(torch.tensor(1.0))
        # One linear map per side gives both the text vector and the text bias.
        self.user_text = nn.Linear(hidden_size, dim + 1)
        self.item_text = nn.Linear(hidden_size, dim + 1)
        self.top_layers = top_layers if top_layers is not None else nn.ModuleList()
        for table in (self.user_id, self.item_id):
            nn.init.normal_(table.weight, std=0.05)
        for table in (self.user_bias, self.item_bias, self.item_rank):
            nn.init.zeros_(table.weight)
        for table in (self.user_id, self.item_id):
            with torch.no_grad():
                table.weight[UNKNOWN] = 0.0
        for linear in (self.user_text, self.item_text):
            nn.init.normal_(linear.weight, std=0.05)
            nn.init.zeros_(linear.bias)
        # The items' rating-profile autoencoder (llmrec.profile), when configured.
        self.profiles = RatingProfiles(n_users, n_items, profile_dim) if profile_dim else None

    @property
    def width(self) -> int:
        """Length of the served v_u and v_i: dim, plus profile_dim + 1 with rating profiles."""
        return self.dim + (self.profiles.size + 1 if self.profiles is not None else 0)

    def encode(self, features: TextFeatures) -> torch.Tensor:
        if features.pooled is not None:
            return features.pooled
        piece = PIECE_CPU if features.hidden.device.type == "cpu" else PIECE_CUDA
        if len(features) > piece:
            # Length bucketing: run the texts sorted by length, in pieces each padded only to
            # its own longest text (~30% fewer tokens per MovieLens step); it also bounds the
            # activations when a whole catalog is scored (~1 GiB for 1,682 items at once).
            order = torch.argsort(features.mask.sum(1))
            pooled = torch.cat([self.encode(features.take(rows)) for rows in order.split(piece)])
            return pooled[torch.argsort(order)]
        hidden = run_layers(self.top_layers, features.hidden, features.mask)
        return mean_pool(hidden, features.mask)

    def side(self, ids: torch.Tensor, pooled: torch.Tensor, user: bool) -> tuple[torch.Tensor, torch.Tensor]:
        text = (self.user_text if user else self.item_text)(pooled)
        id_vector = (self.user_id if user else self.item_id)(ids)
        id_bias = (self.user_bias if user else self.item_bias)(ids)[:, 0]
        return text[:, : self.dim] + id_vector, text[:, self.dim] + id_bias

    def served_side(self, ids: torch.Tensor, pooled: torch.Tensor, user: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors and biases scoring uses. Without rating profiles, `side`'s. With them,
        a known user's rating is (1 - s) x this model's + s x the autoencoder's (s =
        profile_share), in the same formula r = mu + b_u + b_i + <v_u, v_i>:
            v_u = [(1 - s) v_u, s d_u, 1 - s]    b_u = (1 - s) b_u + s (b'_u - mu)
            v_i = [v_i, h_i, b_i]                b_i = 0
        (b_i moves into the vectors, so that an unknown user, who has no d_u, keeps all of
        this model's rating: weight 1 instead of 1 - s)."""
        vector, bias = self.side(ids, pooled, user)
        if self.profiles is None:
            return vector, bias
        if not user:
            return torch.cat([vector, self.profiles.code(ids).to(vector.dtype), bias[:, None]], dim=1), torch.zeros_like(bias)
        share = torch.where(ids == UNKNOWN, 0.0, self.profile_share).to(vector.dtype)[:, None]
        profile_vec, profile_bias = self.profiles.decoder(ids)
        vector = torch.cat([(1 - share) * vector, share * profile_vec, 1 - share], dim=1)
        return vector, (1 - share[:, 0]) * bias + share[:, 0] * (profile_bias - self.mu)

    def rank_bias(self, ids: torch.Tensor) -> torch.Tensor:
        """a_i = w * log(1 + popularity_i) + a learned per-item offset."""
        return self.item_rank(ids)[:, 0] + self.popularity_weight * torch.log1p(self.item_popularity[ids])

    def score(self, user_vec, user_bias, item_vec, item_bias) -> torch.Tensor:
        return rating(self.mu, user_vec, user_bias, item_vec, item_bias)


def rating(mu, user_vec: torch.Tensor, user_bias: torch.Tensor, item_vec: torch.Tensor, item_bias: torch.Tensor) -> torch.Tensor:
    """r = mu + b_u + b_i + <v_u, v_i>, row by row: the formula training and scoring share."""
    return mu + user_bias + item_bias + (user_vec * item_vec).sum(-1)


@dataclass
class Vocab:
    """Id -> row, with row 0 reserved for unknown ids. New ids are appended, so the rows
    of ids seen before keep their learned values."""

    ids: list[str] = field(default_factory=lambda: ["<unk>"])

    def __post_init__(self):
        self.index = {value: row for row, value in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def extend(self, new_ids) -> int:
        added = 0
        for value in new_ids:
            if value not in self.index:
                self.index[value] = len(self.ids)
                self.ids.append(value)
                added += 1
        return added

    def rows(self, values) -> np.ndarray:
        return np.fromiter((self.index.get(v, UNKNOWN) for v in values), dtype=np.int64, count=len(values))


@dataclass
class Checkpoint:
    """Everything a nightly run resumes from."""

    model: Recommender
    config: ModelConfig
    encoder_identity: str
    users: Vocab
    items: Vocab
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    global_step: int = 0
    ingest_watermark: int = 0
    max_event_time: str | None = None
    loss_kind: str = "mse"
    history: list[dict] = field(default_factory=list)


@dataclass
class Champion:
    """The model in production that tonight's run resumes from and is compared with: its
    registered version and checkpoint, or neither before the first model."""

    version: str | None = None
    checkpoint: Checkpoint | None = None

    @property
    def ingest_watermark(self) -> int:
        return self.checkpoint.ingest_watermark if self.checkpoint is not None else 0

    def model_config(self, default: ModelConfig) -> ModelConfig:
        """The config tonight's challenger has: the champion's (resuming keeps it), else `default`."""
        return self.checkpoint.config if self.checkpoint is not None else default


def top_layers_of(encoder: Encoder, config: ModelConfig) -> nn.ModuleList:
    trainable_layers = config.trainable_layers
    if trainable_layers > encoder.num_layers:
        from llmrec.errors import LlmrecError

        raise LlmrecError(
            f"model.trainable_layers={trainable_layers} but encoder {encoder.name!r} has only {encoder.num_layers} layers"
        )
    layers = nn.ModuleList(copy.deepcopy(layer) for layer in encoder.layers[encoder.num_layers - trainable_layers :])
    for parameter in layers.parameters():
        parameter.requires_grad_(True)
    if config.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        # Freezes the copied weights and trains only the adapters; "all-linear" finds the
        # attention and feed-forward maps whatever the architecture names them.
        inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                           target_modules="all-linear"), layers)
    return layers


def new_checkpoint(encoder: Encoder, config: ModelConfig, seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    model = Recommender(encoder.hidden_size, config.dim, 1, 1, top_layers_of(encoder, config), config.profile_dim,
                        config.profile_share)
    return Checkpoint(model=model, config=config, encoder_identity=encoder.identity, users=Vocab(), items=Vocab())


def grow(checkpoint: Checkpoint, user_ids, item_ids, seed: int) -> tuple[int, int]:
    """Extend the vocabularies with unseen ids; old rows and their optimizer moments keep
    their values, new rows start small (ids) or at zero (biases, ranking bias, moments)."""
    added_users = checkpoint.users.extend(user_ids)
    added_items = checkpoint.items.extend(item_ids)
    model = checkpoint.model
    generator = torch.Generator().manual_seed(seed + checkpoint.global_step)
    for name, size in (("user_id", len(checkpoint.users)), ("user_bias", len(checkpoint.users)),
                       ("item_id", len(checkpoint.items)), ("item_bias", len(checkpoint.items)),
                       ("item_rank", len(checkpoint.items))):
        table: nn.Embedding = getattr(model, name)
        old = table.weight.data
        if len(old) == size:
            continue
        fresh = torch.zeros(size - len(old), old.shape[1])
        if name.endswith("_id"):
            fresh.normal_(std=0.05, generator=generator)
        grown = nn.Embedding(size, old.shape[1])
        grown.weight.data = torch.cat([old, fresh])
        setattr(model, name, grown)
        state = checkpoint.optimizer_state.get(f"{name}.weight", {})
        for moment, value in state.items():
            if value.dim() == 2:
                state[moment] = torch.cat([value, torch.zeros(size - len(value), value.shape[1])])
    popularity = model.item_popularity
    if len(popularity) < len(checkpoint.items):
        model.item_popularity = torch.cat([popularity, torch.zeros(len(checkpoint.items) - len(popularity))])
    if model.profiles is not None:
        model.profiles.grow(len(checkpoint.users), len(checkpoint.items), generator)
    return added_users, added_items


def save(checkpoint: Checkpoint, folder: Path, vectors: dict[str, torch.Tensor] | None = None,
         vector_ids: dict[str, list[str]] | None = None) -> Path:
    """Write the checkpoint atomically: build it in a temp folder, then rename."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in checkpoint.model.state_dict().items()}
    moments = {
        f"{name}::{key}": value.detach().contiguous()
        for name, entry in checkpoint.optimizer_state.items()
        for key, value in entry.items()
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": checkpoint.config.model_dump(),
        "encoder_identity": checkpoint.encoder_identity,
        "user_ids": checkpoint.users.ids,
        "item_ids": checkpoint.items.ids,
        "global_step": checkpoint.global_step,
        "ingest_watermark": checkpoint.ingest_watermark,
        "max_event_time": checkpoint.max_event_time,
        "loss_kind": checkpoint.loss_kind,
        "history": checkpoint.history,
        "vector_ids": vector_ids or {},
    }

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        if vectors is not None:
            save_file({k: v.detach().float().contiguous() for k, v in vectors.items()}, str(tmp / "vectors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))

    return replace_atomically(folder, write)


def read_state(folder: Path) -> dict:
    path = Path(folder) / "state.json"
    if not path.exists():
        from llmrec.errors import LlmrecError

        raise LlmrecError(f"{path}: not an llmrec checkpoint (state.json missing)")
    return json.loads(path.read_text())


def load(folder: Path, encoder: Encoder) -> Checkpoint:
    """Resume a checkpoint. Its encoder identity must match the encoder given, because the
    cached frozen-layer outputs and the projections were learned for that encoder."""
    from safetensors.torch import load_file

    from llmrec.errors import LlmrecError

    folder = Path(folder)
    meta = read_state(folder)
    if meta["encoder_identity"] != encoder.identity:
        raise LlmrecError(
            f"{folder}: checkpoint was trained with encoder identity {meta['encoder_identity']}, "
            f"but model.encoder={encoder.name!r} has identity {encoder.identity}; use the same encoder "
            "or start a new registered model"
        )
    config = ModelConfig(**meta["model_config"])
    users, items = Vocab(list(meta["user_ids"])), Vocab(list(meta["item_ids"]))
    model = Recommender(encoder.hidden_size, config.dim, len(users), len(items), top_layers_of(encoder, config),
                        config.profile_dim, config.profile_share)
    weights = load_file(str(folder / "model.safetensors"))
    if model.profiles is not None:  # its ratings' count is not known before reading them
        model.profiles.set_ratings(weights["profiles.users"], weights["profiles.items"], weights["profiles.ratings"],
                                   len(items))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Checkpoints written before the ranking bias existed load with it at zero, which
    # ranks exactly as they did.
    if unexpected or set(missing) - OPTIONAL_WEIGHTS:
        raise LlmrecError(f"{folder}: model.safetensors does not match the model (missing {sorted(missing)}, "
                          f"unexpected {sorted(unexpected)})")
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        name, moment = key.split("::")
        optimizer_state.setdefault(name, {})[moment] = value
    return Checkpoint(
        model=model,
        config=config,
        encoder_identity=meta["encoder_identity"],
        users=users,
        items=items,
        optimizer_state=optimizer_state,
        global_step=int(meta["global_step"]),
        ingest_watermark=int(meta["ingest_watermark"]),
        max_event_time=meta["max_event_time"],
        loss_kind=meta.get("loss_kind", meta.get("loss", "mse")),
        history=list(meta.get("history", [])),
    )


def output_transform(score, loss_kind: str):
    """What a prediction means: a rating for mse, a probability of a positive for bce."""
    if loss_kind == "bce":
        return 1.0 / (1.0 + np.exp(-score)) if isinstance(score, np.ndarray) else torch.sigmoid(score)
    return score
