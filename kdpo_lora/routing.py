"""Subject routing: a prompt is served by only the edit batches whose subjects it names.

Stacked LoRA edits all act on every prompt, and after many edits their small unrelated changes add
up on prompts no edit was about (benchmarks/notes, 4o-4q). With `routing: subject`, each prompt runs
with just the batches holding a request whose subject - or one of its `aliases` - it names (whole
words, case, spacing, accents and the punctuation between its words ignored, a leading "the"
optional, not inside a longer name: "Paris" is not named in "Paris Hilton"); a person's name of two
to four capitalised words is also named with middle names added or left out, one given name before
it, or a title before the surname ("Michael Jeffrey Jordan", "President Biden"); a prompt that names
no edited subject gets the unedited model, exactly. A
batch with a request that has no subject cannot be routed and is always on. A batch is trained on
top of only the batches it will be served with - those its prompts name a subject of, and those
with a prompt naming one of its subjects, whose prompts it holds - so it holds as served.

What it cannot do: a prompt that refers to an edited subject without naming it (a pronoun, a name
not given as an alias, a multi-hop question) does not see the edit (a key from the model's hidden
states was measured and routed too many unrelated prompts: RESULTS 7). Serving needs the router in
front of the model (`kdpo-lora serve`, or `serve --upstream` in front of vLLM).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

from .errors import RequestError
from .requests import EditRequest

T = TypeVar("T")
ROUTING_TABLE = "routing.json"  # of an export for vLLM: its modules, their facts, the vLLM command line


def has_subject(request: EditRequest) -> bool:
    return bool(request.subject and request.subject.strip())


def _words(subject: str) -> str:
    """A subject as the router matches it (any case): single-spaced, without a leading "the"."""
    words = " ".join(subject.split())
    return words[4:] if words[:4].lower() == "the " and len(words) > 4 else words


def check_routable(requests: Sequence[EditRequest]) -> None:
    """Each request must name its subject in its prompt, or the batch it goes into would never serve it."""
    for r in requests:
        if not has_subject(r):
            raise RequestError(f"routing: subject needs each request's subject, named in its prompt; {r.prompt!r} "
                               "has none (give --subject or a \"subject\" field, or edit unrouted: --routing none)")
        if not SubjectRouter([("new", [r])]).route(r.prompt):
            raise RequestError(f"routing: subject: the prompt {r.prompt!r} does not name its subject "
                               f"{r.subject!r} (matched as {_words(r.subject)!r}, any case, as a whole name), so it would never "
                               "be served the edit")


_JOINT = r"[\s\-\u2010-\u2014,.()]+"  # what may stand between a name's words: "Auger-Aliassime", "Dead (season 10)"
_CAPITALISED = r"(?-i:[A-Z])[\w.]*"
_TITLES = r"(?-i:President|Prime\s+Minister|King|Queen|Prince|Princess|Pope|Sir|Dame|Dr|Mr|Mrs|Ms|Senator|Governor|General)"


def _fold(text: str) -> str:
    """`text` without accents, letter for letter ("Félix" -> "Felix"), so match positions stay those of `text`."""
    out = []
    for c in text:
        bare = "".join(ch for ch in unicodedata.normalize("NFKD", c) if not unicodedata.combining(ch))
        out.append(bare if len(bare) == 1 else c)
    return "".join(out)


def name_patterns(key: str) -> list[tuple[str, str]]:
    """(kind, regex) of the ways a prompt may name `key`: as written, and for a person's name (two to
    four capitalised words) with middle names added or dropped, one given name before it, or a title
    before the surname. Measured on KnowEdit's alias probes and CounterFact's neighbours (RESULTS 7)."""
    words = [w for w in re.split(_JOINT, _fold(_words(key))) if w]
    found = [("as", _JOINT.join(re.escape(w) for w in words))]
    if 2 <= len(words) <= 4 and all(w[0].isupper() and w.isalpha() for w in words):
        first, last = re.escape(words[0]), re.escape(words[-1])
        found.append(("named", rf"(?:{_CAPITALISED}\s+)?{first}(?:\s+{_CAPITALISED}){{0,3}}\s+{last}"))
        found.append(("named", rf"{_TITLES}\.?\s+{last}"))
    return found


class SubjectRouter:
    """The batches of a profile (in stack order) each prompt is served by."""

    def __init__(self, batches: Sequence[tuple[str, Sequence[EditRequest]]]):
        self.order = [name for name, _ in batches]
        self.always: set[str] = set()
        self.patterns: list[tuple[str, str, re.Pattern]] = []  # (batch, why, names): subjects, aliases, then looser
        for name, requests in batches:
            subjects = {_words(r.subject) for r in requests if has_subject(r)}
            if not subjects or not all(has_subject(r) for r in requests):
                self.always.add(name)
            aliases = {_words(a) for r in requests for a in r.aliases} - subjects
            looser = []
            for kind, keys in (("subject", subjects), ("alias", aliases)):
                for key in sorted(keys, key=len, reverse=True):
                    for how, regex in name_patterns(key):
                        why = f"{kind} {{!r}}" if how == "as" else f"{kind} {key!r} named {{!r}}"
                        (self.patterns if how == "as" else looser).append(
                            (name, why, re.compile(rf"(?<!\w)(?:{regex})(?!\w)", re.IGNORECASE)))
            self.patterns += looser

    def route(self, prompt: str) -> list[str]:
        """The batches `prompt` runs with, in stack order (empty: the unedited model)."""
        hits = self.always | {name for name, _ in self.explain(prompt)}
        return [name for name in self.order if name in hits]

    def explain(self, prompt: str) -> list[tuple[str, str]]:
        """Why each routed batch serves `prompt`: (batch, reason), in stack order. A subject counts
        where the prompt names it as a whole name: "Paris" is not named in "Paris Hilton", nor "Ben"
        in "Where is Big Ben?" (a capitalised word goes on, or comes before it mid-sentence)."""
        why = {name: "no subject (always on)" for name in self.always}
        folded = _fold(prompt)
        for name, reason, pattern in self.patterns:
            if name in why:
                continue
            for match in pattern.finditer(folded):
                if not _inside_longer_name(folded, match.start(), match.end()):
                    why[name] = reason.format(prompt[match.start():match.end()])
                    break
        return [(name, why[name]) for name in self.order if name in why]

    def route_all(self, prompts: Sequence[str]) -> list[str]:
        """The batches any of `prompts` runs with, in stack order."""
        hits = {name for p in prompts for name in self.route(p)}
        return [name for name in self.order if name in hits]


_NEXT_WORD = re.compile(r"[ \t]+([^\W\d_])")
_PREVIOUS_WORD = re.compile(r"(?:^|(?<=[^\w]))([^\W\d_][\w'-]*)[ \t]+$")


def _inside_longer_name(text: str, start: int, end: int) -> bool:
    """The name text[start:end] continues into a capitalised word, or follows one that does not
    begin a sentence (or a line, as a chat turn does)."""
    following = _NEXT_WORD.match(text, end)
    if following and following.group(1).isupper():
        return True
    before = text[:start]
    previous = _PREVIOUS_WORD.search(before)
    if not previous or not previous.group(1)[0].isupper():
        return False
    head = before[:previous.start(1)].rstrip(" \t")
    return bool(head) and head[-1] not in ".!?:;\n\"'(" and previous.group(1).lower() not in ("the", "a", "an")


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
