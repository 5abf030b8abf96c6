"""The training objectives, one small strategy each, so the edit loop never branches on the method.

Each strategy answers three questions per cycle: what the negative is, what the reference says about
the positive and the negative (the reference is the model with the trained adapter switched off),
and the loss. KDPO (the paper) takes the current model's teacher-forced argmax at each target
position as the negative, so the negative shares the positive's prefix and both are read from one
reference pass; DPO and KDPO-free generate a free-running negative; SFT has no negative at all.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import adapters
from . import objectives as obj

Reference = tuple[torch.Tensor, torch.Tensor] | None


class Method:
    """Standard interface; `reference_log_probs` is the reference's distribution at the target positions."""

    uses_reference = True

    def negatives(self, model, tokenizer, log_probs: torch.Tensor, batch: obj.TargetBatch, margin: float):
        return obj.teacher_forced_negative(log_probs, batch.labels, margin)

    def reference(self, model, batch: obj.TargetBatch, negatives, reference_log_probs: torch.Tensor,
                  below: Sequence[str]) -> Reference:
        return obj.gather(reference_log_probs, batch.labels), obj.gather(reference_log_probs, negatives)

    def loss(self, model, log_probs: torch.Tensor, batch: obj.TargetBatch, negatives, mask: torch.Tensor,
             reference: Reference, beta: float) -> torch.Tensor:
        per_row, contributing = obj.kdpo_loss(log_probs, batch.labels, negatives, mask, *reference, beta)
        return per_row[contributing].mean()


class KDPO(Method):
    """The paper's objective: DPO on the new fact against the model's own teacher-forced prediction."""


class KDPOFree(Method):
    """Ablation: KDPO's loss, but the negative is the free-running greedy continuation (no teacher forcing)."""

    def negatives(self, model, tokenizer, log_probs, batch, margin):
        free = greedy_negative_batch(model, tokenizer, batch, log_probs, 0.0).labels
        return obj.push_past_margin(free, log_probs, batch.labels, margin)  # scored under the positive prefix


class DPO(Method):
    """Standard DPO: the free-running greedy continuation, scored under its own prefix (one more pass)."""

    def negatives(self, model, tokenizer, log_probs, batch, margin):
        return greedy_negative_batch(model, tokenizer, batch, log_probs, margin)

    def reference(self, model, batch, negatives, reference_log_probs, below):
        with torch.no_grad(), adapters.only_adapters(model, below):
            ref_neg = obj.target_log_probs(model, negatives)
        return ((obj.gather(reference_log_probs, batch.labels) * batch.target_mask).sum(-1),
                (obj.gather(ref_neg, negatives.labels) * negatives.target_mask).sum(-1))

    def loss(self, model, log_probs, batch, negatives, mask, reference, beta):
        rows = mask.any(-1)
        neg_log_probs = obj.target_log_probs(model, negatives)
        pos = (obj.gather(log_probs, batch.labels) * batch.target_mask).sum(-1)
        neg = (obj.gather(neg_log_probs, negatives.labels) * negatives.target_mask).sum(-1)
        return obj.dpo_margin_loss(pos, neg, reference[0], reference[1], beta)[rows].mean()


class SFT(Method):
    """Baseline: the targets' negative log-likelihood; no negative, no reference."""

    uses_reference = False

    def negatives(self, model, tokenizer, log_probs, batch, margin):
        return None

    def reference(self, model, batch, negatives, reference_log_probs, below):
        return None

    def loss(self, model, log_probs, batch, negatives, mask, reference, beta):
        return obj.nll(log_probs, batch.labels, mask)[mask.any(-1)].mean()


METHODS: dict[str, Method] = {"kdpo": KDPO(), "kdpo_free": KDPOFree(), "dpo": DPO(), "sft": SFT()}


def greedy_negative_batch(model, tokenizer, batch: obj.TargetBatch, log_probs: torch.Tensor,
                          margin: float) -> obj.TargetBatch:
    """Each prompt's greedy continuation, as long as its target. One that is the target itself (a
    fixed-length generation never picks end-of-text, or the target leads by less than `margin`)
    shares the target's prefixes, so the teacher-forced negative replaces it, as in KDPO."""
    device = next(model.parameters()).device
    prompts, lengths = [], []
    for i, plen in enumerate(batch.prompt_lengths):
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        prompts.append(row[:plen])
        lengths.append(len(row) - plen)
    generated = []
    with torch.no_grad():
        for prompt, length in zip(prompts, lengths):
            ids = torch.tensor([prompt], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                 min_new_tokens=length, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            generated.append(out[0, len(prompt):].tolist())
    pushed = obj.teacher_forced_negative(log_probs, batch.labels, margin)
    for i, mask in enumerate(batch.target_mask):
        if generated[i] == batch.labels[i][mask].tolist():
            generated[i] = pushed[i][mask].tolist()
    return obj.collate(prompts, generated, tokenizer.pad_token_id, device)
