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
        model = quantize_int8(model)
    model.eval()
    return Encoder(name=f"{encoder.name} ({compression.label})", tokenizer=encoder.tokenizer, model=model,
                   identity=encoder.identity)


def int8_layers(model: nn.Module) -> list[str]:
    """The Linear layers served in int8: all but the feed-forward output projections, whose
    inputs (GELU activations with outliers) lose most to one activation scale per batch.
    On MiniLM-L6 over MovieLens texts (one thread, interleaved runs), mean cosine of the
    pooled output to fp32: every Linear per tensor 0.941 (2.3x faster), per channel 0.977
    (2.3-2.8x), per channel without those six 0.988 (1.7-2.1x)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and not (name.endswith("output.dense") and ".attention." not in name)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization (weights per output channel) of `int8_layers`."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed here.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {name: qconfig for name in int8_layers(model)})


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (packed int8 weights counted as such)."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
