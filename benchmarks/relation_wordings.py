"""Do an edit's other wordings (the default, RESULTS 10 session 32) reach wordings it never saw?

The defaults' context rounds state each fact in the question table's other wordings of its
relation (`questions.other_wordings`). The table holds some of CounterFact's rephrase wordings, so
a paraphrase score could be in-sample. This run leaves out, for every request, each wording that
one of its own rephrase prompts contains: its paraphrase scores then measure only wordings the edit
never trained. Everything else is `quality.py`, whose arguments this takes:

    python benchmarks/relation_wordings.py --n 30 --batch 1 --checkpoints 1 --threads 1 --asking \\
        --data ../shared/data/counterfact.jsonl --store ~/kdpo-runs/cf30_heldout --out benchmarks/results/q_kdpo_cf_30x1_wordings_heldout.json
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kdpo_lora.regularisers as regularisers  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402


def _squash(text: str) -> str:
    return " ".join(text.lower().split())


def leave_out_probe_wordings(data: str) -> None:
    rephrases = {(r.prompt, r.subject or ""): [_squash(p) for p in r.rephrase_prompts] for r in read_requests(data)}
    other_wordings = regularisers.other_wordings

    def unseen_wordings(prompt: str, subject: str) -> list[str]:
        probes = rephrases.get((prompt, subject), [])
        return [w for w in other_wordings(prompt, subject) if not any(_squash(w) in p for p in probes)]

    regularisers.other_wordings = unseen_wordings


def main() -> None:
    leave_out_probe_wordings(sys.argv[sys.argv.index("--data") + 1])
    sys.argv = [str(ROOT / "benchmarks" / "quality.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
