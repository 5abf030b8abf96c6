"""Experiment: hold the subject's other relations while an edit trains (issue 31, session 35).

An edit that reaches other wordings of its relation also moves some of the subject's other facts
(KnowEdit zsRE: "Which family does Epaspidoceras belong to?" -> Noctuidae also answers "The taxon
rank of Epaspidoceras is"). Here the KL that holds the subject swaps also holds, per request,
`--hold K` other relations of the request's own subject at the unedited answers: the first
template of K questions of the table (`questions.py`, generic), chosen per request outside the
family of the request's own question. As `relation_wordings.py`, every wording one of the
request's probes contains is left out of training (the other wordings and the held relations), so
every score is out of sample. Everything else is `quality.py`, whose arguments this takes:

    python benchmarks/hold_relations.py --hold 4 --n 30 --batch 1 --checkpoints 1 --threads 1 --no-generation \\
        --data ../shared/data/knowedit_zsre.jsonl --store ~/kdpo-runs/kezsre30_hold --out benchmarks/results/q_kdpo_kezsre_30x1_hold.json
"""

from __future__ import annotations

import random
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kdpo_lora.editor as editor  # noqa: E402
from benchmarks.relation_wordings import _squash, leave_out_probe_wordings  # noqa: E402
from kdpo_lora.questions import _BY_QUESTION, QUESTIONS, asked_relation, template_of  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402

FAMILIES = ("language|tongue|speak|write in", "located|continent|country is|headquartered|come from|capital|twin city",
            " play", r"\bwork\b|occupation|employ", "born|birth|die|death", "makes|owns",
            "family|species|taxon")  # questions whose answers move together


def family(question: str | None) -> str | None:
    return next((f for f in FAMILIES if question and re.search(f, question)), question)


def hold_other_relations(count: int, data: str) -> None:
    probes = {(r.prompt, r.subject or ""): [_squash(p) for p in (*r.rephrase_prompts, *(q.prompt for q in r.locality),
                                                                  *(q.prompt for q in r.portability))]
              for r in read_requests(data)}
    subject_swaps = editor.preservation_prompts

    def with_other_relations(requests, swaps, seed):
        prompts = subject_swaps(requests, swaps, seed)
        for i, r in enumerate(requests):
            if not r.subject or r.subject not in r.prompt:
                continue
            own = family(QUESTIONS.get(template_of(r.prompt, r.subject) or "") or asked_relation(r.prompt, r.subject))
            seen = probes.get((r.prompt, r.subject), [])
            others = [t.format(r.subject) for q, templates in _BY_QUESTION.items() if family(q) != own
                      for t in templates[:1]]
            others = [p for p in others if not any(_squash(p) in s for s in seen)]
            prompts += random.Random(seed * 1_000_003 + i + 1).sample(others, count)
        return prompts

    editor.preservation_prompts = with_other_relations


def main() -> None:
    args = sys.argv[1:]
    at = args.index("--hold")
    count = int(args[at + 1])
    del args[at:at + 2]
    data = args[args.index("--data") + 1]
    leave_out_probe_wordings(data)
    hold_other_relations(count, data)
    sys.argv = [str(ROOT / "benchmarks" / "quality.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
