"""The router's key fallback (`kdpo_lora/subject_keys.py`): what it reaches, and what it routes by mistake.

Keys of N KnowEdit requests that have Subject_Aliasing probes, plus keys of further CounterFact
requests up to --keys in all (the false routes grow with the number of keys). Measured at each
margin over the shipped calibration: the share of alias probes that name no subject literally (so
subject routing misses them) whose own edit's key they reach, and the share of unrelated prompts -
other CounterFact prompts and neighbourhood probes, as written and inside the chat template - that
some key routes. No adapters: a key is the unedited model's.

With --store (a quality.py store of the first --store-n requests of the --unrelated file), also what
a false route costs: locality when every neighbourhood probe is served by another request's edit,
through the edit gate and without it.

    python benchmarks/key_fallback.py --data ../shared/data/knowedit_wiki_counterfact_test.jsonl \\
        --unrelated ../shared/data/counterfact.jsonl --n 80 --keys 1000 --store ~/kdpo-runs/cf30_s26
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import given_aliases, parser, write  # noqa: E402
from kdpo_lora import subject_keys  # noqa: E402
from kdpo_lora.evaluate import Probes, evaluate_requests, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.routing import SubjectRouter  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402

MARGINS = (0.05, 0.08, 0.1, 0.12, 0.15, 0.2)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--unrelated", required=True, help="CounterFact file: its first 400 requests give the unrelated "
                                                      "prompts, those after them the further keys")
    p.add_argument("--keys", type=int, default=1000, help="keys in all (KnowEdit's N, then CounterFact's)")
    p.add_argument("--store", help="a quality.py store of the --unrelated file's first --store-n requests")
    p.add_argument("--store-n", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cost = false_route_cost(args.store, read_requests(args.unrelated)[:args.store_n]) if args.store else None
    loaded = load_model(args.model, args.quantization)
    keys = subject_keys.SubjectKeys(SimpleNamespace(model=loaded.model, tokenizer=loaded.tokenizer), loaded.fingerprint)
    named = [r for r in map(given_aliases, read_requests(args.data)) if r.aliases and r.subject in r.prompt][:args.n]
    others = read_requests(args.unrelated)
    extra = [r for r in others[400:] if r.subject and r.subject in r.prompt][:max(0, args.keys - len(named))]
    requests = [replace(r, aliases=()) for r in named] + extra
    start = time.perf_counter()
    made = keys.keys(requests)
    key_seconds = (time.perf_counter() - start) / len(requests)
    matrix = torch.stack([k for k, _ in made])
    base = torch.tensor([t for _, t in made]) - subject_keys.MARGIN  # the calibrated closest, without margin

    router = SubjectRouter([(str(i), [r]) for i, r in enumerate(requests[:len(named)])])
    probes = [(i, probe.prompt) for i, r in enumerate(named) for probe in r.portability
              if probe.type == "Subject_Aliasing" and str(i) not in router.route(probe.prompt)]
    plain = [r.prompt for r in others[200:400]] + [probe.prompt for r in others[:100] for probe in r.locality[:2]]
    chat = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True) for text in plain[::3]]
    start = time.perf_counter()
    probe_scores = [(i, keys.closest(text, matrix)[0]) for i, text in probes]
    plain_scores = torch.stack([keys.closest(text, matrix)[0] for text in plain])
    route_seconds = (time.perf_counter() - start) / (len(probes) + len(plain))
    chat_scores = torch.stack([keys.closest(text, matrix)[0] for text in chat])
    rows = []
    for margin in MARGINS:
        threshold = base + margin
        rows.append({"margin": margin,
                     "unnamed_alias_probes_reached": round(sum(float(s[i] > threshold[i]) for i, s in probe_scores)
                                                           / len(probe_scores), 3),
                     "unrelated_routed": round(float((plain_scores > threshold).any(1).float().mean()), 3),
                     "unrelated_chat_routed": round(float((chat_scores > threshold).any(1).float().mean()), 3)})
        print(rows[-1], flush=True)
    write(args.out, {"command": " ".join(sys.argv), "keys": len(requests), "layer": keys.layer,
                     "default_margin": subject_keys.MARGIN, "unnamed_alias_probes": len(probes),
                     "unrelated_prompts": len(plain), "unrelated_chat_prompts": len(chat),
                     "seconds_per_key": round(key_seconds, 4), "seconds_per_routed_prompt": round(route_seconds, 4),
                     "rows": rows, "false_route_cost": cost})


def false_route_cost(store: str, requests: list) -> dict:
    """Locality (teacher-forced, against the unedited answers) when each request's neighbourhood
    probes are served by the edit of the request 7 places on, gated and ungated."""
    ke = KnowledgeEditor(store=store)
    ke.use("default")
    route, tokenizer = ke.route, ke.loaded.tokenizer
    batch = [route(r.prompt)[0] for r in requests]
    wrong = {pair[0]: [batch[(i + 7) % len(requests)]] for i, r in enumerate(requests) for pair in Probes.of(r).locality}

    class Misrouted:
        def __call__(self, prompt: str):
            return wrong.get(prompt) or route(prompt)

        def serve(self, names):
            return route.serve(names)

    class MisroutedGated(Misrouted):
        def gate(self, names):
            return route.gate(names)

    pre = pre_edit_locality(ke.model, tokenizer, requests)
    out = {}
    for name, misrouted in (("gated", MisroutedGated()), ("ungated", Misrouted())):
        rows = evaluate_requests(ke.model, tokenizer, requests, pre, False, misrouted)
        out[name] = round(summarise(rows)["locality"], 4)
        print("locality, every neighbourhood probe served by another edit:", name, out[name], flush=True)
    return out


if __name__ == "__main__":
    main()
