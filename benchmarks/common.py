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
