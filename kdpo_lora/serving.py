"""Squash a stack of edit adapters into one, and export it in the form LoRA servers load.

Squashing uses peft's `add_weighted_adapter(..., combination_type="cat")`: the A matrices (each
pre-multiplied by its adapter's scaling) are stacked and the B matrices concatenated, so
B_cat @ A_cat = sum_i scaling_i * B_i @ A_i exactly, with rank = sum of ranks and scaling 1.
That identity fails for rsLoRA and DoRA adapters and ignores LoRA biases, so those are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from . import merged
from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, delete_adapter, save_adapter
from .errors import StoreError

SQUASH_NAME = "kdpo_squashed"
FOLDED = ("kdpo_stack_a", "kdpo_stack_b")  # in-memory names of a folded stack (the reserved prefix)


def check_squashable(model: PeftModel, names: Sequence[str]) -> None:
    """Refuse adapter variants that `cat` mis-scales or drops."""
    if not names:
        raise StoreError("nothing to squash: the profile has no batches")
    layer_sets = set()
    for name in names:
        config = model.peft_config[name]
        if getattr(config, "use_rslora", False):
            raise StoreError(f"batch {name!r} uses rsLoRA: concatenation would mis-scale it; cannot squash")
        if getattr(config, "use_dora", False):
            raise StoreError(f"batch {name!r} uses DoRA: its magnitude vector cannot be concatenated; cannot squash")
        if getattr(config, "bias", "none") != "none":
            raise StoreError(f"batch {name!r} trains LoRA biases (bias={config.bias!r}); cannot squash exactly")
        if getattr(config, "modules_to_save", None):
            raise StoreError(f"batch {name!r} has modules_to_save; cannot squash")
        layers = config.layers_to_transform
        layer_sets.add(None if layers is None else tuple(sorted([layers] if isinstance(layers, int) else layers)))
    if len(layer_sets) > 1:
        raise StoreError("the batches edit different sets of layers; squash them per layer set")


def squash(model: PeftModel, names: Sequence[str], out_dir: Path, base_model_name: str | None = None) -> int:
    """Write one adapter equal to the active stack `names`; returns its rank. The model is left as it was."""
    check_squashable(model, names)
    active = list(model.base_model.active_adapters)
    if SQUASH_NAME in model.peft_config:
        model.delete_adapter(SQUASH_NAME)
    model.add_weighted_adapter(list(names), [1.0] * len(names), adapter_name=SQUASH_NAME, combination_type="cat")
    try:
        save_adapter(model, SQUASH_NAME, out_dir, base_model_name)
        rank = model.peft_config[SQUASH_NAME].r
    finally:
        model.delete_adapter(SQUASH_NAME)
        model.base_model.set_adapter(active)
        model.active_adapter = active[-1]
        for name, param in model.named_parameters():
            param.requires_grad_(False)
    return rank


def fold(model: PeftModel, names: Sequence[str], folded_name: str) -> bool:
    """Replace the frozen adapters `names` by one exact concatenation of them, in memory.

    N separate active adapters cost N small matmuls per layer; one folded adapter costs one, so
    editing and generation stay fast as edits pile up. Returns False (nothing changed) for adapter
    variants that cannot be concatenated exactly.
    """
    try:
        check_squashable(model, names)
    except StoreError:
        return False
    model.add_weighted_adapter(list(names), [1.0] * len(names), adapter_name=folded_name, combination_type="cat")
    model.base_model.set_adapter([folded_name])  # before deleting, so peft has no active adapter to re-point
    model.active_adapter = folded_name
    for name in names:
        model.delete_adapter(name)
    for param in model.parameters():
        param.requires_grad_(False)
    return True


def combine(model: PeftModel, names: Sequence[str], combined_name: str) -> bool:
    """Add one adapter equal to `names` active together (their exact concatenation), leaving them and
    the active set as they are; False (nothing added) for variants that cannot be concatenated."""
    try:
        check_squashable(model, names)
    except StoreError:
        return False
    active = list(model.base_model.active_adapters)
    model.add_weighted_adapter(list(names), [1.0] * len(names), adapter_name=combined_name, combination_type="cat")
    model.base_model.set_adapter(active)
    model.active_adapter = active[-1]
    for param in model.parameters():
        param.requires_grad_(False)
    return True


def compact_stack(model: torch.nn.Module, stack: Sequence[str]) -> tuple[torch.nn.Module, list[str]]:
    """Hold the frozen `stack` as cheaply as it can be held exactly; returns the model and new stack.

    Its LoRA batches are folded into one; that fold is merged into dense weights once that is
    cheaper (`merged.dense_is_cheaper`), and a merged stack takes every later batch in (one add per
    layer). The cost of a step or a token then stops growing with the number of edits.
    """
    has_merged = merged.STACK in stack
    lora = [n for n in stack if n != merged.STACK]
    if len(lora) >= 2:
        target = FOLDED[0] if FOLDED[0] not in lora else FOLDED[1]
        if not fold(model, lora, target):
            return model, list(stack)
        lora = [target]
    stack = ([merged.STACK] if has_merged else []) + lora
    if len(lora) == 1 and (has_merged or merged.dense_is_cheaper(model, lora[0])):
        try:
            check_squashable(model, lora)
        except StoreError:
            return model, stack  # not a plain product B @ A (DoRA, ...): keep it as an adapter
        merged.merge_into_stack(model, lora[0])
        model = delete_adapter(model, lora[0])
        stack = [merged.STACK]
    return model, stack


def export_for_serving(folder: Path, base_model_name: str, max_rank: int = 64, compress: bool = False,
                       dtype: torch.dtype = torch.bfloat16) -> dict:
    """Rewrite a squashed adapter folder for servers (vLLM and others) in place; returns a report.

    Plain LoRA, `bias: none`, no modules_to_save, no rank/alpha patterns, half-precision tensors,
    `base_model_name_or_path` set, and rank <= `max_rank` (by truncated SVD of each update with
    `compress`, whose relative error is measured and reported).
    """
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    rank, scaling = int(config["r"]), float(config["lora_alpha"]) / int(config["r"])
    report = {"rank": rank, "max_rank": max_rank, "compressed": False, "max_relative_error": 0.0}
    if rank > max_rank:
        if not compress:
            raise StoreError(f"the squashed adapter has rank {rank} > max rank {max_rank} (vLLM's max_lora_rank); "
                             f"raise --max-rank or pass --compress to truncate it by SVD")
        state, error = _svd_truncate(state, scaling, max_rank)
        report.update(compressed=True, max_relative_error=error, rank=max_rank)
        rank, scaling = max_rank, 1.0
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    plain = {
        "peft_type": "LORA", "task_type": config.get("task_type", "CAUSAL_LM"), "r": rank,
        "lora_alpha": rank * scaling, "lora_dropout": 0.0, "bias": "none", "target_modules": config["target_modules"],
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": config.get("layers_to_transform"), "layers_pattern": config.get("layers_pattern"),
        "base_model_name_or_path": base_model_name,
    }
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(plain, indent=2, sort_keys=True))
    return report


def _svd_truncate(state: dict, scaling: float, rank: int) -> tuple[dict, float]:
    """Best rank-`rank` factors of each scaling * B @ A; returns them and the worst relative error."""
    out, worst = {}, 0.0
    for key_a in [k for k in state if ".lora_A." in k]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        delta = scaling * state[key_b].float() @ state[key_a].float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        b = u[:, :rank] * s[:rank].sqrt()
        a = s[:rank].sqrt().unsqueeze(1) * vh[:rank]
        norm = torch.linalg.norm(delta)
        if norm > 0:
            worst = max(worst, float(torch.linalg.norm(delta - b @ a) / norm))
        out[key_a], out[key_b] = a.contiguous(), b.contiguous()
    return out, worst
