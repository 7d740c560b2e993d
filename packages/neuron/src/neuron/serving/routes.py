"""The HTTP edge of inference: Starlette routes, streaming, errors rendered once.

Rendering the chat template and tokenising the prompt run on a worker thread, never on the
event loop: a huge prompt must not stall every other request and health check meanwhile.

Errors found before the stream opens (unknown model, bad body, template, context length,
an engine that refuses the request at once) are plain HTTP errors in the OpenAI envelope,
even for `stream: true`. The stream opens when the first output arrives or when the first
keep-alive is due, whichever is first; after that an error ends the stream with an error
frame. A client that goes away closes the event iterator, which cancels the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cortex_core.errors import ApiError, decode_json_body
from cortex_core.openai.chat import ChatCompletionRequest
from cortex_core.openai.completions import CompletionRequest
from cortex_core.openai.responses import ResponsesRequest
from cortex_core.sse import encode_data, encode_event
from cortex_core.wire import given
from neuron.runtime import LoadedModel
from neuron.serving.chat import (
    CLAMP_MAX_TOKENS_HEADER,
    INCLUDE_THINKING_HEADER,
    ChatStreamProjector,
    Prepared,
    collect_chat_completion,
    enable_thinking_default,
    header_flag,
    include_thinking,
    prepare_chat,
    render_chat_prompt,
    require_messages,
)
from neuron.serving.completions import CompletionStreamProjector, collect_completion, prepare_completion
from neuron.serving.generation import OutputEvent, generate_events
from neuron.serving.model import ServingModel, ServingModels
from neuron.serving.responses import ResponsesStreamProjector, collect_response, prepare_responses
from neuron.serving.sse import DONE_FRAME, KEEPALIVE_FRAME, EventStreamResponse, Tick, with_keepalive

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(payload), status, headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    return json_response(error.openai_body(), error.status, error.headers())


def internal_error(exc: BaseException) -> ApiError:
    # The whole chain: device-fault markers live in inner exceptions (neuron.md §14.14).
    chain = []
    current: BaseException | None = exc
    while current is not None:
        chain.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    return ApiError(500, "; caused by ".join(chain))


def as_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    log.exception("inference failed", exc_info=exc)
    return internal_error(exc)


def api_edge(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:  # rendered once, here; unexpected ones are logged in as_error
            error = as_error(exc)
            if error.status < 500:
                log.warning("request rejected: %s %s: %s", error.status, error.code, error.message)
            return error_response(error)

    return wrapped


class ClientGone(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (non-streaming requests)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def collect(events: AsyncIterator[OutputEvent]) -> list[OutputEvent]:
    return [event async for event in events]


async def open_stream(
    events: AsyncIterator[OutputEvent],
    *,
    keepalive_secs: float,
    head: Callable[[], list[bytes]],
    project: Callable[[OutputEvent], list[bytes]],
    tail: list[bytes],
    error_frame: Callable[[ApiError], bytes],
    headers: dict[str, str] | None = None,
) -> Response:
    """The SSE response. `head` (the role chunk, response.created, ...) is built when the first
    output is ready, so it can carry what only the prefill knows (prompt and cached tokens);
    keep-alive comments may precede it."""
    ticking = with_keepalive(events, keepalive_secs)
    try:
        first = await anext(ticking)
    except BaseException:
        await ticking.aclose()
        raise  # before the stream opened: a plain HTTP error

    async def body() -> AsyncIterator[bytes]:
        started = False
        try:
            item = first
            while True:
                if isinstance(item, Tick):
                    yield KEEPALIVE_FRAME
                else:
                    if not started:
                        started = True
                        for frame in head():
                            yield frame
                    for frame in project(item):
                        yield frame
                try:
                    item = await anext(ticking)
                except StopAsyncIteration:
                    break
            for frame in tail:
                yield frame
        except Exception as exc:  # the stream is open: report in-band, then end it
            yield error_frame(as_error(exc))
        finally:
            await ticking.aclose()

    return EventStreamResponse(body(), headers)


def clamp_requested(request: Request) -> bool:
    """The gateway asks for it for models with `clamp_max_tokens = true` in models.toml."""
    return header_flag(request.headers.get(CLAMP_MAX_TOKENS_HEADER))


def chat_error_frame(error: ApiError) -> bytes:
    return encode_data(error.openai_body())


def inference_routes(lookup: Callable[[str], LoadedModel], *, keepalive_secs: float = 5.0) -> list[Route]:
    """Routes for /v1/chat/completions, /v1/completions, /v1/responses, /v1/chat/count_tokens.

    `lookup(model_id)` returns the loaded model or raises ApiError(404, model_not_found).
    """
    models = ServingModels(lookup)

    async def run(
        request: Request,
        model: ServingModel,
        prepared: Prepared,
        *,
        stream: bool,
        head: Callable[[], list[bytes]],
        project: Callable[[OutputEvent], list[bytes]],
        collect_into: Callable[[list[OutputEvent]], Any],
        tail: list[bytes] | None = None,
        error_frame: Callable[[ApiError], bytes] = chat_error_frame,
    ) -> Response:
        events = generate_events(model.loaded.engine, prepared.generation, prepared.processor)
        if stream:
            return await open_stream(
                events,
                keepalive_secs=keepalive_secs,
                head=head,
                project=project,
                tail=[DONE_FRAME] if tail is None else tail,
                error_frame=error_frame,
                headers=prepared.response_headers(),
            )
        try:
            collected = await until_disconnect(request, collect(events))
        except ClientGone:
            log.info("client disconnected; generation cancelled")
            return Response(status_code=499)
        return json_response(collect_into(collected), headers=prepared.response_headers())

    async def chat_completions(request: Request) -> Response:
        body = decode_json_body(await request.body(), ChatCompletionRequest)
        model = models.get(body.model)
        thinking = include_thinking(request.headers.get(INCLUDE_THINKING_HEADER))
        # Hidden reasoning used to eat the whole budget and return empty answers, so thinking
        # is on only when the client asks for it, either way (neuron.md §13.8).
        enable = enable_thinking_default(body, thinking)
        prepared = await asyncio.to_thread(
            prepare_chat,
            model,
            body,
            thinking=thinking,
            enable_thinking=enable,
            clamp=clamp_requested(request),
        )
        options = given(body.stream_options)
        continuous = bool(options and given(options.continuous_usage_stats))
        projector = ChatStreamProjector(
            body.model,
            bool(options and given(options.include_usage)),
            usage_now=(lambda: prepared.processor.usage) if continuous else None,
        )
        return await run(
            request,
            model,
            prepared,
            stream=bool(given(body.stream)),
            head=lambda: [encode_data(projector.start())],
            project=lambda event: [encode_data(chunk) for chunk in projector.project(event)],
            collect_into=lambda events: collect_chat_completion(body.model, events),
        )

    async def completions(request: Request) -> Response:
        body = decode_json_body(await request.body(), CompletionRequest)
        model = models.get(body.model)
        prepared = await asyncio.to_thread(prepare_completion, model, body, clamp=clamp_requested(request))
        options = given(body.stream_options)
        projector = CompletionStreamProjector(body.model, bool(options and given(options.include_usage)))
        return await run(
            request,
            model,
            prepared,
            stream=bool(given(body.stream)),
            head=list,
            project=lambda event: [encode_data(chunk) for chunk in projector.project(event)],
            collect_into=lambda events: collect_completion(body.model, events),
        )

    async def responses(request: Request) -> Response:
        body = decode_json_body(await request.body(), ResponsesRequest)
        model = models.get(body.model)
        chat, prepared = await asyncio.to_thread(
            prepare_responses, model, body, clamp=clamp_requested(request)
        )
        projector = ResponsesStreamProjector(body)

        def failed(error: ApiError) -> bytes:
            return b"".join(
                encode_event(e) for e in projector.fail(error.message, error.code or "server_error")
            )

        return await run(
            request,
            model,
            prepared,
            stream=bool(given(chat.stream)),
            head=lambda: [encode_event(event) for event in projector.start()],
            project=lambda event: [encode_event(e) for e in projector.project(event)],
            collect_into=lambda events: collect_response(body, events),
            tail=[],
            error_frame=failed,
        )

    async def count_tokens(request: Request) -> Response:
        body = decode_json_body(await request.body(), ChatCompletionRequest)
        model = models.get(body.model)
        thinking = include_thinking(request.headers.get(INCLUDE_THINKING_HEADER))
        enable = enable_thinking_default(body, thinking)

        def count() -> int:
            require_messages(body)
            prompt = render_chat_prompt(model, body, enable_thinking=enable)
            return len(model.encode(prompt, add_special_tokens=False))

        return json_response({"input_tokens": await asyncio.to_thread(count)})

    return [
        Route("/v1/chat/completions", api_edge(chat_completions), methods=["POST"]),
        Route("/v1/completions", api_edge(completions), methods=["POST"]),
        Route("/v1/responses", api_edge(responses), methods=["POST"]),
        Route("/v1/chat/count_tokens", api_edge(count_tokens), methods=["POST"]),
    ]
