"""The HTTP edge both daemons share: JSON answers, errors in the caller's dialect, 404/405,
and the names of the headers the gateway and the neuron exchange.

The gateway and the neuron are both Starlette apps that render `ApiError`s once, at the
edge. Keeping that edge here means a change to the envelope, to Retry-After or to how an
unknown route is answered happens once for both, and a header one side sends is spelled
the way the other reads it. Only the daemons import this module (the `http` extra brings
Starlette); `cortex status` never does, so it starts without the web framework.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from cortex_core.errors import ApiError, unexpected_error

# The client asks for the reasoning inside `content`, between the literal markers.
INCLUDE_THINKING_HEADER = "x-include-thinking"
# Gateway → neuron: lower an oversized max_tokens instead of refusing it (models.toml's
# `clamp_max_tokens`); neuron → client: the value used when it did.
CLAMP_MAX_TOKENS_HEADER = "x-cortex-clamp-max-tokens"
MAX_TOKENS_CLAMPED_HEADER = "x-cortex-max-tokens-clamped"

JSON_MEDIA_TYPE = "application/json"
# How long both daemons keep an idle client connection open. The gateway's pool drops an
# idle neuron connection sooner (POOLED_CONNECTION_SECS), so it never sends a request on a
# connection the neuron is closing at that moment (hypercorn's 5 s default against
# aiohttp's 15 s made exactly that race: a 502 "Server disconnected" now and then).
SERVER_KEEP_ALIVE_SECS = 75
POOLED_CONNECTION_SECS = 30
# The raw ASGI form, for responses that write their own messages (the gateway's relay).
JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", JSON_MEDIA_TYPE.encode()),)


class Dialect(enum.Enum):
    """Whose error envelope a caller parses."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


def header_flag(value: str | None) -> bool:
    """A yes/no request header (`x-include-thinking`, `x-cortex-clamp-max-tokens`)."""
    return (value or "").strip().lower() in ("1", "true", "yes")


class JSONResponse(Response):
    """A JSON answer encoded by msgspec, which knows the wire Structs (Starlette's own
    JSONResponse goes through `json.dumps`, which does not)."""

    media_type = JSON_MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def json_response(value: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(value, status_code=status, headers=headers)


def error_body(error: ApiError, dialect: Dialect, request_id: str | None = None) -> dict[str, Any]:
    """The envelope a caller of `dialect` parses; Anthropic's names the request too."""
    if dialect is Dialect.ANTHROPIC:
        return error.anthropic_body(request_id)
    return error.openai_body()


def error_response(
    error: ApiError, dialect: Dialect = Dialect.OPENAI, request_id: str | None = None
) -> Response:
    """`error` as an HTTP answer: its status, its envelope and its Retry-After."""
    return json_response(error_body(error, dialect, request_id), error.status, error.headers())


def error_asgi_headers(error: ApiError) -> list[tuple[bytes, bytes]]:
    """The headers of an error answer written as raw ASGI messages."""
    return [*JSON_HEADERS, *((k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers().items())]


def not_allowed_message(method: str, path: str) -> str:
    return f"method {method} is not allowed on {path}"


def routing_error(
    exc: HTTPException, method: str, path: str, no_route: Callable[[str, str], str]
) -> ApiError:
    """Starlette's own 404/405 (no route, wrong method) as an ApiError the caller can act on;
    `no_route(method, path)` says where the API is, which differs per daemon."""
    if exc.status_code == 404:
        return ApiError(404, no_route(method, path), code="not_found")
    if exc.status_code == 405:
        return ApiError(405, not_allowed_message(method, path))
    return ApiError(exc.status_code, str(exc.detail))


Render = Callable[[Request, ApiError], Response]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(
    render: Render,
    no_route: Callable[[str, str], str],
    *,
    log_server_errors: logging.Logger | None = None,
) -> dict[Any, ExceptionHandler]:
    """Starlette's `exception_handlers` for an app: `ApiError`s, routing errors and any other
    exception, each rendered by `render` (which picks the caller's dialect). With `log_server_errors`, a
    5xx is logged there, since nothing else would say why a request failed."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        if log_server_errors is not None and exc.status >= 500:
            log_server_errors.warning(
                "%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message
            )
        return render(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return render(request, routing_error(exc, request.method, request.url.path, no_route))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug, not a refusal: still an answer in the caller's dialect, never Starlette's
        # plain-text 500. (Starlette re-raises it afterwards, so it is logged with its trace.)
        return render(request, unexpected_error(exc))

    return {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_unexpected}
