"""The active profile: which stored batches are in memory, which serve a prompt, and how.

The one owner of that state. The adapters themselves live in the `Editor` (it owns the model and
its stack); this decides what it holds. An unrouted profile is held whole, folded into one exact
adapter (merged into dense weights once that is cheaper), so a step or a token costs the same
however many edits it holds. A subject-routed profile keeps at most `max_loaded` of its batches in
memory (those used most recently) and loads the others, verified, when a prompt routes to them: a
prompt needs only its own subjects' batches, and peft's cost of switching adapters grows with every
adapter loaded, so a profile of a thousand edits switches as fast as one of a few
(benchmarks/RESULTS.md). How a profile serves is stored with it; a routing asked for that differs
is refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from . import adapters, merged, serving
from .editor import Editor
from .errors import StoreError
from .gate import Gate
from .requests import EditRequest
from .routing import SubjectRouter
from .store import AdapterStore
from .subject_keys import KeyFallback, SubjectKeys


_ROWS = object()  # `name` while the batches in memory serve rows of any profile (`row_adapters`)


class ActiveProfile:
    """What of a store is active on one editor's model."""

    def __init__(self, editor: Editor, store_path: Path, fingerprint: str, asked_routing: str | None = None,
                 fold_stack: bool = True, max_loaded: int = 16):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.editor = editor
        self.store_path = store_path
        self.fingerprint = fingerprint
        self.asked_routing = asked_routing  # a flag or config file's routing: refused where a profile differs
        self.routing = editor.config.routing  # the active profile's, as stored with it
        self.fold_stack = fold_stack
        self.max_loaded = max_loaded
        self.name: str | None = None
        self.batches: list[str] = []  # the active profile's batches, in memory or not
        self.router: SubjectRouter | None = None  # routed profiles only
        self._materialised: tuple[str, ...] = ()  # the batches the adapters in memory add up to (unrouted)
        self._requests_of: dict[str, list[EditRequest]] = {}  # stored batches' requests (batches never change)
        self._last_used: dict[str, int] = {}  # batch -> when it last served (a routed profile unloads the oldest)
        self._checked: set[str] = set()  # routed batches whose files and base model `use` has checked
        self._routers: dict[tuple[str, ...], SubjectRouter] = {}  # by the batches they route (serving many profiles)
        self._slot_of: dict[str, str] = {}  # serving rows: batch -> the slot (adapter) holding it
        self._combined: dict[tuple[str, ...], str] = {}  # routes of several batches -> their concatenated adapter
        self._made = 0  # slots and combined adapters made so far (their names)
        self.keys = SubjectKeys(editor, fingerprint)  # the routers' fallback: subject keys, made once per request

    def _router(self, names: Sequence[str]) -> SubjectRouter:
        batches = [(n, self.requests(n)) for n in names]
        return SubjectRouter(batches, KeyFallback(self.keys, batches))

    def store(self, create: bool = False) -> AdapterStore:
        return AdapterStore(self.store_path, create=create)

    @property
    def routed(self) -> bool:
        return self.routing == "subject"

    def routing_of(self, store: AdapterStore, profile: str) -> str | None:
        """How `profile` is served, as stored with it (None: a new or empty profile)."""
        if not store.exists() or profile not in store.profiles():
            return None
        return self._checked_routing(profile, *store.listing(profile))

    def _checked_routing(self, profile: str, names: list[str], stored: str) -> str | None:
        """The stored routing of a profile holding `names` (None when it holds none); a routing asked for
        that differs is refused, since the numbers and the edits' training assume the stored one."""
        stored = stored if names else None
        if stored is not None and self.asked_routing is not None and self.asked_routing != stored:
            raise StoreError(f"profile {profile!r} is served with routing {stored!r} (stored with it), not "
                             f"{self.asked_routing!r}: leave --routing (and the config's routing) out, or use "
                             f"another profile")
        return stored

    def requests(self, batch: str) -> list[EditRequest]:
        if batch not in self._requests_of:
            self._requests_of[batch] = self.store().requests_of(batch)
        return self._requests_of[batch]

    # ------------------------------------------------------------------ switching profiles

    def use(self, profile: str | None) -> list[str]:
        """Make exactly the batches of `profile` active (None: no edits). Verifies each before loading;
        a routed profile's batches are loaded (and verified) when a prompt first routes to them."""
        store, names, stored = None, [], None
        if profile is not None:  # one read of the manifest: this runs for every request served
            store = self.store()
            names, routing = store.listing(profile)
            stored = self._checked_routing(profile, names, routing)
        self.routing = stored or self.editor.config.routing
        self.batches = list(names)
        if self.routed:
            return self._use_routed(profile, names, store)
        editor = self.editor
        in_memory = adapters.adapter_names(editor.model)
        if tuple(names) != self._materialised or set(in_memory) != set(editor.stack):
            for stale in in_memory:  # rebuild from the verified files
                editor.unload(stale)
            editor.stack = []
            for name in names:
                editor.load(name, store.verify_batch(name, self.fingerprint))
            self._materialised = tuple(names)
        if self.fold_stack:
            editor.fold()
        adapters.set_active(editor.model, editor.stack)
        self._activated(profile, names)
        return names

    def _use_routed(self, profile: str | None, names: list[str], store: AdapterStore | None) -> list[str]:
        """`use` for a routed profile: its router is built from the store's records, and its batches
        are loaded when a prompt routes to them; those in memory that it does not list are unloaded.
        Each batch's files and base model are checked here (its hashes when it is loaded)."""
        for name in names:
            if name not in self._checked:
                store.verify_batch(name, self.fingerprint, hashes=False)
                self._checked.add(name)
        listed = set(names)
        for stale in adapters.adapter_names(self.editor.model):
            if stale not in listed:
                self.editor.unload(stale)
                self._last_used.pop(stale, None)
        in_memory = set(adapters.adapter_names(self.editor.model))
        self.editor.hold([n for n in names if n in in_memory])
        self._materialised = ()  # a routed profile is never folded
        self._activated(profile, names)
        return names

    def as_adapters(self, profile: str) -> list[str]:
        """Make `profile` active with its batches as separate LoRA adapters (for squash and export):
        reloaded where they were merged into dense weights; a routed profile's loaded whole."""
        names = self.use(profile)
        if self.routed:
            self.ensure_loaded(names)
            self.editor.hold(names)
            return list(names)
        if merged.STACK in self.editor.stack:
            fold_stack, self.fold_stack, self._materialised = self.fold_stack, False, ()
            try:
                self.use(profile)
            finally:
                self.fold_stack = fold_stack
        return list(self.editor.stack)

    def _activated(self, profile: str | None, names: Sequence[str]) -> None:
        self.name = profile
        self.router = self._router(names) if names and self.routed else None

    def stored(self, profile: str, name: str, routing: str) -> None:
        """Batch `name`, just trained (in memory, on top) and stored, joins the active `profile`."""
        self.routing = routing
        self.batches = self.store().profile(profile)
        self._checked.add(name)
        self.mark_used([name])
        if not self.routed:
            self._materialised += (name,)
        self._activated(profile, self.batches)

    # ------------------------------------------------------------------ serving prompts

    def route(self, prompt: str) -> list[str]:
        """The active profile's batches that serve `prompt` (all of them without routing)."""
        return self.router.route(prompt) if self.router is not None else list(self.editor.stack)

    @contextmanager
    def serving(self, names: Sequence[str]) -> Iterator[None]:
        """Run with exactly the batches `names` active, loading from the store those not in memory."""
        self.ensure_loaded(names)
        with adapters.only_adapters(self.editor.model, names):
            yield

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Load (verified) the batches of `names` that are not in memory; with routing, then unload the
        least recently used others beyond `max_loaded` (an unrouted profile is always loaded whole)."""
        editor, store = self.editor, None
        for name in names:
            if name != merged.STACK and name not in editor.stack:
                store = store or self.store()
                editor.load(name, store.verify_batch(name, self.fingerprint))
        self.mark_used(names)
        if self.routed:
            wanted = set(names)
            spare = sorted((n for n in editor.stack if n not in wanted), key=lambda n: self._last_used.get(n, 0))
            for name in spare[:max(0, len(editor.stack) - self.max_loaded)]:
                editor.remove(name)
                self._last_used.pop(name, None)
        order = {n: i for i, n in enumerate(self.batches)}
        editor.stack.sort(key=lambda n: order.get(n, len(order)))  # held in the profile's order

    # ------------------------------------------------------------------ serving many profiles at once

    def routes_in(self, profile: str, prompt: str, listing: tuple[list[str], str]) -> list[str] | None:
        """The batches of `profile` that serve `prompt`, without making the profile active; None for an
        unrouted profile with batches (it is served whole, `use`). `listing`: the profile's batches and
        routing as the caller just read them from the store (`AdapterStore.listing`)."""
        names, routing = listing
        routing = self._checked_routing(profile, names, routing)
        if not names:
            return []
        if routing != "subject":
            return None
        for name in names:
            if name not in self._checked:
                self.store().verify_batch(name, self.fingerprint, hashes=False)
                self._checked.add(name)
        key = tuple(names)
        if key not in self._routers:
            if len(self._routers) >= self.max_loaded:
                self._routers.pop(next(iter(self._routers)))
            self._routers[key] = self._router(names)
        return self._routers[key].route(prompt)

    def row_adapters(self, routes: Sequence[Sequence[str]]) -> list[str]:
        """One peft adapter per row serving exactly its route: its batch, the exact concatenation of its
        batches (`serving.combine`, kept for reuse), or peft's "__base__" for none. The rows of one
        batch may route to batches of different profiles. Batches are held in at most `max_loaded`
        slots (adapters named kdpo_slot_N): a batch not in memory takes the least recently used
        slot, its weights copied in (`Editor.refill`), since adding an adapter walks the whole model."""
        from .batching import BASE

        if self.name is not _ROWS:  # from a profile held whole (maybe merged into dense weights): hold nothing
            self.use(None)
            self.routing, self.name, self.batches, self.router = "subject", _ROWS, [], None
            self._slot_of, self._combined = {}, {}
        needed = list(dict.fromkeys(n for route in routes for n in route))
        store = None
        for batch in needed:
            if batch not in self._slot_of:
                store = store or self.store()
                self._slot_of[batch] = self._slot_for(store.verify_batch(batch, self.fingerprint), needed)
        self.mark_used(needed)
        out = []
        for route in map(tuple, routes):
            if len(route) <= 1:
                out.append(self._slot_of[route[0]] if route else BASE)
                continue
            if route not in self._combined:
                self._made += 1
                name = f"kdpo_route_{self._made}"
                if not serving.combine(self.editor.model, [self._slot_of[b] for b in route], name):
                    raise StoreError(f"batches {', '.join(route)} cannot be combined into one adapter to serve "
                                     "a prompt that names subjects of each")
                self._combined[route] = name
            out.append(self._combined[route])
        wanted = {tuple(r) for r in routes}
        for route in [r for r in self._combined if r not in wanted][:max(0, len(self._combined) - self.max_loaded)]:
            self.editor.unload(self._combined.pop(route))  # the oldest combinations these rows do not use
        return out

    def _slot_for(self, folder: Path, needed: Sequence[str]) -> str:
        """A slot holding the batch in `folder`: a new one while fewer than `max_loaded` exist, else the
        least recently used slot whose batch no row needs now, refilled (or reloaded if shapes differ)."""
        spare = [b for b in self._slot_of if b not in needed]
        if len(self._slot_of) < self.max_loaded or not spare:
            self._made += 1
            slot = f"kdpo_slot_{self._made}"
            self.editor.load(slot, folder)
            return slot
        victim = min(spare, key=lambda b: self._last_used.get(b, 0))
        slot = self._slot_of.pop(victim)
        for route in [r for r in self._combined if victim in r]:  # made of the weights about to change
            self.editor.unload(self._combined.pop(route))
        if not self.editor.refill(slot, folder):
            self.editor.unload(slot)
            self.editor.load(slot, folder)
        return slot

    def mark_used(self, names: Sequence[str]) -> None:
        clock = max(self._last_used.values(), default=0)
        for name in names:
            clock += 1
            self._last_used[name] = clock


class ProfileRoutes:
    """The active profile's routing as the evaluation harness takes it (`evaluate.Route`): calling it
    names the batches that serve a prompt; `serve(names)` runs with them, loading any not in memory."""

    def __init__(self, active: ActiveProfile):
        self._active = active

    def __call__(self, prompt: str) -> list[str]:
        return self._active.route(prompt)

    def explain(self, prompt: str) -> list[tuple[str, str]]:
        """Why each batch serves `prompt`: (batch, the subject it names), or the whole unrouted profile."""
        router = self._active.router
        if router is not None:
            return router.explain(prompt)
        return [(name, "unrouted profile: every batch") for name in self._active.batches]

    def serve(self, names: Sequence[str]):
        return self._active.serving(names)

    def gate(self, names: Sequence[str]) -> Gate:
        """The edit gate of the batches `names` (`gate.py`): what their requests may write."""
        active = self._active
        return Gate(active.editor.tokenizer, [r for name in names for r in active.requests(name)])
