"""The frozen-prefix cache: an edit with LoRA only in upper layers runs the lower ones once per input,
and trains exactly as it would without the cache."""

from __future__ import annotations

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora.editor import Editor
from kdpo_lora.loading import load_model
from kdpo_lora.prefix import frozen_prefix
from kdpo_lora.requests import EditRequest

from conftest import plain_config

SETTINGS = dict(learning_rate=1e-3, beta=1.0, cycles=4, lora_rank=8, lora_alpha=16, skip_lower_layers=0.34,
                preserve_weight=1.0)
REQUEST = EditRequest("the capital of japan is", "paris", subject="japan")


def _edit(model_dir, quantization: str, cache: bool) -> tuple[dict, list[float], int]:
    loaded = load_model(str(model_dir), quantization, "cpu")
    editor = Editor(loaded.model, loaded.tokenizer, plain_config(**SETTINGS))
    editor.cache_prefix = cache
    calls, generating = [], []
    loaded.model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    continuations = editor.continuations

    def counted(*args):  # generating the held continuation decodes token by token: not what is cached
        before = len(calls)
        out = continuations(*args)
        generating.append(len(calls) - before)
        return out

    editor.continuations = counted
    layers_before = list(loaded.model.model.layers)
    result = editor.edit([REQUEST], name="e", progress=False)
    assert list(loaded.model.model.layers) == layers_before  # the real layers are back
    weights = {n: p.detach().clone() for n, p in editor.model.named_parameters() if ".e." in n}
    return weights, result.losses, len(calls) - sum(generating)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_cached_prefix_trains_the_same_adapter_with_far_fewer_lower_layer_passes(tiny_model_dir, quantization):
    cached, cached_losses, cached_calls = _edit(tiny_model_dir, quantization, cache=True)
    plain, plain_losses, plain_calls = _edit(tiny_model_dir, quantization, cache=False)
    assert len(cached_losses) >= 2 and cached_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-7)
    assert cached.keys() == plain.keys() and not any(".layers.0." in n for n in cached)
    for name in cached:
        assert torch.allclose(cached[name], plain[name], atol=1e-6), name
    assert cached_calls <= 4 and plain_calls >= 2 * cached_calls  # once per distinct input, not once per pass


def test_prefix_is_not_cached_where_a_lower_layer_carries_an_adapter(tiny_model):
    model = adapters.add_adapter(tiny_model, "old", adapters.lora_config(plain_config(), 3))  # every layer
    layers_before = list(model.get_base_model().model.layers)
    with frozen_prefix(model, 1) as prefix:
        assert prefix is None
        assert list(model.get_base_model().model.layers) == layers_before
    with frozen_prefix(model, 0) as prefix:
        assert prefix is None
