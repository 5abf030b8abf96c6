"""Does an edit hold the way people ask? Free generation through the model's chat template.

Teacher-forced scores on the edit prompt overstate what a user sees. These probes ask: the fact's
question (`questions.question`) and each paraphrase turned into one, through the chat template with
and without a system prompt, greedy; "Tell me about {subject}." for a longer answer, whose n-gram
entropy is compared with the unedited model's; and whether any answer floods the text with the new
target. Metrics per request (keys of the results JSON):

- `chat_question`: the answer to the question names target_new and not target_true (case- and
  space-insensitive, whole words, outside the subject's name: "Ferrari F40 is made by Honda" names
  Honda, not Ferrari), in the first `ANSWER_TOKENS` tokens; mean over both prompts;
- `chat_paraphrase`: the same for the paraphrases asked as questions;
- `long_form`: the 64-token answer about the subject names target_new; `long_form_entropy` and
  `long_form_entropy_unedited`: its n-gram entropy (bits), and the unedited model's answer's;
- `repetition`: share of answers (edit prompt continued, questions, long form; first 32 tokens)
  naming the target three times or more.
"""

from __future__ import annotations

import re
from functools import partial
from statistics import mean
from typing import Sequence

import torch

from .adapters import only_adapters
from .evaluate import Route, _routed, ngram_entropy
from .gate import Gate, generate
from .questions import question
from .requests import EditRequest

ANSWER_TOKENS = 24
REPEAT_TOKENS = 32
LONG_TOKENS = 64
SYSTEM = "You are a helpful assistant. Answer briefly."
LONG_FORM = "Tell me about {}."


def names(text: str, target: str) -> bool:
    """`text` names `target`: case- and space-insensitive, as whole words ("Paris" not in "Parisian")."""
    target = " ".join(target.casefold().split())
    return bool(target) and re.search(rf"(?<!\w){re.escape(target)}(?!\w)", " ".join(text.casefold().split())) is not None


def repeats(text: str, target: str, times: int = 3) -> bool:
    target = " ".join(target.casefold().split())
    found = re.findall(rf"(?<!\w){re.escape(target)}(?!\w)", " ".join(text.casefold().split())) if target else []
    return len(found) >= times


def without_subject(text: str, request: EditRequest) -> str:
    """`text` with every mention of the request's subject (and aliases) taken out: an answer that
    repeats "Ferrari F40" does not name Ferrari as its maker."""
    text = " ".join(text.split())
    given = [" ".join(n.split()) for n in (request.subject or "", *request.aliases)]
    for name in sorted({*given, *(re.sub(r"^the ", "", n, flags=re.IGNORECASE) for n in given)}, key=len, reverse=True):
        if name:
            text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return text


def right(text: str, request: EditRequest) -> bool:
    """The answer gives the new fact, not the old one, outside the subject's own name."""
    text = without_subject(text, request)
    return names(text, request.target_new) and not (request.target_true and names(text, request.target_true))


def chat(tokenizer, user: str, system: bool) -> str:
    messages = ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_tokens(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, gate: Gate | None = None) -> list[list[int]]:
    """The greedy answer tokens of each prompt (written by the chat template), through `gate`."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), 16):
        chunk = list(prompts[start:start + 16])
        bos = getattr(tokenizer, "bos_token", None)  # the chat template writes it where the model wants it
        encoded = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=not (bos and chunk[0].startswith(bos))).to(device)
        generated = generate(model, encoded, max_new_tokens, tokenizer.pad_token_id, gate)
        for row in generated.tolist():
            out.append([t for t in row if t != tokenizer.pad_token_id])
    return out


def asking_metrics(model, tokenizer, requests: Sequence[EditRequest], route: Route | None = None) -> list[dict]:
    """The metrics above for each request, each prompt served as its route serves it."""
    prompts: list[str] = []
    spans = []
    for r in requests:
        asked = [question(r.prompt, r.subject or "")] + [question(p, r.subject or "") for p in r.rephrase_prompts]
        start = len(prompts)
        prompts += [chat(tokenizer, q, system) for q in asked for system in (True, False)]
        prompts += [chat(tokenizer, LONG_FORM.format(r.subject or r.prompt), False)]
        spans.append((start, len(asked)))
    answers = _routed(model, route, partial(greedy_tokens, model, tokenizer, max_new_tokens=LONG_TOKENS), prompts)
    continued = _routed(model, route, partial(greedy_tokens, model, tokenizer, max_new_tokens=REPEAT_TOKENS),
                        [r.prompt for r in requests])
    long_prompts = [prompts[start + 2 * asked] for start, asked in spans]
    with only_adapters(model, ()):
        unedited = greedy_tokens(model, tokenizer, long_prompts, LONG_TOKENS)

    def text(tokens: list[int], limit: int) -> str:
        return tokenizer.decode(tokens[:limit], skip_special_tokens=True)

    rows = []
    for r, (start, asked), cont, base in zip(requests, spans, continued, unedited):
        chats = answers[start:start + 2 * asked]
        long = answers[start + 2 * asked]
        row = {"chat_question": mean(right(text(a, ANSWER_TOKENS), r) for a in chats[:2])}
        if asked > 1:
            row["chat_paraphrase"] = mean(right(text(a, ANSWER_TOKENS), r) for a in chats[2:])
        row["long_form"] = float(names(without_subject(text(long, LONG_TOKENS), r), r.target_new))
        row["long_form_entropy"] = ngram_entropy(text(long, LONG_TOKENS))
        row["long_form_entropy_unedited"] = ngram_entropy(text(base, LONG_TOKENS))
        shown = [cont] + chats[:2] + [long]
        row["repetition"] = mean(repeats(text(t, REPEAT_TOKENS), r.target_new) for t in shown)
        rows.append(row)
    return rows
