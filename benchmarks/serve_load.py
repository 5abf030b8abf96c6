"""Serving throughput and latency under concurrent clients, side by side in one run:

(a) plain transformers `generate` on the base model, one request at a time (clients wait their turn);
(b) `kdpo-lora serve` over a real socket, queried with the `openai` client, on a subject-routed
    profile of `--batches` batches, half of the prompts naming an edited subject.

    python benchmarks/serve_load.py --batches 100 --clients 1 4 16 --out benchmarks/results/serve_load.json

Prints, per set-up and number of clients, generated tokens per second (all clients together) and
the p50/p99 latency of one request; and the ratios the serving goals are stated in: (b) at the most
clients over (b) at one, and (b) at one client over (a) at one. The batches are random LoRA
adapters of the default shape (`routed_scale.build_store`: content does not change the cost).
"""

from __future__ import annotations

import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine, parser, write  # noqa: E402
from benchmarks.routed_scale import _request, build_store  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.server import Engine, create_app  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402

OTHER = ["The capital of France is", "The largest planet in the solar system is", "Water boils at a temperature of",
         "The author of Hamlet is", "The currency of Japan is", "The tallest mountain on Earth is",
         "The chemical symbol for gold is", "The first man on the Moon was"]


def prompts(batches: int, count: int, seed: int) -> list[str]:
    """`count` prompts, every other one naming a random edited subject."""
    rng = random.Random(seed)
    return [_request(rng.randrange(batches)).prompt if i % 2 == 0 else rng.choice(OTHER) for i in range(count)]


def run_clients(clients: int, per_client: int, ask, seed: int) -> dict:
    """`clients` threads each sending `per_client` requests one after another; `ask(prompt)` -> tokens."""
    latencies, tokens, lock = [], [0], threading.Lock()

    def client(c: int) -> None:
        for prompt in prompts(100, per_client, seed + c):
            began = time.perf_counter()
            n = ask(prompt)
            with lock:
                latencies.append(time.perf_counter() - began)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def plain_generate(loaded, max_tokens: int):
    """(a): transformers `generate` on the base, one request at a time."""
    lock = threading.Lock()

    def ask(prompt: str) -> int:
        with lock, torch.no_grad():
            ids = loaded.tokenizer(prompt, return_tensors="pt")
            out = loaded.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                        pad_token_id=loaded.tokenizer.pad_token_id)
        return out.shape[1] - ids.input_ids.shape[1]
    return ask


def start_server(ke: KnowledgeEditor) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Engine(ke)), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per set-up (split among the clients)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from openai import OpenAI

    loaded = load_model(args.model, args.quantization)
    results = {"command": " ".join(sys.argv), "machine": machine(), "batches": args.batches, "plain": [], "served": []}
    with tempfile.TemporaryDirectory() as store:
        ke = KnowledgeEditor(loaded, store)
        build_store(ke, args.batches)
        url, server = start_server(ke)
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        def served(prompt: str) -> int:
            return client.completions.create(model="default", prompt=prompt, max_tokens=args.max_tokens).usage.completion_tokens

        served(prompts(args.batches, 1, 0)[0])  # warm-up: the first request starts the generation thread
        plain = plain_generate(loaded, args.max_tokens)
        plain(OTHER[0])
        for clients in args.clients:  # the two set-ups alternate, so both see the same machine
            per_client = max(1, args.requests // clients)
            for label, ask in (("plain", plain), ("served", served)):
                row = run_clients(clients, per_client, ask, seed=clients)
                results[label].append(row)
                print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        server.should_exit = True
    by = {label: {r["clients"]: r for r in results[label]} for label in ("plain", "served")}
    low, high = min(args.clients), max(args.clients)
    results["served_most_over_one"] = by["served"][high]["tokens_per_s"] / by["served"][low]["tokens_per_s"]
    results["served_one_over_plain_one"] = by["served"][low]["tokens_per_s"] / by["plain"][low]["tokens_per_s"]
    print(f"served at {high} clients / served at {low}: {results['served_most_over_one']:.2f}x (goal >= 3); "
          f"served at {low} / plain at {low}: {results['served_one_over_plain_one']:.2f}x (goal >= 0.8)")
    write(args.out, results)


if __name__ == "__main__":
    main()
