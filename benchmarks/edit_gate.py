"""The edit gate (`kdpo_lora/gate.py`) side by side with the adapter served at every token.

Scores a `quality.py` store's edits (one request per batch, after the last edit) twice in one run
with the same routed adapters: served through the gate, as `generate`, `serve` and `eval` serve
them, and without it (the edited distribution at every token, as a PEFT or vLLM export serves it).
Every metric of `evaluate_requests` (teacher-forced, generated, asked through the chat template),
sampled fluency on the edit prompts (as `quality.py` scores it, beside the unedited model's) and the
seconds each pass took.

    python benchmarks/edit_gate.py --store ~/kdpo-runs/ke_s26 \\
        --data kdpo_lora/data/samples/knowedit_wiki_counterfact_test.jsonl --n 30 --out benchmarks/results/edit_gate_ke_30.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402
from kdpo_lora.adapters import only_adapters  # noqa: E402
from kdpo_lora.evaluate import evaluate_requests, fluency, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402

SHOWN = ("edit_success", "locality", "locality_Relation_Specificity", "locality_Forgetfulness", "rephrase_acc",
         "gen_paraphrase", "portability_Subject_Aliasing", "portability", "chat_question", "chat_paraphrase",
         "long_form", "long_form_entropy", "long_form_entropy_unedited", "repetition")


class Ungated:
    """The profile's routes without their gate: each routed prompt gets its adapters' distribution."""

    def __init__(self, route):
        self._route = route

    def __call__(self, prompt: str):
        return self._route(prompt)

    def serve(self, names):
        return self._route.serve(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True, help="a quality.py store holding these requests' edits")
    p.add_argument("--data", required=True, help="the request file the store's edits were made from")
    p.add_argument("--n", type=int, default=30, help="its first N requests (those quality.py --n N edited)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--arms", default="gated,ungated", help="which of the two to score")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = read_requests(args.data)[: args.n]
    ke = KnowledgeEditor(store=args.store)
    ke.use("default")
    tokenizer = ke.loaded.tokenizer
    pre = pre_edit_locality(ke.model, tokenizer, requests)
    prompts = [r.prompt for r in requests]
    with only_adapters(ke.model, ()):
        unedited_fluency = fluency(ke.model, tokenizer, prompts)
    result: dict = {"command": " ".join(sys.argv), "edits": len(requests), "fluency_unedited": round(unedited_fluency, 3)}
    arms = args.arms.split(",")
    for name, route in (("gated", ke.route), ("ungated", Ungated(ke.route))):
        if name not in arms:
            continue
        start = time.perf_counter()
        rows = evaluate_requests(ke.model, tokenizer, requests, pre, True, route, asking=True)
        summary = summarise(rows)
        result[name] = {k: round(summary[k], 4) for k in SHOWN if k in summary}
        result[name]["seconds"] = round(time.perf_counter() - start, 1)
        result[name]["fluency"] = round(fluency(ke.model, tokenizer, prompts, route=route), 3)
        print(name, result[name], flush=True)
    if len(arms) == 2:
        result["seconds_ratio"] = round(result["gated"]["seconds"] / result["ungated"]["seconds"], 2)
    write(args.out, result)


if __name__ == "__main__":
    main()
