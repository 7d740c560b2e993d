"""Request ids: one id per API request, on every response and in both processes' logs.

The gateway names each request (or keeps the caller's own `x-request-id`), answers with it
in `request-id` (Anthropic's header) and `x-request-id` (OpenAI's), puts it in Anthropic
error bodies, and forwards it to the neuron as `x-request-id`; the neuron keeps it. Each
process logs one line per API request with the id, so one request can be followed from the
client through the gateway to the neuron (docs/gateway.md, "Request ids").

`RequestIdMiddleware` is plain ASGI (no framework import), so both apps can wrap themselves.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
ANTHROPIC_REQUEST_ID_HEADER = "request-id"
SCOPE_KEY = "cortex.request_id"
# What we accept from a caller: short and harmless in a log line and a header.
_ACCEPTED = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_RESPONSE_HEADERS = (REQUEST_ID_HEADER.encode(), ANTHROPIC_REQUEST_ID_HEADER.encode())

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_request_id() -> str:
    """`req_` and 24 hex digits, the shape of Anthropic's ids (clients may display them)."""
    return "req_" + secrets.token_hex(12)


def accepted_request_id(value: bytes | None) -> str | None:
    """The caller's `x-request-id` if it is safe to echo and log, else None."""
    if value is None or not _ACCEPTED.fullmatch(value):
        return None
    return value.decode("ascii")


def request_id_of(scope: Scope) -> str | None:
    """The id `RequestIdMiddleware` gave this request (None outside the middleware)."""
    value = scope.get(SCOPE_KEY)
    return value if isinstance(value, str) else None


class RequestIdMiddleware:
    """Names each HTTP request, stamps the id on its response, logs one line for it.

    The id is put into the request's own headers as `x-request-id` (replacing whatever the
    caller sent there), so a relay that forwards the client's headers forwards the id too.
    Only paths under `log_prefix` are logged: polls and probes would drown the requests.
    """

    def __init__(self, app: ASGIApp, *, logger: logging.Logger, log_prefix: str = "/v1/") -> None:
        self.app = app
        self.logger = logger
        self.log_prefix = log_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.encode()
        headers = scope["headers"]
        given = next((value for name, value in headers if name.lower() == header), None)
        request_id = accepted_request_id(given) or new_request_id()
        encoded = request_id.encode("ascii")
        scope = dict(scope)
        scope["headers"] = [(name, value) for name, value in headers if name.lower() != header]
        scope["headers"].append((header, encoded))
        scope[SCOPE_KEY] = request_id
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                stamped = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() not in _RESPONSE_HEADERS
                ]
                stamped += [(name, encoded) for name in _RESPONSE_HEADERS]
                message = {**message, "headers": stamped}
            await send(message)

        started = perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope["path"]
            if path.startswith(self.log_prefix):
                self.logger.info(
                    "%s %s %s -> %s in %.1f ms",
                    request_id,
                    scope["method"],
                    path,
                    status or "no response",
                    (perf_counter() - started) * 1000,
                )
