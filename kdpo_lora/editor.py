"""The edit loop: train one LoRA adapter per batch of requests with KDPO (or a baseline).

Cycles x steps, as in the authors' code: each cycle regenerates the negative from the current
model and looks up its reference log-probs (the reference - the model with the trained adapter
switched off - does not change during a batch, so its distribution at the target positions is
computed once; while the new adapter is still a no-op, the first training pass is that reference);
then up to `steps_per_cycle` Adam steps. A row stops contributing once every target token is the
teacher-forced argmax; the batch stops when every row has. A fresh optimizer per batch.

With `independent` (the default), a batch trained on top of earlier ones is then checked with them
switched off and, where it does not hold alone, topped up against the base model (and, if that
disturbed it, on the stack once more): each stored batch works without the batches below it, so
rolling one back leaves the others intact. With `trim_margin`, the trained update is finally scaled
down to the smallest factor at which the batch still holds by that margin.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import adapters
from . import objectives as obj
from .config import EditConfig
from .nullspace import (Confinement, covariance_bytes, edit_key_moments, generic_texts, lora_layers, narrowed,
                        null_space_bases, sampled_texts)
from .guards import GuardPool, guard_pool
from .prefix import frozen_prefix
from .errors import KdpoWarning, NumericalError, RequestError
from .requests import EditRequest, check_batch


@dataclass
class RequestResult:
    """How one request fared: token accuracy of the target under teacher forcing, before and after."""

    prompt: str
    target_new: str
    pre_accuracy: float
    accuracy: float
    success: bool
    skipped: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BatchResult:
    adapter: str
    config: EditConfig
    results: list[RequestResult]
    cycles: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    scale: float = 1.0  # what `trim_margin` scaled the trained update by (1: untrimmed)

    @property
    def success_rate(self) -> float:
        return sum(r.success for r in self.results) / max(1, len(self.results))


SUBJECTS_FILE = Path(__file__).resolve().parent / "data" / "preservation_subjects.txt"
PREFIXES_FILE = Path(__file__).resolve().parent / "data" / "context_prefixes.txt"


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


@dataclass
class Preservation:
    """Prompts whose next-token distribution must not move, and the reference's distribution on them.

    The first `own` rows (subject swaps, replayed facts) keep the answers of the stack below the
    trained batch; the rest (anchors) keep the unedited model's.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    own: int
    own_reference: torch.Tensor | None = None
    anchor_reference: torch.Tensor | None = None

    @property
    def reference(self) -> torch.Tensor:
        parts = [t for t in (self.own_reference, self.anchor_reference) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # read at every step: no copy when one part


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


def new_adapter_name() -> str:
    return "edit-" + time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


class Editor:
    """Edits one base model; earlier edit adapters stay loaded, frozen and active (`stack`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EditConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EditConfig()
        self.stack: list[str] = []
        self.cache_prefix = True  # see prefix.py; off only to compare against
        self._null_bases: dict[tuple[str, float, int, str], torch.Tensor] = {}  # see nullspace.py
        self._null_space_refused = False  # the notice that the null space is too large is given once
        self._edit_keys: dict[tuple, tuple[tuple[str, ...], dict]] = {}  # see _edit_key_moments
        self._guard_pools: dict[int, GuardPool] = {}  # by null_space_samples (guards.py); scored on first use

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ encoding

    def encode(self, prompts: Sequence[str], targets: Sequence[str], max_target_tokens: int,
               requests: int | None = None) -> obj.TargetBatch:
        """Rows as one padded batch; an error names request i % `requests` (all rows by default)."""
        pairs = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            try:
                pairs.append(obj.tokenize_pair(self.tokenizer, prompt, target, max_target_tokens, self.max_length))
            except RequestError as err:
                where = "" if requests is None or i < requests else " (after a context prefix)"
                raise RequestError(f"request {i % (requests or len(prompts))}{where}: {err}") from None
        return obj.collate([p for p, _ in pairs], [t for _, t in pairs], self.tokenizer.pad_token_id, self.device)

    # ------------------------------------------------------------------ the loop

    def edit(self, requests: Sequence[EditRequest], name: str | None = None, config: EditConfig | None = None,
             progress: bool = True, replay: Sequence[str] = (), anchors: Sequence[str] = (),
             protect: dict[str, Sequence[str]] | None = None, below: Sequence[str] | None = None) -> BatchResult:
        """Train one new adapter that writes every request; it joins the active stack when done.

        `below`: the batches of the stack it is trained on top of (default: all; with subject
        routing, those its prompts will be served with).

        `replay`: prompts of facts edited earlier, whose answers (as the earlier stack gives them) are
        preserved like the subject-swapped prompts while training on top of the stack. `anchors`:
        prompts (the subject swaps of earlier facts) held at the *unedited* model's answers, so that
        drift left by earlier batches is pulled back rather than preserved. Raises `RequestError` if
        the model already satisfies every request (nothing to edit), and `NumericalError` (removing
        the half-trained adapter) on a NaN/inf loss or gradient.
        """
        cfg = config or self.config
        requests = list(requests)
        check_batch(requests)
        name = name or new_adapter_name()
        n = len(requests)  # the first n rows are the requests as given; the rest, the same after a context
        rows = with_context(requests, cfg.context_prefixes, cfg.seed)
        batch = self.encode([p for p, _ in rows], [t for _, t in rows], cfg.max_target_tokens, n)
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()

        lora = adapters.lora_config(cfg, self.model.config.num_hidden_layers)
        self.model = adapters.add_adapter(self.model, name, lora)
        earlier = list(self.stack if below is None else below)
        adapters.set_active(self.model, earlier + [name], trainable=name)
        layers = lora.layers_to_transform
        try:
            confine = self._confinement(name, cfg, progress, protect or {}, requests)
            # nothing below the first adapted layer changes while this batch trains: run it once per input
            with frozen_prefix(self.model, min(layers) if self.cache_prefix and layers else 0):
                guards = self._guards(batch, cfg, n, progress)
                preserve = self._preservation(requests, cfg, earlier, replay, anchors, fresh=True, guards=guards)
                first = self._forward(batch, preserve)  # with grad: it is also the first training step's pass
                if preserve is not None:  # the new adapter is still a no-op (B = 0): this pass gives the answers
                    preserve.own_reference = first[1][:preserve.own].detach()
                pre_log_probs = first[0].detach()
                pre_accuracy = obj.token_accuracy(pre_log_probs, batch.labels, batch.target_mask)
                todo = ~obj.solved_rows(pre_log_probs, batch.labels, batch.target_mask, cfg.margin)[:n]
                if not todo.any():
                    raise RequestError("the model already gives every target; nothing to edit")
                cycles = steps = 0
                losses: list[float] = []
                # on top of the stack first; `independent`: then make sure the batch also holds with the
                # batches below it switched off (so rolling one of them back cannot break it), topping up
                # against the base if not, and finally on the stack again if that top-up disturbed it
                phases = [earlier, [], earlier] if cfg.independent and earlier else [earlier]
                for phase, below in enumerate(phases):
                    adapters.set_active(self.model, below + [name], trainable=name)
                    if phase > 0:
                        if self._solved(batch, cfg.margin):
                            continue
                        preserve = self._preservation(requests, cfg, below, replay, anchors, guards=guards)
                    c, s, l = self._train(batch, cfg, name, below, progress, preserve,
                                          first if phase == 0 else None, confine)
                    cycles, steps, losses = cycles + c, steps + s, losses + l
                scale = self._trim(batch, cfg.trim_margin, name, phases[:2]) if cfg.trim_margin > 0 else 1.0
                with torch.no_grad():
                    post = obj.target_log_probs(self.model, batch)
        except BaseException:
            self.model = adapters.delete_adapter(self.model, name)
            adapters.set_active(self.model, self.stack)
            raise
        accuracy = obj.token_accuracy(post, batch.labels, batch.target_mask)
        success = obj.solved_rows(post, batch.labels, batch.target_mask)
        self.stack.append(name)
        adapters.set_active(self.model, self.stack)
        results = [
            RequestResult(r.prompt, r.target_new, float(pre_accuracy[i]), float(accuracy[i]), bool(success[i]),
                          skipped=not bool(todo[i]))
            for i, r in enumerate(requests)
        ]
        return BatchResult(name, cfg, results, cycles, steps, time.perf_counter() - started, losses, scale)

    def _solved(self, batch: obj.TargetBatch, margin: float) -> bool:
        with torch.no_grad():
            log_probs = obj.target_log_probs(self.model, batch)
        return bool(obj.solved_rows(log_probs, batch.labels, batch.target_mask, margin).all())

    def _trim(self, batch: obj.TargetBatch, margin: float, name: str, stacks: list[list[str]]) -> float:
        """Scale the trained batch `name` down to the smallest factor (to 1/64) at which every target token
        still leads its runner-up by `margin` with each of `stacks` (adapter lists) below it.

        Training stops a step past the point where the targets hold, and later on a stack the phases
        overshoot further; what the update adds beyond the margin moves unrelated text too, and over many
        stacked edits those small moves flip the near-tied answers locality counts (RESULTS.md 4o). As
        measured, only a margin below the training one buys locality, and it costs paraphrases (4q).
        Returns the factor; 1.0 (untouched) where the batch does not reach `margin` as trained.
        """
        weights = adapters.lora_b_weights(self.model, name)
        trained = [w.detach().clone() for w in weights]

        def holds(scale: float) -> bool:
            with torch.no_grad():
                for weight, full in zip(weights, trained):
                    weight.copy_(full * scale)
            for below in stacks:
                adapters.set_active(self.model, below + [name])
                if not self._solved(batch, margin):
                    return False
            return True

        low, high = 0.0, 1.0
        if holds(high):
            for _ in range(6):
                middle = (low + high) / 2
                low, high = (low, middle) if holds(middle) else (middle, high)
        holds(high)
        adapters.set_active(self.model, stacks[0] + [name])
        return high

    def _preservation(self, requests: Sequence[EditRequest], cfg: EditConfig, below: list[str],
                      replay: Sequence[str] = (), anchors: Sequence[str] = (), fresh: bool = False,
                      guards: Sequence[Sequence[int]] = ()) -> Preservation | None:
        """Prompts whose next-token answers must not move, and those answers, fixed per phase.

        Subject-swapped and replayed prompts keep their answers with only `below` active (the swaps
        the unedited model's with `preserve_reference: base`); anchors and guards (token ids, see
        guards.py) keep the unedited model's. `fresh`: the trained adapter is still a no-op, so the
        edit's first pass gives the subject-swapped and replayed prompts' answers; they are not computed here.
        """
        if cfg.preserve_weight <= 0:
            return None
        if not below:  # trained alone: no earlier facts are active, and the unedited model is the reference
            replay, anchors = (), ()
        edited = {r.key for r in requests}
        swaps, anchors = preservation_prompts(requests, cfg.preserve_prompts, cfg.seed), list(anchors)
        if cfg.preserve_reference == "base" and below:  # held where the unedited model has them, like anchors
            swaps, anchors = [], swaps + anchors
        prompts = swaps + [p for p in replay if " ".join(p.split()).lower() not in edited]
        if not prompts and not anchors and not guards:
            return None
        rows = [self.tokenizer(p.rstrip()).input_ids for p in prompts + anchors] + [list(g) for g in guards]
        input_ids, attention_mask = obj.left_pad(rows, self.tokenizer.pad_token_id, self.device)
        own = len(prompts)
        preserve = Preservation(input_ids, attention_mask, own)
        with torch.no_grad():
            if own and not fresh:
                with adapters.only_adapters(self.model, below):
                    preserve.own_reference = obj.next_token_log_probs(self.model, preserve.input_ids[:own],
                                                                      preserve.attention_mask[:own])
            if anchors or guards:
                with adapters.only_adapters(self.model, []):
                    preserve.anchor_reference = obj.next_token_log_probs(self.model, preserve.input_ids[own:],
                                                                         preserve.attention_mask[own:])
        return preserve

    def _guards(self, batch: obj.TargetBatch, cfg: EditConfig, requests: int, progress: bool) -> list[list[int]]:
        """`guards` prompts per request (token ids) where the tokens this batch moves are at stake: the
        model's current answers at the target positions (pushed down) and the targets (pulled up)."""
        if cfg.guards <= 0 or cfg.preserve_weight <= 0:
            return []
        pool = self._guard_pools.get(cfg.null_space_samples)
        if pool is None:  # scored on the null space's generic text
            texts = generic_texts() + sampled_texts(self.model, self.tokenizer, cfg.null_space_samples, progress=progress)
            pool = self._guard_pools[cfg.null_space_samples] = guard_pool(self.model, self.tokenizer, texts, progress)
        with torch.no_grad():
            current = obj.target_log_probs(self.model, batch).argmax(-1)
        moved = batch.target_mask & (current != batch.labels)
        return pool.pick(current[moved].tolist(), batch.labels[batch.target_mask].tolist(), cfg.guards * requests)

    def _confinement(self, name: str, cfg: EditConfig, progress: bool, protect: dict[str, Sequence[str]],
                     requests: Sequence[EditRequest]) -> Confinement | None:
        """Adapter `name`'s A matrices held in each layer's null space of generic text (nullspace.py), less
        the directions the `protect`ed batches were written through and (`null_space_protect_swaps`)
        those `requests`' own subject swaps are read through; None when `null_space` is off, or on
        where its covariances would need more than `null_space_max_gb`."""
        if cfg.null_space <= 0:
            return None
        needed = covariance_bytes(self.model, name) / 1024 ** 3
        if needed > cfg.null_space_max_gb:
            if not self._null_space_refused:
                warnings.warn(f"editing without the null space: on this model it needs {needed:.2g} GiB "
                              f"(null_space_max_gb: {cfg.null_space_max_gb:g}); raise that limit to use it anyway",
                              KdpoWarning, stacklevel=3)
                self._null_space_refused = True
            return None
        modules = sorted(lora_layers(self.model, name))
        key = (cfg.null_space, cfg.null_space_samples, cfg.null_space_first_token)
        if any((path, *key) not in self._null_bases for path in modules):
            texts = generic_texts() + sampled_texts(self.model, self.tokenizer, cfg.null_space_samples,
                                                    progress=progress)
            bases = null_space_bases(self.model, self.tokenizer, modules, cfg.null_space, texts,
                                     cfg.null_space_first_token, progress)
            self._null_bases.update({(path, *key): basis for path, basis in bases.items()})
        bases = {path: self._null_bases[path, *key] for path in modules}
        if cfg.null_space_protect_edits > 0 and protect:
            avoided = self._edit_key_moments(protect, bases, (*key, *modules))
            bases = {path: narrowed(basis, avoided[path], cfg.null_space_protect_edits, cfg.lora_rank)
                     for path, basis in bases.items()}
        # the same question about others: the edit's nearest neighbours, where its drift lands first
        swaps = preservation_prompts(requests, cfg.preserve_prompts, cfg.seed) if cfg.null_space_protect_swaps > 0 else []
        if swaps:
            avoided = edit_key_moments(self.model, self.tokenizer, swaps, bases)
            bases = {path: narrowed(basis, avoided[path], cfg.null_space_protect_swaps, cfg.lora_rank)
                     for path, basis in bases.items()}
        return Confinement(self.model, name, bases, coordinates=cfg.null_space_coordinates)

    def _edit_key_moments(self, protect: dict[str, Sequence[str]], bases: dict[str, torch.Tensor],
                          key: tuple) -> dict[str, torch.Tensor]:
        """The sum over the `protect`ed batches of their facts' key moments (each batch's averaged over
        its tokens). Kept as one running sum: a profile that only grew since the last edit costs the new
        batches' texts alone; after a rollback or a switch of profile it is summed afresh."""
        names = tuple(protect)
        done, sums = self._edit_keys.get(key, ((), None))
        if names[:len(done)] != done:
            done, sums = (), None
        for batch in names[len(done):]:
            moments = edit_key_moments(self.model, self.tokenizer, list(protect[batch]), bases)
            sums = moments if sums is None else {path: sums[path] + moments[path] for path in sums}
        self._edit_keys[key] = (names, sums)
        return sums

    def _train(self, batch: obj.TargetBatch, cfg: EditConfig, name: str,
               below: list[str], progress: bool, preserve: Preservation | None = None,
               first: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               confine: Confinement | None = None) -> tuple[int, int, list[float]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = (confine.param_groups(params, cfg.learning_rate, cfg.null_space_lr_scale,
                                        cfg.null_space_lr_matched) if confine
                  else [{"params": params, "lr": cfg.learning_rate}])
        optimizer = torch.optim.Adam(groups)
        # every row is checked, also one the model gave before the batch (it is skipped, not trained, unless
        # the other rows' training breaks it: then it takes part from the next cycle on)
        mask = batch.target_mask
        losses: list[float] = []
        steps = 0
        bar = tqdm(range(cfg.cycles), desc=f"editing {name}", disable=not progress, leave=False)
        cycles_run = 0
        # the reference's log-probs at the target positions do not change while this batch trains; in
        # the first phase the pass edit() made before any step (new adapter a no-op) already is it
        reference_log_probs = None  # SFT has no reference
        if cfg.method != "sft":
            if first is not None:
                reference_log_probs = first[0].detach()
            else:
                with torch.no_grad(), adapters.only_adapters(self.model, below):
                    reference_log_probs = obj.target_log_probs(self.model, batch)
        for cycle in bar:
            # the pass edit() already made, before any step, serves as the first cycle's
            log_probs, kept = first if cycle == 0 and first is not None else self._forward(batch, preserve)
            rows_left = ~obj.solved_rows(log_probs, batch.labels, mask, cfg.margin)
            if not rows_left.any():
                break
            cycles_run += 1
            cycle_mask = mask & rows_left.unsqueeze(-1)
            negatives = self._negatives(log_probs, batch, cfg)
            reference = self._reference(batch, negatives, cfg, reference_log_probs, below)
            solved = False
            for step in range(cfg.steps_per_cycle):
                if step > 0:
                    log_probs, kept = self._forward(batch, preserve)
                    solved = bool(obj.solved_rows(log_probs, batch.labels, mask, cfg.margin).all())
                    if solved:  # every target token is the argmax: stop at once, not at the cycle's end
                        break
                loss = self._loss(log_probs, batch, negatives, cycle_mask, reference, cfg, preserve, kept)
                value = loss.detach().item()
                if not math.isfinite(value):
                    raise NumericalError(f"the loss became {value} in cycle {cycle + 1}; no adapter was written "
                                         f"(lower the learning rate)")
                losses.append(value)
                if value < cfg.loss_threshold:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                    raise NumericalError(f"a gradient became NaN/inf in cycle {cycle + 1}; no adapter was written")
                if confine is not None:
                    confine.pull_gradients()
                optimizer.step()
                if confine is not None:
                    confine.write()
                steps += 1
            accuracy = obj.token_accuracy(log_probs.detach(), batch.labels, mask).mean()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{float(accuracy):.2f}")
            if solved:
                break
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # frozen from now on: keep no gradient memory
        return cycles_run, steps, losses

    def _negatives(self, log_probs: torch.Tensor, batch: obj.TargetBatch, cfg: EditConfig) -> torch.Tensor | obj.TargetBatch:
        if cfg.method == "dpo":  # free-running greedy continuation of the prompt, scored under its own prefix
            return self._greedy_negative_batch(batch, log_probs, cfg.margin)
        if cfg.method == "kdpo_free":  # the same free-running tokens, but scored under the positive prefix
            free = self._greedy_negative_batch(batch, log_probs, 0.0).labels  # so pushed position by position
            return obj.push_past_margin(free, log_probs, batch.labels, cfg.margin)
        return obj.teacher_forced_negative(log_probs, batch.labels, cfg.margin)

    def _greedy_negative_batch(self, batch: obj.TargetBatch, log_probs: torch.Tensor, margin: float) -> obj.TargetBatch:
        """Each prompt's greedy continuation, as long as its target. One that is the target itself (a
        fixed-length generation never picks end-of-text, or the target leads by less than `margin`)
        shares the target's prefixes, so the teacher-forced negative replaces it, as in KDPO."""
        prompts, lengths = [], []
        for i, plen in enumerate(batch.prompt_lengths):
            row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            prompts.append(row[:plen])
            lengths.append(len(row) - plen)
        generated = []
        with torch.no_grad():
            for prompt, length in zip(prompts, lengths):
                ids = torch.tensor([prompt], device=self.device)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=length,
                                          min_new_tokens=length, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
                generated.append(out[0, len(prompt):].tolist())
        pushed = obj.teacher_forced_negative(log_probs, batch.labels, margin)
        for i, mask in enumerate(batch.target_mask):
            if generated[i] == batch.labels[i][mask].tolist():
                generated[i] = pushed[i][mask].tolist()
        return obj.collate(prompts, generated, self.tokenizer.pad_token_id, self.device)

    def _reference(self, batch: obj.TargetBatch, negatives, cfg: EditConfig, reference_log_probs: torch.Tensor | None,
                   below: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Reference log-probs of y_pos and y_neg (the trained adapter off), once per cycle.

        KDPO scores y_neg under the positive prefix, so both come from the reference's fixed
        distribution at the target positions; standard DPO's y_neg has its own prefix: one more pass.
        """
        if cfg.method == "sft":
            return None
        if cfg.method == "dpo":
            with torch.no_grad(), adapters.only_adapters(self.model, below):
                ref_neg = obj.target_log_probs(self.model, negatives)
            return ((obj.gather(reference_log_probs, batch.labels) * batch.target_mask).sum(-1),
                    (obj.gather(ref_neg, negatives.labels) * negatives.target_mask).sum(-1))
        return obj.gather(reference_log_probs, batch.labels), obj.gather(reference_log_probs, negatives)

    def _forward(self, batch: obj.TargetBatch, preserve: Preservation | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target log-probs, and (in the same pass) the preservation prompts' next-token log-probs."""
        if preserve is None:
            return obj.target_log_probs(self.model, batch), None
        return obj.joint_log_probs(self.model, batch, obj.unpad(preserve.input_ids, preserve.attention_mask))

    def _loss(self, log_probs: torch.Tensor, batch: obj.TargetBatch, negatives, mask: torch.Tensor,
              reference, cfg: EditConfig, preserve: Preservation | None = None,
              kept: torch.Tensor | None = None) -> torch.Tensor:
        loss = self._edit_loss(log_probs, batch, negatives, mask, reference, cfg)
        if preserve is not None:
            loss = loss + cfg.preserve_weight * obj.preservation_kl(kept, preserve.reference)
        return loss

    def _edit_loss(self, log_probs: torch.Tensor, batch: obj.TargetBatch, negatives, mask: torch.Tensor,
                   reference, cfg: EditConfig) -> torch.Tensor:
        rows = mask.any(-1)
        if cfg.method == "sft":
            loss = obj.nll(log_probs, batch.labels, mask)[rows].mean()
        elif cfg.method == "dpo":
            neg_log_probs = obj.target_log_probs(self.model, negatives)
            pos = (obj.gather(log_probs, batch.labels) * batch.target_mask).sum(-1)
            neg = (obj.gather(neg_log_probs, negatives.labels) * negatives.target_mask).sum(-1)
            loss = obj.dpo_margin_loss(pos, neg, reference[0], reference[1], cfg.beta)[rows].mean()
        else:
            per_row, contributing = obj.kdpo_loss(log_probs, batch.labels, negatives, mask, *reference, cfg.beta)
            loss = per_row[contributing].mean()
        if cfg.nll_weight > 0 and cfg.method != "sft":
            loss = loss + cfg.nll_weight * obj.nll(log_probs, batch.labels, mask)[rows].mean()
        return loss

    def remove(self, name: str) -> None:
        """Unload edit adapter `name`; the rest of the stack stays active."""
        self.model = adapters.delete_adapter(self.model, name)
        self.stack.remove(name)
        adapters.set_active(self.model, self.stack)

    # ------------------------------------------------------------------ using the edits

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_edits: bool = True) -> list[str]:
        """Greedy continuations of `prompts`, with the active edits or with none."""
        self.check_prompts(prompts, max_new_tokens)
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, use_edits)

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """Refuse, before computing anything, prompts the model cannot continue by `max_new_tokens`."""
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError("a prompt must be a non-empty string")
            length = len(self.tokenizer(prompt).input_ids)
            if self.max_length is not None and length + max_new_tokens > self.max_length:
                raise RequestError(f"prompt of {length} tokens + {max_new_tokens} new tokens is longer than the "
                                   f"model's context of {self.max_length}")


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
             use_edits: bool = True) -> list[str]:
    """Batched greedy generation; `use_edits=False` switches every adapter off."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    with torch.no_grad(), adapters.only_adapters(model, ()) if not use_edits else nullcontext():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
