"""Experiment (RESULTS 10): every edit's LoRA acts only at the tokens of an edited subject.

ROME writes a fact into the subject's representation, so every prompt naming the subject reads it,
however the relation is worded. Here the same: each LoRA output is multiplied by a mask that is 1 on
the tokens where the router names one of the run's subjects (as written, an alias or a name form,
found in the token text the embedding sees) and 0 elsewhere - in training, evaluation and
generation alike (a decoded token is masked on its own). In evaluation a prompt that names none of
them (routed by a key, `subject_keys.py`) gets the LoRA at every token. `--hold-other-relations K`
also holds, in training, K of the question table's relations of other families about the request's own subject
at the unedited answers (the KL that holds the subject swaps; `hold_relations.py`, which since session
35 also leaves out the wordings of the request's probes): written into the subject, a fact would
otherwise reach the subject's other relations. `--elsewhere S` sets the mask to S instead of 0
off the subject's tokens (a mixed adapter: mostly at the subject, a share everywhere, so prompts
naming the subject otherwise and exports keep some of the edit). Everything else is `quality.py`, whose
arguments this takes:

    python benchmarks/subject_positions.py --n 30 --batch 1 --checkpoints 1 --threads 1 --asking \\
        --data ../shared/data/counterfact.jsonl --store ~/kdpo-runs/cf30_subject --out benchmarks/results/q_kdpo_cf_30x1_subject_positions.json

Not in the package: an exported PEFT or vLLM adapter has no such mask.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
from peft.tuners.lora.layer import LoraLayer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import kdpo_lora.evaluate as evaluate  # noqa: E402
import kdpo_lora.loading as loading  # noqa: E402
import kdpo_lora.session as session  # noqa: E402
from benchmarks.hold_relations import hold_other_relations  # noqa: E402
from kdpo_lora.requests import EditRequest, read_requests  # noqa: E402
from kdpo_lora.routing import SubjectRouter, _fold, _inside_longer_name  # noqa: E402


class SubjectMask:
    """The [batch, tokens, 1] mask of the last input the embedding saw: 1 on the tokens of any span
    the router matches for one of the run's requests (subject, alias or name form; not key routes)."""

    def __init__(self, requests: list[EditRequest], elsewhere: float = 0.0):
        self.elsewhere = elsewhere  # the mask's value off the subject's tokens (0: subject only)
        self.patterns = [p for _, _, p in SubjectRouter([(str(i), [r]) for i, r in enumerate(requests)]).patterns]
        self.tokenizer = None
        self.pieces: dict[int, str] = {}
        self.rows: dict[tuple[int, ...], list[float]] = {}  # training repeats its rows at every step
        self.mask: torch.Tensor | None = None
        self.evaluating = False  # a row naming no subject gets every token (a key route), not none

    def _piece(self, token: int) -> str:
        if token not in self.pieces:
            self.pieces[token] = self.tokenizer.decode([token])
        return self.pieces[token]

    def _row(self, row: tuple[int, ...]) -> list[float]:
        if row not in self.rows:
            starts, text = [], ""
            for token in row:
                starts.append(len(text))
                text += self._piece(token)
            ends = starts[1:] + [len(text)]
            folded = _fold(text)
            spans = [m.span() for p in self.patterns for m in p.finditer(folded)
                     if not _inside_longer_name(folded, *m.span())]
            self.rows[row] = [1.0 if e > s and any(s < b and e > a for a, b in spans) else self.elsewhere
                              for s, e in zip(starts, ends)]
        return self.rows[row]

    def of(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = [self._row(tuple(row)) for row in input_ids.tolist()]
        if self.evaluating:
            rows = [row if 1.0 in row else [1.0] * len(row) for row in rows]
        return torch.tensor(rows)

    def on_embedding(self, module, inputs, output):
        self.mask = self.of(inputs[0]).to(output.device, output.dtype).unsqueeze(-1)

    def on_lora_b(self, module, inputs, output):
        if self.mask is None or self.mask.shape[:2] != output.shape[:2]:
            return output
        return output * self.mask.to(output.dtype)


def install(mask: SubjectMask) -> None:
    """Every LoRA B made from now on is masked; every model loaded from now on feeds the mask."""
    update_layer, load_model = LoraLayer.update_layer, loading.load_model

    def masked_update_layer(self, adapter_name, *args, **kwargs):
        out = update_layer(self, adapter_name, *args, **kwargs)
        lora_b = self.lora_B[adapter_name]
        if not getattr(lora_b, "_subject_masked", False):
            lora_b.register_forward_hook(mask.on_lora_b)
            lora_b._subject_masked = True
        return out

    def feeding_load_model(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        mask.tokenizer = loaded.tokenizer
        loaded.model.get_input_embeddings().register_forward_hook(mask.on_embedding)
        return loaded

    LoraLayer.update_layer = masked_update_layer
    loading.load_model = session.load_model = feeding_load_model


def evaluating(mask: SubjectMask) -> None:
    """The evaluation functions set `mask.evaluating` while they run."""
    for name in ("evaluate_requests", "fluency"):
        def wrapped(*args, _function=getattr(evaluate, name), **kwargs):
            mask.evaluating = True
            try:
                return _function(*args, **kwargs)
            finally:
                mask.evaluating = False
        setattr(evaluate, name, wrapped)


def main() -> None:
    args = sys.argv[1:]
    options = {"--hold-other-relations": 0.0, "--elsewhere": 0.0}
    for option in options:
        if option in args:
            at = args.index(option)
            options[option] = float(args.pop(at + 1))
            args.pop(at)
    hold, elsewhere = int(options["--hold-other-relations"]), options["--elsewhere"]
    data, n = args[args.index("--data") + 1], int(args[args.index("--n") + 1])
    mask = SubjectMask(read_requests(data)[:n], elsewhere)
    install(mask)
    evaluating(mask)
    if hold:
        hold_other_relations(hold, data)
    sys.argv = [str(ROOT / "benchmarks" / "quality.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
