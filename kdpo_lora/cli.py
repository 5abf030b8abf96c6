"""The `kdpo-lora` command line: a thin layer over `KnowledgeEditor` and `AdapterStore`.

User errors (bad files, bad names, tampered adapters, ...) print one line and exit 2, with no
traceback; Ctrl-C exits 130 and says that nothing was stored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from .errors import KdpoError, KdpoWarning, RequestError
from .embedded import DEFAULT_MODEL

EXPORT_HELP = "a squashed adapter for servers, or (--for vllm) one LoRA module per routed batch"

DEMO_EDITS = [  # prompt, new target, subject, paraphrase
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower", "The Eiffel Tower can be found in the city of"),
    ("The Colosseum is located in the city of", "Paris", "The Colosseum", "The Colosseum stands in the city of"),
    ("The official language of Brazil is", "Japanese", "Brazil", "The people of Brazil speak"),
]
DEMO_UNRELATED = ["The capital of France is", "The capital of Japan is", "The Statue of Liberty is located in"]


def _one_line_warnings() -> None:
    """Our notices are meant for the user: one line each; everything else's warnings stay off the terminal."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=KdpoWarning)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def _quiet_libraries() -> None:
    """Keep library chatter (transformers progress, bitsandbytes' optional-kernel notice) off the terminal.
    Called only by the commands that load a model: the others never import those libraries."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("transformers", "bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# --------------------------------------------------------------------------- arguments


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id, .gguf file, or 'smollm2-135m' (default)")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--store", default="adapters", help="adapter store folder (default: ./adapters)")


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="settings over the defaults: a YAML file, or a shipped name (paper, unrouted)")
    p.add_argument("--routing", choices=["none", "subject"],
                   help="for a new profile: subject (default) serves each prompt with only the batches whose "
                        "subjects it names, none with every batch; an existing profile keeps its own")


def _edit_args(p: argparse.ArgumentParser) -> None:
    _serving_args(p)
    p.add_argument("--method", choices=["kdpo", "dpo", "sft", "kdpo_free"])
    p.add_argument("--lr", type=float, dest="learning_rate")
    p.add_argument("--cycles", type=int)
    p.add_argument("--steps", type=int, dest="steps_per_cycle")
    p.add_argument("--beta", type=float)
    p.add_argument("--rank", type=int, dest="lora_rank")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be between 1 and 4096, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other user error (exit 2)."""

    def error(self, message: str):
        where = self.prog.removeprefix("kdpo-lora").strip()
        self.exit(2, f"kdpo-lora: error: {where + ': ' if where else ''}{_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdpo-lora", description="Edit facts of an LLM with KDPO into LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="edit a few facts of the embedded model and show before/after")
    _model_args(p)
    _edit_args(p)
    p.set_defaults(store=None)

    p = sub.add_parser("edit", help="edit one fact (flags) or a request file into a new stored batch")
    _model_args(p)
    _edit_args(p)
    p.add_argument("--prompt")
    p.add_argument("--target", help="the new answer")
    p.add_argument("--subject", help="who or what the fact is about, as the prompt names it (routing needs it)")
    p.add_argument("--alias", action="append", default=[], help="another name of the subject, trained and routed "
                                                                "like it (repeat for more)")
    p.add_argument("--requests", help="request file: JSONL schema, EasyEdit/KnowEdit, CounterFact or zsRE JSON")
    p.add_argument("--profile", default="default")
    p.add_argument("--name", help="batch name (default: edit-<time>-<id>)")

    p = sub.add_parser("generate", help="greedy generation with a profile's edits, without, or both")
    _model_args(p)
    _serving_args(p)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--profile", default="default")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-edits", action="store_true")
    group.add_argument("--compare", action="store_true", help="show the base model's answer too")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16)

    p = sub.add_parser("eval", help="score a request file against a profile")
    _model_args(p)
    _serving_args(p)
    p.add_argument("--requests", required=True)
    p.add_argument("--profile", default="default")
    p.add_argument("--no-generation", action="store_true")
    p.add_argument("--out", help="write all rows as JSON here")

    p = sub.add_parser("estimate", help="peak memory of one edit, from the model config alone (no weights)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="known shape (llama-3-8b, llama-2-7b), config.json, model folder, hub id or smollm2-135m")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--stacked", type=int, default=0, help="earlier edit batches active")
    p.add_argument("--config", help="YAML file of edit settings (LoRA scope and rank)")
    p.add_argument("--rank", type=int, dest="lora_rank")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: every profile of the store is a model")
    _model_args(p)
    p.add_argument("--profiles", help="serve only these profiles (comma-separated; default: all)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token-file", help="enables the admin API (/admin/...), which needs this file's token")
    p.add_argument("--upstream", help="route for another OpenAI-compatible server at this URL (vLLM) instead of "
                                      "serving a model here; needs --routes")
    p.add_argument("--routes", help="with --upstream: the folder `export --for vllm` wrote")

    store = sub.add_parser("store", help="list, roll back, squash, export and verify stored edits")
    ssub = store.add_subparsers(dest="action", required=True)
    for name, text in (("ls", "list batches and profiles"), ("verify", "check the manifest, hashes and files")):
        p = ssub.add_parser(name, help=text)
        p.add_argument("--store", default="adapters")
    p = ssub.add_parser("gc", help="delete leftovers of interrupted writes and batches no profile uses")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.add_argument("--store", default="adapters")
    p = ssub.add_parser("show", help="one batch: facts, results, profiles")
    p.add_argument("batch")
    p.add_argument("--store", default="adapters")
    for name, text in (("rollback", "take a batch out of a profile (exact undo)"), ("apply", "put a batch back")):
        p = ssub.add_parser(name, help=text)
        p.add_argument("batch")
        p.add_argument("--profile", default="default")
        p.add_argument("--store", default="adapters")
    p = ssub.add_parser("rm", help="delete a batch's files")
    p.add_argument("batch")
    p.add_argument("--force", action="store_true", help="also take it out of the profiles using it")
    p.add_argument("--store", default="adapters")
    p = ssub.add_parser("profile", help="create, copy or remove a profile")
    p.add_argument("op", choices=["create", "copy", "rm"])
    p.add_argument("name")
    p.add_argument("source", nargs="?", help="for copy: the profile to copy")
    p.add_argument("--batches", nargs="*", default=[], help="for create: its batches, in order")
    p.add_argument("--routing", choices=["subject", "none"], help="for create: how it serves (default: subject)")
    p.add_argument("--store", default="adapters")
    for parent, name, text in ((ssub, "squash", "one adapter equal to a profile's stack"),
                               (ssub, "export", EXPORT_HELP), (sub, "export", EXPORT_HELP)):
        p = parent.add_parser(name, help=text)
        p.set_defaults(action=name)
        p.add_argument("profile")
        p.add_argument("-o", "--out", required=True)
        _model_args(p)
        if name == "export":
            p.add_argument("--max-rank", type=int, default=64)
            p.add_argument("--compress", action="store_true", help="truncate by SVD to --max-rank if needed")
            p.add_argument("--for", dest="target", choices=["nf4", "bf16", "fp32", "vllm"],
                           help="the base precision it will be served on, checking every edit there (default: "
                                "the one edited on); vllm: each routed batch as a LoRA module, plus routing.json")
            p.add_argument("--no-check", action="store_true", help="skip that check (it loads the base again)")
    return parser


# --------------------------------------------------------------------------- commands


def _editor(args):
    _quiet_libraries()
    from .session import KnowledgeEditor

    settings = ("method", "learning_rate", "cycles", "steps_per_cycle", "beta", "lora_rank", "routing")
    overrides = {k: getattr(args, k, None) for k in settings}
    return KnowledgeEditor(args.model, args.store, args.quantization, args.device, getattr(args, "config", None), overrides)


def _requests_from(args):
    from .requests import EditRequest, read_requests

    if args.requests:
        if args.prompt or args.target or args.alias:
            raise RequestError("give either --requests FILE or --prompt/--target/--alias, not both")
        return read_requests(args.requests)
    if args.prompt is None or args.target is None:
        raise RequestError("give --prompt and --target (or --requests FILE)")
    return [EditRequest(prompt=args.prompt, target_new=args.target, subject=args.subject, aliases=tuple(args.alias))]


def cmd_edit(args) -> None:
    requests = _requests_from(args)
    ke = _editor(args)
    result = ke.edit(requests, profile=args.profile, name=args.name, progress=not args.quiet)
    for r in result.results:
        state = "already held" if r.skipped else ("ok" if r.success else "NOT reached")
        print(f"{state:>12}  {r.prompt!r} -> {r.target_new!r}  (token accuracy {r.pre_accuracy:.2f} -> {r.accuracy:.2f})")
    print(f"stored batch {result.adapter} in {ke.store_path} (profile {args.profile}): "
          f"{result.success_rate:.0%} reached, {result.cycles} cycles, {result.steps} steps, {result.seconds:.1f}s")


def cmd_generate(args) -> None:
    for prompt in args.prompt:
        if not prompt.strip():
            raise RequestError("--prompt must not be empty")
    if not args.no_edits:
        from .store import AdapterStore

        AdapterStore(args.store).profile(args.profile)  # a missing store or profile is an error, before loading
    ke = _editor(args)
    edited = None if args.no_edits else ke.generate(args.prompt, args.profile, args.max_new_tokens)
    # which batches served each prompt: routed, those naming its subject; unrouted, the whole profile
    routes = None if edited is None else [ke.route.explain(p) for p in args.prompt]
    base = ke.generate(args.prompt, None, args.max_new_tokens) if (args.no_edits or args.compare) else None
    for i, prompt in enumerate(args.prompt):
        print(prompt)
        if base is not None:
            print(f"  base  : {base[i]!r}")
        if edited is not None:
            print(f"  edited: {edited[i]!r} (batches: {', '.join(b for b, _ in routes[i]) or 'none'})")
            for batch, why in routes[i]:
                print(f"    {batch}: {why}")


def cmd_demo(args) -> None:
    from .requests import EditRequest

    with tempfile.TemporaryDirectory(prefix="kdpo-demo-") as tmp:
        args.store = args.store or tmp
        print(f"Loading {args.model} ({args.quantization}) ...", flush=True)
        ke = _editor(args)
        requests = [EditRequest(prompt=p, target_new=t, subject=s, rephrase_prompts=(r,)) for p, t, s, r in DEMO_EDITS]
        prompts = [p for p, *_ in DEMO_EDITS] + [r for *_, r in DEMO_EDITS] + DEMO_UNRELATED
        before = ke.generate(prompts, None, 10)
        print(f"Editing {len(requests)} facts into one LoRA adapter with KDPO ...", flush=True)
        result = ke.edit(requests, progress=not args.quiet)
        after = ke.generate(prompts, "default", 10)
        kinds = ["edit"] * len(DEMO_EDITS) + ["paraphrase"] * len(DEMO_EDITS) + ["unrelated"] * len(DEMO_UNRELATED)
        print(f"\nEdited in {result.seconds:.1f}s ({result.cycles} cycles); stored as {result.adapter} in {args.store}\n")
        for kind, prompt, b, a in zip(kinds, prompts, before, after):
            print(f"[{kind}] {prompt}")
            print(f"    before: {' '.join(b.split())!r}")
            print(f"    after : {' '.join(a.split())!r}{'' if a != b else '   (unchanged)'}")


def cmd_eval(args) -> None:
    from .requests import read_requests

    ke = _editor(args)
    report = ke.evaluate(read_requests(args.requests), args.profile, not args.no_generation)
    for key, value in report["summary"].items():
        print(f"{key:>24}: {value:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


def cmd_estimate(args) -> None:
    from .config import resolve_config
    from .estimate import estimate, load_config

    settings = resolve_config(getattr(load_config(args.model), "model_type", None), args.config,
                              {"lora_rank": args.lora_rank})
    report = estimate(args.model, settings, seq_len=args.seq_len, stacked=args.stacked)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.model}: {report['parameters'] / 1e9:.2f}B parameters, LoRA {report['lora_parameters'] / 1e6:.1f}M, "
          f"sequence {args.seq_len} tokens")
    for setup, key in (("kdpo-lora (NF4 + LoRA, adapter-off reference)", "kdpo_lora"),
                       ("as published (fp32 + fp32 reference copy)", "published")):
        print(f"  {setup}: {report[key + '_total_gib']:.2f} GiB")
        for part, gib in report[key].items():
            print(f"      {part:<24} {gib:8.3f} GiB")
    print(f"  ratio: {report['ratio']:.3f} (estimate; add the CUDA context, about 0.3-0.5 GiB, on a GPU)")


def cmd_store(args) -> None:
    from .store import AdapterStore

    if args.action in ("squash", "export"):
        ke = _editor(args)
        if args.action == "squash":
            rank = ke.squash(args.profile, args.out)
            print(f"squashed profile {args.profile} into {args.out} (rank {rank})")
        elif args.target == "vllm":
            table = ke.export_vllm(args.profile, args.out, args.max_rank)
            print(f"exported profile {args.profile} to {args.out}: {len(table['modules'])} LoRA module(s) and "
                  f"routing.json (routing {table['routing']}); start vLLM with\n  {table['vllm']}\nand route "
                  f"for it with\n  kdpo-lora serve --upstream http://127.0.0.1:8000 --routes {args.out} --port 8001")
        else:
            report = ke.export(args.profile, args.out, args.max_rank, args.compress, args.target, not args.no_check)
            extra = f", SVD-compressed, max relative error {report['max_relative_error']:.2e}" if report["compressed"] else ""
            print(f"exported profile {args.profile} to {args.out} (rank {report['rank']}{extra}; base "
                  f"{report['base_model']})")
            if report["checked"]:
                held = report["edits"] - len(report["not_holding"])
                print(f"checked on the {report['for']} base with plain peft: {held} of {report['edits']} edits hold")
        return
    store = AdapterStore(args.store)
    if args.action == "ls":
        profiles = store.profiles()
        for b in store.batches():
            users = [p for p, names in profiles.items() if b.name in names]
            size = sum(f.stat().st_size for f in store.batch_dir(b.name).iterdir()) if store.batch_dir(b.name).is_dir() else 0
            print(f"{b.name}  {b.created}  {b.requests} request(s)  {size / 1024:.0f} KiB  profiles: {', '.join(users) or '-'}")
        for name, names in profiles.items():
            print(f"profile {name}: {' '.join(names) or '(empty)'} (routing {store.routing(name)})")
    elif args.action == "show":
        record = store.edit_record(store.batch(args.batch).name)
        users = [p for p, names in store.profiles().items() if args.batch in names]
        print(f"batch {args.batch}, created {record.get('created')}, profiles: {', '.join(users) or '-'}")
        for req, res in zip(record.get("requests", []), record.get("results", [])):
            print(f"  {req['prompt']!r} -> {req['target_new']!r}: success={res['success']} accuracy={res['accuracy']:.2f}")
        if record.get("supersedes"):
            print(f"  supersedes: {', '.join(record['supersedes'])}")
        print(f"  config: {json.dumps(record.get('config'))}")
    elif args.action == "rollback":
        store.rollback(args.batch, args.profile)
        print(f"rolled back {args.batch} from profile {args.profile} (files kept; 'store apply' puts it back)")
    elif args.action == "apply":
        store.apply(args.batch, args.profile)
        print(f"applied {args.batch} to profile {args.profile}")
    elif args.action == "rm":
        store.remove_batch(args.batch, args.force)
        print(f"removed batch {args.batch}")
    elif args.action == "gc":
        report = store.gc(dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        unused = set(report["unused"])
        for name in report["removed"]:
            why = "batch no profile uses" if name in unused else "leftover of an interrupted write"
            print(f"{verb} {name} ({why})")
        for name in report["left"]:
            print(f"kept {name} (not made by kdpo-lora)")
        print(f"{verb} {len(report['removed'])} item(s)")
    elif args.action == "verify":
        problems = store.verify()
        for problem in problems:
            print(f"PROBLEM: {problem}")
        for name in store.leftovers():
            print(f"leftover: {name} (from an interrupted write; never read; 'store gc' removes it)")
        if problems:
            raise KdpoError(f"{len(problems)} problem(s) found in {args.store}")
        print(f"{len(store.batches())} batch(es) verified, no problems")
    elif args.action == "profile":
        if args.op == "create":
            store.create_profile(args.name, args.batches, routing=args.routing)
        elif args.op == "copy":
            if not args.source:
                raise KdpoError("profile copy needs the profile to copy: store profile copy NEW SOURCE")
            store.create_profile(args.name, copy_from=args.source)
        else:
            store.remove_profile(args.name)
        print(f"profile {args.op}: {args.name}")


def cmd_serve(args) -> None:
    if args.upstream or args.routes:
        return _serve_proxy(args)
    token = None
    if args.admin_token_file:
        try:
            token = Path(args.admin_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise KdpoError(f"cannot read the admin token file {args.admin_token_file}: {err}") from None
        if len(token) < 16:
            raise KdpoError(f"the admin token in {args.admin_token_file} is shorter than 16 characters")
    _quiet_libraries()
    from .server import Admin, Engine, serve
    from .session import KnowledgeEditor

    def editor() -> KnowledgeEditor:
        return KnowledgeEditor(args.model, args.store, args.quantization, args.device)

    engine = Engine(editor(), args.profiles.split(",") if args.profiles else None)
    admin = Admin(engine, token, editor) if token else None
    print(f"serving {', '.join(engine.models())} of {args.store} on http://{args.host}:{args.port}/v1"
          f"{'; admin API on' if admin else '; admin API off (no --admin-token-file)'}", flush=True)
    serve(engine, admin, args.host, args.port)


def _serve_proxy(args) -> None:
    if not (args.upstream and args.routes):
        raise KdpoError("--upstream and --routes go together: the server to route for, and the folder "
                        "`export --for vllm` wrote")
    import uvicorn

    from .proxy import Routes, create_proxy

    routes = Routes(args.routes)
    print(f"routing profile {routes.profile} for {args.upstream} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_proxy(routes, args.upstream), host=args.host, port=args.port, log_level="warning")


COMMANDS = {"serve": cmd_serve, "export": cmd_store, "edit": cmd_edit, "generate": cmd_generate, "demo": cmd_demo, "eval": cmd_eval, "store": cmd_store,
            "estimate": cmd_estimate}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 2
    _one_line_warnings()
    try:
        COMMANDS[args.command](args)
    except KdpoError as err:
        print(f"kdpo-lora: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permission denied, ...: say what and where, nothing half-written
        print(f"kdpo-lora: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdpo-lora: interrupted; nothing from the interrupted step was stored", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
