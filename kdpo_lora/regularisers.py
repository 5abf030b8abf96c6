"""What an edit trains besides its requests: subject swaps held still, the request in context and
under the subject's aliases.

All are built only from the request's own prompt, subject, target and aliases plus generic material
shipped in the package (`data/`): never from a request's evaluation probes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

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


def with_context(requests: Sequence[EditRequest], count: int, seed: int) -> list[tuple[str, str]]:
    """The (prompt, target) rows an edit trains: every request as given, then `count` rounds of each
    request after a different short generic sentence (row i belongs to request i % len(requests)).

    An edit learnt only at the start of a text generalises poorly to the fact mentioned mid-text, as
    CounterFact's paraphrases are (ROME and MEMIT train with such context for the same reason)."""
    rows = [(r.prompt, r.target_new) for r in requests]
    if count <= 0:
        return rows
    sentences = _lines(PREFIXES_FILE)
    count = min(count, len(sentences))  # each sentence at most once per request
    chosen = [random.Random(seed * 1_000_003 + i).sample(sentences, count) for i in range(len(requests))]
    return rows + [(f"{chosen[i][k]} {r.prompt}", r.target_new) for k in range(count) for i, r in enumerate(requests)]


def under_aliases(requests: Sequence[EditRequest]) -> list[tuple[int, str, str]]:
    """(request index, prompt, target) for each request's prompt naming its subject by each alias."""
    return [(i, r.with_alias(alias), r.target_new) for i, r in enumerate(requests) for alias in r.aliases]
