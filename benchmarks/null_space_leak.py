"""How null is the null space? For each adapted layer, the share of other text's input energy that falls
inside the basis the edits are confined to (by construction 1% on the text it was estimated from).

Bases from the shipped generic text alone, and from it plus half of the passages the base model writes
itself (`sampled_texts`), each with every text's first token counted with the rest (one second moment
over all tokens) and apart (`null_space_first_token: apart`); measured - on the tokens after the first,
which is what an edit could disturb - on the other half of those passages (held out), on the locality
prompts of `--data` (should stay out of the basis) and on its edit prompts (the edit has to be written
through the basis). Median and largest share over the adapted layers.

    python benchmarks/null_space_leak.py --n 100 --out benchmarks/results/null_space_leak_first_token.json
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import parser, write  # noqa: E402
from kdpo_lora.config import resolve_config  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.nullspace import generic_texts, input_covariances, null_space_basis, sampled_texts  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--energy", type=float, default=0.01)
    p.add_argument("--samples", type=int, default=None, help="default: the family config's null_space_samples")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.quantization)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = resolve_config(model.config.model_type)  # the layers an edit adapts by default
    layers = config.layer_indices(model.config.num_hidden_layers) or list(range(model.config.num_hidden_layers))
    args.samples = config.null_space_samples if args.samples is None else args.samples
    modules = {kind: [f"model.layers.{i}.mlp.{kind}" for i in layers] for kind in ("gate_proj", "down_proj")}
    every = [m for ms in modules.values() for m in ms]
    sampled = sampled_texts(model, tokenizer, args.samples)
    requests = read_requests(args.data)[: args.n]
    estimate = {"shipped": generic_texts(), "shipped + half the samples": generic_texts() + sampled[0::2]}
    measure = {"held-out samples": sampled[1::2],
               "locality prompts": [f"{q.prompt} {q.answer}" for r in requests for q in r.locality],
               "edit prompts": [r.prompt for r in requests]}
    measured = {name: input_covariances(model, tokenizer, texts, every, "skip") for name, texts in measure.items()}
    rows = []
    for (source, texts), first_token in itertools.product(estimate.items(), ("with_rest", "apart")):
        covariances = input_covariances(model, tokenizer, texts, every, first_token)
        for kind, paths in modules.items():
            bases = {m: null_space_basis(covariances[m], args.energy, first_token) for m in paths}
            row = {"bases from": source, "first token": first_token, "module": kind,
                   "median dims": statistics.median(b.shape[1] for b in bases.values()),
                   "input width": bases[paths[0]].shape[0]}
            for name, covs in measured.items():
                shares = [float(torch.trace(bases[m].T @ covs[m] @ bases[m]) / torch.trace(covs[m])) for m in paths]
                row[f"{name}: energy share in basis (median)"] = statistics.median(shares)
                row[f"{name}: energy share in basis (largest layer)"] = max(shares)
            rows.append(row)
            print(row, flush=True)
    write(args.out, {"command": " ".join(sys.argv), "data": args.data, "n": args.n, "energy": args.energy,
                     "samples": args.samples, "layers": layers, "rows": rows})


if __name__ == "__main__":
    main()
