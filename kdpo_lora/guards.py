"""Guards: places in ordinary text where an edit's own tokens are at stake, held at the unedited answers.

An edit moves two kinds of token: its target tokens up, and the tokens the model wrote there before
(KDPO's negatives) down. Those moves can leak: after an edit whose negative is " the", a neighbour of
another relation whose unedited answer is " the" by a near-tie can flip - which no subject swap of
the edit's own relation covers. A guard is a prefix of generic text whose unedited next token is one
of the tokens the edit pushes down, or whose runner-up is one it pulls up, with the narrowest lead
first: the places such a leak would flip. Held at the unedited model's answers like anchors.

Opt-in, and measured off (RESULTS.md 4p): only a quarter of the neighbours that later edits flip
involve the edit's own tokens, and 16 guards per edit lowered locality over 40 edits.

The pool is the null space's generic text (nullspace.py), cut into short windows and scored once per
model with every adapter off (cached on disk): each position keeps its top `TOP` tokens and their log-probs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from . import adapters
from . import objectives as obj
from .fsutil import atomic_write_bytes
from .loading import base_fingerprint, cache_dir

WINDOW = 32  # tokens per window: a guard's prompt is at most this long
TOP = 5  # tokens kept per position: a pulled-up token counts where it is among them
MIN_CONTEXT = 4  # a guard's prompt has at least this many tokens


@dataclass
class GuardPool:
    """Windows of generic text [W, WINDOW] (padded with -1) and, per position, the unedited top tokens."""

    windows: torch.Tensor  # [W, WINDOW] token ids, -1 past a window's end
    top_ids: torch.Tensor  # [W, WINDOW, TOP]
    top_log_probs: torch.Tensor  # [W, WINDOW, TOP]

    def pick(self, pushed_down: Iterable[int], pulled_up: Iterable[int], count: int) -> list[list[int]]:
        """The `count` prompts (token ids) where the unedited answer is a pushed-down token, or a
        pulled-up token is among the top ones, with the narrowest lead over it first."""
        if count <= 0:
            return []
        down = torch.tensor(sorted(set(pushed_down)), dtype=torch.long)
        up = torch.tensor(sorted(set(pulled_up)), dtype=torch.long)
        lead = torch.full(self.top_ids.shape[:2], float("inf"))
        best, runner = self.top_log_probs[..., 0], self.top_log_probs[..., 1]
        if len(down):
            lead = torch.where(torch.isin(self.top_ids[..., 0], down), best - runner, lead)
        if len(up):
            rivals = torch.isin(self.top_ids[..., 1:], up)
            gaps = torch.where(rivals, best.unsqueeze(-1) - self.top_log_probs[..., 1:], float("inf")).amin(-1)
            lead = torch.minimum(lead, gaps)
        lead[:, : MIN_CONTEXT - 1] = float("inf")
        lead[self.windows < 0] = float("inf")
        lead = lead.flatten()
        picked: list[list[int]] = []
        for i in lead.argsort().tolist():  # the same text can occur twice: each prompt once
            if len(picked) == count or not lead[i].isfinite():
                break
            prompt = self.windows[i // WINDOW, : i % WINDOW + 1].tolist()
            if prompt not in picked:
                picked.append(prompt)
        return picked


def guard_pool(model: torch.nn.Module, tokenizer, texts: Sequence[str], progress: bool = True) -> GuardPool:
    """`score_pool`, cached on disk per base model and texts (it takes minutes on a CPU)."""
    key = json.dumps([base_fingerprint(model), WINDOW, TOP, list(texts)])
    path = cache_dir() / "guards" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    try:
        return GuardPool(**load_file(path))
    except (OSError, SafetensorError, TypeError):
        pass  # not scored yet, or a damaged entry: score it again
    pool = score_pool(model, tokenizer, texts, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(asdict(pool)))
    return pool


def score_pool(model: torch.nn.Module, tokenizer, texts: Sequence[str], progress: bool = True) -> GuardPool:
    """Score `texts`, cut into windows of WINDOW tokens, with every adapter off."""
    device = next(model.parameters()).device
    windows: list[torch.Tensor] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        windows += [torch.tensor(ids[i:i + WINDOW]) for i in range(0, len(ids) - MIN_CONTEXT, WINDOW)]
    top_ids = torch.zeros((len(windows), WINDOW, TOP), dtype=torch.long)
    top_log_probs = torch.full((len(windows), WINDOW, TOP), -float("inf"))
    with torch.no_grad(), adapters.only_adapters(model, ()):
        for start in tqdm(range(0, len(windows), 64), desc="scoring the guards' text (once per model)",
                          unit="batch", disable=not progress, leave=False):
            chunk = [w.to(device) for w in windows[start:start + 64]]
            scored = obj.sequence_log_probs(model, chunk, [torch.arange(len(w), device=device) for w in chunk])
            for i, log_probs in enumerate(scored, start):
                top = log_probs.topk(TOP, dim=-1)
                top_ids[i, : len(log_probs)] = top.indices.cpu()
                top_log_probs[i, : len(log_probs)] = top.values.cpu()
    padded = torch.full((len(windows), WINDOW), -1, dtype=torch.long)
    for i, w in enumerate(windows):
        padded[i, : len(w)] = w
    return GuardPool(padded, top_ids, top_log_probs)
