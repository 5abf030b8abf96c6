"""Experiment (RESULTS 10, session 32): an edit's context rounds state its fact in other wordings.

The defaults train each request as given and in `context_prefixes` rounds: a generic sentence
before the prompt, the last round the chat turn. An edit then answers the wording it was trained on
(paraphrase 0.14 on CounterFact 30). Here the generic rounds put another wording of the same
relation after their sentence instead of the prompt itself: a template of the prompt's question
in the package's question table (`questions._BY_QUESTION`, "{} is located in" -> "{}, which is
located in", "The location of {} is", ...), filled with the request's subject. No extra rows, no
extra tokens to speak of; a prompt whose template the table lacks (zsRE, KnowEdit, most user
prompts) trains as before.

`--held-out` leaves out every wording a request's own rephrase prompts contain, so its paraphrase
scores measure wordings the edit never saw (the table holds some CounterFact rephrase wordings; a
user's wording is not in it either). Everything else is `quality.py`, whose arguments this takes:

    python benchmarks/relation_wordings.py --held-out --n 30 --batch 1 --checkpoints 1 --threads 1 --asking \\
        --data ../shared/data/counterfact.jsonl --store ~/kdpo-runs/cf30_wordings --out benchmarks/results/q_kdpo_cf_30x1_wordings.json
"""

from __future__ import annotations

import random
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kdpo_lora.editor as editor  # noqa: E402
from kdpo_lora.questions import _BY_QUESTION, QUESTIONS, template_of  # noqa: E402
from kdpo_lora.regularisers import with_context  # noqa: E402


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def other_wordings(prompt: str, subject: str, avoid: tuple[str, ...] = ()) -> list[str]:
    """The prompt's relation in the table's other wordings, filled with the subject; none that any of
    `avoid` contains."""
    template = template_of(prompt, subject)
    if template not in QUESTIONS:
        return []
    avoided = [_squash(a) for a in avoid]
    wordings = [t.format(subject) for t in _BY_QUESTION[QUESTIONS[template]] if t != template]
    return [w for w in wordings if not any(_squash(w) in a for a in avoided)]


def install(held_out: bool) -> None:
    def in_other_wordings(requests, count, seed, tokenizer=None):
        rows = with_context(requests, count, seed, tokenizer)
        n, generic = len(requests), count - (1 if getattr(tokenizer, "chat_template", None) else 0)
        for i, r in enumerate(requests):
            avoid = tuple(r.rephrase_prompts) if held_out else ()
            wordings = other_wordings(r.prompt, r.subject or "", avoid)
            random.Random(seed * 1_000_003 + i + 7).shuffle(wordings)
            for k, wording in zip(range(min(count, generic)), wordings):
                row = n * (k + 1) + i
                prompt, target = rows[row]
                rows[row] = (prompt[:len(prompt) - len(r.prompt)] + wording, target)
        return rows

    editor.with_context = in_other_wordings


def main() -> None:
    args = sys.argv[1:]
    held_out = "--held-out" in args
    if held_out:
        args.remove("--held-out")
    install(held_out)
    sys.argv = [str(ROOT / "benchmarks" / "quality.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
