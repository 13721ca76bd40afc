import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest


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
