"""Batched generation for the server: the requests of many clients decoded together, one row each.

peft runs a different LoRA adapter on each row of a batch (`adapter_names`), so requests to
different profiles and routes share every forward pass; throughput grows with concurrent clients
while each row still sees exactly its own batches. One thread (`Batcher`) owns the model: it
gathers what is waiting, asks its `plan` which rows go together and with which adapters (loading
any batch they need, between passes, never during one), decodes them step by step with a KV
cache, and hands each row its text as it comes. Rows that finish leave the batch at once. A row
served through an edit gate (`gate.py`) has a twin row with the adapters off, fed the same tokens,
so that each step has both distributions for the gate to choose from.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

BASE = "__base__"  # peft's name for "no adapter" on a row


@dataclass
class Row:
    """One request in flight: what to continue and how, and where its text goes."""

    ids: list[int]
    profile: str | None
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    events: "queue.Queue[tuple]" = field(default_factory=queue.Queue)  # ("batches", names), ("text", s), ("end", reason, n) or ("error", exc)
    cancelled: bool = False  # the client went away: drop the row at the next step
    route: list[str] = field(default_factory=list)  # the batches serving it (set by the plan)
    gate: Any = None  # its route's edit gate (`gate.Gate`, set by the plan): decoded beside a twin row
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    twin: "Row | None" = None  # the row decoding it with the adapters off, for the gate
    twin_of: "Row | None" = None  # set on a twin: the row it serves (a twin sends no text)


@dataclass
class Group:
    """Rows decoded together, each with its peft adapter (None: whatever is active serves all)."""

    rows: list[Row]
    adapters: list[str] | None
    joinable: bool = True  # rows that arrive meanwhile may join (not for a profile held whole)


# plan(rows, running): the group to decode now and the rows left waiting; with `running` (the routes of
# rows being decoded with per-row adapters), only rows that can join them, with adapters that keep theirs
Plan = Callable[[list[Row], "list[list[str]] | None"], tuple[Group, list[Row]]]


class _Decoding:
    """The rows being decoded together: their KV cache, attention mask, positions and next input."""

    def __init__(self, rows: list[Row], adapters: list[str] | None, cache, mask, positions, tokens: list[int],
                 joinable: bool):
        self.rows, self.adapters, self.cache, self.mask, self.positions = rows, adapters, cache, mask, positions
        self.joinable = joinable
        self.tokens = tokens  # each row's newest token: the next step's input

    def keep(self, indices: list[int]) -> None:
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.rows = [self.rows[i] for i in indices]
        self.tokens = [self.tokens[i] for i in indices]
        if self.adapters is not None:
            self.adapters = [self.adapters[i] for i in indices]

    def join(self, other: "_Decoding") -> None:
        """Add `other`'s rows: both caches left-padded to one length (the mask hides the padding)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        self.rows, self.tokens = self.rows + other.rows, self.tokens + other.tokens
        if self.adapters is not None or other.adapters is not None:  # the model gained its first adapter
            self.adapters = (self.adapters or [BASE] * (len(self.rows) - len(other.rows))) + (other.adapters or [BASE] * len(other.rows))


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Batcher:
    """The one thread that generates; `submit` from any thread."""

    def __init__(self, model: Callable[[], torch.nn.Module], tokenizer, plan: Plan, eos_ids: set[int],
                 max_rows: int = 32, gather_s: float = 0.01):
        self._model, self.tokenizer, self.plan, self.eos_ids = model, tokenizer, plan, eos_ids
        self.max_rows, self.gather_s = max_rows, gather_s
        self._waiting: list[Row] = []
        self._ready = threading.Condition()
        self.tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        threading.Thread(target=self._loop, name="kdpo-batcher", daemon=True).start()

    def submit(self, row: Row) -> None:
        with self._ready:
            self._waiting.append(row)
            self._ready.notify()

    def _take(self, limit: int, running: list[list[str]] | None) -> Group | None:
        """Plan the waiting rows (at most `limit`); those not taken keep their place in the queue."""
        with self._ready:
            rows, self._waiting = self._waiting[:limit], self._waiting[limit:]
        rows = [r for r in rows if not r.cancelled]
        if not rows:
            return None
        try:
            group, later = self.plan(rows, running)
        except Exception as err:  # noqa: BLE001 - each row's client gets the error
            for row in rows:
                row.events.put(("error", err))
            return None
        with self._ready:
            self._waiting[:0] = later
        return group if group.rows else None

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
            time.sleep(self.gather_s)  # let the clients that are about to send join this batch
            group = self._take(self.max_rows, None)
            if group is None:
                continue
            try:
                self._decode(group)
            except Exception as err:  # noqa: BLE001
                for row in group.rows:
                    if not row.cancelled:
                        row.events.put(("error", err))

    @torch.no_grad()
    def _decode(self, group: Group) -> None:
        """Decode `group` to the end; with per-row adapters, rows that arrive meanwhile join it."""
        model = self._model()
        if model.training:
            model.eval()
        accepts = _forward_arguments(model)
        self._cache_arg = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        running = self._prefill(model, group.rows, group.adapters, group.joinable)
        group.rows.clear()  # from here on, `running` holds them (an error reaches the rows still in it)
        passed_over = 0  # waiting rows that could not join (a profile held whole): not planned again each step
        try:
            while True:
                if running.joinable and len(running.rows) < self.max_rows and len(self._waiting) > passed_over:
                    joining = self._take(self.max_rows - len(running.rows), [r.route for r in running.rows])
                    passed_over = len(self._waiting)
                    if joining is not None:
                        model = self._model()  # loading a first adapter wraps the model in peft
                        running.join(self._prefill(model, joining.rows, joining.adapters, True))
                self._emit_all(running)  # every row's newest token (a row that just joined: its first)
                if not running.rows:
                    return
                self._step(model, running)
        except BaseException:
            group.rows.extend(running.rows)
            raise

    def _forward(self, model, input_ids, mask, positions, cache, adapters):
        extra = {"adapter_names": adapters} if adapters is not None else {}
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{self._cache_arg: cache}, **self._last_only, **extra)
        return out.logits[:, -1, :].float()

    def _prefill(self, model, rows: list[Row], adapters: list[str] | None, joinable: bool) -> _Decoding:
        from transformers import DynamicCache

        device = next(model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if adapters is not None:  # a twin with the adapters off for each gated row
            twins = [Row(r.ids, r.profile, r.prompt, r.max_tokens, twin_of=r) for r in rows if r.gate is not None]
            for twin in twins:
                twin.twin_of.twin = twin
            rows, adapters = rows + twins, adapters + [BASE] * len(twins)
        width = max(len(r.ids) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(model, input_ids, mask, positions, cache, adapters)
        return _Decoding(list(rows), adapters, cache, mask, positions, self._pick_all(logits, rows), joinable)

    def _step(self, model, running: _Decoding) -> None:
        running.mask = torch.cat([running.mask, running.mask.new_ones(len(running.rows), 1)], dim=1)
        running.positions = running.positions[:, -1:] + 1
        step_input = torch.tensor(running.tokens, device=running.mask.device).unsqueeze(1)
        logits = self._forward(model, step_input, running.mask, running.positions, running.cache, running.adapters)
        running.tokens = self._pick_all(logits, running.rows)

    def _pick_all(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """Each row's next token; a gated row's from the distribution its gate chooses, and its twin's the same."""
        tokens = [0] * len(rows)
        where = {id(row): i for i, row in enumerate(rows)}
        for i, row in enumerate(rows):
            if row.twin_of is not None:
                continue
            chosen = logits[i]
            if row.twin is not None:
                chosen = row.gate.choose(logits[i], logits[where[id(row.twin)]], row.generated)
            tokens[i] = self._pick(chosen, row)
            if row.twin is not None:
                tokens[where[id(row.twin)]] = tokens[i]
        return tokens

    def _emit_all(self, running: _Decoding) -> None:
        """Hand each row its newest token's text; rows that finished leave the batch."""
        keep, left = [], set()
        for i, (row, token) in enumerate(zip(running.rows, running.tokens)):
            if row.twin_of is not None:
                continue
            ended = token in self.eos_ids
            if not ended:
                row.generated.append(token)
            reason = self._emit(row, ended)
            if reason is None and not row.cancelled:
                keep.append(i)
            else:
                left.add(id(row))
                if reason is not None:
                    row.events.put(("end", reason, len(row.generated)))
        keep += [i for i, row in enumerate(running.rows) if row.twin_of is not None and id(row.twin_of) not in left]
        keep.sort()
        if len(keep) < len(running.rows):
            running.keep(keep)

    @staticmethod
    def _pick(logits: torch.Tensor, row: Row) -> int:
        if row.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / row.temperature, dim=-1)
        if row.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > row.top_p  # keep the smallest set reaching top_p
            ordered[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, ordered)
        return int(torch.multinomial(probs, 1))

    def _emit(self, row: Row, ended: bool) -> str | None:
        """Send the row's new text; returns why it finished ("stop", "length") or None."""
        with self.tokenizer_lock:
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, row.stop)
        done = ended or stopped or len(row.generated) >= row.max_tokens
        # what is sent is final: hold back half a character and the start of a stop sequence
        ready = text if done else text[:len(text) - _held_back(text, row.stop)]
        if ready[len(row.sent):]:
            row.events.put(("text", ready[len(row.sent):]))
            row.sent = ready
        if not done:
            return None
        return "stop" if ended or stopped else "length"


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of `text` may still change: a half-decoded character, or the
    beginning of a stop sequence."""
    held = 1 if text.endswith("\ufffd") else 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


def _forward_arguments(model: torch.nn.Module) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether one was found."""
    ends = [text.find(s) for s in stop if s and s in text]
    return (text[:min(ends)], True) if ends else (text, False)
