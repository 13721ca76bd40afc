"""The pretrained text encoder, split into a frozen bottom and a trainable top.

The bottom `num_layers - trainable_layers` layers never change, so their outputs for a
text are computed once and cached on disk, keyed by the encoder's identity, the split
point and the text's hash; they survive across training steps and across nights. The
top layers (if any) run per step, only over the distinct texts in the batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmrec.config import ModelConfig, resolve_encoder
from llmrec.errors import LlmrecError
from llmrec.files import replace_atomically

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

ENCODE_BATCH = 128


@dataclass
class Encoder:
    name: str
    tokenizer: object
    model: nn.Module
    identity: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer


def load_encoder(name_or_path: str) -> Encoder:
    """Load a Hugging Face encoder (BERT-style: `model.encoder.layer`) without network
    when the name is a local path, which the bundled `minilm` is."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_encoder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except OSError as error:
        raise LlmrecError(
            f"model.encoder={name_or_path!r}: could not load a Hugging Face encoder from it ({error}). "
            "Give a local folder or a model name available offline."
        ) from error
    return from_model(name_or_path, tokenizer, model)


def from_model(name: str, tokenizer, model: nn.Module) -> Encoder:
    if not hasattr(model, "encoder") or not hasattr(model.encoder, "layer"):
        raise LlmrecError(
            f"model.encoder={name!r}: {type(model).__name__} has no `encoder.layer` stack; "
            "llmrec supports BERT-style encoders (BERT, MiniLM, RoBERTa, E5, BGE, ...)."
        )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    # The weights matter as much as the config: two checkpoints of one architecture differ.
    probe = next(model.parameters()).detach().flatten()[:4096].float().numpy().tobytes()
    identity = hashlib.sha256(config.encode() + probe).hexdigest()[:16]
    return Encoder(name=name, tokenizer=tokenizer, model=model, identity=identity)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


@dataclass
class TextFeatures:
    """Frozen-encoder output for a list of texts, row-aligned with it.

    With no trainable layers, `pooled` [n, H] is final; otherwise `hidden` [n, L, H] and
    `mask` [n, L] are the frozen layers' token states, run through the top layers later.
    """

    pooled: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pooled) if self.pooled is not None else len(self.hidden)

    def take(self, index: torch.Tensor) -> "TextFeatures":
        if self.pooled is not None:
            return TextFeatures(pooled=self.pooled[index])
        mask = self.mask[index]
        # Dynamic padding: trim to the longest text among those taken.
        length = max(int(mask.sum(1).max()), 1)
        return TextFeatures(hidden=self.hidden[index, :length], mask=mask[:, :length])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return nn.functional.normalize(pooled, dim=-1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layers(layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    extended = additive_mask(mask, hidden.dtype)
    for layer in layers:
        out = layer(hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class TextCache:
    """Frozen-layer outputs on disk, one safetensors file per text batch computed, with a
    JSON index from text hash to (file, row). Nothing is recomputed for a known text."""

    def __init__(self, root: Path | None, encoder: Encoder, frozen_layers: int, max_length: int):
        self.encoder = encoder
        self.frozen_layers = frozen_layers
        self.max_length = max_length
        self.pooled = frozen_layers == encoder.num_layers
        key = f"{encoder.identity}-f{frozen_layers}-l{max_length}"
        self.folder = root / key if root is not None else None
        self.memory: dict[str, tuple[torch.Tensor, ...]] = {}
        # Text -> hash, remembered: a night asks for every catalog text several times.
        self.keys: dict[str, str] = {}

    @classmethod
    def for_model(cls, root: Path | None, encoder: Encoder, model: ModelConfig) -> "TextCache":
        """The cache a model with this config reads: every layer below its trainable top."""
        return cls(root, encoder, encoder.num_layers - model.trainable_layers, model.max_length)

    def features(self, texts: list[str]) -> TextFeatures:
        keys = [self.keys.get(t) or self.keys.setdefault(t, text_key(t)) for t in texts]
        self._load(set(keys))
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in self.memory}.items())
        if missing:
            self._compute(missing)
        if self.pooled:
            return TextFeatures(pooled=torch.stack([self.memory[k][0] for k in keys]).float())
        length = max(len(self.memory[k][0]) for k in keys)
        hidden = torch.zeros(len(keys), length, self.encoder.hidden_size)
        mask = torch.zeros(len(keys), length, dtype=torch.long)
        for row, key in enumerate(keys):
            states = self.memory[key][0]
            hidden[row, : len(states)] = states.float()
            mask[row, : len(states)] = 1
        return TextFeatures(hidden=hidden, mask=mask)

    def _index_path(self) -> Path:
        return self.folder / "index.json"

    def _load(self, wanted: set[str]) -> None:
        wanted = wanted - self.memory.keys()
        # Every call after the first in a process usually finds all its texts in memory:
        # skip parsing the index then.
        if not wanted or self.folder is None or not self._index_path().exists():
            return
        from safetensors.torch import load_file

        index = json.loads(self._index_path().read_text())
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            if key in index:
                by_file.setdefault(index[key], []).append(key)
        for name, keys in by_file.items():
            tensors = load_file(str(self.folder / name))
            for key in keys:
                self.memory[key] = (tensors[key],)

    @torch.no_grad()
    def _compute(self, missing: list[tuple[str, str]]) -> None:
        model = self.encoder.model
        log.info("encoding %d new texts with %s (%d frozen layers)", len(missing), self.encoder.name, self.frozen_layers)
        # Length bucketing: sorting by length keeps padding inside each batch small.
        order = sorted(missing, key=lambda kv: len(kv[1]))
        new: dict[str, torch.Tensor] = {}
        for start in range(0, len(order), ENCODE_BATCH):
            chunk = order[start : start + ENCODE_BATCH]
            batch = self.encoder.tokenizer(
                [t for _, t in chunk], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
            hidden = run_layers(self.encoder.layers[: self.frozen_layers], hidden, batch["attention_mask"])
            if self.pooled:
                pooled = mean_pool(hidden, batch["attention_mask"])
                for row, (key, _) in enumerate(chunk):
                    new[key] = pooled[row].contiguous()
            else:
                lengths = batch["attention_mask"].sum(1)
                for row, (key, _) in enumerate(chunk):
                    # bf16 halves the cache; these states only feed the trainable top layers.
                    new[key] = hidden[row, : int(lengths[row])].to(torch.bfloat16).contiguous()
        for key, value in new.items():
            self.memory[key] = (value,)
        self._save(new)

    def _save(self, new: dict[str, torch.Tensor]) -> None:
        if self.folder is None or not new:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{hashlib.sha256(''.join(sorted(new)).encode()).hexdigest()[:16]}.safetensors"
        replace_atomically(self.folder / name, lambda tmp: save_file(new, str(tmp)))
        index = json.loads(self._index_path().read_text()) if self._index_path().exists() else {}
        index.update({key: name for key in new})
        replace_atomically(self._index_path(), lambda tmp: tmp.write_text(json.dumps(index)))
