"""Gradients through the 4-bit base must equal those of an fp32 model holding the dequantised weights.

On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a kernel without a backward the
first time it sees an eval-mode no-grad input - exactly what the edit loop does before training -
and LoRA gradients upstream silently become zero. `load_model` disables that path; these tests
check the gradients layer by layer, and show the check fails when the path is active.
"""

from __future__ import annotations

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora import objectives as obj
from kdpo_lora.config import EditConfig
from kdpo_lora.loading import load_model, prepare_model

from conftest import make_model

PAIRS = [("the eiffel tower is located in the city of", "rome"), ("the capital of japan is", "tokyo")]


def _dequantised_fp32_twin(nf4_model) -> torch.nn.Module:
    """An fp32 model whose linear weights are exactly the dequantised NF4 weights."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit

    twin = prepare_model(make_model())
    twin_modules = dict(twin.named_modules())
    for name, module in nf4_model.named_modules():
        if isinstance(module, Linear4bit):
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            twin_modules[name].weight.data.copy_(weight)
    return twin


def _with_lora(model, cfg):
    model = adapters.add_adapter(model, "edit", adapters.lora_config(cfg, model.config.num_hidden_layers))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # identical, non-zero A and B in both models so every LoRA tensor gets a gradient
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapters.set_active(model, ["edit"], trainable="edit")
    return model


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # what the edit loop does first: an eval-mode, no-grad forward
        obj.target_log_probs(model, batch)
    log_probs = obj.target_log_probs(model, batch)
    (-(obj.gather(log_probs, batch.labels) * batch.target_mask).sum()).backward()
    # a LoRA tensor that the graph never reached (grad None) counts as an all-zero gradient
    return {n.replace("base_model.model.", ""): torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if "lora_" in n}


def _compare(nf4_grads, fp32_grads) -> tuple[float, list[str]]:
    assert nf4_grads.keys() == fp32_grads.keys() and nf4_grads
    zero = [n for n, g in nf4_grads.items() if g.abs().max() == 0]
    worst = min(torch.nn.functional.cosine_similarity(nf4_grads[n].flatten(), fp32_grads[n].flatten(), dim=0).item()
                for n in nf4_grads)
    return worst, zero


@pytest.fixture()
def setup(tiny_model_dir, tokenizer):
    cfg = EditConfig(target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    loaded = load_model(str(tiny_model_dir), quantization="nf4", device="cpu")
    twin = _dequantised_fp32_twin(loaded.model)
    encoded = [obj.tokenize_pair(tokenizer, p, t) for p, t in PAIRS]
    batch = obj.collate([p for p, _ in encoded], [t for _, t in encoded], tokenizer.pad_token_id, "cpu")
    return _with_lora(loaded.model, cfg), _with_lora(twin, cfg), batch


def test_lora_gradients_through_nf4_match_fp32(setup):
    nf4, fp32, batch = setup
    worst, zero = _compare(_lora_grads(nf4, batch), _lora_grads(fp32, batch))
    assert zero == []
    assert worst >= 0.99
    # the fast path stayed off through the no-grad forward
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in nf4.modules() if isinstance(m, Linear4bit)]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_the_check_catches_the_cpu_fast_path(setup):
    """With bitsandbytes' AVX512-BF16 path re-enabled, the gradient comparison fails."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never takes the packed path here")
    nf4, fp32, batch = setup
    for module in nf4.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = True
    worst, zero = _compare(_lora_grads(nf4, batch), _lora_grads(fp32, batch))
    assert zero or worst < 0.99
