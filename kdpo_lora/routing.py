"""Subject routing: a prompt is served by only the edit batches whose subjects it names.

Stacked LoRA edits all act on every prompt, and after many edits their small unrelated changes add
up on prompts no edit was about (benchmarks/notes, 4o-4q). With `routing: subject`, each prompt runs with
just the batches holding a request whose subject occurs in it (whole words, case and spacing
ignored, a leading "the" optional); a prompt that names no edited subject gets the unedited model,
exactly. A batch with a request that has no subject cannot be routed and is always on. A batch is
trained on top of only the batches it will be served with - those its prompts name a subject of,
and those with a prompt naming one of its subjects, whose prompts it holds - so it holds as served.

What it cannot do: a prompt that refers to an edited subject without naming it (a pronoun, an
alias, a multi-hop question) does not see the edit. Serving the same way needs the router in front
of the model: vLLM takes one LoRA adapter per request (each batch is its own adapter folder).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

from .errors import RequestError
from .requests import EditRequest

T = TypeVar("T")
ROUTING_TABLE = "routing.json"  # of an export for vLLM: its modules, their facts, the vLLM command line


def has_subject(request: EditRequest) -> bool:
    return bool(request.subject and request.subject.strip())


def subject_key(subject: str) -> str:
    """How a subject is matched: case-folded, single-spaced, without a leading article "the"."""
    key = " ".join(subject.casefold().split())
    return key[4:] if key.startswith("the ") and len(key) > 4 else key


def check_routable(requests: Sequence[EditRequest]) -> None:
    """Each request must name its subject in its prompt, or the batch it goes into would never serve it."""
    for r in requests:
        if not has_subject(r):
            raise RequestError(f"routing: subject needs each request's subject, named in its prompt; {r.prompt!r} "
                               "has none (give --subject or a \"subject\" field, or edit unrouted: --routing none)")
        if not SubjectRouter([("new", [r])]).route(r.prompt):
            raise RequestError(f"routing: subject: the prompt {r.prompt!r} does not name its subject "
                               f"{r.subject!r} (matched as {subject_key(r.subject)!r}), so it would never "
                               "be served the edit")


class SubjectRouter:
    """The batches of a profile (in stack order) each prompt is served by."""

    def __init__(self, batches: Sequence[tuple[str, Sequence[EditRequest]]]):
        self.order = [name for name, _ in batches]
        self.always: set[str] = set()
        self.patterns: list[tuple[str, re.Pattern]] = []
        for name, requests in batches:
            keys = {subject_key(r.subject) for r in requests if has_subject(r)}
            if not keys or not all(has_subject(r) for r in requests):
                self.always.add(name)
            if keys:
                alternatives = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
                self.patterns.append((name, re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")))

    def route(self, prompt: str) -> list[str]:
        """The batches `prompt` runs with, in stack order (empty: the unedited model)."""
        text = " ".join(prompt.casefold().split())
        hits = self.always | {name for name, pattern in self.patterns if pattern.search(text)}
        return [name for name in self.order if name in hits]

    def route_all(self, prompts: Sequence[str]) -> list[str]:
        """The batches any of `prompts` runs with, in stack order."""
        hits = {name for p in prompts for name in self.route(p)}
        return [name for name in self.order if name in hits]


def by_route(prompts: Sequence[str], route: Callable[[str], Sequence[str]] | None,
             run: Callable[[list[int], tuple[str, ...] | None], list[T]]) -> list[T]:
    """Call `run(indices, adapters)` once per group of prompts that share a route; results in order.

    `adapters` is None without a router (whatever is active serves every prompt).
    """
    if route is None:
        return run(list(range(len(prompts))), None)
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[tuple(route(prompt))].append(i)
    out: list[T | None] = [None] * len(prompts)
    for names, indices in groups.items():
        for i, value in zip(indices, run(indices, names)):
            out[i] = value
    return out  # type: ignore[return-value]
