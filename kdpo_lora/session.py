"""The Python API: one base model in memory, an adapter store, and edits made, served and undone.

    from kdpo_lora import KnowledgeEditor, EditRequest
    ke = KnowledgeEditor(store="adapters")               # embedded SmolLM2-135M, NF4
    ke.edit([EditRequest("The Eiffel Tower is in the city of", "Rome")])
    ke.generate(["The Eiffel Tower is in the city of"])  # with the default profile's edits
    ke.rollback(batch)                                   # exact undo

The CLI is a thin layer over this class. Swapping profiles loads or unloads adapters only; the base
model is loaded once.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import adapters, merged
from .config import EditConfig, resolve_config
from .editor import BatchResult, Editor, new_adapter_name, preservation_prompts
from .errors import StoreError
from .evaluate import evaluate_request, pre_edit_locality, summarise
from .loading import DEFAULT_MODEL, EMBEDDED_HUB_IDS, LoadedModel, load_model
from .requests import EditRequest
from .serving import compact_stack, export_for_serving, squash
from .store import DEFAULT_PROFILE, AdapterStore, check_name, warn_superseded


class KnowledgeEditor:
    """A base model plus an adapter store; `profile` names which stored edits are active."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, store: str | Path = "adapters",
                 quantization: str = "nf4", device: str | None = None, config: str | Path | None = None,
                 overrides: dict | None = None, fold_stack: bool = True):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, quantization, device)
        self.store_path = Path(store)
        model_type = getattr(self.loaded.model.config, "model_type", None)
        self.editor = Editor(self.loaded.model, self.loaded.tokenizer, resolve_config(model_type, config, overrides))
        self.fingerprint = self.loaded.fingerprint
        self.active_profile: str | None = None
        self.fold_stack = fold_stack
        self._materialised: tuple[str, ...] = ()  # the batches the adapters in memory add up to

    # ------------------------------------------------------------------ plumbing

    @property
    def model(self) -> torch.nn.Module:
        return self.editor.model

    @property
    def config(self) -> EditConfig:
        return self.editor.config

    def store(self, create: bool = False) -> AdapterStore:
        return AdapterStore(self.store_path, create=create)

    @property
    def base_model_name(self) -> str:
        return EMBEDDED_HUB_IDS.get(self.loaded.source, self.loaded.source)

    def use(self, profile: str | None) -> list[str]:
        """Make exactly the batches of `profile` active (None: no edits). Verifies each before loading.

        With `fold_stack`, a profile of several batches is held as one exact concatenated adapter,
        merged into dense weights once that is cheaper (`serving.compact_stack`), so the cost of a
        step or a generated token does not grow with the number of edits.
        """
        names = [] if profile is None else self.store().profile(profile)
        in_memory = adapters.adapter_names(self.editor.model)
        if tuple(names) != self._materialised or set(in_memory) != set(self.editor.stack):
            for stale in in_memory:  # rebuild from the verified files
                self.editor.model = adapters.delete_adapter(self.editor.model, stale)
            store = self.store() if names else None
            for name in names:
                folder = store.verify_batch(name, self.fingerprint)
                self.editor.model = adapters.load_adapter(self.editor.model, name, folder)
            self.editor.stack = list(names)
            self._materialised = tuple(names)
        self._fold_active()
        adapters.set_active(self.editor.model, self.editor.stack)
        self.active_profile = profile
        return names

    def _fold_active(self) -> None:
        if self.fold_stack:
            self.editor.model, self.editor.stack = compact_stack(self.editor.model, self.editor.stack)

    # ------------------------------------------------------------------ editing

    def edit(self, requests: Sequence[EditRequest], profile: str = DEFAULT_PROFILE, name: str | None = None,
             config: EditConfig | None = None, progress: bool = True) -> BatchResult:
        """Edit on top of `profile`'s batches and store the new batch at the end of that profile."""
        check_name(profile, "profile name")
        name = check_name(name, "batch name") if name is not None else new_adapter_name()
        store = self.store(create=True)
        if any(b.name == name for b in store.batches()):
            raise StoreError(f"a batch named {name!r} already exists in {store.root}")
        self.use(profile if profile in store.profiles() else None)
        superseded = store.superseded(requests, profile)
        warn_superseded(superseded)
        cfg = config or self.config
        result = self.editor.edit(requests, name=name, config=config, progress=progress,
                                  replay=self._replay_prompts(store, profile, cfg),
                                  anchors=self._anchor_prompts(store, profile, cfg),
                                  protect=self._protected_facts(store, profile, cfg))
        record = {
            "requests": [r.to_dict() for r in requests],
            "config": result.config.to_dict(),
            "results": [r.to_dict() for r in result.results],
            "cycles": result.cycles, "steps": result.steps, "seconds": result.seconds, "scale": result.scale,
            "base_model": self.base_model_name, "quantization": self.loaded.quantization,
            "supersedes": sorted({b for batches in superseded.values() for b in batches}),
        }
        try:
            store.add_batch(name, lambda folder: adapters.save_adapter(self.editor.model, name, folder,
                                                                       self.base_model_name),
                            record, self.fingerprint, profile)
        except BaseException:
            self.editor.remove(name)
            raise
        self._materialised += (name,)
        self.active_profile = profile
        return result

    def _replay_prompts(self, store: AdapterStore, profile: str, config: EditConfig) -> list[str]:
        """Prompts of the facts most recently edited in `profile` (up to `config.replay`)."""
        if config.replay <= 0 or profile not in store.profiles():
            return []
        prompts: list[str] = []
        for batch in reversed(store.profile(profile)):
            prompts += [r.prompt for r in store.requests_of(batch)]
            if len(prompts) >= config.replay:
                break
        return prompts[: config.replay]

    def _protected_facts(self, store: AdapterStore, profile: str, config: EditConfig) -> dict[str, list[str]]:
        """Each of `profile`'s batches with its facts as text (prompt and answer), for the null space to avoid."""
        if config.null_space <= 0 or config.null_space_protect_edits <= 0 or profile not in store.profiles():
            return {}
        return {batch: [f"{r.prompt.rstrip()} {r.target_new.strip()}" for r in store.requests_of(batch)]
                for batch in store.profile(profile)}

    def _anchor_prompts(self, store: AdapterStore, profile: str, config: EditConfig) -> list[str]:
        """Subject swaps of up to `config.anchors` facts drawn from all of `profile`'s batches."""
        if config.anchors <= 0 or profile not in store.profiles():
            return []
        earlier = [r for batch in store.profile(profile) for r in store.requests_of(batch)]
        rng = random.Random(config.seed + len(earlier))
        chosen = rng.sample(earlier, min(config.anchors, len(earlier)))
        return preservation_prompts(chosen, 1, config.seed + len(earlier))

    def rollback(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        self.store().rollback(batch, profile)
        if self.active_profile == profile:
            self.use(profile)

    def apply(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        self.store().apply(batch, profile)
        if self.active_profile == profile:
            self.use(profile)

    # ------------------------------------------------------------------ using edits

    def generate(self, prompts: Sequence[str], profile: str | None = DEFAULT_PROFILE, max_new_tokens: int = 16) -> list[str]:
        """Greedy continuations with `profile`'s edits (None: the unedited base model)."""
        if profile is not None and not self.store_path.joinpath("manifest.json").is_file():
            profile = None  # nothing stored yet: the base model is what serves
        self.use(profile)
        return self.editor.generate(prompts, max_new_tokens, use_edits=profile is not None)

    def evaluate(self, requests: Sequence[EditRequest], profile: str = DEFAULT_PROFILE,
                 generation: bool = True) -> dict:
        """The evaluation harness on `requests` with `profile` active (locality against the base)."""
        self.use(None)
        pre = pre_edit_locality(self.model, self.loaded.tokenizer, requests)
        self.use(profile)
        rows = [evaluate_request(self.model, self.loaded.tokenizer, r, p, generation) for r, p in zip(requests, pre)]
        return {"summary": summarise(rows), "rows": rows}

    # ------------------------------------------------------------------ serving

    def _as_adapters(self, profile: str) -> list[str]:
        """Make `profile` active with its batches as LoRA adapters (reloaded if they were merged)."""
        self.use(profile)
        if merged.STACK in self.editor.stack:
            fold_stack, self.fold_stack, self._materialised = self.fold_stack, False, ()
            try:
                self.use(profile)
            finally:
                self.fold_stack = fold_stack
        return list(self.editor.stack)

    def squash(self, profile: str, out_dir: str | Path) -> int:
        """One adapter folder equal to `profile`'s whole stack; returns its rank."""
        stack = self._as_adapters(profile)
        out = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            staging = Path(tmp) / "adapter"
            rank = squash(self.model, stack, staging, self.base_model_name)
            _publish(staging, out)
        return rank

    def export(self, profile: str, out_dir: str | Path, max_rank: int = 64, compress: bool = False) -> dict:
        """A squashed adapter that LoRA servers (vLLM, PeftModel.from_pretrained) load as it is."""
        stack = self._as_adapters(profile)
        out = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            staging = Path(tmp) / "adapter"
            squash(self.model, stack, staging, self.base_model_name)
            report = export_for_serving(staging, self.base_model_name, max_rank, compress)
            _publish(staging, out)
        return report


def _publish(staging: Path, out: Path) -> None:
    """Move a finished adapter folder to `out`, refusing to overwrite anything but an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not empty; choose another output folder")
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
