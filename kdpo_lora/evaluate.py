"""Evaluation: the standard knowledge-editing metrics, computed in batches.

Metrics (see README for their provenance):
- `rewrite_acc` (EasyEdit): teacher-forced token accuracy of target_new on the edit prompt;
  `edit_success` is the stricter "every target token is the argmax";
- `rephrase_acc`: the same on paraphrases (generalisation);
- `locality`: fraction of answer-position argmax tokens unchanged from the pre-edit model (and
  `locality_<type>` per probe type where a request has several, e.g. KnowEdit's);
- `portability`: teacher-forced token accuracy of each portability probe's answer;
- `gen_efficacy` / `gen_paraphrase`: the greedy generation starts with target_new (no teacher forcing);
- CounterFact `efficacy_score` / `paraphrase_score` / `neighborhood_score`: P(new) > P(true), and
  for neighbours P(true) > P(new), compared as mean per-token log-probs;
- `fluency`: weighted bi/tri-gram entropy (weights 2/3, 4/3, as ROME and EasyEdit) of top-k 5
  samples from the edit prompt (words split on whitespace and punctuation, where they use NLTK).

Every scorer takes an optional `route` (a prompt -> the adapters it runs with; `routing.py`), so a
subject-routed profile is measured the way it is served, through its edit gate (`gate.py`). A route with a `serve(names)` method
(`session.ProfileRoutes`) runs each group of prompts inside it, which loads batches not in memory.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from statistics import harmonic_mean, mean
from typing import Callable, Iterable, Iterator, Sequence

import torch

from . import objectives as obj
from .adapters import only_adapters
from .gate import Gate
from .gate import generate as gated_generate
from .requests import EditRequest
from .routing import by_route

BATCH = 16
Route = Callable[[str], Sequence[str]]  # a prompt -> the adapters it runs with (routing.SubjectRouter.route)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _routed(model, route: Route | None, fn: Callable[..., list], prompts: Sequence[str], *columns: Sequence) -> list:
    """`fn(prompts, *columns, gate=...)` on each group of prompts sharing a route (the columns taken
    alike), with exactly that route's adapters active and its edit gate (`gate.py`; None without
    one); results in the prompts' order."""
    serve = getattr(route, "serve", None) or partial(only_adapters, model)
    gate_of = getattr(route, "gate", None)

    def run(indices: list[int], names: tuple[str, ...] | None) -> list:
        gate = gate_of(names) if names and gate_of is not None else None
        with nullcontext() if names is None else serve(names):
            return fn([prompts[i] for i in indices], *([column[i] for i in indices] for column in columns), gate=gate)
    return by_route(prompts, route, run)


def score_targets(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  route: Route | None = None) -> list[dict]:
    """Per pair: argmax tokens, target tokens, summed and mean log-prob of the target (teacher forced)."""
    return _routed(model, route, partial(_score_targets, model, tokenizer), prompts, targets)


@torch.no_grad()
def _score_targets(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], gate: Gate | None = None) -> list[dict]:
    device = next(model.parameters()).device
    rows = []
    pairs = [obj.tokenize_pair(tokenizer, p, t, max_target_tokens=512) for p, t in zip(prompts, targets)]
    for chunk in _chunks(pairs, BATCH):
        batch = obj.collate([p for p, _ in chunk], [t for _, t in chunk], tokenizer.pad_token_id, device)
        log_probs = obj.target_log_probs(model, batch)
        if gate is not None:
            with only_adapters(model, ()):
                unedited = obj.target_log_probs(model, batch)
            log_probs = gate.choose_teacher_forced(log_probs, unedited, batch.labels, batch.target_mask)
        argmax = log_probs.argmax(-1)
        token_lp = obj.gather(log_probs, batch.labels)
        for i in range(len(chunk)):
            m = batch.target_mask[i]
            lp = token_lp[i][m]
            rows.append({
                "argmax": argmax[i][m].tolist(),
                "target": batch.labels[i][m].tolist(),
                "logprob": float(lp.sum()),
                "mean_logprob": float(lp.mean()),
            })
    return rows


def token_accuracy(row: dict) -> float:
    return mean(a == t for a, t in zip(row["argmax"], row["target"]))


def generation_matches(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                       route: Route | None = None) -> list[bool]:
    """Does the greedy continuation of each prompt start with its target (whitespace-normalised)?"""
    return _routed(model, route, partial(_generation_matches, model, tokenizer), prompts, targets)


@torch.no_grad()
def _generation_matches(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                        gate: Gate | None = None) -> list[bool]:
    device = next(model.parameters()).device
    out: list[bool] = []
    for chunk in _chunks(list(zip(prompts, targets)), BATCH):
        longest = max(len(tokenizer(" " + t, add_special_tokens=False).input_ids) for _, t in chunk)
        encoded = tokenizer([p.rstrip() for p, _ in chunk], return_tensors="pt", padding=True).to(device)
        generated = gated_generate(model, encoded, longest + 2, tokenizer.pad_token_id, gate)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for text, (_, target) in zip(texts, chunk):
            out.append(" ".join(text.split()).startswith(" ".join(target.split())))
    return out


@dataclass
class Probes:
    """Every prompt/answer pair one request is scored on, by kind (the CounterFact `true_*` and
    `new_locality` kinds only where the request has target_true)."""

    edit: list[tuple[str, str]]
    rephrase: list[tuple[str, str]]
    locality: list[tuple[str, str]]
    portability: list[tuple[str, str]]
    true_edit: list[tuple[str, str]]
    true_rephrase: list[tuple[str, str]]
    new_locality: list[tuple[str, str]]

    @classmethod
    def of(cls, request: EditRequest) -> "Probes":
        true = request.target_true
        return cls(
            edit=[(request.prompt, request.target_new)],
            rephrase=[(p, request.target_new) for p in request.rephrase_prompts],
            locality=[(p.prompt, p.answer) for p in request.locality],
            portability=[(p.prompt, p.answer) for p in request.portability],
            true_edit=[(request.prompt, true)] if true else [],
            true_rephrase=[(p, true) for p in request.rephrase_prompts] if true else [],
            new_locality=[(p.prompt, request.target_new) for p in request.locality] if true else [],
        )

    def pairs(self) -> list[tuple[str, str]]:
        """All pairs, kind after kind (the order `split` expects)."""
        return [pair for field in fields(self) for pair in getattr(self, field.name)]

    def split(self, rows: Iterator[dict]) -> dict[str, list[dict]]:
        """The scored rows of `pairs()`, taken from `rows`, back by kind."""
        return {field.name: [next(rows) for _ in getattr(self, field.name)] for field in fields(self)}


def _score_pairs(model, tokenizer, pairs: list[tuple[str, str]], route: Route | None = None) -> list[dict]:
    if not pairs:
        return []
    return score_targets(model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], route)


@torch.no_grad()
def pre_edit_locality(model, tokenizer, requests: Sequence[EditRequest]) -> list[list[list[int]]]:
    """The unedited model's answer-position argmax tokens for every locality probe (computed once)."""
    localities = [Probes.of(r).locality for r in requests]
    with only_adapters(model, ()):
        rows = iter(_score_pairs(model, tokenizer, [pair for pairs in localities for pair in pairs]))
    return [[next(rows)["argmax"] for _ in pairs] for pairs in localities]


@torch.no_grad()
def evaluate_requests(model, tokenizer, requests: Sequence[EditRequest], pre_locality: Sequence[list[list[int]]],
                      generation: bool = True, route: Route | None = None, asking: bool = False) -> list[dict[str, float]]:
    """All metrics of each request on the model as it is now (edits active; with `route`, each
    prompt with the adapters it routes to).

    Every probe of every request is scored in one pass, so a routed profile switches each route's
    adapters on once, not once per probe kind and request (peft's switch walks every adapter of
    every layer: 0.17 s with 21 adapters loaded on SmolLM2, CPU).
    """
    probes = [Probes.of(r) for r in requests]
    rows = iter(_score_pairs(model, tokenizer, [pair for p in probes for pair in p.pairs()], route))
    scored = [p.split(rows) for p in probes]
    matches: Iterator[bool] = iter(())
    if generation:
        prompts = [pair[0] for p in probes for pair in p.edit + p.rephrase]
        targets = [r.target_new for r, p in zip(requests, probes) for _ in p.edit + p.rephrase]
        matches = iter(generation_matches(model, tokenizer, prompts, targets, route))
    rows = [_metrics(r, s, pre, [next(matches) for _ in range(1 + len(r.rephrase_prompts))] if generation else [])
            for r, s, pre in zip(requests, scored, pre_locality)]
    if asking:  # questions through the chat template, long answers, repetition (asking.py)
        from .asking import asking_metrics

        for row, asked in zip(rows, asking_metrics(model, tokenizer, requests, route)):
            row.update(asked)
    return rows


def evaluate_request(model, tokenizer, request: EditRequest, pre_locality: list[list[int]],
                     generation: bool = True, route: Route | None = None) -> dict[str, float]:
    """`evaluate_requests` of one request."""
    return evaluate_requests(model, tokenizer, [request], [pre_locality], generation, route)[0]


def _metrics(request: EditRequest, scored: dict[str, list[dict]], pre_locality: list[list[int]],
             matches: list[bool]) -> dict[str, float]:
    """One request's metrics from its scored probes and generation matches (edit prompt first)."""
    edit = scored["edit"][0]
    result: dict[str, float] = {
        "rewrite_acc": token_accuracy(edit),
        "edit_success": float(edit["argmax"] == edit["target"]),
    }
    rephrase, locality, portability = scored["rephrase"], scored["locality"], scored["portability"]
    if rephrase:
        result["rephrase_acc"] = mean(token_accuracy(r) for r in rephrase)
    if locality:
        result["locality"] = mean(
            mean(a == b for a, b in zip(row["argmax"], pre)) for row, pre in zip(locality, pre_locality)
        )
        kinds = sorted({p.type for p in request.locality if p.type})
        for kind in kinds if len(kinds) > 1 else ():  # e.g. KnowEdit's Relation_Specificity / Forgetfulness
            result[f"locality_{kind}"] = mean(
                mean(a == b for a, b in zip(row["argmax"], pre))
                for row, pre, p in zip(locality, pre_locality, request.locality) if p.type == kind)
    if portability:
        result["portability"] = mean(token_accuracy(r) for r in portability)
        for kind in sorted({p.type for p in request.portability if p.type}):
            rows = [token_accuracy(r) for r, p in zip(portability, request.portability) if p.type == kind]
            result[f"portability_{kind}"] = mean(rows)
    if scored["true_edit"]:  # CounterFact probability comparisons
        true_edit = scored["true_edit"][0]
        result["efficacy_score"] = float(edit["mean_logprob"] > true_edit["mean_logprob"])
        result["efficacy_magnitude"] = math.exp(edit["mean_logprob"]) - math.exp(true_edit["mean_logprob"])
        if rephrase:
            result["paraphrase_score"] = mean(
                float(n["mean_logprob"] > t["mean_logprob"]) for n, t in zip(rephrase, scored["true_rephrase"]))
        if locality:
            result["neighborhood_score"] = mean(
                float(t["mean_logprob"] > n["mean_logprob"]) for t, n in zip(locality, scored["new_locality"]))
    if matches:
        result["gen_efficacy"] = float(matches[0])
        if len(matches) > 1:
            result["gen_paraphrase"] = mean(matches[1:])
    return result


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure of one text: weighted mean of its n-gram entropies (bits)."""
    words = re.findall(r"\w+|[^\w\s]", text)
    entropies = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        entropies.append(entropy * weight)
    return mean(entropies)


def fluency(model, tokenizer, prompts: Sequence[str], samples: int = 2, max_new_tokens: int = 60, seed: int = 0,
            route: Route | None = None) -> float:
    """Mean n-gram entropy of top-k 5 samples: low values mean repetitive, degenerate text."""
    torch.manual_seed(seed)
    texts = _routed(model, route, partial(sample_texts, model, tokenizer, samples=samples,
                                          max_new_tokens=max_new_tokens), prompts)
    return mean(ngram_entropy(t) for group in texts for t in group)


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: Sequence[str], samples: int, max_new_tokens: int,
                 gate: Gate | None = None) -> list[list[str]]:
    """`samples` top-k 5 continuations of each prompt."""
    device = next(model.parameters()).device
    encoded = tokenizer([p.rstrip() for p in prompts for _ in range(samples)], return_tensors="pt",
                        padding=True).to(device)
    out = gated_generate(model, encoded, max_new_tokens, tokenizer.pad_token_id, gate, top_k=5)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the requests that have it, plus the CounterFact harmonic mean."""
    keys = sorted({k for row in rows for k in row})
    summary = {k: mean(row[k] for row in rows if k in row) for k in keys}
    for name, keys in (("cf_score", ("efficacy_score", "paraphrase_score", "neighborhood_score")),
                       ("hmean_success_gen_loc", ("edit_success", "rephrase_acc", "locality"))):
        parts = [summary.get(k) for k in keys]
        if all(p is not None for p in parts):
            summary[name] = harmonic_mean(parts)
    return summary
