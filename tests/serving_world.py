"""A small served world for the API tests: curated catalog and events in an LLMREC_HOME and
real llmrec pyfunc versions in its sqlite registry, trained on genre tastes with the tiny
encoder (saved to a folder, so a separate `llmrec api` process loads the same weights)."""

from __future__ import annotations

import os

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow import MlflowClient

from llmrec.config import Home, ModelConfig, TrainingConfig
from llmrec.encoder import Encoder, TextCache, load_encoder
from llmrec.ingest import read_catalog_texts, upsert, write_atomic
from llmrec.model import Checkpoint, new_checkpoint, save
from llmrec.registry import PIP_REQUIREMENTS, PYFUNC_MODEL, configure, log_model_version, recommender_signature
from llmrec.schema import CatalogTexts
from llmrec.scoring import Scorer
from llmrec.train import fit

NAME = "llmrec"
GENRES = ["action", "comedy", "drama", "horror"]
N_USERS, N_ITEMS = 40, 60
PROFILE_USER = "u_profile"  # a profile row at training time, no ratings


@dataclass
class World:
    home: Home
    encoder: Encoder
    encoder_dir: Path
    checkpoints: dict[str, Checkpoint]
    folders: dict[str, Path]
    texts: CatalogTexts
    events: pd.DataFrame

    def with_home(self, home: Home) -> "World":
        return replace(self, home=home)

    def cache(self) -> TextCache:
        return TextCache.for_model(None, self.encoder, self.checkpoints["1"].config)

    def encoder_loader(self, name: str) -> Encoder:
        assert name == str(self.encoder_dir), name
        return self.encoder


def ratings(seed: int = 0, n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, N_USERS, n), rng.integers(0, N_ITEMS, n)
    frame = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                          "rating": np.where(users % 4 == items % 4, 5.0, 2.0),
                          "timestamp": pd.Timestamp("2026-01-01", tz="UTC")})
    return frame.drop_duplicates(["user_id", "item_id"]).reset_index(drop=True)


def write_catalog(home: Home, items: dict[str, str], users: dict[str, str]) -> None:
    upsert(home.items, pd.DataFrame({"item_id": list(items), "title": list(items.values())}), "item_id")
    upsert(home.users, pd.DataFrame({"user_id": list(users), "occupation": list(users.values())}), "user_id")


def add_item(home: Home, item_id: str, title: str) -> None:
    upsert(home.items, pd.DataFrame({"item_id": [item_id], "title": [title]}), "item_id")


def build_template(root: Path, encoder_dir: Path) -> World:
    encoder = load_encoder(str(encoder_dir))
    home = Home(root / "home").ensure()
    items = {f"i{i}": f"film {i}; genres: {GENRES[i % 4]}" for i in range(N_ITEMS)}
    users = {f"u{u}": f"fan of {GENRES[u % 4]}" for u in range(N_USERS)} | {PROFILE_USER: "fan of action"}
    write_catalog(home, items, users)
    events = ratings()
    write_atomic(pa.Table.from_pandas(events.assign(_ingest_seq=1), preserve_index=False),
                 home.events / "date=2026-01-01" / "part-0.parquet")
    texts = read_catalog_texts(home)
    assert texts.users[PROFILE_USER] == "occupation: fan of action" and texts.items["i0"] == "film 0; genres: action"
    config = ModelConfig(encoder=str(encoder_dir), dim=8, max_length=32)
    cache = TextCache.for_model(None, encoder, config)
    checkpoint = new_checkpoint(encoder, config, seed=0)
    training = TrainingConfig(epochs=8, lr=0.02, batch_size=128)
    fit(checkpoint, cache, events, texts, training)
    checkpoints = {"1": checkpoint}
    second = copy.deepcopy(checkpoint)
    fit(second, cache, events, texts, TrainingConfig(epochs=1, lr=0.05, batch_size=256, seed=1))
    checkpoints["2"] = second
    previous_uri = mlflow.get_tracking_uri()
    configure(home, NAME)
    folders = {}
    try:
        for version, ckpt in (("1", checkpoint), ("2", second), ("3", second)):
            folder = save(ckpt, root / f"ckpt-{version}", *Scorer.from_checkpoint(ckpt, cache, texts).vectors())
            if version == "3":
                (folder / "vectors.safetensors").write_bytes(b"not a safetensors file")
            example = events[["user_id", "item_id"]].head(3)
            output = pd.DataFrame({"prediction": [3.0, 3.0, 3.0]})
            with mlflow.start_run():
                registered = log_model_version(NAME, folder, str(PYFUNC_MODEL), example, output, PIP_REQUIREMENTS,
                                               code_paths=[str(PYFUNC_MODEL.parent)],
                                               signature=recommender_signature(example, output))
            assert registered == version
            folders[version] = folder
        MlflowClient().set_registered_model_alias(NAME, "champion", "1")
    finally:
        # Restores MLflow's own setting without exporting MLFLOW_TRACKING_URI to later tests.
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(previous_uri)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    return World(home=home, encoder=encoder, encoder_dir=encoder_dir, checkpoints=checkpoints, folders=folders,
                 texts=texts, events=events)


def move_champion(version: str) -> None:
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
