"""KDPO as the authors ran it - kept in the benchmarks for comparison only, never used by the package.

fp32 base, a deep copy of the model as the DPO reference, one dense MLP down-projection trained
(layer 21 of 32, 0-based as in the authors' hyper-parameters; the same relative depth elsewhere),
log-softmax over the whole vocabulary at every position, the reference recomputed at every step, up
to 20 cycles x 8 Adam steps (lr 1e-4; a fifth of it for edits after the first of a sequence) with
the authors' per-cycle accuracy check, a cycle ended once the KDPO loss is below 1e-3, one edit at a
time; `delta_scale=2` applies the trained change twice (W + 2 delta), the authors' option.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from kdpo_lora import objectives as obj

PAPER_LAYER, PAPER_DEPTH = 21, 32


def default_layer(model) -> int:
    """The paper's layer 21 of 32 (0-based), at the same relative depth on other models."""
    layers = model.config.num_hidden_layers
    return min(layers - 1, round(layers * PAPER_LAYER / PAPER_DEPTH))


def _full_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)  # [1, L, V]: every position


def published_edit(model, tokenizer, prompt: str, target: str, layer: int | None = None, cycles: int = 20,
                   steps: int = 8, lr: float = 1e-4, beta: float = 0.1, loss_threshold: float = 1e-3,
                   sequential: bool = False, delta_scale: float = 1.0) -> dict:
    """Edit `model` in place (one dense layer); returns success, cycles, steps and a restore() closure.

    `sequential`: this edit follows earlier ones in a sequence, so it learns at lr / 5."""
    layer = default_layer(model) if layer is None else layer
    lr = lr / 5 if sequential else lr
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
    used = taken = 0
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
            if loss.item() < loss_threshold:  # the authors' loss stop ends the cycle
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            taken += 1
    with torch.no_grad():
        if delta_scale != 1.0:
            weight.copy_(original + delta_scale * (weight - original))
        final = _full_log_probs(model, ids)[:, start:start + t].argmax(-1)
    weight.requires_grad_(False)
    del reference, optimizer

    def restore() -> None:
        with torch.no_grad():
            weight.copy_(original)

    return {"success": bool((final == labels).all()), "cycles": used, "steps": taken, "layer": layer, "lr": lr,
            "restore": restore}
