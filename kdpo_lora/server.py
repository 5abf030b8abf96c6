"""`kdpo-lora serve`: an OpenAI-compatible HTTP server in front of an edited model.

Every profile of the store is a model (`GET /v1/models`); `POST /v1/chat/completions` and
`POST /v1/completions` answer as the OpenAI API defines them (messages through the model's own chat
template, `max_tokens`, `temperature`, `top_p`, `stop`, `stream`, `usage`). Each request is routed
exactly as `KnowledgeEditor.generate` routes it, and says which batches served it: the response's
`kdpo_batches` field and the `X-KDPO-Batches` header. A new or empty store serves its `default`
profile: the unedited model. Errors are OpenAI-style JSON bodies with a 4xx status.

One base model is loaded once. Requests are batched together, also across profiles and routes
(peft runs a different adapter on each row); one thread owns the model and loads batches only
between forward passes, so a generation never sees a half-loaded batch.

The admin API (`/admin/...`) changes the store: it exists only when an admin token is configured,
answers 401 without it (compared in constant time, never logged), and appends every action to the
store's audit log (`audit.jsonl`). An edit is a background job trained on its own copy of the base,
so serving goes on; every request reads its profile from the store, so a stored batch (or a
rollback) is served from the next request on.
"""

from __future__ import annotations

import hmac
import json
from contextlib import asynccontextmanager
from pathlib import Path
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from peft import PeftModel
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .batching import Batcher, Group, Row
from .errors import KdpoError, RequestError, StoreError
from .fsutil import append_line
from .gate import Gate
from .objectives import token_ids
from .requests import check_batch, parse_record
from .session import KnowledgeEditor
from .store import AUDIT_LOG, DEFAULT_PROFILE, check_name
MAX_TOKENS_DEFAULT = 64
MAX_IN_FLIGHT = 1024  # requests the server holds at once (each waits in a worker thread)
COMPARE_TOKENS = 24
OPERATOR_PAGE = Path(__file__).resolve().parent / "web" / "operator.html"


class ApiError(Exception):
    """An error answered to the client: an HTTP status and an OpenAI-style type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    batches: list[str]


class Engine:
    """Generation for the server: one base model, the store's profiles, requests batched together
    (`batching.Batcher`: one thread owns the model; each row runs with its own batches)."""

    def __init__(self, editor: KnowledgeEditor, profiles: Sequence[str] | None = None, max_rows: int = 32):
        self.editor = editor
        self.only = list(profiles) if profiles else None
        self.max_rows = max_rows
        self._batcher: Batcher | None = None
        self._start = threading.Lock()
        self._gates: dict[tuple[str, ...], Gate] = {}  # by route; read and written by the batcher's thread only

    @property
    def tokenizer(self):
        return self.editor.loaded.tokenizer

    @property
    def batcher(self) -> Batcher:
        with self._start:  # the thread starts with the first request
            if self._batcher is None:
                config = self.editor.model.generation_config
                eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
                eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
                self._batcher = Batcher(lambda: self.editor.model, self.tokenizer, self._plan, eos_ids, self.max_rows)
            return self._batcher

    def models(self) -> list[str]:
        store = self.editor.store(create=True)
        names = list(store.profiles()) if store.exists() else [DEFAULT_PROFILE]
        return [n for n in names if self.only is None or n in self.only]

    def check_model(self, model: str) -> None:
        """A profile, or a stored batch served alone (as vLLM serves one LoRA module; `serve --upstream`)."""
        if model in self.models():
            return
        store = self.editor.store(create=True)
        if self.only is None and store.exists() and model in {b.name for b in store.batches()}:
            return
        raise ApiError(404, f"the model {model!r} does not exist (models: {', '.join(self.models())})",
                       code="model_not_found")

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template writes it, ready for the assistant's turn."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions")
        with self.batcher.tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _row(self, profile: str | None, prompt: str, max_tokens: int, temperature: float, top_p: float,
             stop: list[str]) -> Row:
        if profile is not None:
            self.check_model(profile)
        with self.batcher.tokenizer_lock:
            ids = token_ids(self.tokenizer, prompt)
        limit = self.editor.editor.max_length
        if limit is not None and len(ids) + max_tokens > limit:
            raise ApiError(400, f"prompt of {len(ids)} tokens + max_tokens {max_tokens} is longer "
                                f"than the model's context of {limit}", code="context_length_exceeded")
        row = Row(ids, profile, prompt, max_tokens, temperature, top_p, stop)
        self.batcher.submit(row)
        return row

    def _plan(self, rows: list[Row], running: list[list[str]] | None) -> tuple[Group, list[Row]]:
        """Which waiting rows decode now, and with which adapters. Every row's batches are read from
        the store as it starts, once: a batch stored or rolled back is served from the next request
        on, and no row sees a profile half-changed. Rows of routed profiles (and of the unedited
        model) share a batch whatever their profile, and join one being decoded (`running`: its rows'
        routes); an unrouted profile is held whole, so its rows go together, alone."""
        active = self.editor.active
        store = self.editor.store(create=True)
        planned: list[tuple[Row, list[str] | None]] = []
        try:  # one read of the manifest for all the rows
            manifest = store.manifest()  # empty for a store not created yet
        except KdpoError as err:  # a damaged store: the clients are told, and nothing is served from it
            for row in rows:
                row.events.put(("error", err))
            return Group([], None), []
        profiles = manifest["profiles"]
        batches = {entry["name"] for entry in manifest["batches"]}
        for row in rows:
            try:
                if row.profile in profiles:
                    listing = (list(profiles[row.profile]), manifest["serving"][row.profile]["routing"])
                    route = active.routes_in(row.profile, row.prompt, listing)
                elif row.profile in batches:
                    route = [row.profile]  # a batch alone
                elif row.profile is None or not store.exists():
                    route = []  # the unedited model (a new store serves its default profile so)
                else:
                    raise StoreError(f"the model {row.profile!r} was removed from the store")
                planned.append((row, route))
            except KdpoError as err:  # a damaged store: this row's client is told, the others go on
                row.events.put(("error", err))
        whole = running is None and planned and planned[0][1] is None and planned[0][0].profile
        if whole:  # the oldest row's profile is unrouted: its rows now, the others after
            group = [row for row, route in planned if route is None and row.profile == whole]
            names = active.use(whole)
            for row in group:
                row.route = list(names)
                row.events.put(("batches", row.route))
            return Group(group, None, joinable=False), [row for row, _ in planned if row not in group]
        mixed = [(row, route) for row, route in planned if route is not None]
        if not mixed:
            return Group([], None), [row for row, _ in planned]
        earlier = running or []
        adapters = active.row_adapters(earlier + [route for _, route in mixed])[len(earlier):]
        for row, route in mixed:
            row.route = list(route)
            row.gate = self._gate(tuple(route)) if route else None
            row.events.put(("batches", row.route))
        taken = {id(row) for row, _ in mixed}
        per_row = isinstance(self.editor.model, PeftModel)  # without any adapter, rows need no names
        return (Group([row for row, _ in mixed], adapters if per_row else None),
                [row for row, _ in planned if id(row) not in taken])

    def _gate(self, route: tuple[str, ...]) -> Gate:
        """The edit gate of a route's batches (`gate.py`), kept for the next rows with that route."""
        if route not in self._gates:
            if len(self._gates) >= 256:
                self._gates.clear()
            with self.batcher.tokenizer_lock:
                self._gates[route] = self.editor.route.gate(route)
        return self._gates[route]

    @staticmethod
    def _next(row: Row) -> tuple:
        event = row.events.get()
        if event[0] == "error":
            raise event[1]
        return event

    def complete(self, profile: str | None, prompt: str, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str]) -> Completion:
        """`prompt` continued with `profile`'s edits (None: the unedited model)."""
        row = self._row(profile, prompt, max_tokens, temperature, top_p, stop)
        batches, text = self._next(row)[1], ""
        while (event := self._next(row))[0] == "text":
            text += event[1]
        return Completion(text, event[1], len(row.ids), event[2], batches)

    def stream(self, profile: str, prompt: str, max_tokens: int, temperature: float, top_p: float,
               stop: list[str]) -> tuple[list[str], Iterator[str]]:
        """The batches serving `prompt`, and its text as it is generated."""
        row = self._row(profile, prompt, max_tokens, temperature, top_p, stop)
        batches = self._next(row)[1]

        def pieces() -> Iterator[str]:
            try:
                while (event := self._next(row))[0] == "text":
                    yield event[1]
            finally:  # also when the client goes away: its row leaves the batch at the next step
                row.cancelled = True
        return batches, pieces()


# --------------------------------------------------------------------------- admin: edit jobs and the audit log


@dataclass
class Job:
    id: str
    profile: str
    requests: int
    name: str | None
    status: str = "queued"  # queued | running | stored | failed
    batch: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {"job": self.id, "status": self.status, "profile": self.profile, "requests": self.requests,
                "batch": self.batch, "error": self.error}


class Admin:
    """The store-changing side of the server: edit jobs (one at a time, on their own editor) and the
    audit log. A job that was running when the server died is simply absent after a restart: nothing
    was stored (a batch is stored whole or not at all), and it can be submitted again."""

    def __init__(self, engine: Engine, token: str, make_editor: Callable[[], KnowledgeEditor]):
        self.engine = engine
        self._token = token.encode()
        self._make_editor = make_editor
        self._trainer: KnowledgeEditor | None = None
        self.jobs: dict[str, Job] = {}
        self._queue_lock = threading.Lock()  # one edit trains at a time

    def authorised(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def audit(self, action: str, outcome: str, **details) -> None:
        store = self.engine.editor.store(create=True)
        if store.exists():
            append_line(store.root / AUDIT_LOG, json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                           "action": action, "outcome": outcome, **details}))

    def submit(self, profile: str, records: list, name: str | None) -> Job:
        check_name(profile, "profile name")
        if name is not None:
            check_name(name, "batch name")
        if not isinstance(records, list) or not records:
            raise RequestError("'requests' must be a non-empty list of request records")
        requests = []
        for i, record in enumerate(records):
            try:
                requests.append(parse_record(record))
            except RequestError as err:
                raise RequestError(f"requests[{i}]: {err}") from None
        check_batch(requests)
        job = Job(uuid.uuid4().hex[:16], profile, len(requests), name)
        self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job, requests), daemon=True).start()
        return job

    def _run(self, job: Job, requests) -> None:
        with self._queue_lock:
            job.status = "running"
            try:
                if self._trainer is None:
                    self._trainer = self._make_editor()
                result = self._trainer.edit(requests, profile=job.profile, name=job.name, progress=False)
                job.batch, job.status = result.adapter, "stored"
                self.audit("edit", "stored", profile=job.profile, batch=job.batch, job=job.id,
                           facts=[f"{r.prompt} -> {r.target_new}" for r in requests])
            except Exception as err:  # noqa: BLE001 - reported to the client through the job
                job.status, job.error = "failed", " ".join(str(err).split()) or type(err).__name__
                self.audit("edit", "failed", profile=job.profile, job=job.id, error=job.error)

    def compare(self, profile: str, prompt: str) -> dict:
        """The unedited model's greedy answer and `profile`'s, and the batches serving the prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_value")
        base = self.engine.complete(None, prompt, COMPARE_TOKENS, 0.0, 1.0, [])
        edited = self.engine.complete(profile, prompt, COMPARE_TOKENS, 0.0, 1.0, [])
        return {"profile": profile, "base": base.text, "edited": edited.text, "batches": edited.batches}

    def profiles(self) -> list[dict]:
        store = self.engine.editor.store(create=True)
        if not store.exists():
            return [{"profile": DEFAULT_PROFILE, "routing": "subject", "batches": []}]
        out = []
        for profile, names in store.profiles().items():
            batches = [{"batch": b, "facts": [{"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject,
                                               "aliases": list(r.aliases)} for r in store.requests_of(b)]}
                       for b in names]
            out.append({"profile": profile, "routing": store.routing(profile), "batches": batches})
        return out

    def change(self, action: str, body: dict) -> dict:
        """rollback / apply a batch, or create / copy a profile; audited whatever the outcome."""
        store = self.engine.editor.store()
        try:
            if action == "rollback":
                store.rollback(_text(body, "batch"), _text(body, "profile"))
            elif action == "apply":
                store.apply(_text(body, "batch"), _text(body, "profile"))
            else:
                source = body.get("copy_from")
                store.create_profile(_text(body, "profile"), body.get("batches") or [],
                                     copy_from=source if isinstance(source, str) else None)
        except (KdpoError, ApiError) as err:
            self.audit(action, "refused", request=_printable(body), error=" ".join(str(err).split()))
            raise
        self.audit(action, "done", request=_printable(body))
        return {"ok": True, "action": action, **_printable(body)}


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' is required (a name)", code="invalid_value")
    return value


def _printable(body: dict) -> dict:
    return {k: body[k] for k in ("profile", "batch", "copy_from", "batches") if k in body}


# --------------------------------------------------------------------------- the HTTP API


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number from {low} to {high}, got {value!r}", code="invalid_value")
    return float(value)


def _options(body: dict, engine: Engine) -> dict:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required: a profile of the store (GET /v1/models)", code="invalid_value")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", MAX_TOKENS_DEFAULT))
    limit = engine.editor.editor.max_length or 4096
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise ApiError(400, f"'max_tokens' must be a whole number from 1 to {limit}, got {max_tokens!r}",
                       code="invalid_value")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", code="invalid_value")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", code="invalid_value")
    return {"profile": model, "max_tokens": max_tokens, "stop": stop,
            "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0)}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # the typed-parts form: text parts only
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be text", code="invalid_value")
        out.append({"role": m["role"], "content": content})
    return out


@asynccontextmanager
async def _many_threads(app):
    """A request waiting for its tokens holds a worker thread; with anyio's default of 40, the 41st
    client - or an operator's rollback - would wait for a whole generation to end."""
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = MAX_IN_FLIGHT
    yield


def create_app(engine: Engine, admin: Admin | None = None):
    """The FastAPI application serving `engine` (and, with `admin`, the admin API)."""
    app = FastAPI(title="kdpo-lora", docs_url=None, redoc_url=None, lifespan=_many_threads)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse({"error": {"message": str(err), "type": err.kind, "code": err.code}},
                            status_code=err.status)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def call(fn, *args):
        try:
            return fn(*args)
        except ApiError:
            raise
        except KdpoError as err:  # a bad prompt, a damaged store, ...: the client's or the operator's to fix
            raise ApiError(400 if isinstance(err, RequestError) else 409, " ".join(str(err).split())) from None

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "kdpo-lora"}
                                           for n in call(engine.models)]}

    def respond(kind: str, opts: dict, prompt: str, wrap):
        ident, created = f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {}
        if not wrap.stream:
            done = call(engine.complete, opts["profile"], prompt, opts["max_tokens"], opts["temperature"],
                        opts["top_p"], opts["stop"])
            headers["X-KDPO-Batches"] = ",".join(done.batches)
            return JSONResponse({
                "id": ident, "object": wrap.object, "created": created, "model": opts["profile"],
                "choices": [wrap.choice(done.text, done.finish_reason)],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
                "kdpo_batches": done.batches}, headers=headers)
        batches, pieces = call(engine.stream, opts["profile"], prompt, opts["max_tokens"], opts["temperature"],
                               opts["top_p"], opts["stop"])
        headers["X-KDPO-Batches"] = ",".join(batches)

        def events() -> Iterator[str]:
            base = {"id": ident, "object": wrap.chunk_object, "created": created, "model": opts["profile"],
                    "kdpo_batches": batches}
            for piece in pieces:
                yield f"data: {json.dumps({**base, 'choices': [wrap.delta(piece, None)]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [wrap.delta('', 'stop')]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        opts = _options(body, engine)
        prompt = await run_in_threadpool(call, engine.chat_prompt, _messages(body))
        return await run_in_threadpool(respond, "chatcmpl", opts, prompt, _Chat(bool(body.get("stream"))))

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await read_body(request)
        opts = _options(body, engine)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_value")
        return await run_in_threadpool(respond, "cmpl", opts, prompt, _Text(bool(body.get("stream"))))

    if admin is not None:
        _admin_routes(app, admin, read_body, call)
    return app


def _admin_routes(app, admin: Admin, read_body, call) -> None:
    def authorise(request: Request) -> None:
        if not admin.authorised(request.headers.get("authorization")):
            raise ApiError(401, "the admin API needs the admin token: 'Authorization: Bearer <token>'",
                           kind="authentication_error", code="invalid_token")

    @app.post("/admin/edits", status_code=202)
    async def submit(request: Request):
        authorise(request)
        body = await read_body(request)
        job = call(admin.submit, body.get("profile", DEFAULT_PROFILE), body.get("requests"), body.get("name"))
        return JSONResponse(job.to_dict(), status_code=202)

    @app.get("/admin/jobs/{job_id}")
    def job(job_id: str, request: Request):
        authorise(request)
        if job_id not in admin.jobs:
            raise ApiError(404, f"no job {job_id!r} (jobs do not survive a restart: submit it again)",
                           code="job_not_found")
        return admin.jobs[job_id].to_dict()

    @app.get("/admin/profiles")
    def profiles(request: Request):
        authorise(request)
        return {"profiles": call(admin.profiles)}

    @app.post("/admin/compare")
    async def compare(request: Request):
        authorise(request)
        body = await read_body(request)
        return await run_in_threadpool(call, admin.compare, _text(body, "profile"), body.get("prompt"))

    @app.get("/", response_class=HTMLResponse)
    def operator_page():
        """The operator page: plain HTML and a little JavaScript; it asks for the admin token."""
        return OPERATOR_PAGE.read_text(encoding="utf-8")

    def changer(action: str):
        async def change(request: Request):
            authorise(request)
            body = await read_body(request)
            return await run_in_threadpool(call, admin.change, action, body)
        return change

    for action, path in (("rollback", "/admin/rollback"), ("apply", "/admin/apply"), ("profile", "/admin/profiles")):
        app.add_api_route(path, changer(action), methods=["POST"])


class _Chat:
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, stream: bool):
        self.stream = stream

    @staticmethod
    def choice(text: str, finish: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

    @staticmethod
    def delta(text: str, finish: str | None) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": text} if text else {}, "finish_reason": finish}


class _Text:
    object, chunk_object = "text_completion", "text_completion"

    def __init__(self, stream: bool):
        self.stream = stream

    @staticmethod
    def choice(text: str, finish: str) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    @staticmethod
    def delta(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}


def serve(engine: Engine, admin: Admin | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(engine, admin), host=host, port=port, log_level="warning")
