"""Subject routing: a prompt is served by only the edit batches whose subjects it names.

Stacked LoRA edits all act on every prompt, and after many edits their small unrelated changes add
up on prompts no edit was about (benchmarks/notes, 4o-4q). With `routing: subject`, each prompt runs
with just the batches holding a request whose subject - or one of its `aliases` - it names (whole
words, case, spacing, accents and the punctuation between its words ignored, a leading "the"
optional, not inside a longer name: "Paris" is not named in "Paris Hilton"), and in the other forms
of `name_patterns` (words run together, a club without its "F.C.", a person with middle names added
or dropped, a short or full given name, an initial or a title: "Michael Jeffrey Jordan", "President
Biden"); a prompt that names no edited subject gets the unedited model, unless a key routes it
(below). A batch with a request that has no subject cannot be routed and is always on. A batch is
trained on top of only the batches it will be served with - those its prompts name a subject of,
and those with a prompt naming one of its subjects, whose prompts it holds - so it holds as served.

A prompt that names no edited subject may still reach one through its key (`subject_keys.py`): the
unedited model's hidden state near the subject's, past a threshold calibrated on unrelated prompts.
What it cannot do: a pronoun, or a name the model itself does not tie to the subject. Serving needs
the router in front of the model (`kdpo-lora serve`, or `serve --upstream` in front of vLLM, which
has no model at hand for keys).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from .errors import RequestError
from .requests import EditRequest

if TYPE_CHECKING:
    from .subject_keys import KeyFallback

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
_CAPITALISED = r"(?-i:[A-Z])[\w.'’-]*"
_QUOTED = rf"[\"“']?{_CAPITALISED}[\"”']?"  # a middle name, or a nickname in quotes: Clinton "Clint" Eastwood
_TITLES = r"(?-i:President|Prime\s+Minister|King|Queen|Prince|Princess|Pope|Sir|Dame|Dr|Mr|Mrs|Ms|Senator|Governor|General)"
_PERSON_WORD = re.compile(r"[A-Z][^\W\d_]*(?:['’-][A-Z]?[^\W\d_]+)*\.?")
_GENERATION = re.compile(r"^(\S+\s.+?),?\s+(?:Jr\.?|Sr\.?|II|III|IV)$")  # of a name of two words or more
_SUFFIXES = r"F\.?\s?C\.?|A\.?F\.?C\.?|Inc\.?|Ltd\.?|Corp\.?|Corporation|Company|plc|LLC"  # of a club or company
_CLUB = re.compile(rf"^(.+?),?\s+(?:{_SUFFIXES}|C\.?F\.?|S\.?C\.?)$")
_NOBLE = re.compile(r"^(.+?),\s+(?:(?:\d+(?:st|nd|rd|th)\s+)?(?:Duke|Duchess|Marquis|Marquess|Marchioness|Earl|Count|"
                    r"Countess|Baron|Baroness|Viscount|Viscountess|Lord|Lady)\b|The\s+Queen\s+Mother).*$")
_CLUB_SUFFIX = rf"(?:,?\s+(?:Football\s+Club|Incorporated|Limited|{_SUFFIXES}))?"  # written out or not
_DATA = Path(__file__).resolve().parent / "data"


def _fold(text: str) -> str:
    """`text` without accents, letter for letter ("Félix" -> "Felix"), so match positions stay those of `text`."""
    out = []
    for c in text:
        bare = "".join(ch for ch in unicodedata.normalize("NFKD", c) if not unicodedata.combining(ch))
        out.append(bare if len(bare) == 1 else c)
    return "".join(out)


def _word_lines(file: str) -> list[list[str]]:
    return [line.split() for line in (_DATA / file).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


@lru_cache(maxsize=1)
def _given_names() -> dict[str, frozenset[str]]:
    """Each given name in `given_names.txt` -> the names it shares a line with ("Jim" -> James, Jimmy, Jamie)."""
    same: dict[str, set[str]] = defaultdict(set)
    for names in _word_lines("given_names.txt"):
        for name in names:
            same[name] |= set(names)
    return {name: frozenset(others) for name, others in same.items()}


@lru_cache(maxsize=1)
def _not_person_words() -> frozenset[str]:
    return frozenset(w.casefold() for words in _word_lines("not_person_words.txt") for w in words)


def _given(name: str) -> str:
    """A regex for a given name: itself, or the names it is short for or short of ("Jim" for "James")."""
    names = sorted(_given_names().get(name, {name}) | {name}, key=len, reverse=True)
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def name_patterns(key: str) -> list[tuple[str, str]]:
    """(kind, regex) of the ways a prompt may name `key`: "as" written (accents, case and punctuation
    aside), or "named" otherwise: its words run together ("Srilanka"); a club's or company's name
    without or with its suffix ("Chelsea" for "Chelsea F.C."); a titled name by the name before the
    comma ("Prince Harry" for "Prince Harry, Duke of Sussex"); and a person's name of two to four
    capitalised words with middle names (or a quoted nickname) added or dropped, one given name
    before it, a short or full form or the initial of the first name ("Jim" for "James", "A."), or a
    title before the surname - unless a word says it is no person ("Second Spanish Republic").
    Measured on KnowEdit's alias probes against the false routes on other CounterFact prompts and
    Natural Questions (RESULTS 7)."""
    key = _fold(_words(key))
    words = [w for w in re.split(_JOINT, key) if w]
    found = [("as", _JOINT.join(re.escape(w) for w in words))]
    if len(words) >= 2:
        found.append(("named", rf"(?:{_JOINT})?".join(re.escape(w) for w in words)))
    shorter = [(m.group(1), _CLUB_SUFFIX if rule is _CLUB else "") for rule in (_GENERATION, _CLUB, _NOBLE)
               if (m := rule.match(key)) and len(m.group(1)) >= 4]  # not "Ba" for "Ba F.C."
    for base, suffix in shorter:
        found += [("named", regex + suffix) for _, regex in name_patterns(base)]
    person = key.split()
    if (2 <= len(person) <= 4 and all(_PERSON_WORD.fullmatch(w) for w in person) and not shorter
            and not {w.casefold() for w in person} & _not_person_words()):
        first, last = person[0].rstrip("."), re.escape(person[-1])
        middle = rf"(?:\s+{_QUOTED}){{0,3}}\s+{last}"
        found.append(("named", rf"(?:{_CAPITALISED}\s+)?{_given(first)}{middle}"))
        found.append(("named", rf"{re.escape(first[0])}\.{middle}"))
        found.append(("named", rf"{_TITLES}\.?\s+{last}"))
    return found


class SubjectRouter:
    """The batches of a profile (in stack order) each prompt is served by."""

    def __init__(self, batches: Sequence[tuple[str, Sequence[EditRequest]]], fallback: KeyFallback | None = None):
        self.order = [name for name, _ in batches]
        self.fallback = fallback  # for prompts that name no edited subject (`subject_keys.py`)
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
        in "Where is Big Ben?" (a capitalised word goes on, or comes before it mid-sentence). A prompt
        that names none goes to the fallback, if any: the batches whose subject keys it comes close to."""
        why = {name: "no subject (always on)" for name in self.always}
        folded = _fold(prompt)
        for name, reason, pattern in self.patterns:
            if name in why:
                continue
            for match in pattern.finditer(folded):
                if not _inside_longer_name(folded, match.start(), match.end()):
                    why[name] = reason.format(prompt[match.start():match.end()])
                    break
        if self.fallback is not None and why.keys() <= self.always:
            why.update(self.fallback.explain(prompt))
        return [(name, why[name]) for name in self.order if name in why]

    def route_all(self, prompts: Sequence[str]) -> list[str]:
        """The batches any of `prompts` runs with, in stack order."""
        hits = {name for p in prompts for name in self.route(p)}
        return [name for name in self.order if name in hits]


_NEXT_WORD = re.compile(r"[ \t]+([^\W\d_])")
_INITIAL = re.compile(r"(?<!\w)[A-Z]\.[ \t]*$")  # "O. J. Simpson" is not "J. Simpson"
_PREVIOUS_WORD = re.compile(r"(?:^|(?<=[^\w]))([^\W\d_][\w'-]*)[ \t]+$")


def _inside_longer_name(text: str, start: int, end: int) -> bool:
    """The name text[start:end] continues into a capitalised word, or follows an initial or a
    capitalised word that does not begin a sentence (or a line, as a chat turn does)."""
    following = _NEXT_WORD.match(text, end)
    if following and following.group(1).isupper():
        return True
    before = text[:start]
    if _INITIAL.search(before):
        return True
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
