"""Peak-memory estimate of one edit, from a model's config alone (meta device: no weights needed).

Counts every parameter of the architecture on the meta device, then adds up what an edit keeps in
memory at its peak. Two set-ups side by side:

- kdpo-lora: NF4 base (0.5 byte per linear weight + one fp32 absmax per 64), embeddings and head in
  the compute dtype, LoRA weights + gradients + Adam state in fp32, no reference copy, logits only
  at the target positions, activations of one short sequence in the compute dtype, one linear layer
  dequantised at a time.
- as published: fp32 model plus a full fp32 copy as reference, one dense MLP down-projection
  trained with Adam, full-vocabulary logits at every position, fp32 activations.

It is an estimate (allocator slack and the CUDA context, typically 0.3-0.5 GB, are not included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EditConfig
from .errors import ModelLoadError

GIB = 1024 ** 3
KNOWN_SHAPES = {
    # architectures users ask about, so the estimate works offline
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, tie_word_embeddings=False),
}


@dataclass
class ParameterCount:
    linear: int  # weights of linear layers inside the decoder blocks (what NF4 quantises)
    other: int  # embeddings, head, norms
    lora: int  # parameters of one LoRA adapter with the given settings
    down_proj: int  # one MLP down-projection (what the published set-up trains)
    config: object

    @property
    def total(self) -> int:
        return self.linear + self.other


def load_config(model: str):
    """A transformers config from a known shape name, a config.json / model folder, the embedded model or a hub id."""
    from transformers import AutoConfig, LlamaConfig

    if model in KNOWN_SHAPES:
        shape = dict(KNOWN_SHAPES[model])
        shape.pop("model_type")
        return LlamaConfig(**shape)
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        if not path.exists() and model.count("/") != 1:
            from .loading import resolve_source

            model = resolve_source(model)
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read a model config from {model!r}: {err}") from None


def count_parameters(config, settings: EditConfig) -> ParameterCount:
    """Exact parameter counts of the architecture, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = getattr(model.model, "layers", [])
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    indices = settings.layer_indices(len(layers))
    chosen = set(range(len(layers))) if indices is None else set(indices)
    adapted = [m for i, layer in enumerate(layers) if i in chosen for name, m in layer.named_modules()
               if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in settings.target_modules]
    lora = sum(settings.lora_rank * (m.in_features + m.out_features) for m in adapted)
    down = layers[0].mlp.down_proj.weight.numel() if layers else 0
    return ParameterCount(linear=linear, other=total - linear, lora=lora, down_proj=down, config=config)


def estimate(model: str, settings: EditConfig | None = None, seq_len: int = 64, targets: int = 8, batch: int = 1,
             stacked: int = 0, compute_bytes: int = 2) -> dict:
    """Estimated peak bytes of one edit for kdpo-lora and for the published set-up."""
    settings = settings or EditConfig()
    counts = count_parameters(load_config(model), settings)
    c = counts.config
    hidden, inter, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    tokens = seq_len * batch
    per_token_layer = 12 * hidden + 4 * inter  # values kept for backward in one decoder block, per token
    largest_linear = max(hidden * inter, hidden * hidden)

    ours = {
        "base_nf4": counts.linear * (0.5 + 4 / 64),
        "embeddings_head_norms": counts.other * compute_bytes,
        "lora_train": counts.lora * 16,  # fp32 weight + grad + 2 Adam moments
        "earlier_adapters": stacked * counts.lora * 4,
        "activations": tokens * per_token_layer * layers * compute_bytes,
        "dequantised_layer": largest_linear * compute_bytes * 2,
        "logits": batch * (targets + 1) * vocab * 4 * 3,
    }
    trained_layers = max(1, layers - round(layers * 21 / 32) + 1)
    published = {
        "model_fp32": counts.total * 4,
        "reference_copy_fp32": counts.total * 4,
        "dense_layer_grad_adam": counts.down_proj * 12,
        "activations": tokens * per_token_layer * trained_layers * 4,
        "logits": batch * seq_len * vocab * 4 * 3,
    }
    ours_total, published_total = sum(ours.values()), sum(published.values())
    return {
        "model": model, "parameters": counts.total, "lora_parameters": counts.lora, "seq_len": seq_len,
        "kdpo_lora": {k: v / GIB for k, v in ours.items()}, "kdpo_lora_total_gib": ours_total / GIB,
        "published": {k: v / GIB for k, v in published.items()}, "published_total_gib": published_total / GIB,
        "ratio": ours_total / published_total,
    }
