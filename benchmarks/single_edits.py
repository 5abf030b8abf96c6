"""Single edits (each from the unedited model) on real records: edit success, generation, locality, time.

    python benchmarks/single_edits.py --n 50 [--set learning_rate=5e-4 ...] [--out results.json]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from benchmarks.common import overrides, parser, write  # noqa: E402
from kdpo_lora.config import resolve_config  # noqa: E402
from kdpo_lora.editor import Editor  # noqa: E402
from kdpo_lora.errors import RequestError  # noqa: E402
from kdpo_lora.evaluate import evaluate_request, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--no-generation", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.quantization)
    config = resolve_config(loaded.model.config.model_type, overrides=overrides(args.set))
    editor = Editor(loaded.model, loaded.tokenizer, config)
    requests = read_requests(args.data)[: args.n]
    pre = pre_edit_locality(editor.model, editor.tokenizer, requests)
    rows, seconds, already = [], [], 0
    for i, request in enumerate(requests):
        start = time.perf_counter()
        try:
            result = editor.edit([request], progress=False)
        except RequestError:
            already += 1
            continue
        seconds.append(time.perf_counter() - start)
        row = evaluate_request(editor.model, editor.tokenizer, request, pre[i], generation=not args.no_generation)
        row["cycles"] = result.cycles
        rows.append(row)
        editor.remove(result.adapter)
        print(f"[{i + 1}/{len(requests)}] {seconds[-1]:.1f}s " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
    summary = summarise(rows)
    summary["median_seconds_per_edit"] = statistics.median(seconds)
    summary["edits"] = len(rows)
    summary["already_satisfied"] = already
    print("config:", config.to_dict())
    print("summary:", {k: round(v, 4) for k, v in summary.items()})
    write(args.out, {"command": " ".join(sys.argv), "config": config.to_dict(), "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
