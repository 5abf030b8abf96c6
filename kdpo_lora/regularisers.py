"""What an edit trains besides its requests: subject swaps held still, the request in context (a
chat turn among them) and under the subject's aliases.

All are built only from the request's own prompt, subject, target and aliases plus generic material
shipped in the package (`data/`): never from a request's evaluation probes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .questions import other_wordings, question
from .requests import EditRequest

DATA = Path(__file__).resolve().parent / "data"
SUBJECTS_FILE = DATA / "preservation_subjects.txt"
PREFIXES_FILE = DATA / "context_prefixes.txt"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


@dataclass
class Preservation:
    """Token sequences whose next-token distributions at positions `keep` must not move while a batch
    trains, and those distributions (with only the batches below active: the model as it was before
    this batch), [sum of len(keep), V]."""

    sequences: list[torch.Tensor]
    keep: list[torch.Tensor]
    reference: torch.Tensor | None = None


def preservation_prompts(requests: Sequence[EditRequest], count: int, seed: int) -> list[str]:
    """Each request's prompt with its subject swapped for `count` unrelated subjects (none without a subject)."""
    subjects = _lines(SUBJECTS_FILE)
    prompts = []
    for i, request in enumerate(requests):
        if not request.subject or request.subject not in request.prompt:
            continue
        rng = random.Random(seed * 1_000_003 + i)
        others = [s for s in subjects if s.lower() != request.subject.lower()]
        prompts += [request.prompt.replace(request.subject, other) for other in rng.sample(others, count)]
    return prompts


def with_context(requests: Sequence[EditRequest], count: int, seed: int, tokenizer=None) -> list[tuple[str, str]]:
    """The (prompt, target) rows an edit trains: every request as given, then `count` rounds of each
    request in a context (row i belongs to request i % len(requests)): a different short generic
    sentence before it, followed by another wording of its fact where the question table has one
    (`questions.other_wordings`, a different one each round) or else by its prompt; and in the last
    round, where the tokenizer has a chat template, the chat turn that asks its question (`in_chat_turn`).

    An edit learnt only at the start of a text generalises poorly to the fact mentioned mid-text, as
    CounterFact's paraphrases are (ROME and MEMIT train with such context for the same reason); one
    learnt in one wording answers that wording (paraphrase 0.14 -> 0.29 with the others, RESULTS 10);
    and an instruct model's user asks in a chat turn (chat question 0.27 -> 0.53, RESULTS 7)."""
    rows = [(r.prompt, r.target_new) for r in requests]
    if count <= 0:
        return rows
    sentences = _lines(PREFIXES_FILE)
    count = min(count, len(sentences))  # each sentence at most once per request
    chosen = [random.Random(seed * 1_000_003 + i).sample(sentences, count) for i in range(len(requests))]
    wordings = [other_wordings(r.prompt, r.subject or "") for r in requests]
    for i, w in enumerate(wordings):
        random.Random(seed * 1_000_003 + i + 7).shuffle(w)
    rows += [(f"{chosen[i][k]} {wordings[i][k] if k < len(wordings[i]) else r.prompt}", r.target_new)
             for k in range(count) for i, r in enumerate(requests)]
    if getattr(tokenizer, "chat_template", None):
        last = len(rows) - len(requests)
        rows[last:] = [(in_chat_turn(tokenizer, r), r.target_new) for r in requests]
    return rows


def in_chat_turn(tokenizer, request: EditRequest) -> str:
    """The request's prompt opening the assistant's answer to its question (`questions.question`), in
    the model's chat template. The system turn is left empty: the edit holds under any system prompt
    a deployment sets, not one that was trained."""
    turn = [{"role": "system", "content": ""}, {"role": "user", "content": question(request.prompt, request.subject or "")}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) + request.prompt


def under_aliases(requests: Sequence[EditRequest]) -> list[tuple[int, str, str]]:
    """(request index, prompt, target) for each request's prompt naming its subject by each alias."""
    return [(i, r.with_alias(alias), r.target_new) for i, r in enumerate(requests) for alias in r.aliases]
