"""DrainGuard at the ASGI level: what a request still running at the end of the grace gets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cortex_core.drain import Drain, DrainGuard, openai_stream_error
from cortex_core.errors import ApiError

Message = dict[str, Any]
SSE = [(b"content-type", b"text/event-stream")]


def render(scope: Any, error: ApiError) -> Callable[[Any, Any, Any], Awaitable[None]]:
    async def respond(scope: Any, receive: Any, send: Any) -> None:
        headers = [(k.encode(), v.encode()) for k, v in error.headers().items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(error.openai_body()).encode()})

    return respond


class Exchange:
    def __init__(self, drain: Drain, app: Any, path: str = "/v1/chat/completions") -> None:
        self.sent: list[Message] = []
        self.guard = DrainGuard(app, drain=drain, render=render, stream_error=openai_stream_error)
        self.path = path

    async def run(self) -> None:
        async def receive() -> Message:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            self.sent.append(message)

        scope = {"type": "http", "method": "POST", "path": self.path, "headers": []}
        await self.guard(scope, receive, send)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))


def stream_forever(first: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": first, "more_body": True})
        await asyncio.Event().wait()

    return app


async def wait_forever(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.Event().wait()


async def short_answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


async def started(drain: Drain, count: int) -> None:
    """Let the tasks just created run until they wait (they never wait on anything but us)."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert drain.in_flight == count


async def in_flight(
    app: Any, path: str = "/v1/chat/completions", daemon: str = "gateway"
) -> tuple[Drain, Exchange, asyncio.Task[None]]:
    """One exchange through `app` under a fresh drain of `daemon`, run until it is in flight."""
    drain = Drain(daemon)
    exchange = Exchange(drain, app, path)
    task = asyncio.create_task(exchange.run())
    await started(drain, 1)
    return drain, exchange, task


async def test_a_stream_running_at_the_end_of_the_grace_ends_with_an_error_chunk() -> None:
    drain, exchange, task = await in_flight(stream_forever(b"data: {}\n\n"))
    drain.expire()
    await task
    assert exchange.status == 200
    assert exchange.sent[-1] == {
        "type": "http.response.body",
        "body": exchange.sent[-1]["body"],
        "more_body": False,
    }
    last = exchange.body.split(b"\n\n")[-2]
    assert last.startswith(b"data: ")
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == "shutting_down" and "gateway" in error["message"]


async def test_a_responses_stream_ends_with_an_error_event() -> None:
    responses = stream_forever(b"event: response.created\ndata: {}\n\n")
    drain, exchange, task = await in_flight(responses, "/v1/responses", daemon="neuron")
    drain.expire()
    await task
    event, data = exchange.body.split(b"\n\n")[-2].split(b"\n")
    assert event == b"event: error"
    payload = json.loads(data[len(b"data: ") :])
    assert payload["type"] == "error" and payload["code"] == "shutting_down" and payload["error"]["message"]


async def test_a_request_with_nothing_sent_yet_gets_a_503_with_retry_after() -> None:
    drain, exchange, task = await in_flight(wait_forever)
    drain.expire()
    await task
    assert exchange.status == 503
    assert (b"retry-after", b"1") in exchange.sent[0]["headers"]


async def test_finished_requests_are_untouched_and_late_ones_refused() -> None:
    drain = Drain("gateway")
    done = Exchange(drain, short_answer)
    await done.run()
    assert (done.status, done.body, drain.in_flight) == (200, b"done", 0)
    drain.expire()
    late = Exchange(drain, short_answer)
    await late.run()
    assert late.status == 503


async def test_a_plain_body_cut_short_closes_the_connection() -> None:
    async def half_a_body(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        await asyncio.Event().wait()

    drain, _, task = await in_flight(half_a_body)
    drain.expire()
    with pytest.raises(ConnectionAbortedError):
        await task


async def test_a_cancellation_not_from_the_drain_is_not_swallowed() -> None:
    drain, _, task = await in_flight(wait_forever)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert drain.in_flight == 0


async def test_begin_expires_after_the_grace() -> None:
    drain, exchange, task = await in_flight(wait_forever)
    drain.begin(0.01)
    await task
    assert drain.expired and exchange.status == 503
