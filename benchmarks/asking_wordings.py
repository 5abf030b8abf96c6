"""Does an edit's chat answer hold when the question is worded otherwise than the one it trained?

The default edit trains the fact's question (`questions.question`) as a chat turn, and the chat
question metric asks that same question: it shows the edit reaches chat, not that it reaches the
ways people word a question. This asks the stored edits of a `quality.py` run in wordings no edit
trains ("Quick question: ...", "... Answer in one word.", "I have a question about {subject}. ...",
"Complete the sentence: {prompt} ..."), through the chat template without a system prompt, greedy
24 tokens, served as the router serves them, scored like `chat_question`; next to the trained
wording and the unedited model on each.

    python benchmarks/asking_wordings.py --store ~/kdpo-runs/cf30_s26 --out benchmarks/results/asking_wordings_cf_30.json
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402
from kdpo_lora.adapters import only_adapters  # noqa: E402
from kdpo_lora.asking import ANSWER_TOKENS, chat, greedy_tokens, right  # noqa: E402
from kdpo_lora.evaluate import _routed  # noqa: E402
from kdpo_lora.questions import question  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402

WORDINGS = {
    "trained question": "{question}",
    "quick question": "Quick question: {question}",
    "one word": "{question} Answer in one word.",
    "about the subject": "I have a question about {subject}. {question}",
    "complete the sentence": "Complete the sentence: {prompt} ...",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True, help="a quality.py store, one request per batch")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ke = KnowledgeEditor(store=args.store)
    ke.use("default")
    requests = [r for b in ke.store().profile("default") for r in ke.store().requests_of(b) if r.subject]
    tokenizer = ke.loaded.tokenizer
    result: dict = {"command": " ".join(sys.argv), "edits": len(requests)}
    for name, wording in WORDINGS.items():
        prompts = [chat(tokenizer, wording.format(question=question(r.prompt, r.subject), subject=r.subject,
                                                  prompt=r.prompt), system=False) for r in requests]
        edited = _routed(ke.model, ke.route, partial(greedy_tokens, ke.model, tokenizer, max_new_tokens=ANSWER_TOKENS), prompts)
        with only_adapters(ke.model, ()):
            unedited = greedy_tokens(ke.model, tokenizer, prompts, ANSWER_TOKENS)
        score = [mean(right(tokenizer.decode(a, skip_special_tokens=True), r) for a, r in zip(answers, requests))
                 for answers in (edited, unedited)]
        result[name] = {"edited": round(score[0], 3), "unedited": round(score[1], 3)}
        print(name, result[name], flush=True)
    write(args.out, result)


if __name__ == "__main__":
    main()
