"""Store integration on the real model: 3 batches of CounterFact edits, then roll back batch 2.

    python benchmarks/store_rollback.py [--batch-size 4] [--out results.json]

Reports, per batch, how many edits hold (greedy generation starts with target_new and the target is
the teacher-forced argmax) before and after the rollback, and whether batch 2's prompts give exactly
the unedited model's greedy answers again.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import overrides, parser, write  # noqa: E402
from kdpo_lora.evaluate import generation_matches, score_targets  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402


def holds(ke: KnowledgeEditor, requests) -> float:
    prompts, targets = [r.prompt for r in requests], [r.target_new for r in requests]
    tf = [row["argmax"] == row["target"] for row in score_targets(ke.model, ke.loaded.tokenizer, prompts, targets)]
    gen = generation_matches(ke.model, ke.loaded.tokenizer, prompts, targets)
    return sum(a and b for a, b in zip(tf, gen)) / len(requests)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = read_requests(args.data)[: 3 * args.batch_size]
    batches = [requests[i * args.batch_size:(i + 1) * args.batch_size] for i in range(3)]
    with tempfile.TemporaryDirectory() as store:
        ke = KnowledgeEditor(load_model(args.model, args.quantization), store, overrides=overrides(args.set))
        all_prompts = [r.prompt for r in requests]
        unedited = ke.generate(all_prompts, None, max_new_tokens=8)
        unedited_first = ke.generate(all_prompts, None, max_new_tokens=1)
        names = [ke.edit(batch, progress=False).adapter for batch in batches]
        before = [holds(ke, batch) for batch in batches]
        ke.rollback(names[1])
        after = [holds(ke, batch) for batch in batches]
        generated = ke.generate(all_prompts, "default", max_new_tokens=8)
        first = ke.generate(all_prompts, "default", max_new_tokens=1)
        lo, hi = args.batch_size, 2 * args.batch_size
        reverted = sum(g == u for g, u in zip(generated[lo:hi], unedited[lo:hi])) / args.batch_size
        reverted_first = sum(g == u for g, u in zip(first[lo:hi], unedited_first[lo:hi])) / args.batch_size
        ke.apply(names[1])
        reapplied = [holds(ke, batch) for batch in batches]
        verify = ke.store().verify(ke.fingerprint)
    summary = {"batch_size": args.batch_size, "held_before_rollback": before, "held_after_rollback_of_2": after,
               "batch2_same_8_token_generation_as_unedited": reverted,
               "batch2_same_first_answer_token_as_unedited": reverted_first, "held_after_reapply": reapplied,
               "verify_problems": len(verify)}
    print("summary:", summary)
    write(args.out, {"command": " ".join(sys.argv), "summary": summary})


if __name__ == "__main__":
    main()
