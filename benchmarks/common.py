"""Shared command-line plumbing of the benchmark scripts (model, data, config overrides)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

SAMPLES = Path(__file__).resolve().parent.parent / "kdpo_lora" / "data" / "samples"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--data", default=str(SAMPLES / "counterfact.jsonl"), help="request file (any supported format)")
    p.add_argument("--n", type=int, default=50, help="number of requests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an edit setting (YAML value), e.g. --set learning_rate=5e-4")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None)
    return p


def overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write(path: str | None, payload: dict) -> None:
    payload = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **payload}
    text = json.dumps(payload, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def given_aliases(request):
    """`request` with the other names of its subject that its KnowEdit `Subject_Aliasing` probes use
    (each probe is the edit prompt naming the subject otherwise: the name is what differs). This is
    the issue's "aliases given" set-up: the edit then trains on the probe's own prompt, so the
    aliasing score it gives is an upper bound, reported beside the score without aliases."""
    from dataclasses import replace

    subject = request.subject or ""
    if subject not in request.prompt:
        return request
    before, _, after = request.prompt.partition(subject)
    names = []
    for probe in request.portability:
        text = probe.prompt
        if probe.type == "Subject_Aliasing" and text.startswith(before) and text.endswith(after):
            name = text[len(before):len(text) - len(after)].strip()
            if name and name.lower() != subject.lower():
                names.append(name)
    return replace(request, aliases=tuple(names)) if names else request
