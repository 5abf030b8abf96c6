"""The edit loop: train one LoRA adapter per batch of requests with KDPO (or a baseline).

Cycles x steps, as in the authors' code: each cycle takes the current model's answer as the
negative (`methods.py`) and looks up the reference's log-probs (the reference - the model with the
trained adapter switched off - does not change during a batch, so its distribution at the target
positions is computed once; while the new adapter is still a no-op, the first training pass is that
reference); then up to `steps_per_cycle` Adam steps. A row stops contributing once every target
token is the teacher-forced argmax (by `margin`); the batch stops when every row has - checked after
each step, or once per cycle as the authors do (`stop: cycle`). A fresh optimizer per batch.

With `independent` (the default), a batch trained on top of earlier ones is then checked with them
switched off and, where it does not hold alone, topped up against the base model (and, if that
disturbed it, on the stack once more): each stored batch works without the batches below it, so
rolling one back leaves the others intact.
"""

from __future__ import annotations

import math
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import adapters
from . import objectives as obj
from .config import EditConfig
from .errors import NumericalError, RequestError
from .gate import Gate
from .gate import generate as gated_generate
from .methods import METHODS
from .prefix import frozen_prefix
from .regularisers import Preservation, preservation_prompts, under_aliases, with_context
from .requests import EditRequest, check_batch
from .serving import compact_stack

CONTINUATION = 12  # tokens after each new target held at what the model writes there


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

    @property
    def success_rate(self) -> float:
        return sum(r.success for r in self.results) / max(1, len(self.results))


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ------------------------------------------------------------------ encoding

    def encode(self, prompts: Sequence[str], targets: Sequence[str], owners: Sequence[str] | None = None
               ) -> obj.TargetBatch:
        """Rows as one padded batch; an error names the row's owner (`owners[i]`, default "request i")."""
        pairs = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            try:
                pairs.append(obj.tokenize_pair(self.tokenizer, prompt, target, max_length=self.max_length))
            except RequestError as err:
                raise RequestError(f"{owners[i] if owners else f'request {i}'}: {err}") from None
        return obj.collate([p for p, _ in pairs], [t for _, t in pairs], self.tokenizer.pad_token_id, self.device)

    # ------------------------------------------------------------------ the loop

    def edit(self, requests: Sequence[EditRequest], name: str | None = None, config: EditConfig | None = None,
             progress: bool = True, hold: Sequence[str] = (), below: Sequence[str] | None = None) -> BatchResult:
        """Train one new adapter that writes every request; it joins the active stack when done.

        `below`: the batches of the stack it is trained on top of (default: all; with subject
        routing, those its prompts will be served with). `hold`: earlier prompts it will also be
        served on (routing), kept at their answers like the subject swaps. Raises `RequestError` if
        the model already satisfies every request (nothing to edit), and `NumericalError` (removing
        the half-trained adapter) on a NaN/inf loss or gradient.
        """
        cfg = config or self.config
        requests = list(requests)
        check_batch(requests)
        name = name or new_adapter_name()
        n = len(requests)  # the first n rows are the requests as given; then after contexts, under aliases
        rows = with_context(requests, cfg.context_prefixes, cfg.seed, self.tokenizer)
        owners = [f"request {i % n}" + (" (after a context prefix)" if i >= n else "") for i in range(len(rows))]
        for i, prompt, target in under_aliases(requests):
            rows.append((prompt, target))
            owners.append(f"request {i} (under its alias)")
        batch = self.encode([p for p, _ in rows], [t for _, t in rows], owners)
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()

        lora = adapters.lora_config(cfg, self.model.config.num_hidden_layers)
        self.model = adapters.add_adapter(self.model, name, lora)
        earlier = list(self.stack if below is None else below)
        adapters.set_active(self.model, earlier + [name], trainable=name)
        layers = lora.layers_to_transform
        try:
            # nothing below the first adapted layer changes while this batch trains: run it once per input
            with frozen_prefix(self.model, min(layers) if self.cache_prefix and layers else 0):
                preserve = self.preservation(requests, cfg, earlier, hold, fresh=True)
                first = self._forward(batch, preserve)  # with grad: it is also the first training step's pass
                if preserve is not None:  # the new adapter is still a no-op (B = 0): this pass gives the answers
                    preserve.reference = first[1].detach()
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
                lr = cfg.learning_rate * (cfg.sequential_lr_scale if earlier else 1.0)
                for phase, on in enumerate(phases):
                    adapters.set_active(self.model, on + [name], trainable=name)
                    if phase > 0:
                        if self._solved(batch, cfg.margin):
                            continue
                        preserve = self.preservation(requests, cfg, on, hold)
                    c, s, l = self._train(batch, cfg, lr, name, on, progress, preserve, first if phase == 0 else None)
                    cycles, steps, losses = cycles + c, steps + s, losses + l
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
        return BatchResult(name, cfg, results, cycles, steps, time.perf_counter() - started, losses)

    def _solved(self, batch: obj.TargetBatch, margin: float) -> bool:
        with torch.no_grad():
            log_probs = obj.target_log_probs(self.model, batch)
        return bool(obj.solved_rows(log_probs, batch.labels, batch.target_mask, margin).all())

    def preservation(self, requests: Sequence[EditRequest], cfg: EditConfig, below: list[str],
                      hold: Sequence[str] = (), fresh: bool = False) -> Preservation | None:
        """The subject swaps (and, on top of earlier batches, the `hold` prompts) with their answers as
        the batches `below` give them, and what those batches write after each request's prompt and
        new target (`continuations`). `fresh`: the trained adapter is still a no-op, so the edit's
        first pass gives those answers; they are not computed here."""
        if cfg.preserve_weight <= 0:
            return None
        edited = {r.key for r in requests}
        prompts = preservation_prompts(requests, cfg.preserve_prompts, cfg.seed)
        if below:  # trained alone, no earlier fact is active
            prompts += [p for p in hold if " ".join(p.split()).lower() not in edited]
        sequences = [torch.tensor(self.tokenizer(p.rstrip()).input_ids, device=self.device) for p in prompts]
        keep = [obj.last_position(s) for s in sequences]
        more, more_keep = self.continuations(requests, below)
        preserve = Preservation(sequences + more, keep + more_keep)
        if not fresh:
            with torch.no_grad(), adapters.only_adapters(self.model, below):
                preserve.reference = torch.cat(obj.sequence_log_probs(self.model, preserve.sequences, preserve.keep))
        return preserve

    def continuations(self, requests: Sequence[EditRequest], below: list[str]
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each request's prompt and new target followed by what the model with the batches `below`
        writes next (CONTINUATION tokens, up to its end of text), and the positions that predict
        those tokens. Held there, an edit states its target and goes on as the model would: it does
        not write the target again and again ("Rome, Rome, Rome"; repetition 0.097 -> 0.028, RESULTS 7)."""
        stated = [sum(obj.tokenize_pair(self.tokenizer, r.prompt, r.target_new), []) for r in requests]
        input_ids, attention_mask = obj.left_pad(stated, self.tokenizer.pad_token_id, self.device)
        with torch.no_grad(), adapters.only_adapters(self.model, below):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      max_new_tokens=CONTINUATION, pad_token_id=self.tokenizer.pad_token_id)
        sequences, keep = [], []
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        for ids, row in zip(stated, out[:, input_ids.shape[1]:].tolist()):
            written = []
            for token in row:
                written.append(token)
                if token in ends:
                    break
            sequences.append(torch.tensor(ids + written, device=self.device))
            keep.append(torch.arange(len(ids) - 1, len(ids) - 1 + len(written), device=self.device))
        return sequences, keep

    def _train(self, batch: obj.TargetBatch, cfg: EditConfig, lr: float, name: str, below: list[str],
               progress: bool, preserve: Preservation | None = None,
               first: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[int, int, list[float]]:
        method = METHODS[cfg.method]
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam([{"params": params, "lr": lr}])
        # every row is checked, also one the model gave before the batch (it is skipped, not trained, unless
        # the other rows' training breaks it: then it takes part from the next cycle on)
        mask = batch.target_mask
        losses: list[float] = []
        steps = 0
        bar = tqdm(range(cfg.cycles), desc=f"editing {name}", disable=not progress, leave=False)
        cycles_run = 0
        # the reference's log-probs at the target positions do not change while this batch trains; in
        # the first phase the pass edit() made before any step (new adapter a no-op) already is it
        reference_log_probs = None
        if method.uses_reference:
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
            negatives = method.negatives(self.model, self.tokenizer, log_probs, batch, cfg.margin)
            reference = method.reference(self.model, batch, negatives, reference_log_probs, below)
            solved = False
            for step in range(cfg.steps_per_cycle):
                if step > 0:
                    log_probs, kept = self._forward(batch, preserve)
                    if cfg.stop == "step":
                        solved = bool(obj.solved_rows(log_probs, batch.labels, mask, cfg.margin).all())
                        if solved:  # every target token is the argmax: stop at once, not at the cycle's end
                            break
                loss = method.loss(self.model, log_probs, batch, negatives, cycle_mask, reference, cfg.beta)
                if preserve is not None:
                    loss = loss + cfg.preserve_weight * obj.preservation_kl(kept, preserve.reference)
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
                optimizer.step()
                steps += 1
            accuracy = obj.token_accuracy(log_probs.detach(), batch.labels, mask).mean()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", acc=f"{float(accuracy):.2f}")
            if solved:
                break
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # frozen from now on: keep no gradient memory
        return cycles_run, steps, losses

    def _forward(self, batch: obj.TargetBatch, preserve: Preservation | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target log-probs, and (in the same pass) the preservation prompts' next-token log-probs."""
        if preserve is None:
            return obj.target_log_probs(self.model, batch), None
        return obj.joint_log_probs(self.model, batch, preserve.sequences, preserve.keep)

    # ------------------------------------------------------------------ the adapters in memory (owned here)

    def remove(self, name: str) -> None:
        """Unload edit adapter `name`; the rest of the stack stays active."""
        self.model = adapters.delete_adapter(self.model, name)
        self.stack.remove(name)
        adapters.set_active(self.model, self.stack)

    def load(self, name: str, folder: Path) -> None:
        """Load a verified adapter folder as `name` at the top of the stack (frozen; not yet active)."""
        self.model = adapters.load_adapter(self.model, name, folder)
        self.stack.append(name)

    def refill(self, name: str, folder: Path) -> bool:
        """Put the verified adapter folder's weights into loaded adapter `name` (same LoRA shape), in
        place; False when the shapes differ (nothing changed)."""
        return adapters.refill_adapter(self.model, name, folder)

    def unload(self, name: str) -> None:
        """Drop adapter `name` from memory, in the stack or not (nothing is activated)."""
        self.model = adapters.delete_adapter(self.model, name)
        if name in self.stack:
            self.stack.remove(name)

    def hold(self, names: Sequence[str]) -> None:
        """Make the in-memory adapters `names` the active stack, in that order."""
        self.stack = list(names)
        if self.stack:
            adapters.set_active(self.model, self.stack)

    def fold(self) -> None:
        """Hold the frozen stack as cheaply as it can be held exactly (`serving.compact_stack`)."""
        self.model, self.stack = compact_stack(self.model, self.stack)

    # ------------------------------------------------------------------ using the edits

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 16, use_edits: bool = True,
                 gate: Gate | None = None) -> list[str]:
        """Greedy continuations of `prompts`, with the active edits (through `gate`) or with none."""
        self.check_prompts(prompts, max_new_tokens)
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, use_edits, gate)

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
             use_edits: bool = True, gate: Gate | None = None) -> list[str]:
    """Batched greedy generation; `use_edits=False` switches every adapter off."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    with torch.no_grad(), adapters.only_adapters(model, ()) if not use_edits else nullcontext():
        out = gated_generate(model, encoded, max_new_tokens, tokenizer.pad_token_id, gate if use_edits else None)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
