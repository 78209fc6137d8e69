"""The HTTP app: OpenAI's /v1 routes on FastAPI, errors in OpenAI's shape (FastAPI's own
included), Server-Sent Events for streams, /health and /metrics, behind `guard.Guard` (the
API key and the body's size checked before the body is read)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxrast.serve import playground, responses
from jaxrast.serve.guard import Guard, Limits
from jaxrast.serve.protocol import (
    ERRORS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from jaxrast.serve.service import BadRequest, Busy, Choice, QueueFull, RequestFailed, Service

log = logging.getLogger("jaxrast.serve")

# what an error of each status is called in OpenAI's shape
KINDS = {401: ("authentication_error", "invalid_api_key"), 404: ("not_found_error", None),
         405: ("invalid_request_error", "method_not_allowed"), 408: ("invalid_request_error", "timeout"),
         413: ("invalid_request_error", "body_too_large")}


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a client's lone surrogate, escaped
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


DEGRADED_AFTER = 3  # decode calls failed in a row before /health says "degraded"
UNPARSED = "the request body could not be parsed: send a JSON object in UTF-8, nested at most a few hundred levels"


def openapi_responses(ok: type) -> dict:
    """The answers a /v1 route documents: `ok` as JSON or a stream, and every error."""
    return {200: {"model": ok, "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **ERRORS}


def create_app(service: Service, *, api_key: str | None = None, grace_s: float = 10.0,
               limits: Limits | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        await asyncio.to_thread(service.stop, grace_s)  # SIGTERM: running requests get grace_s to finish

    app = FastAPI(title="jaxrast", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, limits=limits or Limits(),
                       refuse=lambda status, message, kind, code: error(status, message, kind, code=code))
    add_error_handlers(app, service)

    def check_model(body) -> None:
        """The served names: `NAME` decodes the request's own `mode` (RAST by default);
        `NAME:base` and `NAME:rl` fix the mode, so a client that sends only OpenAI's fields
        (lm-evaluation-harness) compares RAST with its base on one server."""
        names = service.model_names
        if body.model not in names:
            raise HTTPException(404, f"model {body.model!r} does not exist; this server serves "
                                     + ", ".join(map(repr, names)))
        if names[body.model] is not None:
            body.mode = names[body.model]

    @app.get("/health")
    async def health():
        """"ok"; "draining" while shutting down; "degraded" (503, so a load balancer moves
        traffic away) after DEGRADED_AFTER decode calls failed in a row, until one succeeds."""
        failed = service.scheduler.failed_in_a_row
        status = "draining" if not service.accepting else "degraded" if failed >= DEGRADED_AFTER else "ok"
        body = {"status": status, "slots": service.slots, "running": service.scheduler.running,
                "waiting": len(service.scheduler.queue)}
        if failed:
            body["failed_calls_in_a_row"] = failed
        return JSONResponse(body, status_code=503 if status == "degraded" else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=openapi_responses(ModelList))
    async def models():
        return ModelList(data=[ModelCard(id=name) for name in service.model_names]).model_dump()

    @app.post("/v1/completions", responses=openapi_responses(CompletionResponse))
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        prompts, params = await service.prepare(body)
        rid, choices = service.submit(prompts, params, body.n)
        if body.stream:
            return sse(responses.completion_chunks(service, body, rid, merged(service, choices, request)))
        done = await gather(service, choices, request)
        return (await responses.completion(service, body, rid, done)).model_dump(exclude_none=True)

    @app.post("/v1/chat/completions", responses=openapi_responses(ChatCompletionResponse))
    async def chat(body: ChatCompletionRequest, request: Request):
        check_model(body)
        prompts, params = await service.prepare(body)
        rid, choices = service.submit(prompts, params, body.n)
        if body.stream:
            return sse(responses.chat_chunks(service, body, rid, merged(service, choices, request)))
        done = await gather(service, choices, request)
        return responses.chat(service, body, rid, done).model_dump(exclude_none=True)

    app.include_router(playground.router(service))  # GET / (no key) and /v1/rast/... (the key, by the guard)
    return app


def add_error_handlers(app: FastAPI, service: Service) -> None:
    """Every refusal and failure in OpenAI's shape, FastAPI's and Starlette's own included."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('msg')})", "invalid_request_error")
        param = loc[0] if loc else None  # the field as the client sent it; the message has the full path
        where = ".".join(loc)
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            return error(400, f"{where} is required", "invalid_request_error", param)
        return error(400, f"{where}: {message}" if where else message, "invalid_request_error", param)

    @app.exception_handler(BadRequest)
    async def bad(_request, exc: BadRequest):
        return error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(QueueFull)
    async def full(_request, exc: QueueFull):
        return error(429, f"{exc}; retry shortly", "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(Busy)
    async def busy(_request, exc: Busy):
        return error(503, f"{exc}; retry shortly", "server_error", code="busy", headers={"Retry-After": "1"})

    @app.exception_handler(HTTPException)  # Starlette's: FastAPI's 404 / 405 / body errors and ours
    async def http_error(_request, exc: HTTPException):
        kind, code = KINDS.get(exc.status_code, ("invalid_request_error", None))
        message = UNPARSED if exc.detail == "There was an error parsing the body" else str(exc.detail)  # FastAPI's
        return error(exc.status_code, message, kind, code=code, headers=exc.headers)

    @app.exception_handler(RequestFailed)
    async def failed(_request, exc: RequestFailed):
        return error(500, str(exc), "server_error", code="engine_error")

    @app.exception_handler(Exception)
    async def crashed(_request, exc: Exception):  # a bug: still an OpenAI-shaped answer, and the server lives on
        log.exception("request failed")
        if getattr(service, "metrics", None) is not None:
            service.metrics.errors.inc()
        return error(500, f"internal error: {type(exc).__name__}", "server_error")


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-Sent Events; a request the engine failed ends its stream with an `error` event
    (OpenAI's error shape, which the openai client raises as an APIError)."""
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except RequestFailed as err:
            failure = ErrorResponse(error=ErrorBody(message=str(err), type="server_error", code="engine_error"))
            yield f"event: error\ndata: {failure.model_dump_json()}\n\n"
            return
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
    raise_if_failed(choices)
    return choices


def raise_if_failed(choices: list[Choice]) -> None:
    """Raises `RequestFailed` if the engine failed any of the choices (never a silent "stop")."""
    if any(c.request.finish_reason == "error" for c in choices):
        raise RequestFailed()


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
