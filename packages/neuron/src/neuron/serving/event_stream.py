"""Server-sent events: framing, keep-alive ticks while the engine is silent, and cleanup.

A long prompt can prefill for seconds before the first token; clients and proxies treat a
silent connection as dead, so `with_keepalive` yields a `KEEPALIVE` tick whenever the source
has produced nothing for `interval` seconds. `EventStreamResponse` guarantees the body
iterator is closed when the response ends for any reason — Starlette on ASGI ≥ 2.4 only
notices a disconnect as a failed send and would otherwise leave the generator (and the
engine sequence behind it) suspended until garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
log = logging.getLogger(__name__)


class Tick:
    def __repr__(self) -> str:
        return "KEEPALIVE"


KEEPALIVE: Final = Tick()
KEEPALIVE_FRAME = b": keep-alive\n\n"
DONE_FRAME = b"data: [DONE]\n\n"


async def with_keepalive(source: AsyncIterator[T], interval: float) -> AsyncGenerator[T | Tick, None]:
    """Items of `source`, with a KEEPALIVE tick after every `interval` seconds of silence."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        close = getattr(source, "aclose", None)
        if close is not None:
            await close()


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        base = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(content, headers={**base, **(headers or {})})
        self._source = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            log.info("client disconnected mid-stream; generation cancelled")
        finally:
            close = getattr(self._source, "aclose", None)
            if close is not None:
                await close()
