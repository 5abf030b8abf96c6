"""`quality.py`'s sequential protocol (batch 1, subject routing), computed by several worker processes.

With `routing: subject`, edit k trains on, and is scored with, only the earlier batches whose subjects
its prompts name or whose prompts name its subject. Requests with no such link between them (most of
CounterFact's) do not depend on each other at all. So the requests are split into groups closed
under those links, each worker edits its groups' requests in the run's order on a copy of the store,
and the batches are merged back into one store in that order: the same store a single process makes,
edit for edit (each edit is seeded alike and sees the same batches), only sooner on a machine whose
cores one small edit cannot fill (two 1-thread workers do 1.7x the steps of one 2-thread process on
SmolLM2-135M, benchmarks/notes 4t). The checkpoints and the final score are then measured on the merged
store, each on a profile of the first m batches: the state the sequential run had after m edits.

    python benchmarks/quality_parallel.py --n 1000 --workers 2 --data ../shared/data/counterfact.jsonl \\
        --store ~/kdpo-runs/cf_1000x1_default --out benchmarks/results/q_kdpo_cf_1000x1_default.json

It takes over a store that `quality.py --batch 1 --store` began (same settings), keeping the edits
done there; rerunning the same command resumes every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import overrides, parser, write  # noqa: E402
from benchmarks.quality import CURVE_KEYS, Progress, _stored_batches  # noqa: E402
from kdpo_lora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS  # noqa: E402
from kdpo_lora.errors import RequestError  # noqa: E402
from kdpo_lora.evaluate import Probes, evaluate_requests, fluency, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import EditRequest, read_requests  # noqa: E402
from kdpo_lora.routing import SubjectRouter  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402
from kdpo_lora.store import DEFAULT_PROFILE, AdapterStore  # noqa: E402


def linked_groups(requests: list[EditRequest], start: int) -> list[list[int]]:
    """The requests from `start` on, in groups closed under routing links: i and j are linked when
    any prompt of one (the request's or a probe's) names the other's subject. Each group in order."""
    router = SubjectRouter([(str(i), [r]) for i, r in enumerate(requests)])
    parent = list(range(len(requests)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, request in enumerate(requests):
        for prompt, _ in Probes.of(request).pairs():
            for j in map(int, router.route(prompt)):
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(start, len(requests)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def assign(groups: list[list[int]], workers: int) -> list[list[int]]:
    """Groups to workers, largest first onto the least loaded; each worker's indices in order."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    for group in sorted(groups, key=len, reverse=True):
        min(shares, key=len).extend(group)
    return [sorted(share) for share in shares]


def work(args, requests: list[EditRequest], settings: dict) -> None:
    """One worker: edit `args.indices` in order on its copy of the store, scoring each right after."""
    folder = Path(args.worker_dir)
    progress_path = folder / "progress.json"
    indices = json.loads((folder / "indices.json").read_text())
    pre = json.loads((Path(args.store) / "pre_locality.json").read_text())
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else {"batches": {}, "right_after": {},
                                                                                   "seconds": {}, "skipped": []}
    ke = KnowledgeEditor(load_model(args.model, args.quantization), folder / "store", config=args.config,
                         overrides=settings)
    known = set(json.loads((folder / "copied.json").read_text())) | set(state["batches"].values())
    for extra in [b for b in _stored_batches(ke) if b not in known]:  # stored after the last save
        ke.rollback(extra)
    for i in indices:
        if str(i) in state["batches"] or i in state["skipped"]:
            continue
        began = time.perf_counter()
        try:
            name = ke.edit([requests[i]], progress=False).adapter
        except RequestError:  # the model already gives the target
            state["skipped"].append(i)
        else:
            state["seconds"][str(i)] = time.perf_counter() - began
            state["batches"][str(i)] = name
            state["right_after"][str(i)] = evaluate_requests(ke.model, ke.loaded.tokenizer, [requests[i]], [pre[i]],
                                                             False, ke.route)[0]
        tmp = progress_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(progress_path)
        print(f"worker {folder.name}: {len(state['batches']) + len(state['skipped'])}/{len(indices)}", flush=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--method", default="kdpo", choices=["kdpo", "dpo", "sft", "kdpo_free"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoints", type=int, default=4, help="curve points over the run")
    p.add_argument("--config", help="YAML file of edit settings laid over the model family's")
    p.add_argument("--store", required=True, help="the run's store (one quality.py --batch 1 --store began, or new)")
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)  # set for the worker processes
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = read_requests(args.data)[: args.n]
    settings = {**overrides(args.set), "method": args.method}
    if args.worker_dir:
        return work(args, requests, settings)

    store_dir = Path(args.store)
    command = [sys.executable, __file__, *sys.argv[1:]]
    header = {"command": " ".join(sys.argv), "method": args.method, "n": args.n, "batch": 1, "data": args.data,
              "config": args.config, "settings": settings}
    loaded = load_model(args.model, args.quantization)
    ke = KnowledgeEditor(loaded, store_dir, config=args.config, overrides=settings)
    if not ke.routed:
        raise SystemExit("quality_parallel.py needs routing: subject (unrouted edits all depend on each other)")
    progress = Progress(store_dir / "quality_progress.json", {**header, "command": "quality.py"})
    state = progress.resume(ke)
    tokenizer = ke.loaded.tokenizer
    pre_path = store_dir / "pre_locality.json"
    if not pre_path.is_file():
        store_dir.mkdir(parents=True, exist_ok=True)  # a new store: nothing is written to it before the first edit
        pre_path.write_text(json.dumps(pre_edit_locality(ke.model, tokenizer, requests)))
    pre = json.loads(pre_path.read_text())
    done, sequential = state["done"], _stored_batches(ke)

    shares = assign(linked_groups(requests, done), args.workers)
    print(f"{done} edits done in order; {len(requests) - done} left, in {args.workers} workers: "
          f"{[len(s) for s in shares]}", flush=True)
    workers = []
    for w, share in enumerate(shares):
        folder = store_dir.parent / f"{store_dir.name}.worker{w}"
        if not (folder / "indices.json").is_file():
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(store_dir, folder / "store", ignore=shutil.ignore_patterns("quality_progress.json",
                                                                                      "pre_locality.json", ".lock"))
            (folder / "copied.json").write_text(json.dumps(sequential))
            (folder / "indices.json").write_text(json.dumps(share))
        elif json.loads((folder / "indices.json").read_text()) != share:
            raise SystemExit(f"{folder} was given other requests (a run with other settings?); remove it")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        workers.append(subprocess.Popen([*command, "--threads", "1", "--worker-dir", str(folder)], env=env))
    if any(w.wait() != 0 for w in workers):
        raise SystemExit("a worker failed; rerun the same command to resume")

    # merge: every worker's batches into the run's store, in the run's order
    by_index: dict[int, tuple[Path, str]] = {}
    right_after = dict(enumerate(state["right_after"]))  # quality.py's rows: one per edited request, in order
    seconds, skipped = list(state["seconds"]), state["skipped"]
    for w in range(args.workers):
        folder = store_dir.parent / f"{store_dir.name}.worker{w}"
        worker = json.loads((folder / "progress.json").read_text())
        for i, name in worker["batches"].items():
            by_index[int(i)] = (folder / "store", name)
            right_after[int(i) + 10 ** 6] = worker["right_after"][i]  # after the sequential rows, in order
            seconds.append(worker["seconds"][i])
        skipped += len(worker["skipped"])
    store = AdapterStore(store_dir, create=True)  # a run begun here has stored nothing before the merge
    order = sorted(by_index)
    merged = set(_stored_batches(ke))  # a resumed merge skips what it already copied
    for i in order:
        source, name = by_index[i]
        if name in merged:
            continue
        worker_store = AdapterStore(source)
        folder_of = worker_store.verify_batch(name, ke.fingerprint)
        store.add_batch(name, lambda out, src=folder_of: _copy_adapter(src, out), worker_store.edit_record(name),
                        ke.fingerprint)
    names = _stored_batches(ke)
    edited = _request_indices(ke, names, requests)
    right_after_rows = [right_after[k] for k in sorted(right_after)]

    every = max(1, args.n // args.checkpoints)
    curve = [c for c in state["curve"] if c["edits"] <= done and c["edits"] % every == 0 and c["edits"] < len(requests)]
    summary = {"right_after_each_edit": summarise(right_after_rows),
               "median_seconds_per_batch": statistics.median(seconds), "skipped_already_satisfied": skipped,
               "parallel": {"sequential_edits": done, "workers": args.workers,
                            "requests_per_worker": [len(s) for s in shares]}}
    # the final score first (the papers' convention), then the curve; the file is rewritten after each
    final = summarise(_evaluate_first(ke, store, names, edited, requests, pre, len(requests)))
    curve.append({"edits": len(requests), **{k: v for k, v in final.items() if k in CURVE_KEYS}})
    ke.use(DEFAULT_PROFILE)
    final["fluency"] = fluency(ke.model, tokenizer, [r.prompt for r in requests[:20]], route=ke.route)
    ke.use(None)
    final["fluency_before"] = fluency(ke.model, tokenizer, [r.prompt for r in requests[:20]])
    print("final:", {k: round(v, 4) for k, v in final.items()}, flush=True)
    def save(finished: bool) -> None:
        write(args.out, {**header, "final": final, **summary, "curve": sorted(curve, key=lambda c: c["edits"]),
                         **({} if finished else {"unfinished": "the curve"})})

    for m in range(every, len(requests), every):
        save(finished=False)
        if not any(c["edits"] == m for c in curve):
            rows = _evaluate_first(ke, store, names, edited, requests, pre, m)
            curve.append({"edits": m, **{k: v for k, v in summarise(rows).items() if k in CURVE_KEYS}})
            print(f"[{args.method}] {curve[-1]}", flush=True)
    save(finished=True)


def _evaluate_first(ke: KnowledgeEditor, store: AdapterStore, names: list[str], edited: list[int],
                    requests: list[EditRequest], pre: list, m: int) -> list[dict]:
    """Every metric of the first m requests, with the batches of the first m requests: the run after m edits."""
    profile = f"first-{m}"
    if profile in store.profiles():
        store.remove_profile(profile)
    store.create_profile(profile, [name for name, i in zip(names, edited) if i < m])
    ke.use(profile)
    try:
        return evaluate_requests(ke.model, ke.loaded.tokenizer, requests[:m], pre[:m], False, ke.route)
    finally:
        ke.use(None)
        store.remove_profile(profile)


def _request_indices(ke: KnowledgeEditor, names: list[str], requests: list[EditRequest]) -> list[int]:
    """The request each stored batch edits (batch 1), by its recorded prompt and target."""
    where: dict[tuple[str, str], list[int]] = {}
    for i, r in reversed(list(enumerate(requests))):
        where.setdefault((r.prompt, r.target_new), []).append(i)
    out = []
    for name in names:
        (request,) = ke.active.requests(name)
        out.append(where[request.prompt, request.target_new].pop())
    return out


def _copy_adapter(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(source / file, out / file)


if __name__ == "__main__":
    main()
