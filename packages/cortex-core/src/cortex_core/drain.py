"""Graceful drain: on shutdown, requests get a grace period, then an answer, never a cut.

hypercorn stops accepting on the shutdown trigger and waits up to its `graceful_timeout`
for in-flight requests, then cancels them: a stream just stops, mid-body, with no error
event and no `[DONE]`, and SDKs take the truncated answer for a complete one. So the
server calls `Drain.begin(grace)` when the trigger fires and gives hypercorn a few seconds
more than the grace; when the grace is over, `DrainGuard` (an ASGI middleware around the
app) interrupts every request still running and ends it in the caller's dialect:

- nothing sent yet (queued, waiting for a load, or a non-streamed generation): a 503
  with Retry-After, rendered by the app;
- a stream under way: one last error event (`stream_error`), then the end of the body;
- any other body under way: nothing can be said in band; the connection is closed.

Plain ASGI (cortex-core imports no web framework).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from cortex_core.body_guard import ASGIApp, Message, Receive, Render, Scope, Send
from cortex_core.errors import ApiError

log = logging.getLogger(__name__)

# hypercorn's own deadline is the grace plus this, so that the error events written when
# the grace ends reach the clients before hypercorn cancels what is left.
FLUSH_SECS = 5.0
RETRY_AFTER_SECS = 1.0

StreamError = Callable[[Scope, ApiError], bytes]


def shutting_down(who: str) -> ApiError:
    return ApiError(
        503,
        f"the {who} is shutting down and its grace period for running requests is over; retry",
        code="shutting_down",
        retry_after=RETRY_AFTER_SECS,
    )


def openai_stream_error(scope: Scope, error: ApiError) -> bytes:
    """An error ending an OpenAI stream: an error chunk, or the Responses API's `error` event.

    Blank lines first: they end any event left half-written. The Responses event carries
    `error` too, which is what the OpenAI SDK raises on.
    """
    body = error.openai_body()
    if scope["path"] == "/v1/responses":
        event = {"type": "error", "code": error.code, "message": error.message, "param": None, **body}
        return b"\n\nevent: error\ndata: " + msgspec.json.encode(event) + b"\n\n"
    return b"\n\ndata: " + msgspec.json.encode(body) + b"\n\n"


class _Exchange:
    """One request in flight: what has been sent, and whether the drain interrupted it."""

    __slots__ = ("_send", "finished", "interrupted", "started", "streaming", "task")

    def __init__(self, task: asyncio.Task[object], send: Send) -> None:
        self.task = task
        self._send = send
        self.started = False
        self.streaming = False
        self.finished = False
        self.interrupted = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.streaming = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in message.get("headers", ())
            )
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def end(self, message: Message) -> None:
        await self._send(message)


class Drain:
    """The shutdown deadline of one server's requests."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.expired = False
        self._exchanges: set[_Exchange] = set()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._exchanges)

    def begin(self, grace_secs: float) -> None:
        """Start the grace period (call on the serving loop when the shutdown trigger fires)."""
        if self._timer is None and not self.expired:
            log.info(
                "%s: draining %d request(s) in flight for up to %g s", self.who, self.in_flight, grace_secs
            )
            self._timer = asyncio.get_running_loop().call_later(grace_secs, self.expire)

    def expire(self) -> None:
        """The grace is over: interrupt every request still running."""
        self.expired = True
        if self._exchanges:
            log.warning("%s: ending %d request(s) still running at the end of the grace period",
                        self.who, len(self._exchanges))  # fmt: skip
        for exchange in self._exchanges:
            exchange.interrupted = True
            exchange.task.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def track(self, exchange: _Exchange) -> None:
        self._exchanges.add(exchange)

    def untrack(self, exchange: _Exchange) -> None:
        self._exchanges.discard(exchange)


class DrainGuard:
    """ASGI middleware: requests still running when the drain expires end in their dialect."""

    def __init__(self, app: ASGIApp, *, drain: Drain, render: Render, stream_error: StreamError) -> None:
        self._app = app
        self._drain = drain
        self._render = render
        self._stream_error = stream_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self._app(scope, receive, send)
            return
        if self._drain.expired:
            await self._render(scope, shutting_down(self._drain.who))(scope, receive, send)
            return
        exchange = _Exchange(task, send)
        self._drain.track(exchange)
        try:
            await self._app(scope, receive, exchange.send)
        except asyncio.CancelledError:
            if not exchange.interrupted:
                raise
            task.uncancel()
        finally:
            self._drain.untrack(exchange)
        if exchange.interrupted and not exchange.finished:
            await self._end(scope, receive, exchange)

    async def _end(self, scope: Scope, receive: Receive, exchange: _Exchange) -> None:
        error = shutting_down(self._drain.who)
        if not exchange.started:
            await self._render(scope, error)(scope, receive, exchange.end)
        elif exchange.streaming:
            frame = self._stream_error(scope, error)
            await exchange.end({"type": "http.response.body", "body": frame, "more_body": False})
        else:
            # A plain body cut short must not look complete: let the server close the connection.
            raise ConnectionAbortedError(f"{self._drain.who} shutting down mid-response")
