"""Anthropic Messages on the gateway: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

`/v1/messages`, per request:

1. The body decodes into `MessagesRequest` (a 400 `invalid_request_error` names the field)
   and converts to the internal chat request with cortex-core's pure converter; a stream
   asks for `stream_options.include_usage`, so the usage arrives in the last chunk.
2. The router grants a lease for the requested model; the chat request carries the
   concrete model id (an alias is resolved there, not spliced afterwards).
3. The chat request goes to the neuron's `/v1/chat/completions` through the proxy's own
   machinery (`RelayResponse`): candidates in the lease's order with failover only before
   the first byte, the session's idle timeout, the watcher that cancels the upstream when
   the client goes away, and the same metrics as the OpenAI routes (TTFT, tokens and
   throughput are read from the upstream's OpenAI bytes by the same observers). Only the
   body differs: instead of relaying it, this module converts it —
   - not streamed: the whole chat completion → one Anthropic `Message`
     (`message_from_chat_completion`); a body that breaks or does not parse is a 502/504,
     still an HTTP error since nothing has been sent;
   - streamed: OpenAI chunks → `AnthropicStreamConverter` → `event:`/`data:` frames. An
     upstream error frame, a broken connection or a stall ends the stream with Anthropic's
     `error` event; a neuron keep-alive comment is passed on as a comment.
4. A neuron's own error answer (4xx, or the last candidate's 5xx) keeps its status,
   message and Retry-After, in Anthropic's error shape, so SDKs raise their typed errors.
   Where Anthropic has its own wording the message is reworded from the error's fields
   (cortex_core.anthropic.errors): context overflows, and refused fields named as the
   caller named them (a schema refused as `output_config.format`).

The client's headers are forwarded like on the OpenAI routes, except `x-include-thinking`:
on a neuron it moves reasoning into `content` between literal markers, which here would
turn thinking into answer text (the peers' bug, peers.md §3.1). Its intent — show me the
reasoning — is kept instead: when the request does not set `thinking` itself, the header
switches the template's thinking on, and the reasoning comes back as `thinking` blocks.

`/v1/messages/count_tokens` converts the request the same way and asks a replica of the
model (cold-loading it if needed, as any request would) to render and count it:
`POST {neuron}/v1/chat/count_tokens` → `{"input_tokens": n}`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp
import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Send

from cortex_core.anthropic.convert import (
    count_tokens_request_to_chat,
    message_from_chat_completion,
    messages_request_to_chat,
)
from cortex_core.anthropic.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ContextOverflow,
    anthropic_field_message,
    context_limit_message,
)
from cortex_core.anthropic.messages import (
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    MessageStreamEvent,
)
from cortex_core.anthropic.stream import AnthropicStreamConverter
from cortex_core.errors import ApiError, decode_json_body
from cortex_core.http import INCLUDE_THINKING_HEADER, JSON_HEADERS, MAX_TOKENS_CLAMPED_HEADER, header_flag
from cortex_core.openai.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from cortex_core.request_id import request_id_of
from cortex_core.sse import SSEDecoder, SSEMessage, encode_event
from cortex_core.wire import given
from cortex_gateway.lease import Lease, Upstream
from cortex_gateway.observers import BodyObserver, StreamObserver
from cortex_gateway.proxy import AttemptsFailed, Proxy, RelayResponse, first_answer, request_headers

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
COUNT_TOKENS_PATH = "/v1/chat/count_tokens"
KEEPALIVE_COMMENT = b": keep-alive\n\n"
_NOT_FORWARDED = frozenset({"content-type", INCLUDE_THINKING_HEADER})
# Anthropic's error kinds; an upstream error of another kind is reported as `api_error`.
ANTHROPIC_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
    }
)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]

ReadBody = Callable[[Request], Awaitable[bytes]]
# The app's gate: a lease for the request's caller and model (keys, limits, fair share).
Acquire = Callable[[Request, str], Awaitable[Lease]]


# --- upstream error envelopes -------------------------------------------------------------


class _ErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | None = None
    param: str | None = None
    # A context overflow's numbers (neuron/serving/params.py `context_exceeded`).
    prompt_len: int | None = None
    max_tokens: int | None = None
    limit: int | None = msgspec.field(default=None, name="max")

    def anthropic_message(self) -> str:
        """The message in Anthropic's words where we know them (cortex_core.anthropic.errors),
        else the neuron's own."""
        if self.code == CONTEXT_LENGTH_EXCEEDED and self.prompt_len is not None and self.limit is not None:
            return context_limit_message(ContextOverflow(self.prompt_len, self.max_tokens, self.limit))
        return anthropic_field_message(self.param, self.message)


class _ErrorEnvelope(msgspec.Struct):
    # A neuron's error body, or an error frame in its stream: `{"error": {...}}`.
    error: _ErrorDetail | None = None


_ENVELOPE_DECODER = msgspec.json.Decoder(_ErrorEnvelope)
_CHUNK_DECODER = msgspec.json.Decoder(ChatCompletionChunk)
_COMPLETION_DECODER = msgspec.json.Decoder(ChatCompletion)


class _TokenCount(msgspec.Struct):
    input_tokens: int


def upstream_error(status: int, body: bytes, retry_after: str | None, node: str) -> ApiError:
    """A neuron's error answer as an ApiError: its status, message and Retry-After kept."""
    detail: _ErrorDetail | None = None
    try:
        detail = _ENVELOPE_DECODER.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        detail = None
    message = (
        detail.anthropic_message()
        if detail is not None and detail.message
        else f"node '{node}' answered HTTP {status}"
    )
    seconds: float | None = None
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    return ApiError(
        status,
        message,
        type=detail.type if detail is not None else None,
        code=detail.code if detail is not None else "upstream_error",
        retry_after=seconds,
    )


def _anthropic_error_type(openai_type: str | None) -> str:
    return openai_type if openai_type in ANTHROPIC_ERROR_TYPES else "api_error"


# --- the stream translator (pure: bytes in, bytes out) --------------------------------------


@dataclass(slots=True)
class AnthropicSSETranslator:
    """The upstream's OpenAI SSE bytes → Anthropic SSE bytes, whatever the chunk boundaries.

    `feed` each upstream chunk, then `close()` at the upstream's end of stream, or `fail()`
    when it broke. `[DONE]` finishes the message; an OpenAI error frame ends it with an
    Anthropic `error` event. Frames that are not chat chunks are skipped (and logged).
    """

    converter: AnthropicStreamConverter = field(default_factory=AnthropicStreamConverter)
    decoder: SSEDecoder = field(default_factory=SSEDecoder)

    def feed(self, chunk: bytes) -> bytes:
        out = self._frames(self.decoder.feed(chunk))
        if not out and _has_comment(chunk) and not self.converter.finished:
            return KEEPALIVE_COMMENT  # the neuron's keep-alive during a long prefill
        return out

    def close(self) -> bytes:
        """End of the upstream body: the message is closed even without `[DONE]`."""
        out = self._frames(self.decoder.close())
        return out + b"".join(encode_event(event) for event in self.converter.finish())

    def fail(self, reason: str) -> bytes:
        return b"".join(encode_event(event) for event in self.converter.fail(reason))

    def _frames(self, messages: list[SSEMessage]) -> bytes:
        frames: list[bytes] = []
        for message in messages:
            frames += [encode_event(event) for event in self._events(message)]
        return b"".join(frames)

    def _events(self, message: SSEMessage) -> list[MessageStreamEvent]:
        data = message.data.strip()
        if data == "[DONE]":
            return list(self.converter.finish())
        payload = data.encode()
        if b'"error"' in payload:
            try:
                error = _ENVELOPE_DECODER.decode(payload).error
            except (msgspec.DecodeError, msgspec.ValidationError):
                error = None
            if error is not None:
                return list(
                    self.converter.fail(
                        error.anthropic_message() or "the node failed mid-stream",
                        error_type=_anthropic_error_type(error.type),
                    )
                )
        try:
            chunk = _CHUNK_DECODER.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("skipping an upstream frame that is not a chat chunk: %s", exc)
            return []
        return list(self.converter.feed(chunk))


def _has_comment(chunk: bytes) -> bool:
    return chunk.startswith(b":") or b"\n:" in chunk


# --- the response: the proxy's relay with a converted body ----------------------------------


class MessagesResponse(RelayResponse):
    """`RelayResponse` (candidates, failover, idle timeout, client watch, metrics) whose body
    is converted to Anthropic's dialect instead of relayed. It overrides `_answer` and
    `_error_body` only; the rest of the request's life is the proxy's."""

    def __init__(
        self,
        proxy: Proxy,
        lease: Lease,
        body: bytes,
        headers: list[tuple[str, str]],
        started_at: float,
        *,
        stream: bool,
        request_id: str | None = None,
    ) -> None:
        super().__init__(proxy, lease, CHAT_PATH, body, headers, started_at)
        self._streamed = stream
        self._request_id = request_id

    async def _answer(
        self, send: Send, upstream: Upstream, response: aiohttp.ClientResponse, first: bytes
    ) -> None:
        if response.status >= 300:
            await self._relay_upstream_error(send, upstream, response, first)
        elif self._streamed:
            await self._convert_stream(send, response, first)
        else:
            await self._convert_body(send, upstream, response, first)

    def _error_body(self, error: ApiError) -> dict[str, Any]:
        return error.anthropic_body(self._request_id)

    async def _read_rest(self, response: aiohttp.ClientResponse, first: bytes) -> bytes:
        rest = await response.content.read()
        self._last_upstream_byte_at = perf_counter()
        return first + rest

    async def _relay_upstream_error(
        self, send: Send, upstream: Upstream, response: aiohttp.ClientResponse, first: bytes
    ) -> None:
        try:
            body = await self._read_rest(response, first)
        except (aiohttp.ClientError, TimeoutError):
            body = first  # the status says enough; the message is a bonus
        error = upstream_error(response.status, body, response.headers.get("retry-after"), upstream.node)
        await self._send_error(send, error, gateway_failed=False)

    async def _convert_body(
        self, send: Send, upstream: Upstream, response: aiohttp.ClientResponse, first: bytes
    ) -> None:
        observer = BodyObserver()
        self._observer = observer
        try:
            body = await self._read_rest(response, first)
        except (aiohttp.ClientError, TimeoutError) as exc:
            stalled = isinstance(exc, TimeoutError)
            error = ApiError(
                504 if stalled else 502,
                f"node '{upstream.node}' "
                + (
                    f"sent nothing for {self._proxy.config.idle_timeout_secs:g} s"
                    if stalled
                    else f"broke off its answer ({type(exc).__name__})"
                ),
                code="upstream_timeout" if stalled else "upstream_connection_error",
            )
            await self._send_error(send, error, gateway_failed=True)
            return
        observer.feed(body, self._last_upstream_byte_at or perf_counter())
        try:
            completion = _COMPLETION_DECODER.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = ApiError(
                502,
                f"node '{upstream.node}' sent a malformed chat completion: {exc}",
                code="upstream_malformed_response",
            )
            await self._send_error(send, error, gateway_failed=True)
            return
        message = message_from_chat_completion(completion)
        self._status = 200
        headers = [*JSON_HEADERS, *_passed_on(response)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": msgspec.json.encode(message)})

    async def _convert_stream(self, send: Send, response: aiohttp.ClientResponse, first: bytes) -> None:
        observer = StreamObserver()
        self._observer = observer
        translator = AnthropicSSETranslator()
        self._status = 200
        now = self._last_upstream_byte_at = perf_counter()
        headers = _SSE_HEADERS + _passed_on(response)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        observer.feed(first, now)
        await _send_more(send, translator.feed(first))
        await self._pump(send, response, convert=translator.feed, broke=translator.fail, end=translator.close)


def _passed_on(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    """The neuron's headers a converted answer keeps: only the one that says max_tokens was
    lowered (the rest describe the OpenAI body, which the client does not get)."""
    clamped = response.headers.get(MAX_TOKENS_CLAMPED_HEADER)
    return [] if clamped is None else [(MAX_TOKENS_CLAMPED_HEADER.encode(), clamped.encode("latin-1"))]


async def _send_more(send: Send, body: bytes) -> None:
    if body:
        await send({"type": "http.response.body", "body": body, "more_body": True})


# --- count_tokens --------------------------------------------------------------------------


async def count_on_replica(proxy: Proxy, lease: Lease, payload: bytes, headers: list[tuple[str, str]]) -> int:
    """The neuron's token count for a chat request; replicas tried by the relay's own loop."""

    def failed(upstream: Upstream, reason: str, unreachable: bool) -> None:
        log.warning("count_tokens on node %s for %s failed: %s", upstream.node, lease.model_id, reason)
        lease.upstream_failed(upstream, reason, unreachable=unreachable)

    try:
        upstream, response, first = await first_answer(
            proxy.session,
            lease,
            COUNT_TOKENS_PATH,
            payload,
            headers,
            max_attempts=proxy.config.max_attempts,
            attempting=lambda upstream: None,
            failed=failed,
        )
    except AttemptsFailed as attempts:
        raise attempts.error from attempts
    try:
        body = first + await response.content.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(
            502,
            f"node '{upstream.node}' broke off its token count ({type(exc).__name__})",
            code="upstream_connection_error",
        ) from exc
    finally:
        response.release()
    if response.status >= 300:
        raise upstream_error(response.status, body, response.headers.get("retry-after"), upstream.node)
    try:
        return _TOKEN_COUNT_DECODER.decode(body).input_tokens
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(
            502,
            f"node '{upstream.node}' sent a malformed token count: {exc}",
            code="upstream_malformed_response",
        ) from exc


_TOKEN_COUNT_DECODER = msgspec.json.Decoder(_TokenCount)


# --- routes --------------------------------------------------------------------------------


def forward_headers(request: Request, *, clamp_max_tokens: bool = False) -> list[tuple[str, str]]:
    """The client's headers for the neuron, as JSON, without `x-include-thinking` (module doc)."""
    headers = [
        (name, value)
        for name, value in request_headers(request.headers.raw, clamp_max_tokens=clamp_max_tokens)
        if name.lower() not in _NOT_FORWARDED
    ]
    headers.append(("content-type", "application/json"))
    return headers


def wants_thinking(request: Request) -> bool:
    return header_flag(request.headers.get(INCLUDE_THINKING_HEADER))


def upstream_body(chat: ChatCompletionRequest, lease: Lease, *, include_thinking: bool) -> bytes:
    """The chat request for the lease's replica: the concrete model id, and thinking switched
    on for `x-include-thinking` unless the request's own `thinking` already decided."""
    chat.model = lease.model_id
    if include_thinking and given(chat.chat_template_kwargs) is None:
        chat.chat_template_kwargs = {"enable_thinking": True}
    return msgspec.json.encode(chat)


def routes(
    *,
    acquire: Acquire,
    proxy: Proxy,
    read_body: ReadBody,
    clamps_max_tokens: Callable[[str], bool] = lambda model_id: False,
) -> list[Route]:
    """`/v1/messages` and `/v1/messages/count_tokens` over the app's gate and proxy;
    `clamps_max_tokens(model_id)` is the catalogue's `clamp_max_tokens`."""

    async def create_message(request: Request) -> Response:
        received_at = perf_counter()
        parsed = decode_json_body(await read_body(request), MessagesRequest)
        chat = messages_request_to_chat(parsed)
        lease = await acquire(request, parsed.model)
        return MessagesResponse(
            proxy,
            lease,
            upstream_body(chat, lease, include_thinking=wants_thinking(request)),
            forward_headers(request, clamp_max_tokens=clamps_max_tokens(lease.model_id)),
            received_at,
            stream=bool(parsed.stream),
            request_id=request_id_of(request.scope),
        )

    async def count_tokens(request: Request) -> Response:
        parsed = decode_json_body(await read_body(request), CountTokensRequest)
        chat = count_tokens_request_to_chat(parsed)
        lease = await acquire(request, parsed.model)
        try:
            body = upstream_body(chat, lease, include_thinking=wants_thinking(request))
            count = await count_on_replica(proxy, lease, body, forward_headers(request))
        finally:
            lease.release()
        return Response(
            msgspec.json.encode(CountTokensResponse(input_tokens=count)), media_type="application/json"
        )

    return [
        Route("/v1/messages", create_message, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
