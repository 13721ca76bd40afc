import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import default_data  # noqa: E402

# MovieLens-100k, never copied into the repo: where the benchmarks look ($ML100K_DIR, else
# ../shared beside the checkout).
MOVIELENS = default_data()


@pytest.fixture(scope="session")
def movielens() -> Path:
    """The MovieLens-100k folder; a test that needs it is skipped where it is absent."""
    if not (MOVIELENS / "u.data").exists():
        pytest.skip(f"MovieLens-100k not found at {MOVIELENS} (set ML100K_DIR)")
    return MOVIELENS


# The MLflow store the suite was started with (normally none: each test's home decides).
SUITE_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def restore_tracking_uri() -> None:
    if SUITE_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = SUITE_TRACKING_URI


@pytest.fixture(autouse=True)
def environment_left_as_found():
    """Every test ends with the environment it started with: entry points called in-process
    set variables for their own process (the demo quiets Prefect's console, which hid the
    progress lines a later test's child processes print), and mlflow.set_tracking_uri exports
    MLFLOW_TRACKING_URI. MLflow's URI is also reset before each test, so module and session
    fixtures that point MLflow at their own home cannot leak it either."""
    restore_tracking_uri()
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)
    restore_tracking_uri()


@pytest.fixture(scope="session")
def tiny_encoder():
    """A 2-layer randomly initialised BERT with MiniLM's tokenizer: fast, offline."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llmrec.config import resolve_encoder
    from llmrec.encoder import from_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    return from_model("tiny-bert", tokenizer, BertModel(config))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, tiny_encoder):
    """The tiny encoder saved as a model folder: what a config's `model.encoder` or a child
    process loads it from."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_encoder.model.save_pretrained(folder)
    tiny_encoder.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def served_template(tmp_path_factory, tiny_encoder_dir):
    """An LLMREC_HOME with curated data and a registry: version 1 (champion), version 2 (one
    more epoch: other scores), version 3 (its vectors file is corrupt: fails to load). The
    tiny encoder is saved to a folder named in the model config, so a separate process loads
    the same encoder. Tests copy it (see `served_home`) and change their copy."""
    from serving_world import build_template

    return build_template(tmp_path_factory.mktemp("served"), tiny_encoder_dir)


@pytest.fixture
def served_home(served_template, tmp_path, monkeypatch):
    """A private copy of the template home, with MLflow pointed at it."""
    import shutil

    import mlflow

    from llmrec.config import Home
    from llmrec.registry import configure

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    root = tmp_path / "home"
    shutil.copytree(served_template.home.root, root)
    home = Home(root)
    configure(home, "llmrec")
    yield served_template.with_home(home)
    mlflow.set_tracking_uri(previous)
