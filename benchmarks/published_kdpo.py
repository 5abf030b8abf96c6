"""KDPO as the authors ran it - kept in the benchmarks for comparison only, never used by the package.

fp32 base, a deep copy of the model as the DPO reference, one dense MLP down-projection trained
(a mid-late layer), log-softmax over the whole vocabulary at every position, the reference recomputed
at every step, a fixed schedule of up to 20 cycles x 8 Adam steps (lr 1e-4) with the authors'
per-cycle accuracy check, one edit at a time.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from kdpo_lora import objectives as obj


def default_layer(model) -> int:
    """The paper edits layer 21 of 32; keep the same relative depth."""
    return round(model.config.num_hidden_layers * 21 / 32) - 1


def _full_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # [1, L, V]: every position


def published_edit(model, tokenizer, prompt: str, target: str, layer: int | None = None, cycles: int = 20,
                   steps: int = 8, lr: float = 1e-4, beta: float = 0.1) -> dict:
    """Edit `model` in place (one dense layer); returns success, cycles, and a restore() closure."""
    layer = default_layer(model) if layer is None else layer
    prompt_ids, target_ids = obj.tokenize_pair(tokenizer, prompt, target)
    ids = torch.tensor([prompt_ids + target_ids], device=next(model.parameters()).device)
    start, t = len(prompt_ids) - 1, len(target_ids)
    labels = ids[:, len(prompt_ids):]
    reference = copy.deepcopy(model).eval()  # the published set-up: a full second copy
    for param in reference.parameters():
        param.requires_grad_(False)
    weight = model.model.layers[layer].mlp.down_proj.weight
    original = weight.detach().clone()
    for param in model.parameters():
        param.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    used = 0
    for cycle in range(cycles):
        with torch.no_grad():
            log_probs = _full_log_probs(model, ids)[:, start:start + t]
        negatives = log_probs.argmax(-1)
        if bool((negatives == labels).all()):  # the per-cycle accuracy check
            break
        used = cycle + 1
        mask = negatives != labels
        for _ in range(steps):
            with torch.no_grad():  # the reference, recomputed every step
                ref = _full_log_probs(reference, ids)[:, start:start + t]
            policy = _full_log_probs(model, ids)[:, start:start + t]
            pol = ((obj.gather(policy, labels) - obj.gather(policy, negatives)) * mask).sum(-1)
            rf = ((obj.gather(ref, labels) - obj.gather(ref, negatives)) * mask).sum(-1)
            loss = -F.logsigmoid(beta * (pol - rf)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = _full_log_probs(model, ids)[:, start:start + t].argmax(-1)
    weight.requires_grad_(False)
    del reference, optimizer

    def restore() -> None:
        with torch.no_grad():
            weight.copy_(original)

    return {"success": bool((final == labels).all()), "cycles": used, "restore": restore}
