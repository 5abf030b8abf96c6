"""The training objectives: KDPO (the point of the project) and the two baselines, DPO and SFT.

Shapes used throughout: a batch of B rows, left-padded so that every row ends at the same column.
Row i is `prompt_i + target_i`; its target occupies its last t_i columns. With K = max t_i, the
model is asked for only the last K + 1 positions of logits (`logits_to_keep`); dropping the very
last one leaves K logits whose column k predicts `labels[:, k] = input_ids[:, -K + k]`. The target
mask marks, per row, the last t_i of those K columns. So prompts never reach the vocabulary
projection, which dominates the cost of small models.

KDPO (arXiv 2406.09920, as in the authors' code):
  y_neg = the current model's argmax at each target position under teacher forcing (positive prefix);
  score y_pos and y_neg under the same positive prefix, in the same forward pass; positions where
  they agree cancel and are masked; loss = -log sigmoid(beta * ((pi_pos - pi_neg) - (ref_pos - ref_neg))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import RequestError


@dataclass
class TargetBatch:
    """Left-padded `prompt + target` rows and the right-aligned target labels."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L], counted from each row's first real token
    labels: torch.Tensor  # [B, K]: the last K tokens of every row
    target_mask: torch.Tensor  # [B, K] bool: True where labels are target tokens
    prompt_lengths: list[int]
    pad_id: int

    @property
    def num_targets(self) -> int:
        return self.labels.shape[1]


def tokenize_pair(tokenizer, prompt: str, target: str, max_target_tokens: int = 64,
                  max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of prompt and target such that prompt_ids + target_ids tokenises `prompt target`.

    Tokenising the joined text keeps the tokenizer's own merges at the boundary; if the prompt's
    tokens are not a prefix of the joined tokens, the target is tokenised on its own.
    """
    prompt = prompt.rstrip()
    target = target.strip()
    prompt_ids = tokenizer(prompt).input_ids
    joined_ids = tokenizer(f"{prompt} {target}").input_ids
    if joined_ids[: len(prompt_ids)] == prompt_ids:
        target_ids = joined_ids[len(prompt_ids):]
    else:
        target_ids = tokenizer(f" {target}", add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None and target_ids and target_ids[-1] == tokenizer.eos_token_id:
        target_ids = target_ids[:-1]  # some tokenizers append EOS; the edit is about the words
    if not target_ids:
        raise RequestError(f"target {target!r} tokenises to nothing")
    if len(target_ids) > max_target_tokens:
        raise RequestError(f"target {target[:40]!r} is {len(target_ids)} tokens, over the limit of {max_target_tokens}")
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        raise RequestError(
            f"prompt + target is {len(prompt_ids) + len(target_ids)} tokens, longer than the model's context of {max_length}"
        )
    if not prompt_ids:
        raise RequestError(f"prompt {prompt!r} tokenises to nothing")
    return prompt_ids, target_ids


def collate(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device: torch.device | str) -> TargetBatch:
    """Left-pad `prompt + target` rows; labels are the last K columns, K = longest target."""
    rows = [p + t for p, t in zip(prompts, targets)]
    width = max(len(r) for r in rows)
    k = max(len(t) for t in targets)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), k), dtype=torch.bool)
    for i, (row, target) in enumerate(zip(rows, targets)):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
        target_mask[i, k - len(target):] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TargetBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        labels=input_ids[:, width - k:].to(device),
        target_mask=target_mask.to(device),
        prompt_lengths=[len(p) for p in prompts],
        pad_id=pad_id,
    )


def target_log_probs(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Log-softmax over the vocabulary at the K positions that predict target tokens: [B, K, V]."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.num_targets + 1,
        use_cache=False,
    )
    return F.log_softmax(out.logits[:, :-1].float(), dim=-1)


def gather(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position log-prob of `tokens` ([B, K]) from [B, K, V] log-probs."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def teacher_forced_negative(log_probs: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """The argmax next token at each target position (KDPO's y_neg).

    With `margin > 0`, a position whose argmax is already the target but leads the runner-up by
    less than `margin` (in log-prob) takes the runner-up as its negative, so the push continues.
    """
    top2 = log_probs.detach().topk(2, dim=-1)
    negatives = top2.indices[..., 0].clone()
    if margin > 0:
        close = (negatives == labels) & (top2.values[..., 0] - top2.values[..., 1] < margin)
        negatives[close] = top2.indices[..., 1][close]
    return negatives


def solved_rows(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Rows whose every target token is the argmax (and leads by `margin`): [B] bool."""
    negatives = teacher_forced_negative(log_probs, labels, margin)
    return ((negatives == labels) | ~mask).all(dim=-1)


def token_accuracy(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row fraction of target tokens that are the teacher-forced argmax: [B]."""
    hits = (log_probs.argmax(-1) == labels) & mask
    return hits.sum(-1).float() / mask.sum(-1).clamp(min=1).float()


def dpo_margin_loss(policy_pos: torch.Tensor, policy_neg: torch.Tensor, ref_pos: torch.Tensor,
                    ref_neg: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row DPO loss on summed sequence log-probs: -log sigmoid(beta * (policy - reference margin))."""
    return -F.logsigmoid(beta * ((policy_pos - policy_neg) - (ref_pos - ref_neg)))


def kdpo_loss(log_probs: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor, mask: torch.Tensor,
              ref_pos: torch.Tensor, ref_neg: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KDPO loss and the per-row mask of contributing rows.

    `ref_pos`/`ref_neg` are the reference model's per-position log-probs of labels/negatives ([B, K]).
    Positions outside the target, or where negative == positive, are masked (they cancel).
    """
    active = mask & (negatives != labels)
    policy_pos = (gather(log_probs, labels) * active).sum(-1)
    policy_neg = (gather(log_probs, negatives) * active).sum(-1)
    losses = dpo_margin_loss(policy_pos, policy_neg, (ref_pos * active).sum(-1), (ref_neg * active).sum(-1), beta)
    return losses, active.any(-1)


def nll(log_probs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean negative log-likelihood of the target tokens (the SFT objective)."""
    return -(gather(log_probs, labels) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def joint_log_probs(model: torch.nn.Module, batch: TargetBatch, extra_ids: torch.Tensor,
                    extra_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_log_probs` of `batch` and the next-token log-probs of extra prompts, in ONE forward pass.

    Small-batch forward passes are bound by reading the weights (and dequantising them, for NF4),
    so scoring the extra rows in the same pass costs little; the left padding keeps both aligned.
    """
    width = max(batch.input_ids.shape[1], extra_ids.shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (width - t.shape[1], 0), value=value)

    input_ids = torch.cat([pad(batch.input_ids, batch.pad_id), pad(extra_ids, batch.pad_id)])
    attention_mask = torch.cat([pad(batch.attention_mask, 0), pad(extra_mask, 0)])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=batch.num_targets + 1, use_cache=False)
    log_probs = F.log_softmax(out.logits.float(), dim=-1)
    rows = batch.input_ids.shape[0]
    return log_probs[:rows, :-1], log_probs[rows:, -1]


def next_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the next token after each left-padded prompt: [B, V]."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
                use_cache=False)
    return F.log_softmax(out.logits[:, -1].float(), dim=-1)


def preservation_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || policy) of next-token distributions: how far unrelated answers moved."""
    return (reference.exp() * (reference - policy)).sum(-1).mean()
