"""How fragile is argmax locality? The unedited model's lead of its answer token over the runner-up
at every answer position of the locality probes: a probe whose lead is small flips under any drift.

    python benchmarks/locality_margins.py --n 100 --out benchmarks/results/locality_margins.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora import objectives as obj  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402

THRESHOLDS = (0.1, 0.25, 0.5, 1.0, 2.0)


@torch.no_grad()
def answer_leads(model, tokenizer, prompt: str, answer: str) -> list[float]:
    """At each answer position, the model's top log-prob minus its runner-up's (nats)."""
    prompt_ids, answer_ids = obj.tokenize_pair(tokenizer, prompt, answer)
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt_ids + answer_ids], device=device)).logits
    top2 = logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1).topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.quantization)
    leads = []
    for request in read_requests(args.data)[: args.n]:
        for probe in request.locality:
            leads += answer_leads(loaded.model, loaded.tokenizer, probe.prompt, probe.answer)
    result = {"answer_tokens": len(leads), "median_lead": statistics.median(leads),
              "share_below": {str(t): sum(v < t for v in leads) / len(leads) for t in THRESHOLDS}}
    print(result)
    write(args.out, {"command": " ".join(sys.argv), "data": args.data, "n": args.n, **result})


if __name__ == "__main__":
    main()
