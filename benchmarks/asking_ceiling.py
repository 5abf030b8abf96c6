"""How often does the unedited model reach its *own* fact through each way of asking?

An edit is trained on one prompt; a user asks a question, a paraphrase or a chat turn. Before
reading an edit's scores on those forms, this measures the same forms for the fact the model
already holds: each request is scored with target_new and target_true swapped, on the unedited
model, with the same scorers `quality.py --asking` uses (teacher-forced paraphrase, greedy
paraphrase, chat question and paraphrase). Rows are reported over all requests and over those
whose true answer the model gives on the edit prompt itself (it "knows" the fact there).

    python benchmarks/asking_ceiling.py --data ../shared/data/counterfact.jsonl --n 100 --out benchmarks/results/asking_ceiling_cf_100.json
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora.evaluate import evaluate_requests  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402

KEYS = ("edit_success", "rephrase_acc", "gen_efficacy", "gen_paraphrase", "chat_question", "chat_paraphrase",
        "long_form", "repetition")


def main() -> None:
    args = parser(__doc__).parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = [r for r in read_requests(args.data)[: args.n] if r.target_true]
    swapped = [replace(r, target_new=r.target_true, target_true=r.target_new, locality=(), portability=())
               for r in requests]
    loaded = load_model(args.model, args.quantization)
    rows = evaluate_requests(loaded.model, loaded.tokenizer, swapped, [[]] * len(swapped), generation=True,
                             asking=True)
    known = [row for row in rows if row["edit_success"] == 1.0]

    def means(group: list[dict]) -> dict:
        return {k: round(mean(row[k] for row in group if k in row), 3) for k in KEYS if any(k in row for row in group)}

    result = {"requests": len(rows), "all": means(rows), "known_on_the_prompt": len(known), "known": means(known)}
    print(result)
    write(args.out, {"command": " ".join(sys.argv), "data": args.data, **result, "rows": rows})


if __name__ == "__main__":
    main()
