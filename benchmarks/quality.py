"""Sequential editing quality: N requests edited in batches of b, scored right after each batch,
at checkpoints (the curve for the plot) and after the last edit (the papers' convention).

    python benchmarks/quality.py --method kdpo --n 100 --batch 10 --out benchmarks/results/q_kdpo_cf_100x10.json
    python benchmarks/quality.py --method published --n 100 --batch 1 ...   # the authors' set-up (dense layer)
    python benchmarks/quality.py --n 1000 --batch 10 --store /tmp/q1000 ...  # rerun the same line to resume

Methods: kdpo, dpo, sft, kdpo_free (KDPO without teacher forcing) - all on the same LoRA set-up
through the adapter store - and `published` (fp32, one dense MLP down-projection, deep-copied
reference; see published_kdpo.py). Locality is always measured against the unedited model.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import given_aliases, overrides, parser, write  # noqa: E402
from kdpo_lora.errors import RequestError  # noqa: E402
from kdpo_lora.evaluate import evaluate_requests, fluency, pre_edit_locality, summarise  # noqa: E402
from kdpo_lora.loading import load_model  # noqa: E402
from kdpo_lora.requests import read_requests  # noqa: E402
from kdpo_lora.session import KnowledgeEditor  # noqa: E402
from kdpo_lora.store import DEFAULT_PROFILE  # noqa: E402

CURVE_KEYS = ("edit_success", "rephrase_acc", "locality")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--method", default="kdpo", choices=["kdpo", "dpo", "sft", "kdpo_free", "published"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpoints", type=int, default=5, help="curve points over the run")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--asking", action="store_true", help="also ask each fact through the chat template "
                                                        "(questions, paraphrases, long form, repetition: asking.py)")
    p.add_argument("--give-aliases", action="store_true", help="give each edit the subject's other names its "
                                                               "KnowEdit Subject_Aliasing probes use (common.given_aliases)")
    p.add_argument("--config", help="YAML file or shipped name of edit settings over the defaults (e.g. paper, unrouted)")
    p.add_argument("--store", help="keep the adapter store (and the run's progress) here; running the same "
                                   "command again resumes after the last finished batch")
    args = p.parse_args()
    if args.store and args.method == "published":
        p.error("--store needs a LoRA method: the published set-up edits dense weights in memory")
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = read_requests(args.data)[: args.n]
    if args.give_aliases:
        requests = [given_aliases(r) for r in requests]
    settings = overrides(args.set)
    published = args.method == "published"
    if not published:
        settings["method"] = args.method
    loaded = load_model(args.model, "none" if published else args.quantization)
    if args.config and published:
        p.error("--config needs a LoRA method: the published set-up takes only --set")
    header = {"command": " ".join(sys.argv), "method": args.method, "n": args.n, "batch": args.batch,
              "data": args.data, "config": args.config, "settings": settings}
    tokenizer = loaded.tokenizer
    with (contextlib.nullcontext(args.store) if args.store else tempfile.TemporaryDirectory()) as store:
        ke = None if published else KnowledgeEditor(loaded, store, config=args.config, overrides=settings)
        model = lambda: loaded.model if published else ke.model  # noqa: E731
        route = lambda: ke.route if ke is not None and ke.router is not None else None  # noqa: E731  (routing: subject)
        pre = pre_edit_locality(model(), tokenizer, requests)  # nothing is active before the first edit
        fluency_before = fluency(model(), tokenizer, [r.prompt for r in requests[:20]])
        progress = Progress(Path(store) / "quality_progress.json", header) if args.store else None
        state = progress.resume(ke) if progress else Progress.empty()
        right_after, curve, seconds, skipped = state["right_after"], state["curve"], state["seconds"], state["skipped"]
        every = max(args.batch, (args.n // args.checkpoints) // args.batch * args.batch)
        last_rows = None
        for start in range(state["done"], len(requests), args.batch):
            batch = requests[start:start + args.batch]
            began = time.perf_counter()
            edited = True
            if published:
                from benchmarks.published_kdpo import published_edit

                for i, r in enumerate(batch):
                    published_edit(loaded.model, tokenizer, r.prompt, r.target_new, sequential=start + i > 0,
                                   **_published_args(settings))
            else:
                try:
                    ke.edit(batch, progress=False)
                except RequestError:  # the model already gives every target of the batch
                    skipped += len(batch)
                    edited = False
            if edited:
                seconds.append(time.perf_counter() - began)
                right_after += evaluate_requests(model(), tokenizer, batch, pre[start:start + len(batch)], False,
                                                 route(), args.asking)
            done = start + len(batch)
            if done % every == 0 or done == len(requests):
                rows = evaluate_requests(model(), tokenizer, requests[:done], pre[:done], False, route())
                if done == len(requests) and args.no_generation:
                    last_rows = rows  # the final evaluation, as scored here: not repeated below
                point = {"edits": done, **{k: v for k, v in summarise(rows).items() if k in CURVE_KEYS}}
                curve.append(point)
                print(f"[{args.method}] {point}", flush=True)
                if done < len(requests):  # a long run leaves its curve so far on disk, marked unfinished
                    write(args.out, {**header, "unfinished": True, "curve": curve,
                                     "right_after_each_edit": summarise(right_after),
                                     "median_seconds_per_batch": statistics.median(seconds) if seconds else None})
            if progress:
                progress.save(ke, done=done, right_after=right_after, curve=curve, seconds=seconds, skipped=skipped)
        if ke and _stored_batches(ke):
            ke.use(DEFAULT_PROFILE)  # a resumed run that had nothing left to edit
        if last_rows is None:
            last_rows = evaluate_requests(model(), tokenizer, requests, pre, not args.no_generation, route(), args.asking)
        final = summarise(last_rows)
        final["fluency"] = fluency(model(), tokenizer, [r.prompt for r in requests[:20]], route=route())
        final["fluency_before"] = fluency_before
    summary = {"final": final, "right_after_each_edit": summarise(right_after), "curve": curve,
               "median_seconds_per_batch": statistics.median(seconds), "skipped_already_satisfied": skipped}
    summary["summary_row"] = summary_row(final)
    print("summary:", summary["summary_row"])
    print("final:", {k: round(v, 4) for k, v in final.items()})
    print("right after:", {k: round(v, 4) for k, v in summary["right_after_each_edit"].items()})
    write(args.out, {**header, **summary})


SUMMARY_ROW = (("edit success", "edit_success"), ("locality", "locality"), ("paraphrase tf", "rephrase_acc"),
               ("paraphrase gen", "gen_paraphrase"), ("chat question", "chat_question"),
               ("chat paraphrase", "chat_paraphrase"), ("aliases", "portability_Subject_Aliasing"),
               ("same subject kept", "locality_Relation_Specificity"), ("repetition", "repetition"),
               ("long-form entropy (unedited)", None), ("fluency (unedited)", None))


def summary_row(final: dict) -> dict:
    """One line per set-up: what a user of the edited model sees."""
    row = {label: round(final[key], 3) for label, key in SUMMARY_ROW if key and key in final}
    for label, key in (("long-form entropy (unedited)", "long_form_entropy"), ("fluency (unedited)", "fluency")):
        if key in final:
            before = final.get(key + "_unedited", final.get(key + "_before"))
            row[label] = f"{final[key]:.2f} ({before:.2f})" if before is not None else round(final[key], 2)
    return row


class Progress:
    """A run's state next to its store, saved after every batch, so a long run can be resumed.

    The store holds the edits; this file holds what was measured. A batch stored after the last save
    (the run stopped in between) is rolled back on resume, so both agree.
    """

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header

    @staticmethod
    def empty() -> dict:
        return {"done": 0, "right_after": [], "curve": [], "seconds": [], "skipped": 0, "batches": []}

    def resume(self, ke: KnowledgeEditor) -> dict:
        if not self.path.is_file():
            return self.empty()
        state = json.loads(self.path.read_text())
        fixed = ("method", "n", "batch", "data", "config", "settings")
        if {k: state["header"].get(k) for k in fixed} != {k: self.header[k] for k in fixed}:
            raise SystemExit(f"{self.path} belongs to another run ({state['header']['command']}); "
                             "use another --store")
        for extra in [b for b in _stored_batches(ke) if b not in state["batches"]]:
            ke.rollback(extra)
        print(f"resuming after {state['done']} edits ({len(state['batches'])} stored batches)", flush=True)
        return state

    def save(self, ke: KnowledgeEditor, **state) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"header": self.header, "batches": _stored_batches(ke), **state}))
        tmp.replace(self.path)


def _stored_batches(ke: KnowledgeEditor) -> list[str]:
    store = ke.store(create=True)
    return store.profile(DEFAULT_PROFILE) if DEFAULT_PROFILE in store.profiles() else []


def _published_args(settings: dict) -> dict:
    keys = {"cycles": "cycles", "steps_per_cycle": "steps", "learning_rate": "lr", "beta": "beta",
            "loss_threshold": "loss_threshold", "delta_scale": "delta_scale"}
    return {keys[k]: v for k, v in settings.items() if k in keys}


if __name__ == "__main__":
    main()
