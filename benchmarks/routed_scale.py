"""Serving a subject-routed profile of many batches: every batch in memory against at most
`max_loaded` of them (`KnowledgeEditor(max_loaded=...)`, loading the others when a prompt routes to
them), measured side by side in one run on the same store.

    python benchmarks/routed_scale.py --sizes 50 200 --prompts 40 --out benchmarks/results/routed_scale.json

The store's batches are random LoRA adapters of the default shape (their content does not change the
cost), one request each, with subjects "Subject 0", "Subject 1", ...; the prompts each name one subject.
For each size it reports, per set-up: the seconds `use` takes (loading every batch, where all are
held), the seconds to score the prompts routed (each group of prompts runs with its own batch, loaded
first where it is not in memory; `evaluate.score_targets`), the adapters left in memory, the whole
process's resident memory (measured with the smaller set-up first), and the seconds peft takes for
one adapter switch (`only_adapters`) there.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora import adapters  # noqa: E402
from kdpo_lora.evaluate import score_targets  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import EditRequest  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402
from kdpo_lora.store import DEFAULT_PROFILE  # noqa: E402


def _request(i: int) -> EditRequest:
    return EditRequest(f"Subject {i} lives in the city of", "Rome", subject=f"Subject {i}")


def build_store(ke: KnowledgeEditor, size: int, seed: int = 0) -> None:
    """`size` batches of random LoRA weights, stored the way `edit` stores them."""
    generator = torch.Generator().manual_seed(seed)
    store = ke.store(create=True)
    config = adapters.lora_config(ke.config, ke.model.config.num_hidden_layers)
    for i in range(size):
        name = f"b{i:05d}"
        ke.editor.model = adapters.add_adapter(ke.editor.model, name, config)
        with torch.no_grad():
            for weight in adapters.lora_b_weights(ke.editor.model, name):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 1e-3)
        record = {"requests": [_request(i).to_dict()], "config": ke.config.to_dict()}
        store.add_batch(name, lambda folder: adapters.save_adapter(ke.editor.model, name, folder), record,
                        ke.fingerprint)
        ke.editor.model = adapters.delete_adapter(ke.editor.model, name)


def measure(ke: KnowledgeEditor, size: int, prompts: list[str]) -> dict:
    started = time.perf_counter()
    names = ke.use(DEFAULT_PROFILE)
    if ke.max_loaded >= size:  # every batch in memory, as a routed profile was held before max_loaded
        ke.active.ensure_loaded(names)
    loading = time.perf_counter() - started
    started = time.perf_counter()
    score_targets(ke.model, ke.loaded.tokenizer, prompts, ["Rome"] * len(prompts), ke.route)
    seconds = time.perf_counter() - started
    names = adapters.adapter_names(ke.model)
    switches = []
    for name in names[:5]:
        began = time.perf_counter()
        with adapters.only_adapters(ke.model, [name]):
            pass
        switches.append(time.perf_counter() - began)
    return {"seconds_to_use": loading, "seconds_to_score": seconds, "adapters_in_memory": len(names),
            "rss_mb": psutil.Process().memory_info().rss / 2 ** 20,
            "seconds_per_switch": statistics.median(switches)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    p.add_argument("--prompts", type=int, default=40, help="prompts scored, each naming another batch's subject")
    p.add_argument("--max-loaded", type=int, default=16)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.quantization)
    results = []
    for size in args.sizes:
        step = max(1, size // args.prompts)
        prompts = [_request(i).prompt for i in range(0, size, step)][: args.prompts]
        with tempfile.TemporaryDirectory() as store:
            build_store(KnowledgeEditor(loaded, store), size)
            row = {"batches": size, "prompts": len(prompts)}
            for label, limit in (("max_loaded", args.max_loaded), ("all_loaded", size)):  # the smaller first (RSS)
                ke = KnowledgeEditor(loaded, store, max_loaded=limit)
                row[label] = measure(ke, size, prompts)
                ke.use(None)  # unload before the next set-up measures its memory
                del ke
                gc.collect()
            row["score_ratio"] = row["max_loaded"]["seconds_to_score"] / row["all_loaded"]["seconds_to_score"]
            row["switch_ratio"] = row["max_loaded"]["seconds_per_switch"] / row["all_loaded"]["seconds_per_switch"]
        print(row, flush=True)
        results.append(row)
    write(args.out, {"command": " ".join(sys.argv), "max_loaded": args.max_loaded, "results": results})


if __name__ == "__main__":
    main()
