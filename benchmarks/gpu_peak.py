"""Real GPU peak memory and seconds of an edit on a Llama-3-8B-shaped model with random weights.

    python benchmarks/gpu_peak.py [--n 3] [--tokenizer FOLDER] [--workdir /tmp/kdpo-gpu] [--out gpu_peak.json]

Needs a CUDA GPU (`--dry-run` shrinks the shape and runs on the CPU, to check the script). No
download: the random model (Llama-3-8B's shape, bf16) is written once to `--workdir` with SmolLM2's
tokenizer and loaded through kdpo-lora's own NF4 path (`load_model`), so the measured edit is the one a
user runs. Then the published set-up (fp32 model, a deep-copied reference, one dense layer) runs the same
requests on the same shape in the same process. Peak = `torch.cuda.max_memory_allocated` over the edits,
the model's own weights included; printed next to `kdpo-lora estimate` for the same shape.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora.config import resolve_config  # noqa: E402
from kdpo_lora.editor import Editor  # noqa: E402
from kdpo_lora.estimate import GIB, estimate, load_config  # noqa: E402
from kdpo_lora.loading import load_model, release_memory, resolve_source  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402

SHAPE = "llama-3-8b"
DRY_RUN_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2)


def model_config(tokenizer_vocab: int, dry_run: bool):
    config = load_config(SHAPE)
    if dry_run:
        for key, value in DRY_RUN_SHAPE.items():
            setattr(config, key, value)
    assert tokenizer_vocab <= config.vocab_size, "the tokenizer's ids must fit the embedding"
    return config


def random_folder(config, tokenizer, workdir: Path, device: str) -> Path:
    """Random bf16 weights of the shape, saved once as an HF folder (built on the device: seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    folder = workdir / f"random-{config.num_hidden_layers}x{config.hidden_size}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        release_memory()
    return folder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(value: int) -> float:
    return round(value / GIB, 3)


def memory() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_gib": gib(torch.cuda.memory_allocated()),
            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved())}


def tensor_gib(model: torch.nn.Module) -> dict:
    """GiB held by the model's own tensors, per dtype (what the allocator should account for)."""
    sizes: dict[str, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        key = str(tensor.dtype).removeprefix("torch.")
        sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            sizes["quant_state"] = sizes.get("quant_state", 0) + state.absmax.numel() * state.absmax.element_size()
    return {key: gib(value) for key, value in sizes.items()}


def measure_ours(folder: Path, requests, device: str) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loaded = load_model(str(folder), "nf4", device=device)  # quantises on the first run, else reads the NF4 cache
    sync()
    row = {"load_seconds": round(time.perf_counter() - start, 1), "after_load": memory()}
    release_memory()
    row["after_load"].update(allocated_after_gc_gib=memory().get("allocated_gib"),
                             model_tensors_gib=tensor_gib(loaded.model))
    editor = Editor(loaded.model, loaded.tokenizer, resolve_config(loaded.model.config.model_type))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds, success = [], []
    for request in requests:
        start = time.perf_counter()
        result = editor.edit([request], progress=False)
        sync()
        seconds.append(time.perf_counter() - start)
        success.append(result.results[0].success)
        editor.remove(result.adapter)
    row.update(edits=len(seconds), seconds=[round(s, 2) for s in seconds],
               median_seconds_per_edit=statistics.median(seconds), edit_success=sum(success) / len(success),
               during_edits=memory())
    del editor, loaded
    release_memory()
    return row


def measure_published(config, tokenizer, requests, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    from benchmarks.published_kdpo import published_edit

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    seconds, success = [], []
    for request in requests:
        start = time.perf_counter()
        result = published_edit(model, tokenizer, request.prompt, request.target_new)
        sync()
        seconds.append(time.perf_counter() - start)
        success.append(result["success"])
        result["restore"]()
    row = {"edits": len(seconds), "seconds": [round(s, 2) for s in seconds],
           "median_seconds_per_edit": statistics.median(seconds), "edit_success": sum(success) / len(success),
           "during_edits": memory()}
    del model
    release_memory()
    return row


def main() -> None:
    from transformers import AutoTokenizer

    p = parser(__doc__)
    p.set_defaults(n=3)
    p.add_argument("--tokenizer", default=None, help="a folder with a tokenizer (default: the embedded SmolLM2's)")
    p.add_argument("--workdir", default="/tmp/kdpo-gpu")
    p.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU, to check the script")
    p.add_argument("--skip-published", action="store_true")
    args = p.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark measures GPU memory (use --dry-run to check it on a CPU)")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_source("smollm2-135m"))
    config = model_config(len(tokenizer), args.dry_run)
    requests = read_requests(args.data)[:args.n]
    settings = resolve_config(config.model_type)
    paper = estimate(SHAPE, settings)
    payload = {"command": " ".join(sys.argv), "shape": SHAPE if not args.dry_run else "dry run",
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "versions": versions(),
               "estimate_gib": {"kdpo_lora": round(paper["kdpo_lora_total_gib"], 2),
                                "published": round(paper["published_total_gib"], 2)}}
    start = time.perf_counter()
    folder = random_folder(config, tokenizer, Path(args.workdir), device)
    payload["random_model_seconds"] = round(time.perf_counter() - start, 1)
    payload["kdpo_lora"] = measure_ours(folder, requests, device)
    print("kdpo-lora", payload["kdpo_lora"], flush=True)
    write(args.out, payload)
    if not args.skip_published:
        payload["published"] = measure_published(config, tokenizer, requests, device)
        print("published", payload["published"], flush=True)
        if torch.cuda.is_available():
            ours = payload["kdpo_lora"]["during_edits"]["peak_allocated_gib"]
            theirs = payload["published"]["during_edits"]["peak_allocated_gib"]
            payload["ratios"] = {
                "peak / published": round(ours / theirs, 3),
                "seconds_per_edit / published": round(payload["kdpo_lora"]["median_seconds_per_edit"]
                                                      / payload["published"]["median_seconds_per_edit"], 3)}
        write(args.out, payload)
    print("estimate", payload["estimate_gib"], "ratios", payload.get("ratios"), flush=True)


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


if __name__ == "__main__":
    main()
