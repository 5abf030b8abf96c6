"""A folded stack held as merged full-precision weights, where that is cheaper than its LoRA factors.

An exact fold of N rank-r batches has rank R = N * r. On a layer of in x out its factors cost
R * (in + out) multiply-adds per token and numbers in memory, against in * out for a dense
weight. Past R > in * out / (in + out) - rank 419 on SmolLM2-135M's MLP after 53 batches, rank
3186 on Llama-3-8B's - the dense form is smaller *and* faster, so the fold's update is added to an
fp32 copy of each base weight (W + s * B @ A, exact to fp32 rounding) that then serves that layer's
whole forward while the stack is active: editing and generating on top of 100 batches cost what
they cost on top of none. The base layer itself (4-bit or not) is kept untouched for passes with
the stack switched off (the reference against the unedited model, `only_adapters(model, ())`).

The merged weights live on the base layers, not in peft, so they survive peft unloading the
wrapper when the last LoRA adapter is removed. `STACK` is the name that stands for them in an
active stack; `adapters.set_active` / `only_adapters` switch them with the peft adapters.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_bnb_weight

STACK = "kdpo_stack_merged"  # reserved name of the merged stack in `Editor.stack`
_WEIGHT, _ON = "_kdpo_merged_weight", "_kdpo_merged_on"


def _lora_layers(model: torch.nn.Module, name: str) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def _merged_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, _WEIGHT)]


def has_merged_stack(model: torch.nn.Module) -> bool:
    return bool(_merged_modules(model))


def dense_is_cheaper(model: PeftModel, name: str) -> bool:
    """Whether adapter `name`'s factors cost more than dense weights of the layers they adapt."""
    factors = dense = 0
    for layer in _lora_layers(model, name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        factors += a.numel() + b.numel()
        dense += b.shape[0] * a.shape[1]
    return dense > 0 and factors > dense


def _forward(self: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The base layer's forward, replaced by one dense matmul while the merged stack is on."""
    if not getattr(self, _ON):
        return type(self).forward(self, x, *args, **kwargs)
    weight = getattr(self, _WEIGHT)
    out = F.linear(x.to(weight.dtype), weight, None if self.bias is None else self.bias.to(weight.dtype))
    return out.to(x.dtype)


def _dequantised(base: torch.nn.Module) -> torch.Tensor:
    weight = base.weight
    return dequantize_bnb_weight(weight) if type(weight).__name__ == "Params4bit" else weight


def merge_into_stack(model: PeftModel, name: str) -> None:
    """Add frozen adapter `name` to the merged stack (creating it from the base weights if needed).

    The adapter itself is left in place; the caller deletes it.
    """
    with torch.no_grad():
        for layer in _lora_layers(model, name):
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(name).float()
            if not hasattr(base, _WEIGHT):
                weight = _dequantised(base).detach().to(delta.device, torch.float32).clone()
                setattr(base, _WEIGHT, weight)
                setattr(base, _ON, False)
                base.forward = types.MethodType(_forward, base)
            getattr(base, _WEIGHT).add_(delta)


def set_merged_stack(model: torch.nn.Module, on: bool) -> None:
    for module in _merged_modules(model):
        setattr(module, _ON, on)


def merged_stack_is_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, _ON) for m in _merged_modules(model))


def drop_merged_stack(model: torch.nn.Module) -> None:
    """Restore every base layer's own forward and free the merged weights."""
    for module in _merged_modules(model):
        delattr(module, _WEIGHT)
        delattr(module, _ON)
        del module.forward  # the instance attribute; the class's forward is back
