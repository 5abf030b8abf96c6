"""The Python API: one base model in memory, an adapter store, and edits made, served and undone.

    from kdpo_lora import KnowledgeEditor, EditRequest
    ke = KnowledgeEditor(store="adapters")               # embedded SmolLM2-135M, NF4
    ke.edit([EditRequest("The Eiffel Tower is in the city of", "Rome", subject="Eiffel Tower")])
    ke.generate(["The Eiffel Tower is in the city of"])  # with the default profile's edits
    ke.rollback(batch)                                   # exact undo

The CLI is a thin layer over this class. Swapping profiles loads or unloads adapters only; the base
model is loaded once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from . import adapters
from .config import EditConfig, read_yaml, resolve_config
from .editor import BatchResult, Editor, new_adapter_name
from .errors import KdpoWarning, StoreError
from .evaluate import evaluate_requests, pre_edit_locality, score_targets, summarise
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .requests import EditRequest
from .profiles import ActiveProfile, ProfileRoutes
from .regularisers import under_aliases
from .routing import ROUTING_TABLE, SubjectRouter, by_route, check_routable
from .serving import export_for_serving, squash
from .store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DEFAULT_PROFILE, AdapterStore, ProfileChanged, check_name, warn_superseded


EXPORT_TARGETS = ("nf4", "bf16", "fp32")  # the base precisions an export is checked on
EXPORT_RECORD = "kdpo_export.json"  # beside the PEFT files: the true base, its fingerprint, the check
MAX_EDIT_ATTEMPTS = 5  # trainings of one batch while concurrent writers keep changing its profile


class KnowledgeEditor:
    """A base model plus an adapter store; `use(profile)` names which stored edits are active
    (`profiles.ActiveProfile` holds them: at most `max_loaded` batches of a routed profile in memory)."""

    def __init__(self, model: str | LoadedModel = DEFAULT_MODEL, store: str | Path = "adapters",
                 quantization: str = "nf4", device: str | None = None, config: str | Path | None = None,
                 overrides: dict | None = None, fold_stack: bool = True, max_loaded: int = 16):
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, quantization, device)
        self.store_path = Path(store)
        model_type = getattr(self.loaded.model.config, "model_type", None)
        self.editor = Editor(self.loaded.model, self.loaded.tokenizer, resolve_config(model_type, config, overrides))
        self.fingerprint = self.loaded.fingerprint
        asked = (overrides or {}).get("routing") or (read_yaml(config).get("routing") if config else None)
        self.active = ActiveProfile(self.editor, self.store_path, self.fingerprint, asked, fold_stack, max_loaded)

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
        """The base as `from_pretrained` loads it here: the folder the edits were made on (for the
        embedded model, its converted folder, not the hub model the GGUF file was made from)."""
        return self.loaded.base_path or self.loaded.source

    def use(self, profile: str | None) -> list[str]:
        """Make exactly the batches of `profile` active (None: no edits); see `profiles.ActiveProfile`."""
        return self.active.use(profile)

    @property
    def routed(self) -> bool:
        """The active profile serves each prompt with only the batches whose subjects it names (routing.py)."""
        return self.active.routed

    @property
    def router(self) -> SubjectRouter | None:
        return self.active.router

    @property
    def route(self) -> ProfileRoutes:
        """`route(prompt)`: the active profile's batches that serve `prompt` (all of them without routing).
        Handed to the evaluation harness, it also loads the batches a prompt routes to (`serving`)."""
        return ProfileRoutes(self.active)

    def serving(self, names: Sequence[str]):
        """Run with exactly the batches `names` active, loading from the store those not in memory."""
        return self.active.serving(names)

    @property
    def fold_stack(self) -> bool:
        return self.active.fold_stack

    @fold_stack.setter
    def fold_stack(self, value: bool) -> None:
        self.active.fold_stack = value

    # ------------------------------------------------------------------ editing

    def edit(self, requests: Sequence[EditRequest], profile: str = DEFAULT_PROFILE, name: str | None = None,
             config: EditConfig | None = None, progress: bool = True) -> BatchResult:
        """Edit on top of `profile`'s batches and store the new batch at the end of that profile.

        Everything that can be refused is refused before training, and nothing is written until the
        batch is stored. If another writer changed what this batch stands on while it trained (a
        concurrent edit of the same subject, a rollback), it is trained again on top of the profile
        as it is now, so concurrent edits end as if made one after the other.
        """
        check_name(profile, "profile name")
        name = check_name(name, "batch name") if name is not None else new_adapter_name()
        store = self.store(create=True)
        store.check_writable()
        if any(b.name == name for b in store.batches()):
            raise StoreError(f"a batch named {name!r} already exists in {store.root}")
        cfg = config or self.config
        cfg = replace(cfg, routing=self.active.routing_of(store, profile) or cfg.routing)
        if cfg.routing == "subject":
            check_routable(requests)
        for attempt in range(MAX_EDIT_ATTEMPTS):
            names = self.use(profile if store.exists() and profile in store.profiles() else None)
            warn_superseded(store.superseded(requests, names, self.active.requests))
            stands_on, shared = self.stands_on(requests, names, cfg)
            below = stands_on if cfg.routing == "subject" else None
            if below is not None:  # routed: the batches it trains on may not be in memory (an unrouted profile is)
                self.active.ensure_loaded(below)
            result = self.editor.edit(requests, name=name, config=cfg, progress=progress, below=below,
                                      hold=shared)
            record = {
                "requests": [r.to_dict() for r in requests],
                "config": result.config.to_dict(),
                "results": [r.to_dict() for r in result.results],
                "cycles": result.cycles, "steps": result.steps, "seconds": result.seconds,
                "base_model": self.base_model_name, "quantization": self.loaded.quantization,
            }

            def on_commit(manifest: dict) -> dict:
                now = manifest["profiles"].get(profile, [])
                if self.stands_on(requests, now, cfg)[0] != stands_on:
                    raise ProfileChanged(f"profile {profile!r} changed while batch {name!r} was trained")
                found = store.superseded(requests, now, self.active.requests)
                return {"supersedes": sorted({b for batches in found.values() for b in batches})}

            try:
                store.add_batch(name, lambda folder: adapters.save_adapter(self.editor.model, name, folder,
                                                                           self.base_model_name),
                                record, self.fingerprint, profile, on_commit=on_commit, routing=cfg.routing)
                break
            except ProfileChanged:
                self.editor.remove(name)
                if attempt + 1 == MAX_EDIT_ATTEMPTS:
                    raise StoreError(f"profile {profile!r} kept changing while batch {name!r} was trained "
                                     f"({MAX_EDIT_ATTEMPTS} tries); nothing was stored, try again") from None
            except BaseException:
                self.editor.remove(name)
                raise
        self.active.stored(profile, name, cfg.routing)
        return result

    def stands_on(self, requests: Sequence[EditRequest], names: Sequence[str],
                   config: EditConfig) -> tuple[list[str], list[str]]:
        """The batches of `names` a new batch of `requests` is trained on top of (all of them
        unrouted), and, routed, the earlier prompts it will also be served on.

        Routed, those batches are the ones the new prompts name a subject of, and the ones with a
        prompt that names a new subject ("1300 Oslo was formed in" once "Oslo" is edited); the
        latter prompts are held at their current answers while the new batch trains.
        """
        if config.routing != "subject":
            return list(names), []
        router = SubjectRouter([(n, self.active.requests(n)) for n in names])
        new = SubjectRouter([("new", requests)])
        shared = {b: [r.prompt for r in self.active.requests(b) if new.route(r.prompt)] for b in router.order}
        trained = [r.prompt for r in requests] + [prompt for _, prompt, _ in under_aliases(requests)]
        below = set(router.route_all(trained)) | {b for b, p in shared.items() if p}
        return [b for b in router.order if b in below], [p for prompts in shared.values() for p in prompts]

    def rollback(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        self.store().rollback(batch, profile)
        if self.active.name == profile:
            self.use(profile)

    def apply(self, batch: str, profile: str = DEFAULT_PROFILE) -> None:
        self.store().apply(batch, profile)
        if self.active.name == profile:
            self.use(profile)

    # ------------------------------------------------------------------ using edits

    def generate(self, prompts: Sequence[str], profile: str | None = DEFAULT_PROFILE, max_new_tokens: int = 16) -> list[str]:
        """Greedy continuations with `profile`'s edits (None: the unedited base model)."""
        self.editor.check_prompts(prompts, max_new_tokens)
        self.use(profile)
        if self.router is None:
            return self.editor.generate(prompts, max_new_tokens, use_edits=profile is not None)

        def run(indices: list[int], names: tuple[str, ...]) -> list[str]:
            with self.serving(names):
                return self.editor.generate([prompts[i] for i in indices], max_new_tokens,
                                            gate=self.route.gate(names) if names else None)
        return by_route(prompts, self.route, run)

    def evaluate(self, requests: Sequence[EditRequest], profile: str = DEFAULT_PROFILE,
                 generation: bool = True) -> dict:
        """The evaluation harness on `requests` with `profile` active (locality against the base); with
        `generation`, on a chat model, also asked as people ask (`asking.py`)."""
        self.use(profile)
        pre = pre_edit_locality(self.model, self.loaded.tokenizer, requests)  # with every adapter off
        route = self.route if self.router is not None else None
        asking = generation and getattr(self.loaded.tokenizer, "chat_template", None) is not None  # asking.py
        rows = evaluate_requests(self.model, self.loaded.tokenizer, requests, pre, generation, route, asking)
        return {"summary": summarise(rows), "rows": rows}

    # ------------------------------------------------------------------ serving

    def _warn_unrouted(self, profile: str, stack: Sequence[str]) -> None:
        """A squashed routed profile acts on every prompt: say so, since the numbers measured routed do not hold."""
        if self.routed and len(stack) > 1:
            warnings.warn(f"profile {profile!r} is subject-routed, but one adapter serves every prompt with all "
                          f"{len(stack)} of its batches; to serve it routed, use `kdpo-lora serve`, or "
                          "`export --for vllm` and `serve --upstream` in front of vLLM",
                          KdpoWarning, stacklevel=3)

    def squash(self, profile: str, out_dir: str | Path) -> int:
        """One adapter folder equal to `profile`'s whole stack; returns its rank."""
        stack = self.active.as_adapters(profile)
        self._warn_unrouted(profile, stack)
        out = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            staging = Path(tmp) / "adapter"
            rank = squash(self.model, stack, staging, self.base_model_name)
            _publish(staging, out)
        return rank

    def export(self, profile: str, out_dir: str | Path, max_rank: int = 64, compress: bool = False,
               target: str | None = None, check: bool = True) -> dict:
        """A squashed adapter that LoRA servers (vLLM, PeftModel.from_pretrained) load as it is.

        An adapter trained on a 4-bit base need not hold on the same base in another precision, so
        with `check` the written folder is loaded with plain peft onto the base in the precision it
        is exported `target`ed at (nf4, bf16, fp32; default: the one edited on) and every edit of the
        profile is scored there; those whose target no longer wins are reported (`not_holding`).
        The folder names the true base (`base_model_name_or_path`), and `kdpo_export.json` records
        it with its fingerprint, the target precision and the check's outcome.
        """
        target = target or ("nf4" if self.loaded.quantization == "nf4" else "fp32")
        if target not in EXPORT_TARGETS:
            raise StoreError(f"export target {target!r} is not one of {', '.join(EXPORT_TARGETS)}")
        stack = self.active.as_adapters(profile)
        self._warn_unrouted(profile, stack)
        requests = self._latest_requests(self.store().profile(profile))
        out = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            staging = Path(tmp) / "adapter"
            squash(self.model, stack, staging, self.base_model_name)
            report = export_for_serving(staging, self.base_model_name, max_rank, compress)
            not_holding = self._check_export(staging, requests, target) if check else None
            report.update({"profile": profile, "batches": self.store().profile(profile), "base_model": self.base_model_name,
                           "base_fingerprint": self.fingerprint, "for": target, "checked": check,
                           "edits": len(requests), "not_holding": not_holding})
            (staging / EXPORT_RECORD).write_text(json.dumps(report, indent=2, ensure_ascii=False))
            _publish(staging, out)
        if not_holding:
            warnings.warn(f"{len(not_holding)} of {len(requests)} edits do not hold on the {target} base with the "
                          f"exported adapter: {'; '.join(repr(p) for p in not_holding[:3])}"
                          f"{' ...' if len(not_holding) > 3 else ''} (all in {out / EXPORT_RECORD})",
                          KdpoWarning, stacklevel=2)
        return report

    def export_vllm(self, profile: str, out_dir: str | Path, max_rank: int = 64) -> dict:
        """`profile` as LoRA modules vLLM loads, plus the routing table `serve --upstream` routes with.

        Routed, each batch is its own module (`<out>/<batch>/`), since each prompt is served by the
        batches whose subjects it names; unrouted, the whole stack is one squashed module. Every
        module is plain LoRA in bf16 with rank <= `max_rank` (vLLM's `--max-lora-rank`). The table
        (`routing.json`) lists each module's facts and the command line that starts vLLM with them.
        """
        store = self.store()
        names, routing = store.listing(profile)
        if not names:
            raise StoreError(f"profile {profile!r} has no batches: nothing to export")
        out = Path(out_dir)
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
            staging = Path(tmp) / "export"
            staging.mkdir()
            if routing == "subject":
                for name in names:
                    folder = store.verify_batch(name, self.fingerprint)
                    (staging / name).mkdir()
                    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                        shutil.copyfile(folder / file, staging / name / file)
                    export_for_serving(staging / name, self.base_model_name, max_rank)
                modules = {n: [r.to_dict() for r in self.active.requests(n)] for n in names}
            else:
                squash(self.model, self.active.as_adapters(profile), staging / profile, self.base_model_name)
                export_for_serving(staging / profile, self.base_model_name, max_rank)
                modules = {profile: [r.to_dict() for r in self._latest_requests(names)]}
            rank = max(json.loads((staging / m / ADAPTER_CONFIG).read_text())["r"] for m in modules)
            table = {"profile": profile, "routing": routing, "base_model": self.base_model_name, "upstream_base": "base",
                     "base_fingerprint": self.fingerprint, "order": list(modules), "modules": modules,
                     "vllm": f"vllm serve {self.base_model_name} --served-model-name base --enable-lora "
                             f"--max-lora-rank {vllm_rank(rank)} --max-loras {min(len(modules), 16)} --lora-modules "
                             + " ".join(f"{m}={out.resolve() / m}" for m in modules)}
            (staging / ROUTING_TABLE).write_text(json.dumps(table, indent=2, ensure_ascii=False))
            _publish(staging, out)
        return table

    def _latest_requests(self, batches: Sequence[str]) -> list[EditRequest]:
        """The facts `batches` serve: for a prompt edited more than once, its last edit."""
        latest: dict[str, EditRequest] = {}
        for batch in batches:
            for request in self.active.requests(batch):
                latest.pop(request.key, None)
                latest[request.key] = request
        return list(latest.values())

    def _check_export(self, folder: Path, requests: Sequence[EditRequest], target: str) -> list[str]:
        """The prompts of `requests` whose target is not every argmax with `folder` on the `target` base."""
        from peft import PeftModel

        if not requests:
            return []
        base = load_model(self.loaded.source, "nf4" if target == "nf4" else "none", str(self.loaded.device))
        model = base.model.to(torch.bfloat16) if target == "bf16" else base.model
        served = PeftModel.from_pretrained(model, str(folder)).eval()
        rows = score_targets(served, self.loaded.tokenizer, [r.prompt for r in requests],
                             [r.target_new for r in requests])
        del served, model, base
        return [r.prompt for r, row in zip(requests, rows) if row["argmax"] != row["target"]]


def vllm_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _publish(staging: Path, out: Path) -> None:
    """Move a finished adapter folder to `out`, refusing to overwrite anything but an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not empty; choose another output folder")
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)
