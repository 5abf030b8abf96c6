"""Score a `quality.py` store as it stood after its first K edits, with today's evaluation code.

One edit per batch, each batch routed by its subject and trained to hold with the batches below it
off, so the profile of the first K batches is the model after the K-th edit. This scores it with
`KnowledgeEditor.evaluate` (every column, chat ones included), so a run made before a change of
the scoring can be compared with one made after it, on the same edits:

    python benchmarks/score_first.py --store ~/kdpo-runs/cf100_s34 --first 30 \\
        --data ../shared/data/counterfact.jsonl --out benchmarks/results/score_first_cf100_s34_30.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402
from benchmarks.quality import summary_row  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True, help="a quality.py store, one request per batch")
    p.add_argument("--first", type=int, required=True, help="score the profile of the first K batches")
    p.add_argument("--data", required=True, help="the run's request file (its probes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ke = KnowledgeEditor(store=args.store)
    store = ke.store()
    batches = store.profile("default")[: args.first]
    if len(batches) < args.first:
        raise SystemExit(f"{args.store} has {len(batches)} edits, fewer than {args.first}")
    profile = f"first{args.first}"
    if profile not in store.profiles():
        store.create_profile(profile, batches)
    elif store.profile(profile) != batches:
        raise SystemExit(f"profile {profile!r} of {args.store} is not its first {args.first} edits")
    edited = [(r.prompt, r.subject) for b in batches for r in store.requests_of(b)]
    by_key = {(r.prompt, r.subject): r for r in read_requests(args.data)}
    requests = [by_key[key] for key in edited]
    final = ke.evaluate(requests, profile)["summary"]
    print("summary:", summary_row(final), flush=True)
    write(args.out, {"command": " ".join(sys.argv), "edits": len(requests), "final": final,
                     "summary_row": summary_row(final)})


if __name__ == "__main__":
    main()
