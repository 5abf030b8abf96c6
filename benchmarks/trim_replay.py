"""What would trimming have done to a stack already trained? Replays a store kept by
`quality.py --store DIR` one batch at a time, scaling each batch's LoRA B down (`Editor._trim`, the
`trim_margin` setting) to the smallest factor at which its targets still lead by `--margin` nats with
the (trimmed) batches before it on, and scores every edit so far each `--every` batches.

    python benchmarks/trim_replay.py --store /tmp/run --margin 1.0 --out benchmarks/results/trim_replay.json

Post hoc: each batch was trained on the untrimmed stack, so this is an upper bound on what trimming
while editing (`--set trim_margin=...` in quality.py) can give, not a measurement of it.
The store is read, never written.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora import adapters  # noqa: E402
from kdpo_lora.evaluate import evaluate_requests, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402
from kdpo_lora.store import DEFAULT_PROFILE  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--store", required=True, help="a store kept by quality.py --store")
    p.add_argument("--margin", type=float, default=1.0, help="nats each batch's targets keep over the runner-up")
    p.add_argument("--every", type=int, default=10, help="score every edit so far after this many batches")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the batches are replayed as one shared stack (each trimmed with those before it on)
    ke = KnowledgeEditor(load_model(args.model, args.quantization), store=args.store, fold_stack=False,
                         config=Path(__file__).resolve().parent.parent / "configs" / "unrouted.yaml")
    names = ke.use(DEFAULT_PROFILE)
    store, tokenizer, editor = ke.store(), ke.loaded.tokenizer, ke.editor
    batches = [store.requests_of(name) for name in names]
    pre = pre_edit_locality(ke.model, tokenizer, [r for batch in batches for r in batch])
    scales, curve = [], []
    for k, (name, requests) in enumerate(zip(names, batches), start=1):
        encoded = editor.encode([r.prompt for r in requests], [r.target_new for r in requests],
                                editor.config.max_target_tokens, len(requests))
        scales.append(editor._trim(encoded, args.margin, name, [names[:k - 1]]))
        if k % args.every == 0 or k == len(names):
            done = [r for batch in batches[:k] for r in batch]
            with torch.no_grad(), adapters.only_adapters(ke.model, names[:k]):
                rows = evaluate_requests(ke.model, tokenizer, done, pre[:len(done)], generation=False)
            curve.append({"edits": len(done), **summarise(rows)})
            print(f"{k}/{len(names)}: median scale {statistics.median(scales):.3f}, "
                  + ", ".join(f"{key} {curve[-1][key]:.3f}" for key in ("edit_success", "rephrase_acc", "locality")),
                  flush=True)
    write(args.out, {"command": " ".join(sys.argv), "store": args.store, "margin": args.margin,
                     "median_scale": statistics.median(scales), "scales": scales, "curve": curve})


if __name__ == "__main__":
    main()
