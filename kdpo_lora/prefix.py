"""Run the frozen lower layers once per distinct input during an edit, not at every step.

With LoRA only in the upper layers (`skip_lower_layers`), nothing below the first adapted layer
changes while an edit trains: the same prompts go through the same frozen weights at every step,
cycle and reference pass. `frozen_prefix` stands in for those layers with one module that computes
their output once per distinct input (keyed by the exact bytes of the hidden states, attention
mask and position embeddings) and reuses it - the forward pass then starts at the first adapted
layer, as the backward pass already does. It steps aside (computes normally) for anything it
cannot key safely: incremental decoding with a KV cache, or inputs that carry gradients.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from . import merged

MAX_ENTRIES = 16  # distinct inputs of one edit: the batch, batch + preservation prompts, references


def _digest(*tensors: torch.Tensor | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class _FrozenPrefix(torch.nn.Module):
    """Decoder layers [0, n) as one module that remembers its outputs."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        object.__setattr__(self, "frozen", layers)  # not registered: nothing here is trained or saved
        self.cache: dict[bytes, object] = {}
        self.returns_tuple = False

    def _run(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states
        for layer in self.frozen:
            out = layer(hidden_states, *args, **kwargs)
            self.returns_tuple = isinstance(out, tuple)
            hidden_states = out[0] if self.returns_tuple else out
        return out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if kwargs.get("past_key_values") is not None or hidden_states.requires_grad:
            return self._run(hidden_states, *args, **kwargs)
        position = kwargs.get("position_embeddings")
        key = _digest(hidden_states, kwargs.get("attention_mask"), *(position or (None,)))
        if key not in self.cache:
            if len(self.cache) >= MAX_ENTRIES:
                self.cache.clear()
            with torch.no_grad():
                self.cache[key] = self._run(hidden_states, *args, **kwargs)
        return self.cache[key]


class _Skip(torch.nn.Module):
    """A layer whose work the prefix module has already done."""

    def __init__(self, prefix: _FrozenPrefix):
        super().__init__()
        object.__setattr__(self, "prefix", prefix)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.prefix.returns_tuple else hidden_states


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _is_frozen(layers: list[torch.nn.Module]) -> bool:
    """No adapter and no merged stack in these layers: their output depends on the input alone."""
    return not any(merged.has_merged_stack(layer) or any(isinstance(m, LoraLayer) for m in layer.modules())
                   for layer in layers)


@contextmanager
def frozen_prefix(model: torch.nn.Module, first_trained_layer: int) -> Iterator[_FrozenPrefix | None]:
    """Within the block, layers below `first_trained_layer` run once per distinct input.

    Yields the prefix module (None where nothing is cached: no such layers, or some of them adapted).
    """
    layers = _decoder_layers(model)
    if layers is None or first_trained_layer <= 0 or not _is_frozen(list(layers[:first_trained_layer])):
        yield None
        return
    original = list(layers[:first_trained_layer])
    prefix = _FrozenPrefix(original)
    for i in range(first_trained_layer):
        layers[i] = prefix if i == 0 else _Skip(prefix)
    try:
        yield prefix
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
