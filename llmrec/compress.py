"""Compression of the text encoder for serving (the cold-start text path), with torch's own
utilities: L1-unstructured pruning of the Linear weights (made permanent), dropping the top
transformer layers (structured: the only one of the two that makes a CPU faster), and
dynamic int8 quantization of the Linear layers.

They apply in that order, because pruning and layer removal act on float weights and
quantization turns them into packed int8 ones. The encoder's identity is kept: the
checkpoint's towers were trained on this encoder, and a compressed copy stands in for it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from llmrec.config import Compression
from llmrec.encoder import Encoder


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def compress_encoder(encoder: Encoder, compression: Compression) -> Encoder:
    """A compressed copy of `encoder` (the original is left as it is)."""
    if compression == Compression():
        return encoder
    model = copy.deepcopy(encoder.model)
    if compression.prune:
        from torch.nn.utils import prune

        for linear in linear_layers(model.encoder):
            prune.l1_unstructured(linear, name="weight", amount=compression.prune)
            prune.remove(linear, "weight")
    if compression.encoder_layers is not None:
        layers = model.encoder.layer
        if compression.encoder_layers > len(layers):
            from llmrec.errors import LlmrecError

            raise LlmrecError(f"--encoder-layers {compression.encoder_layers}: encoder {encoder.name!r} "
                              f"has only {len(layers)} layers")
        model.encoder.layer = nn.ModuleList(list(layers)[: compression.encoder_layers])
        model.config.num_hidden_layers = compression.encoder_layers
    if compression.quantize == "int8":
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao, which is not installed here.
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    model.eval()
    return Encoder(name=f"{encoder.name} ({compression.label})", tokenizer=encoder.tokenizer, model=model,
                   identity=encoder.identity)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (packed int8 weights counted as such)."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
