"""The HTTP app: OpenAI's /v1 routes on FastAPI, errors in OpenAI's shape, Server-Sent Events
for streams, an optional API key on every /v1 route, /health and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxrast.serve import playground, responses
from jaxrast.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from jaxrast.serve.service import BadRequest, Choice, QueueFull, Service

log = logging.getLogger("jaxrast.serve")


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def create_app(service: Service, *, api_key: str | None = None, grace_s: float = 10.0) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        await asyncio.to_thread(service.stop, grace_s)  # SIGTERM: running requests get grace_s to finish

    app = FastAPI(title="jaxrast", lifespan=lifespan)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise HTTPException(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('msg')})", "invalid_request_error")
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            message = f"{param} is required"
        return error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(BadRequest)
    async def bad(_request, exc: BadRequest):
        return error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(QueueFull)
    async def full(_request, exc: QueueFull):
        return error(429, f"{exc}; retry shortly", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kinds = {401: ("authentication_error", "invalid_api_key"), 404: ("not_found_error", None)}
        kind, code = kinds.get(exc.status_code, ("invalid_request_error", None))
        return error(exc.status_code, str(exc.detail), kind, code=code)

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):  # a bug: still an OpenAI-shaped answer, and the server lives on
        log.exception("request failed")
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def check_model(name: str) -> None:
        if name != service.model_name:
            raise HTTPException(404, f"model {name!r} does not exist; this server serves {service.model_name!r}")

    @app.get("/health")
    async def health():
        return {"status": "ok" if service.accepting else "draining", "slots": service.slots,
                "running": service.scheduler.running, "waiting": len(service.scheduler.queue)}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return ModelList(data=[ModelCard(id=service.model_name)]).model_dump()

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [service.encode(p) for p in body.prompts()]
        params = service.params(body, max(map(len, prompts)), default_max=16)
        rid, choices = service.submit(prompts, params, body.n)
        if body.stream:
            return sse(responses.completion_chunks(service, body, rid, merged(service, choices, request)))
        done = await gather(service, choices, request)
        return (await responses.completion(service, body, rid, done)).model_dump(exclude_none=True)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        text = service.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        prompt = service.encode(text, "messages")
        params = service.params(body, len(prompt), default_max=None)
        rid, choices = service.submit([prompt], params, body.n)
        if body.stream:
            return sse(responses.chat_chunks(service, body, rid, merged(service, choices, request)))
        done = await gather(service, choices, request)
        return responses.chat(service, body, rid, done).model_dump(exclude_none=True)

    app.include_router(playground.router(service, authorize))  # GET / (no key) and /v1/rast/... (the key)
    return app


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _watch(request: Request, choices: list[Choice]) -> None:
    """Cancels the choices when the client goes away (their slots free at the next call)."""
    while not all(c.request.finished for c in choices):
        if await request.is_disconnected():
            for c in choices:
                c.request.cancelled = True
            return
        await asyncio.sleep(0.1)


async def gather(service: Service, choices: list[Choice], request: Request) -> list[Choice]:
    watcher = asyncio.create_task(_watch(request, choices))
    try:
        await asyncio.gather(*(service.wait(c) for c in choices))
    finally:
        watcher.cancel()
    return choices


async def merged(service: Service, choices: list[Choice], request: Request):
    """(choice, update) pairs of several choices as they arrive; cancels them all if the
    stream is abandoned (a client disconnect cancels this generator)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        async for u in service.updates(c):
            await queue.put((c, u))
        await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    watcher = asyncio.create_task(_watch(request, choices))
    try:
        remaining = len(choices)
        while remaining:
            c, u = await queue.get()
            if u is None:
                remaining -= 1
                continue
            yield c, u
    finally:
        watcher.cancel()
        for c in choices:
            if not c.request.finished:
                c.request.cancelled = True
        for t in tasks:
            t.cancel()
