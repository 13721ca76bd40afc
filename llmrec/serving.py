"""What the API serves, without HTTP: the champion's vectors plus everything that arrived
after it was trained, and a holder that follows the registry's `champion` alias.

A `ServedModel` is immutable once built. The holder swaps its reference in one assignment,
so a request that took the model at its start finishes on it and names its one version.
Scores come from the one scoring formula (`Scorer`): users and items the champion never saw
but the catalog now lists get vectors from their text through the champion's own towers
(encoder -> side), encoded once per text and cached in memory, then appended to the scorer.
"""

from __future__ import annotations

import logging
import threading
from itertools import islice
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmrec import registry
from llmrec.compress import compress_encoder, quantize_int8
from llmrec.config import Compression, Home
from llmrec.encoder import Encoder, TextCache, load_encoder
from llmrec.files import replace_atomically
from llmrec.history import History
from llmrec.ingest import read_catalog_texts
from llmrec.model import Checkpoint, load, read_state
from llmrec.scoring import Scorer, side_vectors

log = logging.getLogger(__name__)

HISTORY, PROFILE, POPULAR = "history", "profile", "popular"
NO_ITEMS = torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    scored_by: str
    items: list[str]
    scores: list[float]


@dataclass(frozen=True)
class ServedModel:
    version: str
    scorer: Scorer
    checkpoint_dir: Path
    history_users: frozenset[str]
    rated: dict[str, torch.Tensor]  # item positions in the scorer each user rated
    popular: list[int]  # item positions, most rated first
    catalog_stamp: tuple
    cold_start_items: int = 0
    cold_start_users: int = 0
    loaded_at: float = field(default_factory=time.time)

    def scored_by(self, user_id: str) -> str:
        """history: the champion learned this user from ratings; profile: only from a
        profile text; popular: nothing is known."""
        if user_id in self.history_users:
            return HISTORY
        return PROFILE if user_id in self.scorer.user_index else POPULAR

    def recommend(self, user_ids: list[str], k: int, exclude_rated: bool = True) -> list[Recommendation]:
        """Each user's top k, by `Scorer.ranked` (the tensors, without a frame per request),
        or the popularity list for users nothing is known about. Scores are the formula's
        raw score, as `Scorer.top_k` returns them."""
        kinds = [self.scored_by(u) for u in user_ids]
        ranked = [u for u, kind in zip(user_ids, kinds) if kind != POPULAR]
        rows = cols = None
        if ranked and exclude_rated:
            seen = [self.rated.get(u, NO_ITEMS) for u in ranked]
            cols = torch.cat(seen)
            rows = torch.repeat_interleave(torch.arange(len(seen)), torch.as_tensor([len(s) for s in seen]))
        best_items, best_scores = self.scorer.ranked(ranked, k, rows, cols) if ranked else (None, None)
        item_ids, out, position = self.scorer.item_ids, [], 0
        for user, kind in zip(user_ids, kinds):
            if kind == POPULAR:
                seen = set(self.rated.get(user, NO_ITEMS).tolist()) if exclude_rated else ()
                chosen = [item_ids[p] for p in islice((p for p in self.popular if p not in seen), k)]
                scores = self.scorer.raw_scores([user] * len(chosen), chosen).tolist()
            else:
                keep = torch.isfinite(best_scores[position])
                chosen = [item_ids[p] for p in best_items[position][keep].tolist()]
                scores = best_scores[position][keep].tolist()
                position += 1
            out.append(Recommendation(user, kind, chosen, scores))
        return out

    def predict(self, user_ids: list[str], item_ids: list[str]) -> np.ndarray:
        return self.scorer.predict(user_ids, item_ids)


def catalog_stamp(home: Home) -> tuple:
    """Changes whenever an ingest adds events or catalog rows."""
    stamps = []
    for path in (home.manifest, home.items, home.users):
        try:
            stamps.append(path.stat().st_mtime_ns)
        except FileNotFoundError:
            stamps.append(None)
    return tuple(stamps)


class TextPath:
    """The champion's text towers over a (possibly compressed) encoder, for ids the stored
    vectors do not cover. The encoder is loaded on first use only; texts already encoded are
    not encoded again (the cache lives as long as the encoder)."""

    def __init__(self, compression: Compression, encoder_loader: Callable[[str], Encoder] = load_encoder):
        self.compression = compression
        self.encoder_loader = encoder_loader
        self._encoders: dict[str, tuple[Encoder, Encoder]] = {}
        self._caches: dict[tuple, TextCache] = {}
        self._checkpoints: dict[Path, Checkpoint] = {}
        self.encoded_texts = 0

    def encoders(self, name: str) -> tuple[Encoder, Encoder]:
        """(original, served) encoder for a model config's encoder name."""
        if name not in self._encoders:
            original = self.encoder_loader(name)
            self._encoders[name] = (original, compress_encoder(original, self.compression))
        return self._encoders[name]

    def vectors(self, checkpoint_dir: Path, ids: list[str], texts: list[str], user: bool) -> tuple[torch.Tensor, torch.Tensor]:
        meta = read_state(checkpoint_dir)
        original, served = self.encoders(meta["model_config"]["encoder"])
        if checkpoint_dir not in self._checkpoints:
            self._checkpoints = {checkpoint_dir: load(checkpoint_dir, original)}
        checkpoint = self._checkpoints[checkpoint_dir]
        if self.compression.quantize == "int8" and len(checkpoint.model.top_layers):
            checkpoint.model.top_layers = compress_encoder_layers(checkpoint.model.top_layers)
        checkpoint.model.eval()
        key = (served.identity, served.num_layers - checkpoint.config.trainable_layers, checkpoint.config.max_length)
        if key not in self._caches:
            self._caches[key] = TextCache.for_model(None, served, checkpoint.config)
        cache = self._caches[key]
        before = len(cache.memory)
        features = cache.features(texts)
        self.encoded_texts += len(cache.memory) - before
        table = checkpoint.users if user else checkpoint.items
        return side_vectors(checkpoint, table.rows(ids), features, user)


def compress_encoder_layers(layers: torch.nn.ModuleList) -> torch.nn.ModuleList:
    """The fine-tuned top layers in the checkpoint get the encoder's int8 treatment."""
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in layers.modules()):
        return layers
    return quantize_int8(layers)


def build_served_model(version: str, checkpoint_dir: Path, home: Home, text_path: TextPath) -> ServedModel:
    """The stored vectors of `checkpoint_dir`, extended with every catalog user and item
    they lack (scored from text), plus what each user rated and the popularity order."""
    stamp = catalog_stamp(home)
    scorer = Scorer.load(checkpoint_dir)
    if text_path.compression.quantize == "int8":
        scorer = scorer.quantized()
    meta = read_state(checkpoint_dir)
    texts = read_catalog_texts(home)
    new_users = [u for u in texts.users if u not in scorer.user_index]
    new_items = [i for i in texts.items if i not in scorer.item_index]
    if new_users or new_items:
        log.info("version %s: encoding %d users and %d items that arrived after it was trained",
                 version, len(new_users), len(new_items))
        dim = scorer.user_vectors.shape[1]
        nothing = torch.zeros(0, dim), torch.zeros(0)
        user_vec, user_bias = text_path.vectors(checkpoint_dir, new_users, [texts.users[u] for u in new_users],
                                                True) if new_users else nothing
        item_vec, item_bias = text_path.vectors(checkpoint_dir, new_items, [texts.items[i] for i in new_items],
                                                False) if new_items else nothing
        scorer = scorer.extended(new_users, user_vec, user_bias, new_items, item_vec, item_bias)
    # Scanned column by column, batch by batch: an API worker never holds the history as a frame.
    positions = History.open(home).rated_positions(scorer.item_ids)
    rated = {user: torch.from_numpy(rows) for user, rows in positions.items()}
    counts = History.rated_counts(positions, scorer.item_ids)
    # Most rated first; ties by id, so every worker and replica answers the same list.
    popular = sorted(counts.index, key=lambda i: (-counts[i], i))
    # Items nobody rated yet follow, best item bias first, so a popular list is never short.
    rest = [i for i in scorer.item_ids if i not in counts.index]
    rest.sort(key=lambda i: -float(scorer.item_bias[scorer.item_index[i]]))
    return ServedModel(version=str(version), scorer=scorer, checkpoint_dir=Path(checkpoint_dir),
                       history_users=frozenset(meta["user_ids"][1:]), rated=rated,
                       popular=[scorer.item_index[i] for i in popular + rest],
                       catalog_stamp=stamp, cold_start_items=len(new_items), cold_start_users=len(new_users))


def fetch_checkpoint(home: Home, info: registry.ModelVersionInfo) -> Path:
    """The version's checkpoint folder in `home/runs/serving-vN`, downloaded once (atomically,
    so two workers fetching together each see a whole folder)."""
    target = home.runs / f"serving-v{info.version}"
    if not target.exists():
        replace_atomically(target, lambda tmp: registry.download_checkpoint(info, tmp))
    state = next(target.rglob("state.json"), None)
    if state is None:
        from llmrec.errors import LlmrecError

        raise LlmrecError(f"model version {info.name} v{info.version}: checkpoint has no state.json")
    return state.parent


@dataclass(frozen=True)
class ReloadOutcome:
    status: str  # "loaded", "unchanged", "failed", "no-champion"
    version: str | None
    error: str | None = None


class ChampionFollower:
    """Holds the served model and moves it to whatever version the registry's `champion`
    alias names. `check()` compares alias and catalog with what is served and, on a change,
    builds the new model beside the old one and swaps the reference; a version that fails to
    build leaves the old one serving and is remembered, so it is retried only when asked
    (`check(force=True)`) or when the alias or catalog moves again."""

    def __init__(self, home: Home, model_name: str, compression: Compression = Compression(),
                 encoder_loader: Callable[[str], Encoder] = load_encoder,
                 on_outcome: Callable[[ReloadOutcome, "ChampionFollower"], None] | None = None):
        self.home = home
        registry.connect(home)
        self.model_name = model_name
        self.text_path = TextPath(compression, encoder_loader)
        self.on_outcome = on_outcome
        self.current: ServedModel | None = None
        self.failed: tuple[str, tuple] | None = None
        self.last_error: str | None = None
        self.alias_version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, force: bool = False) -> ReloadOutcome:
        with self._lock:
            outcome = self._check(force)
        if self.on_outcome is not None:
            self.on_outcome(outcome, self)
        return outcome

    def _check(self, force: bool) -> ReloadOutcome:
        try:
            info = registry.get_alias(self.model_name, registry.CHAMPION)
        except Exception as error:  # a registry that is down must not stop serving
            self.last_error = f"registry: {error}"
            return ReloadOutcome("failed", None, self.last_error)
        if info is None:
            self.alias_version = None
            return ReloadOutcome("no-champion", None)
        self.alias_version = info.version
        stamp = catalog_stamp(self.home)
        current = self.current
        if not force and current is not None and current.version == info.version and current.catalog_stamp == stamp:
            return ReloadOutcome("unchanged", info.version)
        if not force and self.failed == (info.version, stamp):
            return ReloadOutcome("unchanged", current.version if current else None, self.last_error)
        try:
            folder = fetch_checkpoint(self.home, info)
            served = build_served_model(info.version, folder, self.home, self.text_path)
        except Exception as error:
            self.failed = (info.version, stamp)
            self.last_error = f"version {info.version} failed to load: {type(error).__name__}: {error}"
            log.error("%s; still serving version %s", self.last_error, current.version if current else None)
            return ReloadOutcome("failed", info.version, self.last_error)
        self.current = served
        self.failed, self.last_error = None, None
        return ReloadOutcome("loaded", info.version)

    def start(self, poll_seconds: float) -> None:
        """Check now, then every `poll_seconds` on a daemon thread."""
        self.check()

        def loop():
            while not self._stop.wait(poll_seconds):
                try:
                    self.check()
                except Exception:  # keep following; the failure is logged
                    log.exception("champion check failed")

        self._thread = threading.Thread(target=loop, name="champion-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
