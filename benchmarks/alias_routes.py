"""Does the router reach a subject named otherwise, without routing prompts about someone else?

For each KnowEdit request, its Subject_Aliasing probes (the edit prompt naming the subject by another
name: "Michael Jeffrey Jordan", "President Biden", "USSR") are routed by a router of that request
alone; CounterFact's neighbourhood prompts (other subjects) are routed by one router of the first
1000 CounterFact requests, each its own batch: a neighbour routed to a batch is one the edits may
change; so are the prompts of later CounterFact records about other subjects, and Natural
Questions. Both with the names as written (accents, case and spacing aside) and with the router's
looser forms (`routing.name_patterns`). With `--store` (a `quality.py` KnowEdit run),
also the aliasing score itself: each alias probe scored teacher-forced as each router serves it.

    python benchmarks/alias_routes.py --knowedit ../shared/data/knowedit_wiki_counterfact_test.jsonl \
        --counterfact ../shared/data/counterfact.jsonl --nq ../shared/data/zsre_portability.jsonl
    ... --store STORE --edited kdpo_lora/data/samples/knowedit_wiki_counterfact_test.jsonl --n 29   # and the score
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402
from kdpo_lora import routing  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402


def router(batches, looser: bool) -> routing.SubjectRouter:
    built = routing.SubjectRouter(batches)
    if not looser:
        built.patterns = [p for p in built.patterns if " named " not in p[1]]
    return built


def alias_probes(path: str) -> list[tuple[object, str]]:
    return [(r, p.prompt) for r in read_requests(path) if r.subject for p in r.portability if p.type == "Subject_Aliasing"]


def other_prompts(path: str, edited) -> list[str]:
    """Prompts of CounterFact records 1000-6000 about subjects none of `edited` has: none should route."""
    subjects = {r.subject.casefold() for r in edited}
    return [q for r in read_requests(path)[1000:6000] if r.subject.casefold() not in subjects
            for q in (r.prompt, *r.rephrase_prompts, *(loc.prompt for loc in r.locality))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--knowedit", nargs="+", required=True)
    p.add_argument("--counterfact", required=True)
    p.add_argument("--nq", help="a zsRE file whose locality probes are Natural Questions, none of which should route")
    p.add_argument("--store", help="a quality.py store of KnowEdit edits, one per batch, to score the alias probes on")
    p.add_argument("--edited", help="the request file the store's run edited (default: the first --knowedit)")
    p.add_argument("--n", type=int, default=30, help="how many of its requests the run edited")
    p.add_argument("--out")
    args = p.parse_args()
    result: dict = {}
    cf = read_requests(args.counterfact)[:1000]
    for looser in (False, True):
        form = "all forms" if looser else "as written"
        for path in args.knowedit:
            probes = alias_probes(path)
            hits = sum(bool(router([("b", [r])], looser).route(prompt)) for r, prompt in probes)
            result[f"{Path(path).stem}: alias probes routed, {form}"] = [hits, len(probes)]
        everyone = router([(str(i), [r]) for i, r in enumerate(cf)], looser)
        wrong = sum(any(b != str(i) for b in everyone.route(loc.prompt)) for i, r in enumerate(cf) for loc in r.locality)
        result[f"counterfact neighbours routed to another batch (1000 edits), {form}"] = [wrong, sum(len(r.locality) for r in cf)]
        others = other_prompts(args.counterfact, cf)
        result[f"other counterfact prompts routed (records 1000-6000, other subjects), {form}"] = [
            sum(bool(everyone.route(q)) for q in others), len(others)]
        if args.nq:
            questions = [loc.prompt for r in read_requests(args.nq) for loc in r.locality]
            result[f"natural questions routed (1000 edits), {form}"] = [sum(bool(everyone.route(q)) for q in questions), len(questions)]
        print(form, {k: v for k, v in result.items() if k.endswith(form)}, flush=True)
    if args.store:
        result.update(score_store(args.store, args.edited or args.knowedit[0], args.n))
        print(result)
    write(args.out, {"command": " ".join(sys.argv), **result})


def score_store(store: str, path: str, n: int) -> dict:
    from kdpo_lora.evaluate import score_targets, token_accuracy
    from kdpo_lora.session import KnowledgeEditor

    ke = KnowledgeEditor(store=store)
    ke.use("default")
    batches = ke.store().profile("default")
    stored = [(b, ke.store().requests_of(b)) for b in batches]
    requests = read_requests(path)[:n]
    keys = {r.key for r in requests}
    stored = [(b, rs) for b, rs in stored if any(r.key in keys for r in rs)]
    out = {}
    for looser in (False, True):
        built = router(stored, looser)
        route = lambda prompt, built=built: built.route(prompt)  # noqa: E731
        route.serve = ke.route.serve
        edited = [r for r in requests if any(r.key in {x.key for x in rs} for _, rs in stored)]
        probes = [(i, p.prompt, r.target_new) for i, r in enumerate(edited) for p in r.portability
                  if p.type == "Subject_Aliasing"]
        rows = score_targets(ke.model, ke.loaded.tokenizer, [q for _, q, _ in probes], [t for _, _, t in probes], route)
        per = [mean(token_accuracy(row) for (i, _, _), row in zip(probes, rows) if i == k)
               for k in sorted({i for i, _, _ in probes})]
        routed = [bool(built.route(q)) for _, q, _ in probes]
        form = "all forms" if looser else "as written"
        out[f"aliasing score ({len(per)} edits), {form}"] = round(mean(per), 3)
        out[f"alias probes routed ({len(per)} edits), {form}"] = [sum(routed), len(routed)]
        out[f"token accuracy on routed probes, {form}"] = round(mean(
            token_accuracy(row) for row, hit in zip(rows, routed) if hit), 3) if any(routed) else None
    return out


if __name__ == "__main__":
    main()
