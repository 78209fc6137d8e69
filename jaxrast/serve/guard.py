"""The server's front door, an ASGI middleware that runs before FastAPI reads a byte of the
body: the API key (compared in constant time), the body's size (declared or counted), and a
read timeout for clients that stall while sending it. Its refusals come in OpenAI's error
shape, like every other answer of the server."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DOCS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may ask of the server before its request reaches a handler."""

    max_body_bytes: int = 4 * 2**20
    read_timeout_s: float = 30.0  # the longest pause while a body is sent
    protect_docs: bool = False  # /metrics and the OpenAPI docs behind the key too

    @classmethod
    def of(cls, cfg: Any) -> Limits:  # a jaxrast.serve.config.ServeConfig
        return cls(max_body_bytes=cfg.max_body_bytes, read_timeout_s=cfg.read_timeout, protect_docs=cfg.protect_docs)


class BodyTooLarge(HTTPException):
    """(An HTTPException: FastAPI passes those through its body parsing unchanged.)"""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(--max-body-bytes); send fewer or shorter prompts")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body stalled for more than {seconds:g} s (--read-timeout); send it "
                              "without pauses")


class Guard:
    """Checks the key and the declared size before the body is read, then counts the body
    and times each read while it is: `app` only ever sees a bounded body, from a live client."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, limits: Limits, refuse):
        self.app, self.limits, self.refuse = app, limits, refuse  # refuse(status, message, kind, code): a response
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.needs_key(scope["path"]) and not self.authorized(headers):
            response = self.refuse(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                   "authentication_error", "invalid_api_key")
            return await response(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            err = BodyTooLarge(self.limits.max_body_bytes)
            response = self.refuse(413, err.detail, "invalid_request_error", "body_too_large")
            return await response(scope, receive, send)
        await self.app(scope, self.bounded(receive), send)

    def needs_key(self, path: str) -> bool:
        if self.key is None:
            return False
        return path.startswith("/v1/") or path == "/v1" or (self.limits.protect_docs and path in DOCS)

    def authorized(self, headers: Headers) -> bool:
        sent = headers.get("authorization", "").encode("latin-1")  # header bytes as they came
        return hmac.compare_digest(sent, self.key)

    def bounded(self, receive: Receive) -> Receive:
        """`receive` with a byte count and a deadline per read, until the body has come (then
        as it is: a stream's disconnect watch waits on it for as long as the stream runs)."""
        state = {"bytes": 0, "done": False}
        limit, timeout = self.limits.max_body_bytes, self.limits.read_timeout_s

        async def receive_bounded() -> Message:
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > limit:
                    raise BodyTooLarge(limit)
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        return receive_bounded
