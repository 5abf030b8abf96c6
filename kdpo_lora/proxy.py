"""`kdpo-lora serve --upstream URL --routes DIR`: the router in front of another OpenAI-compatible server.

To serve beyond one machine, `kdpo-lora store export --for vllm PROFILE -o DIR` writes each routed
batch as a LoRA module and a routing table (`routing.json`); vLLM (or any server that takes LoRA
modules by name, kdpo-lora's own included) serves them, and this proxy routes each request as
`kdpo-lora serve` would: it names the module in `model` and forwards the request unchanged
otherwise. It loads no model. Its limit: such servers apply one LoRA module per request, so a
prompt naming subjects of several batches is served by the newest of them; the others are named in
the `X-KDPO-Unserved` header.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from .errors import KdpoError
from .requests import parse_record
from .routing import ROUTING_TABLE, SubjectRouter


class Routes:
    """An export's routing table: which module serves a prompt."""

    def __init__(self, folder: str | Path):
        path = Path(folder) / ROUTING_TABLE
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            self.profile, self.base = table["profile"], table["upstream_base"]
            self.routed = table["routing"] == "subject"
            modules = [(name, [parse_record(r) for r in table["modules"][name]]) for name in table["order"]]
        except (OSError, ValueError, KeyError, TypeError, KdpoError) as err:
            raise KdpoError(f"{path} is not a routing table written by `store export --for vllm` ({err})") from None
        self.order = [name for name, _ in modules]
        self.router = SubjectRouter(modules) if self.routed else None

    def module(self, text: str) -> tuple[str, list[str], list[str]]:
        """The upstream model serving `text`, the batches it serves, and those it cannot also serve."""
        names = self.router.route(text) if self.router is not None else self.order
        if not names:
            return self.base, [], []
        return names[-1], [names[-1]], names[:-1]


def create_proxy(routes: Routes, upstream: str, timeout: float = 600.0):
    app = FastAPI(title="kdpo-lora proxy", docs_url=None, redoc_url=None)
    upstream = upstream.rstrip("/")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                            status_code=status)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": routes.profile, "object": "model", "created": 0,
                                            "owned_by": "kdpo-lora"}]}

    async def forward(request: Request, path: str, text_of):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            return error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the request body must be a JSON object")
        if body.get("model") != routes.profile:
            return error(404, f"the model {body.get('model')!r} does not exist (models: {routes.profile})")
        module, served, unserved = routes.module(text_of(body))
        headers = {"X-KDPO-Batches": ",".join(served), "X-KDPO-Unserved": ",".join(unserved)}
        call = urllib.request.Request(upstream + path, data=json.dumps({**body, "model": module}).encode(),
                                      headers={"Content-Type": "application/json"}, method="POST")
        try:
            answer = await run_in_threadpool(urllib.request.urlopen, call, timeout=timeout)
        except urllib.error.HTTPError as err:
            return Response(err.read(), status_code=err.code, media_type="application/json", headers=headers)
        except OSError as err:
            return error(502, f"the upstream server {upstream} did not answer ({err})")

        def relabel(data: dict) -> dict:  # the client asked for the profile; say which batches served it
            return {**data, "model": routes.profile, "kdpo_batches": served}

        if not body.get("stream"):
            with answer:
                return JSONResponse(relabel(json.loads(answer.read())), headers=headers)

        def lines() -> Iterator[str]:
            with answer:
                for raw in answer:
                    line = raw.decode("utf-8").rstrip("\n")
                    if line.startswith("data: {"):
                        line = "data: " + json.dumps(relabel(json.loads(line[6:])))
                    yield line + "\n"
        return StreamingResponse(iterate_in_threadpool(lines()), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await forward(request, "/v1/chat/completions", lambda body: "\n".join(
            m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content"))
            for m in body.get("messages") or [] if isinstance(m, dict)))

    @app.post("/v1/completions")
    async def complete(request: Request):
        return await forward(request, "/v1/completions", lambda body: str(body.get("prompt", "")))

    return app
