"""Could a router find an edited subject that a prompt does not name? (issue 31's semantic fallback)

Each edit would store a key: the unedited model's hidden state (layer L) at the last token of its
subject in its prompt. A prompt naming no edited subject would be served by a batch when one of its
tokens' hidden states is closer to the batch's key (cosine) than any token of a set of unrelated
calibration prompts came, plus a margin. Measured here, on KnowEdit requests that have
Subject_Aliasing probes: how many alias probes each key would catch (alias hit), and how many
unrelated prompts would be routed to some edit (false routes, with the keys of all N edits) -
which is what locality pays.

    python benchmarks/alias_keys.py --data ../shared/data/knowedit_wiki_counterfact_test.jsonl \
        --unrelated ../shared/data/counterfact.jsonl --n 80
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import given_aliases, parser, write  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.regularisers import PREFIXES_FILE, _lines  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402

MARGINS = (0.0, 0.02, 0.05, 0.1)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--unrelated", required=True, help="request file whose prompts (and neighbourhood probes) "
                                                      "serve as unrelated prompts: the first half calibrates")
    p.add_argument("--layers", default="4,8,12,16,20")
    args = p.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    layers = [int(x) for x in args.layers.split(",")]
    loaded = load_model(args.model, args.quantization)
    model, tokenizer = loaded.model, loaded.tokenizer
    requests = [r for r in map(given_aliases, read_requests(args.data)) if r.aliases and r.subject in r.prompt][:args.n]
    others = read_requests(args.unrelated)[:400]
    calibration = [r.prompt for r in others[:200]] + _lines(PREFIXES_FILE)
    held_out = [r.prompt for r in others[200:]] + [probe.prompt for r in others[:100] for probe in r.locality[:2]]

    @torch.no_grad()
    def states(text: str) -> tuple[dict[int, torch.Tensor], list[tuple[int, int]]]:
        encoded = tokenizer(text, return_tensors="pt", return_offsets_mapping=True)
        offsets = encoded.pop("offset_mapping")[0].tolist()
        hidden = model(**encoded, output_hidden_states=True).hidden_states
        return {layer: F.normalize(hidden[layer][0].float(), dim=-1) for layer in layers}, offsets

    keys = {layer: [] for layer in layers}
    for r in requests:
        hidden, offsets = states(r.prompt)
        end = r.prompt.index(r.subject) + len(r.subject)
        last = max(i for i, (a, _) in enumerate(offsets) if a < end)
        for layer in layers:
            keys[layer].append(hidden[layer][last])
    keys = {layer: torch.stack(k) for layer, k in keys.items()}

    def closest(text: str) -> dict[int, torch.Tensor]:
        """Per layer, each key's best cosine over the text's tokens (the first token left out): [N]."""
        hidden, _ = states(text)
        return {layer: (hidden[layer][1:] @ keys[layer].T).max(0).values for layer in layers}

    calibrated = {layer: torch.stack(c).max(0).values for layer, c in _by_layer(map(closest, calibration), layers).items()}
    held = {layer: torch.stack(c) for layer, c in _by_layer(map(closest, held_out), layers).items()}
    probes = [(i, probe.prompt) for i, r in enumerate(requests) for probe in r.portability
              if probe.type == "Subject_Aliasing"]
    scored = [(i, closest(text)) for i, text in probes]
    rows = []
    for layer in layers:
        for margin in MARGINS:
            threshold = calibrated[layer] + margin
            hit = sum(float(s[layer][i] > threshold[i]) for i, s in scored) / len(scored)
            false_routes = float((held[layer] > threshold).any(1).float().mean())
            per_key = float((held[layer] > threshold).float().mean())
            rows.append({"layer": layer, "margin": margin, "alias_hit": round(hit, 3),
                         "unrelated_prompts_routed": round(false_routes, 3), "per_key_false_route": round(per_key, 4)})
            print(rows[-1], flush=True)
    write(args.out, {"command": " ".join(sys.argv), "edits": len(requests), "alias_probes": len(probes),
                     "calibration_prompts": len(calibration), "held_out_prompts": len(held_out), "rows": rows})


def _by_layer(results, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for result in results:
        for layer in layers:
            out[layer].append(result[layer])
    return out


if __name__ == "__main__":
    main()
