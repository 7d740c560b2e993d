"""The base of every inference endpoint: one flow, errors rendered once.

An endpoint is a small class per route. `Endpoint` owns what every route does — decode
the body into its dialect's type, find the model, render errors in the OpenAI envelope —
and `GeneratingEndpoint` adds the generation flow: prepare (template, tokens, parameters)
on a worker thread, then stream or collect the engine's events, projected into the
dialect's wire objects by the subclass. A dialect supplies only what differs: its body
type, how it prepares, and how its events become frames or one answer (`Projection`).

Rendering the chat template and tokenising the prompt run on a worker thread, never on the
event loop: a huge prompt must not stall every other request and health check meanwhile.

Errors found before the stream opens (unknown model, bad body, template, context length,
an engine that refuses the request at once) are plain HTTP errors in the OpenAI envelope,
even for `stream: true`. The stream opens when the first output arrives or when the first
keep-alive is due, whichever is first; after that an error ends the stream with an error
frame. A client that goes away closes the event iterator, which cancels the sequence.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from cortex_core.errors import ApiError, decode_json_body
from cortex_core.http import CLAMP_MAX_TOKENS_HEADER, error_response, header_flag, json_response
from cortex_core.sse import encode_data
from neuron.serving.chat import Prepared
from neuron.serving.event_stream import DONE_FRAME, KEEPALIVE_FRAME, EventStreamResponse, Tick, with_keepalive
from neuron.serving.generation import ChoiceEvent, generate_choices
from neuron.serving.model import ServingModel, ServingModels

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelRequest(Protocol):
    """A decoded body names its model; that is all the base needs of it."""

    model: str


Body = TypeVar("Body", bound=ModelRequest)


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


async def collect(events: AsyncIterator[ChoiceEvent]) -> list[ChoiceEvent]:
    return [event async for event in events]


def chat_error_frame(error: ApiError) -> bytes:
    return encode_data(error.openai_body())


class Projection(abc.ABC):
    """One request's output in its dialect: stream frames, or one collected answer.

    The defaults are the chat family's (`data:` frames ending in `[DONE]`, errors as an
    OpenAI envelope); the Responses API overrides the tail and the error frame.
    """

    def head(self) -> list[bytes]:
        """Frames before the first output (the role chunk, response.created, ...). Built when
        the first output is ready, so they can carry what only the prefill knows (prompt
        and cached tokens); keep-alive comments may precede them."""
        return []

    @abc.abstractmethod
    def frames(self, event: ChoiceEvent) -> list[bytes]:
        """The frames of one output event of choice `event[0]` (OpenAI's `n`)."""

    def tail(self) -> list[bytes]:
        return [DONE_FRAME]

    def error_frame(self, error: ApiError) -> bytes:
        return chat_error_frame(error)

    @abc.abstractmethod
    def answer(self, events: list[ChoiceEvent]) -> Any:
        """The whole answer of a request that did not stream."""


async def open_stream(
    events: AsyncIterator[ChoiceEvent],
    projection: Projection,
    *,
    keepalive_secs: float,
    headers: dict[str, str] | None = None,
) -> Response:
    """The SSE response; it opens when the first output or the first keep-alive is due."""
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
                        for frame in projection.head():
                            yield frame
                    for frame in projection.frames(item):
                        yield frame
                try:
                    item = await anext(ticking)
                except StopAsyncIteration:
                    break
            for frame in projection.tail():
                yield frame
        except Exception as exc:  # the stream is open: report in-band, then end it
            yield projection.error_frame(as_error(exc))
        finally:
            await ticking.aclose()

    return EventStreamResponse(body(), headers)


def clamp_requested(request: Request) -> bool:
    """The gateway asks for it for models with `clamp_max_tokens = true` in models.toml."""
    return header_flag(request.headers.get(CLAMP_MAX_TOKENS_HEADER))


class Endpoint(abc.ABC, Generic[Body]):
    """One inference route: decode → model → `respond`, every error rendered here, once."""

    path: ClassVar[str]
    body_type: type[Body]

    def __init__(self, models: ServingModels, *, keepalive_secs: float) -> None:
        self.models = models
        self.keepalive_secs = keepalive_secs

    async def handle(self, request: Request) -> Response:
        try:
            body = decode_json_body(await request.body(), self.body_type)
            return await self.respond(request, body, self.models.get(body.model))
        except Exception as exc:  # rendered once, here; unexpected ones are logged in as_error
            error = as_error(exc)
            if error.status < 500:
                log.warning("request rejected: %s %s: %s", error.status, error.code, error.message)
            return error_response(error)

    @abc.abstractmethod
    async def respond(self, request: Request, body: Body, model: ServingModel) -> Response: ...


class GeneratingEndpoint(Endpoint[Body]):
    """An endpoint that generates: prepare off the loop, then stream or collect."""

    @abc.abstractmethod
    def prepare(self, request: Request, body: Body, model: ServingModel) -> Prepared:
        """Template, tokens and parameters; runs on a worker thread, raises ApiError."""

    @abc.abstractmethod
    def streams(self, body: Body) -> bool: ...

    @abc.abstractmethod
    def projection(self, body: Body, prepared: Prepared) -> Projection: ...

    async def respond(self, request: Request, body: Body, model: ServingModel) -> Response:
        prepared = await asyncio.to_thread(self.prepare, request, body, model)
        projection = self.projection(body, prepared)
        events = generate_choices(model.loaded.engine, prepared.generation, prepared.processors)
        if self.streams(body):
            return await open_stream(
                events, projection, keepalive_secs=self.keepalive_secs, headers=prepared.response_headers()
            )
        try:
            collected = await until_disconnect(request, collect(events))
        except ClientGone:
            log.info("client disconnected; generation cancelled")
            return Response(status_code=499)
        return json_response(projection.answer(collected), headers=prepared.response_headers())
