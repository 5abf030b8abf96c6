"""Edits confined to the input directions that ordinary text hardly uses (AlphaEdit's null space, for LoRA).

A LoRA update changes a layer's output by B·A·x. If every row of A lies in the span of the
low-variance directions of that layer's inputs over generic text, the update leaves the layer's output
on such text (nearly) unchanged, whatever B learns: the edit has to be written into directions that
the edited prompt uses and unrelated text does not. `Confinement` projects the trained adapter's A
onto that span at the start and after every optimiser step. The bases depend only on the base model and
the text, so they are computed once per model and cached (safetensors) beside the NF4 checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from . import adapters
from .fsutil import atomic_write_bytes, atomic_write_json
from .loading import base_fingerprint, cache_dir


SAMPLES = Path(__file__).resolve().parent / "data" / "samples"
# Wikipedia-style text that no benchmark here edits or scores (CounterFact and zsRE are left out)
GENERIC_FILES = ("knowedit_wikibio_test.jsonl", "knowedit_wiki_recent_train.jsonl",
                 "knowedit_wiki_counterfact_train.jsonl")
# the embedded SmolLM2's own passages at the default settings (what `sampled_texts` would write, sampled
# once here with seed 0), so a fresh install does not spend minutes of CPU sampling them
SHIPPED_TEXTS = Path(__file__).resolve().parent / "data" / "nullspace"


def generic_texts() -> list[str]:
    """Sentences to estimate what "ordinary text" looks like to each layer: the shipped KnowEdit samples'
    passages, prompts with their true answers, and their locality and portability prompts."""
    texts = []
    for name in GENERIC_FILES:
        for line in (SAMPLES / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            texts.append(f"{record['prompt']} {record.get('target_true') or ''}".strip())
            for probe in record.get("locality", []) + record.get("portability", []):
                texts.append(f"{probe['prompt']} {probe.get('answer') or ''}".strip())
    return texts


def sampled_texts(model: torch.nn.Module, tokenizer, count: int, max_new_tokens: int = 128,
                  seed: int = 0, progress: bool = True) -> list[str]:
    """`count` passages the base model writes itself (adapters off), each begun with the first two words
    of a shipped generic text; cached as JSON per base model and settings.

    Ordinary text for that very model with nothing to download. The shipped samples alone (6.6k tokens of
    templated sentences) estimate the low-variance directions badly: on SmolLM2 other text puts 8-15%
    of its input energy into their "1%" basis, 1.5-2% once these passages are added (RESULTS.md 4h).
    """
    if count <= 0:
        return []
    key = json.dumps([base_fingerprint(model), count, max_new_tokens, seed])
    filename = f"texts-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    path = cache_dir() / "nullspace" / filename
    for known in (path, SHIPPED_TEXTS / filename):
        texts = _read_texts(known, count)
        if texts is not None:
            return texts
    firsts = [" ".join(text.split()[:2]) for text in generic_texts()]
    openers = [firsts[(7 * i) % len(firsts)] for i in range(count)]  # a stride: openers from every file
    device = next(model.parameters()).device
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            adapters.only_adapters(model, ()):
        torch.manual_seed(seed)
        for start in tqdm(range(0, count, 16), desc="sampling generic text (once per model)", unit="batch",
                          disable=not progress):
            batch = openers[start:start + 16]
            encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            out = model.generate(**encoded, do_sample=True, temperature=0.8, top_p=0.95,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            texts += [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, texts)
    return texts


def _read_texts(path: Path, count: int) -> list[str] | None:
    """The `count` passages stored at `path`; None where there are none (not sampled yet) or they are damaged."""
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(texts, list) and len(texts) == count and all(isinstance(t, str) for t in texts):
        return texts
    return None


def lora_layers(model: torch.nn.Module, name: str) -> dict[str, LoraLayer]:
    """The modules that hold adapter `name`, by module name."""
    return {path: module for path, module in model.named_modules()
            if isinstance(module, LoraLayer) and name in module.lora_A}


def covariance_bytes(model: torch.nn.Module, name: str) -> int:
    """Bytes of the fp32 d x d input covariances the null space of adapter `name`'s layers needs at once.

    The null space's memory grows with the square of each adapted layer's input width: 0.2 GB on
    SmolLM2-135M, about 19 GiB on Llama-3-8B (d = 14336 for every down-projection).
    """
    return sum(4 * module.in_features ** 2 for module in lora_layers(model, name).values())


FIRST_TOKEN = ("with_rest", "apart", "skip")


def input_covariances(model: torch.nn.Module, tokenizer, texts: Sequence[str], modules: Iterable[str],
                      first_token: str = "with_rest", max_length: int = 128, batch_size: int = 8,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """Uncentred second moment (X^T X / tokens, fp32) of each module's inputs over `texts`, no adapter active.

    The first token of a sequence is the model's attention sink: in some layers its inputs are orders
    of magnitude larger than any other token's (SmolLM2's layer-11 down-projection: over 99.9% of the
    input energy of generic text), so a moment over all tokens (`with_rest`) sees little but it there.
    `skip`: the later tokens only. `apart`: the later tokens' moment plus the first tokens', each
    scaled to unit trace (trace 2; `null_space_basis` keeps at most `energy` of either).
    """
    if first_token not in FIRST_TOKEN:
        raise ValueError(f"first_token: {first_token!r} is not one of {', '.join(FIRST_TOKEN)}")
    wanted = set(modules)
    sums: dict[str, torch.Tensor] = {}
    firsts: dict[str, list[torch.Tensor]] = {}  # the first tokens' inputs themselves: one row per text
    real_tokens: list[torch.Tensor] = []  # the current batch's attention mask: padding is left out

    def record(path: str):
        def hook(module, args):
            mask = real_tokens[-1]
            x = args[0].detach().float()
            if first_token != "with_rest":
                first = torch.zeros_like(mask)
                first[torch.arange(len(mask)), mask.int().argmax(1)] = True
                firsts.setdefault(path, []).append(x[first])
                mask = mask & ~first
            x = x[mask]
            sums[path] = sums[path] + x.T @ x if path in sums else x.T @ x
        return hook

    handles = [m.register_forward_pre_hook(record(p)) for p, m in model.named_modules() if p in wanted]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), adapters.only_adapters(model, ()):
            for start in tqdm(range(0, len(texts), batch_size), desc="estimating the null space (once per model)",
                              unit="batch", disable=not progress):
                encoded = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                                    truncation=True, max_length=max_length).to(device)
                real_tokens.append(encoded.attention_mask.bool())
                model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if first_token == "apart":
        return {path: _unit_trace(later) + _unit_trace(torch.cat(firsts[path]).T @ torch.cat(firsts[path]))
                for path, later in sums.items()}
    count = sum(int(mask.sum()) for mask in real_tokens) - (len(texts) if first_token == "skip" else 0)
    return {path: total / max(count, 1) for path, total in sums.items()}


def _unit_trace(moment: torch.Tensor) -> torch.Tensor:
    return moment / moment.trace().clamp_min(1e-30)


def null_space_basis(covariance: torch.Tensor, energy: float, first_token: str = "with_rest",
                     min_dims: int = 0) -> torch.Tensor:
    """Orthonormal columns spanning the lowest-variance directions that together carry at most `energy`
    (of each part, for an `input_covariances(..., first_token="apart")` moment: half of its trace of 2);
    at least the `min_dims` lowest, whatever they carry."""
    if first_token == "apart":
        energy = energy / 2
    values, vectors = torch.linalg.eigh(covariance.double())  # ascending
    share = torch.cumsum(values.clamp_min(0), 0) / values.clamp_min(0).sum().clamp_min(1e-300)
    return vectors[:, :max(int((share <= energy).sum()), min_dims)].float().contiguous()


def edit_key_moments(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                     bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The second moment of each module's inputs over earlier edits' texts (prompt and answer; the
    attention sink left out), in the coordinates of that module's null-space basis (k x k: small)."""
    moments = input_covariances(model, tokenizer, texts, bases, first_token="skip")
    return {path: bases[path].T @ moment @ bases[path] for path, moment in moments.items()}


def narrowed(basis: torch.Tensor, moment: torch.Tensor, energy: float, min_dims: int) -> torch.Tensor:
    """`basis` less its directions that earlier edits were written through (AlphaEdit's sequential
    form): the part of its span carrying at most `energy` of `moment` (`edit_key_moments`), and at
    least `min_dims` directions, so an edit can still be written."""
    return (basis @ null_space_basis(moment, energy, min_dims=min(min_dims, basis.shape[1]))).contiguous()


def null_space_bases(model: torch.nn.Module, tokenizer, modules: Sequence[str], energy: float,
                     texts: Sequence[str], first_token: str = "with_rest", progress: bool = False) -> dict[str, torch.Tensor]:
    """`null_space_basis` of each module's inputs over `texts`, cached on disk per base model and settings."""
    key = json.dumps([base_fingerprint(model), energy, sorted(modules), list(texts)]
                     + ([first_token] if first_token != "with_rest" else []))
    path = cache_dir() / "nullspace" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    try:
        bases = load_file(path)
        if set(bases) == set(modules):
            return bases
    except (OSError, SafetensorError):
        pass  # not computed yet, or a damaged entry: compute it again
    covariances = input_covariances(model, tokenizer, texts, modules, first_token, progress=progress)
    bases = {module: null_space_basis(covariances[module], energy, first_token) for module in modules}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(bases))
    return bases


class Confinement:
    """Keeps adapter `name`'s A matrices inside the spans of the given bases while it trains.

    Adam runs on each A's coordinates in its basis (A = C·Nᵀ), not on A itself: Adam scales every
    coordinate of the gradient to a step of about the learning rate, and A's gradient lives mostly in
    the directions generic text uses, which the basis leaves out - projecting such a step afterwards
    keeps little of what the edit needed. In coordinates, Adam sees exactly the gradient that counts.
    """

    def __init__(self, model: torch.nn.Module, name: str, bases: dict[str, torch.Tensor], coordinates: bool = True):
        self.coordinates = coordinates
        self.weights = []  # (A, its basis N, its coordinates C), one per module
        for path, module in lora_layers(model, name).items():
            weight = module.lora_A[name].weight
            basis = bases[path].to(weight.device, weight.dtype)
            self.weights.append((weight, basis, torch.nn.Parameter(weight.detach() @ basis)))
        self.write()

    def param_groups(self, params: list[torch.nn.Parameter], learning_rate: float, scale: float = 1.0,
                     matched: bool = False) -> list[dict]:
        """The optimizer's parameter groups: `params`, the confined A's replaced by their coordinates,
        which learn at `scale` times the learning rate - and, `matched`, times sqrt(d/k) per layer.

        Why: an edit's inputs have little energy in the null space (that is what it is), so A must grow
        larger there than an unconfined A to change the output as much, and at the learning rate tuned
        without the null space that takes more steps. `matched` gives Adam's step on A the length it
        has unconfined: Adam moves each coordinate by about the rate, a row of k coordinates by
        ~rate·sqrt(k), an unconfined row of d entries by ~rate·sqrt(d).
        """
        if not self.coordinates:
            return [{"params": params, "lr": learning_rate}]
        confined = {id(weight) for weight, _, _ in self.weights}
        free = [p for p in params if id(p) not in confined]
        groups = [{"params": free, "lr": learning_rate}] if free else []
        for _, basis, coordinates in self.weights:
            layer = math.sqrt(basis.shape[0] / max(basis.shape[1], 1)) if matched else 1.0
            groups.append({"params": [coordinates], "lr": learning_rate * scale * layer})
        return groups

    @torch.no_grad()
    def pull_gradients(self) -> None:
        """Each A's gradient, expressed in its basis (dL/dC = dL/dA · N), for the optimizer's step."""
        if self.coordinates:
            for weight, basis, coordinates in self.weights:
                coordinates.grad = weight.grad @ basis if weight.grad is not None else None
                weight.grad = None  # the optimizer does not hold A, so it would never clear it

    @torch.no_grad()
    def write(self) -> None:
        """Each A from its coordinates (or, projecting, A's own step brought back into the span)."""
        for weight, basis, coordinates in self.weights:
            if not self.coordinates:
                coordinates.copy_(weight @ basis)
            weight.copy_(coordinates @ basis.T)
