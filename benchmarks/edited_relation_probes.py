"""Which "other facts" probes ask the edited fact itself?

KnowEdit's `Relation_Specificity` probes hold the subject's other facts at their old answers. In
KnowEdit zsRE, about one request in six has such a probe whose answer is the edited fact's own old
answer: "What constellation is home to Butterfly Cluster?" Scorpius -> X is probed by "The
constellation of Butterfly Cluster is" -> Scorpius. An edit that reaches other wordings of its
relation must fail those probes. This scores a `quality.py` store's probes after its last edit,
served as the router serves them, per probe (the locality metric: the answer's argmax tokens as
the unedited model gives them), apart for the probes whose answer is the request's old answer:

    python benchmarks/edited_relation_probes.py --store ~/kdpo-runs/kezsre30_rel_s34 \\
        --data ../shared/data/knowedit_zsre.jsonl --out benchmarks/results/edited_relation_probes_kezsre30.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write  # noqa: E402
from benchmarks.relation_wordings import _squash  # noqa: E402
from kdpo_lora.adapters import only_adapters  # noqa: E402
from kdpo_lora.evaluate import _score_pairs  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True, help="a quality.py store, one request per batch")
    p.add_argument("--data", required=True, help="the run's request file (its probes)")
    p.add_argument("--kind", default="Relation_Specificity", help="the locality probe type to score")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ke = KnowledgeEditor(store=args.store)
    ke.use("default")
    edited = {(r.prompt, r.subject) for b in ke.store().profile("default") for r in ke.store().requests_of(b)}
    requests = [r for r in read_requests(args.data) if (r.prompt, r.subject) in edited]
    probes = [(r, q) for r in requests for q in r.locality if q.type == args.kind]
    pairs = [(q.prompt, q.answer) for _, q in probes]
    with only_adapters(ke.model, ()):
        before = _score_pairs(ke.model, ke.loaded.tokenizer, pairs)
    after = _score_pairs(ke.model, ke.loaded.tokenizer, pairs, ke.route)
    kept = [mean(a == b for a, b in zip(x["argmax"], y["argmax"])) for x, y in zip(after, before)]
    old = [_squash(q.answer) == _squash(r.target_true or "") for r, q in probes]
    result = {"command": " ".join(sys.argv), "requests": len(requests), "probes": len(probes),
              "kept, all": round(mean(kept), 3)}
    for name, flag in (("asks the edited fact", True), ("other facts", False)):
        chosen = [k for k, o in zip(kept, old) if o == flag]
        result[f"kept, {name}"] = round(mean(chosen), 3) if chosen else None
        result[f"probes, {name}"] = len(chosen)
    result["moved"] = [{"prompt": q.prompt, "old answer": q.answer, "edit": f"{r.prompt} -> {r.target_new}",
                        "asks the edited fact": o, "kept": round(k, 3)}
                       for (r, q), k, o in zip(probes, kept, old) if k < 1]
    print({k: v for k, v in result.items() if k != "moved"}, flush=True)
    write(args.out, result)


if __name__ == "__main__":
    main()
