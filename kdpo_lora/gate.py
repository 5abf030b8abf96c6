"""The edit gate: a served edit changes a token only where it writes its own fact.

An edit's LoRA acts on every prompt that names its subject, and it moves some of that subject's
other facts too (KnowEdit: a third of them). Serving has both next-token distributions at hand,
the edited one and the unedited one (the same model with the adapters off), so each token comes
from the edited distribution only where the edited model's top token continues one of the served
requests' own sentences - the target, or the edit prompt restated and then the target, as a chat
answer does - until the answer holds the target once, and from the unedited distribution
everywhere else. A routed prompt that asks the edited fact gets the new answer; one that asks the
subject's other facts gets the unedited one, and the edit does not write its target twice.

The gate is part of serving routed profiles (`kdpo-lora generate`, `serve`, `eval`); a PEFT or
vLLM export has no gate (it serves the adapter's distribution at every token).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from .requests import EditRequest


class Gate:
    """The token sequences that the edits serving a prompt may write."""

    def __init__(self, tokenizer, requests: Sequence[EditRequest]):
        texts = []
        for r in requests:
            prompts = [r.prompt.rstrip()] + [r.prompt.rstrip().replace(r.subject, a)
                                              for a in r.aliases if r.subject and r.subject in r.prompt]
            texts += [r.target_new, " " + r.target_new] + [f"{p} {r.target_new}" for p in prompts]
        self.sequences = _token_lists(tokenizer, texts)
        self.targets = _token_lists(tokenizer, [t for r in requests for t in (r.target_new, " " + r.target_new)])

    def allowed(self, written: Sequence[int]) -> set[int]:
        """The tokens that continue a sequence from its start or from the end of `written`; none once
        `written` holds a whole target (the edit states its fact once: "English, English, ...")."""
        written = list(written)
        if any(_contains(written, target) for target in self.targets):
            return set()
        out = set()
        for seq in self.sequences:
            for k in range(len(seq)):
                if k == 0 or (len(written) >= k and list(written[-k:]) == seq[:k]):
                    out.add(seq[k])
        return out

    def choose(self, edited: torch.Tensor, unedited: torch.Tensor, written: Sequence[int]) -> torch.Tensor:
        """The distribution (logits, one position) to take the next token from."""
        return edited if int(edited.argmax()) in self.allowed(written) else unedited

    def choose_teacher_forced(self, edited: torch.Tensor, unedited: torch.Tensor, labels: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
        """`choose` at every answer position of a teacher-forced batch ([B, K, V]; labels and mask
        [B, K]): what is written before a position is the answer up to it."""
        out = unedited.clone()
        top = edited.argmax(-1)
        for i in range(labels.shape[0]):
            answer = labels[i][mask[i]].tolist()
            columns = mask[i].nonzero().flatten().tolist()
            for j, column in enumerate(columns):
                if int(top[i, column]) in self.allowed(answer[:j]):
                    out[i, column] = edited[i, column]
        return out


def _token_lists(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for text in dict.fromkeys(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids and ids not in out:
            out.append(ids)
    return out


def _contains(written: list[int], part: list[int]) -> bool:
    return any(written[i:i + len(part)] == part for i in range(len(written) - len(part) + 1))


@torch.no_grad()
def generate(model, encoded, max_new_tokens: int, pad_id: int, gate: Gate | None = None,
             top_k: int = 0) -> torch.Tensor:
    """The new tokens [B, at most max_new_tokens] after `encoded` (left-padded input_ids, attention_mask):
    greedy, or top-k sampled; with `gate`, each from the edited or the unedited distribution. Rows
    that end (EOS) are padded with `pad_id`, as `model.generate` pads them."""
    sample = {"do_sample": True, "top_k": top_k} if top_k else {"do_sample": False}
    if gate is None:
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sample)
        return out[:, encoded["input_ids"].shape[1]:]
    from transformers import DynamicCache

    from .adapters import only_adapters
    from .batching import _forward_arguments

    cache_arg = "cache" if "cache" in _forward_arguments(model) else "past_key_values"
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    step_input, mask = encoded["input_ids"], encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = (DynamicCache(), DynamicCache())
    written: list[list[int]] = [[] for _ in range(len(step_input))]
    ended = [False] * len(step_input)
    for _ in range(max_new_tokens):
        logits = []
        for cache, names in zip(caches, (None, ())):
            with only_adapters(model, names) if names is not None else nullcontext():
                out = model(input_ids=step_input, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{cache_arg: cache})
            logits.append(out.logits[:, -1, :].float())
        tokens = []
        for i, (edited, unedited) in enumerate(zip(*logits)):
            chosen = gate.choose(edited, unedited, written[i])
            token = pad_id if ended[i] else _pick(chosen, top_k)
            ended[i] = ended[i] or token in eos
            written[i].append(token)
            tokens.append(token)
        if all(ended):
            break
        step_input = torch.tensor(tokens, device=mask.device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.tensor(written, device=mask.device)


def _pick(logits: torch.Tensor, top_k: int) -> int:
    if not top_k:
        return int(logits.argmax())
    values, indices = logits.topk(top_k)
    return int(indices[torch.multinomial(torch.softmax(values, -1), 1)])
