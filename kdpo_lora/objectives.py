"""The training objectives: KDPO (the point of the project) and the two baselines, DPO and SFT.

Shapes used throughout: a batch of B rows, left-padded so that every row ends at the same column.
Row i is `prompt_i + target_i`; its target occupies its last t_i columns. With K = max t_i, the
log-probs come as [B, K, V], column k predicting `labels[:, k] = input_ids[:, -K + k]`; the target
mask marks, per row, the last t_i of those K columns. The model itself never sees the padding: the
rows (and any preservation prompts scored with them) run packed into one sequence
(`sequence_log_probs`), and only the positions that predict target tokens reach the vocabulary
projection, which dominates the cost of small models.

KDPO (arXiv 2406.09920, as in the authors' code):
  y_neg = the current model's argmax at each target position under teacher forcing (positive prefix);
  score y_pos and y_neg under the same positive prefix, in the same forward pass; positions where
  they agree cancel and are masked; loss = -log sigmoid(beta * ((pi_pos - pi_neg) - (ref_pos - ref_neg))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import RequestError


@dataclass
class TargetBatch:
    """Left-padded `prompt + target` rows and the right-aligned target labels."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, K]: the last K tokens of every row
    target_mask: torch.Tensor  # [B, K] bool: True where labels are target tokens
    prompt_lengths: list[int]
    pad_id: int

    @property
    def num_targets(self) -> int:
        return self.labels.shape[1]


def token_ids(tokenizer, text: str) -> list[int]:
    """`text`'s token ids, with the tokenizer's special tokens unless the text already starts with its
    BOS (a chat template's output does: a second one would be a prompt the model never saw)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


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


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows, left-padded to one width: input_ids and attention_mask [len(rows), width]."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def collate(prompts: list[list[int]], targets: list[list[int]], pad_id: int, device: torch.device | str) -> TargetBatch:
    """Left-pad `prompt + target` rows; labels are the last K columns, K = longest target."""
    input_ids, attention_mask = left_pad([p + t for p, t in zip(prompts, targets)], pad_id, device)
    k = max(len(t) for t in targets)
    target_mask = torch.zeros((len(prompts), k), dtype=torch.bool)
    for i, target in enumerate(targets):
        target_mask[i, k - len(target):] = True
    return TargetBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids[:, -k:],
        target_mask=target_mask.to(device),
        prompt_lengths=[len(p) for p in prompts],
        pad_id=pad_id,
    )


def target_log_probs(model: torch.nn.Module, batch: TargetBatch) -> torch.Tensor:
    """Log-softmax over the vocabulary at the K positions that predict target tokens: [B, K, V].

    Positions outside a row's target (where it is shorter than K) are not computed: they hold a
    uniform distribution, and every use of them is masked.
    """
    return joint_log_probs(model, batch, [])[0]


def gather(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position log-prob of `tokens` ([B, K]) from [B, K, V] log-probs."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def teacher_forced_negative(log_probs: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """The argmax next token at each target position (KDPO's y_neg), pushed past `margin`."""
    return push_past_margin(log_probs.detach().argmax(-1), log_probs, labels, margin)


def push_past_margin(negatives: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """`negatives`, except where one is the target itself at a position the target does not yet hold
    (it is not the argmax, or leads the runner-up by less than `margin` log-prob): there the
    teacher-forced argmax, or the runner-up where the argmax is the target, so the push continues.

    Without it a negative equal to the target cancels out, and a row short of its target would have
    nothing left to push against - a free-running negative can equal the target where the
    teacher-forced argmax is end-of-text, which generating a fixed length never picks.
    """
    top2 = log_probs.detach().topk(2, dim=-1)
    first, second = top2.indices[..., 0], top2.indices[..., 1]
    held = (first == labels) & (top2.values[..., 0] - top2.values[..., 1] >= margin)
    return torch.where((negatives == labels) & ~held, torch.where(first == labels, second, first), negatives)


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


def joint_log_probs(model: torch.nn.Module, batch: TargetBatch, prompts: Sequence[torch.Tensor],
                    prompt_keep: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_log_probs` of `batch` and the next-token log-probs of `prompts` (1D token ids) at positions
    `prompt_keep` (default: after each prompt's last token), in one packed forward pass: [B, K, V] and
    [sum of kept positions, V].

    Small forward passes are bound by reading (and, for NF4, dequantising) the weights, so scoring the
    extra prompts alongside the batch costs little.
    """
    rows = unpad(batch.input_ids, batch.attention_mask)
    lengths = batch.target_mask.sum(-1).tolist()
    keep = [torch.arange(len(row) - 1 - t, len(row) - 1, device=row.device) for row, t in zip(rows, lengths)]
    keep += list(prompt_keep) if prompt_keep is not None else [last_position(p) for p in prompts]
    scored = sequence_log_probs(model, rows + list(prompts), keep)
    k, vocab = batch.num_targets, scored[0].shape[-1]
    uniform = scored[0].new_full((k, vocab), -math.log(vocab))
    targets = torch.stack([torch.cat([uniform[: k - t], lp]) for lp, t in zip(scored, lengths)])
    extra = torch.cat(scored[len(rows):]) if prompts else scored[0].new_zeros((0, vocab))
    return targets, extra


def next_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the next token after each left-padded prompt: [B, V]."""
    prompts = unpad(input_ids, attention_mask)
    return torch.cat(sequence_log_probs(model, prompts, [last_position(p) for p in prompts]))


def last_position(sequence: torch.Tensor) -> torch.Tensor:
    return torch.tensor([len(sequence) - 1], device=sequence.device)


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """The real tokens of each padded row."""
    return [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]


PACK_TOKENS = 512  # tokens per packed forward pass: attention over a packed row grows with its square


def sequence_log_probs(model: torch.nn.Module, sequences: Sequence[torch.Tensor],
                       keep: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Next-token log-softmax at positions `keep[i]` of each 1D token sequence `sequences[i]`: [len(keep[i]), V].

    The sequences run packed end to end in one row per pass (up to PACK_TOKENS tokens), position ids
    restarting at 0 for each, which transformers turns into a block-diagonal causal mask: no sequence
    sees another, and no compute goes to padding (30% of the tokens of a one-edit batch with its
    preservation prompts, left-padded). Only the kept positions reach the vocabulary projection.
    Architectures that do not honour packed position ids get left-padded rows instead.
    """
    if not sequences:
        return []
    if not packing_supported(model):
        return _padded_log_probs(model, sequences, keep)
    results: list[torch.Tensor] = []
    start = 0
    while start < len(sequences):
        end, tokens = start + 1, len(sequences[start])
        while end < len(sequences) and tokens + len(sequences[end]) <= PACK_TOKENS:
            tokens, end = tokens + len(sequences[end]), end + 1
        chunk = sequences[start:end]
        offsets = [0] + [len(s) for s in chunk[:-1]]
        offsets = torch.tensor(offsets, device=chunk[0].device).cumsum(0)
        columns = torch.cat([k + offset for k, offset in zip(keep[start:end], offsets)])
        out = model(input_ids=torch.cat(list(chunk)).unsqueeze(0),
                    position_ids=torch.cat([torch.arange(len(s), device=s.device) for s in chunk]).unsqueeze(0),
                    logits_to_keep=columns, use_cache=False)
        results += F.log_softmax(out.logits[0].float(), dim=-1).split([len(k) for k in keep[start:end]])
        start = end
    return results


def _padded_log_probs(model: torch.nn.Module, sequences: Sequence[torch.Tensor],
                      keep: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`sequence_log_probs` with the sequences left-padded into one batch (what packing replaces)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.stack([F.pad(s, (width - len(s), 0)) for s in sequences])
    attention_mask = torch.stack([F.pad(torch.ones_like(s), (width - len(s), 0)) for s in sequences])
    columns = [k + width - len(s) for s, k in zip(sequences, keep)]  # kept positions in padded coordinates
    first = min((int(c.min()) for c in columns if len(c)), default=width - 1)
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=width - first,
                use_cache=False)
    log_probs = F.log_softmax(out.logits.float(), dim=-1)
    return [log_probs[i, c - first] for i, c in enumerate(columns)]


_PACKING: dict[tuple, bool] = {}


def packing_supported(model: torch.nn.Module) -> bool:
    """Does this architecture keep packed sequences apart? Checked once per model type and attention
    implementation: a short sequence scored alone and after another must give the same logits."""
    config = model.config
    key = (type(config).__name__, getattr(config, "_attn_implementation", None))
    if key not in _PACKING:
        device = next(model.parameters()).device
        with torch.no_grad():
            def last_logits(ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
                position_ids = None if positions is None else torch.tensor([positions], device=device)
                out = model(input_ids=torch.tensor([ids], device=device), position_ids=position_ids, use_cache=False)
                return out.logits[0, -1].float()

            alone = last_logits([4, 5])
            packed = last_logits([1, 2, 3, 4, 5], [0, 1, 2, 0, 1])
            joined = last_logits([1, 2, 3, 4, 5], [0, 1, 2, 3, 4])  # what attending across would give
        _PACKING[key] = bool((packed - alone).abs().max() <= 0.01 * (joined - alone).abs().max())
    return _PACKING[key]


def preservation_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || policy) of next-token distributions: how far unrelated answers moved."""
    return (reference.exp() * (reference - policy)).sum(-1).mean()
