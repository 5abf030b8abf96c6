"""LoRA adapter plumbing on top of peft: add, activate, freeze, save and load (safetensors only).

Every edit batch is one named LoRA adapter on the same base model. The DPO reference is this same
model with the adapter being trained switched off - `disable_adapter()` when nothing else is
active, otherwise only the earlier adapters active - never a second copy of the model. A stack may
also hold `merged.STACK` (earlier batches merged into full-precision weights); the functions here
switch it on and off together with the peft adapters.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from . import merged
from .config import EditConfig
from .errors import IntegrityError
from .store import ADAPTER_CONFIG, ADAPTER_WEIGHTS



def lora_config(config: EditConfig, num_layers: int) -> LoraConfig:
    """The peft LoRA config an edit batch is trained with, on a model of `num_layers` blocks."""
    layers = config.layer_indices(num_layers)
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        init_lora_weights=True,  # B = 0: the editor takes its reference from the first pass (editor.py)
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_adapter(model: torch.nn.Module, name: str, config: LoraConfig) -> PeftModel:
    """Add a fresh adapter (B = 0, so the model's outputs are unchanged) and return the PeftModel."""
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} is already loaded")
        model.add_adapter(name, config)
        return model
    return get_peft_model(model, config, adapter_name=name)


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapters in memory (the merged stack first, if there is one)."""
    names = [merged.STACK] if merged.has_merged_stack(model) else []
    return names + (list(model.peft_config) if isinstance(model, PeftModel) else [])


def set_active(model: torch.nn.Module, names: Sequence[str], trainable: str | None = None) -> None:
    """Activate exactly `names` (in order); only `trainable` (if given) gets gradients."""
    merged.set_merged_stack(model, merged.STACK in names)
    names = [n for n in names if n != merged.STACK]
    if not isinstance(model, PeftModel):
        if names:
            raise ValueError("no adapters are loaded")
        return
    if not names:  # peft always keeps one adapter active; silently leaving the last set on would lie
        raise ValueError("set_active needs at least one LoRA adapter; use only_adapters(model, ()) for none")
    _activate(model, names)
    freeze_all_but(model, trainable)


def _activate(model: PeftModel, names: Sequence[str]) -> None:
    model.base_model.set_adapter(list(names))
    model.active_adapter = names[-1]  # PeftModel looks its config up by this one name


def freeze_all_but(model: torch.nn.Module, trainable: str | None) -> None:
    """requires_grad only on the LoRA weights of adapter `trainable`; everything else frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is not None and "lora_" in name and f".{trainable}." in name)


@contextmanager
def only_adapters(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run with exactly `names` active (none: adapters disabled), then restore what was active."""
    merged_before = merged.merged_stack_is_on(model)
    merged.set_merged_stack(model, merged.STACK in names)
    names = [n for n in names if n != merged.STACK]
    try:
        if not names:
            with _lora_layers_off(model):
                yield
        elif not isinstance(model, PeftModel):
            yield
        else:
            yield from _only_peft_adapters(model, names)
    finally:
        merged.set_merged_stack(model, merged_before)


@contextmanager
def _lora_layers_off(model: torch.nn.Module) -> Iterator[None]:
    """Every LoRA layer off: through the PeftModel, or on the modules themselves where `model` is the
    base model that peft wrapped after the caller took hold of it (its layers hold the adapters)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_off = [m.disable_adapters for m in layers]
    grads = {p: p.requires_grad for m in layers for p in m.parameters()}  # enabling sets them; keep them
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, off in zip(layers, was_off):
            layer.enable_adapters(not off)
        for param, grad in grads.items():
            param.requires_grad_(grad)


def _only_peft_adapters(model: PeftModel, names: Sequence[str]) -> Iterator[None]:
    before = list(model.base_model.active_adapters)
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    _activate(model, names)
    try:
        yield
    finally:
        _activate(model, before)
        for n, p in model.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])


def delete_adapter(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Remove adapter `name`; returns the model (unwrapped from peft when no LoRA adapter is left)."""
    if name == merged.STACK:
        merged.drop_merged_stack(model)
        return model
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        return model
    if len(model.peft_config) == 1:
        return model.unload()
    remaining = [n for n in model.base_model.active_adapters if n != name]
    # re-point the active set first: peft warns when it has to pick a new active adapter itself
    _activate(model, remaining or [next(n for n in model.peft_config if n != name)])
    model.delete_adapter(name)
    freeze_all_but(model, None)
    return model


def lora_b_weights(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """Adapter `name`'s LoRA B matrices: scaling them all by s scales the adapter's update by s."""
    return [m.lora_B[name].weight for m in model.modules()
            if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict) and name in m.lora_B]


def adapter_state(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of adapter `name`. Edits never resize the vocabulary, so peft is told not to
    save embedding layers; its default ("auto") asks the Hub about the base model on every call."""
    return get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)


def save_adapter(model: PeftModel, name: str, folder: Path, base_model_name: str | None = None) -> None:
    """Write a standard PEFT adapter folder (config JSON + safetensors) for adapter `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model, name)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = model.peft_config[name].to_dict()
    config["inference_mode"] = True
    if base_model_name is not None:
        config["base_model_name_or_path"] = base_model_name
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))


def read_adapter_config(folder: Path) -> LoraConfig:
    """A LoRA config from `adapter_config.json`; anything else is refused."""
    try:
        data = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{folder}: unreadable {ADAPTER_CONFIG} ({err})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise IntegrityError(f"{folder}: not a LoRA adapter (peft_type {data.get('peft_type')!r})")
    try:
        return LoraConfig.from_peft_type(**data) if hasattr(LoraConfig, "from_peft_type") else LoraConfig(**data)
    except (TypeError, ValueError) as err:
        raise IntegrityError(f"{folder}: invalid {ADAPTER_CONFIG} ({err})") from None


def load_adapter(model: torch.nn.Module, name: str, folder: Path) -> PeftModel:
    """Load an adapter folder into `model` as `name` (frozen). Only safetensors are read."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise IntegrityError(f"{folder}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    config = read_adapter_config(folder)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise IntegrityError(f"{weights}: not a valid safetensors file ({err})") from None
    try:
        model = add_adapter(model, name, config)
    except ValueError as err:  # peft: none of its target modules/layers exist in this model
        raise IntegrityError(f"{folder}: adapter weights do not fit this model ({str(err).splitlines()[0]})") from None
    expected = set(adapter_state(model, name))
    if set(state) != expected:
        model = delete_adapter(model, name)
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise IntegrityError(
            f"{folder}: adapter weights do not fit this model (missing {missing[:2]}, unexpected {extra[:2]})"
        )
    try:
        set_peft_model_state_dict(model, state, adapter_name=name)
    except RuntimeError as err:
        model = delete_adapter(model, name)
        raise IntegrityError(f"{folder}: adapter shapes do not match this model ({str(err).splitlines()[0]})") from None
    freeze_all_but(model, None)
    return model


def refill_adapter(model: PeftModel, name: str, folder: Path) -> bool:
    """Overwrite loaded adapter `name`'s weights with those of the adapter folder `folder`, in place,
    when both have the same LoRA shape (config and tensors); False (nothing changed) when not.
    Copying tensors costs milliseconds; peft's `add_adapter` walks the whole model (about a second
    for SmolLM2 on a CPU), so a server swaps batches through a few such slots."""
    config, held = read_adapter_config(folder), model.peft_config[name]
    same = ("r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora", "use_dora", "bias")
    if any(_plain(getattr(config, k, None)) != _plain(getattr(held, k, None)) for k in same):
        return False
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise IntegrityError(f"{folder}: not a valid safetensors file ({err})") from None
    params = {key: param for key, param in _saved_keys(model, name).items()}
    if set(state) != set(params) or any(state[k].shape != params[k].shape for k in state):
        return False
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)
    return True


def _plain(value):
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _saved_keys(model: PeftModel, name: str) -> dict[str, torch.nn.Parameter]:
    """Adapter `name`'s parameters under the keys its saved file uses (peft drops the adapter name)."""
    marker = f".{name}."
    return {key.replace(marker, "."): param for key, param in model.named_parameters() if marker in key}
