"""Per-edit speed and memory: (a) KDPO as published vs (b) kdpo-lora's defaults, side by side in one run.

    python benchmarks/speed.py --n 20                      # SmolLM2-135M: seconds per edit, peak RSS, success
    python benchmarks/speed.py --shape 1b --n 1            # ~1B Llama-shaped random model: peak memory
    python benchmarks/speed.py --n 20 --compare-with ../old  # also the defaults of another checkout

Each mode runs in its own child process, so "peak resident memory" is that whole process's peak
(VmHWM). The parent prints both and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine, overrides, parser, write  # noqa: E402

SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B's shape


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_1b_folder() -> str:
    """A ~1.1B-parameter Llama with random weights and SmolLM2's tokenizer, saved once in the cache."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kdpo_lora.loading import cache_dir, resolve_source

    folder = cache_dir() / "bench" / "llama-1b-random"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m"))
        config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **SHAPE_1B)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def child(mode: str, model: str, data: str, n: int, settings: dict) -> dict:
    """Run `n` single edits in this process with one mode; report seconds, success and peak memory."""
    from kdpo_lora.config import resolve_config
    from kdpo_lora.editor import Editor
    from kdpo_lora.errors import RequestError
    from kdpo_lora.loading import load_model
    from kdpo_lora.requests import read_requests

    requests = read_requests(data)[:n]
    seconds, success, steps = [], [], []
    if mode == "published":
        from benchmarks.published_kdpo import published_edit

        loaded = load_model(model, "none")
        for request in requests:
            start = time.perf_counter()
            result = published_edit(loaded.model, loaded.tokenizer, request.prompt, request.target_new,
                                    cycles=settings.get("cycles", 20), steps=settings.get("steps_per_cycle", 8))
            seconds.append(time.perf_counter() - start)
            success.append(result["success"])
            result["restore"]()
    else:
        loaded = load_model(model, "nf4")
        editor = Editor(loaded.model, loaded.tokenizer, resolve_config(loaded.model.config.model_type,
                                                                       overrides=settings))
        for request in requests:
            start = time.perf_counter()
            try:
                result = editor.edit([request], progress=False)
            except RequestError:  # already satisfied: nothing to edit
                continue
            seconds.append(time.perf_counter() - start)
            success.append(result.results[0].success)
            steps.append(result.steps)
            editor.remove(result.adapter)
    return {"mode": mode, "edits": len(seconds), "median_seconds_per_edit": statistics.median(seconds),
            "edit_success": sum(success) / len(success), "peak_rss_mb": peak_rss_mb(),
            **({"mean_adam_steps": statistics.mean(steps)} if steps else {})}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--shape", choices=["smollm2", "1b"], default="smollm2")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also measure kdpo-lora with these settings changed (one more child per --variant)")
    p.add_argument("--compare-with", metavar="DIR", help="also measure the defaults of the checkout in DIR "
                                                         "(e.g. a git worktree of the last release)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = overrides(args.set)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.model, args.data, args.n, settings)), flush=True)
        return
    model = random_1b_folder() if args.shape == "1b" else args.model
    # quantise once into the NF4 cache first, so the measured child loads it as every later run does
    subprocess.run([sys.executable, "-c", f"from kdpo_lora.loading import load_model; load_model({model!r})"],
                   check=True, capture_output=True)
    results = {}
    runs = [("published", args.set), ("kdpo-lora", args.set)]
    runs += [("kdpo-lora " + variant, args.set + variant.split(",")) for variant in args.variant]
    if args.compare_with:
        runs.append((f"kdpo-lora at {args.compare_with}", args.set))
    for mode, pairs in runs:
        other = mode.startswith("kdpo-lora at ")
        script = Path(args.compare_with, "benchmarks", "speed.py").resolve() if other else __file__
        cmd = [sys.executable, str(script), "--child", mode.split()[0], "--model", model, "--data", args.data,
               "--n", str(args.n)]
        for pair in pairs:
            cmd += ["--set", pair]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(Path(args.compare_with).resolve())} if other else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        results[mode] = json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT ")))
        print(mode, results[mode], flush=True)
    a = results["published"]
    ratios = {}
    for mode, row in results.items():
        if mode != "published":
            ratios[f"{mode}: seconds_per_edit / published"] = row["median_seconds_per_edit"] / a["median_seconds_per_edit"]
            ratios[f"{mode}: peak_rss / published"] = row["peak_rss_mb"] / a["peak_rss_mb"]
    if args.compare_with:
        old = results[runs[-1][0]]
        ratios["kdpo-lora: seconds_per_edit / at " + args.compare_with] = (
            results["kdpo-lora"]["median_seconds_per_edit"] / old["median_seconds_per_edit"])
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()})
    write(args.out, {"command": " ".join(sys.argv), "shape": args.shape, "machine": machine(), "results": results,
                     "ratios": ratios})


if __name__ == "__main__":
    main()
