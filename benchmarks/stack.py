"""Stack growth and serving: seconds per edit and generation tokens/s with 1, 10, 100 earlier batches.

    python benchmarks/stack.py [--sizes 1 10 100] [--n 5] [--out results.json]

Earlier batches are random frozen LoRA adapters of the default shape (their content does not change
the cost). For each stack size the profile is held three ways, measured side by side: as separate
active adapters; folded into one exact concatenated (`cat`) adapter; and as kdpo-lora holds it
(`serving.compact_stack`: the fold, merged into dense weights once that is cheaper). Generation is
also measured for the base model.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import overrides, parser, write  # noqa: E402
from kdpo_lora import adapters  # noqa: E402
from kdpo_lora.config import resolve_config  # noqa: E402
from kdpo_lora.editor import Editor  # noqa: E402
from kdpo_lora.errors import RequestError  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.serving import compact_stack, fold  # noqa: E402

PROMPTS = ["The capital of France is", "The Eiffel Tower is located in", "The largest planet is",
           "Water is made of"]


def add_random_stack(editor: Editor, size: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    names = [f"s{i}" for i in range(size)]
    for name in names:
        config = adapters.lora_config(editor.config, editor.model.config.num_hidden_layers)
        editor.model = adapters.add_adapter(editor.model, name, config)
        with torch.no_grad():
            for pname, param in editor.model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 1e-4)
    return names


def tokens_per_second(editor: Editor, new_tokens: int = 32) -> float:
    tok = editor.tokenizer
    encoded = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        start = time.perf_counter()
        out = editor.model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - encoded.input_ids.shape[1]) * len(PROMPTS) / elapsed


def seconds_per_edit(editor: Editor, requests) -> float:
    times = []
    for request in requests:
        start = time.perf_counter()
        try:
            result = editor.edit([request], progress=False)
        except RequestError:
            continue
        times.append(time.perf_counter() - start)
        editor.remove(result.adapter)
    return statistics.median(times)


def clear(editor: Editor) -> None:
    for name in adapters.adapter_names(editor.model):
        editor.model = adapters.delete_adapter(editor.model, name)
    editor.stack = []


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    p.set_defaults(n=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.quantization)
    editor = Editor(loaded.model, loaded.tokenizer,
                    resolve_config(loaded.model.config.model_type, overrides=overrides(args.set)))
    requests = read_requests(args.data)[: args.n]
    rows = {"base": {"tokens_per_s": tokens_per_second(editor)}}
    print("base", rows["base"], flush=True)
    for size in args.sizes:
        for mode in ("separate", "folded", "kdpo-lora"):
            if (mode == "separate" and size > 100) or (mode != "kdpo-lora" and size == 1):
                continue  # separate: minutes per edit; one adapter is held the same way by all three
            clear(editor)
            names = add_random_stack(editor, size)
            editor.stack = names
            if mode == "folded" and size > 1:
                assert fold(editor.model, names, "kdpo_stack_a")
                editor.stack = ["kdpo_stack_a"]
            elif mode == "kdpo-lora":
                editor.model, editor.stack = compact_stack(editor.model, names)
            adapters.set_active(editor.model, editor.stack)
            row = {"held_as": list(editor.stack), "tokens_per_s": tokens_per_second(editor),
                   "seconds_per_edit": seconds_per_edit(editor, requests)}
            rows[f"{mode}_{size}"] = row
            print(mode, size, row, flush=True)
    first = rows[f"kdpo-lora_{args.sizes[0]}"]
    ratios = {}
    for size in args.sizes[1:]:
        for mode in ("kdpo-lora", "folded", "separate"):
            if f"{mode}_{size}" in rows:
                row = rows[f"{mode}_{size}"]
                ratios[f"edit_seconds_{mode}_{size}_over_{args.sizes[0]}"] = row["seconds_per_edit"] / first["seconds_per_edit"]
                ratios[f"tokens_per_s_{mode}_{size}_over_{args.sizes[0]}"] = row["tokens_per_s"] / first["tokens_per_s"]
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()})
    write(args.out, {"command": " ".join(sys.argv), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
