"""The router's fallback for prompts that name no edited subject: the unedited model's own sense of it.

Each stored request gets a key: the unedited model's hidden state (about half-way up) at the last
token of its subject in its prompt. Each key's threshold is the closest any token of shipped
unrelated prompts comes to it (600 other subjects and the generic sentences, some inside the chat
template), plus `MARGIN`. A prompt that names no edited subject is served by a batch when one of
its tokens comes closer to one of the batch's keys: "Imam Khomeini" reaches an edit about "Ruhollah
Khomeini". Measured with 1000 keys (RESULTS 9): a quarter of KnowEdit's alias probes that name no
subject reach their edit, and 12% of unrelated prompts reach some edit - served through the edit
gate, which keeps 99% of such answers as the unedited model gives them. The adapters are off for
these passes, so a key is the same whatever else is edited; the first prompt that needs the keys
makes them (one short pass per request, the calibration once per process).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import adapters
from .questions import QUESTIONS
from .regularisers import DATA, PREFIXES_FILE, SUBJECTS_FILE, _lines
from .requests import EditRequest

MARGIN = 0.05  # cosine above the closest unrelated token (RESULTS 9)
DEPTH = 0.53  # of the model's layers (16 of SmolLM2's 30): the subject resolved, the sentence not yet answered
BATCH = 32
NAMES_FILE = DATA / "calibration_names.txt"
_CALIBRATIONS: dict[str, torch.Tensor] = {}  # base model fingerprint -> its calibration token states


class SubjectKeys:
    """Keys and thresholds of requests, and the closest key of each prompt, on an editor's model (read
    at each call: peft wraps it when the first adapter is added)."""

    def __init__(self, editor, fingerprint: str):
        self.editor, self.tokenizer, self.fingerprint = editor, editor.tokenizer, fingerprint
        self.layer = max(1, round(editor.model.config.num_hidden_layers * DEPTH))
        self._keys: dict[tuple[str, str], tuple[torch.Tensor, float]] = {}
        self.usable = bool(getattr(editor.tokenizer, "is_fast", False))  # character spans need a fast tokenizer

    @torch.no_grad()
    def _states(self, texts: list[str]) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """Each text's unit-length hidden states at `layer` (first token left out: it draws attention
        whatever it is) with each token's character span, the adapters off. Texts of like length are
        run together, so little is padded."""
        out: list = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        model = self.editor.model
        device = next(model.parameters()).device
        with adapters.only_adapters(model, ()):
            for start in range(0, len(order), BATCH):
                chunk = order[start:start + BATCH]
                encoded = [self.tokenizer(texts[i], return_offsets_mapping=True) for i in chunk]
                width = max(len(e["input_ids"]) for e in encoded)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, e in enumerate(encoded):  # padded on the right: every token keeps its position
                    ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
                    mask[row, :len(e["input_ids"])] = 1
                hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               output_hidden_states=True).hidden_states[self.layer]
                for i, row, e in zip(chunk, hidden, encoded):
                    n = len(e["input_ids"])
                    out[i] = F.normalize(row[1:n].float().cpu(), dim=-1), [tuple(s) for s in e["offset_mapping"][1:n]]
        return out

    def calibration(self) -> torch.Tensor:
        """Every token state of the shipped unrelated prompts, [tokens, hidden] (made once per base model
        in a process: about a thousand short passes)."""
        if self.fingerprint not in _CALIBRATIONS:
            prompts = _unrelated_prompts()
            if getattr(self.tokenizer, "chat_template", None) is not None:
                prompts += [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                               add_generation_prompt=True) for p in prompts[::4]]
            _CALIBRATIONS[self.fingerprint] = torch.cat([states for states, _ in self._states(prompts)])
        return _CALIBRATIONS[self.fingerprint]

    def keys(self, requests: list[EditRequest]) -> list[tuple[torch.Tensor, float]]:
        """(key, threshold) of each request (computed once per subject and prompt)."""
        todo = [r for r in dict.fromkeys(requests) if (r.subject, r.prompt) not in self._keys]
        if todo:
            calibration = self.calibration()
            for r, (states, spans) in zip(todo, self._states([r.prompt for r in todo])):
                end = r.prompt.index(r.subject) + len(r.subject)
                last = max((k for k, (a, _) in enumerate(spans) if a < end), default=None)
                if last is not None:
                    key = states[last]
                    self._keys[(r.subject, r.prompt)] = key, float((calibration @ key).max()) + MARGIN
        return [self._keys[(r.subject, r.prompt)] for r in requests if (r.subject, r.prompt) in self._keys]

    def closest(self, prompt: str, keys: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Each key's best cosine over the prompt's tokens [K], and the token where it was found."""
        (states, spans), = self._states([prompt])
        if not len(states):
            return torch.full((len(keys),), -1.0), [""] * len(keys)
        best, where = (states @ keys.T).max(0)
        return best, [prompt[slice(*spans[i])] for i in where.tolist()]


class KeyFallback:
    """The batches (of one profile) a prompt naming no edited subject reaches through their keys."""

    def __init__(self, keys: SubjectKeys, batches: list[tuple[str, list[EditRequest]]]):
        self._keys, self._batches = keys, batches
        self._owners: list[tuple[str, str]] = []  # per key: (batch, subject)
        self._matrix: torch.Tensor | None = None  # the keys, made when a prompt first needs them

    def _ready(self) -> bool:
        if not self._keys.usable:
            return False
        if self._matrix is None:
            found, thresholds = [], []
            for name, requests in self._batches:
                requests = [r for r in requests if r.subject and r.subject in r.prompt]
                for r, (key, threshold) in zip(requests, self._keys.keys(requests)):
                    self._owners.append((name, r.subject))
                    found.append(key)
                    thresholds.append(threshold)
            self._matrix = torch.stack(found) if found else torch.empty(0)
            self._thresholds = torch.tensor(thresholds)
        return bool(len(self._owners))

    def explain(self, prompt: str) -> dict[str, str]:
        """batch -> why (the closest key of each batch that passes its threshold)."""
        if not self._ready():
            return {}
        best, where = self._keys.closest(prompt, self._matrix)
        why: dict[str, tuple[float, str]] = {}
        for i in torch.nonzero(best > self._thresholds).flatten().tolist():
            name, subject = self._owners[i]
            score = float(best[i])
            if name not in why or score > why[name][0]:
                why[name] = score, (f"key {subject!r} at {where[i].strip()!r} "
                                    f"(cosine {score:.3f} > {float(self._thresholds[i]):.3f})")
        return {name: reason for name, (_, reason) in why.items()}


def _unrelated_prompts() -> list[str]:
    """Relation sentences about the shipped unrelated subjects, each in one of the question table's
    templates, and the shipped generic sentences."""
    subjects = _lines(SUBJECTS_FILE) + _lines(NAMES_FILE)
    templates = sorted(QUESTIONS)
    return [templates[(7 * i) % len(templates)].format(s) for i, s in enumerate(subjects)] + _lines(PREFIXES_FILE)

