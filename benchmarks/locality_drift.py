"""Which edit moved which neighbour? Replays a store kept by `quality.py --store DIR` one batch at a
time and records, for every locality probe of every edited request, the batches after which its
answer tokens stop (or start again) matching the unedited model's.

    python benchmarks/quality.py ... --store /tmp/run        # any sequential run, kept
    python benchmarks/locality_drift.py --store /tmp/run --out benchmarks/results/locality_drift.json

A probe "flips" at batch k when its answer tokens matched the unedited model's with batches 1..k-1
active and no longer do with 1..k; "own" flips happen at the probe's own batch, "later" ones at a
batch edited afterwards. Same relation: the culprit's prompt, subject blanked, equals the probe's
request's. The lead is the unedited model's top-1 minus runner-up log-prob at the first answer token.
A flip is "pushed down" where the neighbour's unedited first answer token is one the culprit pushed
down (its answer at a target position before it, KDPO's negative), "pulled up" where its new first
answer token is one of the culprit's target tokens (kdpo_lora/guards.py holds such places).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from benchmarks.locality_margins import answer_leads  # noqa: E402
from kdpo_lora import adapters  # noqa: E402
from kdpo_lora.evaluate import score_targets  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402
from kdpo_lora.store import DEFAULT_PROFILE  # noqa: E402


def relation(request) -> str:
    return request.prompt.replace(request.subject, "{}") if request.subject else request.prompt


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--store", required=True, help="a store kept by quality.py --store")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ke = KnowledgeEditor(load_model(args.model, args.quantization), store=args.store, fold_stack=False)
    names = ke.use(DEFAULT_PROFILE)  # each batch its own adapter, so any prefix of the stack can be switched on
    store, tokenizer = ke.store(), ke.loaded.tokenizer
    probes = []  # (batch index, request, prompt, answer)
    for b, name in enumerate(names):
        for request in store.requests_of(name):
            probes += [(b, request, probe.prompt, probe.answer) for probe in request.locality]

    def answers(k: int) -> list[list[int]]:
        with torch.no_grad(), adapters.only_adapters(ke.model, names[:k]):
            return [row["argmax"] for row in score_targets(ke.model, tokenizer, [q[2] for q in probes],
                                                           [q[3] for q in probes])]

    def moved_tokens(k: int, requests) -> tuple[set[int], set[int]]:
        """Batch k's pushed-down tokens (the answers at its target positions with batches 1..k-1 on, where
        they are not the target: KDPO's negatives) and its pulled-up ones (the target tokens)."""
        with torch.no_grad(), adapters.only_adapters(ke.model, names[:k - 1]):
            rows = score_targets(ke.model, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        return ({a for row in rows for a, t in zip(row["argmax"], row["target"]) if a != t},
                {t for row in rows for t in row["target"]})

    pre = answers(0)
    with adapters.only_adapters(ke.model, ()):
        leads = [answer_leads(ke.model, tokenizer, q[2], q[3])[0] for q in probes]
    same_before = [True] * len(probes)
    events, curve = [], []
    for k in range(1, len(names) + 1):
        now = answers(k)
        culprit = store.requests_of(names[k - 1])
        pushed_down, pulled_up = moved_tokens(k, culprit)
        for i, (b, request, prompt, _) in enumerate(probes):
            if b >= k:
                continue
            same = now[i] == pre[i]
            if same != same_before[i]:
                events.append({"probe": i, "probe_batch": b + 1, "batch": k, "flip": not same,
                               "own": b == k - 1, "same_relation": any(relation(c) == relation(request) for c in culprit),
                               "before": tokenizer.decode(pre[i][:1]), "after": tokenizer.decode(now[i][:1]),
                               "lead": leads[i], "pushed_down": pre[i][0] in pushed_down,
                               "pulled_up": now[i][0] in pulled_up})
            same_before[i] = same
        active = [i for i, q in enumerate(probes) if q[0] < k]
        token_share = [sum(x == y for x, y in zip(now[i], pre[i])) / len(pre[i]) for i in active]
        curve.append({"batches": k, "locality": statistics.mean(token_share)})
        print(f"{k}/{len(names)}: locality {curve[-1]['locality']:.3f}", flush=True)
    flips = [e for e in events if e["flip"]]
    later = [e for e in flips if not e["own"]]
    moved = {i for i, s in enumerate(same_before) if not s}
    summary = {
        "probes": len(probes), "batches": len(names),
        "changed_at_end": len(moved), "flips": len(flips), "own_batch_flips": len(flips) - len(later),
        "later_flips": len(later), "later_flips_same_relation": sum(e["same_relation"] for e in later),
        # the culprit pushed the neighbour's unedited first answer token down (its negative) / its own
        # target up into the neighbour's first answer position
        "later_flips_pushed_down": sum(e["pushed_down"] for e in later),
        "later_flips_pulled_up": sum(e["pulled_up"] for e in later),
        "later_flips_either": sum(e["pushed_down"] or e["pulled_up"] for e in later),
        "flips_back": len(events) - len(flips),
        "median_lead_changed_at_end": statistics.median([leads[i] for i in moved]) if moved else None,
        "median_lead_kept": statistics.median([leads[i] for i in range(len(probes)) if i not in moved]),
        "changed_at_end_by_first_token": {t: sum(tokenizer.decode(pre[i][:1]) == t for i in moved)
                                          for t in sorted({tokenizer.decode(pre[i][:1]) for i in moved})},
    }
    print(summary)
    write(args.out, {"command": " ".join(sys.argv), "store": args.store, **summary, "curve": curve, "events": events})


if __name__ == "__main__":
    main()
